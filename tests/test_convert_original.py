"""Original-layout LLaVA checkpoints (liuhaotian/*, lmms-lab/*) convert to what LLaVA's own code (llava-torch
1.2.2) runs: the vision tower it loads, its (width, height) anyres pinpoints, its CLIP image processor, its
SentencePiece tokenizer; pickle shards only on request, through PyTorch's weights-only loader."""

from __future__ import annotations

import gc
import json
import os
import shutil
import weakref

import ml_dtypes
import numpy as np
import pytest
import tiny
import torch
from flax import nnx
from safetensors.numpy import load_file, save_file
from test_convert_errors import assert_clean, edit_config, fails
from test_parity import hf_forward, jf_ids

import jaxflow
from jaxflow import checkpoint
from jaxflow.config import ModelConfig
from jaxflow.convert import ConversionError, convert, mapping
from jaxflow.convert.sources import PickleSource
from jaxflow.geometry import grid_shape, image_layout

NEXT_SIZES = ((42, 42), (100, 30), (30, 100))  # (H, W)
BF16 = np.dtype(ml_dtypes.bfloat16)


@pytest.fixture(scope="module")
def tuned():
    """The LLaVA-NeXT twin: its tower is the fine-tuned one LLaVA stores in the checkpoint."""
    return tiny.hf_model("llava_next", seed=0)


@pytest.fixture(scope="module")
def pretrained():
    """Another twin: its tower plays the separate CLIP checkpoint the tuned tower started from."""
    return tiny.hf_model("llava_next", seed=1)


def save(tmp_path, model, **kw):
    return tiny.save_original(model, str(tmp_path / "src"), str(tmp_path / "clip"), **kw)


def params(path) -> dict[str, np.ndarray]:
    model = jaxflow.load(path)
    return {checkpoint.path_str(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(model.module))}


def logits(model, hf):
    ids, pv, isz, mask = tiny.make_inputs(model.config, image_sizes=NEXT_SIZES, num_text=5)
    ours = np.asarray(model.logits(jf_ids(model, ids), pv, isz, attention_mask=mask))
    return ours, hf_forward(hf, ids, pv, isz, mask).logits.numpy()


def patch_kernel(tensor: np.ndarray) -> np.ndarray:
    return mapping.conv_patch(tensor.astype(np.float32))


# ---- 1. vision tower ----------------------------------------------------------------------------------------------


def test_trained_tower_comes_from_the_checkpoint(tuned, pretrained, tmp_path):
    """unfreeze_mm_vision_tower: LLaVA runs the stored (tuned) tower, not --clip; jaxflow equals the twin whose
    tower is the stored one, and the old conversion (--clip's tower) does not."""
    src, clip = save(tmp_path, tuned, tower="stored", clip_model=pretrained, unfreeze=True)
    model = jaxflow.load(convert(src, str(tmp_path / "new"), clip=clip, progress=False))
    meta = model.metadata
    assert meta["vision_tower"] == "checkpoint"
    assert meta["vision_tower_path"] == os.path.abspath(src)
    assert "unfreeze_mm_vision_tower" in meta["vision_tower_reason"]
    stored = load_file(os.path.join(src, "model.safetensors"))[tiny.STORED_TOWER + "embeddings.patch_embedding.weight"]
    other = load_file(os.path.join(clip, "model.safetensors"))["vision_model.embeddings.patch_embedding.weight"]
    kernel = np.asarray(model.module.vision_tower.patch_embed.kernel)
    np.testing.assert_array_equal(kernel, patch_kernel(stored))
    assert not np.allclose(kernel, patch_kernel(other))

    ours, ref = logits(model, tuned)
    old = jaxflow.load(convert(src, str(tmp_path / "old"), clip=clip, vision_tower="clip", progress=False))
    assert old.metadata["vision_tower"] == "clip"
    stale, _ = logits(old, tuned)
    err, old_err = np.abs(ours - ref).max(), np.abs(stale - ref).max()
    print(f"tuned-tower twin: max |logits diff| vs transformers: stored tower {err:.2e}, --clip tower {old_err:.3f} "
          f"(logit scale {np.abs(ref).max():.2f}); argmax changed at {(stale.argmax(-1) != ref.argmax(-1)).mean():.0%}")
    assert err < 1e-4
    assert old_err > 0.1


