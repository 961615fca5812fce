"""LLaVA-OneVision (`anyres_max_9`) vs transformers' LlavaOnevisionForConditionalGeneration on tiny random twins:
the bilinear downsampling of the unpadded grid, feature counts, pixels, logits (with knockouts), greedy
generation, related patches on the downsampled grid, a sweep, and conversion errors.

The twins use a CLIP tower with strategy "default" (transformers' OneVision refuses CLIP's CLS feature under
"full"); real checkpoints use SigLIP with "full", which has no CLS and so gives the same grid."""

from __future__ import annotations

import csv
import json
import types

import numpy as np
import pytest
import tiny
import torch
from PIL import Image
from test_parity import hf_forward
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaOnevisionConfig,
    LlavaOnevisionForConditionalGeneration,
    Qwen2Config,
    SiglipVisionConfig,
)
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil
from transformers.models.llava_onevision.processing_llava_onevision import LlavaOnevisionProcessor

import jaxflow
from jaxflow import Knockout, geometry
from jaxflow.config import ModelConfig, UnsupportedConfigError
from jaxflow.convert import ConversionError, convert
from jaxflow.inputs import images
from jaxflow.reference import dense_cut, embeddings, run_layers

TOL = 1e-4
S = tiny.IMAGE_SIZE  # 42 px crops of 3 x 3 patches
PIN = [[S * i, S * j] for i in range(1, 7) for j in range(1, 7)]  # OneVision's 6 x 6 crop pinpoints, scaled
# (height, width): 1 crop, wide, tall, odd; 6 x 6 and 6 x 2 crops exceed 9 crops' worth and are downsampled
SIZES = ((42, 42), (50, 120), (130, 90), (250, 250), (251, 199), (240, 70))
EOS = 2


def ov_config(**kw) -> LlavaOnevisionConfig:
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=S, patch_size=14, hidden_act="quick_gelu", initializer_range=0.2,
                              initializer_factor=5.0)
    text = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, initializer_range=0.2,
                       pad_token_id=tiny.PAD_TOKEN)
    args = dict(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=tiny.IMAGE_TOKEN,
                image_grid_pinpoints=PIN, vision_feature_select_strategy="default", vision_feature_layer=-1)
    return LlavaOnevisionConfig(**{**args, **kw})


@pytest.fixture(scope="module")
def twin(tmp_path_factory):
    torch.manual_seed(0)
    hf = LlavaOnevisionForConditionalGeneration._from_config(ov_config(), attn_implementation="eager").eval()
    with torch.no_grad():
        hf.model.image_newline.normal_(0, 1.0)  # make the newline matter
    root = tmp_path_factory.mktemp("onevision")
    hf.save_pretrained(root / "src")
    return hf, jaxflow.load(convert(str(root / "src"), str(root / "out"), progress=False))


# ---- geometry -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("src,dst", [((7, 5), (4, 3)), ((18, 18), (9, 9)), ((13, 29), (6, 13)), ((5, 9), (7, 4)),
                                     ((48, 17), (27, 9)), ((1, 6), (1, 5))])
def test_bilinear_taps_equal_torch_interpolate(src, dst):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, *src)).astype(np.float32)  # [D, H, W]
    ref = torch.nn.functional.interpolate(torch.tensor(x)[None], list(dst), mode="bilinear")[0].numpy()
    (ri, rw, _), (ci, cw, _) = geometry.bilinear_taps(src[0], dst[0]), geometry.bilinear_taps(src[1], dst[1])
    ours = np.einsum("ia,jb,diajb->dij", rw, cw, x[:, ri][:, :, :, ci])  # taps [D, dst0, 2, dst1, 2]
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() < 1e-6


def _real_geometry(strategy="default") -> ModelConfig:
    """OneVision-7B geometry (384 px crops of 27 x 27 patches, its 36 pinpoints) on a CLIP tower."""
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                              image_size=384, patch_size=14, hidden_act="quick_gelu")
    return ModelConfig.from_hf(ov_config(vision_config=vision.to_dict(), vision_feature_select_strategy=strategy,
                                         image_grid_pinpoints=LlavaOnevisionImageProcessorPil.image_grid_pinpoints)
                               .to_dict())


