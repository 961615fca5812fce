"""SigLIP vision towers (llava-interleave / OneVision style) against transformers on tiny random twins: config
reading and refusals, logits, image features, knockouts, greedy generation, a sweep, conversion errors, and
SiglipImageProcessor preprocessing with the study's red-mask rule through the same squash resize."""

import csv
import json
import os

import jax
import numpy as np
import PIL.Image
import pytest
import tiny
import torch
import toy_tokenizers
import transformers
from test_parity import hf_forward, hf_greedy
from transformers import SiglipVisionConfig
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

import jaxflow
from jaxflow import Knockout
from jaxflow.config import ModelConfig, UnsupportedConfigError
from jaxflow.convert import ConversionError, convert
from jaxflow.geometry import image_layout
from jaxflow.inputs import gqa, images
from jaxflow.model import param_shapes
from jaxflow.reference import dense_cut, embeddings, run_layers
from jaxflow.sweep.batching import prepare
from jaxflow.testing import write_random_checkpoint

TOL = 1e-4
SIGLIP_MEAN = SIGLIP_STD = (0.5, 0.5, 0.5)
NEXT_SIZES = ((42, 42), (100, 30), (30, 100), (500, 77))

CASES = [
    # (id, kind, layout, config): llava-interleave's -1 / full first
    ("1.5-full-last", "llava", "llava-hf", {"strategy": "full", "feature_layer": -1}),
    ("1.5-default-2", "llava", "llava-hf", {"feature_layer": -2, "kv_heads": 2}),
    ("1.5-full-legacy", "llava", "llava-hf-legacy", {"strategy": "full", "feature_layer": -1}),
    ("1.5-full-model-layers", "llava", "llava-hf-model", {"strategy": "full", "feature_layer": [-3, -1]}),
    ("next-full-last", "llava_next", "llava-hf", {"strategy": "full", "feature_layer": -1, "kv_heads": 2}),
    ("next-full-2", "llava_next", "llava-hf", {"strategy": "full", "feature_layer": -2}),
]


def _siglip_llava(strategy="full", feature_layer=-1, kind="llava", **vision):
    shape = dict(hidden_size=1152, intermediate_size=4304, num_hidden_layers=27, num_attention_heads=16,
                 image_size=384, patch_size=14)
    shape.update(vision)
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    common = dict(vision_config=SiglipVisionConfig(**shape).to_dict(), text_config=text,
                  vision_feature_select_strategy=strategy, vision_feature_layer=feature_layer)
    if kind == "llava_next":
        return transformers.LlavaNextConfig(image_grid_pinpoints=[[384, 768], [768, 384]], **common).to_dict()
    return transformers.LlavaConfig(**common).to_dict()


def _inputs(model, kind, **kw):
    sizes = NEXT_SIZES if kind == "llava_next" else ((42, 42), (42, 42))
    ids, pv, isz, mask = tiny.make_inputs(model.config, image_sizes=sizes, num_text=5, **kw)
    ids[1, -4:] = np.where(mask[1, -4:] == 1, 3, ids[1, -4:])  # rows differ in text too
    return ids, pv, isz, mask


# ---------------------------------------------------------------- config


def test_so400m_config_and_parameters():
    """so400m-patch14-384 as llava-interleave / OneVision configure it: 27 x 27 patches, no CLS, no pre-layernorm."""
    cfg = ModelConfig.from_hf(_siglip_llava())
    v = cfg.vision
    assert (v.kind, v.hidden_size, v.num_layers, v.grid, v.layer_norm_eps, v.has_cls) == ("siglip", 1152, 27, 27,
                                                                                             1e-6, False)
    assert cfg.features_per_crop == 729 and cfg.patch_offset == 0
    shapes = {k: tuple(s.shape) for k, s in param_shapes(cfg).items() if k.startswith("vision_tower.")
              and ".layers." not in k}
    assert shapes == {"vision_tower.patch_embed.kernel": (3 * 14 * 14, 1152), "vision_tower.patch_embed.bias": (1152,),
                      "vision_tower.pos_embed": (729, 1152)}
    assert cfg.vision_layers_needed() == 27
    lay = image_layout(cfg)
    assert len(lay) == 729 and (lay.row >= 0).all() and (lay.row[-1], lay.col[-1]) == (26, 26)

    # "default" drops the tower's first token as transformers does: for SigLIP a real patch, (0, 0)
    default = ModelConfig.from_hf(_siglip_llava("default", -2))
    lay = image_layout(default)
    assert default.features_per_crop == 728 and (lay.row[0], lay.col[0]) == (0, 1)
    assert default.vision_layers_needed() == 26
    np.testing.assert_array_equal(lay.feature_index(default, 2), 2 * 728 + np.arange(728))

    # LLaVA-NeXT packs each crop's features as its patch grid: SigLIP needs "full" there
    assert ModelConfig.from_hf(_siglip_llava(kind="llava_next")).features_per_crop == 729
    with pytest.raises(UnsupportedConfigError, match="vision_feature_select_strategy='default'.*siglip"):
        ModelConfig.from_hf(_siglip_llava("default", kind="llava_next"))


