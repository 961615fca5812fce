"""The user-facing model: host-side input checks around jitted Flax computations.

`Model.logits` / `Model.forward` take transformers' input conventions (input_ids with the image
token repeated once per image feature, pixel_values as the processor returns them, image_sizes
as (height, width) for LLaVA-NeXT), so the same arrays feed both implementations.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxflow import checkpoint, sharding
from jaxflow.config import ModelConfig
from jaxflow.geometry import image_layout
from jaxflow.inputs.images import ProcessorSettings
from jaxflow.inputs.prompts import default_template, read_chat_template
from jaxflow.knockout import DenseKnockout, Knockout, KnockoutMasks, stack_knockouts
from jaxflow.nn.decoder import KVCache
from jaxflow.nn.vlm import VisionLanguageModel
from jaxflow.patching import SITES, Noise, Patch, PatchMasks, SiteEdit, noise_offset, sites_used, stack_patches
from jaxflow.sample import Batch, ImageLike, Sample


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class ModelInputs:
    """Device-ready inputs: feature_index [B, T] names the image feature at each position (-1: text)."""

    input_ids: jax.Array  # [B, T] int32
    crops: jax.Array | None  # [N, C, S, S]
    feature_index: jax.Array  # [B, T] int32
    attention_mask: jax.Array  # [B, T] bool
    position_ids: jax.Array  # [B, T] int32
    taps: jax.Array | None = None  # [M, 4] int32: OneVision's downsampled cells, their source features
    tap_weights: jax.Array | None = None  # [M, 4] float32: and bilinear weights


@dataclasses.dataclass
class ForwardOutput:
    logits: jax.Array  # [B, T, V] or [K, B, T, V] with knockouts
    hidden_states: jax.Array | None = None  # [(K,) L + 1, B, T, D] residual stream, no final norm
    attentions: jax.Array | None = None  # [(K,) L, B, H, T, T]


@dataclasses.dataclass
class GenerateOutput:
    tokens: np.ndarray  # [B, N] greedy tokens (the first eos id repeated after a row ends)
    first_token_probs: np.ndarray  # [B, V] softmax of the first generated token's logits
    finished: np.ndarray  # [B] bool: the row emitted an eos token within max_new_tokens


def prepare_inputs(cfg: ModelConfig, input_ids, pixel_values=None, image_sizes=None,
                   attention_mask=None, position_ids=None) -> ModelInputs:
    """Host-side: checks the arrays and builds the crop batch and the feature plan."""
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids: expected [batch, seq], got shape {input_ids.shape}")
    is_image = input_ids == cfg.image_token_id
    crops, indices, taps = None, [], []
    if pixel_values is not None:
        pixel_values = np.asarray(pixel_values)
        if cfg.image.anyres:
            if pixel_values.ndim != 5:
                raise ValueError(f"pixel_values: LLaVA-NeXT expects [images, crops, C, H, W], got {pixel_values.shape}")
            if image_sizes is None or len(image_sizes) != len(pixel_values):
                raise ValueError("image_sizes: LLaVA-NeXT needs one (height, width) per image")
            layouts = [image_layout(cfg, tuple(int(v) for v in size)) for size in np.asarray(image_sizes)]
            for i, lay in enumerate(layouts):
                if lay.num_crops > pixel_values.shape[1]:
                    raise ValueError(f"pixel_values[{i}]: {pixel_values.shape[1]} crops, image_sizes[{i}] needs "
                                     f"{lay.num_crops}")
            crops = np.concatenate([pv[: lay.num_crops] for pv, lay in zip(pixel_values, layouts, strict=True)])
        else:
            if pixel_values.ndim != 4:
                raise ValueError(f"pixel_values: LLaVA-1.5 expects [images, C, H, W], got {pixel_values.shape}")
            layouts = [image_layout(cfg)] * len(pixel_values)
            crops = pixel_values
        offset, taps, weights = 0, [], []
        for lay in layouts:
            indices.append(lay.feature_index(cfg, offset))
            tap, weight = lay.taps(cfg, offset)
            taps.append(tap)
            weights.append(weight)
            offset += lay.num_crops
        flat = np.concatenate(indices) if indices else np.zeros(0, int)
        flat = np.where(flat == -2, offset * cfg.features_per_crop, flat)  # newline row after all crops
        cells = flat == -3  # then the downsampled cells, in sequence order
        flat[cells] = offset * cfg.features_per_crop + 1 + np.arange(int(cells.sum()))
        taps, weights = np.concatenate(taps), np.concatenate(weights)
        if is_image.sum() != len(flat):
            raise ValueError(f"input_ids: {int(is_image.sum())} image tokens but the images give {len(flat)} "
                             f"features; expand the image token once per feature")
        feature_index = np.full(input_ids.shape, -1, np.int64)
        feature_index[is_image] = flat  # row-major order, like transformers' masked_scatter
    else:
        if is_image.any():
            raise ValueError("input_ids: image tokens present but pixel_values is None")
        feature_index = np.full(input_ids.shape, -1, np.int64)
    b, t = input_ids.shape
    blend = (jnp.asarray(taps, jnp.int32), jnp.asarray(weights, jnp.float32)) if crops is not None and len(taps) else ()
    mask = np.ones((b, t), bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    pos = np.broadcast_to(np.arange(t), (b, t)) if position_ids is None else np.asarray(position_ids)
    if mask.shape != (b, t) or pos.shape != (b, t):
        raise ValueError(f"attention_mask / position_ids: expected shape {(b, t)}")
    return ModelInputs(jnp.asarray(input_ids, jnp.int32), None if crops is None else jnp.asarray(crops),
                       jnp.asarray(feature_index, jnp.int32), jnp.asarray(mask), jnp.asarray(pos, jnp.int32), *blend)


# What `_forward` can collect beside the logits, per layer l: "hidden" (the residual stream entering layer l; l = L
# is the last layer's output), "mid" (after layer l's attention was added), "pattern" (attention weights),
# "attn_out" and "mlp_out" (what the attention and the MLP add), "z" (the per-head attention output before o_proj,
# [B, T, H, hd]); and once (layer 0): "normalized" (the final norm's output) and "image_embeds" (the projector's
# output per crop).


def embed_inputs(module: VisionLanguageModel, inputs: ModelInputs, offset=None, features=None):
    """The decoder's input embeddings [B, T, D], plus `offset` [B, T, D] (a `Noise`) when given."""
    x = module.embed(inputs.input_ids, inputs.crops, inputs.feature_index, inputs.taps, inputs.tap_weights, features)
    return x if offset is None else x + offset.astype(x.dtype)


