"""`jaxflow export --study`: sweep results as the study's own CSV files, so its plotting scripts
(vil/merge_lineplot.py) read them unchanged. `jaxflow export --tracing FILE`: causal-tracing results
(`jaxflow trace`) as one CSV of means with 95% confidence intervals (`TRACING_COLUMNS`, `export_tracing`).

The study writes one CSV per (model, task, flow):
`output/information_flow/{model}/{task}/val/{flow}/{dataset}_window{k}_{flow}.csv` where
- {model} is the checkpoint's directory name with '-' and '.' as '_' (llava-v1.5-7b -> llava_v1_5_7b),
- {dataset} is the task file's stem and {task} its last '_'-separated part,
- {flow} is the flow's name with ' ' as '_' and '->' as '___', plus '_noHD_noPad' for a LLaVA-NeXT model
  run without anyres;
and flow names are its region names ("Image Central Object->Question" for the related image patches).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
from collections.abc import Collection, Iterable, Sequence

from jaxflow.inputs import gqa

STUDY_COLUMNS = ["question_id", "image", "goden answer", "predicted answer", "question", "block_desc", "layer",
                 "base_score_first", "new_score_first", "relative diff first"]  # "goden" sic

# jaxflow region -> the study's name for it (InformationFlow.py's block descriptions)
STUDY_REGIONS = {
    "image": "Image",
    "question": "Question",
    "last": "Last",
    "true_option": "True Option",
    "false_option": "False Option",
    "question_without_options": "Question without Options",
    "related_image_patches": "Image Central Object",
    "other_image_patches": "Image Without Central Object",
}

# packaged task -> the stem of the study's file it is a byte-identical copy of (jaxflow/data/gqa_tasks/README.md)
STUDY_TASK_FILES = {
    "ChooseAttr": "GQA_val_correct_question_with_choose_ChooseAttr",
    "ChooseCat": "GQA_val_correct_question_with_categoryThatThisChoose_objThisChoose_ChooseCat",
    "ChooseRel": "GQA_val_correct_question_with_relChooser_ChooseRel",
    "CompareAttr": "GQA_val_correct_question_with_twoCommon_CompareAttr",
    "LogicalObj": "GQA_val_correct_question_with_existThatOr_LogicalObj",
    "QueryAttr": "GQA_val_correct_question_with_positionQuery_QueryAttr",
}


class ExportError(ValueError):
    """A run directory that cannot be exported, named in the message."""


def block_desc(row: dict) -> str:
    """The study's name of a results row's flow; a flow it has no name for (a head subset, a region it lacks)
    keeps jaxflow's name."""
    source, target = STUDY_REGIONS.get(row["source"]), STUDY_REGIONS.get(row["target"])
    if row["heads"] == "all" and source and target:
        return f"{source}->{target}"
    return row["block_desc"]


def save_name(desc: str, no_anyres: bool = False) -> str:
    return desc.replace(" ", "_").replace("->", "___") + ("_noHD_noPad" if no_anyres else "")


def model_name(path: str) -> str:
    """The study's model name of a checkpoint path: LLaVA's get_model_name_from_path, '-' and '.' as '_'."""
    parts = path.rstrip("/").split("/")
    name = parts[-2] + "_" + parts[-1] if parts[-1].startswith("checkpoint-") and len(parts) > 1 else parts[-1]
    return name.replace("-", "_").replace(".", "_")