@pytest.mark.parametrize("key,value,match", [
    ("hidden_act", "gelu", r"vision_config\.hidden_act='gelu' is not supported \(jaxflow implements "
                           r"'gelu_pytorch_tanh'\)"),
    ("model_type", "dinov2", r"vision_config\.model_type='dinov2' is not supported.*'siglip_vision_model'"),
    ("num_channels", 4, r"vision_config\.num_channels=4"),
])
def test_unsupported_vision_configs_are_named(key, value, match):
    d = _siglip_llava()
    d["vision_config"][key] = value
    with pytest.raises(UnsupportedConfigError, match=match):
        ModelConfig.from_hf(d)


# ---------------------------------------------------------------- the model against transformers


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_logits_match_transformers(twins, case):
    name, kind, layout, kw = case
    hf, model = twins(kind, layout, vision_type="siglip", **kw)
    assert model.config.vision.kind == "siglip"
    ids, pv, isz, mask = _inputs(model, kind)
    ours = np.asarray(model.logits(ids, pv, isz, attention_mask=mask))
    ref = hf_forward(hf, ids, pv, isz, mask).logits.numpy()
    err = np.abs(ours - ref).max()
    print(f"siglip {name}: max |logits diff| = {err:.2e} (logit scale {np.abs(ref).max():.2f})")
    assert ours.shape == ref.shape
    assert err < TOL
    # the images matter: other pixels move the logits far beyond the tolerance
    other = np.asarray(model.logits(ids, pv + 0.5, isz, attention_mask=mask))
    assert np.abs(other - ours).max() > 100 * TOL


@pytest.mark.parametrize("kind,kw", [("llava", {"strategy": "full", "feature_layer": -1}),
                                     ("llava", {"feature_layer": -2}),
                                     ("llava_next", {"strategy": "full", "feature_layer": -1})])
