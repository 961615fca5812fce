"""The study's procedure on a task file: filter by greedy answer, then knock out every flow in a
window around every layer (or read the logit lens), writing rows as each batch finishes.

The steps live in their own modules: `flows` (what is cut, where), `batching` (samples -> padded
batches), `greedy` (the correct-answer filter), `engine` (the knockout runs), `rows` (table rows),
`results` (crash-safe tables, the multi-process merge).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import subprocess
from collections.abc import Sequence

import jax
import numpy as np
from tqdm import tqdm

from jaxflow.inputs import gqa
from jaxflow.inputs.prompts import build_prompt
from jaxflow.inputs.regions import check_region_names
from jaxflow.model import Model
from jaxflow.sharding import barrier
from jaxflow.sweep import engine
from jaxflow.sweep.batching import Prepared, batches, prepare, stack_inputs
from jaxflow.sweep.flows import STUDY_FLOWS, Flow, WindowWarning, check_window, knockout_masks, parse_flow, window
from jaxflow.sweep.greedy import MAX_NEW_TOKENS, greedy_filter
from jaxflow.sweep.results import RunLock, Table, merge_shards, open_run
from jaxflow.sweep.rows import (
    LENS_COLUMNS,
    RESULT_COLUMNS,
    SKIP_COLUMNS,
    common_skip_reasons,
    knockout_nonfinite,
    lens_nonfinite,
    lens_rows,
    lens_words,
    result_rows,
    skip_row,
)

# re-exported: callers written against the single-file module keep working
__all__ = ["sweep", "run_header", "STUDY_FLOWS", "Flow", "parse_flow", "window", "knockout_masks", "Prepared",
           "prepare", "batches", "stack_inputs", "merge_shards", "RESULT_COLUMNS", "LENS_COLUMNS",
           "SKIP_COLUMNS", "WindowWarning"]

# the jitted calls whose compilations a sweep's summary counts (one per static signature)
KNOCKOUT_CALLS = (engine.knockout_incremental, engine.knockout_full)

# run.json settings a resumed run must share with the run it continues
RESUME_KEYS = ["model", "data", "kind", "flows", "window", "method", "template", "filter_correct", "max_new_tokens",
               "no_anyres", "processes", "related_patches", "dtype"]


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

    return {"model": os.path.abspath(model.path) if model.path else None, "model_source": model.metadata.get("source"),
            "data": os.path.abspath(data), **flags,
            "versions": {"jaxflow": getattr(jaxflow, "__version__", "0.1.0"), "jax": jax.__version__,
                         "flax": flax.__version__, "transformers": transformers.__version__},
            "git_commit": _git_commit(), "device": str(jax.local_devices()[0]),
            "started": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def check_inputs(data: str, images: str | None, image_loader=None) -> str:
    """What needs no model: the task file (a path or a packaged task's name; the task-file columns) and the
    image folder its rows name images in. Returns the task file's path; raises naming the bad one."""
    data = os.fspath(gqa.task_file(data))
    if image_loader is None and images is None:
        raise ValueError(f"{data}: no image folder given (--images, images=...): every row names an image")
    if image_loader is None and not os.path.isdir(images):
        raise FileNotFoundError(f"{images}: no such image folder (--images)")
    gqa.load_tasks(data, check_images=False)  # a file that is not a task file raises here
    return data


def first_prompt(data: str, template: str, mode: str) -> str | None:
    """The prompt text of the task file's first usable row (image placeholder not expanded), for run.json."""
    samples, _ = gqa.load_tasks(data, check_images=False)
    return build_prompt(samples[0].question, template, mode=mode).text if samples else None


def sweep(model: Model, data: str, out: str, *, flows: Sequence[Flow], window_size: int = 9, batch: int = 4,
          method: str = "incremental", limit: int | None = None, images: str | None = None, template: str | None = None,
          max_new_tokens: int = MAX_NEW_TOKENS, chunk: int | None = None, lens: bool = False, image_loader=None,
          filter_correct: bool = True, progress: bool = True, related_patches: str = "study") -> dict:
    """Runs the knockout sweep (or, with lens=True, the logit lens) of one task file into `out`.
    template: the prompt template (default: the checkpoint's, `Model.default_template`); run.json records it and
    the first row's rendered prompt.
    max_new_tokens: greedy-decoding limit of the correct-answer filter (an answer without EOS within it is
    skipped). A window_size of at least the model's layers warns (WindowWarning). Returns a summary: rows written,
    samples kept / skipped, skip_reasons (the most common kinds of skip reason with their counts), compiled batch
    shapes and knockout_compiles, the XLA compilations of the knockout calls this run needed."""
    cfg = model.config
    num_layers, num_heads = cfg.text.num_layers, cfg.text.num_heads
    required = () if lens else sorted({name for f in flows for name in (f.source, f.target)})
    check_region_names(required, cfg)
    data = check_inputs(data, images, image_loader)
    template = template or model.default_template
    kind = "lens" if lens else "sweep"
    pid, procs = jax.process_index(), jax.process_count()
    shard = "" if procs == 1 else f".process-{pid}-of-{procs}"  # each process owns a disjoint shard
    dtype = str(model.module.language_model.embed_tokens.embedding.dtype)  # what the numbers were computed in
    header = run_header(model, data, kind=kind, flows=[f.name for f in flows], window=window_size, method=method,
                        template=template, prompt=first_prompt(data, template, model.prompt_mode),
                        max_new_tokens=max_new_tokens, images=images, filter_correct=filter_correct,
                        processes=procs, no_anyres=model.no_anyres,
                        related_patches=related_patches, dtype=dtype)
    os.makedirs(out, exist_ok=True)
    with contextlib.ExitStack() as locks:  # before anything in `out` is read or written
        for name in [f"run{shard}.lock"] + (["run.lock"] if shard and pid == 0 else []):  # 0 writes the merge
            locks.enter_context(RunLock(out, name))
        open_run(out, header, compare=RESUME_KEYS, name=f"run{shard}.json")
        if not lens:  # once the run is open: a refused run says only why
            check_window(window_size, num_layers)
        columns, per_key = (LENS_COLUMNS, 2 * (num_layers + 1)) if lens else (RESULT_COLUMNS, len(flows) * num_layers)
        table_name = "lens" if lens else "results"
        skipped = Table(os.path.join(out, f"skipped{shard}.csv"), SKIP_COLUMNS, 1)
        table = Table(os.path.join(out, f"{table_name}{shard}.csv"), columns, per_key)
        samples, errors = gqa.load_tasks(data, images, check_images=images is not None and image_loader is None)
        if limit is not None:
            errors = [e for e in errors if e.row < limit]
        for e in errors:
            if e.question_id not in skipped.done:
                skipped.append(e.question_id, [skip_row(e, e.reason)])
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
                skipped.append(s.question_id, [skip_row(s, reason)])
        shapes: set[tuple[int, int]] = set()
        compiles, _ = locks.enter_context(engine.count_compiles())
        with tqdm(total=len(prepared), desc=f"{kind} {os.path.basename(data)}", unit="sample",
                  disable=not progress) as bar:  # closed before an error propagates: the error is the last line
            for group, t in batches(prepared, batch):
                shapes.add((batch, t))
                inputs, lengths = stack_inputs(model, group, batch, t)
                base = engine.base_run(model.module, inputs, np.asarray(lengths - 1))  # greedy decoding continues it
                token, keep, wrong = greedy_filter(model, group, inputs, max_new_tokens=max_new_tokens,
                                                   filter_correct=filter_correct, prefill=base)
                for p, reason in wrong:
                    skipped.append(p.sample.question_id, [skip_row(p.sample, reason)])
                if keep and lens:
                    _write_lens(model, table, skipped, base, lengths, keep)
                elif keep:
                    knock = knockout_masks(flows, group + [group[0]] * (batch - len(group)), t, num_layers, num_heads,
                                           window_size)
                    p_block, top1 = engine.knockout_probs(model.module, inputs, knock, lengths - 1, token,
                                                          method=method, chunk=chunk, base=base, mesh=model.mesh)
                    _write_knockouts(table, skipped, keep, flows, num_layers, window_size, method, token,
                                     np.asarray(base.probs), p_block, top1)
                bar.update(len(group))
        if procs > 1:  # every shard is complete: process 0 writes the merged tables
            barrier(f"jaxflow-{kind}-done")
            if pid == 0:
                merge_shards(out, table_name, columns, per_key, procs)
                merge_shards(out, "skipped", SKIP_COLUMNS, 1, procs)
            barrier(f"jaxflow-{kind}-merged")
        return {"rows": len(table.read()), "kept": len(table.done), "skipped": len(skipped.done),
                "skip_reasons": common_skip_reasons(skipped.read()),
                "compiled_shapes": sorted(shapes),
                "knockout_compiles": sum(compiles[f"jit({f.__name__})"] for f in KNOCKOUT_CALLS)}


def _write_knockouts(table: Table, skipped: Table, keep, flows, num_layers: int, k: int, method: str, token, probs,
                     p_block, top1):
    """Each kept sample's rows, or its skip when a number is not finite. token [B], probs [B, V] (uncut),
    p_block, top1 [F * L, B]."""
    for j, p, predicted in keep:
        p_base = float(probs[j, token[j]])
        untrusted = knockout_nonfinite(flows, num_layers, p_base, p_block[:, j])
        if untrusted:  # the whole sample: a table key owns all its configurations
            skipped.append(p.sample.question_id, [skip_row(p.sample, untrusted)])
        else:
            table.append(p.sample.question_id, result_rows(p, predicted, flows, num_layers, k, int(token[j]), p_base,
                                                           p_block[:, j], top1[:, j], method))


def _write_lens(model: Model, table: Table, skipped: Table, base: engine.BaseRun, lengths, keep):
    words, has_false = lens_words(model.tokenizer, keep, base.probs.shape[0])
    lens = np.asarray(engine.logit_lens(model.module, base.hidden, np.asarray(lengths - 1), words))  # [2, L+1, B, 3]
    for j, p, _ in keep:
        untrusted = lens_nonfinite(lens[:, :, j], bool(has_false[j]))
        if untrusted:
            skipped.append(p.sample.question_id, [skip_row(p.sample, untrusted)])
        else:
            table.append(p.sample.question_id, lens_rows(p, lens[:, :, j], words[j], bool(has_false[j])))
