"""Causal-tracing throughput of three methods on bench_sweep.py's random LLaVA-1.5-shaped model (issue 28, item 6),
and attribution patching's agreement with exact patching on the shipped toy model.

Causal tracing (ROME, Meng et al. 2022; on LLaVA, Basu et al. 2024): the corrupted run adds Gaussian noise of 3x
the embeddings' std to the input embeddings of the image positions (`--corrupt image-noise`) or of the question's
(`question-noise`); each configuration restores the clean run's activation at one site (resid_pre, attn_out,
mlp_out) in a window of layers centred on each layer (`--window` layers for attn_out and mlp_out, 10 as ROME;
`--resid-window` for resid_pre, 1 as ROME: one hidden state) at one region's positions (image,
related_image_patches, question, last; a sample without related patches skips that region) into the corrupted
run, and reads p_restored, the probability of the clean run's top-1 token at the last position.

(a) the hook procedure as the published code runs it: transformers' LlavaForConditionalGeneration (sdpa), batch 1;
    per sample the clean run (every site of every layer cached by forward hooks) and the corrupted run once, then
    one forward per configuration (CLIP included, last-position logits) with forward hooks that add the noise to
    the input embeddings and replace the site's output at the region's positions by the cached clean one. The
    noise values are jaxflow's `Noise` draws for the sample's batch, so the methods compute the same numbers;
(b) jaxflow exact: per batch the clean run (activations and answer token), the corrupted base run, then every
    configuration through the sweep engine's incremental path (`knockout_probs(patch=PatchMasks, source=clean
    activations, offset=noise)`): only the suffix a restoration can change is recomputed;
(c) jaxflow attribution: per batch the clean run and `Model.attribution`'s computation (one forward and one
    backward of the corrupted run, `jaxflow.model.attribution_scores`), each configuration's estimate the sum of the
    site's attributions over its layers and positions: p_restored ~ p_corrupt + estimate.

After a cold call of (b) and (c) (compilation), the three run in turn in `--rounds` rounds; rates are medians over
the rounds and each ratio is the median of the rounds' own ratios (a shared VM drifts within minutes). FLOPs per
sample are counted from the shapes (bench_sweep's counts): (a) (2 + configurations) forwards; (b) the exact bound:
two forwards and each configuration's suffix from its window start, each shared computation once; (c) two forwards
and one backward to the activations (no weight gradients: the matmuls once more, attention twice).

The toy part: on `jaxflow.toy_model()` and toy-world questions of every task whose clean answer is correct, the
exact indirect effect (p_restored - p_corrupt, method (b)) against attribution's estimate (method (c)): Pearson r
per sample (over its configurations) and overall, and the overlap of the two top-10 configurations.

    python scripts/bench_trace.py                          # CPU preset, float32 (~15 min on 2 cores)
    python scripts/bench_trace.py --preset gpu-7b          # 7B shape, bfloat16, on an accelerator
    python scripts/bench_trace.py --preset gpu-7b --dry-run   # its configuration and FLOP counts, no weights
    python scripts/bench_trace.py --quick                  # the tiny preset: checks the logic in seconds
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import functools
import json
import os
import sys
import tempfile
import time
import types

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_sweep  # noqa: E402

SITES = ("resid_pre", "attn_out", "mlp_out")
REGIONS = ("image", "related_image_patches", "question", "last")
CORRUPT = {"image-noise": "image", "question-noise": "question"}
EXACT_TARGET, ATTRIBUTION_TARGET = 20.0, 50.0  # issue 28: (b) and (c) over (a)


@dataclasses.dataclass(frozen=True)
class TracePreset:
    shape: str  # bench_sweep.PRESETS key
    hook_samples: int  # (a)
    exact_samples: int  # (b), a multiple of batch
    attribution_samples: int  # (c), a multiple of batch
    batch: int
    rounds: int
    window: int  # attn_out / mlp_out window (ROME: 10)
    toy_samples: int  # the correlation on the toy model
    toy_window: int
    toy_batch: int


PRESETS = {"cpu": TracePreset("cpu", 2, 8, 16, 4, 3, 10, 48, 3, 16),
           "gpu-7b": TracePreset("gpu", 2, 8, 16, 4, 1, 10, 48, 3, 16),
           "tiny": TracePreset("tiny", 1, 2, 2, 2, 2, 2, 2, 3, 2)}


@dataclasses.dataclass(frozen=True)
class Config:
    """One restoration: the clean `site` activation in `layers` at `region`'s positions."""

    site: str
    layer: int  # the window's centre
    layers: tuple[int, ...]
    region: str

    @property
    def name(self) -> str:
        return f"{self.site}/{self.region}/{self.layer}"


def configurations(num_layers: int, window: int, resid_window: int = 1) -> list[Config]:
    from jaxflow.sweep.flows import window as centred

    return [Config(site, layer, tuple(centred(layer, resid_window if site == "resid_pre" else window, num_layers)),
                   region) for site in SITES for region in REGIONS for layer in range(num_layers)]


