"""The study's procedure on a task file: filter by greedy answer, then knock out every flow in a
window around every layer (or read the logit lens), writing rows as each batch finishes.

The steps live in their own modules: `flows` (what is cut, where), `batching` (samples -> padded
batches), `greedy` (the correct-answer filter), `engine` (the knockout runs), `rows` (table rows),
`results` (crash-safe tables, the multi-process merge).
"""

from __future__ import annotations

import contextlib
import dataclasses
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
from jaxflow.model import Model, ModelInputs
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


@dataclasses.dataclass
class Kept:
    """One batch after the correct-answer filter, with at least one sample kept."""

    group: list[Prepared]  # the batch's samples (the padding rows beyond them repeat the first)
    t: int  # padded length
    inputs: ModelInputs  # [B, T]
    lengths: np.ndarray  # [B]
    base: engine.BaseRun  # the clean forward, greedy decoding continued it
    token: np.ndarray  # [B] the greedy answer's first token
    keep: list  # [(row, Prepared, predicted answer)]


class TaskRun:
    """One task file's run into `out`, the machinery every kind of run shares: the run lock(s), run.json (a resumed
    run must agree on `compare`), the crash-safe result and skip tables, the task file's rows (bad rows, rows
    `screen` refuses and samples `prepare` cannot build are skipped with their reasons; finished rows are not
    redone), this process's shard, the progress bar, then per length-sorted batch the clean forward and the
    correct-answer filter (`batches`); `finish` merges the process shards and summarizes. Use it as a context
    manager: leaving it releases the locks and closes the progress bar.

    flags: the run.json entries of this kind of run. table_name, columns, per_key: its results table
    (`table_name`.csv, each sample's `per_key` rows). required: the regions a sample must have. screen(sample) ->
    a reason to skip the row before it is prepared, or None. template: None for the checkpoint's."""

    def __init__(self, model: Model, data: str, out: str, *, kind: str, flags: dict, compare: Sequence[str],
                 table_name: str, columns: list[str], per_key: int, required: Sequence[str] = (),
                 limit: int | None = None, images: str | None = None, template: str | None = None,
                 max_new_tokens: int = MAX_NEW_TOKENS, image_loader=None, filter_correct: bool = True,
                 progress: bool = True, related_patches: str = "study", screen=None):
        check_region_names(required, model.config)
        self.model, self.out, self.kind = model, out, kind
        self.data = check_inputs(data, images, image_loader)
        self.template = template or model.default_template
        self.table_name, self.columns, self.per_key, self.required = table_name, columns, per_key, required
        self.limit, self.images, self.image_loader, self.screen = limit, images, image_loader, screen
        self.max_new_tokens, self.filter_correct, self.progress = max_new_tokens, filter_correct, progress
        self.related_patches, self.compare = related_patches, compare
        self.pid, self.procs = jax.process_index(), jax.process_count()
        self.shard = "" if self.procs == 1 else f".process-{self.pid}-of-{self.procs}"  # each process owns a shard
        dtype = str(model.module.language_model.embed_tokens.embedding.dtype)  # what the numbers were computed in
        self.header = run_header(model, self.data, kind=kind, **flags, template=self.template,
                                 prompt=first_prompt(self.data, self.template, model.prompt_mode),
                                 max_new_tokens=max_new_tokens, images=images, filter_correct=filter_correct,
                                 processes=self.procs, no_anyres=model.no_anyres, related_patches=related_patches,
                                 dtype=dtype)
        self.shapes: set[tuple[int, int]] = set()

    def __enter__(self) -> TaskRun:
        os.makedirs(self.out, exist_ok=True)
        shard, out = self.shard, self.out
        with contextlib.ExitStack() as stack:  # before anything in `out` is read or written
            for name in [f"run{shard}.lock"] + (["run.lock"] if shard and self.pid == 0 else []):  # 0 merges
                stack.enter_context(RunLock(out, name))
            open_run(out, self.header, compare=self.compare, name=f"run{shard}.json")
            self.skipped = Table(os.path.join(out, f"skipped{shard}.csv"), SKIP_COLUMNS, 1)
            self.table = Table(os.path.join(out, f"{self.table_name}{shard}.csv"), self.columns, self.per_key)
            self.prepared = self._prepare()
            self.compiles, _ = stack.enter_context(engine.count_compiles())
            self._stack = stack.pop_all()
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()  # the bar closes before an error propagates: the error is the last line

    def skip(self, sample, reason: str) -> None:
        self.skipped.append(sample.question_id, [skip_row(sample, reason)])

    def _prepare(self) -> list[Prepared]:
        samples, errors = gqa.load_tasks(self.data, self.images,
                                         check_images=self.images is not None and self.image_loader is None)
        if self.limit is not None:
            errors = [e for e in errors if e.row < self.limit]
        for e in errors:
            if e.question_id not in self.skipped.done:
                self.skip(e, e.reason)
        if self.limit is not None:
            samples = samples[:self.limit]
        samples = samples[self.pid::self.procs]
        todo = []
        for s in samples:
            if s.question_id in self.table.done or s.question_id in self.skipped.done:
                continue
            reason = self.screen(s) if self.screen else None
            if reason:
                self.skip(s, reason)
            else:
                todo.append(s)
        prepared = []
        for item in prepare(self.model, todo, self.template, self.image_loader, self.related_patches, self.required):
            if isinstance(item, Prepared):
                prepared.append(item)
            else:
                self.skip(*item)
        return prepared

    def batches(self, batch: int):
        """Yields a `Kept` per batch of `batch` samples that keeps any (the others' skips are recorded), under a
        progress bar."""
        bar = self._stack.enter_context(tqdm(total=len(self.prepared), unit="sample", disable=not self.progress,
                                             desc=f"{self.kind} {os.path.basename(self.data)}"))
        for group, t in batches(self.prepared, batch):
            self.shapes.add((batch, t))
            inputs, lengths = stack_inputs(self.model, group, batch, t)
            base = engine.base_run(self.model.module, inputs, np.asarray(lengths - 1))  # greedy decoding continues it
            token, keep, wrong = greedy_filter(self.model, group, inputs, max_new_tokens=self.max_new_tokens,
                                               filter_correct=self.filter_correct, prefill=base)
            for p, reason in wrong:
                self.skip(p.sample, reason)
            if keep:
                yield Kept(group, t, inputs, lengths, base, token, keep)
            bar.update(len(group))

    def finish(self) -> dict:
        """Merges the process shards (process 0, once all are done) and returns the summary: rows written, samples
        kept / skipped, skip_reasons (the most common kinds with their counts), compiled batch shapes and
        knockout_compiles, the XLA compilations of the knockout calls this run needed."""
        if self.procs > 1:  # every shard is complete: process 0 writes the merged tables
            barrier(f"jaxflow-{self.kind}-done")
            if self.pid == 0:
                merge_shards(self.out, self.table_name, self.columns, self.per_key, self.procs)
                merge_shards(self.out, "skipped", SKIP_COLUMNS, 1, self.procs)
            barrier(f"jaxflow-{self.kind}-merged")
        return {"rows": len(self.table.read()), "kept": len(self.table.done), "skipped": len(self.skipped.done),
                "skip_reasons": common_skip_reasons(self.skipped.read()),
                "compiled_shapes": sorted(self.shapes),
                "knockout_compiles": sum(self.compiles[f"jit({f.__name__})"] for f in KNOCKOUT_CALLS)}


