"""Verified checkpoints: jaxflow.json records what every parameter group holds; a truncated, altered or missing
group gives one line naming the group and the file, at load (cheap checks) or on `verify` (re-hashing); a
conversion killed at any point leaves nothing or the complete model."""

from __future__ import annotations

import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

import jaxflow
from jaxflow import checkpoint, cli
from jaxflow.checkpoint import CheckpointIntegrityError
from jaxflow.config import ModelConfig
from jaxflow.convert import ConversionError, convert
from jaxflow.model import param_shapes
from jaxflow.testing import tiny_hf_config, write_random_checkpoint

LAYER = "language_model.layers.0"
ENV = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device: the conftest's 8 are for sharding


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    return write_random_checkpoint(str(tmp_path_factory.mktemp("verify") / "src"), tiny_hf_config(), scale=0.2)


@pytest.fixture(scope="module")
def model_dir(src):
    return convert(src, os.path.join(os.path.dirname(src), "model"), progress=False)


@pytest.fixture
def copy(model_dir, tmp_path):
    return shutil.copytree(model_dir, str(tmp_path / "model"))


def largest_file(group_dir: str) -> str:
    """The biggest file orbax wrote for a group: its array data."""
    files = [os.path.join(root, f) for root, _, names in os.walk(group_dir) for f in names]
    return max(files, key=os.path.getsize)


def flip_byte(path: str, at: float = 0.5) -> None:
    data = bytearray(open(path, "rb").read())
    data[int(len(data) * at)] ^= 0x40
    with open(path, "wb") as f:
        f.write(data)


def values(model) -> dict[str, np.ndarray]:
    return {checkpoint.path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model.module))}


def cli_line(args: list[str]) -> tuple[int, list[str]]:
    """Runs `python -m jaxflow.cli ARGS` as a user does; its exit status and stderr lines (the process exit
    included, where storage libraries print late tracebacks)."""
    proc = subprocess.run([sys.executable, "-m", "jaxflow.cli", *args], capture_output=True, text=True, env=ENV,
                          timeout=300)
    return proc.returncode, proc.stderr.strip().splitlines()


# ---- intact ---------------------------------------------------------------------------------------


def test_intact_model_verifies(model_dir, capsys):
    meta = checkpoint.read_metadata(model_dir)
    summary = checkpoint.verify(model_dir)
    shapes = param_shapes(ModelConfig.from_pretrained(model_dir)).values()
    expected_bytes = sum(int(np.prod(s.shape)) * 4 for s in shapes)  # float32
    assert summary == {"groups": len(meta["groups"]), "bytes": expected_bytes}
    assert cli.main(["verify", model_dir]) == 0
    assert f"all {len(meta['groups'])} parameter groups" in capsys.readouterr().out
    assert set(values(jaxflow.load(model_dir, verify=True))) == {n for g in meta["groups"].values() for n in g}


def test_digests_are_of_the_values_not_the_files(src, model_dir, tmp_path):
    """The recorded digest is the one of the source arrays; a second conversion stores the same digests (its
    files may differ); another dtype stores other values, hence other digests."""
    records = checkpoint.read_metadata(model_dir)["integrity"]["groups"]
    embedding = load_file(os.path.join(src, "model.safetensors"))["language_model.model.embed_tokens.weight"]
    name = "language_model.embed_tokens.embedding"
    assert records[name]["sha256"] == checkpoint.group_digest({name: embedding})
    assert records[name]["sha256"] != checkpoint.group_digest({name: embedding.astype(np.float64)})
    again = checkpoint.read_metadata(convert(src, str(tmp_path / "again"), progress=False))["integrity"]["groups"]
    assert {g: r["sha256"] for g, r in again.items()} == {g: r["sha256"] for g, r in records.items()}
    for group, record in records.items():  # each file record matches that directory's own files
        for rel, (size, _) in record["files"].items():
            assert os.path.getsize(os.path.join(model_dir, "params", group, rel)) == size
    bf16 = convert(src, str(tmp_path / "bf16"), dtype="bfloat16", progress=False)
    assert checkpoint.verify(bf16)["bytes"] * 2 == checkpoint.verify(model_dir)["bytes"]
    bf16_records = checkpoint.read_metadata(bf16)["integrity"]["groups"]
    assert all(bf16_records[g]["sha256"] != r["sha256"] for g, r in records.items())


# ---- damaged --------------------------------------------------------------------------------------


