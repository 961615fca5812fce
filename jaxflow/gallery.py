"""The report's gallery: a few recorded samples of each sweep, each shown as pictures on its own image.

Per sample (`sample_item`): the image with its boxes and related patches, the attention from the last position
onto the image layer by layer, the patch sweep (each image patch cut from the last position in every layer), and
the sample's own flow curves from results.csv. The model, task file, images and prompt settings come from the
run's run.json, so `jaxflow report` needs nothing but the run directories (and the model they name).
"""

from __future__ import annotations

import csv
import json
import os
from collections import defaultdict
from collections.abc import Sequence

from jaxflow import analysis, plot
from jaxflow.inputs import gqa
from jaxflow.model import Model, load
from jaxflow.report import GalleryItem
from jaxflow.sample import Sample
from jaxflow.sweep.export import find_runs


def flow_figure(rows: Sequence[dict], title: str):
    """One sample's relative change (%) per layer, one line per flow (its results.csv rows)."""
    from matplotlib.figure import Figure

    by_flow = defaultdict(dict)
    for r in rows:
        by_flow[r["block_desc"]][int(r["layer"])] = float(r["relative_diff_first"])
    fig = Figure(figsize=(4.6, 3.2), layout="constrained")
    ax = fig.add_subplot()
    for flow, values in by_flow.items():
        layers = sorted(values)
        ax.plot(layers, [values[layer] for layer in layers], marker=".", label=flow)
    ax.axhline(0, color="grey", linewidth=0.6)
    ax.set_xlabel("layer (window centre)")
    ax.set_ylabel("change of p(answer) (%)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=6, loc="lower left")
    return fig


def sample_item(model: Model, sample: Sample, title: str, notes: Sequence[str] = (),
                flow_rows: Sequence[dict] = ()) -> GalleryItem:
    """A GalleryItem of one sample: regions, attention onto the image per layer, the patch sweep, its flows."""
    import matplotlib.pyplot as plt

    def axes():
        return plt.subplots(figsize=(4.2, 3.8), layout="constrained")[1]

    figures = []
    ax = plot.on_image(sample, None, axes(), title="boxes (yellow), related image patches (red)")
    figures.append(("The image with the question's objects", ax.figure))
    attention = analysis.attention_on_image(model, sample)
    figures.append(("Attention from the last position onto each image position, averaged over heads",
                    plot.layers_on_image(sample, attention, label="attention weight")))
    sweep = analysis.patch_sweep(model, sample)
    ax = plot.on_image(sample, sweep.values, axes(), label="change of p(answer) (%)",
                       title="each patch cut from the last position, all layers")
    figures.append((f"Patch sweep: p(answer) = {sweep.p_base:.3f} uncut", ax.figure))
    if flow_rows:
        figures.append(("This sample's flows", flow_figure(flow_rows, "relative change per layer")))
    for _, fig in figures:
        plt.close(fig)  # out of pyplot's keeping; the report still renders them
    return GalleryItem(title, figures, tuple(notes))


def _read_rows(path: str) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def gallery(run_dirs: Sequence[str], per_task: int = 1) -> tuple[list[GalleryItem], list[str]]:
    """Gallery items for the first `per_task` recorded samples of each sweep under `run_dirs`, and notes on what
    could not be shown (a model or image that is gone)."""
    items, problems, models = [], [], {}
    for run in find_runs(run_dirs):
        results = os.path.join(run, "results.csv")
        if per_task < 1 or not os.path.exists(results):
            continue
        with open(os.path.join(run, "run.json")) as f:
            header = json.load(f)
        rows = defaultdict(list)
        for r in _read_rows(results):
            rows[r["question_id"]].append(r)
        wanted = list(rows)[:per_task]
        path = header.get("model")
        if not path or not os.path.isdir(path):
            problems.append(f"{run}: the model it names is gone ({path}); no gallery for it")
            continue
        key = (path, bool(header.get("no_anyres")))
        if key not in models:
            models[key] = load(path, no_anyres=key[1])
        model = models[key]
        samples, _ = gqa.load_tasks(header["data"], header.get("images"), check_images=False)
        by_id = {s.question_id: s for s in samples}
        for qid in wanted:
            s = by_id.get(qid)
            if s is None or not s.image_path or not os.path.isfile(s.image_path):
                problems.append(f"{run}: question {qid}: its image is gone; not in the gallery")
                continue
            boxes = dict(zip(s.box_names, s.boxes, strict=True)) if len(set(s.box_names)) == len(s.boxes) else s.boxes
            options = (s.true_option, s.false_option) if s.true_option and s.false_option else None
            sample = model.sample(s.image_path, s.question, boxes, header.get("template"), options=options,
                                  related_patches=header.get("related_patches", "study"))
            first = rows[qid][0]
            notes = [f"task {s.task}, question {qid}: gold answer {s.answer!r}, the model's "
                     f"{first['predicted_answer']!r}, p(answer) {float(first['base_score_first']):.3f}"]
            items.append(sample_item(model, sample, s.question, notes, rows[qid]))
    return items, problems

