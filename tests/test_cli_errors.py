"""Every command given a bad input prints one line, `jaxflow <command>: error: ...` naming what is wrong, and
exits with status 2; `--debug` shows the traceback instead."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from jaxflow import cli
from jaxflow.testing import tiny_hf_config, write_random_checkpoint

ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}


def fails(capsys, args: list[str], *needles: str) -> str:
    """cli.main(args) exits 2 with exactly one stderr line for the command, holding every needle."""
    assert cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(f"jaxflow {args[0]}: error: "), err
    for needle in needles:
        assert needle in err[0], (needle, err[0])
    return err[0]


def usage_error(capsys, args: list[str], *needles: str) -> str:
    """argparse's own refusal: exit status 2 and `jaxflow <command>: error: ...` as its last line."""
    with pytest.raises(SystemExit) as info:
        cli.main(args)
    assert info.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert last.startswith(f"jaxflow {args[0]}: error: "), last
    for needle in needles:
        assert needle in last, (needle, last)
    return last


@pytest.fixture(scope="module")
def unsupported(tmp_path_factory):
    """A checkpoint whose config names a model type jaxflow does not implement."""
    src = write_random_checkpoint(str(tmp_path_factory.mktemp("mistral") / "src"), tiny_hf_config())
    path = os.path.join(src, "config.json")
    cfg = json.load(open(path))
    cfg["model_type"] = "mistral"
    json.dump(cfg, open(path, "w"))
    return src


@pytest.fixture
def images(tmp_path):
    (tmp_path / "images").mkdir()
    return str(tmp_path / "images")


@pytest.fixture
def task_missing_column(tmp_path):
    path = tmp_path / "Broken.csv"
    path.write_text("question_id,question,answer,image_w,image_h,central object x,central object y,"
                    "central object w,central object h\n1,Is it red?,yes,10,10,0,0,5,5\n")
    return str(path)


# ---- convert, verify -------------------------------------------------------------------------------


def test_convert(capsys, tmp_path, unsupported):
    fails(capsys, ["convert", str(tmp_path / "nope"), str(tmp_path / "out")],
          f"{tmp_path / 'nope'}: no such checkpoint file or directory")
    line = fails(capsys, ["convert", unsupported, str(tmp_path / "out")],
                 f"error: {unsupported}/config.json: model_type='mistral' is not supported")
    assert ".tmp-" not in line
    (tmp_path / "taken").mkdir()
    fails(capsys, ["convert", unsupported, str(tmp_path / "taken")], "taken: already exists")
    usage_error(capsys, ["convert", unsupported, str(tmp_path / "out"), "--dtype", "float8"],
                "argument --dtype: invalid choice: 'float8'")
    assert not os.path.exists(tmp_path / "out")


def test_convert_message_of_several_lines_joined(capsys, tmp_path, unsupported):
    """The converter lists missing and unexpected tensors on lines of their own; the command prints one line."""
    from safetensors.numpy import load_file, save_file

    src = shutil.copytree(unsupported, str(tmp_path / "src"))
    cfg = json.load(open(os.path.join(src, "config.json")))
    cfg["model_type"] = "llava"
    json.dump(cfg, open(os.path.join(src, "config.json"), "w"))
    file = os.path.join(src, "model.safetensors")
    tensors = load_file(file)
    tensors["language_model.model.layers.0.mlp.extra.weight"] = tensors.pop(
        "language_model.model.layers.0.mlp.up_proj.weight")
    save_file(tensors, file)
    fails(capsys, ["convert", src, str(tmp_path / "out")], "checkpoint does not match its config: missing tensors (1)",
          "; unexpected tensors (1): ['language_model.model.layers.0.mlp.extra.weight']")


def test_verify(capsys, tmp_path, unsupported):
    fails(capsys, ["verify", str(tmp_path / "nope")], "not a converted jaxflow model")
    fails(capsys, ["verify", unsupported], f"{unsupported}/jaxflow.json: not a converted jaxflow model")


# ---- sweep, lens -----------------------------------------------------------------------------------


