"""`jaxflow report`: one self-contained HTML file. Built from small synthetic runs (the real tables' columns), it
refers to nothing outside itself, and headless Chromium (Debian's `chromium`) loads it without console messages or
outside requests and paints a page that is not blank. The checker is shown to catch each kind of broken page."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import re
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from jaxflow import report
from jaxflow.cli import main
from jaxflow.sweep.flows import STUDY_FLOWS
from jaxflow.sweep.plots import new_figure
from jaxflow.sweep.rows import LENS_COLUMNS, RESULT_COLUMNS, SKIP_COLUMNS

LAYERS = 6
SAMPLES = 4


def write_csv(path, columns, rows):
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=columns, restval="")
        w.writeheader()
        w.writerows(rows)


def write_run(root, model: str, kind: str, task: str, window: int = 2, skipped: int = 1) -> None:
    """A result directory as `jaxflow sweep` / `lens` writes it (run.json, results.csv or lens.csv, skipped.csv),
    numbers made up: a drop of the answer's probability in the early layers for every flow but Last->Last."""
    root.mkdir(parents=True)
    (root / "run.json").write_text(json.dumps({
        "model": f"/models/{model}", "model_source": f"/checkpoints/{model}", "data": f"/data/{task}.csv",
        "kind": kind, "flows": list(STUDY_FLOWS), "window": window, "dtype": "float32",
        "versions": {"jaxflow": "0.1.0"}, "started": "2026-01-02T03:04:05+00:00"}))
    rng = np.random.default_rng(len(task) + window)
    if kind == "sweep":
        rows = [{"question_id": str(q), "task": task, "block_desc": flow, "layer": layer,
                 "relative_diff_first": 0.0 if flow == "Last->Last" else -90 * np.exp(-layer / (i + 1)) + rng.normal()}
                for q in range(SAMPLES) for i, flow in enumerate(STUDY_FLOWS) for layer in range(LAYERS)]
        write_csv(root / "results.csv", RESULT_COLUMNS, rows)
    else:
        rows = [{"question_id": str(q), "task": task, "layer": layer, "norm": norm, "p_answer": layer / LAYERS,
                 "p_answer_capitalized": 0.01, "p_false_option": 0.2 * rng.random()}
                for q in range(SAMPLES) for norm in ("False", "True") for layer in range(LAYERS + 1)]
        write_csv(root / "lens.csv", LENS_COLUMNS, rows)
    write_csv(root / "skipped.csv", SKIP_COLUMNS,
              [{"question_id": f"s{q}", "task": task, "reason": "wrong answer: predicted 'no', gold 'yes'"}
               for q in range(skipped)])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two models' result directories: toy-a swept and lensed on ChooseAttr and QueryAttr, toy-b swept on
    ChooseAttr."""
    root = tmp_path_factory.mktemp("runs")
    for task in ("ChooseAttr", "QueryAttr"):
        write_run(root / "toy-a" / "sweep" / task, "toy-a", "sweep", task)
        write_run(root / "toy-a" / "lens" / task, "toy-a", "lens", task)
    write_run(root / "toy-b" / "sweep" / "ChooseAttr", "toy-b", "sweep", "ChooseAttr", window=3, skipped=0)
    return root


def gallery_items(n: int) -> list[report.GalleryItem]:
    """n samples, each with a matplotlib figure and a PNG file's bytes."""
    items = []
    for i in range(n):
        fig, ax = new_figure(figsize=(3, 2.6))
        ax.imshow(np.random.default_rng(i).random((8, 8)))
        ax.set_title(f"attention, layer {i}")
        png = io.BytesIO()
        Image.new("RGB", (96, 64), (40 * i, 120, 200)).save(png, format="PNG")
        items.append(report.GalleryItem(f"Is the cube red or blue? -> red (sample {i})",
                                        [("attention on the image", fig), ("the image", png.getvalue())],
                                        notes=[f"p(answer) = 0.{i + 5}"]))
    return items