def test_feature_counts_equal_the_processor():
    """len(image_layout) is the number of image tokens LlavaOnevisionProcessor inserts, on OneVision's own
    geometry, for sizes with and without downsampling."""
    cfg = _real_geometry()
    proc = types.SimpleNamespace(image_processor=types.SimpleNamespace(
        image_grid_pinpoints=[list(p) for p in cfg.image.pinpoints]), num_image_tokens=27 * 27,
        vision_aspect_ratio="anyres_max_9")
    proc._get_unpadded_features = types.MethodType(LlavaOnevisionProcessor._get_unpadded_features, proc)
    down = 0
    for h, w in [(384, 384), (480, 640), (640, 480), (1000, 1000), (2000, 300), (300, 2000), (37, 999), (1536, 1537),
                 (333, 777), (720, 1280), (4000, 3000), (100, 100), (5, 7)]:
        lay = geometry.image_layout(cfg, (h, w))
        assert len(lay) == LlavaOnevisionProcessor._get_number_of_features(proc, h, w, 384, 384), (h, w)
        down += lay.downsampling is not None
    assert 0 < down < 13


def test_full_strategy_with_a_cls_tower_is_refused():
    with pytest.raises(UnsupportedConfigError, match="vision_feature_select_strategy='full'.*llava_onevision"):
        _real_geometry("full")


def test_pixels_equal_the_pil_processor():
    proc = LlavaOnevisionImageProcessorPil(size={"height": S, "width": S}, image_grid_pinpoints=PIN)
    settings = images.ProcessorSettings.from_dict(proc.to_dict())
    cfg = ModelConfig.from_hf(ov_config().to_dict())
    rng = np.random.default_rng(1)
    for h, w in SIZES + ((3, 500), (7, 5)):
        image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        ref = proc(images=image, return_tensors="np")
        ours, size = images.preprocess(image, cfg, settings)
        assert size == (h, w) and tuple(ref["image_sizes"][0]) == (h, w)
        assert ours.shape == ref["pixel_values"].shape, (h, w)
        assert ours.shape[1] == geometry.image_layout(cfg, (h, w)).num_crops
        assert np.abs(ours - ref["pixel_values"]).max() < 1e-6, (h, w)


# ---- the model ----------------------------------------------------------------------------------------------------


def test_logits_match_transformers(twin):
    hf, model = twin
    layouts = [geometry.image_layout(model.config, s) for s in SIZES]
    assert sum(lay.downsampling is not None for lay in layouts) >= 2  # 250 x 250, 251 x 199 (and 240 x 70)
    ids, pv, isz, mask = tiny.make_inputs(model.config, image_sizes=SIZES, num_text=[5, 3, 8, 4, 6, 2])
    ours = np.asarray(model.logits(ids, pv, isz, attention_mask=mask))
    ref = hf_forward(hf, ids, pv, isz, mask).logits.numpy()
    assert ours.shape == ref.shape
    err = np.abs(ours - ref).max()
    print(f"onevision: max |logits diff| = {err:.2e} (logit scale {np.abs(ref).max():.2f})")
    assert err < TOL
    # the embeddings too, row by row: the downsampled cells are where the models could differ
    inputs = model.prepare(ids, pv, isz, attention_mask=mask)
    assert inputs.taps is not None and inputs.taps.shape[1] == 4
    embeds = np.asarray(model.module.embed(inputs.input_ids, inputs.crops, inputs.feature_index, inputs.taps,
                                           inputs.tap_weights))
    ref_embeds = embeddings(hf, ids, pv, isz).numpy()
    assert np.abs(embeds - ref_embeds).max() < 1e-5 * max(1.0, np.abs(ref_embeds).max())