def test_image_features_match_and_skip_the_post_layernorm(twins, kind, kw):
    """Projected image features per crop equal transformers' get_image_features; applying SigLIP's post-layernorm
    to the selected layer (which transformers does not) would change them."""
    hf, model = twins(kind, "llava-hf", vision_type="siglip", **kw)
    cfg = model.config
    crops = np.random.default_rng(1).standard_normal((3, 3, 42, 42)).astype(np.float32)
    ours = np.asarray(model.module.image_features(crops))
    with torch.no_grad():
        out = hf.model.vision_tower(torch.tensor(crops), output_hidden_states=True)
        layer = cfg.projector.feature_layers[0]
        selected = out.hidden_states[layer]
        if cfg.projector.select_strategy == "default":
            selected = selected[:, 1:]
        ref = hf.model.multi_modal_projector(selected).numpy()
        normed = hf.model.multi_modal_projector(hf.model.vision_tower.post_layernorm(selected)).numpy()
    assert ours.shape == ref.shape == (3, cfg.features_per_crop, cfg.text.hidden_size)
    assert cfg.features_per_crop == 9 - (cfg.projector.select_strategy == "default")
    assert np.abs(ours - ref).max() < 1e-5
    assert np.abs(normed - ref).max() > 0.1
    if kind == "llava":  # LlavaModel's own selection agrees
        with torch.no_grad():
            theirs = hf.model.get_image_features(torch.tensor(crops), vision_feature_layer=layer,
                                                 vision_feature_select_strategy=cfg.projector.select_strategy).pooler_output
        assert np.abs(ours - torch.stack(list(theirs)).numpy()).max() < 1e-5


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_knockouts_match_transformers_with_float_masks(twins, kind):
    hf, model = twins(kind, "llava-hf", vision_type="siglip", strategy="full", feature_layer=-1)
    ids, pv, isz, _ = tiny.make_inputs(model.config, image_sizes=((100, 30),), num_text=6)
    t = ids.shape[1]
    image = np.flatnonzero(ids[0] == tiny.IMAGE_TOKEN).tolist()
    question, last = list(range(image[-1] + 1, t - 1)), [t - 1]
    kos = [Knockout(source=image, target=question, layers=[0, 1]),
           Knockout(source=question, target=last),
           Knockout(source=image, target=last, layers=[1], heads=[0, 3]),
           Knockout(source=image[:3], target=question[:2] + last, layers=[0, 2])]
    text = model.config.text
    logits = np.asarray(model.logits(ids, pv, isz, knockouts=kos))  # [K, B, T, V]
    base = np.asarray(model.logits(ids, pv, isz))
    embeds = embeddings(hf, ids, pv, isz)
    for k, ko in enumerate(kos):
        cut = dense_cut(ko.source, ko.target, ko.layers, ko.heads, *ids.shape, text.num_layers, text.num_heads)
        ref, _ = run_layers(hf, embeds, cut, return_weights=False)
        err = np.abs(logits[k] - ref).max()
        print(f"siglip {kind} knockout {k}: max |logits diff| = {err:.2e}")
        assert err < TOL
        assert np.abs(logits[k] - base).max() > 100 * TOL  # the cut changed something


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_greedy_generation_matches_transformers(twins, kind):
    hf, model = twins(kind, "llava-hf", vision_type="siglip", strategy="full", feature_layer=-1)
    sizes = ((42, 42), (100, 30), (30, 100)) if kind == "llava_next" else ((42, 42),) * 3
    ids, pv, isz, mask = tiny.make_inputs(model.config, image_sizes=sizes, num_text=[5, 3, 8], seed=3)
    steps = 6
    out = model.generate(ids, pv, isz, attention_mask=mask, max_new_tokens=steps, eos_token_id=2)
    for row in range(len(ids)):
        ref_tokens, ref_probs = hf_greedy(hf, ids, pv, isz, mask, row, steps, 2)
        np.testing.assert_array_equal(out.tokens[row, : len(ref_tokens)], ref_tokens)
        assert np.abs(out.first_token_probs[row] - ref_probs).max() < 1e-5


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_384_px_crops_end_to_end(twins, kind):
    """so400m-size crops (384 px: 27 x 27 patches of 14 and 6 pixel rows / columns the conv never sees): jaxflow's
    pixels equal the processor's (SiglipImageProcessor; for NeXT LlavaNextImageProcessor with SigLIP's mean / std)
    and the logits match transformers on them."""
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    pinpoints = [[384, 768], [768, 384], [768, 768]]
    hf, model = twins(kind, "llava-hf", vision_type="siglip", strategy="full", feature_layer=-1, image_size=384,
                      pinpoints=pinpoints)
    cfg = model.config
    if kind == "llava":
        settings, processor = images.ProcessorSettings.from_dict(_preprocessor_config(384)), _siglip_processor(384)
    else:
        settings = images.ProcessorSettings(SIGLIP_MEAN, SIGLIP_STD, 384, 384, 3)
        processor = LlavaNextImageProcessorPil(image_grid_pinpoints=pinpoints, size={"shortest_edge": 384},
                                               crop_size={"height": 384, "width": 384},
                                               image_mean=list(SIGLIP_MEAN), image_std=list(SIGLIP_STD))
    rng = np.random.default_rng(0)
    for h, w in [(300, 500), (700, 300)]:
        image = PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        pv, size = images.preprocess(image, cfg, settings)
        theirs = np.asarray(processor(image)["pixel_values"])
        assert pv.shape == theirs.shape and np.abs(pv - theirs).max() <= 1e-6
        lay = image_layout(cfg, size) if cfg.image.anyres else image_layout(cfg)
        ids = np.concatenate([[1], np.full(len(lay), tiny.IMAGE_TOKEN), rng.integers(2, 120, 5)])[None]
        sizes = np.asarray([size]) if cfg.image.anyres else None
        ours = np.asarray(model.logits(ids, pv, sizes))
        ref = hf_forward(hf, ids, pv, sizes).logits.numpy()
        err = np.abs(ours - ref).max()
        print(f"siglip {kind} 384 px {h}x{w}: {len(lay)} image features, max |logits diff| = {err:.2e}")
        assert len(lay) >= 729 and err < TOL
    edge = pv.copy()
    edge[..., 378:, :] += 5.0  # the pixels past 27 * 14 change nothing, in transformers too
    edge[..., :, 378:] -= 5.0
    assert np.array_equal(np.asarray(model.logits(ids, edge, sizes)), ours)
    assert np.abs(hf_forward(hf, ids, edge, sizes).logits.numpy() - ref).max() < 1e-6


