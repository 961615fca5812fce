"""Packaging and command-line hygiene: the converter installs as jaxflow.convert and nothing else of the clone
is packaged; no transformers notice on the command line; a sweep or lens that records nothing exits 1 saying
why; a window as wide as the model warns once; every flag has help, and lens lists only its own."""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import warnings
import zipfile

import pytest

from jaxflow import cli
from jaxflow.config import ModelConfig
from jaxflow.demo import ASSET
from jaxflow.sweep.flows import WindowWarning, check_window

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "TRANSFORMERS_NO_ADVISORY_WARNINGS")}
SWEEP_ONLY = ["--flows", "--window", "--method", "--chunk", "--related-patches"]
TORCH_NOTICE = "PyTorch was not found"


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {"jaxflow": parser, **sub.choices}


def sources(root: str, folder: str) -> set[str]:
    """The .py files under root/folder, relative to root/folder."""
    top, found = os.path.join(root, folder), set()
    for here, dirs, files in os.walk(top):
        dirs[:] = [d for d in dirs if d != "__pycache__"]
        found |= {os.path.relpath(os.path.join(here, f), top) for f in files if f.endswith(".py")}
    return found


# ---- packaging ------------------------------------------------------------------------------------------------


def test_wheel_holds_jaxflow_only_with_the_converter_inside(tmp_path):
    """A wheel built from a clone holding the demo's output: one top-level package, jaxflow, with every module of
    jaxflow/ and convert/ (the latter as jaxflow/convert/) and the CPU attention's C++ source; importable from the
    unpacked wheel."""
    src = tmp_path / "src"
    skip = shutil.ignore_patterns("__pycache__", "*.egg-info", "build")
    for name in ("jaxflow", "convert"):
        shutil.copytree(os.path.join(ROOT, name), src / name, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(os.path.join(ROOT, name), src / name)
    demo_out = src / "jaxflow-demo"  # what `jaxflow demo --out jaxflow-demo` leaves in the clone
    (demo_out / "runs" / "sweep").mkdir(parents=True)
    (demo_out / "runs" / "sweep" / "results.csv").write_text("question_id\n")
    (demo_out / "model").mkdir()
    (demo_out / "model" / "config.json").write_text("{}")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path / "wheel"), str(src)], check=True, capture_output=True, env=ENV, timeout=300)
    (wheel,) = (tmp_path / "wheel").glob("jaxflow-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if ".dist-info/" not in n} == {"jaxflow"}, names
    assert not [n for n in names if "jaxflow-demo" in n or n.startswith("convert/")]
    top_level = next(n for n in names if n.endswith(".dist-info/top_level.txt"))
    assert zipfile.ZipFile(wheel).read(top_level).decode().split() == ["jaxflow"]
    packaged = {n for n in names if n.endswith(".py")}
    expected = {f"jaxflow/{p}" for p in sources(str(src), "jaxflow")}
    expected |= {f"jaxflow/convert/{p}" for p in sources(str(src), "convert")}
    assert packaged == expected  # a subpackage missing from pyproject's list fails here
    assert "jaxflow/nn/cpu_attention.cc" in names  # compiled at first use (jaxflow.nn.cpu_attention)

    site = tmp_path / "site"
    zipfile.ZipFile(wheel).extractall(site)
    where = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {str(site)!r}); "
                            "import jaxflow.convert.converter as c, jaxflow.convert as jc; "
                            "import jaxflow.nn.cpu_attention as a; "
                            "print(c.__file__); print(jc.convert.__module__); print(a.enabled())"],
                           check=True, capture_output=True, text=True, env=ENV, timeout=300).stdout.split()
    assert where == [str(site / "jaxflow" / "convert" / "converter.py"), "jaxflow.convert.converter", "True"]


def test_installed_converter_is_the_clones_convert_folder():
    """The editable install (pip install -e .) maps jaxflow.convert to the top-level convert/ folder."""
    import jaxflow.convert

    assert jaxflow.convert.__file__ == os.path.join(ROOT, "convert", "__init__.py")


def test_demo_output_is_ignored_by_git():
    default = subcommands()["demo"].get_default("out")
    assert default == "jaxflow-demo"
    with open(os.path.join(ROOT, ".gitignore")) as f:
        assert f"/{default}/" in f.read().splitlines()


# ---- help -------------------------------------------------------------------------------------------------------


def test_every_flag_has_help():
    missing = [(name, a.option_strings or a.dest) for name, parser in subcommands().items() for a in parser._actions
               if not a.help or a.help == argparse.SUPPRESS]
    assert not missing


