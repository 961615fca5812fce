"""`jaxflow plot`: figures and a summary table from sweep / lens result directories.

- per task: mean relative change (%) of the answer probability vs layer, one line per flow (each its own
  line style and marker, so curves lying on each other stay visible), with a 95% confidence band (normal
  approximation, 1.96 standard errors), as in the study's figures; the title gives the window (from run.json),
  the legend sits beside the plot;
- logit lens: mean probability of the answer (lowercase, capitalized, false option) vs layer,
  raw (no final norm, as the study) and normed; layers numbered as in the flow plots (layer l: after decoder
  layer l), the embeddings at "emb" before layer 0;
- a merged figure with every task side by side; summary.md / summary.csv: per task and flow,
  the layer with the largest mean drop, its size and the sample count;
- causal tracing (tracing.csv of `jaxflow trace`), per task, corruption and method: per site, ROME's heat map (the
  mean indirect effect p_restored - p_corrupt over samples, layer x region) beside one line per region with its 95%
  confidence band (normal approximation, as above), `trace_{task}_{corrupt}_{method}_{site}`; all sites' heat maps
  side by side, `trace_{task}_{corrupt}_{method}`; trace_summary.csv: per site and region, the layer of the largest
  mean indirect effect, its size, 95% CI half-width and sample count.

Each figure is built by its own function (`flow_figure`, `all_tasks_figure`, `lens_figure`) and drawn by Agg
outside pyplot; `plot` saves them as PNG + PDF files, `png_bytes` renders one in memory (the HTML report).
"""

from __future__ import annotations

import csv
import glob
import io
import json
import os
from collections import defaultdict

import numpy as np


def _read(pattern: str) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(pattern, recursive=True)):
        with open(path, newline="") as f:
            rows.extend(csv.DictReader(f))
    return rows


def windows(results_dir: str) -> dict[str, list[int]]:
    """task -> the windows (run.json) of the sweeps under results_dir that hold its rows."""
    found: dict = defaultdict(set)
    for path in glob.glob(os.path.join(results_dir, "**", "results.csv"), recursive=True):
        header = os.path.join(os.path.dirname(path), "run.json")
        if not os.path.exists(header):
            continue
        with open(header) as f:
            window = json.load(f).get("window")
        with open(path, newline="") as f:
            tasks = {r["task"] for r in csv.DictReader(f)}
        for task in tasks:
            found[task].add(window)
    return {task: sorted(w for w in ws if w is not None) for task, ws in found.items()}


def _mean_ci(values: list[float]) -> tuple[float, float]:
    v = np.asarray(values, np.float64)
    if len(v) < 2:
        return float(v.mean()), 0.0
    return float(v.mean()), float(1.96 * v.std(ddof=1) / np.sqrt(len(v)))


def flow_curves(rows: list[dict]) -> dict:
    """task -> flow -> (layers, mean, ci, n)."""
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in rows:
        acc[r["task"]][r["block_desc"]][int(r["layer"])].append(float(r["relative_diff_first"]))
    out: dict = {}
    for task, flows in acc.items():
        out[task] = {}
        for flow, by_layer in flows.items():
            layers = sorted(by_layer)
            stats = [_mean_ci(by_layer[layer]) for layer in layers]
            out[task][flow] = (np.asarray(layers), np.asarray([s[0] for s in stats]),
                               np.asarray([s[1] for s in stats]), len(by_layer[layers[0]]))
    return out


STYLES = [("-", "o"), ("--", "s"), (":", "^"), ("-.", "D"), ((0, (5, 1, 1, 1)), "v"), ((0, (1, 1)), "x")]


def _plot_flows(ax, curves: dict, title: str) -> None:
    from matplotlib.ticker import MaxNLocator

    for i, (flow, (layers, mean, ci, n)) in enumerate(curves.items()):
        linestyle, marker = STYLES[i % len(STYLES)]
        (line,) = ax.plot(layers, mean, label=f"{flow} (n={n})", linewidth=1.6, linestyle=linestyle, marker=marker,
                          markersize=4, markerfacecolor="none")
        ax.fill_between(layers, mean - ci, mean + ci, color=line.get_color(), alpha=0.2, linewidth=0)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.axhline(0, color="black", linewidth=0.6)
    ax.set_title(title)
    ax.set_xlabel("layer")
    ax.set_ylabel("change in answer probability (%)")
    ax.grid(alpha=0.3)


