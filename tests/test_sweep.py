"""Sweeps on a tiny model with a real GQA task file and synthetic images: incremental == full,
resume after a kill, skipped samples, logit lens, plots."""

import csv
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tiny

import jaxflow
from jaxflow.inputs import gqa
from jaxflow.sweep import engine, run
from jaxflow.sweep.batching import prepare
from jaxflow.sweep.flows import STUDY_FLOWS, parse_flow
from jaxflow.sweep.results import RunMismatchError, Table

GQA = str(gqa.TASK_DIR)
FLOWS = [parse_flow(f) for f in list(STUDY_FLOWS) + ["question->last@0,2", "true_option->last"]]


@pytest.fixture(scope="module")
def world(tmp_path_factory, toy_model_dir):
    """The tiny LLaVA-NeXT with a Vicuna-style tokenizer, 8 ChooseAttr rows and their synthetic images."""
    root = tmp_path_factory.mktemp("sweep")
    model = jaxflow.load(toy_model_dir)
    def bad_box(rows):
        rows[5]["central object x"] = "9000"  # a bad row: box outside the image

    data, images = tiny.task_subset(root, 8, edit=bad_box, missing_images=1)  # the last row's image is missing
    return model, data, images, root


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _key(r):
    return r["question_id"], r["block_desc"], r["layer"]


def test_incremental_equals_full_for_every_flow(world):
    model, data, images, root = world
    kw = dict(flows=FLOWS, window_size=3, batch=4, images=images, filter_correct=False, progress=False)
    inc = run.sweep(model, data, str(root / "inc"), method="incremental", **kw)
    full = run.sweep(model, data, str(root / "full"), method="full", **kw)
    a = {_key(r): float(r["new_score_first"]) for r in _rows(root / "inc" / "results.csv")}
    b = {_key(r): float(r["new_score_first"]) for r in _rows(root / "full" / "results.csv")}
    assert a.keys() == b.keys() and len(a) == inc["kept"] * len(FLOWS) * model.config.text.num_layers
    err = max(abs(a[k] - b[k]) for k in a)
    print(f"incremental vs full: max |p diff| = {err:.2e} over {len(a)} rows")
    assert err < 1e-6
    assert inc["kept"] == full["kept"] == 6
    # the knockouts did something, so the equality is not vacuous
    rel = [abs(float(r["relative_diff_first"])) for r in _rows(root / "inc" / "results.csv")]
    assert max(rel) > 1.0
    skipped = {r["question_id"]: r["reason"] for r in _rows(root / "inc" / "skipped.csv")}
    assert len(skipped) == 2
    assert any("outside" in reason for reason in skipped.values())
    assert any("not found" in reason for reason in skipped.values())


def test_wrong_answers_are_skipped_with_reason(world):
    model, data, images, root = world
    summary = run.sweep(model, data, str(root / "filtered"), flows=FLOWS[:1], window_size=3, images=images,
                        progress=False)
    skipped = _rows(root / "filtered" / "skipped.csv")
    # a random model rarely says "empty", and rarely ends its answer within the study's 128 tokens
    wrong = [r for r in skipped if r["reason"].startswith(("wrong answer", "no EOS within 128 new tokens"))]
    assert summary["kept"] + len(skipped) == 8
    assert len(wrong) == 6 - summary["kept"]


def test_engine_chunking_and_order_do_not_change_results(world):
    model, *_ = world
    cfg = model.config
    rng = np.random.default_rng(1)
    t, b, k = 40, 2, 7
    ids = rng.integers(3, 900, (b, t))
    lengths = np.array([40, 33])
    mask = np.arange(t)[None] < lengths[:, None]
    inputs = model.prepare(ids, attention_mask=mask)
    src, tgt = rng.random((k, b, t)) < 0.3, rng.random((k, b, t)) < 0.2
    layers = rng.random((k, cfg.text.num_layers)) < 0.5
    heads = rng.random((k, cfg.text.num_heads)) < 0.7
    knock = jaxflow.KnockoutMasks(src, tgt, layers, heads)
    token = np.array([5, 9])
    p_full, _ = engine.knockout_probs(model.module, inputs, knock, lengths - 1, token, method="full", chunk=7)
    p_inc, _ = engine.knockout_probs(model.module, inputs, knock, lengths - 1, token, chunk=3)
    assert np.abs(p_full - p_inc).max() < 1e-6


