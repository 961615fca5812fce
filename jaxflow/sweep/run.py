"""The study's procedure on a task file: filter by greedy answer, then knock out every flow in a
window around every layer (or read the logit lens), writing rows as each batch finishes.

Samples are sorted by length and padded to a few bucket lengths with a fixed batch size, so a
task file compiles a handful of times.
"""

from __future__ import annotations

import dataclasses
import datetime
import math
import os
import subprocess
from collections.abc import Sequence

import jax
import numpy as np
from PIL import Image
from tqdm import tqdm

from jaxflow.inputs import gqa
from jaxflow.inputs.regions import SampleInputs, build_sample, check_region_names
from jaxflow.knockout import KnockoutMasks
from jaxflow.model import Model
from jaxflow.sharding import barrier
from jaxflow.sweep import engine
from jaxflow.sweep.results import Table, open_run

STUDY_FLOWS = {
    "Image->Question": ("image", "question"),
    "Image->Last": ("image", "last"),
    "Question->Last": ("question", "last"),
    "Last->Last": ("last", "last"),
    "Related image patches->Question": ("related_image_patches", "question"),
    "Other image patches->Question": ("other_image_patches", "question"),
}

RESULT_COLUMNS = [
    # the study's columns
    "question_id", "image", "answer", "predicted_answer", "question", "block_desc", "layer",
    "base_score_first", "new_score_first", "relative_diff_first",
    # ours
    "task", "source", "target", "heads", "window_start", "window_end", "answer_token", "new_top1", "top1_changed",
    "method", "related_patches", "n_source", "n_target",  # n_*: sizes of the source / target regions (0: nothing cut)
]
LENS_COLUMNS = ["question_id", "task", "answer", "layer", "norm", "p_answer", "p_answer_capitalized",
                "p_false_option", "answer_token", "capitalized_token", "false_option_token"]
SKIP_COLUMNS = ["question_id", "task", "reason"]


@dataclasses.dataclass(frozen=True)
class Flow:
    """source -> target: target positions may not attend to source positions (in `heads`, all if None)."""

    name: str
    source: str
    target: str
    heads: tuple[int, ...] | None = None


def parse_flow(text: str) -> Flow:
    """'Image->Question', 'related_image_patches->last', 'image->last@0,1' (a head subset)."""
    spec, _, heads = text.partition("@")
    if spec in STUDY_FLOWS:
        source, target = STUDY_FLOWS[spec]
    else:
        source, sep, target = spec.partition("->")
        if not sep or not source.strip() or not target.strip():
            raise ValueError(f"--flows: {text!r} is not SOURCE->TARGET (region names, e.g. image->question)")
        source, target = (s.strip().lower().replace(" ", "_") for s in (source, target))
    head_list = tuple(int(h) for h in heads.split(",")) if heads else None
    return Flow(text, source, target, head_list)