# ---------------------------------------------------------------- conversion


def test_pooling_head_and_post_layernorm_are_dropped(twins, tmp_path):
    """Every parameter comes from one tensor of the save; what is left over is the head, the post-layernorm and the
    layers after the feature layer."""
    from safetensors import safe_open

    from jaxflow.convert import mapping

    hf, model = twins("llava", "llava-hf", vision_type="siglip", feature_layer=-2, kv_heads=2)
    hf.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "model.safetensors"), "np") as f:
        disk = {mapping.canonical("llava-hf", k) for k in f.keys()}
    sources = {mapping.source_of(p)[0] for p in param_shapes(model.config)}
    assert sources <= disk
    leftover = disk - sources
    assert {k.split(".")[1] for k in leftover} == {"head", "post_layernorm", "encoder"}
    assert all(k.startswith(("vision.head.", "vision.post_layernorm.", "vision.encoder.layers.2.")) for k in leftover)


def _save(tmp_path, **kw):
    hf = tiny.hf_model("llava", vision_type="siglip", strategy="full", feature_layer=-1, **kw)
    return hf, tiny.save_llava_hf(hf, str(tmp_path / "src"))


def test_conversion_errors_are_named(tmp_path):
    from safetensors.numpy import load_file, save_file

    _, src = _save(tmp_path)
    config = os.path.join(src, "config.json")
    with open(config) as f:
        good = json.load(f)
    bad = json.loads(json.dumps(good))
    bad["vision_config"]["hidden_act"] = "relu"
    with open(config, "w") as f:
        json.dump(bad, f)
    with pytest.raises(ConversionError, match=r"config\.json: config attribute vision_config\.hidden_act='relu'"):
        convert(src, str(tmp_path / "out1"), progress=False)
    # a SigLIP config over a CLIP checkpoint's tensors: the conv bias is missing, the CLS and pre-layernorm unexpected
    with open(config, "w") as f:
        json.dump(good, f)
    tensors = load_file(os.path.join(src, "model.safetensors"))
    tensors.pop("vision_tower.embeddings.patch_embedding.bias")
    tensors["vision_tower.embeddings.class_embedding"] = np.zeros(32, np.float32)
    save_file(tensors, os.path.join(src, "model.safetensors"))
    with pytest.raises(ConversionError) as e:
        convert(src, str(tmp_path / "out2"), progress=False)
    assert "missing tensors (1): ['vision.embeddings.patch_embedding.bias']" in str(e.value)
    assert "unexpected tensors (1): ['vision_tower.embeddings.class_embedding']" in str(e.value)
    assert not os.path.exists(tmp_path / "out1") and not os.path.exists(tmp_path / "out2")


# ---------------------------------------------------------------- preprocessing and the study's rule


def _siglip_processor(side, **kw):
    return SiglipImageProcessorPil(size={"height": side, "width": side}, image_mean=list(SIGLIP_MEAN),
                                   image_std=list(SIGLIP_STD), resample=3, **kw)


def _preprocessor_config(side) -> dict:
    """What a llava-interleave save carries (so400m at `side` px)."""
    return {"image_processor_type": "SiglipImageProcessor", "do_convert_rgb": True, "do_normalize": True,
            "do_rescale": True, "do_resize": True, "image_mean": list(SIGLIP_MEAN), "image_std": list(SIGLIP_STD),
            "resample": 3, "rescale_factor": 1 / 255, "size": {"height": side, "width": side}}


SIZES = [(5, 7), (1, 1), (384, 384), (385, 767), (500, 300), (300, 500), (1500, 900), (2, 1000), (99, 1001)]