def test_compiled_calls_fit_the_chunk_budget(world):
    """What XLA allocates for a knockout call's temporaries stays within what `auto_chunk` budgets for its
    configurations, and grows with them (so the bound is not met by an empty call)."""
    model, *_ = world
    cfg = model.config
    rng = np.random.default_rng(2)
    t, b, k = 40, 2, 8
    lengths = np.array([40, 31])
    inputs = model.prepare(rng.integers(3, 900, (b, t)), attention_mask=np.arange(t)[None] < lengths[:, None])
    knock = jaxflow.KnockoutMasks(rng.random((k, b, t)) < 0.3, rng.random((k, b, t)) < 0.2,
                                  rng.random((k, cfg.text.num_layers)) < 0.5, np.ones((k, cfg.text.num_heads), bool))
    token = np.array([5, 9])
    temps, real = {}, {}  # (chunk, suffix) -> the largest call's temporaries, its configurations but padding
    for chunk in (1, k):
        calls = [(engine.knockout_incremental, sel, args, args[4].shape[-1]) for sel, args in
                 engine.incremental_calls(model.module, inputs, knock, lengths - 1, token, chunk=chunk)]
        calls += [(engine.knockout_full, sel, args, None) for sel, args in
                  engine.full_calls(model.module, inputs, knock, lengths - 1, token, chunk=chunk)][:1]
        for call, sel, args, suffix in calls:
            n = len(args[3 if suffix else 2].layers)  # configurations in the call (a padded last chunk included)
            temp = call.lower(*args).compile().memory_analysis().temp_size_in_bytes
            assert 0 < temp <= n * engine.configuration_bytes(model.module, b, t, suffix), (suffix, n, temp)
            if temp > temps.get((chunk, suffix), 0):
                temps[chunk, suffix], real[chunk, suffix] = temp, len(sel)
    grown = [s for c, s in temps if c == k and real[c, s] >= 4]  # calls of 4 or more distinct configurations
    assert None in grown and len(grown) >= 2, real
    assert all(temps[k, s] > 2 * temps[1, s] for s in grown), temps


def test_suffixes_are_sized_per_configuration():
    """A configuration recomputes from its first target on (the latest row decides), padded to its bucket."""
    b, t = 2, 20
    lengths = np.array([20, 15])
    target = np.zeros((3, b, t), bool)
    target[0, 0, 19] = target[0, 1, 14] = True  # each row's last position
    target[1, :, 5:8] = True  # a question at 5..7: 15 positions for the first row
    knock = jaxflow.KnockoutMasks(target, target, np.ones((3, 2), bool), np.ones((3, 4), bool))
    t0, spans = engine.suffix_starts(knock, lengths)
    assert t0.tolist() == [[19, 14], [5, 5], [19, 14]] and spans.tolist() == [1, 15, 1]
    assert [engine.suffix_bucket(s, t) for s in (1, 2, 3, 5, 15, 17, 33)] == [1, 2, 4, 8, 16, 20, 20]
    assert [engine.suffix_bucket(s, 100) for s in (9, 17, 32, 33, 49)] == [16, 24, 32, 40, 56]
    q_pos, q_valid, last_in = engine.suffix_plan(t0[1:2], lengths, 16, t)
    assert q_pos[0, 0].tolist() == list(range(5, 20)) + [19] and q_valid[0, 1].sum() == 10
    assert last_in.tolist() == [[14, 9]]