def test_tunable_parts_name_the_tower(tuned, pretrained, tmp_path):
    """lmms-lab's LLaVA-NeXT code also loads the tower before the checkpoint when mm_tunable_parts names it."""
    src, clip = save(tmp_path, tuned, tower="stored", clip_model=pretrained)
    edit_config(src, lambda c: c.update(mm_tunable_parts="mm_vision_tower,mm_mlp_adapter,mm_language_model"))
    out = convert(src, str(tmp_path / "out"), clip=clip, progress=False)
    meta = checkpoint.read_metadata(out)
    assert meta["vision_tower"] == "checkpoint"
    assert "mm_tunable_parts" in meta["vision_tower_reason"]


def test_unflagged_tower_that_differs_from_clip_is_used(tuned, pretrained, tmp_path):
    """No flag in config.json, but the stored tower is complete and is not --clip's: it was trained."""
    src, clip = save(tmp_path, tuned, tower="stored", clip_model=pretrained)
    model = jaxflow.load(convert(src, str(tmp_path / "out"), clip=clip, progress=False))
    assert model.metadata["vision_tower"] == "checkpoint"
    assert "differs from --clip" in model.metadata["vision_tower_reason"]
    ours, ref = logits(model, tuned)
    assert np.abs(ours - ref).max() < 1e-4


def test_frozen_copy_uses_clip(tuned, tmp_path):
    """A complete stored tower that is --clip rounded to the checkpoint's bfloat16 (what a frozen LLaVA-1.5 save
    holds): LLaVA runs --clip, and so does the conversion (float32 weights, not their bfloat16 copy)."""
    src, clip = save(tmp_path, tuned, tower="stored", dtype="bfloat16")
    out = convert(src, str(tmp_path / "out"), clip=clip, progress=False)
    meta = checkpoint.read_metadata(out)
    assert meta["vision_tower"] == "clip"
    assert meta["vision_tower_path"] == os.path.abspath(clip)
    assert "frozen copy" in meta["vision_tower_reason"]
    kernel = params(out)["vision_tower.patch_embed.kernel"]
    clip_weight = load_file(os.path.join(clip, "model.safetensors"))["vision_model.embeddings.patch_embedding.weight"]
    np.testing.assert_array_equal(kernel, patch_kernel(clip_weight))
    assert not np.array_equal(kernel, patch_kernel(clip_weight.astype(BF16)))


def test_lone_stale_tensor_is_not_a_tower(tmp_path):
    """The default saver stores one post_layernorm tensor under the tower prefix: not a tower; --clip is used."""
    src, clip = save(tmp_path, tiny.hf_model("llava"))
    meta = checkpoint.read_metadata(convert(src, str(tmp_path / "out"), clip=clip, progress=False))
    assert meta["vision_tower"] == "clip"
    assert "stores no complete one" in meta["vision_tower_reason"]


def test_incomplete_trained_tower_refused(tuned, pretrained, tmp_path):
    src, clip = save(tmp_path, tuned, tower="stored", clip_model=pretrained, unfreeze=True)
    gone = tiny.STORED_TOWER + "encoder.layers.0.mlp.fc1.weight"
    file = os.path.join(src, "model.safetensors")
    tensors = load_file(file)
    del tensors[gone]
    save_file(tensors, file)
    fails(src, str(tmp_path / "out"), "incomplete", "missing tensors (1)", gone, "unfreeze_mm_vision_tower", clip=clip)


def test_forced_checkpoint_tower_without_one_refused(tmp_path):
    src, clip = save(tmp_path, tiny.hf_model("llava"))
    with pytest.raises(ConversionError) as info:
        convert(src, str(tmp_path / "out"), clip=clip, vision_tower="checkpoint", progress=False)
    assert "--vision-tower checkpoint" in str(info.value)
    assert tiny.STORED_TOWER + "embeddings.patch_embedding.weight" in str(info.value)
    assert_clean(str(tmp_path / "out"))


def test_trained_tower_needs_no_clip_weights(tuned, pretrained, tmp_path):
    """With the tower from the checkpoint, --clip supplies only config.json and preprocessor_config.json."""
    src, clip = save(tmp_path, tuned, tower="stored", clip_model=pretrained, unfreeze=True)
    os.remove(os.path.join(clip, "model.safetensors"))
    model = jaxflow.load(convert(src, str(tmp_path / "out"), clip=clip, progress=False))
    ours, ref = logits(model, tuned)
    assert np.abs(ours - ref).max() < 1e-4


