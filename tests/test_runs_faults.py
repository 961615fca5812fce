"""Trustworthy runs of `jaxflow sweep`: one writer per results directory (two real processes: the second
refuses, naming the holder; a dead holder's lock is taken over), SIGKILL at 20 random points and a full disk
(RLIMIT_FSIZE), each resumed to the uninterrupted run's tables row for row, and numbers that cannot be
trusted (non-finite probabilities) recorded in skipped.csv instead of the table.

The CLI processes are forked from a server that imported JAX and transformers once (tests/cli_forks.py) and
share a persistent compilation cache filled by the first run: two dozen real processes fit in minutes."""

import csv
import json
import os
import random
import re
import shutil
import signal
import socket
import time

import numpy as np
import pytest
from cli_forks import ForkServer
from PIL import Image
from safetensors.numpy import load_file, save_file

import jaxflow
from jaxflow.inputs import gqa
from jaxflow.sweep import run
from jaxflow.sweep.flows import parse_flow
from jaxflow.sweep.results import RunLockedError, RunMismatchError, Table
from jaxflow.sweep.rows import knockout_nonfinite, lens_nonfinite, spans

KILLS, SEED = 20, 19
ROWS = 32  # task-file rows: 30 samples, a box outside its image, a missing image
FLOWS = ["Image->Question", "Question->Last"]
LAYERS = 4  # the toy model's
PER_KEY = len(FLOWS) * LAYERS


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    """(task file, image folder)."""
    root = tmp_path_factory.mktemp("faults-task")
    with open(os.path.join(str(gqa.TASK_DIR), "ChooseAttr.csv"), newline="") as f:
        rows = list(csv.DictReader(f))[:ROWS]
    rows[5]["central object x"] = "9000"
    with open(root / "ChooseAttr.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    for r in rows[:-1]:
        h, w_ = int(r["image_h"]), int(r["image_w"])
        Image.fromarray(rng.integers(0, 255, (h, w_, 3), dtype=np.uint8)).save(root / "images" / f"{r['img_id']}.jpg")
    return str(root / "ChooseAttr.csv"), str(root / "images")


@pytest.fixture(scope="module")
def forks(tmp_path_factory, toy_model_dir):
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device per process
    env.update(JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax-cache")), TOKENIZERS_PARALLELISM="false",
               JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    server = ForkServer(toy_model_dir, env)
    yield server
    server.close()


def sweep_argv(model_dir, task, out, *extra):
    data, images = task
    return ["sweep", "--model", model_dir, "--data", data, "--images", images, "--out", str(out), "--window", "1",
            "--batch", "1", "--chunk", str(PER_KEY), "--keep-incorrect", "--max-new-tokens", "2", "--no-anyres",
            "--flows", *FLOWS, *extra]


def run_cli(forks, argv, log, fsize=None):
    """(status, last line of the output) of one `jaxflow` child run to its end."""
    status = forks.wait(forks.start(str(log), argv, fsize=fsize))
    return status, last_line(log)


def last_line(log):
    with open(log, errors="replace") as f:
        lines = [line for line in f.read().replace("\r", "\n").splitlines() if line.strip()]
    return lines[-1] if lines else ""


def complete_keys(path) -> int:
    """Samples whose rows are all on disk (complete lines only)."""
    try:
        with open(path) as f:
            return max(f.read().count("\n") - 1, 0) // PER_KEY
    except FileNotFoundError:
        return 0


def partial(path) -> bool:
    """Whether the table ends in a sample's rows cut short (what opening it repairs)."""
    try:
        with open(path) as f:
            text = f.read()
    except FileNotFoundError:
        return False
    return not text.endswith("\n") or (text.count("\n") - 1) % PER_KEY != 0


def table(path, key):
    """Rows by key, checking there are no duplicates."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    by_key = {key(r): r for r in rows}
    assert len(by_key) == len(rows), f"{path}: duplicate rows"
    return by_key


def result_key(r):
    return r["question_id"], r["block_desc"], r["layer"]


def skip_key(r):
    return r["question_id"]


def assert_same_tables(out, ref):
    """results.csv and skipped.csv of `out` equal those of `ref`, all columns, no row more or less."""
    for name, key in (("results.csv", result_key), ("skipped.csv", skip_key)):
        got, want = table(os.path.join(out, name), key), table(os.path.join(ref, name), key)
        missing, extra = want.keys() - got.keys(), got.keys() - want.keys()
        assert not missing and not extra, f"{name}: missing {sorted(missing)}, extra {sorted(extra)}"
        assert got == want, f"{name}: rows differ"


@pytest.fixture(scope="module")
def reference(forks, task, toy_model_dir, tmp_path_factory):
    """The uninterrupted run (a cold one fills the compilation cache; a warm one, timed, must equal it),
    with how long a warm process takes to its first sample and per sample after that."""
    root = tmp_path_factory.mktemp("faults-ref")
    status, line = run_cli(forks, sweep_argv(toy_model_dir, task, root / "cold"), root / "cold.log")
    assert status == {"exit": 0}, line
    out = root / "warm"
    pid = forks.start(str(root / "warm.log"), sweep_argv(toy_model_dir, task, out))
    start, seen = time.monotonic(), {}
    while forks.poll(pid) is None:
        seen.setdefault(complete_keys(out / "results.csv"), time.monotonic() - start)
        time.sleep(0.005)
    assert forks.poll(pid) == {"exit": 0}
    assert_same_tables(out, root / "cold")  # cached executables compute what fresh ones did
    n = len(table(out / "results.csv", result_key)) // PER_KEY
    assert n == ROWS - 2 and len(table(out / "skipped.csv", skip_key)) == 2
    t_first = seen[1]
    t_key = (max(seen.values()) - t_first) / (n - 1)
    print(f"warm sweep process: first sample after {t_first:.2f} s, then {t_key * 1000:.0f} ms per sample")
    return {"out": str(out), "samples": n, "t_first": t_first, "t_key": t_key}


def test_sigkill_at_random_points_then_resume_gives_the_uninterrupted_tables(forks, task, toy_model_dir, reference,
                                                                             tmp_path):
    out = tmp_path / "killed"
    argv = sweep_argv(toy_model_dir, task, out)
    rng = random.Random(SEED)
    plan = [True] * (KILLS // 2) + [False] * (KILLS - KILLS // 2)
    rng.shuffle(plan)
    kills = []
    started = time.monotonic()
    for i in range(KILLS):
        before = complete_keys(out / "results.csv")
        # half the kills at a random moment after the run's next sample is written, half during start-up (lock,
        # run.json, table repair, skipped rows, compilation: a random delay, at the latest the first new sample);
        # only start-up kills near the end, so that every kill finds the run still going
        after_sample = plan[i] and reference["samples"] - before > 8
        delay = rng.uniform(0, reference["t_key"] if after_sample else reference["t_first"])
        pid = forks.start(str(tmp_path / f"kill{i}.log"), argv)
        t0 = time.monotonic()
        while forks.poll(pid) is None:
            if complete_keys(out / "results.csv") > before:
                time.sleep(delay if after_sample else 0)
                break
            if not after_sample and time.monotonic() - t0 >= delay:
                break
            time.sleep(0.005)
        if forks.poll(pid) is None:  # not reaped: the pid is still this child's
            os.kill(pid, signal.SIGKILL)
        assert forks.wait(pid) == {"signal": signal.SIGKILL}, f"kill {i}: the run ended before it"
        kills.append((after_sample, complete_keys(out / "results.csv") - before, partial(out / "results.csv")))
    killed_in = time.monotonic() - started
    status, line = run_cli(forks, argv, tmp_path / "resume.log")
    assert status == {"exit": 0}, line
    assert_same_tables(out, reference["out"])
    startup = [n for after, n, _ in kills if not after]
    print(f"{KILLS} kills in {killed_in:.0f} s: {len(startup)} during start-up ({startup.count(0)} before any new "
          f"sample), {KILLS - len(startup)} after a sample (new samples per run: {[n for a, n, _ in kills if a]}); "
          f"{sum(p for *_, p in kills)} left a partial sample")
    assert startup.count(0) >= 5 and KILLS - len(startup) >= 5  # both kinds of kill points were hit
    with open(out / "run.json") as f:
        assert len(json.load(f)["resumed"]) >= 1


def test_full_disk_stops_with_a_named_error_and_a_resume_completes(forks, task, toy_model_dir, reference, tmp_path):
    ref = os.path.join(reference["out"], "results.csv")
    with open(ref) as f:
        header = len(f.readline())
    per_sample = (os.path.getsize(ref) - header) // reference["samples"]
    out = tmp_path / "full"
    argv = sweep_argv(toy_model_dir, task, out)
    status, line = run_cli(forks, argv, tmp_path / "full.log", fsize=header + int(4.5 * per_sample))
    assert "exit" in status and status["exit"] != 0, status  # an error, not SIGXFSZ
    assert f"cannot write {out / 'results.csv'}: File too large" in line, line
    assert "ResultsWriteError" in line or line.startswith("jaxflow sweep: error:"), line
    with open(out / "results.csv") as f:  # the failed append was taken back: whole samples, nothing else
        text = f.read()
    kept = len(Table(str(out / "results.csv"), run.RESULT_COLUMNS, PER_KEY).done)
    assert 3 <= kept < reference["samples"] and text.endswith("\n") and text.count("\n") == 1 + kept * PER_KEY
    reference_rows = table(ref, result_key)
    assert all(reference_rows[k] == r for k, r in table(out / "results.csv", result_key).items())
    status, line = run_cli(forks, argv, tmp_path / "resume.log")
    assert status == {"exit": 0}, line
    assert_same_tables(out, reference["out"])


def test_double_submit_gives_one_writer_and_no_duplicate_rows(forks, task, toy_model_dir, reference, tmp_path):
    out = tmp_path / "twice"
    argv = sweep_argv(toy_model_dir, task, out)
    pids = [forks.start(str(tmp_path / f"submit{i}.log"), argv) for i in range(2)]
    status = [forks.wait(pid) for pid in pids]
    assert sorted(s.get("exit", -1) for s in status).count(0) == 1, status
    winner, loser = (0, 1) if status[0] == {"exit": 0} else (1, 0)
    line = last_line(tmp_path / f"submit{loser}.log")
    assert f"in use by process {pids[winner]} on host {socket.gethostname()}" in line, line
    assert_same_tables(out, reference["out"])


HOLD = """
import os, time
from jaxflow.sweep.results import RunLock
lock = RunLock({out!r}).acquire()
print("held", flush=True)
time.sleep(600)
"""


def test_lock_refuses_a_second_process_and_a_dead_holders_lock_is_taken_over(forks, task, toy_model_dir, reference,
                                                                             tmp_path):
    out = tmp_path / "locked"
    out.mkdir()
    holder_log = tmp_path / "holder.log"
    holder = forks.start(str(holder_log), python=HOLD.format(out=str(out)))
    deadline = time.monotonic() + 120
    while not (holder_log.exists() and "held" in holder_log.read_text()) and time.monotonic() < deadline:
        assert forks.poll(holder) is None, holder_log.read_text()
        time.sleep(0.05)
    who = f"in use by process {holder} on host {socket.gethostname()}"
    model = jaxflow.load(toy_model_dir, no_anyres=True)
    data, images = task
    for lens in (False, True):  # a sweep and a logit lens alike, refused before they read or write anything
        with pytest.raises(RunLockedError, match=re.escape(who)):
            run.sweep(model, data, str(out), flows=[parse_flow(f) for f in FLOWS], window_size=1, images=images,
                      lens=lens, progress=False)
    assert os.listdir(out) == ["run.lock"]
    status, line = run_cli(forks, sweep_argv(toy_model_dir, task, out), tmp_path / "refused.log")
    assert status.get("exit") not in (None, 0) and who in line and "use another --out" in line, line
    assert os.listdir(out) == ["run.lock"]
    os.kill(holder, signal.SIGKILL)  # the holder dies without releasing anything: its lock is stale
    assert forks.wait(holder) == {"signal": signal.SIGKILL}
    log = tmp_path / "after.log"
    pid = forks.start(str(log), sweep_argv(toy_model_dir, task, out))
    assert forks.wait(pid) == {"exit": 0}, last_line(log)
    assert_same_tables(out, reference["out"])
    with open(out / "run.lock") as f:
        assert json.load(f)["pid"] == pid  # the new holder rewrote the holder info


def test_resume_with_other_parameter_dtype_is_refused_and_dtype_recorded(task, toy_model_dir, reference, tmp_path):
    data, images = task
    kw = dict(flows=[parse_flow(f) for f in FLOWS], window_size=1, images=images, filter_correct=False,
              max_new_tokens=2, progress=False)
    with open(os.path.join(reference["out"], "run.json")) as f:
        assert json.load(f)["dtype"] == "float32"
    out = tmp_path / "resumed"
    out.mkdir()
    shutil.copy(os.path.join(reference["out"], "run.json"), out / "run.json")
    for dtype in ("bfloat16", "float16"):
        model = jaxflow.load(toy_model_dir, dtype=dtype, no_anyres=True)
        with pytest.raises(RunMismatchError, match=r"other settings \(dtype: \['float32'\] vs \['" + dtype):
            run.sweep(model, data, str(out), **kw)
        run.sweep(model, data, str(tmp_path / dtype), limit=0, **kw)
        with open(tmp_path / dtype / "run.json") as f:
            assert json.load(f)["dtype"] == dtype


def test_untrusted_number_reasons():
    flows = [parse_flow(f) for f in FLOWS]
    p = np.full(2 * LAYERS, 0.5)
    assert knockout_nonfinite(flows, LAYERS, 0.3, p) is None
    assert knockout_nonfinite(flows, LAYERS, float("nan"), p).startswith("non-finite base probability")
    p[[1, 2, LAYERS + 3]] = [np.nan, np.inf, -np.inf]
    assert knockout_nonfinite(flows, LAYERS, 0.3, p).startswith(
        "non-finite knocked-out probability in 3 of 8 configurations (Image->Question layers 1-2; Question->Last "
        "layers 3)")
    lens = np.full((2, LAYERS + 1, 3), 0.1)
    lens[:, :, 2] = np.nan  # no false option: not read
    assert lens_nonfinite(lens, has_false=False) is None
    assert lens_nonfinite(lens, has_false=True).startswith("non-finite logit-lens probability (raw layers 0-4; "
                                                            "final-norm layers 0-4)")
    assert spans([0, 1, 2, 5, 7, 8]) == "0-2,5,7-8"


@pytest.fixture(scope="module")
def overflowing_model(toy_model_dir, tmp_path_factory):
    """The toy model with final-norm weights of 3e38: finite, so conversion accepts them; every logit overflows."""
    from jaxflow.convert import convert

    root = tmp_path_factory.mktemp("overflow")
    src = root / "src"
    shutil.copytree(os.path.join(os.path.dirname(toy_model_dir), "src"), src)
    tensors = load_file(src / "model.safetensors")
    tensors["language_model.model.norm.weight"] = np.full_like(tensors["language_model.model.norm.weight"], 3e38)
    save_file(tensors, src / "model.safetensors")
    return convert(str(src), str(root / "model"), progress=False)


@pytest.mark.parametrize("mode", ["filtered", "keep-incorrect", "lens"])
def test_overflowing_model_writes_no_numbers(forks, task, overflowing_model, tmp_path, mode):
    out = tmp_path / mode
    argv = sweep_argv(overflowing_model, task, out)
    if mode == "filtered":
        argv.remove("--keep-incorrect")
    if mode == "lens":  # without the sweep-only flags, which lens does not take
        data, images = task
        argv = ["lens", "--model", overflowing_model, "--data", data, "--images", images, "--out", str(out),
                "--batch", "1", "--keep-incorrect", "--max-new-tokens", "2", "--no-anyres"]
    status, line = run_cli(forks, argv, tmp_path / "run.log")
    # nothing recorded: exit status 1, the counts and the most common reasons on the last line
    assert status == {"exit": 1}, line
    assert line.startswith(f"jaxflow {argv[0]}: error: 0 samples recorded, {ROWS} skipped (see "), line
    assert f"most common skip reasons: non-finite next-token distribution of the prompt ({ROWS - 2})" in line, line
    with open(out / ("lens.csv" if mode == "lens" else "results.csv")) as f:
        assert len(f.readlines()) == 1  # the header only
    reasons = [r["reason"] for r in table(out / "skipped.csv", skip_key).values()]
    nonfinite = [r for r in reasons if r.startswith("non-finite next-token distribution")]
    assert len(reasons) == ROWS and len(nonfinite) == ROWS - 2, reasons  # not "wrong answer"


INJECT = """
import numpy as np
from jaxflow import cli
from jaxflow.sweep import engine

real, calls = engine.knockout_probs, []


def knockout_probs(*args, **kwargs):
    p, top = real(*args, **kwargs)
    calls.append(1)
    if len(calls) == 3:  # the third sample: three configurations overflow
        p[[1, 2, {layers} + 3], 0] = [np.nan, np.inf, np.nan]
    return p, top


engine.knockout_probs = knockout_probs
raise SystemExit(cli.main({argv!r}))
"""


def test_nonfinite_knockout_skips_the_sample_naming_its_configurations(forks, task, toy_model_dir, reference,
                                                                       tmp_path):
    out = tmp_path / "injected"
    log = tmp_path / "injected.log"
    pid = forks.start(str(log), python=INJECT.format(layers=LAYERS, argv=sweep_argv(toy_model_dir, task, out)))
    assert forks.wait(pid) == {"exit": 0}, last_line(log)
    skipped = table(out / "skipped.csv", skip_key)
    want_skipped = table(os.path.join(reference["out"], "skipped.csv"), skip_key)
    (bad,) = skipped.keys() - want_skipped.keys()
    assert skipped[bad]["reason"].startswith("non-finite knocked-out probability in 3 of 8 configurations "
                                             "(Image->Question layers 1-2; Question->Last layers 3)")
    want = {k: r for k, r in table(os.path.join(reference["out"], "results.csv"), result_key).items() if k[0] != bad}
    assert table(out / "results.csv", result_key) == want  # the other samples as in a clean run