def patches(configs: list[Config]):
    import jaxflow

    return [jaxflow.Patch(c.site, list(c.layers), c.region) for c in configs]


# ---- samples and batches ------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Group:
    """One jaxflow batch: its prepared samples (padded by repeating the first), padded length t, and the noise
    [B, t, D] float32 that `Noise` draws for it (the hook procedure reads its rows)."""

    items: list
    t: int
    offset: np.ndarray


def groups_of(model, items: list, batch: int, noise) -> list[Group]:
    from jaxflow.sweep.batching import batches, stack_inputs

    out = []
    for group, t in batches(items, batch):
        inputs, _ = stack_inputs(model, group, batch, t)
        rows = group + [group[0]] * (batch - len(group))
        out.append(Group(rows, t, np.asarray(model.noise_offset(noise, inputs, [p.inputs.regions for p in rows]))))
    return out


def prepared(model, rows: list) -> list:
    from jaxflow.sweep.batching import Prepared, prepare

    out = []
    for item in prepare(model, rows, None):
        if not isinstance(item, Prepared):
            raise ValueError(f"question {item[0].question_id} cannot be prepared: {item[1]}")
        out.append(item)
    return out


def task_rows(data: str, images: str) -> list:
    from jaxflow.inputs import gqa

    rows, errors = gqa.load_tasks(data, images)
    if errors:
        raise ValueError(f"{data}: unusable rows: {'; '.join(map(str, errors))}")
    return rows


# ---- (a): the hook procedure --------------------------------------------------------------------------------------


@contextlib.contextmanager
def hooks(hf, record: dict | None = None, restore=None, noise=None):
    """Forward hooks on transformers' decoder: `record` (site, layer) -> activation of every site and layer;
    `restore` (site, layers, positions [n] LongTensor, the recorded clean activations): those positions of the site's
    output replaced; `noise` [1, T, D]: added to the input embeddings."""
    lm = hf.model.language_model
    handles = []

    def edit(site, layer, a):
        if record is not None:
            record[site, layer] = a
        if restore is not None and restore[0] == site and layer in restore[1]:
            a = a.clone()
            a[:, restore[2]] = restore[3][site, layer][:, restore[2]]
        return a

    try:
        if noise is not None:
            def add(module, args, kwargs):
                kwargs["inputs_embeds"] = kwargs["inputs_embeds"] + noise
                return args, kwargs

            handles.append(lm.register_forward_pre_hook(add, with_kwargs=True))
        wanted = SITES if record is not None else (restore[0],) if restore is not None else ()
        layers = range(len(lm.layers)) if record is not None else restore[1] if restore is not None else ()
        for i in layers:
            layer = lm.layers[i]
            if "resid_pre" in wanted:
                handles.append(layer.register_forward_pre_hook(
                    lambda m, args, i=i: (edit("resid_pre", i, args[0]), *args[1:])))
            if "attn_out" in wanted:
                handles.append(layer.self_attn.register_forward_hook(
                    lambda m, args, o, i=i: (edit("attn_out", i, o[0]), *o[1:])))
            if "mlp_out" in wanted:
                handles.append(layer.mlp.register_forward_hook(lambda m, args, o, i=i: edit("mlp_out", i, o)))
        yield
    finally:
        for h in handles:
            h.remove()


def run_hook(hf, samples: list, offsets: list, configs: list[Config], device: str) -> dict:
    """(a) on `samples` (Prepared) with their noise rows offsets [T, D]: {p_clean [S], p_corrupt [S], token [S],
    p_restored [S, K] (NaN where the region is empty), seconds}."""
    import torch

    out = {"p_clean": [], "p_corrupt": [], "token": [], "p_restored": []}
    start = time.perf_counter()
    with torch.inference_mode():
        for item, offset in zip(samples, offsets, strict=True):
            x = item.inputs
            args = {"input_ids": torch.as_tensor(x.input_ids[None], device=device),
                    "pixel_values": torch.as_tensor(x.pixel_values, device=device, dtype=hf.dtype),
                    "logits_to_keep": 1, "use_cache": False}
            noise = torch.tensor(offset[None], device=device, dtype=hf.dtype)
            clean = {}
            with hooks(hf, record=clean):
                probs = bench_sweep._probs(hf(**args).logits[0, -1])
            token = int(probs.argmax())
            with hooks(hf, noise=noise):
                p_corrupt = float(bench_sweep._probs(hf(**args).logits[0, -1])[token])
            ps = []
            for c in configs:
                where = np.asarray(x.regions[c.region])
                if not len(where):
                    ps.append(np.nan)
                    continue
                restore = (c.site, c.layers, torch.as_tensor(where, device=device), clean)
                with hooks(hf, restore=restore, noise=noise):
                    ps.append(float(bench_sweep._probs(hf(**args).logits[0, -1])[token]))
            out["p_clean"].append(float(probs[token]))
            out["p_corrupt"].append(p_corrupt)
            out["token"].append(token)
            out["p_restored"].append(ps)
    bench_sweep._sync(device)
    return {**{k: np.asarray(v) for k, v in out.items()}, "seconds": time.perf_counter() - start}