# ---- what the file refers to ----------------------------------------------------------------------------------


def outside_references(page: str) -> list[str]:
    """What in an HTML page would load from elsewhere: http(s) src / href / CSS url(), any <script src>, any
    <link>, @import, and every <img> whose source is not a PNG data URI."""
    found = re.findall(r"""(?:src|href)\s*=\s*["']?\s*(?:https?:)?//[^"'\s>]*""", page, re.I)
    found += re.findall(r"""url\(\s*["']?\s*(?:https?:)?//[^)]*\)""", page, re.I)
    found += re.findall(r"<script[^>]*\bsrc\b[^>]*>", page, re.I)
    found += re.findall(r"<link\b[^>]*>", page, re.I)
    found += re.findall(r"@import[^;]*", page, re.I)
    found += [img[:80] for img in re.findall(r"<img\b[^>]*>", page, re.I)
              if not re.search(r"""\ssrc="data:image/png;base64,[A-Za-z0-9+/=]+\"""", img)]
    return found


# ---- Chromium -------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Rendered:
    console: list[str]  # every console message the page caused
    requests: list[str]  # every URL the page asked the network stack for
    screenshot: np.ndarray  # [H, W, 3] uint8


def chromium() -> str:
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium not found on PATH: the report test renders the page in headless Chromium; install "
                    "Debian's chromium package (bash scripts/install_chromium.sh, as .ci/run does)")
    return path


def render(page, tmp_path) -> Rendered:
    """Loads `page` (an HTML file) in headless Chromium, every host name unresolvable, and screenshots 1280x2000."""
    shot, net_log = tmp_path / "screenshot.png", tmp_path / "net-log.json"
    done = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-background-networking",
         f"--user-data-dir={tmp_path / 'profile'}", f"--screenshot={shot}", "--window-size=1280,2000",
         "--enable-logging=stderr", "--v=0", f"--log-net-log={net_log}", "--host-resolver-rules=MAP * ~NOTFOUND",
         page.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and shot.exists(), f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    # a console message logs as `[...:INFO:CONSOLE:<line>] "<message>", source: <url> (<line>)`; this build logs
    # every level as INFO, and a page without scripts should cause none, so every one counts
    console = re.findall(r":CONSOLE[^\]]*\] (.*)", done.stderr)
    log = json.loads(net_log.read_text())
    start_job = log["constants"]["logEventTypes"]["URL_REQUEST_START_JOB"]
    # the browser's own background requests (time sync, sign-in, dictionaries) have no origin; the page's have its
    starts = [e["params"] for e in log["events"] if e["type"] == start_job and "url" in e.get("params", {})]
    requests = [p["url"] for p in starts if p.get("initiator") != "not an origin"]
    return Rendered(console, requests, np.asarray(Image.open(shot).convert("RGB")))


def page_problems(page: str, rendered: Rendered) -> list[str]:
    """Why a report page is not fine: outside references in its HTML, console messages, requests other than
    file:// and data:, a blank screenshot (few painted pixels or colours, no dark text at the top)."""
    problems = [f"refers outside: {ref}" for ref in outside_references(page)]
    problems += [f"console: {message}" for message in rendered.console]
    problems += [f"request: {url}" for url in rendered.requests if not url.startswith(("file:", "data:"))]
    pixels = rendered.screenshot.reshape(-1, 3)
    painted = float((pixels.min(axis=1) < 235).mean())  # not white nor the lightest greys
    colours = len(np.unique(pixels[:, 0].astype(np.int32) << 16 | pixels[:, 1].astype(np.int32) << 8 | pixels[:, 2]))
    top = rendered.screenshot[:120].max(axis=2)  # the title's band
    if painted < 0.02:
        problems.append(f"blank: {painted:.1%} of the pixels painted")
    if colours < 200:
        problems.append(f"blank: {colours} distinct colours")
    if (top < 80).sum() < 300:
        problems.append(f"blank: {(top < 80).sum()} dark pixels in the top 120 rows (no title text)")
    return problems


