"""Knockout-sweep throughput of three methods on one random LLaVA-1.5-shaped model (issue 17):

(a) the study's procedure as the study runs it: per configuration one full forward at batch 1, CLIP
    included, transformers' LlavaForConditionalGeneration with sdpa attention, the window's attention
    masks replaced by additive cut masks (forward pre-hooks on those layers' self-attention), last-position
    logits only; per sample one base forward + one forward per configuration;
(b) batched PyTorch: the image embedded once per sample, `--torch-batch` configurations per forward, one
    additive mask [configurations, 1, T, T] per layer;
(c) jaxflow through the code path `jaxflow sweep` uses (`jaxflow.sweep.run.sweep` on the task file and its
    images): the large run end to end from cold (compiled code dropped first, so compile is included), then
    the marginal cost per sample between a small and a large run, both warm (compile excluded);
(d) `jaxflow sweep` as a user runs it: one process per run (`python -m jaxflow.cli sweep`, compile, model load
    and decoding of `--process-new-tokens` answer tokens included), the marginal cost between a small and a large
    run into new folders.

A shared VM's speed drifts by up to 2x within minutes, so after the cold run (a), (b) and the warm (c) runs
are repeated in turn (`--rounds`); each round's ratios come from its own minutes, and the ratios reported
are their medians.

Data: toy-world ChooseAttr questions (`jaxflow.world`), the vicuna_v1 prompt, the study's six flows at every
layer, window 9. A random model answers wrongly, so every sample is kept (`filter_correct=False`). The three
methods must give the same knocked-out probabilities. FLOPs are counted from the shapes (decoder matmuls and
dense attention scores, the vision tower, the unembedding of the positions computed).

    python scripts/bench_sweep.py                     # CPU preset, float32 (~10 min on 2 cores)
    python scripts/bench_sweep.py --preset gpu        # 7B-shaped, bfloat16 (scripts/bench_gpu.sh)
    python scripts/bench_sweep.py --preset tiny       # seconds: checks the logic
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import json
import os
import platform
import shutil
import tempfile
import time

import numpy as np


@dataclasses.dataclass(frozen=True)
class Preset:
    """Model shape, dtype and default sample counts. The text decoder is Llama, the tower CLIP (quick_gelu)."""

    hidden: int
    intermediate: int
    layers: int
    heads: int
    vocab: int
    vision_hidden: int
    vision_layers: int
    vision_heads: int
    image_size: int  # 336 -> 24 x 24 = 576 image tokens
    dtype: str
    study_samples: int  # (a)
    batched_samples: int  # (b)
    small: int  # (c): the marginal rate is taken between a `small`- and a `large`-sample run
    large: int
    batch: int  # jaxflow's samples per batch
    rounds: int  # (a), (b) and the warm (c) runs, repeated in turn: each round's ratios come from minutes apart

    @property
    def init(self) -> float:
        """Weight scale: projections of unit-RMS inputs come out near unit scale, so attention is not uniform."""
        return self.hidden ** -0.5


PRESETS = {
    "cpu": Preset(hidden=256, intermediate=688, layers=16, heads=8, vocab=32064, vision_hidden=64, vision_layers=2,
                  vision_heads=4, image_size=336, dtype="float32", study_samples=2, batched_samples=2, small=6,
                  large=30, batch=4, rounds=3),
    # LLaVA-1.5-7B: Vicuna-7B decoder, CLIP ViT-L/14 at 336 px
    "gpu": Preset(hidden=4096, intermediate=11008, layers=32, heads=32, vocab=32064, vision_hidden=1024,
                  vision_layers=24, vision_heads=16, image_size=336, dtype="bfloat16", study_samples=4,
                  batched_samples=4, small=4, large=8, batch=4, rounds=1),
    "tiny": Preset(hidden=64, intermediate=128, layers=4, heads=4, vocab=1024, vision_hidden=32, vision_layers=2,
                   vision_heads=4, image_size=56, dtype="float32", study_samples=1, batched_samples=1, small=1,
                   large=2, batch=1, rounds=2),
}
# Max (abs, relative) difference of p between methods. A random model's p is small (~1/vocab), so the relative
# difference is the sharp test; bfloat16 rounds differently in torch and XLA, so there it is a coarse one.
TOLERANCE = {"float32": (1e-4, 1e-3), "bfloat16": (2e-2, 0.25)}
STUDY_TARGET, BATCHED_TARGET = 25.0, 20.0  # issue 17: jaxflow's marginal rate over (a) and over (b)
PROCESS_TARGET = 25.0  # issue 26: the (d) process's marginal rate over (a)
DEVICE_PEAK_BF16 = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12,
                    "A10": 125e12}  # dense bfloat16 FLOP/s, by device-name substring


# ---- the model ----------------------------------------------------------------------------------------------------


def tokenizer_source(root: str) -> str:
    """`root`/src holding the shipped toy model's tokenizer (toy-world words); returns the folder."""
    from jaxflow.demo import ASSET

    src = os.path.join(root, "src")
    os.makedirs(src, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(os.path.join(ASSET, name), src)
    return src


def hf_config(preset: Preset, tokenizer):
    """The transformers LlavaConfig of `preset`'s shape (no weights): Llama decoder, CLIP tower (quick_gelu)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    if len(tokenizer) > preset.vocab:
        raise ValueError(f"preset vocab {preset.vocab} is smaller than the tokenizer's {len(tokenizer)} tokens")
    vision = CLIPVisionConfig(hidden_size=preset.vision_hidden, intermediate_size=4 * preset.vision_hidden,
                              num_hidden_layers=preset.vision_layers, num_attention_heads=preset.vision_heads,
                              image_size=preset.image_size, patch_size=14, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=preset.vocab, hidden_size=preset.hidden, intermediate_size=preset.intermediate,
                       num_hidden_layers=preset.layers, num_attention_heads=preset.heads,
                       num_key_value_heads=preset.heads, initializer_range=preset.init, max_position_embeddings=4096,
                       bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    return LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(),
                       image_token_index=tokenizer.convert_tokens_to_ids("<image>"))


def build(preset: Preset, root: str, device: str, seed: int = 0):
    """A random llava-hf checkpoint written by transformers (the toy-world tokenizer, `preset`'s shape),
    converted and loaded by jaxflow. Returns (transformers model on `device` in the preset's dtype, jaxflow Model)."""
    import torch
    from transformers import AutoTokenizer, LlavaForConditionalGeneration

    import jaxflow
    from jaxflow.convert import convert

    src = tokenizer_source(root)
    config = hf_config(preset, AutoTokenizer.from_pretrained(src))
    dtype = getattr(torch, preset.dtype)
    torch.manual_seed(seed)
    with torch.device(device):  # a 7B model initialises in seconds on the accelerator
        hf = LlavaForConditionalGeneration._from_config(config, attn_implementation="sdpa", dtype=dtype)
    hf = hf.to(device).eval()
    hf.save_pretrained(src)
    model = jaxflow.load(convert(src, os.path.join(root, "model"), progress=False), dtype=preset.dtype)
    return hf, model


# ---- data ---------------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Sample:
    question_id: str
    input_ids: np.ndarray  # [T] with the image tokens expanded (llava-hf)
    pixel_values: np.ndarray  # [1, 3, S, S]
    regions: dict  # region name -> positions


def toy_data(root: str, n: int, seed: int) -> tuple[str, str]:
    """n toy-world ChooseAttr questions: (task file, image folder)."""
    from jaxflow.world import generate

    out = os.path.join(root, "data")
    return generate(out, n, seed, ["ChooseAttr"])["ChooseAttr"], os.path.join(out, "images")


def load_samples(model, data: str, images: str, n: int) -> list[Sample]:
    """The first n rows as the sweep builds them (prompt, pixels, regions), for the PyTorch methods."""
    from jaxflow.inputs import gqa
    from jaxflow.sweep.batching import Prepared, prepare

    rows, errors = gqa.load_tasks(data, images)
    if errors:
        raise ValueError(f"{data}: unusable rows: {'; '.join(map(str, errors))}")
    out = []
    for item in prepare(model, rows[:n], None):
        if not isinstance(item, Prepared):
            raise ValueError(f"{data}: question {item[0].question_id} cannot be prepared: {item[1]}")
        x = item.inputs
        out.append(Sample(item.sample.question_id, x.input_ids, x.pixel_values, dict(x.regions)))
    return out


def configurations(regions: dict, num_layers: int, k: int) -> list[tuple[str, int, np.ndarray, np.ndarray, list]]:
    """The study's six flows at every layer: (flow name, layer, source positions, target positions, window)."""
    from jaxflow.sweep.flows import STUDY_FLOWS, window

    return [(name, layer, np.asarray(regions[src]), np.asarray(regions[tgt]), window(layer, k, num_layers))
            for name, (src, tgt) in STUDY_FLOWS.items() for layer in range(num_layers)]


# ---- (a) and (b): PyTorch -----------------------------------------------------------------------------------------


@contextlib.contextmanager
def attention_masks(hf, masks: dict):
    """Forward pre-hooks: layer i's self-attention gets masks[i] as its attention_mask argument."""
    layers = hf.model.language_model.layers

    def swap(i):
        def hook(module, args, kwargs):
            kwargs["attention_mask"] = masks[i]
            return args, kwargs

        return hook

    handles = [layers[i].self_attn.register_forward_pre_hook(swap(i), with_kwargs=True) for i in masks]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def blocked(t: int, source, target, torch):
    """[T, T] bool: key after query (causality) or a cut edge target -> source."""
    block = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
    block[np.ix_(target, source)] = True
    return block


def additive(block, dtype, device):
    """bool blocked -> additive float mask (0 / dtype min), as the study builds it."""
    import torch

    return torch.zeros(block.shape, dtype=dtype).masked_fill(block, torch.finfo(dtype).min).to(device)


def _probs(logits):
    import torch

    return torch.softmax(logits.float(), dim=-1)  # [..., V]


def run_study(hf, samples: list[Sample], k: int, device: str):
    """(a). Returns (p_base [S], p [S, K] of each sample's greedy first token, seconds)."""
    import torch

    num_layers = hf.config.text_config.num_hidden_layers
    dtype = hf.dtype
    bases, out = [], []
    start = time.perf_counter()
    with torch.inference_mode():
        for s in samples:
            ids = torch.as_tensor(s.input_ids[None], device=device)
            pixels = torch.as_tensor(s.pixel_values, device=device, dtype=dtype)
            probs = _probs(hf(input_ids=ids, pixel_values=pixels, logits_to_keep=1, use_cache=False).logits[0, -1])
            token = int(probs.argmax())
            bases.append(float(probs[token]))
            ps = []
            for _, _, source, target, layers in configurations(s.regions, num_layers, k):
                mask = additive(blocked(len(s.input_ids), source, target, torch)[None, None], dtype, device)
                with attention_masks(hf, dict.fromkeys(layers, mask)):
                    logits = hf(input_ids=ids, pixel_values=pixels, logits_to_keep=1, use_cache=False).logits
                ps.append(float(_probs(logits[0, -1])[token]))
            out.append(ps)
    _sync(device)
    return np.asarray(bases), np.asarray(out), time.perf_counter() - start


def run_batched(hf, samples: list[Sample], k: int, batch: int, device: str):
    """(b). Returns (p_base [S], p [S, K], seconds)."""
    import torch

    num_layers = hf.config.text_config.num_hidden_layers
    dtype = hf.dtype
    bases, out = [], []
    start = time.perf_counter()
    with torch.inference_mode():
        for s in samples:
            ids = torch.as_tensor(s.input_ids[None], device=device)
            pixels = torch.as_tensor(s.pixel_values, device=device, dtype=dtype)
            base = hf(input_ids=ids, pixel_values=pixels, logits_to_keep=1, use_cache=False, output_hidden_states=True)
            probs = _probs(base.logits[0, -1])
            token = int(probs.argmax())
            bases.append(float(probs[token]))
            embeds = base.hidden_states[0]  # [1, T, D]: token embeddings with the image features merged in
            t = len(s.input_ids)
            causal = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
            configs = configurations(s.regions, num_layers, k)
            ps = []
            for i in range(0, len(configs), batch):
                group = configs[i:i + batch]
                cuts = [blocked(t, src, tgt, torch) for _, _, src, tgt, _ in group]
                masks = {layer: additive(torch.stack([c if layer in lay else causal for c, (*_, lay) in
                                                      zip(cuts, group, strict=True)])[:, None], dtype, device)
                         for layer in range(num_layers)}  # [n, 1, T, T] each
                with attention_masks(hf, masks):
                    logits = hf(inputs_embeds=embeds.expand(len(group), -1, -1), logits_to_keep=1,
                                use_cache=False).logits
                ps += _probs(logits[:, -1])[:, token].tolist()
            out.append(ps)
    _sync(device)
    return np.asarray(bases), np.asarray(out), time.perf_counter() - start


def _sync(device: str):
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---- (c): jaxflow sweep -------------------------------------------------------------------------------------------


def run_jaxflow(model, data: str, images: str, n: int, out: str, k: int, batch: int, max_new_tokens: int,
                cold: bool):
    """(c): `jaxflow sweep` on the first n rows into a new folder `out`; cold: compiled code dropped first.
    Returns ({(question_id, flow, layer): p}, {question_id: p_base}, seconds, sweep summary)."""
    import jax

    from jaxflow.sweep.flows import STUDY_FLOWS, parse_flow
    from jaxflow.sweep.run import sweep

    if cold:
        jax.clear_caches()
    start = time.perf_counter()
    summary = sweep(model, data, out, flows=[parse_flow(f) for f in STUDY_FLOWS], window_size=k, batch=batch,
                    limit=n, images=images, max_new_tokens=max_new_tokens, filter_correct=False, progress=False)
    seconds = time.perf_counter() - start
    with open(os.path.join(out, "skipped.csv"), newline="") as f:
        skipped = list(csv.DictReader(f))
    if skipped:
        raise RuntimeError(f"{out}: the sweep skipped samples: {skipped}")
    p, base = {}, {}
    with open(os.path.join(out, "results.csv"), newline="") as f:
        for r in csv.DictReader(f):
            p[r["question_id"], r["block_desc"], int(r["layer"])] = float(r["new_score_first"])
            base[r["question_id"]] = float(r["base_score_first"])
    return p, base, seconds, summary


def run_process(model_dir: str, data: str, images: str, n: int, out: str, k: int, batch: int,
                max_new_tokens: int) -> float:
    """(d): `jaxflow sweep` as a process on the first n rows into a new folder `out` (every sample kept, answers
    of exactly `max_new_tokens` tokens from a model that never emits EOS). Returns its wall seconds."""
    import subprocess
    import sys

    cmd = [sys.executable, "-m", "jaxflow.cli", "sweep", "--model", model_dir, "--data", data, "--images", images,
           "--out", out, "--window", str(k), "--batch", str(batch), "--limit", str(n), "--keep-incorrect",
           "--max-new-tokens", str(max_new_tokens)]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode:
        raise RuntimeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    with open(os.path.join(out, "results.csv"), newline="") as f:
        if len({r["question_id"] for r in csv.DictReader(f)}) != n:
            raise RuntimeError(f"{out}: the process did not record {n} samples")
    return seconds


# ---- FLOPs --------------------------------------------------------------------------------------------------------


def decoder_layer_flops(text, queries: int, keys: int) -> int:
    """One decoder layer over `queries` positions attending to `keys` keys: q/k/v/o projections, SwiGLU MLP,
    dense attention scores and their weighted sum (what sdpa with a mask and XLA compute)."""
    d, h, kv, hd = text.hidden_size, text.num_heads, text.num_kv_heads, text.head_dim
    proj = 2 * queries * d * (2 * h * hd + 2 * kv * hd)
    mlp = 2 * queries * 3 * d * text.intermediate_size
    attention = 2 * 2 * queries * keys * h * hd
    return proj + mlp + attention


def decoder_flops(text, t: int) -> int:
    """The whole decoder over a T-position prompt."""
    return text.num_layers * decoder_layer_flops(text, t, t)


def tower_flops(cfg) -> int:
    """The CLIP tower on one image (patch embedding, every layer over the patches and CLS) and the projector."""
    v = cfg.vision
    patches = v.grid ** 2
    seq = patches + 1
    layer = 2 * seq * 4 * v.hidden_size ** 2 + 2 * seq * 2 * v.hidden_size * v.intermediate_size
    layer += 2 * 2 * seq * seq * v.hidden_size
    embed = 2 * patches * 3 * v.patch_size ** 2 * v.hidden_size
    projector = 2 * cfg.features_per_crop * (v.hidden_size + cfg.text.hidden_size) * cfg.text.hidden_size
    return embed + v.num_layers * layer + projector


def unembed_flops(text, positions: int = 1) -> int:
    return 2 * positions * text.hidden_size * text.vocab_size


def flops_per_sample(cfg, sample: Sample, k: int) -> dict:
    """FLOPs of one sample under each method. `jaxflow_bound`: one prefill plus the exact suffixes (positions
    from a configuration's first target on, layers from its window start up), each computed once: where
    configurations start alike and cut the same edges so far they are one computation
    (`jaxflow.sweep.engine.share_rows`); the last layer needs keys and values of the suffix but the rest
    only at the answer's position; one unembedding per configuration. `per_configuration_bound`: issue 17's
    bound, every configuration's whole suffix on its own."""
    from jaxflow import KnockoutMasks

    text = cfg.text
    t = len(sample.input_ids)
    configs = configurations(sample.regions, text.num_layers, k)
    forward = tower_flops(cfg) + decoder_flops(text, t) + unembed_flops(text)
    suffix = [t - int(target.min()) for _, _, _, target, _ in configs]  # positions each configuration recomputes
    per_configuration = sum((text.num_layers - layers[0]) * decoder_layer_flops(text, n, t)
                            for n, (*_, layers) in zip(suffix, configs, strict=True))
    edges = np.zeros((2, len(configs), 1, t), bool)  # source, target
    layer_mask = np.zeros((len(configs), text.num_layers), bool)
    for c, (_, _, source, target, layers) in enumerate(configs):
        edges[0, c, 0, source], edges[1, c, 0, target], layer_mask[c, layers] = True, True, True
    knock = KnockoutMasks(*edges, layer_mask, np.ones((len(configs), text.num_heads), bool))
    shared = incremental_flops(text, knock, t)
    unembed = len(configs) * unembed_flops(text)
    return {"forward": forward, "study": (1 + len(configs)) * forward,
            "batched": tower_flops(cfg) + (1 + len(configs)) * (decoder_flops(text, t) + unembed_flops(text)),
            "jaxflow_bound": forward + shared + unembed,
            "per_configuration_bound": forward + per_configuration + unembed, "configurations": len(configs), "T": t}


def incremental_flops(text, knock, t: int, patch=None) -> int:
    """The exact incremental work of K configurations (KnockoutMasks, and PatchMasks, of one T-position sample at
    batch 1) past the base run, unembedding excluded: each configuration's suffix (positions from its first target
    or patched position on, layers from its window start up), each shared computation once
    (`jaxflow.sweep.engine.share_rows`); the last layer needs keys and values of the suffix but the rest only at
    the answer's position."""
    from jaxflow.sweep import engine

    t0, _ = engine.suffix_starts(knock, np.array([t]), patch)
    suffix = t - t0[:, 0]  # positions each configuration recomputes
    starts = np.minimum(engine.window_starts(knock, patch), text.num_layers - 1)
    plan = engine.share_rows(knock, starts, t0, patch)
    kv = 2 * text.hidden_size * 2 * text.num_kv_heads * text.head_dim  # key and value projections per position
    shared = sum(decoder_layer_flops(text, int(suffix[c]), t) for rows in plan.rows[:-1] for c in rows)
    return shared + sum(decoder_layer_flops(text, 1, t) + (int(suffix[c]) - 1) * kv for c in plan.rows[-1])


def xla_decoder_flops(model, t: int) -> float:
    """XLA's own count (`cost_analysis`) of jaxflow's decoder over a T-position prompt (batch 1), attention on XLA's
    path (the fused CPU kernel is a custom call, whose work XLA does not count)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    lm = model.module.language_model
    graphdef, state = nnx.split(lm)
    dtype = lm.embed_tokens.embedding.dtype

    def forward(state, x, pos, valid):
        return nnx.merge(graphdef, state)(x, pos, valid).hidden

    x = jax.ShapeDtypeStruct((1, t, model.config.text.hidden_size), dtype)
    pos, valid = jax.ShapeDtypeStruct((1, t), jnp.int32), jax.ShapeDtypeStruct((1, t), jnp.bool_)
    before = os.environ.get("JAXFLOW_CPU_ATTENTION")
    os.environ["JAXFLOW_CPU_ATTENTION"] = "0"  # read while tracing
    try:
        cost = jax.jit(forward).lower(state, x, pos, valid).compile().cost_analysis()
    finally:
        if before is None:
            del os.environ["JAXFLOW_CPU_ATTENTION"]
        else:
            os.environ["JAXFLOW_CPU_ATTENTION"] = before
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost["flops"])


def compiled_memory(model, data: str, images: str, batch: int, k: int) -> list[dict]:
    """What XLA allocates (its buffer assignment: temporaries, arguments, outputs; device memory on an
    accelerator) for each call of the sweep's batch of the task file's first `batch` rows: the prefill, then each
    knockout call as `knockout_probs` makes it. A knockout call's temporaries per configuration are set beside
    what `auto_chunk` budgets for one."""
    import jax.numpy as jnp

    from jaxflow.inputs import gqa
    from jaxflow.model import prefill_forward
    from jaxflow.sweep import engine
    from jaxflow.sweep.batching import batches, prepare, stack_inputs
    from jaxflow.sweep.flows import STUDY_FLOWS, knockout_masks, parse_flow

    rows, _ = gqa.load_tasks(data, images)
    (group, t), = batches(list(prepare(model, rows[:batch], None)), batch)
    inputs, lengths = stack_inputs(model, group, batch, t)
    text = model.config.text
    knock = knockout_masks([parse_flow(f) for f in STUDY_FLOWS], group, t, text.num_layers, text.num_heads, k)
    last = lengths - 1
    base = engine.base_run(model.module, inputs, last)
    token = np.asarray(base.probs).argmax(-1)
    calls = [("prefill", None, prefill_forward.lower(model.module, inputs, jnp.asarray(last), collect_hidden=True))]
    for _, args in engine.incremental_calls(model.module, inputs, knock, last, token, base=base):
        calls.append((f"knockouts, suffix {args[4].shape[-1]}", args, engine.knockout_incremental.lower(*args)))
    out = []
    for name, args, lowered in calls:
        m = lowered.compile().memory_analysis()
        entry = {"call": name, "batch": batch, "T": t, "temp_bytes": m.temp_size_in_bytes,
                 "argument_bytes": m.argument_size_in_bytes, "output_bytes": m.output_size_in_bytes}
        if args is not None:
            n, suffix = len(args[3].layers), args[4].shape[-1]
            plan = next(a for a in args if isinstance(a, engine.RowPlan))
            entry.update(configurations=n, row_layers=sum(len(r) for r in plan.rows),
                         temp_per_configuration=m.temp_size_in_bytes / n,
                         budget_per_configuration=engine.configuration_bytes(model.module, batch, t, suffix))
        out.append(entry)
    return out


# ---- the report ---------------------------------------------------------------------------------------------------


def machine(device: str) -> dict:
    import jax
    import torch

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    out = {"cpu": cpu, "cores": os.cpu_count(), "jax_device": str(jax.devices()[0]),
           "jax_device_kind": jax.devices()[0].device_kind, "torch_device": device,
           "torch_threads": torch.get_num_threads(), "torch": torch.__version__, "jax": jax.__version__}
    if device.startswith("cuda"):
        out["gpu"] = torch.cuda.get_device_name()
    return out


def device_peak(name: str) -> float | None:
    return next((peak for key, peak in DEVICE_PEAK_BF16.items() if key in name), None)


def compare(p_ref, p_other, base_ref, base_other) -> dict:
    """Max abs and max relative difference of the knocked-out (and base) probabilities."""
    p_ref, p_other = np.asarray(p_ref), np.asarray(p_other)
    both = np.concatenate([p_ref.ravel(), np.asarray(base_ref).ravel()])
    other = np.concatenate([p_other.ravel(), np.asarray(base_other).ravel()])
    return {"max_abs": float(np.abs(both - other).max()),
            "max_rel": float((np.abs(both - other) / np.maximum(np.abs(both), 1e-30)).max())}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], help="override the preset's dtype")
    parser.add_argument("--study-samples", type=int, help="samples for (a), the study's procedure")
    parser.add_argument("--batched-samples", type=int, help="samples for (b), batched PyTorch")
    parser.add_argument("--small", type=int, help="samples of the small jaxflow run (c)")
    parser.add_argument("--large", type=int, help="samples of the large jaxflow run (c)")
    parser.add_argument("--batch", type=int, help="jaxflow sweep batch size")
    parser.add_argument("--rounds", type=int, help="rounds of (a), (b) and the warm (c) runs, in turn; the ratios "
                        "reported are the medians of each round's own ratios (default: the preset's)")
    parser.add_argument("--torch-batch", type=int, default=16, help="configurations per forward in (b)")
    parser.add_argument("--window", type=int, default=9)
    parser.add_argument("--max-new-tokens", type=int, default=1,
                        help="greedy decoding limit in (c); every sample is kept whatever it decodes")
    parser.add_argument("--process-new-tokens", type=int, default=3,
                        help="answer tokens each sample decodes in (d), `jaxflow sweep` as a process")
    parser.add_argument("--seed", type=int, default=0, help="toy-world data seed")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--torch-threads", type=int, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--abs-tol", type=float, help="fail above this max abs difference of p (default: TOLERANCE)")
    parser.add_argument("--rel-tol", type=float, help="fail above this max relative difference of p (TOLERANCE)")
    parser.add_argument("--workdir", help="keep the model, data and runs here (default: a temporary folder)")
    parser.add_argument("--out", help="save the results as JSON")
    args = parser.parse_args(argv)

    import jax
    import torch

    preset = PRESETS[args.preset]
    preset = dataclasses.replace(preset, **{f: getattr(args, f) for f in ("dtype", "study_samples", "batched_samples",
                                                                          "small", "large", "batch", "rounds")
                                            if getattr(args, f) is not None})
    if not 0 < preset.small < preset.large:
        raise SystemExit(f"--small {preset.small} / --large {preset.large}: need 0 < small < large")
    if preset.rounds < 1:
        raise SystemExit(f"--rounds {preset.rounds}: need at least one round")
    abs_tol, rel_tol = TOLERANCE[preset.dtype]
    abs_tol = abs_tol if args.abs_tol is None else args.abs_tol
    rel_tol = rel_tol if args.rel_tol is None else args.rel_tol
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    n_torch = max(preset.study_samples, preset.batched_samples)

    with contextlib.ExitStack() as stack:
        root = args.workdir or stack.enter_context(tempfile.TemporaryDirectory())
        t0 = time.perf_counter()
        hf, model = build(preset, root, device)
        data, images = toy_data(root, max(preset.large, n_torch), args.seed)
        samples = load_samples(model, data, images, max(preset.large, n_torch))
        setup = time.perf_counter() - t0
        log(f"model, data and {len(samples)} samples ready in {setup:.0f} s")
        cfg = model.config
        k = args.window

        cuda = device.startswith("cuda")
        with torch.inference_mode():  # warm-up: first-call allocations are not the method's cost
            hf(input_ids=torch.as_tensor(samples[0].input_ids[None], device=device),
               pixel_values=torch.as_tensor(samples[0].pixel_values, device=device, dtype=hf.dtype), logits_to_keep=1)
        memory_peak = {}

        def sweep(n: int, name: str, cold: bool = False):
            out = run_jaxflow(model, data, images, n, os.path.join(root, "runs", name), k, preset.batch,
                              args.max_new_tokens, cold)
            log(f"(c) jaxflow sweep, {name}: {n} samples in {out[2]:.1f} s")
            return out

        cold = sweep(preset.large, f"cold-{preset.large}", cold=True)
        rounds = []  # per round: seconds of (a), (b), the small and the large warm (c) runs
        for i in range(preset.rounds):  # the VM's speed drifts: each round measures all three methods in turn
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            base_a, p_a, s_a = run_study(hf, samples[:preset.study_samples], k, device)
            log(f"round {i + 1}: (a) study's procedure: {preset.study_samples} samples in {s_a:.1f} s")
            if cuda:
                memory_peak["a"] = torch.cuda.max_memory_allocated()
                torch.cuda.reset_peak_memory_stats()
            base_b, p_b, s_b = run_batched(hf, samples[:preset.batched_samples], k, args.torch_batch, device)
            log(f"round {i + 1}: (b) batched PyTorch: {preset.batched_samples} samples in {s_b:.1f} s")
            if cuda:
                memory_peak["b"] = torch.cuda.max_memory_allocated()
                torch.cuda.empty_cache()  # the accelerator's cached blocks go back to jaxflow
            runs = {n: sweep(n, f"warm-{n}-{i + 1}") for n in (preset.small, preset.large)}
            process = {n: run_process(os.path.join(root, "model"), data, images, n,
                                      os.path.join(root, "runs", f"process-{n}-{i + 1}"), k, preset.batch,
                                      args.process_new_tokens) for n in (preset.small, preset.large)}
            log(f"round {i + 1}: (d) jaxflow sweep as a process: {preset.small} / {preset.large} samples in "
                f"{process[preset.small]:.1f} / {process[preset.large]:.1f} s")
            rounds.append({"a": s_a, "b": s_b, "c_warm_small": runs[preset.small][2],
                           "c_warm_large": runs[preset.large][2], "d_process_small": process[preset.small],
                           "d_process_large": process[preset.large]})
        stats = jax.devices()[0].memory_stats() or {}
        xla = xla_decoder_flops(model, len(samples[0].input_ids))
        memory = compiled_memory(model, data, images, preset.batch, k)

    # agreement on the samples each pair shares
    keys = [(f, layer) for f, layer, *_ in configurations(samples[0].regions, cfg.text.num_layers, k)]
    p_c_all, base_c_all = cold[0], cold[1]
    p_c = np.asarray([[p_c_all[s.question_id, f, layer] for f, layer in keys] for s in samples[:n_torch]])
    base_c = np.asarray([base_c_all[s.question_id] for s in samples[:n_torch]])
    na, nb = preset.study_samples, preset.batched_samples
    m = min(na, nb)
    agree = {"a_c": compare(p_a, p_c[:na], base_a, base_c[:na]), "b_c": compare(p_b, p_c[:nb], base_b, base_c[:nb]),
             "a_b": compare(p_a[:m], p_b[:m], base_a[:m], base_b[:m])}
    effect = float(np.abs(p_c / base_c[:, None] - 1).max())  # the largest knockout effect: the check is not vacuous

    # rates and FLOPs
    flops = [flops_per_sample(cfg, s, k) for s in samples]
    mean = {key: float(np.mean([f[key] for f in flops]))
            for key in ("study", "batched", "jaxflow_bound", "per_configuration_bound", "forward")}
    (_, _, s_cold, sum_cold) = cold
    for r_ in rounds:  # each round's rates and ratios, from its own minutes
        r_["samples_per_s"] = {"a_study": na / r_["a"], "b_batched": nb / r_["b"],
                               "c_jaxflow_marginal": (preset.large - preset.small)
                               / (r_["c_warm_large"] - r_["c_warm_small"])}
        r_["samples_per_s"]["d_process_marginal"] = ((preset.large - preset.small)
                                                     / (r_["d_process_large"] - r_["d_process_small"]))
        c_ = r_["samples_per_s"]["c_jaxflow_marginal"]
        r_["ratio_c_over_a"] = c_ / r_["samples_per_s"]["a_study"]
        r_["ratio_d_over_a"] = r_["samples_per_s"]["d_process_marginal"] / r_["samples_per_s"]["a_study"]
        r_["ratio_c_over_b"] = c_ / r_["samples_per_s"]["b_batched"]
    median = lambda key: float(np.median([r_[key] for r_ in rounds]))  # noqa: E731
    rate = {key: float(np.median([r_["samples_per_s"][key] for r_ in rounds]))
            for key in ("a_study", "b_batched", "c_jaxflow_marginal", "d_process_marginal")}
    rate["c_jaxflow_end_to_end"] = preset.large / s_cold
    method_flops = {"a_study": mean["study"], "b_batched": mean["batched"], "c_jaxflow_marginal": mean["jaxflow_bound"],
                    "c_jaxflow_end_to_end": mean["jaxflow_bound"], "d_process_marginal": mean["jaxflow_bound"]}
    achieved = {m_: rate[m_] * method_flops[m_] for m_ in rate}
    bound_ratio = mean["study"] / mean["jaxflow_bound"]
    c_over_a, c_over_b, d_over_a = median("ratio_c_over_a"), median("ratio_c_over_b"), median("ratio_d_over_a")
    decoder_analytic = decoder_flops(cfg.text, len(samples[0].input_ids))
    info = machine(device)
    peak = device_peak(info.get("gpu", "")) if preset.dtype == "bfloat16" else None

    result = {
        "preset": args.preset, "shape": dataclasses.asdict(preset), "machine": info, "window": k,
        "configurations_per_sample": flops[0]["configurations"], "T_mean": float(np.mean([f["T"] for f in flops])),
        "samples": {"a": na, "b": nb, "c_small": preset.small, "c_large": preset.large},
        "seconds": {"setup": setup, "c_cold_large": s_cold,
                    **{key: median(key) for key in ("a", "b", "c_warm_small", "c_warm_large", "d_process_small",
                                                    "d_process_large")}},
        "rounds": rounds, "samples_per_s": rate, "ratio_c_over_a": c_over_a, "ratio_c_over_b": c_over_b,
        "ratio_d_over_a": d_over_a, "process_new_tokens": args.process_new_tokens,
        "ratio_c_end_to_end_over_a": rate["c_jaxflow_end_to_end"] / rate["a_study"],
        "flops_per_sample": mean, "flop_bound_ratio": bound_ratio, "fraction_of_bound": c_over_a / bound_ratio,
        "per_configuration_bound_ratio": mean["study"] / mean["per_configuration_bound"],
        "achieved_flop_per_s": achieved, "device_peak_flop_per_s": peak,
        "decoder_flops_analytic_vs_xla": [decoder_analytic, xla],
        "agreement": agree, "largest_knockout_effect": effect, "tolerance": {"abs": abs_tol, "rel": rel_tol},
        "compiled_shapes": sum_cold["compiled_shapes"],
        "peak_memory_bytes": {**memory_peak, "c": stats.get("peak_bytes_in_use")}, "compiled_memory": memory,
        "targets": {"c_over_a": [STUDY_TARGET, c_over_a >= STUDY_TARGET],
                    "c_over_b": [BATCHED_TARGET, c_over_b >= BATCHED_TARGET],
                    "d_over_a": [PROCESS_TARGET, d_over_a >= PROCESS_TARGET]},
    }
    report(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    worst = {pair: d for pair, d in agree.items() if d["max_abs"] > abs_tol or d["max_rel"] > rel_tol}
    if worst:
        raise SystemExit(f"methods disagree beyond abs {abs_tol} / rel {rel_tol}: {worst}")
    return result


def log(text: str) -> None:
    print(f"[bench_sweep {time.strftime('%H:%M:%S')}] {text}", flush=True)


def _si(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}"
    return f"{x:.3g} {unit}"


def report(r: dict) -> None:
    m, s = r["machine"], r["shape"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores; jax {m['jax']} on {m['jax_device']}; torch {m['torch']} on "
          f"{m['torch_device']}{' (' + m['gpu'] + ')' if 'gpu' in m else ''}, {m['torch_threads']} threads")
    print(f"model ({r['preset']}): decoder {s['layers']} layers, hidden {s['hidden']}, intermediate "
          f"{s['intermediate']}, {s['heads']} heads, vocab {s['vocab']}; CLIP {s['vision_layers']} layers, hidden "
          f"{s['vision_hidden']}, {s['image_size']} px; {s['dtype']}; T ~ {r['T_mean']:.0f}; "
          f"{r['configurations_per_sample']} configurations per sample, window {r['window']}")
    rows = [("(a) study's procedure", "a_study", r["samples"]["a"], "study"),
            ("(b) batched PyTorch", "b_batched", r["samples"]["b"], "batched"),
            (f"(c) jaxflow sweep, marginal {r['samples']['c_small']} -> {r['samples']['c_large']} (warm)",
             "c_jaxflow_marginal", r["samples"]["c_large"] - r["samples"]["c_small"], "jaxflow_bound"),
            (f"(c) jaxflow sweep end to end, {r['samples']['c_large']} (cold)", "c_jaxflow_end_to_end",
             r["samples"]["c_large"], "jaxflow_bound"),
            (f"(d) `jaxflow sweep` as a process, marginal {r['samples']['c_small']} -> {r['samples']['c_large']} "
             f"({r['process_new_tokens']}-token answers)", "d_process_marginal",
             r["samples"]["c_large"] - r["samples"]["c_small"], "jaxflow_bound")]
    a, b = r["samples_per_s"]["a_study"], r["samples_per_s"]["b_batched"]
    print(f"\nsamples/s: medians over {len(r['rounds'])} rounds (the cold run: once); x (a), x (b) of the marginal "
          f"rate: medians of each round's own ratio\n")
    print(f"| method | samples | samples/s | x (a) | x (b) | FLOP/sample | FLOP/s |\n|{' --- |' * 7}")
    for label, key, n, fkey in rows:
        rate = r["samples_per_s"][key]
        over_a, over_b = ((r["ratio_c_over_a"], r["ratio_c_over_b"]) if key == "c_jaxflow_marginal"
                          else (r["ratio_d_over_a"], rate / b) if key == "d_process_marginal" else (rate / a, rate / b))
        print(f"| {label} | {n} | {rate:.4g} | {over_a:.1f} | {over_b:.1f} | {_si(r['flops_per_sample'][fkey])} "
              f"| {_si(r['achieved_flop_per_s'][key])} |")
    print(f"\njaxflow FLOP/sample is the exact bound (one prefill + the configurations' suffixes from their window "
          f"starts, each shared computation once); jaxflow computes at least that, so its FLOP/s is a lower bound."
          f"\nFLOP-bound ratio (study / bound): {r['flop_bound_ratio']:.1f}x (every configuration's suffix on its own: "
          f"{r['per_configuration_bound_ratio']:.1f}x); jaxflow reaches {r['fraction_of_bound']:.0%} of it "
          f"({r['ratio_c_over_a']:.1f}x measured). The bound is the speed-up at the study's own FLOP/s: above 100%, "
          f"jaxflow's FLOP/s beat PyTorch's")
    if r["device_peak_flop_per_s"]:
        peak = r["device_peak_flop_per_s"]
        print("fraction of the device's dense bf16 peak " + _si(peak, "FLOP/s") + ": " +
              ", ".join(f"{k} {v / peak:.1%}" for k, v in r["achieved_flop_per_s"].items()))
    mem = r["peak_memory_bytes"]
    if any(v is not None for v in mem.values()):
        print("peak device memory: " + ", ".join(f"{k} {_si(v, 'B')}" for k, v in mem.items()))
    print("XLA's allocation per call of one sweep batch: " + "; ".join(
        f"{c['call']}: temp {_si(c['temp_bytes'], 'B')}, arguments {_si(c['argument_bytes'], 'B')}"
        + (f", {c['configurations']} configurations in {c['row_layers']} row-layers: temp "
           f"{_si(c['temp_per_configuration'], 'B')} per configuration (budget "
           f"{_si(c['budget_per_configuration'], 'B')})" if "configurations" in c else "")
        for c in r["compiled_memory"]))
    d_an, d_xla = r["decoder_flops_analytic_vs_xla"]
    print(f"decoder FLOPs of one T={r['T_mean']:.0f} forward: analytic {_si(d_an)}, XLA cost_analysis {_si(d_xla)}")
    print("agreement (max abs / max rel difference of p): " +
          ", ".join(f"{k} {v['max_abs']:.1e} / {v['max_rel']:.1e}" for k, v in r["agreement"].items()) +
          f"; largest knockout effect |p_block / p_base - 1| = {r['largest_knockout_effect']:.3g}")
    for i, r_ in enumerate(r["rounds"]):
        rate = r_["samples_per_s"]
        print(f"round {i + 1}: samples/s (a) {rate['a_study']:.4g}, (b) {rate['b_batched']:.4g}, (c) "
              f"{rate['c_jaxflow_marginal']:.4g}: {r_['ratio_c_over_a']:.1f}x (a), {r_['ratio_c_over_b']:.1f}x (b); "
              f"(d) {rate['d_process_marginal']:.4g}: {r_['ratio_d_over_a']:.1f}x (a)")
    sec = r["seconds"]
    print(f"seconds (medians of {len(r['rounds'])} rounds but the cold run): setup {sec['setup']:.0f}, "
          f"(a) {sec['a']:.1f}, (b) {sec['b']:.1f}, "
          f"(c) cold {sec['c_cold_large']:.1f}, warm {sec['c_warm_small']:.1f} / {sec['c_warm_large']:.1f}, "
          f"(d) {sec['d_process_small']:.1f} / {sec['d_process_large']:.1f}"
          f"; jaxflow batch shapes (batch, T): {r['compiled_shapes']}")
    for key, (target, ok) in r["targets"].items():
        value = r[f"ratio_{key}"]
        print(f"target {key} >= {target:g}x: {value:.1f}x {'PASS' if ok else 'MISS'}")


if __name__ == "__main__":
    main()
