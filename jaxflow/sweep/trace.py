"""Causal tracing (ROME, Meng et al. 2022; on LLaVA, Basu et al. 2024) of a task file: where is the information that
decides the answer stored?

For every kept sample (the clean greedy answer correct, as the sweep keeps them): p_clean, the probability of the
answer's first token at the last position in the clean run; p_corrupt, the same in the corrupted run:
- `image-noise` / `question-noise`: Gaussian noise of `noise_scale` (ROME's 3) x the modality's embedding std
  (`Model.embedding_std`) added to the image / question embeddings, drawn per sample from `sample_seed`;
- `counterfactual`: the row's counterfactual image (task-file column `counterfactual_image`) with the same question.
Then, per (site, layer window, region), the corrupted run with the clean run's activations restored at that site in
the window's layers at the region's positions: p_restored, and the indirect effect p_restored - p_corrupt.
Windows: `resid_pre` restores one layer (ROME restores one hidden state); `attn_out` and `mlp_out` restore
`window_size` layers centred on each layer (ROME's 10), clipped at the ends as the sweep's window.

Method `exact` runs the restorations as activation patches on the sweep's engine (the corrupted run's cache, exact
recomputation of only the suffix a patch changes, configurations vmapped, grouped and chunked like knockouts);
`attribution` estimates p_restored = p_corrupt + the sum over the configuration's layers and positions of
(a_clean - a_corrupt) . dp/da_corrupt, from one forward and one backward per batch (`attribution_scores`).

Skipped samples (skipped.csv, with the reason): those the sweep skips; `counterfactual` rows without a counterfactual
image, or whose counterfactual image is missing or gives another token sequence; samples whose corruption did not
lower the answer's probability (p_corrupt >= p_clean: nothing to restore); non-finite probabilities. A region a
sample has but that is empty (no related image patch) restores nothing: its rows are written with n_positions 0 and
p_restored, indirect_effect left empty.
"""

from __future__ import annotations

import csv
import os
import zlib
from collections.abc import Sequence

import jax.numpy as jnp
import numpy as np
from PIL import Image

from jaxflow import sharding
from jaxflow.inputs import gqa
from jaxflow.inputs.regions import REGIONS
from jaxflow.model import Model, attribution_scores
from jaxflow.patching import SITES, Noise, Patch, noise_offset, stack_patches
from jaxflow.sweep import engine
from jaxflow.sweep.batching import Prepared, prepare, stack_inputs
from jaxflow.sweep.flows import check_window, window
from jaxflow.sweep.greedy import MAX_NEW_TOKENS
from jaxflow.sweep.rows import NONFINITE, spans
from jaxflow.sweep.run import TaskRun

CORRUPTIONS = {"image-noise": "image", "question-noise": "question", "counterfactual": None}  # -> the noised region
TRACE_SITES = ("resid_pre", "attn_out", "mlp_out")
TRACE_REGIONS = ("image", "related_image_patches", "other_image_patches", "question", "last")
METHODS = ("exact", "attribution")
WINDOW = 10  # ROME's window for attn_out / mlp_out

TRACE_COLUMNS = [
    "question_id", "task", "answer", "predicted_answer", "corrupt", "method",
    "site", "layer", "window_layers", "window_start", "window_end", "region", "n_positions",  # what was restored
    "answer_token", "p_clean", "p_corrupt", "corrupt_top1", "p_restored", "indirect_effect",
    "noise_seed", "counterfactual_image",  # what the corruption was
]

# run.json settings a resumed trace must share with the run it continues
RESUME_KEYS = ["model", "data", "kind", "corrupt", "sites", "window", "regions", "method", "noise_scale", "noise_seed",
               "template", "filter_correct", "max_new_tokens", "no_anyres", "processes", "related_patches", "dtype"]


def site_window(site: str, window_size: int) -> int:
    """Layers one configuration restores: one for resid_pre, `window_size` for attn_out and mlp_out."""
    return 1 if site == "resid_pre" else window_size