# facts of liuhaotian/llava-v1.6-vicuna-7b's config.json: every key it carries besides the sizes tiny.py writes
LLAVA_16_KEYS = {
    "_name_or_path": "./checkpoints/vicuna-7b-v1-6", "attention_bias": False, "attention_dropout": 0.0,
    "bos_token_id": 1, "eos_token_id": 2, "freeze_mm_mlp_adapter": False, "freeze_mm_vision_resampler": False,
    "image_crop_resolution": 224, "image_split_resolution": 224, "initializer_range": 0.02, "mm_projector_lr": None,
    "mm_resampler_type": None, "mm_vision_tower_lr": 2e-06, "pad_token_id": 0, "pretraining_tp": 1,
    "rope_scaling": None, "tokenizer_model_max_length": 4096, "tokenizer_padding_side": "right",
    "torch_dtype": "bfloat16", "transformers_version": "4.36.2", "tune_mm_mlp_adapter": False,
    "tune_mm_vision_resampler": False, "unfreeze_mm_vision_tower": True, "use_cache": True, "use_mm_proj": True,
    "pretrain_mm_mlp_adapter": None,
}


def test_llava_16_config_keys_accepted(tuned, pretrained, tmp_path):
    src, clip = save(tmp_path, tuned, tower="stored", clip_model=pretrained)
    edit_config(src, lambda c: c.update(LLAVA_16_KEYS))
    meta = checkpoint.read_metadata(convert(src, str(tmp_path / "out"), clip=clip, progress=False))
    assert meta["vision_tower"] == "checkpoint"


@pytest.mark.parametrize("key, value", [("mm_resampler_type", "perceiver"), ("mm_vision_unknown", 3),
                                        ("mm_tunable_parts", "mm_vision_tower,mm_everything")])
def test_unknown_mm_attribute_refused(tuned, tmp_path, key, value):
    src, clip = save(tmp_path, tuned)
    edit_config(src, lambda c: c.update({key: value}))
    fails(src, str(tmp_path / "out"), key, "not supported", os.path.join(src, "config.json"), clip=clip)


@pytest.mark.parametrize("value", ["square", None, "anyres_max_9"])
def test_unsupported_aspect_ratio_refused(tuned, tmp_path, value):
    """Without 'pad' or 'anyres' LLaVA centre-crops the image (the CLIP processor alone): refused, not padded."""
    src, clip = save(tmp_path, tuned)
    edit_config(src, lambda c: c.pop("image_aspect_ratio") if value is None else c.update(image_aspect_ratio=value))
    fails(src, str(tmp_path / "out"), "image_aspect_ratio", "not supported", os.path.join(src, "config.json"),
          clip=clip)


# ---- 2. anyres pinpoints ------------------------------------------------------------------------------------------

# liuhaotian/llava-v1.6-*: (width, height) pairs as LLaVA's select_best_resolution reads them against image.size
LLAVA_16_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# Small images tie: e.g. 320x240 (W x H) fits 336x672 at scale 1.05 and 672x336 at scale 1.4, both keep all
# 76800 pixels and waste 225792 - 76800 px; LLaVA keeps the first, (W, H) = (336, 672): 2 rows x 1 column of crops.
# Features: 576 (base) + unpadded grid rows x (columns + 1 newline); for 320x240 the 48 x 24 patch grid holds
# int(240 * 24 / 320) = 18 content rows: 576 + 18 * 25 = 1026.
TIES = [  # (W, H) as LLaVA writes image.size, grid (rows, cols), image features
    ((320, 240), (2, 1), 1026),
    ((240, 320), (2, 1), 1376),
    ((240, 166), (2, 1), 976),
    ((176, 144), (2, 1), 1076),
    ((256, 256), (2, 1), 1176),
]


@pytest.fixture(scope="module")
def real_geometry(tmp_path_factory):
    """An original-layout NeXT checkpoint with CLIP-L/336 geometry and LLaVA-1.6's pinpoints, converted (config)."""
    root = tmp_path_factory.mktemp("geometry")
    twin = tiny.hf_model("llava_next", image_size=336, pinpoints=[[h, w] for w, h in LLAVA_16_PINPOINTS])
    src, clip = tiny.save_original(twin, str(root / "src"), str(root / "clip"))
    with open(os.path.join(src, "config.json")) as f:
        assert json.load(f)["image_grid_pinpoints"] == LLAVA_16_PINPOINTS  # the saver writes LLaVA's convention
    return src, clip, ModelConfig.from_pretrained(convert(src, str(root / "out"), clip=clip, progress=False))


