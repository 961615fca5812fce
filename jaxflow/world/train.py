"""Training the toy LLaVA on the toy world: data, losses, the jitted AdamW step, evaluation and export.

The model is jaxflow's own `VisionLanguageModel` NNX module built from a transformers `LlavaConfig(...).to_dict()`.
Images go through the code a sweep uses (`jaxflow.inputs.images.preprocess` on the decoded JPEG), prompts
through `jaxflow.inputs.prompts` (the study's vicuna_v1 template, llava-hf tokenization). The vision tower
is pretrained on patch labels, then frozen (`image_states` caches its features); the projector and the
language model train on captions and questions (`train`, one jitted step per kind of row).
`scripts/train_toy.py` runs the whole recipe.

`export` writes the trained parameters in the transformers llava-hf on-disk layout (tensor names and
PyTorch shapes from the converter's table, inverted) with config, tokenizer, generation and
preprocessor configs: a checkpoint `LlavaForConditionalGeneration.from_pretrained` and `jaxflow convert`
both read.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from jaxflow.config import ModelConfig
from jaxflow.inputs import images, prompts
from jaxflow.model import Model
from jaxflow.nn.decoder import KVCache
from jaxflow.nn.vlm import VisionLanguageModel
from jaxflow.world.generate import image_of
from jaxflow.world.questions import TASKS, Example, caption
from jaxflow.world.scene import ATTRIBUTES, SHAPES, Scene

TEMPLATE = "vicuna_v1"


@dataclasses.dataclass(frozen=True)
class Arch:
    """Sizes of the toy LLaVA (a CLIP ViT, the LLaVA-1.5 projector, a Llama decoder)."""

    image_size: int = 56
    patch_size: int = 14
    vision_hidden: int = 96
    vision_layers: int = 3  # the last one is never read (vision_feature_layer -2, as in LLaVA-1.5)
    vision_heads: int = 4
    text_hidden: int = 96
    text_layers: int = 4
    text_heads: int = 4
    text_kv_heads: int = 4
    text_intermediate: int = 384
    vision_feature_layer: int = -2
    tie_word_embeddings: int = 1  # the output head is the input embedding (transposed); 0: a head of its own


def hf_config(tokenizer, arch: Arch = Arch()) -> dict:
    """A transformers llava config dict (every default filled in) for `arch` and `tokenizer`."""
    from transformers import CLIPVisionConfig, LlamaConfig
    from transformers import LlavaConfig as HFLlavaConfig

    vision = CLIPVisionConfig(hidden_size=arch.vision_hidden, intermediate_size=4 * arch.vision_hidden,
                              num_hidden_layers=arch.vision_layers, num_attention_heads=arch.vision_heads,
                              image_size=arch.image_size, patch_size=arch.patch_size, hidden_act="quick_gelu",
                              projection_dim=arch.text_hidden)
    tie = bool(arch.tie_word_embeddings)
    text = LlamaConfig(vocab_size=len(tokenizer), hidden_size=arch.text_hidden,
                       intermediate_size=arch.text_intermediate, num_hidden_layers=arch.text_layers,
                       num_attention_heads=arch.text_heads, num_key_value_heads=arch.text_kv_heads,
                       max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tie,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    g = arch.image_size // arch.patch_size
    cfg = HFLlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                        image_token_index=tokenizer.convert_tokens_to_ids(prompts.IMAGE_PLACEHOLDER),
                        vision_feature_layer=arch.vision_feature_layer, vision_feature_select_strategy="default",
                        projector_hidden_act="gelu", image_seq_length=g * g, tie_word_embeddings=tie,
                        pad_token_id=tokenizer.pad_token_id)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    return cfg.to_dict()


def init_module(cfg: ModelConfig, seed: int) -> VisionLanguageModel:
    """The Flax module with jaxflow's initialisation (normal(0.02) kernels), CLS and position embeddings
    drawn from normal(0.02) too (jaxflow zero-fills them, which only suits loading)."""
    module = VisionLanguageModel(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    key = jax.random.key(seed + 1)
    vt = module.vision_tower
    k1, k2 = jax.random.split(key)
    vt.class_embed.set_value(0.02 * jax.random.normal(k1, vt.class_embed.shape))
    vt.pos_embed.set_value(0.02 * jax.random.normal(k2, vt.pos_embed.shape))
    return module


def deepen(module: VisionLanguageModel, cfg: ModelConfig, n_new: int, at: int,
           seed: int) -> tuple[VisionLanguageModel, ModelConfig]:
    """`module` with `n_new` decoder layers inserted before layer `at`. The new layers' attention output and
    MLP down projections are zero, so each adds nothing to the residual stream and the deeper model computes
    exactly what `module` did until training moves them (depth growth, as in progressive stacking)."""
    layers = cfg.text.num_layers
    if n_new < 1 or not 0 <= at <= layers:
        raise ValueError(f"deepen: need n_new >= 1 and 0 <= at <= {layers} (the layer count); got {n_new}, {at}")
    deeper_cfg = dataclasses.replace(cfg, text=dataclasses.replace(cfg.text, num_layers=layers + n_new))
    deeper = init_module(deeper_cfg, seed)
    old = dict(nnx.to_flat_state(nnx.state(module, nnx.Param)))
    flat = []
    for path, var in nnx.to_flat_state(nnx.state(deeper, nnx.Param)):
        if path[:2] == ("language_model", "layers"):
            i = path[2]
            if at <= i < at + n_new:  # a new layer: zero the projections writing into the residual stream
                zero = path[-2] in ("o_proj", "down_proj")
                flat.append((path, var.replace(jnp.zeros_like(var.get_value())) if zero else var))
                continue
            path_old = path[:2] + (i if i < at else i - n_new,) + path[3:]
            flat.append((path, old.pop(path_old)))
        else:
            flat.append((path, old.pop(path)))
    assert not old, f"deepen: parameters left uncopied: {sorted(old)[:3]}"
    nnx.update(deeper, nnx.from_flat_state(flat))
    return deeper, deeper_cfg


# --- data ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Data:
    """Encoded training rows (a question and its answer, or a caption), right-padded to T.

    The loss reads `targets` [N, A] (every answer token and the `</s>` closing it) predicted at `positions`
    [N, A] (the position before each); `prompt_lengths` [N] is the length of the prompt alone (what a sweep
    feeds the model), `seq_lengths` [N] the length of the whole row.
    """

    input_ids: np.ndarray  # [N, T]
    seq_lengths: np.ndarray  # [N]
    prompt_lengths: np.ndarray  # [N]
    positions: np.ndarray  # [N, A]
    targets: np.ndarray  # [N, A]
    target_mask: np.ndarray  # [N, A] weight of each target (0: padding)
    pixel_values: np.ndarray  # [N, 3, S, S]
    patch_labels: np.ndarray  # [N, g*g, 4] (see `patch_labels`), for the vision pretraining
    tasks: np.ndarray  # [N] task index (into TASKS)
    answers: list[str]

    def __len__(self) -> int:
        return len(self.seq_lengths)

    def take(self, idx) -> Data:
        idx = np.asarray(idx)
        return Data(*(getattr(self, f.name)[idx] for f in dataclasses.fields(self) if f.name != "answers"),
                    answers=[self.answers[i] for i in idx])


def qa_text(question: str, answer: str) -> tuple[str, list[tuple[int, int]]]:
    """The study's vicuna_v1 prompt followed by ` {answer}</s>` (LLaVA's SeparatorStyle.TWO); the answer's span."""
    text = prompts.build_prompt(question, TEMPLATE).text + " "
    return text + answer + "</s>", [(len(text), len(text) + len(answer))]