def _legend_entries(ax) -> tuple[list, list[str]]:
    """The axes' flow lines, and one entry saying what the shaded bands are."""
    from matplotlib.patches import Patch

    handles, labels = ax.get_legend_handles_labels()
    return handles + [Patch(color="grey", alpha=0.3)], labels + ["band: 95% CI of the mean"]


def _window_text(task_windows: list[int]) -> str:
    if not task_windows:
        return ""
    return f" (window {task_windows[0]})" if len(task_windows) == 1 else f" (windows {task_windows})"


SAVE_OPTIONS = {"dpi": 130, "bbox_inches": "tight"}  # files and in-memory PNGs alike


def new_figure(**subplots):
    """(figure, axes) drawn by Agg, outside pyplot: nothing to close, no global backend to set."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figsize = subplots.pop("figsize")
    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig, fig.subplots(**subplots)


def png_bytes(fig) -> bytes:
    """The figure as PNG file contents, rendered as `plot` saves it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", **SAVE_OPTIONS)
    return buf.getvalue()


def _save(fig, out: str, name: str) -> list[str]:
    paths = [os.path.join(out, f"{name}.{ext}") for ext in ("png", "pdf")]
    for p in paths:
        fig.savefig(p, **SAVE_OPTIONS)
    return paths


def flow_figure(task: str, task_curves: dict, task_windows: list[int]):
    """One task's flow curves (flow_curves()[task]), the legend beside the plot."""
    fig, ax = new_figure(figsize=(7, 4.2))
    _plot_flows(ax, task_curves, task + _window_text(task_windows))
    ax.legend(*_legend_entries(ax), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    return fig


def all_tasks_figure(curves: dict, task_windows: dict[str, list[int]]):
    """Every task's flow curves side by side, one legend below."""
    fig, axes = new_figure(figsize=(4.2 * len(curves), 3.8), ncols=len(curves), sharey=True, squeeze=False)
    for ax, (task, task_curves) in zip(axes[0], sorted(curves.items()), strict=True):
        _plot_flows(ax, task_curves, task + _window_text(task_windows.get(task, [])))
    handles, labels = _legend_entries(axes[0][0])
    fig.legend(handles, [lab.split(" (n=")[0] for lab in labels], loc="lower center", ncol=4, fontsize=8,
               bbox_to_anchor=(0.5, -0.12))
    return fig


def plot(results_dir: str, out: str) -> list[str]:
    """Writes every figure and the summary into `out`; returns the files written."""
    os.makedirs(out, exist_ok=True)
    written: list[str] = []
    rows = _read(os.path.join(results_dir, "**", "results.csv"))
    lens_rows = _read(os.path.join(results_dir, "**", "lens.csv"))
    trace_rows = _read(os.path.join(results_dir, "**", "tracing.csv"))
    if not rows and not lens_rows and not trace_rows:
        raise FileNotFoundError(f"{results_dir}: no results.csv, lens.csv or tracing.csv found (run `jaxflow sweep`, "
                                "`lens` or `trace` first)")
    curves = flow_curves(rows) if rows else {}
    task_windows = windows(results_dir)
    for task, task_curves in sorted(curves.items()):
        written += _save(flow_figure(task, task_curves, task_windows.get(task, [])), out, f"flows_{task}")
    if len(curves) > 1:
        written += _save(all_tasks_figure(curves, task_windows), out, "flows_all_tasks")
    for task, task_rows in sorted(lens_by_task(lens_rows).items()):
        written += _save(lens_figure(task, task_rows), out, f"lens_{task}")
    if curves:
        written += _summary(curves, out)
    if trace_rows:
        written += _trace_plots(trace_stats(trace_rows), out)
    return written


def trace_stats(rows: list[dict]) -> dict:
    """tracing.csv rows -> (task, corrupt, method) -> site -> region -> (layers, mean, ci, n): the mean indirect
    effect per layer over the samples whose region is not empty, its 95% CI half-width, the sample count."""
    acc: dict = defaultdict(lambda: defaultdict(lambda: defaultdict(lambda: defaultdict(list))))
    for r in rows:
        if r["indirect_effect"] != "":
            acc[(r["task"], r["corrupt"], r["method"])][r["site"]][r["region"]][int(r["layer"])].append(
                float(r["indirect_effect"]))
    out: dict = {}
    for key, sites in acc.items():
        out[key] = {}
        for site, regions in sites.items():
            out[key][site] = {}
            for region, by_layer in regions.items():
                layers = sorted(by_layer)
                stats = [_mean_ci(by_layer[layer]) for layer in layers]
                out[key][site][region] = (np.asarray(layers), np.asarray([m for m, _ in stats]),
                                          np.asarray([c for _, c in stats]), len(by_layer[layers[0]]))
    return out


def _heatmap(ax, site: str, regions: dict, title: str, top: float | None = None, labels: bool = True):
    """Mean indirect effect, regions (rows) x layers (columns), on a colour scale -top..top (default: the largest
    |mean|), 0 white."""
    layers = sorted({int(layer) for layers, *_ in regions.values() for layer in layers})
    grid = np.full((len(regions), len(layers)), np.nan)
    for i, (layer_ids, mean, _, _) in enumerate(regions.values()):
        grid[i, [layers.index(int(layer)) for layer in layer_ids]] = mean
    top = top or float(np.nanmax(np.abs(grid))) or 1.0
    image = ax.imshow(grid, aspect="auto", cmap="RdBu_r", vmin=-top, vmax=top, interpolation="nearest")
    ax.set_yticks(range(len(regions)), [f"{name} (n={n})" for name, (*_, n) in regions.items()] if labels else [],
                  fontsize=8)
    ax.set_xticks(range(len(layers)), layers, fontsize=8)
    ax.set_xlabel(f"layer (centre of the restored window; {site})")
    ax.set_title(title, fontsize=9)
    return image


def trace_figure(key: tuple[str, str, str], site: str, regions: dict):
    """One site's trace: the heat map beside one line per region with its 95% CI band."""
    fig, (left, right) = new_figure(figsize=(11, 0.5 * len(regions) + 3), ncols=2)
    image = _heatmap(left, site, regions, "{} ({}, {}): {}, mean indirect effect".format(*key, site))
    fig.colorbar(image, ax=left, label="p_restored - p_corrupt")
    for i, (region, (layers, mean, ci, n)) in enumerate(regions.items()):
        linestyle, marker = STYLES[i % len(STYLES)]
        (line,) = right.plot(layers, mean, label=f"{region} (n={n})", linestyle=linestyle, marker=marker,
                             markersize=4, markerfacecolor="none")
        right.fill_between(layers, mean - ci, mean + ci, color=line.get_color(), alpha=0.2, linewidth=0)
    right.axhline(0, color="black", linewidth=0.6)
    right.set_xlabel("layer")
    right.set_ylabel("mean indirect effect")
    right.grid(alpha=0.3)
    right.legend(*_legend_entries(right), fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1), borderaxespad=0)
    return fig


