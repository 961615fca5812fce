"""`jaxflow report`: one self-contained HTML file from sweep, lens and trace result directories.

The file needs nothing beside it and asks the network for nothing: inline CSS, no scripts, every figure a
base64 `data:image/png` URI. Sections:
- runs: per model (run.json), each run's task, kind, data, window, samples recorded and skipped, start date and
  the jaxflow version that computed it;
- summary: per task and flow, the largest mean drop of the answer probability, its 95% CI and its layer
  (`plots.summary_rows`, as summary.md);
- per task: the flow curves, the logit lens and the causal-tracing heat maps (per corruption and method, every
  site on one colour scale), drawn by `jaxflow.sweep.plots` as `jaxflow plot` draws them;
- gallery: the `GalleryItem`s given (omitted when there are none).
"""

from __future__ import annotations

import base64
import csv
import dataclasses
import datetime
import html
import json
import os
import re
import struct
from collections import defaultdict
from collections.abc import Sequence
from typing import TYPE_CHECKING

from jaxflow.sweep import plots
from jaxflow.sweep.export import find_runs

TABLES = {"sweep": "results.csv", "lens": "lens.csv", "trace": "tracing.csv"}  # run kind -> its table
if TYPE_CHECKING:
    from matplotlib.figure import Figure

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
STYLE = """
body { font: 16px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif;
       color: #1f2328; background: #fff; margin: 0; }
main { max-width: 1080px; margin: 0 auto; padding: 24px 32px 64px; }
h1 { font-size: 1.9em; margin: 0.2em 0; }
h2 { font-size: 1.4em; margin-top: 2.2em; padding-bottom: 0.2em; border-bottom: 1px solid #d0d7de; }
h3 { font-size: 1.1em; margin: 1.4em 0 0.4em; }
p.meta { color: #59636e; margin: 0 0 1em; }
nav { background: #f6f8fa; border: 1px solid #d0d7de; border-radius: 6px; padding: 8px 20px; }
nav ul { margin: 0.3em 0; padding-left: 1.2em; }
a { color: #0969da; text-decoration: none; }
a:hover { text-decoration: underline; }
table { border-collapse: collapse; margin: 0.6em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #d0d7de; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f6f8fa; }
td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
td small { color: #59636e; }
code { font-size: 0.9em; background: #f6f8fa; padding: 1px 4px; border-radius: 4px; overflow-wrap: anywhere; }
figure { margin: 0.8em 0 1.6em; }
figure img { max-width: 100%; height: auto; display: block; }
figcaption { color: #59636e; font-size: 0.9em; margin-top: 0.3em; }
.gallery-item { border: 1px solid #d0d7de; border-radius: 6px; padding: 4px 20px 12px; margin: 1.2em 0; }
.gallery-item p { margin: 0.2em 0; }
.gallery-figures { display: flex; margin-top: 0.8em; flex-wrap: wrap; gap: 16px; align-items: flex-start; }
.gallery-figures figure { margin: 0; max-width: 100%; }
"""


@dataclasses.dataclass(frozen=True)
class GalleryItem:
    """One sample of the report's gallery.

    title: its heading, e.g. the question and the answer;
    figures: (caption, figure) pairs, drawn in this order; a figure is a matplotlib Figure (rendered to PNG as
        `jaxflow plot` saves figures; the report does not close it) or the contents of a PNG file;
    notes: lines of text shown under the title (e.g. the prediction, the answer's probability).
    """

    title: str
    figures: Sequence[tuple[str, Figure | bytes]]
    notes: Sequence[str] = ()


class ReportError(ValueError):
    """Run directories a report cannot be made from, named in the message."""


@dataclasses.dataclass(frozen=True)
class _Run:
    """One result directory: its run.json, its rows (results.csv, lens.csv or tracing.csv) and skipped.csv's
    rows."""

    path: str
    header: dict
    rows: list[dict]
    skipped: list[dict]


def _csv_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _load_runs(run_dirs: Sequence[str]) -> list[_Run]:
    runs = []
    for path in find_runs(run_dirs, kinds=tuple(TABLES)):
        with open(os.path.join(path, "run.json")) as f:
            header = json.load(f)
        runs.append(_Run(path, header, _csv_rows(os.path.join(path, TABLES[header["kind"]])),
                         _csv_rows(os.path.join(path, "skipped.csv"))))
    where = ", ".join(run_dirs)
    if not runs:
        raise ReportError(f"{where}: no sweep, lens or trace results (no run.json of kind 'sweep', 'lens' or "
                          "'trace' found)")
    if not any(run.rows for run in runs):
        raise ReportError(f"{where}: no results.csv, lens.csv or tracing.csv rows in {len(runs)} run(s) (nothing "
                          "recorded yet)")
    return runs


def _model_label(header: dict) -> str:
    return os.path.basename((header.get("model_source") or header.get("model") or "unknown model").rstrip("/"))


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-") or "x"


def _e(value) -> str:
    return html.escape(str(value))