def test_lens_help_lists_only_what_lens_uses(capsys):
    helps = {}
    for command in ("sweep", "lens"):
        with pytest.raises(SystemExit):
            cli.build_parser().parse_args([command, "--help"])
        helps[command] = capsys.readouterr().out
    for flag in SWEEP_ONLY:
        assert flag in helps["sweep"]
        assert flag not in helps["lens"], flag
    for flag in ("--model", "--data", "--images", "--out", "--batch", "--limit", "--max-new-tokens", "--mesh"):
        assert flag in helps["lens"]
    # a lens records in run.json what it always recorded, so directories written before resume
    args = cli.build_parser().parse_args(["lens", "--model", "m", "--data", "d", "--out", "o"])
    assert (args.flows, args.window, args.method, args.chunk, args.related_patches) == \
        (None, 9, "incremental", None, "study")


def test_dtype_help_says_what_float16_does(capsys):
    with pytest.raises(SystemExit):
        cli.build_parser().parse_args(["convert", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    dtype = text[text.index("--dtype {"):text.index("--allow-pickle ")]
    assert "float16 is converted as asked" in dtype and "overflow" in dtype and "skipped.csv" in dtype


# ---- the transformers notice --------------------------------------------------------------------------------------


def run_without_torch(code: str) -> subprocess.CompletedProcess:
    """`code` in a fresh Python where torch cannot be imported (as after `pip install jaxflow` without torch)."""
    return subprocess.run([sys.executable, "-c", "import sys; sys.modules['torch'] = None\n" + code],
                          capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)


def test_no_torch_notice_on_the_command_line(tmp_path):
    plain = run_without_torch("import transformers")
    assert TORCH_NOTICE in plain.stderr  # what transformers says without torch
    out = tmp_path / "model"
    command = run_without_torch(
        "import runpy\n"
        f"sys.argv = ['jaxflow', 'convert', {ASSET!r}, {str(out)!r}]\n"
        "try:\n"
        "    runpy.run_module('jaxflow.cli', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    print('exit', e.code, 'transformers' in sys.modules)\n")
    assert command.stdout.splitlines()[-1] == "exit 0 True", (command.stdout, command.stderr)
    assert TORCH_NOTICE not in command.stderr, command.stderr
    assert (out / "jaxflow.json").exists()


# ---- sweeps that record nothing, windows as wide as the model ----------------------------------------------------


@pytest.fixture
def no_images(tmp_path):
    (tmp_path / "images").mkdir()
    return str(tmp_path / "images")


def test_a_run_that_records_nothing_exits_1(capsys, tmp_path, no_images, toy_model_dir):
    layers = ModelConfig.from_pretrained(toy_model_dir).text.num_layers
    common = ["--model", toy_model_dir, "--data", "ChooseAttr", "--images", no_images, "--limit", "2"]
    for command, extra in (("sweep", ["--window", str(layers - 1)]), ("lens", [])):
        out = tmp_path / command
        assert cli.main([command, *common, "--out", str(out), *extra]) == 1
        captured = capsys.readouterr()
        said = [line for line in captured.err.splitlines() if line.startswith("jaxflow ")]  # not the progress bar
        assert said == [  # one line: no window warning below the model's layers
            f"jaxflow {command}: error: 0 samples recorded, 2 skipped (see {out / 'skipped.csv'}); "
            "most common skip reasons: image file not found (2)"]
        assert "samples recorded" not in captured.out


def test_a_window_as_wide_as_the_model_warns_once(capsys, tmp_path, no_images, toy_model_dir):
    layers = ModelConfig.from_pretrained(toy_model_dir).text.num_layers
    args = ["sweep", "--model", toy_model_dir, "--data", "ChooseAttr", "--images", no_images, "--limit", "2",
            "--out", str(tmp_path / "run"), "--window", str(layers)]
    assert cli.main(args) == 1
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("jaxflow ")]
    assert len(err) == 2 and err[1].startswith("jaxflow sweep: error: 0 samples recorded"), err
    assert re.fullmatch(rf"jaxflow sweep: warning: window {layers} is at least the model's {layers} layers: the "
                        rf"window around layer {layers // 2} cuts every layer \(0-{layers - 1}\), .*", err[0]), err


def test_check_window():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_window(5, 6)
        check_window(6, 6)
        check_window(9, 6)
    assert [w.category for w in caught] == [WindowWarning, WindowWarning]
    assert "window 9 is at least the model's 6 layers" in str(caught[1].message)