def test_knockouts_match_transformers_with_float_masks(twin):
    hf, model = twin
    ids, pv, isz, _ = tiny.make_inputs(model.config, image_sizes=((250, 250),), num_text=6)
    t = ids.shape[1]
    image = np.flatnonzero(ids[0] == tiny.IMAGE_TOKEN).tolist()
    question, last = list(range(image[-1] + 1, t - 1)), [t - 1]
    kos = [Knockout(source=image, target=question, layers=[0, 1]), Knockout(source=question, target=last),
           Knockout(source=image, target=last, layers=[1], heads=[0, 3])]
    logits = np.asarray(model.logits(ids, pv, isz, knockouts=kos))
    base = np.asarray(model.logits(ids, pv, isz))
    embeds = embeddings(hf, ids, pv, isz)
    cfg = model.config.text
    errs = []
    for k, ko in enumerate(kos):
        cut = dense_cut(ko.source, ko.target, ko.layers, ko.heads, *ids.shape, cfg.num_layers, cfg.num_heads)
        ref, _ = run_layers(hf, embeds, cut, return_weights=False)
        errs.append(np.abs(logits[k] - ref).max())
        assert errs[-1] < TOL, k
        assert np.abs(logits[k] - base).max() > 1e-3  # the cut did something
    print(f"onevision knockout parity: max |logits diff| = {max(errs):.2e}")


def test_greedy_generation_matches_transformers(twin):
    hf, model = twin
    sizes = ((250, 250), (50, 120), (240, 70))
    ids, pv, isz, mask = tiny.make_inputs(model.config, image_sizes=sizes, num_text=[5, 3, 8], seed=3)
    out = model.generate(ids, pv, isz, attention_mask=mask, max_new_tokens=5, eos_token_id=EOS)
    for row in range(len(ids)):
        n = int(mask[row].sum())
        with torch.no_grad():
            ref = hf.generate(input_ids=torch.tensor(ids[row: row + 1, :n]),
                              pixel_values=torch.tensor(pv[row: row + 1]),
                              image_sizes=torch.tensor(isz[row: row + 1]), max_new_tokens=5, do_sample=False,
                              eos_token_id=EOS, pad_token_id=tiny.PAD_TOKEN)
        ref_tokens = ref[0, n:].numpy()
        np.testing.assert_array_equal(out.tokens[row, : len(ref_tokens)], ref_tokens)


def test_siglip_qwen2_twin_matches_transformers(tmp_path):
    """The composition real OneVision checkpoints use: a SigLIP tower (no CLS) with strategy "full" and feature
    layer -1, a Qwen2 decoder (q/k/v biases, tied head); logits and a knockout, on sizes with and without the
    downsampling."""
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=S, patch_size=14)
    text = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, initializer_range=0.2,
                       tie_word_embeddings=True, pad_token_id=tiny.PAD_TOKEN)
    config = ov_config(vision_config=vision.to_dict(), text_config=text.to_dict(), tie_word_embeddings=True,
                       vision_feature_select_strategy="full", vision_feature_layer=-1)
    torch.manual_seed(1)
    hf = LlavaOnevisionForConditionalGeneration._from_config(config, attn_implementation="eager").eval()
    with torch.no_grad():
        hf.model.image_newline.normal_(0, 1.0)
        for name, param in hf.named_parameters():
            if name.endswith("_proj.bias") or ("vision_tower" in name and param.ndim == 1):
                param.add_(torch.randn_like(param), alpha=0.3)  # zero / unit inits would hide a missing term
    hf.save_pretrained(tmp_path / "src")
    model = jaxflow.load(convert(str(tmp_path / "src"), str(tmp_path / "out"), progress=False))
    assert model.config.vision.kind == "siglip" and model.config.text.qkv_bias
    assert model.config.features_per_crop == model.config.vision.grid ** 2
    sizes = ((42, 42), (251, 199), (240, 70))
    assert sum(geometry.image_layout(model.config, s).downsampling is not None for s in sizes) >= 1
    ids, pv, isz, mask = tiny.make_inputs(model.config, image_sizes=sizes, num_text=[5, 3, 8])
    ref = hf_forward(hf, ids, pv, isz, mask).logits.numpy()
    err = np.abs(np.asarray(model.logits(ids, pv, isz, attention_mask=mask)) - ref).max()
    print(f"onevision siglip + qwen2: max |logits diff| = {err:.2e} (logit scale {np.abs(ref).max():.2f})")
    assert err < TOL
    row_ids, row_pv, row_isz = ids[1:2, : int(mask[1].sum())], pv[1:2], isz[1:2]
    image = np.flatnonzero(row_ids[0] == tiny.IMAGE_TOKEN).tolist()
    t = row_ids.shape[1]
    ko = Knockout(source=image, target=[t - 1], layers=[0, 1])
    ours = np.asarray(model.logits(row_ids, row_pv, row_isz, knockouts=[ko]))[0]
    cfg = model.config.text
    cut = dense_cut(ko.source, ko.target, ko.layers, ko.heads, *row_ids.shape, cfg.num_layers, cfg.num_heads)
    ref_ko, _ = run_layers(hf, embeddings(hf, row_ids, row_pv, row_isz), cut, return_weights=False)
    assert np.abs(ours - ref_ko).max() < TOL
    assert np.abs(ours - ref[1:2, :t]).max() > 1e-3  # the cut did something