def caption_text(ex: Example) -> tuple[str, list[tuple[int, int]]]:
    """LLaVA's pretraining format (the `plain` template): `<image>\n{caption}</s>`, the caption the target."""
    head, cap = prompts.IMAGE_PLACEHOLDER + "\n", caption(ex.scene)
    return head + cap + "</s>", [(len(head), len(head) + len(cap))]


def encode_text(cfg: ModelConfig, tokenizer, text: str, spans: list[tuple[int, int]],
                context: tuple[int, int] | None = None, context_weight: float = 0.0):
    """(ids, prompt length, positions, targets, weights): targets are the tokens of each span and the `</s>` after
    it (weight 1), then the tokens of the `context` span after its first (weight `context_weight`)."""
    enc = prompts.encode(text, tokenizer, cfg.image_token_id, cfg.features_per_crop, "llava-hf")
    ids = enc.input_ids
    targets = []
    for start, end in spans:
        tokens = prompts.token_span(enc, start, end)
        if not tokens or ids[tokens[-1] + 1] != tokenizer.eos_token_id:
            raise ValueError(f"answer {text[start:end]!r} does not tokenize before </s> in {text!r}")
        targets += tokens + [tokens[-1] + 1]
    weights = [1.0] * len(targets)
    if context is not None and context_weight > 0:
        tokens = prompts.token_span(enc, *context)[1:]
        targets += tokens
        weights += [context_weight] * len(tokens)
    targets = np.asarray(targets)
    prompt_len = prompts.token_span(enc, *spans[0])[0]
    return ids, prompt_len, targets - 1, ids[targets], np.asarray(weights, np.float32)