def _sha256(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def dataset_stem(data: str) -> str:
    """The study's stem of a task file: its own file name for the packaged tasks (also for a byte-identical
    copy), the file's stem otherwise."""
    stem = os.path.splitext(os.path.basename(data))[0]
    packaged = {_sha256(str(gqa.TASK_DIR / f"{task}.csv")): study for task, study in STUDY_TASK_FILES.items()}
    if os.path.isfile(data):
        return packaged.get(_sha256(data), stem)
    if os.path.dirname(os.path.abspath(data)) == str(gqa.TASK_DIR) and stem in STUDY_TASK_FILES:
        return STUDY_TASK_FILES[stem]
    return stem


def _source_of(run: dict) -> str:
    """The checkpoint a run's model was converted from (jaxflow.json `source`), else the model directory."""
    source = run.get("model_source")
    if not source and run.get("model"):
        try:
            with open(os.path.join(run["model"], "jaxflow.json")) as f:
                source = json.load(f).get("source")
        except (OSError, ValueError):
            source = None
    return source or run.get("model") or ""


def find_runs(paths: Iterable[str], kinds: Collection[str] = ("sweep",)) -> list[str]:
    """Result directories in or under `paths` whose run.json has one of `kinds` ("sweep": knockout sweeps,
    "lens": logit lens)."""
    found = []
    for path in paths:
        if not os.path.isdir(path):
            raise ExportError(f"{path}: not a directory")
        for root, dirs, files in os.walk(path):
            dirs.sort()
            if "run.json" in files:
                with open(os.path.join(root, "run.json")) as f:
                    if json.load(f).get("kind") in kinds:
                        found.append(root)
    return found


def _question_order(data: str) -> dict[str, int]:
    if not os.path.isfile(data):
        return {}
    with open(data, newline="", encoding="utf-8-sig") as f:
        return {r["question_id"]: i for i, r in enumerate(csv.DictReader(f))}


def study_files(run_dir: str, model: str | None = None) -> dict[str, list[dict]]:
    """Relative path under the study's `output/` folder -> rows (STUDY_COLUMNS), for one sweep directory."""
    with open(os.path.join(run_dir, "run.json")) as f:
        run = json.load(f)
    if run.get("kind") != "sweep":
        raise ExportError(f"{run_dir}: not a knockout sweep (kind {run.get('kind')!r})")
    if not run.get("filter_correct", True):
        raise ExportError(f"{run_dir}: run with --keep-incorrect; the study's files hold only correctly answered "
                          "samples")
    results = os.path.join(run_dir, "results.csv")
    if not os.path.isfile(results):
        raise ExportError(f"{results}: missing (a multi-process run writes it when every process is done)")
    stem = dataset_stem(run["data"])
    task, model = stem.split("_")[-1], model or model_name(_source_of(run))
    order = _question_order(run["data"])
    with open(results, newline="") as f:
        rows = list(csv.DictReader(f))
    rows.sort(key=lambda r: order.get(r["question_id"], len(order)))  # the file's order; stable within a sample
    out: dict[str, list[dict]] = {}
    for r in rows:
        desc = block_desc(r)
        name = save_name(desc, bool(run.get("no_anyres")))
        path = f"information_flow/{model}/{task}/val/{name}/{stem}_window{run['window']}_{name}.csv"
        out.setdefault(path, []).append({
            "question_id": r["question_id"], "image": r["image"], "goden answer": r["answer"],
            "predicted answer": r["predicted_answer"].strip().lower(), "question": r["question"],
            "block_desc": desc, "layer": r["layer"], "base_score_first": r["base_score_first"],
            "new_score_first": r["new_score_first"], "relative diff first": r["relative_diff_first"]})
    return out


def export_study(out: str, run_dirs: Sequence[str], model: str | None = None) -> list[str]:
    """Writes the study's CSV files of every sweep in or under `run_dirs` into `out`/output/...; returns their
    paths. Two runs that map onto the same file are an error."""
    runs = find_runs(run_dirs)
    if not runs:
        raise ExportError(f"no knockout sweep results (run.json with kind 'sweep') under {', '.join(run_dirs)}")
    files: dict[str, tuple[str, list[dict]]] = {}
    for run_dir in runs:
        for rel, rows in study_files(run_dir, model).items():
            if rel in files:
                raise ExportError(f"{run_dir} and {files[rel][0]} both give {rel}")
            files[rel] = (run_dir, rows)
    written = []
    for rel, (_, rows) in sorted(files.items()):
        path = os.path.join(out, "output", rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path + ".tmp", "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=STUDY_COLUMNS, lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        os.replace(path + ".tmp", path)
        written.append(path)
    return written


# one row per (run directory, site, region, layer): the mean indirect effect p_restored - p_corrupt over the run's
# samples whose region is not empty, its 95% CI (normal approximation: mean -+ 1.96 standard errors), the sample
# count, and the run's mean p_clean and p_corrupt
TRACING_COLUMNS = ["run", "model", "data", "task", "corrupt", "method", "site", "region", "layer", "window_layers", "n",
                   "mean", "ci_low", "ci_high", "mean_p_clean", "mean_p_corrupt"]


def export_tracing(path: str, run_dirs: Sequence[str]) -> list[str]:
    """Writes the tracing results of every trace run in or under `run_dirs` into the CSV file `path`
    (TRACING_COLUMNS); returns [path]."""
    from jaxflow.sweep.plots import trace_stats

    runs = find_runs(run_dirs, kinds=("trace",))
    if not runs:
        raise ExportError(f"no tracing results (run.json with kind 'trace') under {', '.join(run_dirs)}")
    out = []
    for run_dir in runs:
        with open(os.path.join(run_dir, "run.json")) as f:
            run = json.load(f)
        table = os.path.join(run_dir, "tracing.csv")
        if not os.path.isfile(table):
            raise ExportError(f"{table}: missing (a multi-process run writes it when every process is done)")
        with open(table, newline="") as f:
            rows = list(csv.DictReader(f))
        spans, base = {}, {}  # (site, layer) -> the restored window; question_id -> (p_clean, p_corrupt)
        for r in rows:
            spans[(r["site"], r["layer"])] = r["window_layers"]
            base[r["question_id"]] = (float(r["p_clean"]), float(r["p_corrupt"]))
        clean, corrupt = (sum(v[i] for v in base.values()) / max(1, len(base)) for i in (0, 1))
        for (task, corruption, method), sites in sorted(trace_stats(rows).items()):
            for site, regions in sites.items():
                for region, (layers, mean, ci, n) in regions.items():
                    out += [{"run": run_dir, "model": _source_of(run), "data": run["data"], "task": task,
                             "corrupt": corruption, "method": method, "site": site, "region": region,
                             "layer": int(layer), "window_layers": spans[(site, str(layer))], "n": n, "mean": float(m),
                             "ci_low": float(m - c), "ci_high": float(m + c), "mean_p_clean": clean,
                             "mean_p_corrupt": corrupt}
                            for layer, m, c in zip(layers, mean, ci, strict=True)]
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path + ".tmp", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=TRACING_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(out)
    os.replace(path + ".tmp", path)
    return [path]