def test_pixels_match_siglip_image_processor():
    cfg = ModelConfig.from_hf(_siglip_llava())
    settings = images.ProcessorSettings.from_dict(_preprocessor_config(384))
    assert settings == images.ProcessorSettings(SIGLIP_MEAN, SIGLIP_STD, 384, None, 3, "exact")
    hf = _siglip_processor(384)
    worst = 0.0
    for i, (h, w) in enumerate(SIZES):
        for mode in ("RGB", "RGBA") if i % 3 == 0 else ("RGB",):
            arr = np.random.default_rng(i).integers(0, 256, (h, w, len(mode)), dtype=np.uint8)
            image = PIL.Image.fromarray(arr, mode)
            ours, size = images.preprocess(image, cfg, settings)
            theirs = np.asarray(hf(image)["pixel_values"][0])
            assert ours.shape == (1, 3, 384, 384) and size == (h, w)
            worst = max(worst, float(np.abs(ours[0] - theirs).max()))
    print(f"SiglipImageProcessor: max |pixel diff| over {len(SIZES)} sizes = {worst:.3g}")
    assert worst <= 1e-6
    # CLIP's settings (pad, shortest edge, crop) would give other pixels on a non-square image
    image = PIL.Image.fromarray(np.random.default_rng(0).integers(0, 256, (300, 500, 3), dtype=np.uint8))
    clip_like = images.ProcessorSettings(SIGLIP_MEAN, SIGLIP_STD, 384, 384, 3)
    assert np.abs(images.preprocess(image, cfg, clip_like)[0] - images.preprocess(image, cfg, settings)[0]).max() > 0.5


def test_siglip_processor_with_shortest_edge_is_refused():
    d = {**_preprocessor_config(384), "size": {"shortest_edge": 384}}
    with pytest.raises(ValueError, match="SiglipImageProcessor resizes to a height and width"):
        images.ProcessorSettings.from_dict(d)
    with pytest.raises(ValueError, match="resize='longest_edge'"):
        images.ProcessorSettings(resize="longest_edge")


def _transformers_related(size_hw, boxes, side, grid, patch, offset):
    """Related flags per feature from transformers alone: SiglipImageProcessor on the mask (rescale and normalize
    off, as the study does), then pure-red pixels per patch, the feature of patch j being j - offset."""
    h, w = size_hw
    m = np.zeros((h, w, 3), np.uint8)
    m[..., 1] = 255
    for x, y, bw, bh in boxes:
        x, y, bw, bh = (int(v) for v in (x, y, bw, bh))
        m[max(y, 0):max(y + bh + 1, 0), max(x, 0):max(x + bw + 1, 0)] = (255, 0, 0)
    crop = np.asarray(_siglip_processor(side, do_rescale=False, do_normalize=False)(PIL.Image.fromarray(m))
                      ["pixel_values"][0])  # [3, S, S]
    red = (crop[0] == 255) & (crop[1] == 0) & (crop[2] == 0)
    per_patch = red[:grid * patch, :grid * patch].reshape(grid, patch, grid, patch).any(axis=(1, 3)).ravel()
    return per_patch[offset:] if offset >= 0 else np.concatenate([[False], per_patch])