# ---- the report -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n_items", [0, 2])
def test_report_is_self_contained_and_renders(runs, tmp_path, n_items):
    out = tmp_path / "report.html"
    assert report.write_report(str(out), [str(runs)], gallery=gallery_items(n_items)) == str(out)
    page = out.read_text()
    assert outside_references(page) == []
    # 2 models x (ChooseAttr, QueryAttr) flows and lenses: 3 flow figures + 2 lens figures, 2 per gallery item
    assert page.count("<img ") == 5 + 2 * n_items
    assert page.count('<section id="task-') == 3
    assert ('id="gallery"' in page) == (n_items > 0)
    for text in ("toy-a", "toy-b", "/data/QueryAttr.csv", "Image → Question", "0.1.0", "2026-01-02T03:04:05"):
        assert text in page, text
    rendered = render(out, tmp_path)
    assert page_problems(page, rendered) == []


def test_runs_and_summary_tables_hold_the_counts(runs, tmp_path):
    """The runs table counts recorded and skipped samples per task; the summary's cell is the largest drop."""
    page = report.render([str(runs / "toy-a" / "sweep" / "QueryAttr")])
    row = re.search(r"<tr><td>QueryAttr</td><td>sweep</td>.*?</tr>", page).group(0)
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row)
    assert cells[3:6] == ["2", str(SAMPLES), "1"]  # window, recorded, skipped
    assert 'id="gallery"' not in page and "Gallery" not in page
    assert re.search(r"<td[^>]*>-9\d\.\d% <small>± [\d.]+, L0</small></td>", page)  # every early flow drops ~90%


# ---- the checker catches what it must --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_page(runs, tmp_path_factory):
    return report.render([str(runs / "toy-a" / "sweep" / "ChooseAttr")])


@pytest.mark.parametrize("inject, expected", [
    ('<img src="https://example.com/tracker.png" alt="">', ["refers outside", "request: https://example.com/"]),
    ('<link rel="stylesheet" href="https://example.com/style.css">', ["refers outside", "request: https://"]),
    ("<script>throw new Error('broken page')</script>", ["console: \"Uncaught Error: broken page\""]),
    ("<style>body { display: none; }</style>", ["blank:"]),
])
def test_checker_catches_a_broken_page(good_page, tmp_path, inject, expected):
    """A report page with one fault injected: the checker finds that fault, and nothing else (the page without
    it passes)."""
    page = good_page.replace("</main>", inject + "</main>")
    path = tmp_path / "broken.html"
    path.write_text(page)
    problems = page_problems(page, render(path, tmp_path))
    for want in expected:
        assert any(p.startswith(want) for p in problems), (want, problems)
    assert {p.split(":")[0] for p in problems} == {want.split(":")[0] for want in expected}, problems


# ---- the command ----------------------------------------------------------------------------------------------


def test_cli(runs, tmp_path, capsys):
    out = tmp_path / "sub" / "r.html"
    assert main(["report", str(runs / "toy-b"), "--out", str(out), "--title", "A <title>"]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert "<h1>A &lt;title&gt;</h1>" in out.read_text()
    (tmp_path / "empty").mkdir()
    run_json_only = tmp_path / "nothing-yet"
    run_json_only.mkdir()
    (run_json_only / "run.json").write_text(json.dumps({"kind": "sweep", "model": "/m"}))
    for path, message in ((tmp_path / "nope", "not a directory"),
                          (tmp_path / "empty", "no sweep, lens or trace results"),
                          (run_json_only, "no results.csv, lens.csv or tracing.csv rows")):
        assert main(["report", str(path), "--out", str(tmp_path / "x.html")]) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"jaxflow report: error: {path}") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "x.html").exists()


def test_gallery_refuses_bytes_that_are_not_png(runs):
    item = report.GalleryItem("bad", [("not a picture", b"GIF89a...")])
    with pytest.raises(ValueError, match="PNG"):
        report.render([str(runs / "toy-b")], gallery=[item])