LABEL_VALUES = {"shape": SHAPES, **ATTRIBUTES}  # patch label columns, in this order


def patch_labels(scene: Scene, cfg: ModelConfig) -> np.ndarray:
    """[g*g, 4] per image patch (row-major): the (shape, colour, material, size) indices + 1 of the object whose
    centre lies in the patch (0: none). The image must be square at the vision image size (no resize between
    scene pixels and patches)."""
    s, p = cfg.vision.image_size, cfg.vision.patch_size
    if (scene.width, scene.height) != (s, s):
        raise ValueError(f"patch labels need {s}x{s} scenes, got {scene.width}x{scene.height}")
    g = s // p
    labels = np.zeros((g * g, 4), np.int32)
    for obj in scene.objects:
        x0, y0, w, h = obj.box
        cell = min(int((y0 + h / 2) // p), g - 1) * g + min(int((x0 + w / 2) // p), g - 1)
        labels[cell] = [LABEL_VALUES[a].index(getattr(obj, a)) + 1 for a in LABEL_VALUES]
    return labels


def _render(chunk: Sequence[Example], cfg: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    pixels = np.concatenate([images.preprocess(image_of(ex), cfg)[0] for ex in chunk])
    return pixels, np.stack([patch_labels(ex.scene, cfg) for ex in chunk])


def encode_examples(items: Sequence[Example], cfg: ModelConfig, tokenizer, workers: int = 1,
                    captions: bool = False, images_from: Data | None = None, question_weight: float = 0.0) -> Data:
    """Renders, preprocesses and tokenizes `items`: each question in the study's prompt with its answer, or with
    `captions` the scene's caption (`caption_text`). question_weight > 0 also trains next-token prediction on
    the question's own tokens, at that weight (the answer's tokens weigh 1). Pixels come from the decoded JPEG,
    as a sweep reads them; `images_from`: the same items, already rendered."""
    encoded = []
    for ex in items:
        text, spans = caption_text(ex) if captions else qa_text(ex.question, ex.answer)
        start = -1 if captions else text.index(ex.question)
        context = None if captions else (start, start + len(ex.question))
        encoded.append(encode_text(cfg, tokenizer, text, spans, context, question_weight))
    n, t, a = len(items), max(len(e[0]) for e in encoded), max(len(e[3]) for e in encoded)
    input_ids = np.full((n, t), tokenizer.pad_token_id, np.int32)
    positions, targets = (np.zeros((n, a), np.int32) for _ in range(2))
    mask = np.zeros((n, a), np.float32)
    for i, (ids, _, pos, tgt, weight) in enumerate(encoded):
        input_ids[i, : len(ids)] = ids
        positions[i, : len(pos)], targets[i, : len(tgt)], mask[i, : len(tgt)] = pos, tgt, weight
    if images_from is not None:
        pixel_values, labels = images_from.pixel_values, images_from.patch_labels
    elif workers > 1:
        from concurrent.futures import ProcessPoolExecutor

        chunks = [items[i:i + 500] for i in range(0, n, 500)]
        with ProcessPoolExecutor(workers) as pool:
            parts = list(pool.map(_render, chunks, [cfg] * len(chunks)))
        pixel_values, labels = (np.concatenate(x) for x in zip(*parts, strict=True))
    else:
        pixel_values, labels = _render(items, cfg)
    return Data(input_ids, np.asarray([len(e[0]) for e in encoded], np.int32),
                np.asarray([e[1] for e in encoded], np.int32), positions, targets, mask,
                pixel_values, labels, np.asarray([TASKS.index(ex.task) for ex in items], np.int32),
                [ex.answer for ex in items])


def image_states(module: VisionLanguageModel, cfg: ModelConfig, pixel_values: np.ndarray,
                 batch: int = 256) -> np.ndarray:
    """[N, F, Dv]: the CLIP tower's selected feature layer (CLS dropped), what the projector reads. The tower is
    frozen after its pretraining (as LLaVA freezes CLIP), so training computes it once per image."""
    layer = cfg.projector.feature_layers[0] % (cfg.vision.num_layers + 1)
    run = nnx.jit(lambda tower, px: tower(px)[layer][:, 1:])
    return np.concatenate([np.asarray(run(module.vision_tower, jnp.asarray(pixel_values[i:i + batch])))
                           for i in range(0, len(pixel_values), batch)])


def image_start(data: Data, cfg: ModelConfig) -> int:
    """Position of the first image token, checked to be the same in every row, the F image tokens in a row."""
    start = int(np.argmax(data.input_ids[0] == cfg.image_token_id))
    f = cfg.features_per_crop
    if not (data.input_ids[:, start:start + f] == cfg.image_token_id).all():
        raise ValueError("training rows must hold their image tokens at the same positions")
    return start


def answer_logits(module: VisionLanguageModel, states, input_ids, seq_lengths, positions, start: int,
                  embedding_input_grad: bool = True):
    """[B, A, V] logits at `positions` [B, A].

    states [B, F, Dv] (`image_states`) are projected into the rows' image positions start..start+F. The text
    before the image (the system prompt, the same in every row) runs once and every row attends to its keys
    and values: the same function, a third less work for the vicuna_v1 prompt (tests check both agree).
    """
    lm = module.language_model
    x = lm.embed_tokens(jnp.where(input_ids == module.cfg.image_token_id, 0, input_ids))  # [B, T, D]
    if not embedding_input_grad:  # the same values; no gradient reaches the embedding matrix through this lookup
        x = jax.lax.stop_gradient(x)
    x = x.at[:, start:start + states.shape[1]].set(module.projector(states).astype(x.dtype))
    b, t = input_ids.shape
    pos = jnp.broadcast_to(jnp.arange(t), (b, t))
    valid = pos < seq_lengths[:, None]
    if start:
        head = lm(x[:1, :start], pos[:1, :start], valid[:1, :start], collect_kv=True)
        k, v = (jnp.broadcast_to(a, (a.shape[0], b) + a.shape[2:]) for a in map(jnp.stack, head.kv))  # [L, B, K, P, hd]
        cache = KVCache(k, v, pos[:, :start], valid[:, :start])
        out = lm(x[:, start:], pos[:, start:], valid[:, start:], prefix=[cache])
        positions = positions - start
    else:
        out = lm(x, pos, valid)
    h = jnp.take_along_axis(out.hidden, positions[..., None], axis=1)  # [B, A, D]
    return lm.unembed(h).astype(jnp.float32)


def answer_loss(module: VisionLanguageModel, states, input_ids, seq_lengths, positions, targets, target_mask,
                start: int,
                embedding_input_grad: bool = True):
    """Mean cross-entropy of the answer tokens (and each `</s>` closing one) and their accuracy."""
    logits = answer_logits(module, states, input_ids, seq_lengths, positions, start, embedding_input_grad)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, targets)
    loss = (ce * target_mask).sum() / target_mask.sum()
    acc = ((jnp.argmax(logits, -1) == targets) * target_mask).sum() / target_mask.sum()
    return loss, acc


def pretrain_vision(module: VisionLanguageModel, cfg: ModelConfig, data: Data, *, steps: int, batch: int,
                    lr: float = 3e-3,
                    seed: int = 0, log: Callable[[str], None] | None = print, log_every: int = 100):
    """Trains the CLIP tower alone to tell, patch by patch, the shape, colour, material and size of the object
    centred in it (a linear probe on the selected feature layer, thrown away afterwards), and each patch's
    column. The stand-in for LLaVA's pretrained CLIP: the instruction tuning that follows starts from features
    that name what is where. Each attribute's cross-entropy is averaged over all patches and again over the
    patches holding an object (most patches are empty; without the second term the shapes are learned last).
    Updates `module.vision_tower` in place; returns the losses and the probe."""
    from jaxflow.nn.layers import Linear

    g = cfg.vision.grid
    sizes = [len(v) + 1 for v in LABEL_VALUES.values()] + [g]
    probe = Linear(cfg.vision.hidden_size, sum(sizes), bias=True, dtype=jnp.float32, rngs=nnx.Rngs(seed + 7))
    graphdef, params = nnx.split((module.vision_tower, probe), nnx.Param)
    tx = make_optimizer(steps, lr, min(50, steps // 10))
    opt_state = tx.init(params)
    layer = cfg.projector.feature_layers[0] % (cfg.vision.num_layers + 1)
    bounds = np.cumsum([0] + sizes)
    column = jnp.tile(jnp.arange(g), g)  # [g*g] row-major

    @jax.jit
    def step(params, opt_state, pixels, labels):
        def loss_fn(p):
            tower, head = nnx.merge(graphdef, p)
            logits = head(tower(pixels)[layer][:, 1:]).astype(jnp.float32)  # [B, g*g, sum(sizes)], CLS dropped
            labels_all = jnp.concatenate([labels, jnp.broadcast_to(column, labels.shape[:2])[..., None]], -1)
            has_object = (labels[..., 0] > 0).astype(jnp.float32)  # [B, g*g]
            total = 0.0
            for k, (a, b) in enumerate(zip(bounds[:-1], bounds[1:], strict=True)):
                ce = optax.softmax_cross_entropy_with_integer_labels(logits[..., a:b], labels_all[..., k])
                total += ce.mean() + (ce * has_object).sum() / jnp.maximum(has_object.sum(), 1.0)
            return total / len(sizes)

        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed + 3)
    losses = []
    start = time.time()
    for i in range(steps):
        idx = rng.choice(len(data), batch, replace=False)
        params, opt_state, loss = step(params, opt_state, jnp.asarray(data.pixel_values[idx]),
                                       jnp.asarray(data.patch_labels[idx]))
        losses.append(float(loss))
        if log and ((i + 1) % log_every == 0 or i == 0):
            log(f"vision step {i + 1}/{steps} loss {np.mean(losses[-log_every:]):.4f} ({time.time() - start:.0f} s)")
    tower, head = nnx.merge(graphdef, params)
    nnx.update(module.vision_tower, nnx.state(tower, nnx.Param))
    return losses, head


def make_optimizer(steps: int, lr: float, warmup: int, weight_decay: float = 0.05):
    warmup = min(warmup, max(steps - 1, 1) // 2)
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, warmup, max(steps, warmup + 1), end_value=lr * 0.02)
    decay = lambda params: jax.tree.map(lambda p: p.ndim >= 2, params)  # noqa: E731 (no decay on norms, biases)
    return optax.chain(optax.clip_by_global_norm(1.0),
                       optax.adamw(schedule, b1=0.9, b2=0.98, eps=1e-8, weight_decay=weight_decay, mask=decay))


@dataclasses.dataclass
class Source:
    """One kind of training row: encoded rows, their images' states (`image_states`), a name for the log."""

    name: str
    data: Data
    states: np.ndarray  # [N, F, Dv]

    def batch(self, idx: np.ndarray) -> tuple:
        d = self.data
        return (self.states[idx], d.input_ids[idx], d.seq_lengths[idx], d.positions[idx], d.targets[idx],
                d.target_mask[idx])


@dataclasses.dataclass
class TrainResult:
    module: VisionLanguageModel
    losses: dict[str, list[float]]
    wall_s: float


def train(module: VisionLanguageModel, cfg: ModelConfig, plan: Callable[[int], Source], *, steps: int, batch: int,
          lr: float = 2e-3, warmup: int = 100, seed: int = 0, log: Callable[[str], None] | None = print,
          log_every: int = 250, on_log: Callable[[int, VisionLanguageModel], None] | None = None,
          embedding_input_grad: bool = True) -> TrainResult:
    """AdamW (cosine schedule, warmup) on the projector and the language model; the CLIP tower stays frozen.
    Step i draws a random batch from `plan(i)` (one source, or a mix over steps).

    embedding_input_grad=False: the input lookup passes no gradient to the embedding matrix, which then learns
    only as the tied output head (an untied model's input embeddings then learn nothing). With a tied head the
    input side pulls the six colour words together (as inputs they play the same part) faster than the output
    side tells them apart: toy-llava's colour embeddings end at mean cosine 0.83 and it names colours poorly."""
    trainable = nnx.All(nnx.Param, nnx.Not(nnx.PathContains("vision_tower")))
    graphdef, params, frozen = nnx.split(module, trainable, ...)
    tx = make_optimizer(steps, lr, warmup)
    opt_state = tx.init(params)

    @functools.partial(jax.jit, static_argnames="start")
    def step(params, opt_state, arrays, start):
        def loss_fn(p):
            return answer_loss(nnx.merge(graphdef, p, frozen), *arrays, start, embedding_input_grad)

        (loss, acc), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(seed)
    starts: dict[str, int] = {}
    losses: dict[str, list[float]] = {}
    begin = time.time()
    for i in range(steps):
        source = plan(i)
        if source.name not in starts:
            starts[source.name] = image_start(source.data, cfg)
        idx = rng.choice(len(source.data), batch, replace=False)
        arrays = tuple(jnp.asarray(a) for a in source.batch(idx))
        params, opt_state, loss = step(params, opt_state, arrays, start=starts[source.name])
        losses.setdefault(source.name, []).append(float(loss))
        if (i + 1) % log_every == 0 or i == 0:
            if log:
                means = ", ".join(f"{k} loss {np.mean(v[-log_every:]):.4f}" for k, v in losses.items())
                log(f"step {i + 1}/{steps} {means} ({time.time() - begin:.0f} s)")
            if on_log:
                on_log(i + 1, nnx.merge(graphdef, params, frozen))
    return TrainResult(nnx.merge(graphdef, params, frozen), losses, time.time() - begin)


# --- evaluation ------------------------------------------------------------------------------------


def first_token_accuracy(module: VisionLanguageModel, cfg: ModelConfig, source: Source, batch: int = 200) -> dict[str,
                         float]:
    """Teacher-forced accuracy of each row's first answer token, per task and overall (a cheap training
    monitor; `predict` + `accuracy` decode for real)."""
    run = nnx.jit(answer_logits, static_argnames="start")
    start, hits = image_start(source.data, cfg), []
    for i in range(0, len(source.data), batch):
        idx = np.arange(i, min(i + batch, len(source.data)))
        states, ids, lengths, positions, targets, _ = source.batch(idx)
        logits = run(module, jnp.asarray(states), jnp.asarray(ids), jnp.asarray(lengths), jnp.asarray(positions),
                     start=start)
        hits.append(np.asarray(logits[:, 0].argmax(-1)) == targets[:, 0])
    hit, tasks = np.concatenate(hits), source.data.tasks
    out = {task: float(hit[tasks == k].mean()) for k, task in enumerate(TASKS) if (tasks == k).any()}
    return out | {"overall": float(hit.mean())}


def predict(model: Model, data: Data, batch: int = 64, max_new_tokens: int = 3) -> list[str]:
    """Greedy answers (decoded up to </s>, stripped) with `Model.generate` on the prompts of `data`."""
    out = []
    tok = model.tokenizer
    for i in range(0, len(data), batch):
        b = data.take(np.arange(i, min(i + batch, len(data))))
        n = len(b)
        if n < batch:  # keep one compiled shape: pad the batch with copies of its first row
            b = b.take(np.concatenate([np.arange(n), np.zeros(batch - n, int)]))
        t = int(b.prompt_lengths.max())
        ids = b.input_ids[:, :t].copy()
        mask = np.arange(t)[None] < b.prompt_lengths[:, None]
        ids[~mask] = tok.pad_token_id
        gen = model.generate(ids, b.pixel_values, attention_mask=mask.astype(np.int32),
                             max_new_tokens=max_new_tokens)
        for row in gen.tokens[:n]:
            row = row.tolist()
            row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
            out.append(tok.decode(row, skip_special_tokens=True).strip())
    return out


def accuracy(predicted: Sequence[str], data: Data) -> dict[str, float]:
    """Exact-match accuracy (lowercased) per task and overall."""
    hit = np.asarray([p.lower() == a.lower() for p, a in zip(predicted, data.answers, strict=True)])
    result = {task: float(hit[data.tasks == k].mean()) for k, task in enumerate(TASKS) if (data.tasks == k).any()}
    result["overall"] = float(hit.mean())
    return result


# --- export ----------------------------------------------------------------------------------------


def _to_disk(value: np.ndarray, transform: str, patch: int) -> np.ndarray:
    """Inverse of the converter's transforms: jaxflow layout -> PyTorch layout."""
    if transform == "linear":
        return np.ascontiguousarray(value.T)
    if transform == "conv_patch":  # [C*p*p, D] -> [D, C, p, p]
        return np.ascontiguousarray(value.T.reshape(value.shape[1], 3, patch, patch))
    return np.ascontiguousarray(value)


def unused_vision_layers(cfg: ModelConfig, seed: int) -> dict[str, np.ndarray]:
    """Flat jaxflow-named parameters of the CLIP layers after the feature layer (LLaVA never runs them; a
    llava-hf checkpoint still carries them): freshly initialised, like the rest of the model before training."""
    from jaxflow.nn.vision import VisionLayer

    out = {}
    for i in range(cfg.vision_layers_needed(), cfg.vision.num_layers):
        layer = VisionLayer(cfg.vision, dtype=jnp.float32, rngs=nnx.Rngs(seed + 1000 + i))
        for path, var in nnx.to_flat_state(nnx.state(layer, nnx.Param)):
            out[f"vision_tower.layers.{i}." + ".".join(map(str, path))] = np.asarray(var.get_value())
    return out


def state_dict(module: VisionLanguageModel, cfg: ModelConfig, seed: int = 0, dtype=np.float32) -> dict[str, np.ndarray]:
    """The llava-hf on-disk tensors of `module`: every parameter through the converter's table inverted, plus
    what a transformers checkpoint holds that LLaVA never reads (CLIP post_layernorm, CLIP layers after the
    feature layer)."""
    from jaxflow.convert import mapping
    from jaxflow.testing import _disk_name

    flat = {".".join(map(str, p)): np.asarray(v.get_value())
            for p, v in nnx.to_flat_state(nnx.state(module, nnx.Param))}
    flat.update(unused_vision_layers(cfg, seed))
    tensors = {}
    for param, value in flat.items():
        canonical, transform = mapping.source_of(param)
        tensors[_disk_name(canonical)] = _to_disk(value, transform, cfg.vision.patch_size).astype(dtype)
    d = cfg.vision.hidden_size
    tensors["vision_tower.post_layernorm.weight"] = np.ones(d, dtype)
    tensors["vision_tower.post_layernorm.bias"] = np.zeros(d, dtype)
    return tensors


def preprocessor_config(cfg: ModelConfig) -> dict:
    """transformers' CLIPImageProcessor settings of LLaVA-1.5 at the toy image size (what
    `jaxflow.inputs.images.preprocess` does by default: pad to square, resize, center crop, normalise)."""
    s = cfg.vision.image_size
    return {"image_processor_type": "CLIPImageProcessor", "processor_class": "LlavaProcessor",
            "do_resize": True, "size": {"shortest_edge": s}, "resample": 3, "do_center_crop": True,
            "crop_size": {"height": s, "width": s}, "do_rescale": True, "rescale_factor": 1 / 255,
            "do_normalize": True, "image_mean": list(images.OPENAI_CLIP_MEAN),
            "image_std": list(images.OPENAI_CLIP_STD),
            "do_convert_rgb": True, "do_pad": True}


def export(module: VisionLanguageModel, hf_cfg: dict, tokenizer, out: str | os.PathLike, *, seed: int = 0,
           dtype=np.float32, extra_files: dict[str, str] | None = None) -> str:
    """Writes the llava-hf checkpoint directory `out`: config.json, model.safetensors, tokenizer files,
    generation_config.json, preprocessor_config.json (and `extra_files`: name -> text)."""
    from safetensors.numpy import save_file

    out = os.fspath(out)
    os.makedirs(out, exist_ok=True)
    cfg = ModelConfig.from_hf(hf_cfg)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(hf_cfg, f, indent=2, sort_keys=True)
    save_file(state_dict(module, cfg, seed, dtype), os.path.join(out, "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
    generation = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id,
                  "pad_token_id": tokenizer.pad_token_id, "do_sample": False, "max_new_tokens": 8}
    with open(os.path.join(out, "generation_config.json"), "w") as f:
        json.dump(generation, f, indent=2)
    with open(os.path.join(out, "preprocessor_config.json"), "w") as f:
        json.dump(preprocessor_config(cfg), f, indent=2)
    for name, text in (extra_files or {}).items():
        with open(os.path.join(out, name), "w") as f:
            f.write(text)
    return out