# ---- (b), (c): jaxflow --------------------------------------------------------------------------------------------


@functools.cache
def _clean_run():
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from jaxflow.model import _forward

    @functools.partial(nnx.jit, graph=False, static_argnames=("sites",))
    def clean_run(module, inputs, last, sites):
        """The clean run: (probabilities at each row's last position [B, V] float32, site -> [L, B, T, D]): one
        forward, no full-sequence logits (only the final norm's output leaves it)."""
        lm = module.language_model
        n = len(lm.layers)
        kinds = ["hidden" if site == "resid_pre" else site for site in sites]
        collect = tuple((k, i) for k in kinds for i in range(n)) + (("normalized", 0),)
        _, arrays = _forward(module, inputs, None, collect)
        h = jnp.take_along_axis(arrays[-1], last[:, None, None], axis=1)[:, 0]  # [B, D]
        probs = jax.nn.softmax(lm.unembed(h).astype(jnp.float32), axis=-1)
        return probs, {site: jnp.stack(arrays[j * n:(j + 1) * n]) for j, site in enumerate(sites)}

    return clean_run


def _batch(model, group: Group, noise):
    """(inputs, last [B], regions, clean probs [B, V], token [B], clean activations, the noise [B, T, D])."""
    import jax.numpy as jnp

    from jaxflow.sweep.batching import stack_inputs

    inputs, lengths = stack_inputs(model, group.items, len(group.items), group.t)
    last = lengths - 1
    regions = [p.inputs.regions for p in group.items]
    probs, acts = _clean_run()(model.module, inputs, jnp.asarray(last), SITES)
    probs = np.asarray(probs)
    offset = model.noise_offset(noise, inputs, regions)
    return inputs, last, regions, probs, probs.argmax(-1), acts, offset


def _collect(tables: list[dict]) -> dict:
    return {k: np.concatenate([t[k] for t in tables]) for k in tables[0]}


def _present(group: Group, configs: list[Config]) -> np.ndarray:
    """[B, K] whether configuration k's region has positions in row b."""
    return np.asarray([[len(p.inputs.regions[c.region]) > 0 for c in configs] for p in group.items])


def run_exact(model, groups: list[Group], configs: list[Config], noise) -> dict:
    """(b): {p_clean, p_corrupt, token [S], p_restored [S, K], seconds}."""
    from jaxflow.patching import stack_patches
    from jaxflow.sweep import engine

    text = model.config.text
    tables = []
    start = time.perf_counter()
    for g in groups:
        inputs, last, regions, probs, token, acts, offset = _batch(model, g, noise)
        base = engine.base_run(model.module, inputs, last, offset)
        patch = stack_patches(patches(configs), len(g.items), g.t, text.num_layers, text.num_heads, regions)
        p, _ = engine.knockout_probs(model.module, inputs, None, last, token, patch=patch, source=acts, offset=offset,
                                     base=base)
        rows = np.arange(len(token))
        tables.append({"p_clean": probs[rows, token], "p_corrupt": np.asarray(base.probs)[rows, token], "token": token,
                       "p_restored": np.where(_present(g, configs), p.T, np.nan)})
    out = _collect(tables)
    return {**out, "seconds": time.perf_counter() - start}


def run_attribution(model, groups: list[Group], configs: list[Config], noise) -> dict:
    """(c): as run_exact, p_restored = p_corrupt + the summed attributions; also "estimate" [S, K]."""
    from jaxflow.patching import stack_patches
    from jaxflow.sweep.trace import attribution_estimate

    text = model.config.text
    tables = []
    start = time.perf_counter()
    for g in groups:
        inputs, last, regions, probs, token, acts, offset = _batch(model, g, noise)
        masks = stack_patches(patches(configs), len(g.items), g.t, text.num_layers, text.num_heads, regions)
        estimate, p_corrupt = attribution_estimate(model, inputs, offset, last, token, acts, masks)  # [K, B], [B]
        estimate = np.where(_present(g, configs), estimate.T.astype(np.float32), np.nan)
        tables.append({"p_clean": probs[np.arange(len(token)), token], "p_corrupt": p_corrupt, "token": token,
                       "p_restored": p_corrupt[:, None] + estimate, "estimate": estimate})
    out = _collect(tables)
    return {**out, "seconds": time.perf_counter() - start}


# ---- FLOPs and memory ---------------------------------------------------------------------------------------------