def sample_seed(question_id: str, seed: int) -> int:
    """The noise seed of one sample: CRC-32 of '<seed>:<question_id>' (the same sample, the same noise, in any
    batch, process or resumed run)."""
    return zlib.crc32(f"{seed}:{question_id}".encode())


def check_trace(corrupt: str, sites: Sequence[str], regions: Sequence[str], method: str, data: str | None = None):
    """ValueError naming the argument when a corruption, site, region or method is unknown, or (data: the task
    file) when --corrupt counterfactual meets a task file without a counterfactual_image column."""
    if corrupt not in CORRUPTIONS:
        raise ValueError(f"--corrupt: {corrupt!r} is not one of {', '.join(CORRUPTIONS)}")
    for flag, given, known in (("--sites", sites, TRACE_SITES), ("--regions", regions, REGIONS)):
        bad = [x for x in given if x not in known]
        if bad or not given:
            raise ValueError(f"{flag}: {', '.join(map(repr, bad)) or 'none given'}; expected some of "
                             f"{', '.join(known)}")
    if method not in METHODS:
        raise ValueError(f"--method: {method!r} is not one of {', '.join(METHODS)}")
    if corrupt == "counterfactual" and data is not None:
        path = gqa.task_file(data)
        with open(path, newline="", encoding="utf-8-sig") as f:
            header = next(csv.reader(f), [])
        if "counterfactual_image" not in header:
            raise ValueError(f"{path}: --corrupt counterfactual needs a counterfactual_image column (each row's "
                             "minimal-pair image id); this task file has none")


def _screen(sample) -> str | None:
    """Why a counterfactual trace cannot use this row before it is prepared (None: it can)."""
    return None if sample.counterfactual_path else "no counterfactual image: the row's counterfactual_image is empty"


def _open_counterfactual(sample) -> Image.Image:
    if not os.path.isfile(sample.counterfactual_path):
        raise FileNotFoundError("file not found")
    with Image.open(sample.counterfactual_path) as im:
        return im.convert("RGB")


def counterfactual_inputs(model: Model, rows, batch: int, t: int, template: str, related_patches: str):
    """The corrupted inputs of a batch's rows (Prepared, padding included): each row's counterfactual image with its
    question, [B, T]; and {row: reason} for the rows whose counterfactual cannot be used (those keep their clean
    inputs, and are not written)."""
    bad, corrupted = {}, []
    for j, item in enumerate(prepare(model, [p.sample for p in rows], template, _open_counterfactual,
                                     related_patches)):
        p = rows[j]
        if not isinstance(item, Prepared):
            bad[j] = f"counterfactual image {p.sample.counterfactual_path}: {item[1]}"
        elif not np.array_equal(item.inputs.input_ids, p.inputs.input_ids):
            bad[j] = (f"counterfactual image gives {len(item.inputs)} positions, the clean image {len(p.inputs)} "
                      "(or other tokens): restoring needs the same positions")
        corrupted.append(p if j in bad else item)
    inputs, _ = stack_inputs(model, corrupted, batch, t)
    return inputs, bad


def noise_offsets(model: Model, rows, inputs, lengths, region: str, scale: float, seed: int):
    """What the noise adds to the batch's input embeddings, [B, T, D] float32: per row, the `Noise` on its `region`
    with its `sample_seed`, drawn at the row's own length (as `Model.logits(sample, noise=...)` draws it), then
    padded. Returns (offset, seeds [B])."""
    index = np.asarray(inputs.feature_index)  # [B, T]
    t, d = index.shape[1], model.config.text.hidden_size
    parts, seeds = [], []
    for j, p in enumerate(rows):
        n = int(lengths[j])
        seeds.append(sample_seed(p.sample.question_id, seed))
        noise = Noise(p.inputs.regions[region], scale, seeds[-1])
        parts.append(jnp.pad(noise_offset(noise, index[j:j + 1, :n], model.embedding_std, d), ((0, 0), (0, t - n),
                                                                                                 (0, 0))))
    return sharding.replicate(jnp.concatenate(parts), model.mesh), seeds


