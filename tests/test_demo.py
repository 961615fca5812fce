"""`jaxflow demo` end to end on the shipped toy model, with a few samples per task."""

import csv
import os
import re

from jaxflow import demo
from jaxflow.cli import main
from jaxflow.sweep.flows import STUDY_FLOWS
from jaxflow.world import TASKS


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_demo_runs_every_flow_and_the_lens(tmp_path, capsys):
    out = tmp_path / "demo"
    result = demo.run(str(out), samples_per_task=3, batch=4, progress=False)
    printed = capsys.readouterr().out
    assert str(out / "report.md") in printed and str(out / "plots") in printed
    assert result["html"] == str(out / "report.html") and result["html"] in printed
    durations = re.findall(r"^\[(\d)/4\] done in (\d+\.\d) s$", printed, re.M)  # each step's own duration
    assert [n for n, _ in durations] == ["1", "2", "3", "4"], printed
    assert 0 < sum(float(s) for _, s in durations) <= result["seconds"] + 0.2  # each rounded to 0.1 s
    num_layers = 0
    for task in TASKS:
        rows = _rows(out / "runs" / "sweep" / task / "results.csv")
        kept = {r["question_id"] for r in rows}
        assert result["summary"][task]["kept"] == len(kept)
        skipped = _rows(out / "runs" / "sweep" / task / "skipped.csv")
        assert len(kept) + len(skipped) == 3
        assert all(r["reason"].startswith("wrong answer") for r in skipped), skipped  # toy boxes are all valid
        num_layers = max(int(r["layer"]) for r in rows) + 1 if rows else num_layers
        for qid in kept:  # every flow at every layer, once
            mine = [(r["block_desc"], int(r["layer"])) for r in rows if r["question_id"] == qid]
            assert sorted(mine) == sorted((f, layer) for f in STUDY_FLOWS for layer in range(num_layers))
        lens = _rows(out / "runs" / "lens" / task / "lens.csv")
        assert {r["question_id"] for r in lens} == kept
    assert num_layers > 1
    kept_tasks = [t for t in TASKS if result["summary"][t]["kept"]]
    assert kept_tasks
    for task in kept_tasks:
        assert (out / "plots" / f"flows_{task}.png").stat().st_size > 0
        assert (out / "plots" / f"lens_{task}.png").stat().st_size > 0
    report = (out / "report.md").read_text()
    html = (out / "report.html").read_text()
    for task in kept_tasks:
        assert f"| {task} |" in report
        assert f'id="task-1-{task}"' in html

    # causal tracing of one task: every kept sample traced at every (site, layer, region), or skipped with a reason
    trace_dir = out / "runs" / "trace" / demo.TRACE_TASK
    traced = _rows(trace_dir / "tracing.csv")
    skipped = _rows(trace_dir / "skipped.csv")
    assert len({r["question_id"] for r in traced}) + len(skipped) == 3
    assert all(r["reason"] for r in skipped)
    per_sample = 3 * num_layers * 5  # sites x layers x regions
    assert len(traced) == per_sample * len({r["question_id"] for r in traced})
    assert f"## Causal tracing ({demo.TRACE_TASK}, {demo.TRACE_CORRUPT})" in report
    if traced:
        name = f"trace_{demo.TRACE_TASK}_{demo.TRACE_CORRUPT}_exact"
        assert (out / "plots" / f"{name}.png").stat().st_size > 0
        assert f"Causal tracing ({demo.TRACE_CORRUPT}, exact)" in html

    # a second run reuses the model, the data and every finished sample
    before = {t: os.path.getsize(out / "runs" / "sweep" / t / "results.csv") for t in TASKS}
    main(["demo", "--out", str(out), "--samples-per-task", "3"])
    assert before == {t: os.path.getsize(out / "runs" / "sweep" / t / "results.csv") for t in TASKS}

    # the gallery: one sample per task with a sweep row, each drawn four times (regions, attention per layer,
    # patch sweep, its own flows)
    html = (out / "report.html").read_text()
    with_rows = [t for t in TASKS if _rows(out / "runs" / "sweep" / t / "results.csv")]
    assert html.count('class="gallery-item"') == len(with_rows)
    assert html[html.index('<section id="gallery">'):].count("<img ") == 4 * len(with_rows)
    # `jaxflow report` says when the model a run names is gone, and writes the rest
    os.rename(out / "model", tmp_path / "moved")
    capsys.readouterr()
    assert main(["report", str(out / "runs"), "--out", str(tmp_path / "r.html")]) == 0
    captured = capsys.readouterr()
    assert "the model it names is gone" in captured.err and str(tmp_path / "r.html") in captured.out
    assert 'id="gallery"' not in (tmp_path / "r.html").read_text()
