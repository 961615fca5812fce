"""The flow and lens figures read without guessing: curves on top of each other stay distinguishable, the legend
sits beside the plot (never over a curve), it says what the bands are, the title gives the window, and the lens
numbers layers as the flow plots do (layer l: after decoder layer l; the embeddings at "emb")."""

from __future__ import annotations

import csv
import json

import pytest

from jaxflow.sweep import plots

LAYERS = 6
FLOWS = ["Image->Question", "Image->Last", "Question->Last", "Last->Last"]


def write_csv(path, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


@pytest.fixture
def figures(tmp_path, monkeypatch):
    """name -> (the matplotlib figure plot() saved under that name, its renderer), for a 6-layer sweep (window 3)
    and lens."""
    sweep, lens = tmp_path / "runs" / "sweep", tmp_path / "runs" / "lens"
    sweep.mkdir(parents=True)
    lens.mkdir(parents=True)
    (sweep / "run.json").write_text(json.dumps({"kind": "sweep", "window": 3}))
    rows = []
    for qid in ("1", "2"):
        for flow in FLOWS:
            for layer in range(LAYERS):  # every flow but Image->Last at 0: curves on top of each other
                drop = -80.0 + int(qid) if flow == "Image->Last" and layer < 2 else 0.0
                rows.append({"question_id": qid, "task": "ChooseAttr", "block_desc": flow, "layer": layer,
                             "relative_diff_first": drop})
    write_csv(sweep / "results.csv", rows)
    write_csv(lens / "lens.csv", [{"question_id": qid, "task": "ChooseAttr", "layer": layer, "norm": norm,
                                   "p_answer": 0.1 * layer, "p_answer_capitalized": 0.0, "p_false_option": ""}
                                  for qid in ("1", "2") for norm in ("False", "True") for layer in range(LAYERS + 1)])
    saved = {}

    def keep(fig, out, name):
        fig.canvas.draw()  # lays the figure out, as saving does
        saved[name] = fig, fig.canvas.get_renderer()
        return []

    monkeypatch.setattr(plots, "_save", keep)
    plots.plot(str(tmp_path / "runs"), str(tmp_path / "figures"))
    return saved


def test_flow_plot_is_readable(figures):
    fig, renderer = figures["flows_ChooseAttr"]
    (ax,) = fig.axes
    assert ax.get_title() == "ChooseAttr (window 3)"
    styles = [(line.get_linestyle(), line.get_marker()) for line in ax.get_lines()[:len(FLOWS)]]
    assert len(set(styles)) == len(FLOWS)  # the four curves at 0 stay distinguishable
    legend = ax.get_legend()
    labels = [t.get_text() for t in legend.get_texts()]
    assert labels[-1] == "band: 95% CI of the mean" and labels[:-1] == [f"{f} (n=2)" for f in FLOWS]
    assert legend.get_window_extent(renderer).x0 >= ax.get_window_extent(renderer).x1  # beside, not over, the curves


def test_lens_plot_numbers_layers_as_the_flow_plot(figures):
    fig, _ = figures["lens_ChooseAttr"]
    for ax in fig.axes:
        labels = [t.get_text() for t in ax.get_xticklabels()]
        assert labels == ["emb", *map(str, range(LAYERS))]
        xs = ax.get_lines()[0].get_xdata()
        assert list(xs) == list(range(-1, LAYERS))
    legend = fig.axes[0].get_legend()
    assert "band: 95% CI of the mean" in [t.get_text() for t in legend.get_texts()]
