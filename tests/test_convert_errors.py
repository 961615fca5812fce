"""`jaxflow convert` refuses bad checkpoints with a message naming the problem, and never leaves a
partial output directory behind."""

from __future__ import annotations

import glob
import json
import os
import shutil

import ml_dtypes
import numpy as np
import pytest
import tiny
from safetensors.numpy import load_file, save_file

import jaxflow
from jaxflow import checkpoint, cli
from jaxflow.convert import ConversionError, convert

MISSING = "language_model.model.layers.1.mlp.up_proj.weight"
MISSING_CANONICAL = "text.layers.1.mlp.up_proj.weight"
MISSHAPED = "language_model.model.layers.0.self_attn.q_proj.weight"
EXTRA = "language_model.model.layers.0.self_attn.extra_proj.weight"
BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def model():
    return tiny.hf_model("llava")


@pytest.fixture(scope="module")
def pristine(model, tmp_path_factory):
    """A valid llava-hf checkpoint directory (one file); tests copy it before changing it."""
    return tiny.save_llava_hf(model, str(tmp_path_factory.mktemp("hf") / "src"))


@pytest.fixture(scope="module")
def pristine_sharded(model, tmp_path_factory):
    return tiny.save_llava_hf(model, str(tmp_path_factory.mktemp("hf-sharded") / "src"), shard=True)


@pytest.fixture
def src(pristine, tmp_path):
    return shutil.copytree(pristine, str(tmp_path / "src"))


def rewrite(path: str, change) -> None:
    """Rewrites the safetensors file `path` after change(tensors) edits the dict in place."""
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def edit_config(src: str, change) -> None:
    path = os.path.join(src, "config.json")
    with open(path) as f:
        cfg = json.load(f)
    change(cfg)
    with open(path, "w") as f:
        json.dump(cfg, f)


def assert_clean(out: str) -> None:
    """No OUT and no `.OUT.tmp-*` left beside it."""
    assert not os.path.exists(out)
    parent, name = os.path.split(out)
    assert glob.glob(os.path.join(parent, f".{name}.tmp-*")) == []


def fails(src: str, out: str, *needles: str, clip: str | None = None) -> str:
    """Converts, expecting a ConversionError whose message holds every needle; checks atomicity."""
    with pytest.raises(ConversionError) as info:
        convert(src, out, clip=clip, progress=False)
    message = str(info.value)
    # pytest names tmp_path after the test ("test_pickle_..."): look for words outside it
    bare = message.replace(os.path.dirname(out), "<tmp>")
    for needle in needles:
        where = message if os.sep in needle else bare
        assert needle in where, f"{needle!r} not in error message:\n{message}"
    assert_clean(out)
    return message


# ---- tensors ------------------------------------------------------------------------------------


def test_missing_tensor(src, tmp_path):
    rewrite(os.path.join(src, "model.safetensors"), lambda t: t.pop(MISSING))
    message = fails(src, str(tmp_path / "out"), "missing tensors")
    assert MISSING in message or MISSING_CANONICAL in message, message


def test_unexpected_tensor(src, tmp_path):
    rewrite(os.path.join(src, "model.safetensors"),
            lambda t: t.__setitem__(EXTRA, np.zeros((4, 4), np.float32)))
    fails(src, str(tmp_path / "out"), "unexpected", EXTRA)


def test_misshaped_tensor(src, tmp_path):
    rewrite(os.path.join(src, "model.safetensors"),
            lambda t: t.__setitem__(MISSHAPED, np.zeros((32, 31), np.float32)))
    fails(src, str(tmp_path / "out"), "mis-shaped", MISSHAPED, "(32, 31)")


# ---- files --------------------------------------------------------------------------------------


