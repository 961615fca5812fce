"""Sharding on 8 host devices (XLA_FLAGS set by tests/conftest.py): restore into a mesh follows
the rules table, sharded knockout results equal single-device results, and a two-process run
through jax.distributed gives the same merged table as one process."""

import csv
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import jaxflow
from jaxflow.inputs import gqa
from jaxflow.sharding import RULES, make_mesh, parse_mesh
from jaxflow.sweep import engine

GQA = str(gqa.TASK_DIR)
MESHES = ["data=8,model=1", "data=1,model=8", "data=2,model=4"]

pytestmark = pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (XLA_FLAGS from conftest.py)")


@pytest.fixture(scope="module")
def model_dir(toy_model_dir):
    return toy_model_dir


def test_parse_mesh_errors_name_the_argument():
    assert parse_mesh(None, 8) == {"data": 8, "model": 1}
    assert parse_mesh("model=8", 8) == {"data": 1, "model": 8}
    with pytest.raises(ValueError, match="--mesh"):
        parse_mesh("data=3,model=2", 8)
    with pytest.raises(ValueError, match="--mesh"):
        parse_mesh("pipeline=8", 8)


def test_restore_puts_each_parameter_where_its_rule_says(model_dir):
    mesh = make_mesh("data=2,model=4")
    model = jaxflow.load(model_dir, mesh=mesh)
    lm, vision = model.module.language_model, model.module.vision_tower
    expect = [
        (lm.layers[0].self_attn.q_proj.kernel, P(None, "model")),  # heads
        (lm.layers[0].self_attn.k_proj.kernel, P(None, "model")),  # kv heads: 2 x 16 columns
        (lm.layers[1].self_attn.o_proj.kernel, P("model", None)),
        (lm.layers[1].gate_proj.kernel, P(None, "model")),  # mlp
        (lm.layers[1].down_proj.kernel, P("model", None)),
        (lm.layers[0].input_layernorm.scale, P(None)),
        (vision.layers[0].fc1.kernel, P(None, "model")),  # vision mlp
        (vision.layers[0].self_attn.q_proj.bias, P("model")),  # vision heads
        (lm.embed_tokens.embedding, P(None, None)),  # vocab 1002 does not divide by 4: replicated
    ]
    for var, spec in expect:
        value = var[...]
        assert value.sharding.spec == spec, (var, value.sharding.spec)
        assert set(value.sharding.device_set) == set(mesh.devices.flat)
        split = [mesh.shape[s] if s else 1 for s in spec] + [1] * (value.ndim - len(spec))
        shard_shape = tuple(d // n for d, n in zip(value.shape, split, strict=True))
        assert all(s.data.shape == shard_shape for s in value.addressable_shards)
    assert RULES["heads"] == "model" and RULES["configs"] == "data"


@pytest.mark.parametrize("method", ["incremental", "full"])
def test_sharded_knockouts_equal_single_device(model_dir, method):
    single = jaxflow.load(model_dir)
    rng = np.random.default_rng(1)
    t, b, k = 40, 2, 12
    ids = rng.integers(3, 900, (b, t))
    lengths = np.array([40, 33])
    mask = np.arange(t)[None] < lengths[:, None]
    cfg = single.config.text
    knock = jaxflow.KnockoutMasks(rng.random((k, b, t)) < 0.3, rng.random((k, b, t)) < 0.2,
                                  rng.random((k, cfg.num_layers)) < 0.5, rng.random((k, cfg.num_heads)) < 0.7)
    token = np.array([5, 9])
    ref, _ = engine.knockout_probs(single.module, single.prepare(ids, attention_mask=mask), knock, lengths - 1, token,
                                   method=method)
    for spec in MESHES:
        mesh = make_mesh(spec)
        model = jaxflow.load(model_dir, mesh=mesh)
        p, _ = engine.knockout_probs(model.module, model.prepare(ids, attention_mask=mask), knock, lengths - 1, token,
                                     method=method, mesh=mesh)
        assert np.abs(p - ref).max() < 1e-5, spec
    assert np.abs(ref - ref.mean()).max() > 1e-4  # the configurations differ, so the comparison bites


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _table(path):
    with open(path, newline="") as f:
        return {(r["question_id"], r["block_desc"], r["layer"]): float(r["new_score_first"]) for r in csv.DictReader(f)}


def test_two_processes_give_the_single_process_table(model_dir, tmp_path):
    from PIL import Image

    images = tmp_path / "images"
    images.mkdir()
    with open(os.path.join(GQA, "ChooseRel.csv"), newline="") as f:
        rows = list(csv.DictReader(f))[:6]
    for r in rows:
        Image.new("RGB", (int(r["image_w"]), int(r["image_h"])), (90, 140, 200)).save(images / f"{r['img_id']}.jpg")
    env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one device per process
    common = [sys.executable, "-m", "jaxflow.cli", "sweep", "--model", model_dir, "--data",
              os.path.join(GQA, "ChooseRel.csv"), "--images", str(images), "--window", "3", "--limit", "6",
              "--keep-incorrect", "--flows", "Image->Question", "Question->Last"]
    subprocess.run(common + ["--out", str(tmp_path / "one")], check=True, env=env, capture_output=True)


    def two_processes():
        port = _free_port()
        procs = [subprocess.Popen(common + ["--out", str(tmp_path / "two"), "--coordinator", f"localhost:{port}",
                                            "--num-processes", "2", "--process-id", str(i)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE) for i in range(2)]
        for p in procs:
            _, err = p.communicate(timeout=300)
            assert p.returncode == 0, err.decode()[-2000:]

    two_processes()
    one, two = _table(tmp_path / "one" / "results.csv"), _table(tmp_path / "two" / "results.csv")
    shards = [_table(tmp_path / "two" / f"results.process-{i}-of-2.csv") for i in range(2)]
    assert one.keys() == two.keys() and len(one) == 6 * 2 * 4
    assert not set(shards[0]) & set(shards[1]) and set(shards[0]) | set(shards[1]) == set(two)
    assert max(abs(one[k] - two[k]) for k in one) < 1e-6
    # a restart resumes per shard: a shard that lost its last sample redoes just that one
    shard1 = tmp_path / "two" / "results.process-1-of-2.csv"
    lines = shard1.read_text().splitlines(keepends=True)
    shard1.write_text("".join(lines[:-3]))
    two_processes()
    assert _table(tmp_path / "two" / "results.csv") == two
    assert _table(shard1) == shards[1]