def trace_summary_figure(key: tuple[str, str, str], sites: dict):
    """Every site's heat map side by side on one colour scale (the regions in the same order in each)."""
    top = max(float(np.abs(mean).max()) for regions in sites.values() for _, mean, _, _ in regions.values()) or 1.0
    fig, axes = new_figure(figsize=(4.5 * len(sites) + 2, 0.5 * max(map(len, sites.values())) + 3),
                           ncols=len(sites), squeeze=False)
    for i, (ax, (site, regions)) in enumerate(zip(axes[0], sites.items(), strict=True)):
        image = _heatmap(ax, site, regions, "{} ({}, {}): ".format(*key) + site, top, labels=i == 0)
    fig.colorbar(image, ax=list(axes[0]), label="mean indirect effect (p_restored - p_corrupt)")
    return fig


def _trace_plots(stats: dict, out: str) -> list[str]:
    written, summary = [], []
    for key, sites in sorted(stats.items()):
        name = "trace_" + "_".join(key)
        for site, regions in sites.items():
            written += _save(trace_figure(key, site, regions), out, f"{name}_{site}")
            for region, (layers, mean, ci, n) in regions.items():
                i = int(np.argmax(mean))
                summary.append({"task": key[0], "corrupt": key[1], "method": key[2], "site": site, "region": region,
                                "largest_effect_layer": int(layers[i]), "largest_effect": round(float(mean[i]), 4),
                                "ci95": round(float(ci[i]), 4), "samples": n})
        written += _save(trace_summary_figure(key, sites), out, name)
    if not summary:  # every region empty in every sample
        return written
    path = os.path.join(out, "trace_summary.csv")
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(summary[0]))
        w.writeheader()
        w.writerows(summary)
    return written + [path]