def test_configurations_share_rows_until_their_cuts_differ():
    """Two flows (one target, two sources) at every layer of 6 with window 3, and a copy of one configuration:
    the windows 0-1 and 0-2 of a flow are one row through layers 0-1 and fork at layer 2, the copy runs in
    its original's row, and no two configurations that differ anywhere end in the same row."""
    from jaxflow.sweep.flows import window

    num_layers, b, t = 6, 2, 10
    layers = np.zeros((13, num_layers), bool)
    for flow in range(2):
        for layer in range(num_layers):
            layers[6 * flow + layer, window(layer, 3, num_layers)] = True
    layers[12] = layers[3]
    source = np.zeros((13, b, t), bool)
    source[:6, :, 1:4] = source[12, :, 1:4] = True
    source[6:12, :, 4:6] = True
    target = np.zeros((13, b, t), bool)
    target[:, :, 7:9] = True
    knock = jaxflow.KnockoutMasks(source, target, layers, np.ones((13, 4), bool))
    starts = engine.window_starts(knock)
    t0, _ = engine.suffix_starts(knock, np.array([10, 10]))
    plan = engine.share_rows(knock, starts, t0)
    assert [len(r) for r in plan.rows] == [2, 4, 8, 10, 12, 12]  # unshared: 2, 4, 7, 9, 11, 13 (+ the copy)
    assert plan.parents[2] == (0, 1, 2, 3, 0, 1, -1, -1)  # rows go on, the windows 0-2 fork, two new rows
    assert plan.out[0] != plan.out[1] and plan.out[3] == plan.out[12] and len(set(plan.out)) == 12
    for layer, (rows, parents) in enumerate(zip(plan.rows, plan.parents, strict=True)):
        for rep, parent in zip(rows, parents, strict=True):
            assert parent >= 0 or starts[rep] == layer  # a new row starts at its configuration's window
    for c, r in enumerate(plan.out):  # each configuration's row ran its cut: its representative cuts alike
        rep = plan.rows[-1][r]
        assert (layers[rep] == layers[c]).all() and (source[rep] == source[c]).all()


def test_a_task_file_compiles_the_knockouts_a_handful_of_times(world, tmp_path):
    """The flows target the question (one suffix bucket per batch) or the last position (a suffix of one), so
    each batch compiles the incremental call at most twice: at most 6 for the 6 samples in batches of 2, and
    a second run of the same shapes not at all."""
    model, data, images, _ = world
    jax.clear_caches()
    kw = dict(flows=FLOWS, window_size=3, batch=2, images=images, filter_correct=False, progress=False)
    first = run.sweep(model, data, str(tmp_path / "a"), **kw)
    print(f"{first['knockout_compiles']} knockout compilations for batch shapes {first['compiled_shapes']}")
    assert first["kept"] == 6 and 2 <= first["knockout_compiles"] <= 6
    assert run.sweep(model, data, str(tmp_path / "b"), **kw)["knockout_compiles"] == 0


def test_table_repairs_partial_and_incomplete_writes(tmp_path):
    path = str(tmp_path / "t.csv")
    t = Table(path, ["question_id", "v"], 2)
    t.append("a", [{"question_id": "a", "v": 1}, {"question_id": "a", "v": 2}])
    with open(path, "a") as f:  # a crash mid-sample: one of two rows, then half a line
        f.write("b,1\nb,")
    t2 = Table(path, ["question_id", "v"], 2)
    t2.append("c", [{"question_id": "c", "v": 3}, {"question_id": "c", "v": 4}])
    assert [r["question_id"] for r in t2.read()] == ["a", "a", "c", "c"]
    with open(path, "a") as f:  # half a line after complete keys only
        f.write("d,")
    t2 = Table(path, ["question_id", "v"], 2)
    assert t2.done == {"a", "c"}
    with pytest.raises(ValueError, match="already recorded"):
        t2.append("a", [{"question_id": "a", "v": 1}, {"question_id": "a", "v": 2}])
    with pytest.raises(RunMismatchError):
        Table(path, ["question_id", "other"], 2)