def flops_per_sample(cfg, item, configs: list[Config]) -> dict:
    """FLOPs of one sample (its own length, batch 1) under each method; see the module docstring."""
    from jaxflow.patching import stack_patches
    from jaxflow.sweep import engine

    text = cfg.text
    t = len(item.inputs.input_ids)
    kept = [c for c in configs if len(item.inputs.regions[c.region])]
    forward = bench_sweep.tower_flops(cfg) + bench_sweep.decoder_flops(text, t) + bench_sweep.unembed_flops(text)
    patch = stack_patches(patches(kept), 1, t, text.num_layers, text.num_heads, [item.inputs.regions])
    suffixes = bench_sweep.incremental_flops(text, engine.uncut(patch, text.num_heads), t, patch)
    attention = text.num_layers * 2 * 2 * t * t * text.num_heads * text.head_dim
    backward = bench_sweep.decoder_flops(text, t) + attention + bench_sweep.unembed_flops(text)
    return {"forward": forward, "hook": (2 + len(kept)) * forward,
            "exact_bound": 2 * forward + suffixes + len(kept) * bench_sweep.unembed_flops(text),
            "attribution": 2 * forward + backward, "configurations": len(kept), "T": t}


def compiled_memory(model, group: Group, configs: list[Config], noise) -> list[dict]:
    """What XLA allocates for each call of one batch (temporaries, arguments, outputs): the clean run, (b)'s
    incremental calls as `knockout_probs` makes them, (c)'s forward and backward."""
    import jax.numpy as jnp

    from jaxflow.model import attribution_scores
    from jaxflow.patching import stack_patches
    from jaxflow.sweep import engine

    text = model.config.text
    inputs, last, regions, _, token, acts, offset = _batch(model, group, noise)
    calls = [("clean run", _clean_run().lower(model.module, inputs, jnp.asarray(last), SITES))]
    base = engine.base_run(model.module, inputs, last, offset)
    patch = stack_patches(patches(configs), len(group.items), group.t, text.num_layers, text.num_heads, regions)
    for sel, args in engine.incremental_calls(model.module, inputs, engine.uncut(patch, text.num_heads), last, token,
                                              base=base, patch=patch, source=acts, offset=offset):
        calls.append((f"(b) {len(sel)} restorations, suffix {args[4].shape[-1]}",
                      engine.knockout_incremental.lower(*args)))
    calls.append(("(c) attribution", attribution_scores.lower(model.module, inputs, offset, jnp.asarray(last),
                                                        jnp.asarray(token), acts, SITES)))
    out = []
    for name, lowered in calls:
        m = lowered.compile().memory_analysis()
        out.append({"call": name, "temp_bytes": m.temp_size_in_bytes, "argument_bytes": m.argument_size_in_bytes,
                    "output_bytes": m.output_size_in_bytes})
    return out


# ---- the toy model ------------------------------------------------------------------------------------------------


def pearson(x, y) -> float:
    x, y = np.asarray(x, float), np.asarray(y, float)
    if x.std() == 0 or y.std() == 0:
        return float("nan")
    return float(np.corrcoef(x, y)[0, 1])


