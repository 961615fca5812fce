"""scripts/bench_trace.py --quick (the tiny preset): the hook procedure and jaxflow's exact restorations agree, the
restorations they agree on move the probability, the table has its rows, the ratios are medians of each round's own
ratio; and the 7B preset's configuration builds without weights. (The toy-model correlation needs its own
compilations: the full CPU run reports it.)"""

import json

import numpy as np
import pytest
from repo_scripts import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_trace")


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_trace")
    out = root / "trace.json"
    result = bench.main(["--quick", "--torch-threads", "1", "--toy-samples", "0", "--workdir", str(root / "work"),
                         "--out", str(out)])
    return result, json.loads(out.read_text())


def test_hook_procedure_and_exact_agree_on_effective_restorations(run, capsys):
    result, saved = run
    a_b = result["agreement"]["a_b"]
    assert a_b["tokens_equal"] and a_b["max_abs"] <= 1e-6 and a_b["max_rel"] <= 1e-4, a_b
    assert result["agreement"]["b_cold_warm"]["max_abs"] <= 1e-6  # auto_chunk may split differently as memory frees
    assert result["corruption_effect"] > 1e-3 and result["largest_restoration"] > 0.1  # the check is not vacuous
    assert result["configurations_per_sample"] == 3 * 4 * 4  # sites x regions x the tiny preset's layers
    assert saved["agreement"] == result["agreement"]


def test_table_rows_and_medians(bench, run):
    result = run[0]
    for key in ("a", "b", "c"):
        assert np.isfinite(result["samples_per_s"][key]) and result["achieved_flop_per_s"][key] > 0, key
    f = result["flops_per_sample"]
    assert f["attribution"] < f["exact_bound"] < f["hook"]  # image noise: most restorations recompute the image on
    assert f["hook"] == pytest.approx((2 + f["configurations"]) * f["forward"])
    assert len(result["rounds"]) == 2
    for r in result["rounds"]:
        rate = r["samples_per_s"]
        assert r["ratio_b_over_a"] == pytest.approx(rate["b"] / rate["a"])
        assert r["ratio_c_over_a"] == pytest.approx(rate["c"] / rate["a"])
    for key in ("ratio_b_over_a", "ratio_c_over_a"):
        assert result[key] == pytest.approx(np.median([r[key] for r in result["rounds"]]))
    calls = [c["call"] for c in result["compiled_memory"]]
    assert calls[0] == "clean run" and calls[-1] == "(c) attribution" and len(calls) > 3
    assert sum(int(c.split()[1]) for c in calls[1:-1]) == result["configurations_per_sample"]


def test_printed_table(bench, run, capsys):
    bench.report(run[0])
    printed = capsys.readouterr().out
    for row in ("| (a) hook procedure", "| (b) jaxflow exact", "| (c) jaxflow attribution", "agreement (a) vs (b)",
                "target b_over_a >= 20x", "target c_over_a >= 50x", "round 2:"):
        assert row in printed, row


def test_gpu_preset_dry_run(bench, tmp_path):
    result = bench.main(["--preset", "gpu-7b", "--dry-run", "--workdir", str(tmp_path)])["dry_run"]
    assert 6.5e9 < result["parameters"] < 7.5e9  # LLaVA-1.5-7B's shape
    assert result["configurations"] == 3 * 4 * 32 and 600 < result["T"] < 700  # 576 image tokens + the prompt
    assert result["bound_ratio_exact"] > 1 and result["bound_ratio_attribution"] > result["bound_ratio_exact"]