def test_sweep_before_the_model_loads(capsys, tmp_path, images, task_missing_column):
    """Bad flags and inputs that need no model are refused before it loads (the model path here is bad too)."""
    common = ["--model", str(tmp_path / "no-model"), "--out", str(tmp_path / "runs")]
    for command in ("sweep", "lens"):
        fails(capsys, [command, *common, "--data", "ChooseAttr"], "no image folder given (--images")
    fails(capsys, ["sweep", *common, "--data", "ChooseAttr", "--images", str(tmp_path / "nowhere")],
          f"{tmp_path / 'nowhere'}: no such image folder (--images)")
    fails(capsys, ["sweep", *common, "--data", task_missing_column, "--images", images],
          "Broken.csv: not a GQA task file, missing columns: img_id")
    fails(capsys, ["sweep", *common, "--data", "ChooseAtr", "--images", images],
          "ChooseAtr: no such task file, and not a packaged task name")
    fails(capsys, ["sweep", *common, "--data", "ChooseAttr", "--images", images, "--flows", "banana"],
          "--flows: 'banana' is not SOURCE->TARGET")
    fails(capsys, ["sweep", *common, "--data", "ChooseAttr", "--images", images, "--mesh", "data=banana"],
          "--mesh 'data=banana': expected data=N,model=M")
    usage_error(capsys, ["sweep", *common, "--data", "ChooseAttr", "--window", "0"],
                "argument --window: expected a positive integer, got '0'")
    usage_error(capsys, ["lens", "--data", "ChooseAttr"], "the following arguments are required: --model, --out")
    assert not os.path.exists(tmp_path / "runs")


def test_sweep_bad_model(capsys, tmp_path, images, unsupported):
    common = ["--data", "ChooseAttr", "--images", images, "--out", str(tmp_path / "runs")]
    fails(capsys, ["sweep", "--model", str(tmp_path / "no-model"), *common],
          f"{tmp_path / 'no-model'}/config.json: no config.json in the checkpoint directory")
    fails(capsys, ["sweep", "--model", unsupported, *common], "model_type='mistral' is not supported")


def test_sweep_with_the_model(capsys, tmp_path, images, toy_model_dir):
    common = ["--model", toy_model_dir, "--data", "ChooseAttr", "--images", images]
    fails(capsys, ["sweep", *common, "--out", str(tmp_path / "a"), "--flows", "nowhere->last"],
          "unknown region(s) nowhere")
    other = tmp_path / "other"
    other.mkdir()
    (other / "run.json").write_text(json.dumps({"model": "/elsewhere", "kind": "sweep"}))
    fails(capsys, ["sweep", *common, "--out", str(other)], "run.json: this directory holds a run with other settings")


# ---- plot, export, regions, demo ---------------------------------------------------------------------


def test_plot_and_export(capsys, tmp_path):
    fails(capsys, ["plot", str(tmp_path / "nope"), "--out", str(tmp_path / "fig")], "nope: no such directory")
    (tmp_path / "empty").mkdir()
    fails(capsys, ["plot", str(tmp_path / "empty"), "--out", str(tmp_path / "fig")],
          "no results.csv, lens.csv or tracing.csv found")
    fails(capsys, ["export", "--study", str(tmp_path / "study"), str(tmp_path / "nope")], "nope: not a directory")
    fails(capsys, ["export", "--study", str(tmp_path / "study"), str(tmp_path / "empty")],
          "no knockout sweep results")
    fails(capsys, ["export", "--tracing", str(tmp_path / "t.csv"), str(tmp_path / "empty")], "no tracing results")
    fails(capsys, ["export", str(tmp_path / "empty")], "--study OUT (knockout sweeps) or --tracing FILE")