def toy_correlation(root: str, n: int, window: int, batch: int, corrupt: str, scale: float, seed: int) -> dict:
    """Attribution's estimate vs the exact indirect effect on the shipped toy model, samples whose clean top-1
    token is the gold answer (the first `n` such of toy-world questions of every task)."""
    import jaxflow
    from jaxflow.world import TASKS, generate

    model = jaxflow.toy_model()
    paths = generate(os.path.join(root, "toy-data"), -(-2 * n // len(TASKS)), seed, TASKS)
    images = os.path.join(root, "toy-data", "images")
    items = prepared(model, [r for task in TASKS for r in task_rows(paths[task], images)])
    noise = jaxflow.Noise(CORRUPT[corrupt], scale=scale, seed=seed)
    configs = configurations(model.config.text.num_layers, window)
    gold = {p.sample.question_id: model.tokenizer.encode(p.sample.answer, add_special_tokens=False) for p in items}
    kept = []
    for g in groups_of(model, items, batch, noise):  # the clean run decides which samples are kept
        _, _, _, _, token, _, _ = _batch(model, g, noise)
        kept += [p for p, tk in zip(g.items, token, strict=True) if [int(tk)] == gold[p.sample.question_id]]
    kept = list({p.sample.question_id: p for p in kept}.values())[:n]  # padding rows repeat a sample
    groups = groups_of(model, kept, batch, noise)
    exact, attribution = run_exact(model, groups, configs, noise), run_attribution(model, groups, configs, noise)
    real = len(kept)  # the last group's padding rows are dropped
    ie = (exact["p_restored"] - exact["p_corrupt"][:, None])[:real]
    est = attribution["estimate"][:real]
    per_sample, overlap = [], []
    for a, b in zip(ie, est, strict=True):
        ok = np.isfinite(a) & np.isfinite(b)
        per_sample.append(pearson(a[ok], b[ok]))
        top_a, top_b = (set(np.flatnonzero(ok)[np.argsort(-v[ok])[:10]]) for v in (a, b))
        overlap.append(len(top_a & top_b) / 10)
    ok = np.isfinite(ie) & np.isfinite(est)
    per = np.asarray(per_sample)
    return {"samples": real, "questions_tried": len(items), "configurations": len(configs), "window": window,
            "layers": model.config.text.num_layers, "pearson_overall": pearson(ie[ok], est[ok]),
            "pearson_per_sample_median": float(np.nanmedian(per)), "pearson_per_sample_mean": float(np.nanmean(per)),
            "pearson_per_sample_min": float(np.nanmin(per)), "top10_overlap_mean": float(np.mean(overlap)),
            "top10_overlap_median": float(np.median(overlap)),
            "corruption_effect_mean": float(np.mean(exact["p_clean"][:real] - exact["p_corrupt"][:real])),
            "largest_exact_effect": float(np.nanmax(np.abs(ie))),
            "agreement_p_corrupt": float(np.abs(exact["p_corrupt"] - attribution["p_corrupt"]).max())}


# ---- the dry run --------------------------------------------------------------------------------------------------


def dry_run(preset: bench_sweep.Preset, root: str, configs_of, seed: int) -> dict:
    """The preset's configuration (no weights): the transformers config, jaxflow's config from it, one prepared
    toy-world sample, its configurations and FLOPs."""
    from transformers import AutoTokenizer

    from jaxflow.config import ModelConfig
    from jaxflow.model import param_shapes

    tokenizer = AutoTokenizer.from_pretrained(bench_sweep.tokenizer_source(root))
    hf_cfg = bench_sweep.hf_config(preset, tokenizer)
    cfg = ModelConfig.from_hf(hf_cfg.to_dict())
    shell = types.SimpleNamespace(config=cfg, tokenizer=tokenizer, prompt_mode="llava-hf",
                                  default_template="vicuna_v1", processor=None)  # what `prepare` reads of a Model
    data, images = bench_sweep.toy_data(root, 1, seed)
    item = prepared(shell, task_rows(data, images))[0]
    configs = configs_of(cfg.text.num_layers)
    f = flops_per_sample(cfg, item, configs)
    params = sum(int(np.prod(s.shape)) for s in param_shapes(cfg).values())
    return {"T": f["T"], "configurations": f["configurations"], "flops_per_sample": f, "parameters": params,
            "bound_ratio_exact": f["hook"] / f["exact_bound"], "bound_ratio_attribution": f["hook"] / f["attribution"]}


# ---- main ---------------------------------------------------------------------------------------------------------


def compare(a: dict, b: dict, n: int) -> dict:
    """Max abs and relative difference of p_clean, p_corrupt and p_restored of the first n samples."""
    x = np.concatenate([a[k][:n].ravel() for k in ("p_clean", "p_corrupt", "p_restored")])
    y = np.concatenate([b[k][:n].ravel() for k in ("p_clean", "p_corrupt", "p_restored")])
    ok = np.isfinite(x) & np.isfinite(y)
    if not np.array_equal(np.isfinite(x), np.isfinite(y)):
        raise RuntimeError("the methods skip different configurations")
    d = np.abs(x[ok] - y[ok])
    return {"max_abs": float(d.max()), "max_rel": float((d / np.maximum(np.abs(x[ok]), 1e-30)).max()),
            "tokens_equal": bool(np.array_equal(a["token"][:n], b["token"][:n]))}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--quick", action="store_true", help="the tiny preset (checks the logic in seconds)")
    parser.add_argument("--dry-run", action="store_true",
                        help="build the preset's configuration and count its FLOPs, no weights, no runs")
    parser.add_argument("--corrupt", choices=sorted(CORRUPT), default="image-noise")
    parser.add_argument("--scale", type=float, default=3.0, help="noise std in units of the embeddings' std (ROME: 3)")
    parser.add_argument("--window", type=int, help="attn_out / mlp_out window (default: the preset's, ROME's 10)")
    parser.add_argument("--resid-window", type=int, default=1, help="resid_pre window (ROME: 1, one hidden state)")
    for name, what in (("hook-samples", "(a)"), ("exact-samples", "(b)"), ("attribution-samples", "(c)"),
                       ("batch", "jaxflow's batch"), ("rounds", "rounds of (a), (b), (c) in turn"),
                       ("toy-samples", "the toy correlation's samples (0: skip it)"),
                       ("toy-window", "the toy model's attn/mlp window"), ("toy-batch", "the toy model's batch")):
        parser.add_argument(f"--{name}", type=int, help=f"{what} (default: the preset's)")
    parser.add_argument("--seed", type=int, default=0, help="data and noise seed")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--torch-threads", type=int, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--abs-tol", type=float, help="fail above this max abs difference of (a) vs (b)")
    parser.add_argument("--no-memory", action="store_true", help="skip compiling the calls again for their memory")
    parser.add_argument("--workdir", help="keep the model and data here (default: a temporary folder)")
    parser.add_argument("--out", help="save the results as JSON")
    args = parser.parse_args(argv)
    if args.quick:
        args.preset = "tiny"
    trace = PRESETS[args.preset]
    trace = dataclasses.replace(trace, **{f: getattr(args, f) for f in (
        "hook_samples", "exact_samples", "attribution_samples", "batch", "rounds", "window", "toy_samples",
        "toy_window", "toy_batch") if getattr(args, f) is not None})
    for f in ("exact_samples", "attribution_samples"):
        if getattr(trace, f) % trace.batch or getattr(trace, f) < trace.batch:
            raise SystemExit(f"--{f.replace('_', '-')} {getattr(trace, f)}: a positive multiple of --batch")
    if not 0 < trace.hook_samples <= trace.exact_samples:
        raise SystemExit("--hook-samples: between 1 and --exact-samples (the samples (a) and (b) share)")
    shape = bench_sweep.PRESETS[trace.shape]
    abs_tol = args.abs_tol if args.abs_tol is not None else bench_sweep.TOLERANCE[shape.dtype][0]
    configs_of = lambda n: configurations(n, trace.window, args.resid_window)  # noqa: E731

    with contextlib.ExitStack() as stack:
        root = args.workdir or stack.enter_context(tempfile.TemporaryDirectory())
        if args.dry_run:
            t0 = time.perf_counter()
            d = dry_run(shape, os.path.join(root, "dry"), configs_of, args.seed)
            d["seconds"] = time.perf_counter() - t0
            result = {"preset": args.preset, "dry_run": d}
            f, si = d["flops_per_sample"], bench_sweep._si
            print(f"dry run ({args.preset}, {shape.dtype}): {d['parameters'] / 1e9:.2f} G parameters, T = {d['T']}, "
                  f"{d['configurations']} configurations per sample; FLOP/sample: (a) hook {si(f['hook'])}, "
                  f"(b) exact bound {si(f['exact_bound'])} ({d['bound_ratio_exact']:.1f}x fewer), "
                  f"(c) attribution {si(f['attribution'])} ({d['bound_ratio_attribution']:.1f}x fewer); "
                  f"{d['seconds']:.1f} s")
            _save(args.out, result)
            return result
        import jax
        import torch

        import jaxflow

        device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
        if args.torch_threads:
            torch.set_num_threads(args.torch_threads)
        t0 = time.perf_counter()
        hf, model = bench_sweep.build(shape, os.path.join(root, "model"), device)
        n = max(trace.exact_samples, trace.attribution_samples)
        data, images = bench_sweep.toy_data(os.path.join(root, "model"), n, args.seed)
        items = prepared(model, task_rows(data, images)[:n])
        noise = jaxflow.Noise(CORRUPT[args.corrupt], scale=args.scale, seed=args.seed)
        groups = groups_of(model, items, trace.batch, noise)
        order = [p for g in groups for p in g.items]  # (a) runs (b)'s first samples with their batch's noise
        offsets = [g.offset[i, :len(p.inputs.input_ids)] for g in groups for i, p in enumerate(g.items)]
        exact_groups, attr_groups = groups[:trace.exact_samples // trace.batch], groups[:trace.attribution_samples
                                                                                        // trace.batch]
        cfg = model.config
        configs = configs_of(cfg.text.num_layers)
        setup = time.perf_counter() - t0
        log(f"model, data and {len(items)} samples ready in {setup:.0f} s; {len(configs)} configurations per sample")

        cuda = device.startswith("cuda")
        with torch.inference_mode():  # warm-up: first-call allocations are not the method's cost
            hf(input_ids=torch.as_tensor(order[0].inputs.input_ids[None], device=device),
               pixel_values=torch.as_tensor(order[0].inputs.pixel_values, device=device, dtype=hf.dtype),
               logits_to_keep=1)
        cold_b = run_exact(model, exact_groups, configs, noise)
        log(f"(b) cold (compile included): {trace.exact_samples} samples in {cold_b['seconds']:.1f} s")
        cold_c = run_attribution(model, attr_groups, configs, noise)
        log(f"(c) cold (compile included): {trace.attribution_samples} samples in {cold_c['seconds']:.1f} s")
        rounds, peak = [], {}
        for i in range(trace.rounds):
            if cuda:
                torch.cuda.reset_peak_memory_stats()
            a = run_hook(hf, order[:trace.hook_samples], offsets[:trace.hook_samples], configs, device)
            if cuda:
                peak["a"] = torch.cuda.max_memory_allocated()
                torch.cuda.empty_cache()
            log(f"round {i + 1}: (a) hook procedure: {trace.hook_samples} samples in {a['seconds']:.1f} s")
            b = run_exact(model, exact_groups, configs, noise)
            log(f"round {i + 1}: (b) jaxflow exact: {trace.exact_samples} samples in {b['seconds']:.1f} s")
            c = run_attribution(model, attr_groups, configs, noise)
            log(f"round {i + 1}: (c) jaxflow attribution: {trace.attribution_samples} samples in {c['seconds']:.1f} s")
            rate = {"a": trace.hook_samples / a["seconds"], "b": trace.exact_samples / b["seconds"],
                    "c": trace.attribution_samples / c["seconds"]}
            rounds.append({"seconds": {"a": a["seconds"], "b": b["seconds"], "c": c["seconds"]}, "samples_per_s": rate,
                           "ratio_b_over_a": rate["b"] / rate["a"], "ratio_c_over_a": rate["c"] / rate["a"]})
        stats = jax.devices()[0].memory_stats() or {}
        peak["jaxflow"] = stats.get("peak_bytes_in_use")
        memory = [] if args.no_memory else compiled_memory(model, groups[0], configs, noise)

        toy = None
        if trace.toy_samples:
            t1 = time.perf_counter()
            toy = toy_correlation(os.path.join(root, "toy"), trace.toy_samples, trace.toy_window, trace.toy_batch,
                                  args.corrupt, args.scale, args.seed)
            toy["seconds"] = time.perf_counter() - t1

    m = trace.hook_samples
    agree = {"a_b": compare(a, b, m), "b_cold_warm": compare(cold_b, b, trace.exact_samples),
             "a_c": compare(a, c, m)}  # a_c: attribution's approximation error, not a check
    ie = b["p_restored"][:m] - b["p_corrupt"][:m, None]
    gap = (b["p_clean"][:m] - b["p_corrupt"][:m])[:, None]
    flops = [flops_per_sample(cfg, p, configs) for p in order[:trace.exact_samples]]
    mean = {k: float(np.mean([f[k] for f in flops])) for k in ("forward", "hook", "exact_bound", "attribution",
                                                                 "configurations", "T")}
    median = lambda key: float(np.median([r[key] for r in rounds]))  # noqa: E731
    rate = {k: float(np.median([r["samples_per_s"][k] for r in rounds])) for k in "abc"}
    fl = {"a": mean["hook"], "b": mean["exact_bound"], "c": mean["attribution"]}
    ratio_b, ratio_c = median("ratio_b_over_a"), median("ratio_c_over_a")
    result = {
        "preset": args.preset, "shape": dataclasses.asdict(shape), "trace": dataclasses.asdict(trace),
        "machine": bench_sweep.machine(device), "load_average": os.getloadavg(), "corrupt": args.corrupt,
        "scale": args.scale, "resid_window": args.resid_window, "configurations_per_sample": len(configs),
        "samples": {"a": m, "b": trace.exact_samples, "c": trace.attribution_samples},
        "seconds": {"setup": setup, "b_cold": cold_b["seconds"], "c_cold": cold_c["seconds"],
                    **{k: float(np.median([r["seconds"][k] for r in rounds])) for k in "abc"}},
        "rounds": rounds, "samples_per_s": rate, "ratio_b_over_a": ratio_b, "ratio_c_over_a": ratio_c,
        "flops_per_sample": mean, "achieved_flop_per_s": {k: rate[k] * fl[k] for k in "abc"},
        "flop_ratio": {"b": fl["a"] / fl["b"], "c": fl["a"] / fl["c"]},
        "fraction_of_bound": {"b": ratio_b / (fl["a"] / fl["b"]), "c": ratio_c / (fl["a"] / fl["c"])},
        "agreement": agree, "tolerance_abs": abs_tol,
        "largest_restoration": float(np.nanmax(np.abs(ie / np.where(np.abs(gap) > 0, gap, np.nan)))),
        "corruption_effect": float(np.mean(np.abs(gap))),
        "peak_memory_bytes": peak, "compiled_memory": memory, "toy": toy,
        "targets": {"b_over_a": [EXACT_TARGET, ratio_b >= EXACT_TARGET],
                    "c_over_a": [ATTRIBUTION_TARGET, ratio_c >= ATTRIBUTION_TARGET]},
    }
    report(result)
    _save(args.out, result)
    if agree["a_b"]["max_abs"] > abs_tol or not agree["a_b"]["tokens_equal"]:
        raise SystemExit(f"(a) and (b) disagree beyond abs {abs_tol}: {agree['a_b']}")
    return result


def _save(path, result):
    if path:
        with open(path, "w") as f:
            json.dump(result, f, indent=1, default=str)


def log(text: str) -> None:
    print(f"[bench_trace {time.strftime('%H:%M:%S')}] {text}", flush=True)


def report(r: dict) -> None:
    si = bench_sweep._si
    m, s, tr = r["machine"], r["shape"], r["trace"]
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores, load average {', '.join(f'{x:.2f}' for x in r['load_average'])}"
          f" at the end; jax {m['jax']} on {m['jax_device']}; torch {m['torch']} on {m['torch_device']}"
          f"{' (' + m['gpu'] + ')' if 'gpu' in m else ''}, {m['torch_threads']} threads")
    print(f"model ({r['preset']}): decoder {s['layers']} layers, hidden {s['hidden']}, intermediate "
          f"{s['intermediate']}, {s['heads']} heads, vocab {s['vocab']}; CLIP {s['vision_layers']} layers, hidden "
          f"{s['vision_hidden']}, {s['image_size']} px; {s['dtype']}; T ~ {r['flops_per_sample']['T']:.0f}")
    print(f"causal tracing: {r['corrupt']} ({r['scale']:g}x the embeddings' std); {r['configurations_per_sample']} "
          f"configurations per sample ({', '.join(SITES)} x {', '.join(REGIONS)} x every layer; window "
          f"{tr['window']} for attn_out / mlp_out, {r['resid_window']} for resid_pre)")
    rows = [("(a) hook procedure: transformers (sdpa), batch 1, one forward per configuration", "a"),
            (f"(b) jaxflow exact: incremental engine, batch {tr['batch']}", "b"),
            (f"(c) jaxflow attribution: one forward + backward, batch {tr['batch']}", "c")]
    print(f"\nsamples/s: medians over {len(r['rounds'])} rounds; x (a): medians of each round's own ratio\n")
    print(f"| method | samples | samples/s | x (a) | FLOP/sample | FLOP ratio to (a) | of the FLOP ratio | FLOP/s |\n"
          f"|{' --- |' * 8}")
    fkey = {"a": "hook", "b": "exact_bound", "c": "attribution"}
    for label, k in rows:
        rate = r["samples_per_s"][k]
        over = 1.0 if k == "a" else r[f"ratio_{k}_over_a"]
        fr = 1.0 if k == "a" else r["flop_ratio"][k]
        frac = "" if k == "a" else f"{r['fraction_of_bound'][k]:.0%}"
        print(f"| {label} | {r['samples'][k]} | {rate:.4g} | {over:.1f} | {si(r['flops_per_sample'][fkey[k]])} | "
              f"{fr:.1f} | {frac} | {si(r['achieved_flop_per_s'][k])} |")
    print("\n(b)'s FLOP/sample is the exact bound (two forwards + the configurations' suffixes from their window "
          "starts, each shared computation once); (c)'s two forwards + one backward to the activations")
    for i, x in enumerate(r["rounds"]):
        v = x["samples_per_s"]
        print(f"round {i + 1}: samples/s (a) {v['a']:.4g}, (b) {v['b']:.4g}, (c) {v['c']:.4g}: (b) "
              f"{x['ratio_b_over_a']:.1f}x, (c) {x['ratio_c_over_a']:.1f}x (a)")
    ag = r["agreement"]
    print(f"agreement (a) vs (b) (p_clean, p_corrupt, p_restored; {r['samples']['a']} samples): max abs "
          f"{ag['a_b']['max_abs']:.1e}, max rel {ag['a_b']['max_rel']:.1e}, answer tokens equal: "
          f"{ag['a_b']['tokens_equal']}; (b) cold vs warm max abs {ag['b_cold_warm']['max_abs']:.1e}; mean "
          f"|p_clean - p_corrupt| {r['corruption_effect']:.3g}, largest |restored - corrupt| / |clean - corrupt| "
          f"{r['largest_restoration']:.3g}; (c)'s approximation error vs (a): max abs {ag['a_c']['max_abs']:.2g}")
    sec = r["seconds"]
    print(f"seconds: setup {sec['setup']:.0f}, cold (compile included) (b) {sec['b_cold']:.1f}, (c) "
          f"{sec['c_cold']:.1f}; warm medians (a) {sec['a']:.1f}, (b) {sec['b']:.1f}, (c) {sec['c']:.1f}")
    peak = {k: v for k, v in r["peak_memory_bytes"].items() if v is not None}
    if peak:
        print("peak device memory: " + ", ".join(f"{k} {si(v, 'B')}" for k, v in peak.items()))
    if r["compiled_memory"]:
        print("XLA's allocation per call of one batch: " + "; ".join(
            f"{c['call']}: temp {si(c['temp_bytes'], 'B')}, arguments {si(c['argument_bytes'], 'B')}, outputs "
            f"{si(c['output_bytes'], 'B')}" for c in r["compiled_memory"]))
    t = r["toy"]
    if t:
        print(f"\ntoy model ({t['layers']} layers, window {t['window']}, {t['configurations']} configurations; "
              f"{t['samples']} samples with the clean answer correct of {t['questions_tried']} questions; mean "
              f"p_clean - p_corrupt {t['corruption_effect_mean']:.3g}, largest exact |IE| "
              f"{t['largest_exact_effect']:.3g}): attribution vs exact indirect effect: Pearson r overall "
              f"{t['pearson_overall']:.3f}, per sample median {t['pearson_per_sample_median']:.3f} (mean "
              f"{t['pearson_per_sample_mean']:.3f}, min "
              f"{t['pearson_per_sample_min']:.3f}); top-10 overlap mean {t['top10_overlap_mean']:.2f} (median "
              f"{t['top10_overlap_median']:.2f}); {t['seconds']:.0f} s")
    for key, (target, ok) in r["targets"].items():
        print(f"target {key} >= {target:g}x: {r['ratio_' + key]:.1f}x {'PASS' if ok else 'MISS'}")


if __name__ == "__main__":
    main()