def test_resume_after_kill_gives_the_uninterrupted_table(world):
    model, data, images, root = world
    out = root / "killed"
    cmd = [sys.executable, "-m", "jaxflow.cli", "sweep", "--model", model.path, "--data", data, "--images", images,
           "--out", str(out), "--window", "3", "--batch", "1", "--keep-incorrect", "--flows", "Image->Question",
           "Question->Last"]
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device: the conftest's 8 are for sharding
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
                            env=env)
    results = out / "results.csv"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if results.exists() and len(_rows(results)) >= 1:
            os.killpg(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.wait()
    done_at_kill = {r["question_id"] for r in _rows(results)}
    assert 1 <= len(done_at_kill) < 6, "the run was not interrupted mid-way"
    with open(results, "a") as f:  # what a kill during a write can leave behind
        f.write(_rows_text(results).splitlines()[-1][:17])
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    resumed = _rows(results)
    keys = [_key(r) for r in resumed]
    assert len(keys) == len(set(keys)) == 6 * 2 * model.config.text.num_layers
    reference = {_key(r): r["new_score_first"] for r in _rows(root / "inc" / "results.csv")
                 if r["block_desc"] in ("Image->Question", "Question->Last")}
    assert {k: r["new_score_first"] for k, r in zip(keys, resumed, strict=True)}.keys() == reference.keys()
    for r in resumed:
        assert abs(float(r["new_score_first"]) - float(reference[_key(r)])) < 1e-5
    with pytest.raises(RunMismatchError):
        run.sweep(model, data, str(out), flows=FLOWS[:1], window_size=5, images=images, progress=False)


def _rows_text(path):
    with open(path) as f:
        return f.read()


def test_logit_lens_matches_forward_hidden_states(world):
    model, data, images, root = world
    run.sweep(model, data, str(root / "lens"), flows=[], lens=True, images=images, filter_correct=False,
              progress=False)
    rows = _rows(root / "lens" / "lens.csv")
    qid = rows[0]["question_id"]
    sample = next(s for s in gqa.load_tasks(data, images)[0] if s.question_id == qid)
    prepared = next(prepare(model, [sample], None))
    ids = prepared.inputs.input_ids[None]
    out = model.forward(ids, prepared.inputs.pixel_values, np.asarray([prepared.inputs.image_size]),
                        return_hidden_states=True)
    lm = model.module.language_model
    hidden = np.asarray(out.hidden_states)[:, 0, -1]  # [L + 1, D]
    tok = int(rows[0]["answer_token"])
    for norm in (False, True):
        h = lm.norm(hidden) if norm else hidden
        p = np.asarray(jax.nn.softmax(lm.unembed(h), axis=-1))[:, tok]
        got = [float(r["p_answer"]) for r in rows if r["question_id"] == qid and r["norm"] == str(norm)]
        assert np.abs(np.asarray(got) - p).max() < 1e-5
    assert all(r["p_false_option"] != "" for r in rows)  # ChooseAttr has options


def test_plots_and_summary(world, tmp_path):
    model, data, images, root = world
    from jaxflow.sweep.plots import flow_curves, plot

    written = plot(str(root / "inc"), str(tmp_path))
    names = {os.path.basename(p) for p in written}
    assert {"flows_ChooseAttr.png", "flows_ChooseAttr.pdf", "summary.md", "summary.csv"} <= names
    assert all(os.path.getsize(p) > 1000 for p in written if p.endswith(".png"))
    curves = flow_curves(_rows(root / "inc" / "results.csv"))["ChooseAttr"]
    summary = _rows(tmp_path / "summary.csv")
    for row in summary:
        layers, mean, _, n = curves[row["flow"]]
        assert int(row["largest_drop_layer"]) == int(layers[np.argmin(mean)])
        assert int(row["samples"]) == n == 6
    lens_written = plot(str(root / "lens"), str(tmp_path / "lens"))
    assert any(p.endswith("lens_ChooseAttr.png") for p in lens_written)


def test_run_json_records_the_template_and_first_prompt(world):
    """run.json holds the template the run used (the checkpoint's by default, `--template` otherwise) and the
    rendered prompt of the first row, the image placeholder not expanded."""
    import json

    from jaxflow.inputs.prompts import build_prompt

    model, data, images, root = world
    first = gqa.load_tasks(data, check_images=False)[0][0].question
    for template, out in ((None, "default-template"), ("plain", "plain-template")):
        run.sweep(model, data, str(root / out), flows=FLOWS[:1], window_size=3, images=images, limit=1,
                  filter_correct=False, progress=False, template=template)
        with open(root / out / "run.json") as f:
            header = json.load(f)
        expected = template or "vicuna_v1"  # the toy's Llama-2 tokenizer has no chat template
        assert header["template"] == expected
        assert header["prompt"] == build_prompt(first, expected).text and header["prompt"].count("<image>") == 1
    with pytest.raises(RunMismatchError, match="template"):  # resuming with another template is refused
        run.sweep(model, data, str(root / "plain-template"), flows=FLOWS[:1], window_size=3, images=images, limit=1,
                  filter_correct=False, progress=False, template="vicuna_v1")