def patch_edits(lm, patch, source, q_pos) -> list | None:
    """Per layer, the SiteEdits of one configuration's `patch` (PatchMasks) from the source activations."""
    return None if patch is None else [patch.edits(i, q_pos, source) for i in range(len(lm.layers))]


@functools.partial(nnx.jit, graph=False, static_argnames=("collect",))
def _forward(module: VisionLanguageModel, inputs: ModelInputs, knock: KnockoutMasks | None, collect: tuple = (),
             patch: PatchMasks | None = None, source: dict | None = None, offset=None):
    """logits [(K,) B, T, V] and one array per (kind, layer) pair of `collect` (kinds above), [(K,) B, ...]
    ("image_embeds": [N, F, D], never cut). Only what is collected leaves the computation.

    knock, patch: K configurations each (either may be None); patch replaces activations by `source`'s (site ->
    [L, B, T, ...], `PatchMasks.edits`). offset [B, T, D]: added to the input embeddings (a `Noise`)."""
    kinds = {kind for kind, _ in collect}
    feats = None if inputs.crops is None else module.image_features(inputs.crops)  # [N, F, D]
    x = embed_inputs(module, inputs, offset, feats)
    lm = module.language_model

    def run(k, p):
        out = lm(x, inputs.position_ids, inputs.attention_mask, knock=k,
                 edits=patch_edits(lm, p, source, jnp.broadcast_to(jnp.arange(x.shape[1]), x.shape[:2])),
                 collect_hidden=bool(kinds & {"hidden", "mid"}), collect_attn="pattern" in kinds,
                 collect_outputs=bool(kinds & {"mid", "attn_out", "mlp_out"}), collect_z="z" in kinds)
        found = {"hidden": out.hidden_states, "pattern": out.attentions, "attn_out": out.attn_out,
                 "mlp_out": out.mlp_out, "z": out.z}
        picked = []
        for kind, layer in collect:
            if kind == "mid":
                picked.append(out.hidden_states[layer] + out.attn_out[layer])
            elif kind == "normalized":
                picked.append(out.hidden)
            elif kind != "image_embeds":
                picked.append(found[kind][layer])
        return lm.unembed(out.hidden), tuple(picked)

    logits, picked = run(None, None) if knock is None and patch is None else jax.vmap(run)(knock, patch)
    picked = iter(picked)
    return logits, tuple(feats if kind == "image_embeds" else next(picked) for kind, _ in collect)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class Prefill:
    """One uncut forward of a prompt batch: greedy decoding continues from it, the sweep's base run
    (incremental knockouts, logit lens) reads it."""

    logits: jax.Array  # [B, V] at each row's last position
    probs: jax.Array  # [B, V] float32 softmax of `logits`
    hidden: tuple[jax.Array, ...] | None  # L + 1 x [B, T, D] residual stream (input of layer l at index l), or None
    k: tuple[jax.Array, ...]  # L x [B, K, T, hd]: one array per layer, as the layers wrote them (no stacked copy)
    v: tuple[jax.Array, ...]  # L x [B, K, T, hd]