def window(layer: int, k: int, num_layers: int) -> list[int]:
    """The study's window: layers max(0, l - k//2) .. min(L, l + ceil(k/2)) - 1."""
    return list(range(max(0, layer - k // 2), min(num_layers, layer + math.ceil(k / 2))))


@dataclasses.dataclass
class Prepared:
    sample: gqa.GQASample
    inputs: SampleInputs


def prepare(model: Model, samples: Sequence[gqa.GQASample], template: str | None, image_loader=None,
            related_patches: str = "study", required: Sequence[str] = ()):
    """Yields Prepared, or (sample, reason) for a sample that cannot be used (e.g. lacks a `required` region)."""
    for s in samples:
        try:
            if image_loader is not None:
                image = image_loader(s)
            else:
                with Image.open(s.image_path) as im:
                    image = im.convert("RGB")
            yield Prepared(s, build_sample(model.config, model.tokenizer, image, s.question, mode=model.prompt_mode,
                                           template=template, boxes=s.boxes,
                                           option_spans=(s.true_option_span, s.false_option_span),
                                           object_names=s.box_names, related_patches=related_patches,
                                           settings=model.processor, required=required))
        except Exception as e:  # a bad sample is recorded with its reason; the run goes on
            yield s, f"{type(e).__name__}: {e}"


def _bucket(n: int, step: int = 32) -> int:
    return -(-n // step) * step


def batches(items: list[Prepared], batch: int, step: int = 32):
    """Length-sorted batches of exactly `batch` rows (the last padded by repeating its first row), each
    padded to a multiple of `step` tokens."""
    items = sorted(items, key=lambda p: len(p.inputs))
    for i in range(0, len(items), batch):
        group = items[i:i + batch]
        yield group, _bucket(max(len(p.inputs) for p in group), step)


def stack_inputs(model: Model, group: list[Prepared], batch: int, t: int):
    """Pads a group to [batch, t]; returns (ModelInputs, lengths [batch])."""
    rows = group + [group[0]] * (batch - len(group))
    ids = np.full((batch, t), model.tokenizer.pad_token_id or 0, np.int64)
    mask = np.zeros((batch, t), np.int64)
    for i, p in enumerate(rows):
        ids[i, : len(p.inputs)] = p.inputs.input_ids
        mask[i, : len(p.inputs)] = 1
    pv = [p.inputs.pixel_values[0] for p in rows]
    if model.config.is_next:
        crops = max(len(x) for x in pv)
        pv = [np.concatenate([x, np.zeros((crops - len(x),) + x.shape[1:], x.dtype)]) for x in pv]
    sizes = np.asarray([p.inputs.image_size for p in rows]) if model.config.is_next else None
    return model.prepare(ids, np.stack(pv), sizes, mask), mask.sum(1)


def knockout_masks(flows: Sequence[Flow], rows: list[Prepared], t: int, num_layers: int, num_heads: int, k: int):
    """KnockoutMasks [F * L, B, T]: configuration f * L + l cuts flow f in the window around layer l."""
    n = len(flows) * num_layers
    b = len(rows)
    source, target = np.zeros((n, b, t), bool), np.zeros((n, b, t), bool)
    layers, heads = np.zeros((n, num_layers), bool), np.ones((n, num_heads), bool)
    for f, flow in enumerate(flows):
        for j, p in enumerate(rows):
            regions = p.inputs.regions
            for name in (flow.source, flow.target):
                if name not in regions:
                    raise KeyError(f"region {name!r} is not defined for question {p.sample.question_id} "
                                   f"(known: {', '.join(sorted(regions))})")
            source[f * num_layers:(f + 1) * num_layers, j, regions[flow.source]] = True
            target[f * num_layers:(f + 1) * num_layers, j, regions[flow.target]] = True
        for layer in range(num_layers):
            layers[f * num_layers + layer, window(layer, k, num_layers)] = True
            if flow.heads is not None:
                heads[f * num_layers + layer] = False
                heads[f * num_layers + layer, list(flow.heads)] = True
    return KnockoutMasks(source, target, layers, heads)


def _decode_answer(tokenizer, tokens: np.ndarray) -> str:
    eos = tokenizer.eos_token_id
    out = []
    for t in tokens.tolist():
        if t == eos:
            break
        out.append(t)
    return tokenizer.decode(out, skip_special_tokens=True).strip()


def _git_commit() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                              cwd=os.path.dirname(__file__)).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def run_header(model: Model, data: str, **flags) -> dict:
    import flax
    import jax
    import transformers

    import jaxflow

    return {"model": os.path.abspath(model.path) if model.path else None, "data": os.path.abspath(data), **flags,
            "versions": {"jaxflow": getattr(jaxflow, "__version__", "0.1.0"), "jax": jax.__version__,
                         "flax": flax.__version__, "transformers": transformers.__version__},
            "git_commit": _git_commit(), "device": str(jax.local_devices()[0]),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def first_token(tokenizer, word: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if not ids:
        raise ValueError(f"{word!r} tokenizes to nothing")
    return ids[0]


def sweep(model: Model, data: str, out: str, *, flows: Sequence[Flow], window_size: int = 9, batch: int = 4,
          method: str = "incremental", limit: int | None = None, images: str | None = None, template: str | None = None,
          max_new_tokens: int = 5, chunk: int | None = None, lens: bool = False, image_loader=None,
          filter_correct: bool = True, progress: bool = True, related_patches: str = "study") -> dict:
    """Runs the knockout sweep (or, with lens=True, the logit lens) of one task file into `out`.
    Returns a summary (rows written, samples kept / skipped, compiled shapes)."""
    cfg = model.config
    num_layers, num_heads = cfg.text.num_layers, cfg.text.num_heads
    required = () if lens else sorted({name for f in flows for name in (f.source, f.target)})
    check_region_names(required, cfg)
    data = os.fspath(gqa.task_file(data))
    kind = "lens" if lens else "sweep"
    pid, procs = jax.process_index(), jax.process_count()
    shard = "" if procs == 1 else f".process-{pid}-of-{procs}"  # each process owns a disjoint shard
    header = run_header(model, data, kind=kind, flows=[f.name for f in flows], window=window_size, method=method,
                        template=template, max_new_tokens=max_new_tokens, images=images, filter_correct=filter_correct,
                        processes=procs, related_patches=related_patches)
    open_run(out, header, compare=["model", "data", "kind", "flows", "window", "method", "template", "filter_correct",
                                   "processes", "related_patches"], name=f"run{shard}.json")
    columns, per_key = (LENS_COLUMNS, 2 * (num_layers + 1)) if lens else (RESULT_COLUMNS, len(flows) * num_layers)
    table_name = "lens" if lens else "results"
    skipped = Table(os.path.join(out, f"skipped{shard}.csv"), SKIP_COLUMNS, 1)
    table = Table(os.path.join(out, f"{table_name}{shard}.csv"), columns, per_key)
    samples, errors = gqa.load_tasks(data, images, check_images=images is not None and image_loader is None)
    if limit is not None:
        errors = [e for e in errors if e.row < limit]
    for e in errors:
        if e.question_id not in skipped.done:
            skipped.append(e.question_id, [{"question_id": e.question_id, "task": e.task, "reason": e.reason}])
    if limit is not None:
        samples = samples[:limit]
    samples, errors = samples[pid::procs], errors[pid::procs]
    todo = [s for s in samples if s.question_id not in table.done and s.question_id not in skipped.done]
    prepared = []
    for item in prepare(model, todo, template, image_loader, related_patches, required):
        if isinstance(item, Prepared):
            prepared.append(item)
        else:
            s, reason = item
            skipped.append(s.question_id, [{"question_id": s.question_id, "task": s.task, "reason": reason}])
    shapes: set[tuple[int, int]] = set()
    bar = tqdm(total=len(prepared), desc=f"{kind} {os.path.basename(data)}", unit="sample", disable=not progress)
    for group, t in batches(prepared, batch):
        shapes.add((batch, t))
        inputs, lengths = stack_inputs(model, group, batch, t)
        gen = model.generate(inputs, max_new_tokens=max_new_tokens)
        base = engine.base_run(model.module, inputs, np.asarray(lengths - 1))
        token = gen.tokens[:, 0]
        keep = []
        for j, p in enumerate(group):
            predicted = _decode_answer(model.tokenizer, gen.tokens[j])
            if filter_correct and predicted.lower() != p.sample.answer.strip().lower():
                reason = f"wrong answer: predicted {predicted!r}, gold {p.sample.answer!r}"
                skipped.append(p.sample.question_id, [{"question_id": p.sample.question_id, "task": p.sample.task,
                                                       "reason": reason}])
            else:
                keep.append((j, p, predicted))
        if keep and lens:
            _write_lens(model, table, base, lengths, keep)
        elif keep:
            knock = knockout_masks(flows, group + [group[0]] * (batch - len(group)), t, num_layers, num_heads,
                                   window_size)
            p_block, top1 = engine.knockout_probs(model.module, inputs, knock, lengths - 1, token, method=method,
                                                  chunk=chunk, base=base, mesh=model.mesh)
            probs = np.asarray(base.probs)
            for j, p, predicted in keep:
                table.append(p.sample.question_id, _result_rows(model, p, predicted, flows, num_layers,
                                                                window_size, int(token[j]), float(probs[j, token[j]]),
                                                                p_block[:, j], top1[:, j], method))
        bar.update(len(group))
    bar.close()
    if procs > 1:  # every shard is complete: process 0 writes the merged tables
        barrier(f"jaxflow-{kind}-done")
        if pid == 0:
            merge_shards(out, table_name, columns, per_key, procs)
            merge_shards(out, "skipped", SKIP_COLUMNS, 1, procs)
        barrier(f"jaxflow-{kind}-merged")
    return {"rows": len(table.read()), "kept": len(table.done), "skipped": len(skipped.done),
            "compiled_shapes": sorted(shapes)}


def merge_shards(out: str, name: str, columns: list[str], per_key: int, procs: int) -> Table:
    """Merges the per-process tables into `name`.csv (rebuilt from the shards each time)."""
    path = os.path.join(out, f"{name}.csv")
    if os.path.exists(path):
        os.remove(path)
    merged = Table(path, columns, per_key)
    for pid in range(procs):
        rows = Table(os.path.join(out, f"{name}.process-{pid}-of-{procs}.csv"), columns, per_key).read()
        by_key: dict[str, list[dict]] = {}
        for r in rows:
            by_key.setdefault(r["question_id"], []).append(r)
        for key, key_rows in by_key.items():
            if key not in merged.done:
                merged.append(key, key_rows)
    return merged


def _result_rows(model, p: Prepared, predicted, flows, num_layers, k, token, p_base, p_block, top1, method):
    s = p.sample
    rows = []
    for f, flow in enumerate(flows):
        for layer in range(num_layers):
            i = f * num_layers + layer
            win = window(layer, k, num_layers)
            new = float(p_block[i])
            rows.append({
                "question_id": s.question_id, "image": s.image_file, "answer": s.answer, "predicted_answer": predicted,
                "question": s.question, "block_desc": flow.name, "layer": layer,
                "base_score_first": p_base, "new_score_first": new,
                "relative_diff_first": (new - p_base) / p_base * 100,
                "task": s.task, "source": flow.source, "target": flow.target,
                "heads": "all" if flow.heads is None else " ".join(map(str, flow.heads)),
                "window_start": win[0], "window_end": win[-1], "answer_token": token, "new_top1": int(top1[i]),
                "top1_changed": int(top1[i]) != token, "method": method, "related_patches": p.inputs.related_patches,
                "n_source": len(p.inputs.regions[flow.source]), "n_target": len(p.inputs.regions[flow.target]),
            })
    return rows


def _write_lens(model: Model, table: Table, base: engine.BaseRun, lengths, keep):
    tok = model.tokenizer
    n = base.probs.shape[0]
    words = np.zeros((n, 3), np.int64)
    has_false = np.zeros(n, bool)
    for j, p, _ in keep:
        answer = p.sample.answer.strip()
        words[j, 0] = first_token(tok, answer.lower())
        words[j, 1] = first_token(tok, answer[:1].upper() + answer[1:].lower())
        if p.sample.false_option:
            words[j, 2] = first_token(tok, p.sample.false_option.strip())
            has_false[j] = True
    lens = np.asarray(engine.logit_lens(model.module, base.hidden, np.asarray(lengths - 1), words))  # [2, L+1, B, 3]
    for j, p, _ in keep:
        rows = []
        for norm in (0, 1):
            for layer in range(lens.shape[1]):
                v = lens[norm, layer, j]
                rows.append({"question_id": p.sample.question_id, "task": p.sample.task, "answer": p.sample.answer,
                             "layer": layer, "norm": bool(norm), "p_answer": float(v[0]),
                             "p_answer_capitalized": float(v[1]),
                             "p_false_option": float(v[2]) if has_false[j] else "",
                             "answer_token": int(words[j, 0]), "capitalized_token": int(words[j, 1]),
                             "false_option_token": int(words[j, 2]) if has_false[j] else ""})
        table.append(p.sample.question_id, rows)