def _lens_ticks(last_layer: int) -> tuple[list[int], list[str]]:
    """x ticks of a lens plot: 'emb' at -1, then decoder layers 0..last_layer (about a dozen labels at most)."""
    step = max(1, -(-(last_layer + 1) // 12))
    ticks = [-1, *range(0, last_layer + 1, step)]
    return ticks, ["emb" if tick == -1 else str(tick) for tick in ticks]


def lens_by_task(rows: list[dict]) -> dict[str, list[dict]]:
    """lens.csv rows grouped by task."""
    by_task: dict = defaultdict(list)
    for r in rows:
        by_task[r["task"]].append(r)
    return dict(by_task)


def lens_figure(task: str, task_rows: list[dict]):
    """One task's logit lens: raw and normed side by side, mean probabilities with their 95% CI bands."""
    fig, axes = new_figure(figsize=(10, 3.8), ncols=2, sharey=True)
    for ax, norm in zip(axes, ("False", "True"), strict=True):
        sel = [r for r in task_rows if r["norm"] == norm]
        n = len({r["question_id"] for r in sel})
        for col, label in (("p_answer", "answer (lowercase)"), ("p_answer_capitalized", "Answer (capitalized)"),
                           ("p_false_option", "false option")):
            acc = defaultdict(list)
            for r in sel:
                if r[col] != "":
                    acc[int(r["layer"])].append(float(r[col]))
            if not acc:
                continue
            layers = sorted(acc)
            stats = [_mean_ci(acc[layer]) for layer in layers]
            mean, ci = np.asarray([s[0] for s in stats]), np.asarray([s[1] for s in stats])
            x = np.asarray(layers) - 1  # lens row l is the output of decoder layer l - 1; row 0 the embeddings
            (line,) = ax.plot(x, mean, label=label)
            ax.fill_between(x, mean - ci, mean + ci, color=line.get_color(), alpha=0.2, linewidth=0)
            ax.set_xticks(*_lens_ticks(int(x.max())))
        ax.set_title(f"{task}: logit lens, {'final norm' if norm == 'True' else 'raw (no final norm)'} (n={n})")
        ax.set_xlabel("after layer (as in the flow plots; emb: embeddings)")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("probability at the last position")
    axes[0].legend(*_legend_entries(axes[0]), fontsize=8)
    return fig


def flow_names(curves: dict) -> list[str]:
    """The flows of flow_curves(), the study's six first (in its order), then the others by name."""
    from jaxflow.sweep.flows import STUDY_FLOWS

    seen = {flow for task in curves.values() for flow in task}
    return [f for f in STUDY_FLOWS if f in seen] + sorted(seen - set(STUDY_FLOWS))


def summary_rows(curves: dict) -> list[dict]:
    """Per task and flow (flow_curves()): the layer with the largest mean drop, the drop (%), its 95% CI
    half-width (%) and the sample count."""
    rows = []
    for task, task_curves in sorted(curves.items()):
        for flow in flow_names({task: task_curves}):
            layers, mean, ci, n = task_curves[flow]
            i = int(np.argmin(mean))
            rows.append({"task": task, "flow": flow, "largest_drop_layer": int(layers[i]),
                         "largest_drop_pct": float(mean[i]), "ci95_pct": float(ci[i]), "samples": n})
    return rows


def _summary(curves: dict, out: str) -> list[str]:
    rows = [{**r, "largest_drop_pct": round(r["largest_drop_pct"], 2), "ci95_pct": round(r["ci95_pct"], 2)}
            for r in summary_rows(curves)]
    csv_path, md_path = os.path.join(out, "summary.csv"), os.path.join(out, "summary.md")
    with open(csv_path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(md_path, "w") as f:
        f.write("| task | flow | layer of largest drop | mean change (%) | 95% CI (±) | samples |\n")
        f.write("| --- | --- | --- | --- | --- | --- |\n")
        for r in rows:
            f.write(f"| {r['task']} | {r['flow']} | {r['largest_drop_layer']} | {r['largest_drop_pct']} | "
                    f"{r['ci95_pct']} | {r['samples']} |\n")
    return [csv_path, md_path]