def test_truncated_file(src, tmp_path):
    file = os.path.join(src, "model.safetensors")
    size = os.path.getsize(file)
    with open(file, "r+b") as f:
        f.truncate(size // 2)
    fails(src, str(tmp_path / "out"), file, "truncated")


def test_garbage_file(src, tmp_path):
    file = os.path.join(src, "model.safetensors")
    with open(file, "wb") as f:
        f.write(np.random.default_rng(0).bytes(4096))
    fails(src, str(tmp_path / "out"), file, "corrupt")


def test_pickle_directory_refused(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llava"}))
    # not a valid pickle: the converter must refuse by name, never try to unpickle
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle" * 10)
    message = fails(str(src), str(tmp_path / "out"), "pickle", "refused", "--allow-pickle",
                    str(src / "pytorch_model.bin"))
    assert "safetensors" in message.replace(str(tmp_path), "")


@pytest.mark.parametrize("suffix", [".bin", ".pt"])
def test_pickle_file_refused(tmp_path, suffix):
    path = tmp_path / f"model{suffix}"
    path.write_bytes(b"\x80\x04not really a pickle" * 10)
    fails(str(path), str(tmp_path / "out"), "pickle", "refused", "--allow-pickle", str(path))


def test_corrupt_pickle_with_allow_pickle(tmp_path):
    """--allow-pickle reads through PyTorch's weights-only loader; a damaged file is refused by name."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "llava"}))
    (src / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle" * 10)
    out = str(tmp_path / "out")
    with pytest.raises(ConversionError) as info:
        convert(str(src), out, allow_pickle=True, progress=False)
    assert str(info.value).startswith(f"{src / 'pytorch_model.bin'}: refused: not a plain tensor checkpoint")
    assert_clean(out)


def test_empty_directory(tmp_path):
    (tmp_path / "src").mkdir()
    fails(str(tmp_path / "src"), str(tmp_path / "out"), "no .safetensors files")


def test_sharded_missing_shard(pristine_sharded, tmp_path):
    src = shutil.copytree(pristine_sharded, str(tmp_path / "src"))
    with open(os.path.join(src, "model.safetensors.index.json")) as f:
        shards = sorted(set(json.load(f)["weight_map"].values()))
    assert len(shards) > 2
    gone = shards[1]
    os.remove(os.path.join(src, gone))
    fails(src, str(tmp_path / "out"), "missing", gone)


def test_sharded_index_lists_tensor_not_in_shard(pristine_sharded, tmp_path):
    src = shutil.copytree(pristine_sharded, str(tmp_path / "src"))
    index = os.path.join(src, "model.safetensors.index.json")
    with open(index) as f:
        data = json.load(f)
    data["weight_map"]["language_model.model.layers.0.ghost.weight"] = data["weight_map"][MISSING]
    with open(index, "w") as f:
        json.dump(data, f)
    fails(src, str(tmp_path / "out"), "language_model.model.layers.0.ghost.weight", index)


def test_sharded_converts(pristine_sharded, pristine, tmp_path):
    """Control for the sharded tests: the intact sharded checkpoint converts to the same groups."""
    a = convert(pristine_sharded, str(tmp_path / "a"), progress=False)
    b = convert(pristine, str(tmp_path / "b"), progress=False)
    assert checkpoint.read_metadata(a)["groups"] == checkpoint.read_metadata(b)["groups"]


def test_relative_paths(pristine, tmp_path, monkeypatch):
    """`jaxflow convert src out` and `jaxflow.load(out)` with paths relative to the working directory
    (orbax itself takes only absolute ones)."""
    monkeypatch.chdir(tmp_path)
    out = convert(os.path.relpath(pristine, tmp_path), "rel", progress=False)
    model = jaxflow.load(out)
    want = jaxflow.load(convert(pristine, str(tmp_path / "abs"), progress=False))
    np.testing.assert_array_equal(np.asarray(model.module.language_model.embed_tokens.embedding),
                                  np.asarray(want.module.language_model.embed_tokens.embedding))


@pytest.mark.parametrize("stored", ["bfloat16", "float16"])
def test_half_precision_source(src, tmp_path, stored):
    """bf16 / fp16 checkpoints (as most released LLaVA weights are) convert exactly."""
    half = BF16 if stored == "bfloat16" else np.dtype(np.float16)
    file = os.path.join(src, "model.safetensors")
    originals = load_file(file)
    rewrite(file, lambda t: t.update({k: v.astype(half) for k, v in t.items()}))
    out = convert(src, str(tmp_path / "out"), progress=False)
    model = jaxflow.load(out)
    assert model.module.language_model.embed_tokens.embedding.dtype == np.float32
    got = np.asarray(model.module.language_model.embed_tokens.embedding)
    want = originals["language_model.model.embed_tokens.weight"].astype(half).astype(np.float32)
    assert not np.array_equal(got, originals["language_model.model.embed_tokens.weight"])
    np.testing.assert_array_equal(got, want)


# ---- config -------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, attribute", [
    (lambda c: c["text_config"].update(hidden_act="gelu"), "text_config.hidden_act"),
    (lambda c: c["vision_config"].update(hidden_act="gelu"), "vision_config.hidden_act"),
    (lambda c: c["text_config"].update(rope_parameters={
        "rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 1024}),
     "text_config.rope_parameters.rope_type"),
    (lambda c: c["text_config"].update(attention_bias=True), "text_config.attention_bias"),
    (lambda c: c.update(projector_hidden_act="relu"), "projector_hidden_act"),
], ids=["text-act", "vision-act", "rope-llama3", "attention-bias", "projector-act"])
def test_unsupported_config(src, tmp_path, change, attribute):
    edit_config(src, change)
    fails(src, str(tmp_path / "out"), attribute, "not supported", os.path.join(src, "config.json"))


def test_missing_config(src, tmp_path):
    os.remove(os.path.join(src, "config.json"))
    fails(src, str(tmp_path / "out"), os.path.join(src, "config.json"))


# ---- atomicity, output directory ------------------------------------------------------------------


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_crash_while_writing_leaves_nothing(src, tmp_path, monkeypatch, exc):
    real = checkpoint.GroupWriter.write
    calls = []

    def flaky(self, group, params):
        calls.append(group)
        if len(calls) == 3:
            # by now two groups are on disk in the temporary directory
            assert len(os.listdir(os.path.join(self.directory, "params"))) == 2
            raise exc("simulated crash")
        return real(self, group, params)

    monkeypatch.setattr(checkpoint.GroupWriter, "write", flaky)
    out = str(tmp_path / "out")
    with pytest.raises(exc, match="simulated crash"):
        convert(src, out, progress=False)
    assert len(calls) == 3
    assert_clean(out)
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_out_exists_refused_untouched(src, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ConversionError, match="already exists"):
        convert(src, str(out), progress=False)
    assert os.listdir(out) == ["keep.txt"]
    assert (out / "keep.txt").read_text() == "precious"
    assert glob.glob(str(tmp_path / ".out.tmp-*")) == []


def test_out_existing_file_refused(src, tmp_path):
    out = tmp_path / "out"
    out.write_text("precious")
    with pytest.raises(ConversionError, match="already exists"):
        convert(src, str(out), progress=False)
    assert out.read_text() == "precious"


def test_original_layout_needs_clip(model, tmp_path):
    src, clip = tiny.save_original(model, str(tmp_path / "src"), str(tmp_path / "clip"))
    fails(src, str(tmp_path / "out"), "--clip", "original")


def test_clip_with_llava_hf_refused(src, tmp_path):
    fails(src, str(tmp_path / "out"), "--clip", clip=src)


# ---- CLI ------------------------------------------------------------------------------------------


def test_cli_error_exit_code(src, tmp_path, capsys):
    rewrite(os.path.join(src, "model.safetensors"), lambda t: t.pop(MISSING))
    out = str(tmp_path / "out")
    assert cli.main(["convert", src, out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("jaxflow convert: error: ")
    assert "missing tensors" in err
    assert MISSING in err or MISSING_CANONICAL in err
    assert_clean(out)


def test_cli_allow_pickle(model, tmp_path, capsys):
    """`jaxflow convert --allow-pickle` reads a pytorch_model.bin checkpoint; without the flag it is refused."""
    src, clip = tiny.save_original(model, str(tmp_path / "src"), str(tmp_path / "clip"), pickle=True)
    assert cli.main(["convert", src, str(tmp_path / "refused"), "--clip", clip]) == 2
    assert "--allow-pickle" in capsys.readouterr().err
    out = str(tmp_path / "out")
    assert cli.main(["convert", src, out, "--clip", clip, "--allow-pickle", "--vision-tower", "clip"]) == 0
    meta = checkpoint.read_metadata(out)
    assert (meta["source_format"], meta["vision_tower"]) == ("pickle", "clip")


def test_cli_success(src, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli.main(["convert", src, out, "--dtype", "bfloat16"]) == 0
    assert "converted" in capsys.readouterr().out
    assert checkpoint.read_metadata(out)["dtype"] == "bfloat16"


# ---- bfloat16 ---------------------------------------------------------------------------------------


def test_bfloat16_conversion(pristine, tmp_path):
    f32_dir = convert(pristine, str(tmp_path / "f32"), progress=False)
    bf16_dir = convert(pristine, str(tmp_path / "bf16"), dtype="bfloat16", progress=False)
    assert checkpoint.read_metadata(bf16_dir)["dtype"] == "bfloat16"
    f32, bf16 = jaxflow.load(f32_dir), jaxflow.load(bf16_dir)
    assert f32.module.language_model.embed_tokens.embedding.dtype == np.float32
    assert bf16.module.language_model.embed_tokens.embedding.dtype == BF16
    # stored as bfloat16: float32 weights rounded to nearest
    emb16 = np.asarray(jaxflow.load(bf16_dir, dtype="float32").module.language_model.embed_tokens.embedding)
    emb32 = np.asarray(f32.module.language_model.embed_tokens.embedding)
    assert not np.array_equal(emb16, emb32)
    np.testing.assert_array_equal(emb16, emb32.astype(BF16).astype(np.float32))

    ids, pixels, sizes, _ = tiny.make_inputs(f32.config)
    a = np.asarray(f32.logits(ids, pixels, sizes), np.float32)
    b = np.asarray(bf16.logits(ids, pixels, sizes), np.float32)
    # every weight converted exactly: same logits as the float32 conversion cast on load
    cast = np.asarray(jaxflow.load(f32_dir, dtype="bfloat16").logits(ids, pixels, sizes), np.float32)
    np.testing.assert_array_equal(b, cast)
    # close to float32; bfloat16 compute on this tiny model (large init) gives max error ~0.19
    assert np.abs(a).max() > 2.0
    assert not np.array_equal(a, b)
    np.testing.assert_allclose(b, a, atol=0.3)
    assert np.abs(a - b).mean() < 0.05
    np.testing.assert_array_equal(b.argmax(-1), a.argmax(-1))