def test_truncated_file_named_before_storage_reads(copy, tmp_path):
    data = largest_file(os.path.join(copy, "params", LAYER))
    os.truncate(data, os.path.getsize(data) // 2)
    for call in (lambda: jaxflow.load(copy), lambda: checkpoint.verify(copy)):
        with pytest.raises(CheckpointIntegrityError) as info:
            call()
        assert str(info.value).startswith(f"{data}: ") and LAYER in str(info.value) and "truncated" in str(info.value)
    # the command line, process exit included: one line, no storage-library traceback
    status, err = cli_line(["sweep", "--model", copy, "--data", "ChooseAttr", "--images", str(tmp_path),
                            "--out", str(tmp_path / "runs")])
    assert status == 2 and len(err) == 1, err
    assert err[0].startswith(f"jaxflow sweep: error: {data}: ")
    assert not os.path.exists(tmp_path / "runs" / "results.csv")


def test_flipped_byte_detected_by_verify(copy, model_dir):
    data = largest_file(os.path.join(copy, "params", LAYER))
    flip_byte(data)
    try:  # the flip changes what loads (or breaks the decoding): it matters
        damaged = values(jaxflow.load(copy))
        intact = values(jaxflow.load(model_dir))
        changed = [n for n in intact if not np.array_equal(intact[n], damaged[n])]
        assert changed and all(n.startswith(LAYER + ".") for n in changed)
    except CheckpointIntegrityError as e:
        assert LAYER in str(e)
    for call in (lambda: checkpoint.verify(copy), lambda: jaxflow.load(copy, verify=True)):
        with pytest.raises(CheckpointIntegrityError) as info:
            call()
        message = str(info.value)
        assert "\n" not in message
        if os.path.getsize(data) <= checkpoint.SMALL_FILE:  # orbax wrote this layer small: its file digest catches it
            assert message.startswith(f"{data}: differs from the file written at conversion") and LAYER in message
        else:  # a large data file: the re-hash of the group's values catches it
            assert message.startswith(os.path.join(copy, "params", LAYER) + ": ")
            assert f"changed since conversion: {data} " in message
    status, err = cli_line(["verify", copy])
    assert status == 2 and len(err) == 1 and err[0].startswith("jaxflow verify: error: ") and data in err[0], err


def test_damaged_index_named_before_storage_reads(copy, tmp_path):
    """A flip in orbax's own index of the group (same size): the digests of the small files, checked on every load,
    name it before orbax reads, also at the process exit."""
    manifest = os.path.join(copy, "params", LAYER, "manifest.ocdbt")
    flip_byte(manifest)
    with pytest.raises(CheckpointIntegrityError) as info:
        jaxflow.load(copy)
    assert str(info.value) == (f"{manifest}: differs from the file written at conversion: parameter group {LAYER} "
                               "is damaged (convert the checkpoint again)")
    status, err = cli_line(["sweep", "--model", copy, "--data", "ChooseAttr", "--images", str(tmp_path),
                            "--out", str(tmp_path / "runs")])
    assert status == 2 and err == [f"jaxflow sweep: error: {info.value}"], err


def test_storage_library_error_becomes_one_line(copy):
    """Where no file record catches the damage first (here: records dropped), the storage library's own error
    is turned into one line naming the group."""
    path = os.path.join(copy, "jaxflow.json")
    meta = json.load(open(path))
    del meta["integrity"]["groups"][LAYER]["files"]
    json.dump(meta, open(path, "w"))
    flip_byte(os.path.join(copy, "params", LAYER, "manifest.ocdbt"))
    with pytest.raises(CheckpointIntegrityError) as info:
        jaxflow.load(copy)
    message = str(info.value)
    assert message.startswith(f"{os.path.join(copy, 'params', LAYER)}: parameter group {LAYER} cannot be read (")
    assert "\n" not in message and "tensorstore_spec" not in message
    # the storage library's late callbacks ("Event loop is closed", up to the exit) do not reach the user
    for _ in range(2):
        status, err = cli_line(["verify", copy])
        assert status == 2 and len(err) == 1 and err[0].startswith("jaxflow verify: error: ") and LAYER in err[0], err


def test_missing_group(copy, capsys):
    group_dir = os.path.join(copy, "params", "language_model.layers.1")
    shutil.rmtree(group_dir)
    for call in (lambda: jaxflow.load(copy), lambda: checkpoint.verify(copy)):
        with pytest.raises(CheckpointIntegrityError, match="parameter group language_model.layers.1 is not stored"):
            call()
    assert cli.main(["verify", copy]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"jaxflow verify: error: {group_dir}: missing: parameter group language_model.layers.1 is not "
                   "stored (convert the checkpoint again)"]


def test_every_bad_group_counted(copy):
    flip_byte(largest_file(os.path.join(copy, "params", LAYER)))
    flip_byte(largest_file(os.path.join(copy, "params", "language_model.lm_head.kernel")), 0.3)
    with pytest.raises(CheckpointIntegrityError, match=r"; 1 more bad group\(s\): language_model.lm_head.kernel$"):
        checkpoint.verify(copy)


def test_model_without_digests(copy):
    """A model converted before digests were recorded still loads; verify says why it cannot check it."""
    path = os.path.join(copy, "jaxflow.json")
    meta = json.load(open(path))
    del meta["integrity"]
    json.dump(meta, open(path, "w"))
    jaxflow.load(copy)
    with pytest.raises(CheckpointIntegrityError, match="records no parameter digests"):
        checkpoint.verify(copy)


# ---- temporary directories ------------------------------------------------------------------------


def test_convert_removes_only_temp_dirs_of_dead_processes(src, tmp_path):
    import socket

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    names = {"dead": f".model.tmp-{host}-{dead.pid}-abc", "alive": f".model.tmp-{host}-{os.getpid()}-abc",
             "elsewhere": f".model.tmp-otherhost-{dead.pid}-abc", "other_out": f".other.tmp-{host}-{dead.pid}-abc"}
    for name in names.values():
        (tmp_path / name / "params").mkdir(parents=True)
    convert(src, str(tmp_path / "model"), progress=False)
    left = set(os.listdir(tmp_path))
    assert names["dead"] not in left
    assert {names["alive"], names["elsewhere"], names["other_out"], "model"} <= left


def test_out_appearing_while_converting(src, tmp_path, monkeypatch):
    """Two conversions into one OUT: the one that finishes second is discarded, the first one's model kept."""
    out = tmp_path / "model"
    real = checkpoint.GroupWriter.finish

    def finish_and_race(self, **meta):
        real(self, **meta)
        out.mkdir()
        (out / "theirs").write_text("first")

    monkeypatch.setattr(checkpoint.GroupWriter, "finish", finish_and_race)
    with pytest.raises(ConversionError, match="appeared while converting"):
        convert(src, str(out), progress=False)
    assert os.listdir(out) == ["theirs"] and glob.glob(str(tmp_path / ".model.tmp-*")) == []


# ---- SIGKILL during conversion --------------------------------------------------------------------

# Where a kill lands: before the temporary directory exists; after it (reading configs, planning); after the
# k-th group is on disk (while the next one is written, or the metadata, or the rename); after OUT appeared.
PHASES = ("start", "setup", "writing", "done")
WEIGHTS = (0.15, 0.15, 0.55, 0.15)


def _groups_in(temp: str | None) -> int:
    params = os.path.join(temp, "params") if temp else ""
    return len(os.listdir(params)) if temp and os.path.isdir(params) else 0


def test_sigkill_convert_leaves_nothing_or_the_complete_model(tmp_path):
    src = write_random_checkpoint(str(tmp_path / "src"), tiny_hf_config(layers=8, hidden=128),
                                  max_shard_bytes=3 << 20)  # 6.8 MB in 3 shards
    out = tmp_path / "model"
    n_groups = len({checkpoint.group_of(p) for p in param_shapes(ModelConfig.from_pretrained(src))})
    cmd = [sys.executable, "-m", "jaxflow.cli", "convert", src, str(out)]
    rng = np.random.default_rng(19)
    seen, digests = Counter(), None
    t_temp, t_setup = [3.0], [3.0]  # seconds to the temp dir, and from it to the first group (refined as seen)

    def temps():
        return glob.glob(str(tmp_path / ".model.tmp-*"))

    for _ in range(20):
        phase = PHASES[rng.choice(len(PHASES), p=WEIGHTS)]
        k = int(rng.integers(0, n_groups))
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV,
                                start_new_session=True)
        start = time.monotonic()
        mine = created = first = None
        kill_at = start + rng.uniform(0, max(t_temp)) if phase == "start" else None
        while proc.poll() is None and time.monotonic() < start + 300:
            now = time.monotonic()
            if mine is None:
                mine = next((t for t in temps() if f"-{proc.pid}-" in os.path.basename(t)), None)
                if mine is not None:
                    created = now
                    t_temp.append(created - start)
                    if phase == "setup":
                        kill_at = now + rng.uniform(0, max(t_setup))
            written = _groups_in(mine)
            if written and first is None:
                first = now
                t_setup.append(first - created)
            if phase == "writing" and kill_at is None and written > k:
                kill_at = now + rng.uniform(0, 0.05)
            if phase == "done" and kill_at is None and out.exists():
                kill_at = now + rng.uniform(0, 0.3)
            if kill_at is not None and now >= kill_at:
                os.killpg(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.005)
        proc.wait()
        if out.exists():
            seen["complete"] += 1
            checkpoint.verify(str(out))  # all or nothing: a model that exists is the whole model
            recorded = {g: r["sha256"] for g, r in checkpoint.read_metadata(str(out))["integrity"]["groups"].items()}
            assert digests is None or recorded == digests
            digests = recorded
            assert len(recorded) == n_groups
            shutil.rmtree(out)  # the next kill point starts a fresh conversion again
        elif mine is not None and os.path.isdir(mine):
            seen["partial" if _groups_in(mine) else "setup"] += 1
            # this run removed the temp dirs its killed predecessors left (their processes are gone)
            assert [t for t in temps() if t != mine] == []
        else:
            seen["nothing"] += 1
    assert seen["partial"] >= 5 and seen["nothing"] + seen["setup"] >= 2, seen
    assert temps(), "no kill left a temporary directory: nothing was tested"
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, timeout=300)
    assert temps() == []  # the final conversion cleaned up after every killed one
    checkpoint.verify(str(out))
    recorded = {g: r["sha256"] for g, r in checkpoint.read_metadata(str(out))["integrity"]["groups"].items()}
    assert digests is None or recorded == digests
    print(f"kill points: {dict(seen)}")