def _img(figure: Figure | bytes, alt: str) -> str:
    """An <img> holding the figure (rendered as `jaxflow plot` saves it, or PNG bytes) as a data URI, its size
    from the PNG's header (the page reserves its space; CSS shrinks it to the column's width)."""
    if isinstance(figure, bytes) and not figure.startswith(PNG_SIGNATURE):
        raise ValueError("a gallery figure given as bytes must be the contents of a PNG file")
    png = figure if isinstance(figure, bytes) else plots.png_bytes(figure)
    width, height = struct.unpack(">II", png[16:24])  # IHDR, the first chunk: width, height (big-endian)
    data = base64.b64encode(png).decode("ascii")
    return f'<img src="data:image/png;base64,{data}" alt="{_e(alt)}" width="{width}" height="{height}">'


def _figure(figure: Figure | bytes, caption: str) -> str:
    return f"<figure>{_img(figure, caption)}<figcaption>{_e(caption)}</figcaption></figure>"


def _td(content: str, num: bool = False, style: str = "") -> str:
    """A table cell holding already escaped HTML; num: right-aligned figures."""
    attrs = (' class="num"' if num else "") + (f' style="{style}"' if style else "")
    return f"<td{attrs}>{content}</td>"


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A table: head (plain text) over rows of cells (_td)."""
    return ("<table><thead><tr>" + "".join(f"<th>{_e(h)}</th>" for h in head) + "</tr></thead><tbody>"
            + "".join(f"<tr>{''.join(row)}</tr>" for row in rows) + "</tbody></table>")


def _tasks(run: _Run) -> list[str]:
    """The tasks a run holds rows or skips of (a run reads one task file: usually one), else the file's stem."""
    tasks = {r["task"] for r in run.rows + run.skipped}
    return sorted(tasks) or [os.path.splitext(os.path.basename(run.header.get("data", "?")))[0]]


def _runs_section(label: str, runs: list[_Run]) -> str:
    versions = sorted({run.header.get("versions", {}).get("jaxflow", "?") for run in runs})
    first = runs[0].header
    lines = [f"<h3>{_e(label)}</h3>",
             f"<p>Model <code>{_e(first.get('model'))}</code>"
             + (f", converted from <code>{_e(first['model_source'])}</code>" if first.get("model_source") else "")
             + f"; computed with jaxflow {_e(', '.join(versions))}.</p>"]
    rows = []
    for run in sorted(runs, key=lambda run: (_tasks(run), run.header["kind"])):
        h = run.header
        for task in _tasks(run):
            recorded = len({r["question_id"] for r in run.rows if r["task"] == task})
            skipped = sum(r["task"] == task for r in run.skipped)
            rows.append([_td(_e(task)), _td(_e(h["kind"])), _td(f'<code>{_e(h.get("data", ""))}</code>'),
                         _td(_e(h.get("window", "")) if h["kind"] == "sweep" else "-", num=True),
                         _td(str(recorded), num=True), _td(str(skipped), num=True),
                         _td(_e(h.get("started", ""))), _td(_e(h.get("dtype", "")))])
    return "\n".join(lines) + _table(["task", "kind", "data", "window", "recorded", "skipped", "started", "dtype"],
                                     rows)


def _drop_cell(row: dict) -> str:
    """A summary cell: the drop and its CI, shaded red by the drop's size (100% drop: darkest)."""
    pct = row["largest_drop_pct"]
    shade = min(1.0, max(0.0, -pct) / 100) * 0.45
    return _td(f'{pct:+.1f}% <small>± {row["ci95_pct"]:.1f}, L{row["largest_drop_layer"]}</small>', num=True,
               style=f"background: rgba(207, 34, 46, {shade:.2f})")


def _summary_table(curves: dict) -> str:
    """Tasks x flows: the largest mean drop (%), its 95% CI and layer (plots.summary_rows)."""
    flows = plots.flow_names(curves)
    by_cell = {(r["task"], r["flow"]): r for r in plots.summary_rows(curves)}
    rows = []
    for task in sorted(curves):
        samples = max(r["samples"] for (t, _), r in by_cell.items() if t == task)
        rows.append([_td(_e(task)), _td(str(samples), num=True)]
                    + [_drop_cell(by_cell[task, f]) if (task, f) in by_cell else _td("-") for f in flows])
    return _table(["task", "samples", *(f.replace("->", " → ") for f in flows)], rows)


def _gallery(items: Sequence[GalleryItem]) -> str:
    parts = []
    for i, item in enumerate(items):
        notes = "".join(f"<p>{_e(note)}</p>" for note in item.notes)
        figures = "".join(_figure(fig, caption) for caption, fig in item.figures)
        parts.append(f'<div class="gallery-item" id="sample-{i + 1}"><h3>{_e(item.title)}</h3>{notes}'
                     f'<div class="gallery-figures">{figures}</div></div>')
    return "\n".join(parts)