# ---- regions on the downsampled grid ------------------------------------------------------------------------------


def test_related_cells_follow_the_downsampled_mask(twin):
    """The study rule on cells is the red-patch indicator of the grid resized as transformers resizes the
    features (torch bilinear here), a cell related where it stays exactly 1; the overlap rule marks every
    cell whose source rectangle a box touches."""
    _, model = twin
    cfg, size = model.config, (251, 199)
    lay = geometry.image_layout(cfg, size)
    d = lay.downsampling
    assert d is not None
    g, p = cfg.vision.grid, cfg.vision.patch_size
    nh, nw = lay.grid
    for box in [(20, 30, 90, 60), (120, 150, 8, 9), (0, 0, 199, 251)]:
        crops, _ = images.vision_crops(images.study_mask(size, [box]), cfg)  # [N, S, S, 3]
        red = (crops[..., 0] == 255) & (crops[..., 1] == 0) & (crops[..., 2] == 0)
        patch = red.reshape(len(crops), g, p, g, p).any(axis=(2, 4))[1:]  # grid crops [nh * nw, g, g]
        frame = patch.reshape(nh, nw, g, g).transpose(0, 2, 1, 3).reshape(nh * g, nw * g)
        (r0, c0), (h, w) = d.origin, d.source
        unpadded = torch.tensor(frame[r0:r0 + h, c0:c0 + w], dtype=torch.float64)[None, None]
        value = torch.nn.functional.interpolate(unpadded, list(d.cells), mode="bilinear")[0, 0].numpy()
        study = images.related_features(cfg, size, [box], "study")
        np.testing.assert_array_equal(study[lay.is_cell], (value >= 1 - 1e-9).ravel())
        overlap = images.related_features(cfg, size, [box], "overlap")
        x0, y0, x1, y1 = geometry.box_in_grid(box, size, cfg)
        rect = lay.rects(cfg)[lay.is_cell]
        touch = (rect[:, 0] < x1) & (rect[:, 2] > x0) & (rect[:, 1] < y1) & (rect[:, 3] > y0)
        np.testing.assert_array_equal(overlap[lay.is_cell], touch)
        assert overlap[lay.is_cell].any() and not overlap[lay.is_newline].any()
    assert overlap[lay.is_cell].all()  # the whole image touches every cell
    assert study[lay.is_cell].sum() > 0.8 * lay.is_cell.sum()


# ---- a sweep and conversion errors --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ov_model_dir(tmp_path_factory):
    from conftest import convert_toy

    return convert_toy(tmp_path_factory.mktemp("toy-ov"), "llava_onevision")