@pytest.mark.parametrize("size_wh, grid, features", TIES, ids=[f"{w}x{h}" for (w, h), _, _ in TIES])
def test_tied_pinpoints_give_llava_grid(real_geometry, size_wh, grid, features):
    *_, cfg = real_geometry
    assert cfg.image.pinpoints == tuple((h, w) for w, h in LLAVA_16_PINPOINTS)
    w, h = size_wh
    layout = image_layout(cfg, (h, w))
    assert layout.grid == grid
    assert len(layout) == features
    # reading LLaVA's pairs as (height, width), as before, transposes the grid
    unswapped = ModelConfig.from_hf({**_hf(cfg), "image_grid_pinpoints": LLAVA_16_PINPOINTS})
    assert grid_shape(unswapped, (h, w)) == grid[::-1]


def _hf(cfg: ModelConfig) -> dict:
    """A transformers config dict for `cfg` (the converted config.json is one; rebuilt here to vary a key)."""
    from transformers import AutoConfig

    return AutoConfig.for_model("llava_next", vision_config={
        "model_type": "clip_vision_model", "hidden_size": cfg.vision.hidden_size,
        "intermediate_size": cfg.vision.intermediate_size, "num_hidden_layers": cfg.vision.num_layers,
        "num_attention_heads": cfg.vision.num_heads, "image_size": cfg.vision.image_size,
        "patch_size": cfg.vision.patch_size, "hidden_act": "quick_gelu"},
        text_config={"model_type": "llama", "vocab_size": cfg.text.vocab_size, "hidden_size": cfg.text.hidden_size,
                     "intermediate_size": cfg.text.intermediate_size, "num_hidden_layers": cfg.text.num_layers,
                     "num_attention_heads": cfg.text.num_heads},
        image_token_index=cfg.image_token_id).to_dict()


def test_pinpoints_string_literal(real_geometry, tmp_path):
    """llava-torch 1.2.2 also accepts the pinpoints as a string holding a Python list."""
    src, clip, want = real_geometry
    src = shutil.copytree(src, str(tmp_path / "src"))
    edit_config(src, lambda c: c.update(image_grid_pinpoints=str([tuple(p) for p in LLAVA_16_PINPOINTS])))
    cfg = ModelConfig.from_pretrained(convert(src, str(tmp_path / "out"), clip=clip, progress=False))
    assert cfg.image.pinpoints == want.image.pinpoints


@pytest.mark.parametrize("value, needle", [
    ("(1x1),...,(3x3)", "grid-range form"),
    ("[[336, 672], [672]]", "[width, height] pairs"),
    ([[336, 672], [672, -336]], "[width, height] pairs"),
    (None, "[width, height] pairs"),
])
def test_unsupported_pinpoints_refused(real_geometry, tmp_path, value, needle):
    src, clip, _ = real_geometry
    src = shutil.copytree(src, str(tmp_path / "src"))
    edit_config(src, lambda c: c.update(image_grid_pinpoints=value))
    fails(src, str(tmp_path / "out"), "image_grid_pinpoints", needle, os.path.join(src, "config.json"), clip=clip)


# ---- 3. SentencePiece tokenizer -----------------------------------------------------------------------------------

PROMPT = ("A chat between a curious user and an artificial intelligence assistant. USER: <image>\n"
          "What color is the jar, red or blue? \nAnswer the question using a single word or phrase. ASSISTANT:")