def configurations(sites: Sequence[str], regions: Sequence[str], num_layers: int) -> list[tuple[str, int, str]]:
    """(site, layer, region) of each configuration, in the table's order: (s * L + l) * R + r."""
    return [(site, layer, region) for site in sites for layer in range(num_layers) for region in regions]


def restore_patches(configs, num_layers: int, window_size: int) -> list[Patch]:
    """Per configuration, the restoration: its site in the window around its layer, at its region."""
    return [Patch(site, window(layer, site_window(site, window_size), num_layers), region)
            for site, layer, region in configs]


def attribution_estimate(model: Model, target, offset, last, token, clean: dict, patch):
    """Attribution patching's estimate of p_restored - p_corrupt, [K, B] float64: the sum of (a_clean - a_corrupt) .
    dp/da_corrupt over each configuration's layers and positions (patch: PatchMasks [K, ...]); and p_corrupt [B]
    float32, the target run's probability of `token` (from the same forward)."""
    sites = tuple(clean)
    scores, p = attribution_scores(model.module, target, offset,
                                   *sharding.replicate((jnp.asarray(last), jnp.asarray(token)), model.mesh), clean,
                                   sites)  # site -> [B, L, T]
    site, layers, positions = (np.asarray(a) for a in (patch.site, patch.layers, patch.positions))
    est = np.zeros(positions.shape[:2], np.float64)  # [K, B]
    for name in sites:
        k = site == SITES.index(name)
        est[k] = np.einsum("kl,kbt,blt->kb", layers[k], positions[k], np.asarray(scores[name], np.float64))
    return est, np.asarray(p)


def trace(model: Model, data: str, out: str, *, corrupt: str, sites: Sequence[str] = TRACE_SITES,
          regions: Sequence[str] = TRACE_REGIONS, window_size: int = WINDOW, method: str = "exact", batch: int = 4,
          limit: int | None = None, images: str | None = None, template: str | None = None,
          max_new_tokens: int = MAX_NEW_TOKENS, chunk: int | None = None, filter_correct: bool = True,
          progress: bool = True, related_patches: str = "study", noise_scale: float = 3.0,
          noise_seed: int = 0) -> dict:
    """Causal tracing of one task file into `out` (tracing.csv, skipped.csv, run.json; see the module docstring).
    Arguments as `jaxflow.sweep.run.sweep`'s; chunk bounds the configurations per compiled call. Returns
    `TaskRun.finish`'s summary."""
    sites, regions = list(sites), list(regions)
    check_trace(corrupt, sites, regions, method, data)
    num_layers = model.config.text.num_layers
    noised = CORRUPTIONS[corrupt]
    noise = {"noise_scale": noise_scale, "noise_seed": noise_seed} if noised else {"noise_scale": None,
                                                                                   "noise_seed": None}
    configs = configurations(sites, regions, num_layers)
    patches = restore_patches(configs, num_layers, window_size)
    with TaskRun(model, data, out, kind="trace",
                 flags={"corrupt": corrupt, "sites": sites, "window": window_size, "regions": regions,
                        "method": method, **noise},
                 compare=RESUME_KEYS, table_name="tracing", columns=TRACE_COLUMNS, per_key=len(patches),
                 required=sorted(set(regions) | ({noised} if noised else set())), limit=limit, images=images,
                 template=template, max_new_tokens=max_new_tokens, filter_correct=filter_correct, progress=progress,
                 related_patches=related_patches, screen=None if noised else _screen) as task:
        if set(sites) - {"resid_pre"}:  # once the run is open: a refused run says only why
            check_window(window_size, num_layers)
        for b in task.batches(batch):
            rows = b.group + [b.group[0]] * (batch - len(b.group))
            last = b.lengths - 1
            seeds, bad, offset, target = [None] * batch, {}, None, b.inputs
            if noised:
                offset, seeds = noise_offsets(model, rows, b.inputs, b.lengths, noised, noise_scale, noise_seed)
            else:
                target, bad = counterfactual_inputs(model, rows, batch, b.t, task.template, related_patches)
            corrupted = engine.base_run(model.module, target, last, offset)  # the target every restoration edits
            patch = stack_patches(patches, batch, b.t, num_layers, model.config.text.num_heads,
                                  [p.inputs.regions for p in rows])
            clean = model.activations(b.inputs, tuple(sites))  # site -> [L, B, T, D]
            p_corrupt = np.asarray(corrupted.probs)[np.arange(batch), b.token]  # [B]
            if method == "exact":
                p_restored, _ = engine.knockout_probs(model.module, target, None, last, b.token, chunk=chunk,
                                                      base=corrupted, mesh=model.mesh, patch=patch, source=clean,
                                                      offset=offset)  # [K, B]
            else:
                est, _ = attribution_estimate(model, target, offset, last, b.token, clean, patch)
                p_restored = (est + p_corrupt[None]).astype(np.float32)
            sizes = np.asarray(patch.positions).sum(-1)  # [K, B]
            p_clean = np.asarray(b.base.probs)[np.arange(batch), b.token]
            top1 = np.asarray(corrupted.probs).argmax(-1)
            for j, p, predicted in b.keep:
                why = bad.get(j) or _untrusted(p_clean[j], p_corrupt[j], p_restored[:, j], sizes[:, j])
                if why:
                    task.skip(p.sample, why)
                    continue
                task.table.append(p.sample.question_id, trace_rows(
                    p, predicted, configs, patches, corrupt, method, int(b.token[j]), float(p_clean[j]),
                    float(p_corrupt[j]), int(top1[j]), p_restored[:, j], sizes[:, j], seeds[j]))
        return task.finish()