@pytest.mark.parametrize("strategy", ["full", "default"])
def test_study_rule_goes_through_the_squash(strategy):
    cfg = ModelConfig.from_hf(_siglip_llava(strategy, -1 if strategy == "full" else -2))
    settings = images.ProcessorSettings.from_dict(_preprocessor_config(384))
    rng = np.random.default_rng(0)
    checked = 0
    for h, w in [(300, 500), (500, 300), (375, 500), (384, 384), (120, 1000)]:
        for _ in range(4):
            x, y = int(rng.integers(0, w - 10)), int(rng.integers(0, h - 10))
            boxes = [(x, y, int(rng.integers(1, w - x)), int(rng.integers(1, h - y)))]
            ours = images.related_features(cfg, (h, w), boxes, "study", settings)
            theirs = _transformers_related((h, w), boxes, 384, 27, 14, cfg.patch_offset)
            np.testing.assert_array_equal(ours, theirs)
            checked += int(ours.sum())
            # the overlap rule holds the study's set: it adds only the blended border patches
            overlap = images.related_features(cfg, (h, w), boxes, "overlap", settings)
            assert (overlap >= ours).all()
        # the squash moves a box where the pad would not put it
        box = [(0, 0, w // 4, h // 4)]
        squash = images.related_features(cfg, (h, w), box, "overlap", settings)
        assert squash[0 if strategy == "full" else 1] or not squash.any()
    assert checked > 100


# ---------------------------------------------------------------- a sweep on a tiny SigLIP model


@pytest.fixture(scope="module")
def siglip_world(tmp_path_factory):
    """A tiny SigLIP LLaVA-1.5-style model (-1 / full, 4 x 4 patches) with its SigLIP processor file, a Vicuna-style
    tokenizer, 6 ChooseAttr rows and their synthetic images."""
    root = tmp_path_factory.mktemp("siglip-sweep")
    tok = toy_tokenizers.llama2_tokenizer()
    text = dict(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                num_attention_heads=4)
    vision = SiglipVisionConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
                                image_size=56, patch_size=14)
    hf_cfg = transformers.LlavaConfig(vision_config=vision.to_dict(), text_config=text,
                                      image_token_index=tok.convert_tokens_to_ids("<image>"),
                                      vision_feature_layer=-1, vision_feature_select_strategy="full").to_dict()
    src = str(root / "src")
    write_random_checkpoint(src, hf_cfg, scale=0.2)
    toy_tokenizers.save(tok, src)
    with open(os.path.join(src, "preprocessor_config.json"), "w") as f:
        json.dump(_preprocessor_config(56), f)
    model = jaxflow.load(convert(src, str(root / "model"), progress=False))
    data, image_dir = tiny.task_subset(root, 6)
    return model, data, image_dir, root


def _results(path):
    with open(path, newline="") as f:
        return {(r["question_id"], r["block_desc"], r["layer"]): r for r in csv.DictReader(f)}


def test_sweep_incremental_equals_full(siglip_world):
    from jaxflow.sweep import run
    from jaxflow.sweep.flows import STUDY_FLOWS, parse_flow

    model, data, image_dir, root = siglip_world
    assert model.processor.resize == "exact" and model.config.features_per_crop == 16
    flows = [parse_flow(f) for f in STUDY_FLOWS]
    kw = dict(flows=flows, window_size=2, batch=3, images=image_dir, filter_correct=False, progress=False)
    inc = run.sweep(model, data, str(root / "inc"), method="incremental", **kw)
    full = run.sweep(model, data, str(root / "full"), method="full", **kw)
    a, b = _results(root / "inc" / "results.csv"), _results(root / "full" / "results.csv")
    assert inc["kept"] == full["kept"] == 6
    assert a.keys() == b.keys() and len(a) == 6 * len(flows) * model.config.text.num_layers
    err = max(abs(float(a[k]["new_score_first"]) - float(b[k]["new_score_first"])) for k in a)
    print(f"siglip sweep: incremental vs full max |p diff| = {err:.2e} over {len(a)} rows")
    assert err < 1e-5
    assert max(abs(float(r["relative_diff_first"])) for r in a.values()) > 1.0  # the knockouts did something

    # the related patches of each row are the study's rule through the SigLIP squash (transformers' processor)
    samples, _ = gqa.load_tasks(data, image_dir)
    for sample, prepared in zip(samples, prepare(model, samples, None), strict=True):
        with PIL.Image.open(sample.image_path) as im:
            theirs = np.asarray(_siglip_processor(56)(im.convert("RGB"))["pixel_values"][0])
            size = (im.height, im.width)
        assert np.abs(prepared.inputs.pixel_values[0] - theirs).max() <= 1e-6
        related = _transformers_related(size, list(sample.boxes), 56, 4, 14, 0)
        positions = prepared.inputs.encoded.image_positions
        np.testing.assert_array_equal(np.isin(positions, prepared.inputs.regions["related_image_patches"]), related)
        row = a[(sample.question_id, "Related image patches->Question", "0")]
        assert int(row["n_source"]) == related.sum() and row["related_patches"] == "study"


@pytest.mark.skipif(len(jax.devices()) < 8, reason="needs 8 devices (XLA_FLAGS from conftest.py)")
def test_sharded_siglip_equals_single_device(siglip_world):
    from jax.sharding import PartitionSpec

    from jaxflow.sharding import make_mesh

    single, _, _, root = siglip_world
    mesh = make_mesh("data=2,model=4")
    model = jaxflow.load(str(root / "model"), mesh=mesh)
    vision = model.module.vision_tower
    for var, spec in [(vision.layers[0].fc1.kernel, PartitionSpec(None, "model")),
                      (vision.layers[0].self_attn.q_proj.bias, PartitionSpec("model")),
                      (vision.patch_embed.bias, PartitionSpec(None))]:
        assert var[...].sharding.spec == spec
    rng = np.random.default_rng(2)
    f = single.config.features_per_crop
    ids = np.concatenate([[1], np.full(f, single.config.image_token_id), rng.integers(3, 900, 6)])[None].repeat(2, 0)
    pv = rng.standard_normal((2, 3, 56, 56)).astype(np.float32)
    ref = np.asarray(single.logits(ids, pv))
    assert np.abs(np.asarray(model.logits(ids, pv)) - ref).max() < TOL  # sharded sums add in another order