def sweep(model: Model, data: str, out: str, *, flows: Sequence[Flow], window_size: int = 9, batch: int = 4,
          method: str = "incremental", limit: int | None = None, images: str | None = None, template: str | None = None,
          max_new_tokens: int = MAX_NEW_TOKENS, chunk: int | None = None, lens: bool = False, image_loader=None,
          filter_correct: bool = True, progress: bool = True, related_patches: str = "study") -> dict:
    """Runs the knockout sweep (or, with lens=True, the logit lens) of one task file into `out`.
    template: the prompt template (default: the checkpoint's, `Model.default_template`); run.json records it and
    the first row's rendered prompt.
    max_new_tokens: greedy-decoding limit of the correct-answer filter (an answer without EOS within it is
    skipped). A window_size of at least the model's layers warns (WindowWarning). Returns `TaskRun.finish`'s
    summary."""
    cfg = model.config
    num_layers, num_heads = cfg.text.num_layers, cfg.text.num_heads
    required = () if lens else sorted({name for f in flows for name in (f.source, f.target)})
    columns, per_key = (LENS_COLUMNS, 2 * (num_layers + 1)) if lens else (RESULT_COLUMNS, len(flows) * num_layers)
    with TaskRun(model, data, out, kind="lens" if lens else "sweep",
                 flags={"flows": [f.name for f in flows], "window": window_size, "method": method},
                 compare=RESUME_KEYS, table_name="lens" if lens else "results", columns=columns, per_key=per_key,
                 required=required, limit=limit, images=images, template=template, max_new_tokens=max_new_tokens,
                 image_loader=image_loader, filter_correct=filter_correct, progress=progress,
                 related_patches=related_patches) as task:
        if not lens:  # once the run is open: a refused run says only why
            check_window(window_size, num_layers)
        for b in task.batches(batch):
            if lens:
                _write_lens(model, task.table, task.skipped, b.base, b.lengths, b.keep)
            else:
                knock = knockout_masks(flows, b.group + [b.group[0]] * (batch - len(b.group)), b.t, num_layers,
                                       num_heads, window_size)
                p_block, top1 = engine.knockout_probs(model.module, b.inputs, knock, b.lengths - 1, b.token,
                                                      method=method, chunk=chunk, base=b.base, mesh=model.mesh)
                _write_knockouts(task.table, task.skipped, b.keep, flows, num_layers, window_size, method, b.token,
                                 np.asarray(b.base.probs), p_block, top1)
        return task.finish()


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
