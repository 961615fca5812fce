"""scripts/bench_sweep.py at its tiny preset: the three methods (the study's procedure, batched PyTorch,
`jaxflow sweep`) agree, the knockouts they agree on change the probabilities, and the FLOP counts are
consistent with each other and with XLA's own count of a jaxflow forward."""

import dataclasses
import json

import numpy as np
import pytest
from repo_scripts import load_script


@pytest.fixture(scope="module")
def bench():
    return load_script("bench_sweep")


@pytest.fixture(scope="module")
def run(bench, tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    out = root / "bench.json"
    result = bench.main(["--preset", "tiny", "--torch-threads", "1", "--workdir", str(root / "work"),
                         "--out", str(out)])
    return result, json.loads(out.read_text()), root / "work"


def test_three_methods_agree_on_effective_knockouts(run):
    result, saved, _ = run
    for pair in ("a_c", "b_c", "a_b"):
        assert result["agreement"][pair]["max_abs"] <= 1e-4, pair
        assert result["agreement"][pair]["max_rel"] <= 1e-3, pair
    # the agreement says something: some configuration moves p by more than a tenth
    assert result["largest_knockout_effect"] > 0.1
    assert saved["agreement"] == result["agreement"]
    assert saved["configurations_per_sample"] == 6 * 4  # six flows x four layers
    for key, rate in result["samples_per_s"].items():
        assert np.isfinite(rate), key


def test_flop_counts_are_consistent(bench, run):
    result, _, work = run
    model = _model(work)
    sample = _samples(bench, model, work)[0]
    f = bench.flops_per_sample(model.config, sample, 9)
    text, k = model.config.text, f["configurations"]
    t = len(sample.input_ids)
    assert f["study"] == (1 + k) * f["forward"]
    assert f["forward"] == bench.tower_flops(model.config) + bench.decoder_flops(text, t) + bench.unembed_flops(text)
    assert f["batched"] == f["study"] - k * bench.tower_flops(model.config)
    assert f["forward"] < f["jaxflow_bound"] < f["batched"]
    assert result["flop_bound_ratio"] == pytest.approx(result["flops_per_sample"]["study"]
                                                       / result["flops_per_sample"]["jaxflow_bound"])


def test_bound_counts_each_suffix_from_its_window_start(bench, run):
    _, _, work = run
    model = _model(work)
    sample = _samples(bench, model, work)[0]
    text = model.config.text
    t, num_layers = len(sample.input_ids), text.num_layers
    n = t - int(min(sample.regions["question"]))  # positions a flow into the question recomputes
    kv = 2 * text.hidden_size * 2 * text.num_kv_heads * text.head_dim
    unembed = 6 * num_layers * bench.unembed_flops(text)

    def last_layer(m):  # keys and values of m positions, the rest at the answer's position only
        return bench.decoder_layer_flops(text, 1, t) + (m - 1) * kv

    # window 1: configuration (flow, l) starts at layer l and cuts only there, so none shares; three flows
    # target the question, three the last position
    f = bench.flops_per_sample(model.config, sample, 1)
    assert f["per_configuration_bound"] == f["forward"] + unembed + sum(
        (num_layers - layer) * (3 * bench.decoder_layer_flops(text, n, t) + 3 * bench.decoder_layer_flops(text, 1, t))
        for layer in range(num_layers))
    assert f["jaxflow_bound"] == f["per_configuration_bound"] - 3 * num_layers * (
        bench.decoder_layer_flops(text, n, t) - last_layer(n))
    # window 9 spans all 4 layers: a flow's configurations are one computation
    g = bench.flops_per_sample(model.config, sample, 9)
    assert g["jaxflow_bound"] == g["forward"] + unembed + 3 * (
        (num_layers - 1) * (bench.decoder_layer_flops(text, n, t) + bench.decoder_layer_flops(text, 1, t))
        + last_layer(n) + last_layer(1))
    assert g["per_configuration_bound"] - g["forward"] - unembed == 3 * num_layers ** 2 * (
        bench.decoder_layer_flops(text, n, t) + bench.decoder_layer_flops(text, 1, t))
    # a question that starts at the last position costs what a last-position target costs
    moved = dataclasses.replace(sample, regions={**sample.regions, "question": np.array([t - 1])})
    h = bench.flops_per_sample(model.config, moved, 1)
    assert h["per_configuration_bound"] - h["forward"] - unembed == 6 * sum(
        (num_layers - layer) * bench.decoder_layer_flops(text, 1, t) for layer in range(num_layers))


def test_analytic_decoder_flops_match_xla(bench, run):
    result, _, work = run
    model = _model(work)
    for t in (71, 160):
        analytic, xla = bench.decoder_flops(model.config.text, t), bench.xla_decoder_flops(model, t)
        assert xla == pytest.approx(analytic, rel=0.08), t  # XLA also counts norms, softmax, SiLU, RoPE
    analytic, xla = result["decoder_flops_analytic_vs_xla"]
    assert xla == pytest.approx(analytic, rel=0.08)


def _model(work):
    import jaxflow

    return jaxflow.load(work / "model")


def _samples(bench, model, work):
    return bench.load_samples(model, str(work / "data" / "ChooseAttr.csv"), str(work / "data" / "images"), 1)


def test_ratios_are_medians_of_each_rounds_own_ratio(run):
    """(a), (b) and the warm (c) runs repeat in rounds; each round's ratio is taken within it."""
    result = run[0]
    assert len(result["rounds"]) == 2  # the tiny preset's rounds
    for r in result["rounds"]:
        rate = r["samples_per_s"]
        assert r["ratio_c_over_a"] == pytest.approx(rate["c_jaxflow_marginal"] / rate["a_study"])
        assert r["ratio_c_over_b"] == pytest.approx(rate["c_jaxflow_marginal"] / rate["b_batched"])
        assert r["ratio_d_over_a"] == pytest.approx(rate["d_process_marginal"] / rate["a_study"])
    for key in ("ratio_c_over_a", "ratio_c_over_b", "ratio_d_over_a"):
        assert result[key] == pytest.approx(np.median([r[key] for r in result["rounds"]]))


def test_compiled_memory_covers_every_call_of_a_batch(run):
    """The prefill and each knockout call of one batch, as the sweep makes them: the six flows at four layers
    split into the `last` group (suffix 1) and the question group; each within auto_chunk's budget."""
    calls = run[0]["compiled_memory"]
    assert calls[0]["call"] == "prefill" and calls[0]["temp_bytes"] > 0
    knockouts = calls[1:]
    assert sum(c["configurations"] for c in knockouts) == 6 * 4
    assert [c["call"] for c in knockouts][0] == "knockouts, suffix 1" and len(knockouts) == 2
    for c in knockouts:
        assert c["temp_per_configuration"] == c["temp_bytes"] / c["configurations"]
        assert 0 < c["temp_per_configuration"] <= c["budget_per_configuration"], c
        assert 0 < c["row_layers"] <= c["configurations"] * 4


def test_process_runs_record_every_sample_with_the_in_process_probabilities(run):
    """(d) runs `jaxflow sweep` as a process into its own folders; it records what the in-process sweep (c) does."""
    import csv

    work = run[2]
    rows = {}
    for name in ("process-2-1", "warm-2-1"):  # the tiny preset's large run, round 1
        with open(work / "runs" / name / "results.csv", newline="") as f:
            rows[name] = {(r["question_id"], r["block_desc"], r["layer"]): float(r["new_score_first"])
                          for r in csv.DictReader(f)}
    assert len(rows["process-2-1"]) == 2 * 6 * 4 and rows["process-2-1"].keys() == rows["warm-2-1"].keys()
    for key, p in rows["warm-2-1"].items():
        assert rows["process-2-1"][key] == pytest.approx(p, rel=1e-5, abs=1e-9), key
