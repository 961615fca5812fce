"""scripts/bench_plain.py at its tiny preset: both frameworks decode the same greedy tokens at both shapes, the
ratios are the medians of each round's own ratio, and the figures it derives are consistent."""

import json

import numpy as np
import pytest
from repo_scripts import load_script


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench_plain")
    module = load_script("bench_plain")
    out = root / "plain.json"
    result = module.main(["--preset", "tiny", "--no-convert", "--torch-threads", "1", "--workdir", str(root / "work"),
                          "--out", str(out)])
    return module, result, json.loads(out.read_text())


def test_same_tokens_and_medians_of_round_ratios(run):
    _, result, saved = run
    assert set(result["shapes"]) == {"llava", "next"}
    for kind, x in result["shapes"].items():
        assert x["identical_tokens"] and x["first_token_agrees"], kind
        assert len(x["rounds"]) == 2  # the tiny preset's rounds
        for r in x["rounds"]:
            assert r["prompt_ratio"] == pytest.approx(r["torch_prompt_s"] / r["jaxflow_prompt_s"])
            assert r["token_ratio"] == pytest.approx(r["torch_token_ms"] / r["jaxflow_token_ms"])
        for key in ("prompt_ratio", "token_ratio", "jaxflow_prompt_s"):
            assert x["median"][key] == pytest.approx(np.median([r[key] for r in x["rounds"]]))
        assert saved["shapes"][kind]["median"] == pytest.approx(x["median"])
    assert result["shapes"]["next"]["T"] > 3 * result["shapes"]["llava"]["T"]  # anyres: base + grid + newlines


def test_derived_figures(run):
    module, result, _ = run
    for x in result["shapes"].values():
        memory = x["compiled_memory"]
        assert set(memory) == {"prefill", "decoding phase (4 cache slots)"}  # 5 new tokens: 4 slots, one phase
        assert all(v["arguments"] > 0 and v["outputs"] > 0 for v in memory.values())
        assert x["prompt_flop_per_s"]["jaxflow"] == pytest.approx(x["prompt_flops"] / x["median"]["jaxflow_prompt_s"])
        assert x["decode_bytes_per_token"] > 0