def _task_figures(task: str, curves: dict | None, windows: list[int], lens_rows: list[dict] | None,
                  traces: dict | None = None) -> str:
    """A task's flow curves (plots.flow_curves()[task]), logit lens (its lens.csv rows) and causal traces
    ((corrupt, method) -> plots.trace_stats' site dict), whichever it has."""
    body = []
    if curves:
        body.append(_figure(plots.flow_figure(task, curves, windows),
                            "Flows: mean relative change (%) of the answer's probability when the target positions "
                            "cannot attend to the source positions in a window of layers around each layer; band: "
                            "95% CI of the mean."))
    if lens_rows:
        body.append(_figure(plots.lens_figure(task, lens_rows),
                            "Logit lens: mean probability of the answer at the last position after each layer, "
                            "without and with the final norm; band: 95% CI of the mean."))
    for (corrupt, method), sites in sorted((traces or {}).items()):
        body.append(_figure(plots.trace_summary_figure((task, corrupt, method), sites),
                            f"Causal tracing ({corrupt}, {method}): mean indirect effect (p_restored - p_corrupt of "
                            "the answer) of restoring the clean run's activations at each site, in the region's "
                            "positions, in a window of layers centred on each layer, into the corrupted run."))
    return "\n".join(body)


def _section(anchor: str, title: str, body: str) -> str:
    return f'<section id="{anchor}"><h2>{_e(title)}</h2>\n{body}\n</section>'


def render(run_dirs: Sequence[str], gallery: Sequence[GalleryItem] = (), title: str | None = None) -> str:
    """The report as one HTML document (see the module's docstring)."""
    runs_found = _load_runs(run_dirs)
    by_model: dict[str, list[_Run]] = defaultdict(list)
    for run in runs_found:
        by_model[run.header.get("model") or ""].append(run)
    labels = {model: _model_label(runs[0].header) for model, runs in by_model.items()}
    title = title or f"jaxflow report: {', '.join(labels.values())}"
    several = len(by_model) > 1
    toc = ['<li><a href="#runs">Runs</a></li>', '<li><a href="#summary">Largest drop per flow</a></li>']
    runs_parts, summary_parts, task_sections = [], [], []
    for m, (model, runs) in enumerate(by_model.items()):
        label = labels[model]
        sweeps = [run for run in runs if run.header["kind"] == "sweep"]
        curves = plots.flow_curves([r for run in sweeps for r in run.rows])
        windows: dict[str, set] = defaultdict(set)
        for run in sweeps:
            for task in _tasks(run):
                windows[task].add(run.header.get("window"))
        lens = plots.lens_by_task([r for run in runs if run.header["kind"] == "lens" for r in run.rows])
        traces: dict[str, dict] = defaultdict(dict)  # task -> (corrupt, method) -> site -> region -> stats
        for (task, corrupt, method), sites in plots.trace_stats(
                [r for run in runs if run.header["kind"] == "trace" for r in run.rows]).items():
            traces[task][(corrupt, method)] = sites
        runs_parts.append(_runs_section(label, runs))
        if curves:
            summary_parts.append((f"<h3>{_e(label)}</h3>" if several else "") + _summary_table(curves))
        task_links = []
        for task in sorted(set(curves) | set(lens) | set(traces)):
            anchor = f"task-{m + 1}-{_slug(task)}"
            heading = f"{task} ({label})" if several else task
            task_windows = sorted(w for w in windows[task] if w is not None)
            task_sections.append(_section(anchor, heading, _task_figures(task, curves.get(task), task_windows,
                                                                         lens.get(task), traces.get(task))))
            task_links.append(f'<li><a href="#{anchor}">{_e(task)}</a></li>')
        toc.append(f"<li>{_e(label)}<ul>{''.join(task_links)}</ul></li>" if several else "".join(task_links))
    if gallery:
        toc.append(f'<li><a href="#gallery">Gallery</a> ({len(gallery)} sample{"s" * (len(gallery) != 1)})</li>')
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = [f"<h1>{_e(title)}</h1>",
            f'<p class="meta">Made by <code>jaxflow report</code> on {date} from {len(runs_found)} result '
            f"directories.</p>",
            f"<nav><strong>Contents</strong><ul>{''.join(toc)}</ul></nav>",
            _section("runs", "Runs", "\n".join(runs_parts)),
            _section("summary", "Largest drop per flow",
                     "<p>Per task and flow: the largest mean relative change (%) of the answer's probability, "
                     "± its 95% CI, at layer L (the layer the knockout window is centred on).</p>"
                     + ("\n".join(summary_parts) or "<p>No knockout sweep among these runs.</p>")),
            *task_sections]
    if gallery:
        body.append(_section("gallery", "Gallery", _gallery(gallery)))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            '<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{STYLE}</style></head>\n<body><main>\n"
            + "\n".join(body) + "\n</main></body></html>\n")


def write_report(out_html: str, run_dirs: Sequence[str], gallery: Sequence[GalleryItem] = (),
                 title: str | None = None) -> str:
    """Writes the report of the sweep, lens and trace runs in or under `run_dirs` (searched as `jaxflow export` searches
    them) to `out_html`, with the gallery's items; returns its path. Raises ReportError naming the paths when
    they hold no results."""
    text = render(run_dirs, gallery, title)
    os.makedirs(os.path.dirname(os.path.abspath(out_html)), exist_ok=True)
    with open(out_html + ".tmp", "w", encoding="utf-8") as f:
        f.write(text)
    os.replace(out_html + ".tmp", out_html)
    return out_html
