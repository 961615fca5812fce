"""`jaxflow export --study`: the study's CSV files from sweep results, at the paths and with the columns its
plotting script (vil/merge_lineplot.py) reads; flows under the study's names; `_noHD_noPad` for a NeXT model
run without anyres."""

import csv
import shutil

import pytest
import rigged as rig

import jaxflow
from jaxflow import cli
from jaxflow.inputs import gqa
from jaxflow.sweep import export, run
from jaxflow.sweep.flows import STUDY_FLOWS, parse_flow

FLOWS = [parse_flow(f) for f in list(STUDY_FLOWS) + ["true_option->last", "image->last@0,2"]]
# what the study writes for each flow (its block descriptions), and the folder it saves it under
STUDY_NAMES = {
    "Image->Question": "Image___Question", "Image->Last": "Image___Last", "Question->Last": "Question___Last",
    "Last->Last": "Last___Last", "Image Central Object->Question": "Image_Central_Object___Question",
    "Image Without Central Object->Question": "Image_Without_Central_Object___Question",
    "True Option->Last": "True_Option___Last", "image->last@0,2": "image___last@0,2",
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Two sweeps of a rigged tiny LLaVA-NeXT (answers known): anyres, and without anyres."""
    root = tmp_path_factory.mktemp("export")
    model_dir, data, images = rig.build(str(root), kind="llava_next", rows=4, wrong=(2,),
                                        name="llava-v1.6-vicuna-7b", leak=0.03)  # knockouts change p by ~10%
    kw = dict(flows=FLOWS, window_size=3, batch=4, images=images, progress=False)
    for sub, no_anyres in (("hd", False), ("pad", True)):
        summary = run.sweep(jaxflow.load(model_dir, no_anyres=no_anyres), data, str(root / "runs" / sub), **kw)
        assert summary["kept"] == 3
    return root, data


def _read(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


def test_export_writes_the_study_files(runs, tmp_path):
    root, data = runs
    written = export.export_study(str(tmp_path), [str(root / "runs")])
    assert len(written) == 2 * len(FLOWS)
    # the study's plotting script's path formula, with its task file name and model name
    task_file, model, window = "ChooseAttr.csv", "llava_v1_6_vicuna_7b", 3
    results = {sub: _read(root / "runs" / sub / "results.csv")[1] for sub in ("hd", "pad")}
    for desc, folder in STUDY_NAMES.items():
        for sub, suffix in (("hd", ""), ("pad", "_noHD_noPad")):
            name = folder + suffix
            path = (f"{tmp_path}/output/information_flow/{model}/{task_file.split('_')[-1].split('.csv')[0]}/val/"
                    f"{name}/{task_file.split('.csv')[0]}_window{window}_{name}.csv")
            assert path in written
            columns, rows = _read(path)
            assert columns == ["question_id", "image", "goden answer", "predicted answer", "question", "block_desc",
                               "layer", "base_score_first", "new_score_first", "relative diff first"]
            assert {r["block_desc"] for r in rows} == {desc}
            assert [int(r["layer"]) for r in rows] == [0, 1, 2, 3] * 3
            assert {r["goden answer"] for r in rows} == {r["predicted answer"] for r in rows} == {rig.PHRASE}
            flow = next(f for f in FLOWS if STUDY_NAMES.get(export.block_desc(
                {"source": f.source, "target": f.target, "heads": "all" if f.heads is None else "x",
                 "block_desc": f.name})) == folder)
            ours = {(r["question_id"], r["layer"]): r for r in results[sub] if r["block_desc"] == flow.name}
            assert len(ours) == len(rows)
            for r in rows:
                o = ours[(r["question_id"], r["layer"])]
                assert (r["new_score_first"], r["relative diff first"], r["image"]) == (
                    o["new_score_first"], o["relative_diff_first"], o["image"])
                assert float(r["relative diff first"]) == pytest.approx(
                    (float(r["new_score_first"]) - float(r["base_score_first"])) * 100 / float(r["base_score_first"]))
    # rows in the task file's order, as the study runs it
    with open(data, newline="") as f:
        order = [r["question_id"] for r in csv.DictReader(f)]
    ids = [r["question_id"] for r in _read(written[0])[1]][::4]
    assert ids == [q for q in order if q in ids]
    # the anyres and pad runs measured different inputs, and the knockouts did something
    hd, pad = (_read(p)[1] for p in written[:2])
    assert [r["new_score_first"] for r in hd] != [r["new_score_first"] for r in pad]
    assert max(abs(float(r["relative diff first"])) for r in hd + pad) > 1.0


def test_export_cli_and_errors(runs, tmp_path, capsys):
    root, _ = runs
    assert cli.main(["export", "--study", str(tmp_path / "a"), str(root / "runs" / "hd"), "--model-name", "m"]) == 0
    printed = capsys.readouterr().out.split()
    assert len(printed) == len(FLOWS) and all("/information_flow/m/ChooseAttr/val/" in p for p in printed)
    shutil.copytree(root / "runs" / "hd", tmp_path / "twice" / "hd")
    shutil.copytree(root / "runs" / "hd", tmp_path / "twice" / "again")
    with pytest.raises(export.ExportError, match="both give"):
        export.export_study(str(tmp_path / "b"), [str(tmp_path / "twice")])
    assert cli.main(["export", "--study", str(tmp_path / "c"), str(tmp_path / "nothing-here")]) == 2
    assert "not a directory" in capsys.readouterr().err


def test_dataset_stems(tmp_path):
    packaged = str(gqa.TASK_DIR / "ChooseCat.csv")
    study = "GQA_val_correct_question_with_categoryThatThisChoose_objThisChoose_ChooseCat"
    assert export.dataset_stem(packaged) == study
    copy = tmp_path / "mine.csv"
    shutil.copy(packaged, copy)
    assert export.dataset_stem(str(copy)) == study  # byte-identical: the study's file
    with open(copy, "a") as f:
        f.write("\n")
    assert export.dataset_stem(str(copy)) == "mine"
    assert export.model_name("/ckpt/liuhaotian/llava-v1.5-13b/") == "llava_v1_5_13b"
    assert export.model_name("/runs/llava-v1.5-7b/checkpoint-500") == "llava_v1_5_7b_checkpoint_500"
