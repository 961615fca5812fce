"""The correct-answer filter decodes until EOS, as the study (up to 128 new tokens): a rigged tiny LLaVA whose
greedy answer is an 8-token phrase followed by </s> is kept at the default limit, skipped with the reason
"no EOS within N new tokens" below it; a different gold answer is a wrong answer; batches reuse their
compiled shapes."""

import csv
import os

import jax
import numpy as np
import pytest
import toy_tokenizers
from PIL import Image
from safetensors.numpy import load_file, save_file

import jaxflow
from convert import convert
from jaxflow.inputs import gqa
from jaxflow.sweep import run
from jaxflow.sweep.batching import prepare
from jaxflow.sweep.flows import parse_flow
from jaxflow.testing import tiny_hf_config, write_random_checkpoint

PHRASE = "white and black striped shirt"  # 8 distinct tokens with the toy Llama-2 tokenizer


def _rig_bigram(path, tok, chain):
    """Zero every attention / MLP output so the last hidden state is the last token's embedding, then point
    lm_head so that each token of `chain` is followed by the next (a bigram machine)."""
    file = os.path.join(path, "model.safetensors")
    w = load_file(file)
    for name in w:
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            w[name] = np.zeros_like(w[name])
    emb, norm = w["language_model.model.embed_tokens.weight"], w["language_model.model.norm.weight"]
    head = w["language_model.lm_head.weight"]  # [V, D]
    for prev, nxt in zip(chain[:-1], chain[1:], strict=True):
        h = emb[prev] / np.sqrt(np.mean(emb[prev] ** 2) + 1e-6) * norm  # the final RMSNorm of the embedding
        head[nxt] = 4.0 * h / np.linalg.norm(h)
    save_file(w, file)


@pytest.fixture(scope="module")
def rigged(tmp_path_factory):
    """(model, task file of 8 ChooseAttr rows with gold PHRASE except row 2, images)."""
    root = tmp_path_factory.mktemp("greedy")
    tok = toy_tokenizers.llama2_tokenizer()
    cfg = tiny_hf_config("llava", vocab=len(tok), image_token_index=tok.convert_tokens_to_ids("<image>"))
    src = str(root / "src")
    write_random_checkpoint(src, cfg, scale=0.2)
    toy_tokenizers.save(tok, src)
    with open(os.path.join(gqa.TASK_DIR, "ChooseAttr.csv"), newline="") as f:
        rows = list(csv.DictReader(f))[:8]
    for i, r in enumerate(rows):
        r["answer"] = "a different answer" if i == 2 else PHRASE
    data = root / "ChooseAttr.csv"
    with open(data, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for r in rows:
        h, w_ = int(r["image_h"]), int(r["image_w"])
        Image.fromarray(rng.integers(0, 255, (h, w_, 3), dtype=np.uint8)).save(images / f"{r['img_id']}.jpg")
    # every prompt ends in the same token: the chain starts there
    plain = jaxflow.load(convert(src, str(root / "plain"), progress=False))
    sample = gqa.load_tasks(str(data), str(images))[0][0]
    last = int(next(prepare(plain, [sample], None)).inputs.input_ids[-1])
    chain = [last] + tok.encode(PHRASE, add_special_tokens=False) + [tok.eos_token_id]
    assert len(set(chain)) == len(chain) == 10
    _rig_bigram(src, tok, chain)
    return jaxflow.load(convert(src, str(root / "model"), progress=False)), str(data), str(images)


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