def test_regions(capsys, tmp_path, toy_model_dir):
    from PIL import Image

    image = str(tmp_path / "img.png")
    Image.new("RGB", (80, 60), "white").save(image)
    args = ["regions", "--model", toy_model_dir, "--image", image, "--question", "Is the jar full or empty?"]
    fails(capsys, args + ["--box", "1,2,banana,4"], "--box '1,2,banana,4': expected x,y,w,h (four numbers)")
    fails(capsys, args + ["--substring", "zebra"], "substring 'zebra' not found in the prompt")
    fails(capsys, ["regions", "--model", str(tmp_path / "nope"), *args[3:]], "no config.json")
    not_image = tmp_path / "notes.jpg"
    not_image.write_text("not a picture")
    fails(capsys, [*args[:3], "--image", str(not_image), *args[5:]], "cannot identify image file", "notes.jpg")
    fails(capsys, [*args[:3], "--image", str(tmp_path / "missing.jpg"), *args[5:]], "missing.jpg")


def test_demo(capsys, tmp_path):
    taken = tmp_path / "file"
    taken.write_text("")
    fails(capsys, ["demo", "--out", str(taken)], "File exists", str(taken))
    usage_error(capsys, ["demo", "--samples-per-task", "-3"], "argument --samples-per-task: expected a positive "
                "integer, got '-3'")


# ---- --debug, and the real process ---------------------------------------------------------------------


def test_debug_shows_the_traceback(tmp_path):
    for args in (["--debug", "verify", str(tmp_path)], ["verify", str(tmp_path), "--debug"]):
        with pytest.raises(FileNotFoundError, match="not a converted jaxflow model"):
            cli.main(args)


def test_closed_event_loop_tail_dropped(monkeypatch):
    """What orbax's storage callbacks report after a failed read, and only that, is dropped."""
    import types

    seen = []
    monkeypatch.setattr(sys, "unraisablehook", seen.append)
    cli.quiet_closed_event_loop()
    tail, other = (types.SimpleNamespace(exc_value=RuntimeError(m)) for m in ("Event loop is closed", "other"))
    sys.unraisablehook(tail)
    sys.unraisablehook(other)
    assert seen == [other]


def test_unretrieved_storage_reads_not_logged():
    """asyncio logs the other failed reads of a group when they are collected, as a Task (traceback in asyncio
    only) or a bare Future (no traceback); both are dropped, an unrelated unretrieved error is not."""
    import asyncio
    import logging

    storage = ValueError("DATA_LOSS: Error opening \"zarr\" driver: ... [tensorstore_spec='{}']")
    other = ValueError("something else")

    def report(kind, exc):  # what asyncio's default exception handler logs
        record = logging.LogRecord("asyncio", logging.ERROR, "", 0, f"{kind} exception was never retrieved\n"
                                   f"future: <{kind} finished>", None, (type(exc), exc, exc.__traceback__))
        return cli._storage_task_report(record)

    async def fail(exc):
        raise exc

    loop = asyncio.new_event_loop()
    task = loop.create_task(fail(storage))
    loop.run_until_complete(asyncio.wait([task]))
    loop.close()
    assert task.exception().__traceback__ is not None  # a traceback through asyncio's frames, none of orbax's
    assert not report("Task", task.exception()) and not report("Future", storage)
    assert report("Task", other) and report("Future", other)
    unrelated = logging.LogRecord("asyncio", logging.ERROR, "", 0, "Exception in callback", None,
                                  (ValueError, storage, None))
    assert cli._storage_task_report(unrelated)  # only the "never retrieved" reports are filtered


def test_process_exit_status_and_stderr(tmp_path):
    cmd = [sys.executable, "-m", "jaxflow.cli", "plot", str(tmp_path / "nope"), "--out", str(tmp_path / "fig")]
    quiet = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300)
    assert quiet.returncode == 2 and quiet.stdout == ""
    assert quiet.stderr == f"jaxflow plot: error: {tmp_path / 'nope'}: no such directory\n"
    loud = subprocess.run(cmd[:3] + ["--debug"] + cmd[3:], capture_output=True, text=True, env=ENV, timeout=300)
    assert loud.returncode == 1
    assert loud.stderr.startswith("Traceback") and "FileNotFoundError" in loud.stderr.splitlines()[-1]