def test_sweep_incremental_equals_full(ov_model_dir, tmp_path):
    from jaxflow.sweep import run
    from jaxflow.sweep.flows import parse_flow

    model = jaxflow.load(ov_model_dir)
    assert model.config.model_type == "llava_onevision" and model.config.image.max_grid_crops == 9
    data, image_dir = tiny.task_subset(tmp_path, 3)
    with open(data, newline="") as f:
        for r in csv.DictReader(f):  # GQA sizes are downsampled
            assert geometry.image_layout(model.config, (int(r["image_h"]), int(r["image_w"]))).downsampling
    flows = [parse_flow(f) for f in ("image->last", "related_image_patches->last", "question->last")]
    kw = dict(flows=flows, window_size=3, batch=2, images=image_dir, filter_correct=False,
              progress=False)
    inc = run.sweep(model, str(data), str(tmp_path / "inc"), method="incremental", **kw)
    run.sweep(model, str(data), str(tmp_path / "full"), method="full", **kw)

    def scores(name):
        with open(tmp_path / name / "results.csv", newline="") as f:
            return {(r["question_id"], r["block_desc"], r["layer"]): float(r["new_score_first"])
                    for r in csv.DictReader(f)}

    a, b = scores("inc"), scores("full")
    assert inc["kept"] == 3 and a.keys() == b.keys() and len(a) == 3 * len(flows) * model.config.text.num_layers
    err = max(abs(a[k] - b[k]) for k in a)
    print(f"onevision sweep: incremental vs full max |p diff| = {err:.2e} over {len(a)} rows")
    assert err < 1e-6


def _saved_config(tmp_path, **changes):
    torch.manual_seed(0)
    hf = LlavaOnevisionForConditionalGeneration._from_config(ov_config()).eval()
    src = tmp_path / "src"
    hf.save_pretrained(src)
    with open(src / "config.json") as f:
        cfg = json.load(f)
    cfg.update(changes)
    with open(src / "config.json", "w") as f:
        json.dump(cfg, f)
    return src


@pytest.mark.parametrize("changes,message", [
    ({"vision_aspect_ratio": "anyres"}, r"config\.json: config attribute vision_aspect_ratio='anyres' is not"),
    ({"vision_aspect_ratio": "anyres_max_0"}, r"vision_aspect_ratio='anyres_max_0' is not supported"),
    ({"vision_feature_select_strategy": "full"}, r"config\.json: config attribute vision_feature_select_strategy"),
])
def test_conversion_errors_are_named(tmp_path, changes, message):
    src = _saved_config(tmp_path, **changes)
    with pytest.raises(ConversionError, match=message):
        convert(str(src), str(tmp_path / "out"), progress=False)
    assert not (tmp_path / "out").exists()


def test_regions_and_render_on_the_downsampled_grid(ov_model_dir, tmp_path):
    from jaxflow.inputs import regions

    model = jaxflow.load(ov_model_dir)
    image = Image.fromarray(np.random.default_rng(2).integers(0, 255, (375, 500, 3), dtype=np.uint8))
    box = (100, 80, 150, 120)
    sample = regions.build_sample(model.config, model.tokenizer, image, "Is the cube red?", boxes=[box],
                                  related_patches="overlap")
    lay = geometry.image_layout(model.config, sample.image_size)
    assert lay.downsampling is not None
    r = sample.regions
    pos = np.asarray(sample.encoded.image_positions)
    np.testing.assert_array_equal(r["image_grid"], np.sort(pos[lay.crop != 0]))  # cells and newlines
    np.testing.assert_array_equal(r["image_newline"], np.sort(pos[lay.is_newline]))
    cells = set(pos[lay.is_cell].tolist())
    grid_related = set(r["related_image_patches_grid"].tolist())
    assert grid_related and grid_related <= cells
    assert set(r["related_image_patches"].tolist()) - grid_related <= set(pos[lay.crop == 0].tolist())
    assert regions.render(sample, model.config, [box], str(tmp_path / "r.png")) == str(tmp_path / "r.png")
    assert Image.open(tmp_path / "r.png").size[0] > 100


def test_no_anyres_is_refused(ov_model_dir):
    with pytest.raises(ValueError, match="no_anyres applies to LLaVA-NeXT checkpoints; this one is 'llava_onevision'"):
        jaxflow.load(ov_model_dir, no_anyres=True)
