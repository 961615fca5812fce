"""`jaxflow trace` (causal tracing, issue 28) on the shipped toy LLaVA-1.5 and a few toy-world rows: the table's
rows, its numbers against the model's full forward with `Patch`, `Noise` and a counterfactual source, ROME's
identity (resid_pre restored everywhere it was corrupted is the clean run), resume, attribution, skips, errors,
and the plots and export of a trace."""

import csv
import os
import shutil

import jax
import numpy as np
import pytest

import jaxflow
from jaxflow import world
from jaxflow.cli import main
from jaxflow.inputs import gqa
from jaxflow.sweep import trace as tracing
from jaxflow.sweep.batching import prepare
from jaxflow.sweep.results import RunMismatchError

N = 6  # toy-world ChooseAttr rows
WINDOW = 3
BATCH = 8  # one batch: one set of compiled shapes


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _key(r):
    return r["question_id"], r["site"], r["layer"], r["region"]


@pytest.fixture(scope="module")
def toy(tmp_path_factory, toy_llava_dir):
    """The toy model, N ChooseAttr rows with a counterfactual_image column (row i: row i + 1's image; the last
    row's cell empty, row 1's naming a missing image) and the CLI's exact image-noise trace of them."""
    root = tmp_path_factory.mktemp("trace")
    model = jaxflow.load(toy_llava_dir)
    data = world.generate(root / "world", N, seed=7, tasks=["ChooseAttr"])["ChooseAttr"]
    rows = _rows(data)
    for i, r in enumerate(rows):
        r["counterfactual_image"] = rows[i + 1]["img_id"] if i + 1 < N else ""
    rows[1]["counterfactual_image"] = "404"
    counterfactual = str(root / "ChooseAttr.csv")
    with open(counterfactual, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    images = str(root / "world" / "images")
    out = str(root / "noise")
    assert main(["trace", "--model", toy_llava_dir, "--data", data, "--images", images, "--out", out,
                 "--corrupt", "image-noise", "--window", str(WINDOW), "--batch", str(BATCH)]) == 0
    return model, data, counterfactual, images, root


def _inputs(model, data, images, qid):
    """The sample's own inputs (no padding), as a dict of `Model.logits`'s arguments, and its regions."""
    sample = next(s for s in gqa.load_tasks(data, images)[0] if s.question_id == qid)
    p = next(prepare(model, [sample], None))
    return {"input_ids": p.inputs.input_ids[None], "pixel_values": p.inputs.pixel_values}, p.inputs.regions


def _p(model, logits, token):
    """p(token) at the last position of logits [K, 1, T, V] -> [K]."""
    return np.asarray(jax.nn.softmax(np.asarray(logits)[:, 0, -1], axis=-1))[:, token]


def test_cli_writes_a_row_per_site_layer_and_region(toy):
    model, data, _, _, root = toy
    num_layers = model.config.text.num_layers
    rows = _rows(root / "noise" / "tracing.csv")
    assert list(rows[0]) == tracing.TRACE_COLUMNS
    kept = {r["question_id"] for r in rows}
    skipped = _rows(root / "noise" / "skipped.csv")
    assert len(kept) + len(skipped) == N and len(kept) >= 3
    keys = [_key(r) for r in rows]
    expected = {(q, s, str(layer), g) for q in kept for s in tracing.TRACE_SITES for layer in range(num_layers)
                for g in tracing.TRACE_REGIONS}
    assert len(keys) == len(set(keys)) and set(keys) == expected
    for r in rows:
        layer = int(r["layer"])
        span = jaxflow.window(layer, 1 if r["site"] == "resid_pre" else WINDOW, num_layers)
        assert (int(r["window_start"]), int(r["window_end"])) == (span[0], span[-1])
        assert r["window_layers"] == (f"{span[0]}-{span[-1]}" if len(span) > 1 else str(span[0]))
        assert float(r["p_corrupt"]) < float(r["p_clean"])  # the rule: else the sample is skipped
        if int(r["n_positions"]):
            assert abs(float(r["indirect_effect"]) - (float(r["p_restored"]) - float(r["p_corrupt"]))) < 1e-7
        else:
            assert r["p_restored"] == r["indirect_effect"] == ""
    assert any(float(r["indirect_effect"]) > 0.1 for r in rows if r["indirect_effect"])  # restoring matters


def test_restored_probabilities_equal_the_full_forward(toy):
    """A few rows against `Model.logits` with the noise on the clean inputs and the clean run as the source."""
    model, data, _, images, root = toy
    rows = _rows(root / "noise" / "tracing.csv")
    qid = rows[0]["question_id"]
    inputs, regions = _inputs(model, data, images, qid)
    noise = jaxflow.Noise(regions["image"], seed=int(rows[0]["noise_seed"]))
    mine = [r for r in rows if r["question_id"] == qid and r["region"] in ("image", "question", "last")
            and r["layer"] in ("0", "2", "5")]
    patches = [jaxflow.Patch(r["site"], list(range(int(r["window_start"]), int(r["window_end"]) + 1)),
                             regions[r["region"]]) for r in mine]
    token = int(rows[0]["answer_token"])
    full = _p(model, model.logits(**inputs, noise=noise, patches=patches, source=inputs), token)
    err = max(abs(float(r["p_restored"]) - p) for r, p in zip(mine, full, strict=True))
    print(f"trace vs full forward: max |p diff| = {err:.1e} over {len(mine)} rows")
    assert err < 1e-6
    assert abs(float(rows[0]["p_clean"]) - _p(model, model.logits(**inputs)[None], token)[0]) < 1e-5
    assert abs(float(rows[0]["p_corrupt"]) - _p(model, model.logits(**inputs, noise=noise)[None], token)[0]) < 1e-5
    # ROME's identity: resid_pre restored at layer 0 at every corrupted position is the clean run
    for r in rows:
        if (r["site"], r["layer"], r["region"]) == ("resid_pre", "0", "image"):
            assert abs(float(r["p_restored"]) - float(r["p_clean"])) < 1e-5


def test_resume_continues_without_duplicates(toy):
    """A run killed after its first samples (and mid-write) continues where it stopped: the table is the
    uninterrupted run's."""
    model, data, _, images, root = toy
    out = root / "resumed"
    shutil.copytree(root / "noise", out)
    text = (out / "tracing.csv").read_text().splitlines(keepends=True)
    per_sample = len(tracing.TRACE_SITES) * model.config.text.num_layers * len(tracing.TRACE_REGIONS)
    (out / "tracing.csv").write_text("".join(text[:1 + 2 * per_sample]) + text[1 + 2 * per_sample][:30])
    kw = dict(corrupt="image-noise", window_size=WINDOW, images=images, batch=BATCH, progress=False)
    summary = tracing.trace(model, data, str(out), **kw)
    resumed = _rows(out / "tracing.csv")
    keys = [_key(r) for r in resumed]
    reference = {_key(r): r for r in _rows(root / "noise" / "tracing.csv")}
    assert len(keys) == len(set(keys)) and set(keys) == set(reference)
    assert summary["kept"] == len({r["question_id"] for r in resumed})
    for r in resumed:
        assert abs(float(r["p_restored"] or 0) - float(reference[_key(r)]["p_restored"] or 0)) < 1e-5
    with pytest.raises(RunMismatchError, match="corrupt"):
        tracing.trace(model, data, str(out), **{**kw, "corrupt": "question-noise"})


def test_attribution_fills_the_same_table(toy):
    model, data, _, images, root = toy
    out = str(root / "attribution")
    assert main(["trace", "--model", model.path, "--data", data, "--images", images, "--out", out, "--corrupt",
                 "image-noise", "--window", str(WINDOW), "--batch", str(BATCH), "--method", "attribution"]) == 0
    exact = {_key(r): r for r in _rows(root / "noise" / "tracing.csv")}
    atp = {_key(r): r for r in _rows(os.path.join(out, "tracing.csv"))}
    assert atp.keys() == exact.keys() and {r["method"] for r in atp.values()} == {"attribution"}
    for k, r in atp.items():
        for col in ("p_clean", "p_corrupt"):
            assert abs(float(r[col]) - float(exact[k][col])) < 1e-5
        assert np.isfinite(float(r["p_restored"])) if r["p_restored"] else r["n_positions"] == "0"
    # one sample's estimates are the sums of `Model.attribution`'s scores over each configuration
    r0 = next(iter(atp.values()))
    inputs, regions = _inputs(model, data, images, r0["question_id"])
    noise = jaxflow.Noise(regions["image"], seed=int(r0["noise_seed"]))
    scores = model.attribution(**inputs, source=inputs, noise=noise, token=int(r0["answer_token"]))
    for r in atp.values():
        if r["question_id"] == r0["question_id"] and r["p_restored"]:
            layers = slice(int(r["window_start"]), int(r["window_end"]) + 1)
            est = float(r["p_corrupt"]) + scores[r["site"]][0, layers][:, regions[r["region"]]].sum()
            assert abs(float(r["p_restored"]) - est) < 1e-5
    # how well the linear estimate follows the exact effect under 3x noise (reported, not a property to assert)
    a, e = (np.asarray([float(t[k]["indirect_effect"]) for k in exact if exact[k]["indirect_effect"]])
            for t in (atp, exact))
    print(f"attribution vs exact indirect effects: Pearson r = {np.corrcoef(a, e)[0, 1]:.3f} over {len(a)} rows")


def test_counterfactual_images(toy):
    model, _, data, images, root = toy
    out = str(root / "counterfactual")
    summary = tracing.trace(model, data, out, corrupt="counterfactual", sites=["resid_pre", "mlp_out"],
                            regions=["image", "last"], window_size=WINDOW, images=images, batch=BATCH,
                            progress=False)
    skipped = {r["question_id"]: r["reason"] for r in _rows(os.path.join(out, "skipped.csv"))}
    qids = [s.question_id for s in gqa.load_tasks(data, images)[0]]
    assert "empty" in skipped[qids[-1]]
    assert "404.jpg" in skipped[qids[1]] and "not found" in skipped[qids[1]]
    rows = _rows(os.path.join(out, "tracing.csv"))
    assert summary["kept"] == len({r["question_id"] for r in rows}) >= 1
    r0 = rows[0]
    clean, regions = _inputs(model, data, images, r0["question_id"])
    sample = next(s for s in gqa.load_tasks(data, images)[0] if s.question_id == r0["question_id"])
    corrupted, _ = _inputs(model, data, images, next(s.question_id for s in gqa.load_tasks(data, images)[0]
                                                     if s.img_id == sample.counterfactual_image))
    corrupted = {**clean, "pixel_values": corrupted["pixel_values"]}  # the other image, this question
    token = int(r0["answer_token"])
    assert abs(float(r0["p_corrupt"]) - _p(model, model.logits(**corrupted)[None], token)[0]) < 1e-5
    mine = [r for r in rows if r["question_id"] == r0["question_id"]]
    patches = [jaxflow.Patch(r["site"], list(range(int(r["window_start"]), int(r["window_end"]) + 1)),
                             regions[r["region"]]) for r in mine]
    full = _p(model, model.logits(**corrupted, patches=patches, source=clean), token)
    assert max(abs(float(r["p_restored"]) - p) for r, p in zip(mine, full, strict=True)) < 1e-5
    assert {r["counterfactual_image"] for r in mine} == {sample.counterfactual_image}


def test_no_drop_is_skipped_with_its_reason(toy):
    model, data, _, images, root = toy
    out = str(root / "no-noise")
    summary = tracing.trace(model, data, out, corrupt="image-noise", regions=["last"], sites=["resid_pre"],
                            noise_scale=0.0, images=images, limit=2, batch=BATCH, progress=False)
    reasons = [r["reason"] for r in _rows(os.path.join(out, "skipped.csv"))]
    assert summary["kept"] == 0 and len(reasons) == 2
    assert all("did not lower" in r or r.startswith("wrong answer") for r in reasons)
    assert any("did not lower" in r for r in reasons)


def fails(capsys, args, *needles):
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("jaxflow trace: error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])


def test_bad_arguments_are_one_line(toy, capsys, tmp_path):
    model, data, _, images, _ = toy
    common = ["trace", "--model", model.path, "--data", data, "--images", images, "--out", str(tmp_path / "x")]
    fails(capsys, common + ["--corrupt", "image-noise", "--sites", "resid_pre,resid_post"], "--sites: 'resid_post'")
    fails(capsys, common + ["--corrupt", "image-noise", "--regions", "image,imag"], "--regions: 'imag'")
    plain = str(tmp_path / "plain.csv")  # the task file without the world's counterfactual columns
    rows = _rows(data)
    with open(plain, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=[c for c in rows[0] if not c.startswith("counterfactual_")],
                           extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    fails(capsys, [*common[:3], "--data", plain, *common[5:], "--corrupt", "counterfactual"], plain,
          "counterfactual_image column")
    with pytest.raises(SystemExit):
        main(common + ["--corrupt", "blur"])
    assert "argument --corrupt: invalid choice: 'blur'" in capsys.readouterr().err.strip().splitlines()[-1]
    assert not os.path.exists(tmp_path / "x")  # refused before anything is written


def test_plot_and_export(toy, tmp_path):
    model, _, _, _, root = toy
    from jaxflow.sweep.export import TRACING_COLUMNS
    from jaxflow.sweep.plots import trace_stats

    assert main(["plot", str(root / "noise"), "--out", str(tmp_path / "plots")]) == 0
    for site in tracing.TRACE_SITES:
        assert (tmp_path / "plots" / f"trace_ChooseAttr_image-noise_exact_{site}.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "trace_ChooseAttr_image-noise_exact.png").stat().st_size > 1000
    rows = _rows(root / "noise" / "tracing.csv")
    summary = _rows(tmp_path / "plots" / "trace_summary.csv")
    assert len(summary) == len(tracing.TRACE_SITES) * len(tracing.TRACE_REGIONS)
    assert main(["export", str(root), "--tracing", str(tmp_path / "tracing.csv")]) == 0
    exported = _rows(tmp_path / "tracing.csv")
    assert list(exported[0]) == TRACING_COLUMNS
    assert {r["method"] for r in exported} == {"exact", "attribution"}  # both runs under root
    # one row: the mean and CI of that site, region and layer's indirect effects over the samples
    r = next(e for e in exported if (e["run"], e["site"], e["region"], e["layer"]) == (str(root / "noise"), "mlp_out",
                                                                                      "image", "2"))
    effects = np.asarray([float(x["indirect_effect"]) for x in rows
                          if (x["site"], x["region"], x["layer"]) == ("mlp_out", "image", "2")])
    half = 1.96 * effects.std(ddof=1) / np.sqrt(len(effects))
    assert int(r["n"]) == len(effects) and r["window_layers"] == "1-3"
    np.testing.assert_allclose([float(r[c]) for c in ("mean", "ci_low", "ci_high")],
                               [effects.mean(), effects.mean() - half, effects.mean() + half], rtol=1e-9)
    assert trace_stats(rows)[("ChooseAttr", "image-noise", "exact")]["mlp_out"]["image"][3] == len(effects)