@functools.partial(nnx.jit, graph=False, static_argnames=("collect_hidden",))
def prefill_forward(module: VisionLanguageModel, inputs: ModelInputs, last: jax.Array, collect_hidden: bool = False,
                    offset=None) -> Prefill:
    """Runs the prompt once; `last` [B] is each row's last position; offset [B, T, D]: added to the input
    embeddings (a `Noise`)."""
    x = embed_inputs(module, inputs, offset)
    lm = module.language_model
    out = lm(x, inputs.position_ids, inputs.attention_mask, collect_hidden=collect_hidden, collect_kv=True)
    h = jnp.take_along_axis(out.hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
    logits = lm.unembed(h)
    return Prefill(logits, jax.nn.softmax(logits.astype(jnp.float32), axis=-1), out.hidden_states, *out.kv)


def decode_phases(slots: int) -> tuple[int, ...]:
    """The cache lengths of greedy decoding's phases for `slots` generated-token slots: 16, 64, 256, ...,
    then `slots`. A step attends only to its phase's slots, so it reads at most 4x the slots that can be
    valid (and at least 16); a phase compiles only when a batch reaches it."""
    ends, n = [], 16
    while n < slots:
        ends.append(n)
        n *= 4
    return (*ends, slots) if slots else ()


@functools.partial(nnx.jit, graph=False, static_argnames=("size",), donate_argnames=("tokens",))
def decode_phase(module: VisionLanguageModel, k: tuple[jax.Array, ...], v: tuple[jax.Array, ...], lengths: jax.Array,
                 eos: jax.Array, step: jax.Array, tokens: jax.Array, done: jax.Array,
                 k_new: tuple[jax.Array, ...], v_new: tuple[jax.Array, ...], size: int):
    """Greedy decoding on the device, from step `step` until every row is done or `size` tokens have been fed.

    k, v: the prompt's keys and values L x [B, K, T, hd] (read, never copied); lengths [B]; eos [E] int32
    (-1: none); tokens [B, N] (token s is fed at step s to position lengths + s; token s + 1 is written);
    done [B]. k_new, v_new: the generated tokens' keys and values so far, L x [B, K, S, hd] (S <= size), grown
    to `size` slots (one copy per phase) and updated in place in the loop. Returns step, tokens, done,
    k_new, v_new."""
    lm = module.language_model
    b, t = tokens.shape[0], k[0].shape[2]
    slots = jnp.broadcast_to(jnp.arange(t), (b, t))
    prompt = KVCache(k, v, slots, slots < lengths[:, None])
    grow = lambda c: jnp.pad(c, ((0, 0), (0, 0), (0, size - c.shape[2]), (0, 0)))  # noqa: E731
    k_new, v_new = tuple(map(grow, k_new)), tuple(map(grow, v_new))
    slot = jnp.arange(size)

    def body(state):
        s, tokens, done, k_new, v_new = state
        token = jax.lax.dynamic_index_in_dim(tokens, s, axis=1, keepdims=False)  # [B]
        pos = lengths + s  # [B]
        cache = KVCache(k_new, v_new, lengths[:, None] + slot, jnp.broadcast_to(slot <= s, (b, size)))
        out = lm(lm.embed_tokens(token[:, None]), pos[:, None], jnp.ones((b, 1), bool), prefix=[prompt, cache],
                 write_at=s, collect_kv=True)  # each layer writes slot s, then attends
        token, done = greedy_pick(lm.unembed(out.hidden[:, 0]), done, eos)
        tokens = jax.lax.dynamic_update_slice_in_dim(tokens, token[:, None], s + 1, axis=1)
        return s + 1, tokens, done, *out.kv

    return jax.lax.while_loop(lambda st: (st[0] < size) & ~st[2].all(), body, (step, tokens, done, k_new, v_new))


def greedy_pick(logits: jax.Array, done: jax.Array, eos: jax.Array):
    """logits [B, V], done [B], eos [E] -> the next tokens [B] (eos[0] for a finished row) and done [B]."""
    token = jnp.where(done, eos[0], jnp.argmax(logits, axis=-1).astype(jnp.int32))
    return token, done | (token[:, None] == eos[None]).any(-1)


class Model:
    """A loaded LLaVA model: `.config`, `.tokenizer`, `.module` (the Flax NNX module), `.path` and
    `.metadata` (jaxflow.json: source layout, dtype) of the converted directory; `.no_anyres`: a LLaVA-NeXT
    checkpoint run with LLaVA-1.5 image handling (see `load`)."""

    def __init__(self, module: VisionLanguageModel, config: ModelConfig, tokenizer=None, path: str | None = None,
                 metadata: dict | None = None, mesh: jax.sharding.Mesh | None = None, no_anyres: bool = False):
        self.module, self.config, self.tokenizer = module, config, tokenizer
        self.path, self.metadata, self.mesh, self.no_anyres = path, metadata or {}, mesh, no_anyres

    @functools.cached_property
    def processor(self) -> ProcessorSettings:
        """The image preprocessing settings of this model: its directory's preprocessor_config.json (or
        processor_config.json), read once; OpenAI CLIP's defaults when it has neither. Every command builds
        pixels (and the study's masks) with these."""
        return ProcessorSettings.from_dir(self.path) if self.path else ProcessorSettings()

    @property
    def prompt_mode(self) -> str:
        """How prompts are tokenized: LLaVA's own way for original-layout checkpoints, else transformers'."""
        return "original" if self.metadata.get("layout") == "original" else "llava-hf"

    @functools.cached_property
    def default_template(self) -> str:
        """The prompt template this checkpoint was trained with: from its chat template (the directory's
        chat_template.jinja / .json or tokenizer_config.json), else its vocabulary, else the source's or the
        directory's name (`jaxflow.inputs.prompts.default_template`)."""
        names = [os.path.basename(os.path.normpath(p)) for p in (self.metadata.get("source"), self.path) if p]
        return default_template(self.tokenizer, read_chat_template(self.path), names)

    def sample(self, image: ImageLike, question: str, boxes=None, template: str | None = None, *,
               options: Sequence[str] | None = None, related_patches: str = "study") -> Sample:
        """One image and question as this model's inputs, with every region the sweep knows and the image's
        geometry (`jaxflow.sample.Sample`).

        image: a path, a PIL image or an array [H, W, 3]. boxes: the question-related objects, a list of (x, y,
        w, h) in the original image's pixels, or a dict name -> (x, y, w, h) whose names are the objects' names
        in the question (they define `central_object`). template: the prompt template (default: this
        checkpoint's, `default_template`). options: the (true, false) answer options of a Choose question, as
        they occur in it. related_patches: "study" or "overlap" (`jaxflow.inputs.images`)."""
        from jaxflow.geometry import original_rects
        from jaxflow.inputs.regions import build_sample
        from jaxflow.sample import named_boxes, open_image, option_spans

        picture, named = open_image(image), named_boxes(boxes)
        built = build_sample(self.config, self.tokenizer, picture, question, mode=self.prompt_mode,
                             template=template or self.default_template, boxes=list(named.values()),
                             option_spans=option_spans(question, options),
                             object_names=list(named) if isinstance(boxes, dict) else (),
                             related_patches=related_patches, settings=self.processor)
        size = built.image_size
        sizes = np.asarray([size]) if self.config.image.anyres else None
        return Sample(built.input_ids[None], built.pixel_values, sizes,
                      built.regions, built.prompt, picture, named, image_layout(self.config, size),
                      original_rects(self.config, size, self.processor.resize), related_patches)

    def prepare(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None,
                position_ids=None) -> ModelInputs:
        """Device inputs from transformers-style arrays, or from a `Sample` / `Batch` given as `input_ids`."""
        if isinstance(input_ids, Sample | Batch):
            if any(a is not None for a in (pixel_values, image_sizes, attention_mask)):
                raise ValueError("pixel_values / image_sizes / attention_mask: a Sample or Batch carries its own")
            arrays = input_ids.inputs()
            input_ids, pixel_values, image_sizes, attention_mask = (
                arrays[k] for k in ("input_ids", "pixel_values", "image_sizes", "attention_mask"))
        inputs = prepare_inputs(self.config, input_ids, pixel_values, image_sizes, attention_mask, position_ids)
        return sharding.replicate(inputs, self.mesh)

    def knockout_masks(self, knockouts: Sequence[Knockout | DenseKnockout], batch: int, seq_len: int,
                       regions=None):
        """Stacked KnockoutMasks [K, ...]; `regions` (one `Regions` per row) resolve region names."""
        text = self.config.text
        return stack_knockouts(knockouts, batch, seq_len, text.num_layers, text.num_heads, regions)

    def forward(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, position_ids=None,
                knockouts: Sequence[Knockout | DenseKnockout] | KnockoutMasks | None = None,
                return_hidden_states: bool = False, return_attentions: bool = False, *,
                patches: Sequence[Patch] | PatchMasks | None = None, source=None,
                noise: Noise | None = None) -> ForwardOutput:
        """The forward pass of input_ids [B, T] (transformers' conventions, see the module docstring), or of a
        `Sample` / `Batch` given as input_ids. Returns ForwardOutput: logits [B, T, V]; with return_hidden_states the
        residual stream [L + 1, B, T, D] (index l: entering layer l, transformers' hidden_states[l]; index L: the
        last layer's output before the final norm); with return_attentions the weights [L, B, H, T, T] (query,
        key). With K knockouts (a list of Knockout / DenseKnockout, or stacked KnockoutMasks) every array gets a
        leading K, all K in one compiled call. `run_with_cache` returns single named activations instead.

        Activation patching: with K patches (a list of `jaxflow.Patch`, or stacked PatchMasks) and `source` (the
        inputs of the source run: a dict with the main inputs' keys, a Sample or Batch, all of the same batch
        size and sequence length; or a `Noise`: the main inputs with noised embeddings), configuration k runs
        the main (target) inputs with patch k's activations replaced by the source run's (one source forward for
        all K). Knockouts and patches given together apply both in every configuration (cuts in the target run
        only): K of each pair up, and one of either applies alongside all K of the other. `noise`: Gaussian
        noise added to the target's input embeddings (ROME's corrupted run; patches then restore clean
        activations from `source`)."""
        inputs = self.prepare(input_ids, pixel_values, image_sizes, attention_mask, position_ids)
        knock, patch, acts, offset = self.interventions(inputs, _regions(input_ids), knockouts, patches, source,
                                                        noise)
        n = self.config.text.num_layers
        collect = ((("hidden", i) for i in range(n + 1)) if return_hidden_states else (),
                   (("pattern", i) for i in range(n)) if return_attentions else ())
        collect = tuple(c for group in collect for c in group)
        logits, arrays = _forward(self.module, inputs, knock, collect, patch, acts, offset)
        axis = 0 if knock is None and patch is None else 1  # layers after the configuration axis
        hidden = jnp.stack(arrays[: n + 1], axis) if return_hidden_states else None
        attn = jnp.stack(arrays[-n:], axis) if return_attentions else None
        return ForwardOutput(logits, hidden, attn)

    def logits(self, input_ids, pixel_values=None, image_sizes=None, knockouts=None, attention_mask=None,
               position_ids=None, *, patches=None, source=None, noise=None) -> jax.Array:
        """Logits [B, T, V] (float, the parameters' dtype); with K knockouts and/or patches [K, B, T, V]. Inputs,
        patches, source and noise as `forward`."""
        return self.forward(input_ids, pixel_values, image_sizes, attention_mask, position_ids, knockouts,
                            patches=patches, source=source, noise=noise).logits

    @functools.cached_property
    def embedding_std(self) -> dict[str, float]:
        """The std of this model's input embeddings per modality, what `Noise` scales: "text", over every entry of
        the token-embedding table; "image", over every entry of the projected features of 4 probe crops of
        uniform random pixels (seed 0, normalized with `processor`'s mean and std). Computed once per model and
        kept here; assign a dict to use other values (e.g. measured on a data set's images)."""
        s = self.config.vision.image_size
        pixels = np.random.default_rng(0).random((4, 3, s, s), np.float32)
        mean, std = (np.asarray(v, np.float32)[:, None, None] for v in (self.processor.image_mean,
                                                                         self.processor.image_std))
        feats = _image_features(self.module, sharding.replicate(jnp.asarray((pixels - mean) / std), self.mesh))
        table = self.module.language_model.embed_tokens.embedding[...]
        return {"text": float(jnp.std(table.astype(jnp.float32))), "image": float(jnp.std(feats.astype(jnp.float32)))}

    def noise_offset(self, noise: Noise, inputs: ModelInputs, regions=None) -> jax.Array:
        """What `noise` adds to the input embeddings of `inputs` (from `prepare`): [B, T, D] float32."""
        if not isinstance(noise, Noise):
            raise TypeError(f"noise: expected jaxflow.Noise, got {type(noise).__name__}")
        offset = noise_offset(noise, inputs.feature_index, self.embedding_std, self.config.text.hidden_size, regions)
        return sharding.replicate(offset, self.mesh)

    def interventions(self, inputs: ModelInputs, regions, knockouts=None, patches=None, source=None, noise=None):
        """Host side: (knock [K, ...] | None, patch [K, ...] | None, the source activations site -> [L, B, T, ...]
        | None, the target's embedding offset [B, T, D] | None) for `_forward`, checked and paired as `forward`
        documents. regions: one `Regions` per row of the target inputs (or None)."""
        b, t = inputs.input_ids.shape
        text = self.config.text
        knock = knockouts
        if knockouts is not None and not isinstance(knockouts, KnockoutMasks):
            knock = self.knockout_masks(knockouts, b, t, regions=regions)
        patch = patches
        if patches is not None and not isinstance(patches, PatchMasks):
            patch = stack_patches(patches, b, t, text.num_layers, text.num_heads, regions)
        if (patch is None) != (source is None):
            raise ValueError("patches / source: patching needs both (the patches and the source run's inputs)")
        if knock is not None and patch is not None:
            knock, patch = _pair(knock, patch)
        offset = None if noise is None else self.noise_offset(noise, inputs, regions)
        acts = None if patch is None else self.source_activations(inputs, regions, source, sites_used(patch))
        return sharding.shard_leading(knock, self.mesh), sharding.shard_leading(patch, self.mesh), acts, offset

    def attribution(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None, *, source, token,
                    sites: Sequence[str] = ("resid_pre", "attn_out", "mlp_out"),
                    noise: Noise | None = None) -> dict[str, np.ndarray]:
        """Attribution patching (Nanda 2023): the linear estimate of what patching each site, layer and position
        from `source` would change, from one forward and one backward of the target run.

        Inputs as `forward` (a Sample or Batch as input_ids too); source and noise as `forward` takes them. token:
        the answer token, an int or one per row [B]; p is the target run's probability of it at each row's last
        position (the last position whose attention_mask is 1). Returns site -> float32 [B, L, T]:
        (a_source - a_target) . dp/da_target, summed over the hidden dimension ("z": [B, L, T, H], summed over
        head_dim, per head)."""
        bad = [s for s in sites if s not in SITES]
        if bad or not sites:
            raise ValueError(f"sites: {bad or 'none'}; expected some of {', '.join(SITES)}")
        inputs = self.prepare(input_ids, pixel_values, image_sizes, attention_mask)
        regions = _regions(input_ids)
        b, t = inputs.input_ids.shape
        mask = np.asarray(inputs.attention_mask)
        last = t - 1 - np.argmax(mask[:, ::-1], axis=1)  # [B]
        token = np.broadcast_to(np.asarray(token, np.int32), (b,))
        offset = None if noise is None else self.noise_offset(noise, inputs, regions)
        acts = self.source_activations(inputs, regions, source, tuple(sites))
        last, token = sharding.replicate((jnp.asarray(last), jnp.asarray(token)), self.mesh)
        out, _ = attribution_scores(self.module, inputs, offset, last, token, acts, tuple(sites))
        return {site: np.asarray(v) for site, v in out.items()}

    def source_activations(self, inputs: ModelInputs, regions, source, sites: Sequence[str]) -> dict:
        """The source run's activations at `sites` in every layer: site -> [L, B, T, D] ("z": [L, B, T, H, hd]).
        source: a dict of inputs (the keys of `forward`'s), a Sample or Batch, or a `Noise` on the target `inputs`
        (whose regions are `regions`); its batch size and sequence length must be the target's."""
        offset = None
        if isinstance(source, Noise):
            offset, src = self.noise_offset(source, inputs, regions), inputs
        elif isinstance(source, Sample | Batch):
            src = self.prepare(source)
        elif isinstance(source, dict):
            unknown = set(source) - {"input_ids", "pixel_values", "image_sizes", "attention_mask", "position_ids"}
            if unknown or "input_ids" not in source:
                raise ValueError(f"source: expected the keys of the main inputs (input_ids, pixel_values, "
                                 f"image_sizes, attention_mask), got {sorted(source)}")
            src = self.prepare(**source)
        else:
            raise TypeError(f"source: expected a dict of inputs, a Sample, a Batch or a Noise, got "
                            f"{type(source).__name__}")
        if src.input_ids.shape != inputs.input_ids.shape:
            raise ValueError(f"source: shape {tuple(src.input_ids.shape)} [batch, seq] differs from the inputs' "
                             f"{tuple(inputs.input_ids.shape)}; patching needs the same rows and positions")
        return self.activations(src, sites, offset)

    def activations(self, inputs: ModelInputs, sites: Sequence[str], offset=None) -> dict:
        """The activations of the uncut run of `inputs` (from `prepare`; `offset` [B, T, D] added to its input
        embeddings) at `sites` in every layer: site -> [L, B, T, D] ("z": [L, B, T, H, hd])."""
        n = self.config.text.num_layers
        kinds = ["hidden" if site == "resid_pre" else site for site in sites]
        _, arrays = _forward(self.module, inputs, None, tuple((k, i) for k in kinds for i in range(n)), offset=offset)
        return {site: jnp.stack(arrays[j * n:(j + 1) * n]) for j, site in enumerate(sites)}

    def run_with_cache(self, sample, names: Sequence[str] | None = None,
                       knockouts: Sequence[Knockout | DenseKnockout] | None = None, *, pixel_values=None,
                       image_sizes=None, attention_mask=None):
        """(logits [B, T, V], {name: activation}) of a Sample or Batch (or input_ids with pixel_values, image_sizes
        and attention_mask as `forward` takes them), activations named as TransformerLens names them
        (`jaxflow.names`: `blocks.{l}.hook_resid_pre` [B, T, D], `blocks.{l}.attn.hook_pattern` [B, H, T, T], ...).
        names: what to keep (default: every name); nothing else leaves the compiled forward. With K knockouts
        (which may name regions) logits and activations get a leading axis K."""
        from jaxflow import names as tl_names

        n = self.config.text.num_layers
        names = tl_names.all_names(n) if names is None else list(names)
        plan = tl_names.collect_plan(names, n)
        inputs = self.prepare(sample, pixel_values, image_sizes, attention_mask)
        knock, *_ = self.interventions(inputs, _regions(sample), knockouts)
        logits, arrays = _forward(self.module, inputs, knock, plan)
        return logits, dict(zip(names, arrays, strict=True))

    def prefill(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None,
                collect_hidden: bool = False) -> Prefill:
        """The uncut forward of right-padded prompts that `generate` continues from: last-position logits and
        probabilities, keys and values (and with collect_hidden the residual stream). `input_ids` may also
        be ready ModelInputs (from `prepare`)."""
        inputs = self._prompt(input_ids, pixel_values, image_sizes, attention_mask)
        last = sharding.replicate(jnp.asarray(np.asarray(inputs.attention_mask).sum(axis=1) - 1), self.mesh)
        return prefill_forward(self.module, inputs, last, collect_hidden)

    def _prompt(self, input_ids, pixel_values, image_sizes, attention_mask) -> ModelInputs:
        inputs = input_ids if isinstance(input_ids, ModelInputs) else self.prepare(
            input_ids, pixel_values, image_sizes, attention_mask)
        mask = np.asarray(inputs.attention_mask)
        if not (mask == (np.arange(mask.shape[1]) < mask.sum(axis=1)[:, None])).all():
            raise ValueError("attention_mask: generate needs right-padded prompts (ones, then zeros)")
        return inputs

    def generate(self, input_ids, pixel_values=None, image_sizes=None, attention_mask=None,
                 max_new_tokens: int = 8, eos_token_id: int | Sequence[int] | None = None,
                 prefill: Prefill | None = None) -> GenerateOutput:
        """Greedy decoding with a KV cache, until every row emitted an eos token (any of `eos_token_id`,
        default the tokenizer's) or `max_new_tokens`. Prompts in a batch must be right-padded. `input_ids`
        may also be ready ModelInputs (from `prepare`); `prefill`: this prompt's `Model.prefill`, which
        decoding then continues from instead of running the prompt again. The loop runs on the device in
        a few phases of growing cache length (`decode_phase`); each compiles once per batch shape and eos
        count, and only when a batch reaches it."""
        inputs = self._prompt(input_ids, pixel_values, image_sizes, attention_mask)
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: must be at least 1, got {max_new_tokens}")
        lengths = np.asarray(inputs.attention_mask).sum(axis=1)
        b, t = inputs.attention_mask.shape
        if prefill is None:
            prefill = self.prefill(inputs)
        elif (prefill.k[0].shape[0], prefill.k[0].shape[2]) != (b, t):
            raise ValueError(f"prefill: keys of shape {prefill.k[0].shape} are not of a [{b}, {t}] prompt batch")
        if eos_token_id is None and self.tokenizer is not None:
            eos_token_id = self.tokenizer.eos_token_id
        eos = [] if eos_token_id is None else [eos_token_id] if np.isscalar(eos_token_id) else list(eos_token_id)
        eos = sharding.replicate(jnp.asarray(eos or [-1], jnp.int32), self.mesh)
        lengths = sharding.replicate(jnp.asarray(lengths, jnp.int32), self.mesh)
        first, done = greedy_pick(prefill.logits, jnp.zeros(b, bool), eos)
        tokens = jnp.zeros((b, max_new_tokens), jnp.int32).at[:, 0].set(first)  # [B, N]
        _, kvh, _, hd = prefill.k[0].shape
        k_new = v_new = (jnp.zeros((b, kvh, 0, hd), prefill.k[0].dtype),) * len(prefill.k)  # no slots yet
        step = jnp.int32(0)
        for size in decode_phases(max_new_tokens - 1):
            if bool(done.all()):
                break
            step, tokens, done, k_new, v_new = decode_phase(self.module, prefill.k, prefill.v, lengths, eos, step,
                                                            tokens, done, k_new, v_new, size)
        return GenerateOutput(np.asarray(tokens)[:, :int(step) + 1], np.asarray(prefill.probs), np.asarray(done))


def _pair(knock: KnockoutMasks, patch: PatchMasks):
    """Knockouts and patches of K configurations each; one of either is repeated to the other's K."""
    kk, kp = len(np.asarray(knock.layers)), len(np.asarray(patch.layers))
    if kk != kp and 1 not in (kk, kp):
        raise ValueError(f"knockouts / patches: {kk} and {kp} configurations; give as many of each, or one of either")
    k = max(kk, kp)
    repeat = lambda tree, n: tree if n == k else jax.tree.map(lambda a: np.repeat(np.asarray(a), k, axis=0), tree)  # noqa: E731
    return repeat(knock, kk), repeat(patch, kp)


@functools.partial(nnx.jit, graph=False, static_argnames=("sites",))
def attribution_scores(module: VisionLanguageModel, inputs: ModelInputs, offset, last, token, source: dict,
                       sites: tuple):
    """((a_source - a_target) . dp/da_target per site: [B, L, T] ("z": [B, L, T, H]), p [B] float32). dp/da is the
    gradient of p (token [B] at last [B]) with respect to zero offsets added at every site and layer (one backward
    pass)."""
    lm = module.language_model
    x = embed_inputs(module, inputs, offset)
    n, (b, t, d) = len(lm.layers), x.shape
    heads = (lm.cfg.num_heads, lm.cfg.head_dim)
    zeros = {s: jnp.zeros((n, b, t, *heads) if s == "z" else (n, b, t, d), jnp.float32) for s in sites}

    def prob(deltas):
        out = lm(x, inputs.position_ids, inputs.attention_mask,
                 edits=[{s: SiteEdit(add=deltas[s][i]) for s in sites} for i in range(n)],
                 collect_hidden="resid_pre" in sites, collect_outputs=bool({"attn_out", "mlp_out"} & set(sites)),
                 collect_z="z" in sites)
        acts = {"resid_pre": (out.hidden_states or ())[:n], "attn_out": out.attn_out, "mlp_out": out.mlp_out,
                "z": out.z}
        h = jnp.take_along_axis(out.hidden, last[:, None, None], axis=1)[:, 0]  # [B, D]
        p = jax.nn.softmax(lm.unembed(h).astype(jnp.float32), axis=-1)[jnp.arange(b), token]  # [B]
        return p.sum(), ({s: jnp.stack(acts[s]) for s in sites}, p)  # rows are independent: d sum / d p_b = 1

    grads, (target, p) = jax.grad(prob, has_aux=True)(zeros)
    return {s: jnp.moveaxis(((source[s] - target[s]).astype(jnp.float32) * grads[s]).sum(-1), 0, 1) for s in sites}, p


@nnx.jit(graph=False)
def _image_features(module: VisionLanguageModel, crops):
    return module.image_features(crops)


def _regions(inputs) -> list | None:
    """Each row's regions when the inputs are a Sample or Batch."""
    return [row.regions for row in inputs.rows] if isinstance(inputs, Sample | Batch) else None


def abstract_module(cfg: ModelConfig, dtype) -> VisionLanguageModel:
    return nnx.eval_shape(lambda: VisionLanguageModel(cfg, dtype=dtype, rngs=nnx.Rngs(0)))


def param_shapes(cfg: ModelConfig, dtype=jnp.float32) -> dict[str, jax.ShapeDtypeStruct]:
    """Flat parameter name -> ShapeDtypeStruct of the Flax model built from `cfg`."""
    _, state = nnx.split(abstract_module(cfg, dtype))
    return {checkpoint.path_str(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def load(path: str | os.PathLike, dtype=None, mesh: jax.sharding.Mesh | None = None,
         no_anyres: bool = False, verify: bool = False) -> Model:
    """Loads a directory written by `jaxflow convert`.

    dtype: cast parameters on restore (default: as stored). mesh: a ('data', 'model') mesh
    (`jaxflow.sharding.make_mesh`); each parameter is restored straight into the sharding its
    logical axes get from `jaxflow.sharding.RULES`, each device reading only its shard.
    no_anyres: run a LLaVA-NeXT checkpoint as LLaVA does with `image_aspect_ratio="pad"` and
    `mm_patch_merge_type="spatial"` (the study's `--noHD_noPad`): the image padded to a square and one
    crop, its features alone (for a single crop, `spatial` appends no `image_newline`), i.e. the
    LLaVA-1.5 geometry; `.config` is then kind "llava".
    verify: first re-hash every stored array against the digests recorded at conversion (`checkpoint.verify`:
    one more read of the parameters). Without it, only the stored files' presence and sizes are checked.
    A damaged model raises `checkpoint.CheckpointIntegrityError` naming the group and the file.
    """
    path = os.fspath(path)
    cfg = ModelConfig.from_pretrained(path)
    meta = checkpoint.read_metadata(path)
    if verify:
        checkpoint.verify(path)
    dtype = jnp.dtype(dtype or meta["dtype"])
    module = abstract_module(cfg, dtype)
    graphdef, state = nnx.split(module)
    shardings = {} if mesh is None else sharding.param_shardings(state, mesh)
    targets = {checkpoint.path_str(p): jax.ShapeDtypeStruct(v.get_value().shape, dtype, sharding=shardings.get(p))
               for p, v in nnx.to_flat_state(state)}
    values = checkpoint.restore_params(path, targets)
    for p, var in nnx.to_flat_state(state):
        var.set_value(jnp.asarray(values[checkpoint.path_str(p)]))
    tokenizer = None
    if os.path.exists(os.path.join(path, "tokenizer_config.json")):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(path)
    if no_anyres:
        if cfg.model_type != "llava_next":  # OneVision appends a newline even to one crop: not LLaVA-1.5's geometry
            raise ValueError(f"{path}: no_anyres applies to LLaVA-NeXT checkpoints; this one is {cfg.model_type!r}")
        # one crop, as LLaVA-1.5 (the module keeps its image_newline, unused)
        cfg = dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, layout="single", pinpoints=()))
    return Model(nnx.merge(graphdef, state), cfg, tokenizer, path, meta, mesh, no_anyres)