@pytest.mark.parametrize("legacy", [False, True])
def test_sentencepiece_only_tokenizer(tmp_path, legacy):
    """A checkpoint with only tokenizer.model + tokenizer_config.json (as liuhaotian/* ship) converts into a
    directory with a fast tokenizer.json that loads and tokenizes each prompt chunk as SentencePiece does (LLaVA's
    slow LlamaTokenizer tokenizes these chunks the same way)."""
    import sentencepiece as spm

    from jaxflow.inputs.prompts import encode

    src, clip = str(tmp_path / "src"), str(tmp_path / "clip")
    vocab = tiny.save_sentencepiece_tokenizer(src, legacy=legacy)
    tiny.save_original(tiny.hf_model("llava", vocab=vocab), src, clip)
    assert not os.path.exists(os.path.join(src, "tokenizer.json"))
    out = convert(src, str(tmp_path / "out"), clip=clip, progress=False)
    assert os.path.isfile(os.path.join(out, "tokenizer.json"))
    model = jaxflow.load(out)
    assert model.metadata["tokenizer_json"] == "built"
    tok = model.tokenizer
    assert tok.is_fast
    sp = spm.SentencePieceProcessor(model_file=os.path.join(src, "tokenizer.model"))
    for chunk in PROMPT.split("<image>"):
        enc = tok(chunk, return_offsets_mapping=True)
        assert enc.input_ids == [sp.bos_id()] + sp.encode(chunk)
        pieces = tok.convert_ids_to_tokens(enc.input_ids)
        for (a, b), piece in zip(enc.offset_mapping[1:], pieces[1:], strict=True):
            text = piece.replace("\u2581", " ")
            if piece.startswith("<0x"):  # a byte piece: the character it is (part of)
                assert chunk[a:b].encode()[:1] == bytes([int(piece[3:5], 16)]), (piece, a, b)
            elif a == 0 and piece == "\u2581":  # the space prepended to the text: given the first character
                assert b == 1
            else:  # the prepended space covers no character
                assert chunk[a:b] == (text[1:] if a == 0 and text[0] == " " else text), (piece, a, b)
    encoded = encode(PROMPT, tok, model.config.image_token_id, 9, mode="original")
    assert (encoded.input_ids == model.config.image_token_id).sum() == 9
    out_logits = np.asarray(model.logits(encoded.input_ids[None], np.zeros((1, 3, 42, 42), np.float32)))
    assert out_logits.shape == (1, len(encoded.input_ids), vocab)


def test_sentencepiece_missing_named(tmp_path, monkeypatch):
    import sys

    src, clip = str(tmp_path / "src"), str(tmp_path / "clip")
    vocab = tiny.save_sentencepiece_tokenizer(src)
    tiny.save_original(tiny.hf_model("llava", vocab=vocab), src, clip)
    monkeypatch.setitem(sys.modules, "sentencepiece", None)  # import fails
    fails(src, str(tmp_path / "out"), "sentencepiece and protobuf", os.path.join(src, "tokenizer.model"), clip=clip)


# ---- 4. image processor -------------------------------------------------------------------------------------------


def test_preprocessor_config_from_clip(tmp_path):
    src, clip = save(tmp_path, tiny.hf_model("llava"))
    assert not os.path.exists(os.path.join(src, "preprocessor_config.json"))
    out = convert(src, str(tmp_path / "out"), clip=clip, progress=False)
    with open(os.path.join(out, "preprocessor_config.json")) as f, \
            open(os.path.join(clip, "preprocessor_config.json")) as g:
        assert json.load(f) == json.load(g)
    assert checkpoint.read_metadata(out)["preprocessor_config"] == os.path.abspath(
        os.path.join(clip, "preprocessor_config.json"))


def test_preprocessor_config_clip_wins(tmp_path):
    """LLaVA builds its processor from the CLIP tower's files even when the LLaVA directory has one."""
    src, clip = save(tmp_path, tiny.hf_model("llava"))
    with open(os.path.join(src, "preprocessor_config.json"), "w") as f:
        json.dump({"image_processor_type": "CLIPImageProcessor", "crop_size": 999}, f)
    out = convert(src, str(tmp_path / "out"), clip=clip, progress=False)
    with open(os.path.join(out, "preprocessor_config.json")) as f:
        assert json.load(f)["crop_size"] == {"height": 42, "width": 42}
    os.remove(os.path.join(clip, "preprocessor_config.json"))  # without one in --clip, the LLaVA directory's
    out = convert(src, str(tmp_path / "out2"), clip=clip, progress=False)
    assert checkpoint.read_metadata(out)["preprocessor_config"] == os.path.abspath(
        os.path.join(src, "preprocessor_config.json"))


# ---- 6. pickle checkpoints ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def llava15():
    return tiny.hf_model("llava", kv_heads=2)


def test_pickle_refused_by_default_names_flag(llava15, tmp_path):
    src, clip = save(tmp_path, llava15, pickle=True, shards=2)
    first = os.path.join(src, "pytorch_model-00001-of-00002.bin")
    fails(src, str(tmp_path / "out"), "refused", "--allow-pickle", first, clip=clip)


