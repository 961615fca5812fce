"""The correct-answer filter decodes until EOS, as the study (up to 128 new tokens): a rigged tiny LLaVA
(tests/rigged.py) whose greedy answer is an 8-token phrase followed by </s> is kept at the default limit,
skipped with the reason "no EOS within N new tokens" below it; a different gold answer is a wrong answer;
batches reuse their compiled shapes."""

import csv

import jax
import pytest
import rigged as rig

import jaxflow
from jaxflow.sweep import run
from jaxflow.sweep.flows import parse_flow

PHRASE = rig.PHRASE


@pytest.fixture(scope="module")
def rigged(tmp_path_factory):
    """(model, task file of 8 ChooseAttr rows with gold PHRASE except row 2, images)."""
    model_dir, data, images = rig.build(str(tmp_path_factory.mktemp("greedy")))
    return jaxflow.load(model_dir), data, images


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _sweep(model, data, images, out, **kw):
    return run.sweep(model, data, out, flows=[parse_flow("Image->Question")], window_size=1, batch=4, images=images,
                     progress=False, **kw)


def test_long_answers_are_decoded_to_eos(rigged, tmp_path):
    model, data, images = rigged
    summary = _sweep(model, data, images, str(tmp_path / "study"))  # the study's limit: 128
    kept = {r["question_id"]: r["predicted_answer"] for r in _rows(tmp_path / "study" / "results.csv")}
    skipped = {r["question_id"]: r["reason"] for r in _rows(tmp_path / "study" / "skipped.csv")}
    assert summary["kept"] == 7 and set(kept.values()) == {PHRASE}
    assert len(skipped) == 1 and next(iter(skipped.values())).startswith(f"wrong answer: predicted {PHRASE!r}")


def test_answers_without_eos_within_the_limit_are_skipped_with_reason(rigged, tmp_path):
    model, data, images = rigged
    summary = _sweep(model, data, images, str(tmp_path / "short"), max_new_tokens=5)
    reasons = [r["reason"] for r in _rows(tmp_path / "short" / "skipped.csv")]
    assert summary["kept"] == 0 and len(reasons) == 8
    assert all(r.startswith("no EOS within 5 new tokens: decoded 'white and black stri'") for r in reasons), reasons
    # without the filter the unfinished answer is kept as decoded so far
    _sweep(model, data, images, str(tmp_path / "kept"), max_new_tokens=5, filter_correct=False)
    assert {r["predicted_answer"] for r in _rows(tmp_path / "kept" / "results.csv")} == {"white and black stri"}
    with open(tmp_path / "short" / "run.json") as f:
        assert '"max_new_tokens": 5' in f.read()


def test_batches_of_one_shape_compile_once(rigged, tmp_path):
    model, data, images = rigged
    first = _sweep(model, data, images, str(tmp_path / "warm"), limit=4)
    compiles = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/backend_compile_duration":
            compiles.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        second = _sweep(model, data, images, str(tmp_path / "all"))
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert first["compiled_shapes"] == second["compiled_shapes"] and len(second["compiled_shapes"]) == 1
    assert second["kept"] == 7 and not compiles, f"{len(compiles)} compilations for new samples of a known shape"


def test_stop_tokens_are_the_tokenizers_and_generation_configs_eos(tmp_path):
    from types import SimpleNamespace

    from jaxflow.sweep.greedy import stop_tokens

    tok = SimpleNamespace(eos_token_id=2)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": [128001, 2, 128009]}')
    assert stop_tokens(SimpleNamespace(tokenizer=tok, path=str(tmp_path))) == (2, 128001, 128009)
    (tmp_path / "generation_config.json").write_text('{"eos_token_id": 7}')
    assert stop_tokens(SimpleNamespace(tokenizer=tok, path=str(tmp_path))) == (2, 7)
    (tmp_path / "generation_config.json").write_text("{}")
    with pytest.raises(ValueError, match="no eos token"):
        stop_tokens(SimpleNamespace(tokenizer=SimpleNamespace(eos_token_id=None), path=str(tmp_path)))