def _untrusted(p_clean: float, p_corrupt: float, p_restored, sizes) -> str | None:
    """Why a kept sample's trace is not written (None: it is)."""
    if not (np.isfinite(p_clean) and np.isfinite(p_corrupt)):
        return f"non-finite clean or corrupted probability ({p_clean}, {p_corrupt}): {NONFINITE}"
    if p_corrupt >= p_clean:
        return (f"corruption did not lower the answer's probability (clean {p_clean:.4g}, corrupted {p_corrupt:.4g}): "
                "nothing to restore")
    bad = ~np.isfinite(p_restored) & (sizes > 0)
    if bad.any():
        return f"non-finite restored probability in {int(bad.sum())} of {len(bad)} configurations: {NONFINITE}"
    return None


def trace_rows(p, predicted: str, configs, patches: Sequence[Patch], corrupt: str, method: str, token: int,
               p_clean: float, p_corrupt: float, top1: int, p_restored, sizes, seed: int | None) -> list[dict]:
    """One sample's rows, one per configuration k (`configurations`, `restore_patches`); p_restored, sizes [K]."""
    rows = []
    for (site, layer, region), patch, restored, n in zip(configs, patches, p_restored, sizes, strict=True):
        restored = float(restored) if n else ""  # an empty region restores nothing
        rows.append({
            "question_id": p.sample.question_id, "task": p.sample.task, "answer": p.sample.answer,
            "predicted_answer": predicted, "corrupt": corrupt, "method": method, "site": site, "layer": layer,
            "window_layers": spans(patch.layers), "window_start": patch.layers[0], "window_end": patch.layers[-1],
            "region": region, "n_positions": int(n), "answer_token": token, "p_clean": p_clean,
            "p_corrupt": p_corrupt, "corrupt_top1": top1, "p_restored": restored,
            "indirect_effect": restored - p_corrupt if n else "",
            "noise_seed": "" if seed is None else seed, "counterfactual_image": p.sample.counterfactual_image or ""})
    return rows