def test_pickle_shards_equal_safetensors(llava15, tmp_path, monkeypatch):
    """bfloat16 pickle shards (liuhaotian/llava-v1.5-7b style: pytorch_model-0000N-of-0000M.bin + index) convert
    with --allow-pickle to exactly the parameters the same tensors give as safetensors, holding one shard at a time."""
    pkl, clip = tiny.save_original(llava15, str(tmp_path / "pkl"), str(tmp_path / "clip"), pickle=True, shards=3,
                                   dtype="bfloat16")
    st, _ = tiny.save_original(llava15, str(tmp_path / "st"), str(tmp_path / "clip2"), shards=3, dtype="bfloat16")
    loaded, held = [], []  # weak references to every shard loaded; shards still alive at each load
    real_load = torch.load

    class Shard(dict):  # a dict that weakref can follow
        pass

    def tracked(*args, **kw):
        gc.collect()
        held.append(sum(r() is not None for r in loaded))
        shard = Shard(real_load(*args, **kw))
        loaded.append(weakref.ref(shard))
        return shard

    monkeypatch.setattr(torch, "load", tracked)
    a = convert(pkl, str(tmp_path / "a"), clip=clip, allow_pickle=True, progress=False)
    monkeypatch.undo()
    assert len(held) > 3 and max(held) == 0, held  # each shard read for its names, then again for its tensors
    b = convert(st, str(tmp_path / "b"), clip=clip, progress=False)
    assert checkpoint.read_metadata(a)["source_format"] == "pickle"
    pa, pb = params(a), params(b)
    assert pa.keys() == pb.keys()
    for name in pa:
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)
    emb = llava15.state_dict()["model.language_model.embed_tokens.weight"].numpy()
    got = pa["language_model.embed_tokens.embedding"]
    np.testing.assert_array_equal(got, emb.astype(BF16).astype(np.float32))
    assert not np.array_equal(got, emb)


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # unpickling would run this: create the marker file
        return (open, (self.marker, "w"))


class _Thing:
    pass


@pytest.mark.parametrize("payload", ["reduce", "instance"])
def test_malicious_pickle_refused(llava15, tmp_path, payload):
    src, clip = save(tmp_path, llava15, pickle=True, shards=2)
    marker = tmp_path / "code-ran"
    shard = os.path.join(src, "pytorch_model-00002-of-00002.bin")
    state = torch.load(shard, weights_only=True)
    state["model.layers.0.mlp.up_proj.weight"] = _Payload(str(marker)) if payload == "reduce" else _Thing()
    torch.save(state, shard)
    out = str(tmp_path / "out")
    with pytest.raises(ConversionError) as info:
        convert(src, out, clip=clip, allow_pickle=True, progress=False)
    message = str(info.value)
    assert message.startswith(f"{shard}: refused: not a plain tensor checkpoint"), message
    assert ("GLOBAL io.open" if payload == "reduce" else "GLOBAL test_convert_original._Thing") in message
    assert not marker.exists()
    assert_clean(out)


def test_pickle_clip(llava15, tmp_path):
    """A pickle-only --clip is refused without the flag and read with it; where a CLIP directory holds both
    pytorch_model.bin and model.safetensors (openai/clip-vit-large-patch14-336), safetensors is read."""
    src, clip = save(tmp_path, llava15, clip_pickle=True)
    fails(src, str(tmp_path / "out"), "--allow-pickle", os.path.join(clip, "pytorch_model.bin"), clip=clip)
    a = convert(src, str(tmp_path / "a"), clip=clip, allow_pickle=True, progress=False)
    tiny.save_tensors(tiny.original_tensors(llava15)[2], clip)  # add model.safetensors beside the .bin
    with open(os.path.join(clip, "pytorch_model.bin"), "wb") as f:
        f.write(b"\x80\x04not a pickle")  # never opened
    b = convert(src, str(tmp_path / "b"), clip=clip, progress=False)
    pa, pb = params(a), params(b)
    for name in pa:
        np.testing.assert_array_equal(pa[name], pb[name], err_msg=name)


def test_pickle_source_reads_bfloat16(tmp_path):
    path = str(tmp_path / "pytorch_model.bin")
    x = torch.randn(3, 5).to(torch.bfloat16)
    torch.save({"x": x, "i": torch.arange(4)}, path)
    source = PickleSource(str(tmp_path), [path])
    got = source.get("x")
    assert got.dtype == BF16 and source.shape("x") == (3, 5)
    np.testing.assert_array_equal(got.astype(np.float32), x.float().numpy())
    np.testing.assert_array_equal(source.get("i"), np.arange(4))
