"""Anyres geometry follows the model's own oracle: transformers' LlavaNext for llava-hf checkpoints, LLaVA's code
(llava-torch 1.2.2) for original-layout ones, which the converter marks `"jaxflow_image_geometry": "llava"`.

The two differ only in unpadding: transformers keeps int(round(side * scale, 7)) patches, LLaVA's unpad_image
int(side * scale). With LLaVA-1.6's pinpoints and CLIP 336/14, that changes the image features of 8 of the
409,600 image sizes up to 640 x 640 px, 36 up to 1280 x 1280 px, and none of the packaged GQA tasks' sizes
(scripts/compare_llava_geometry.py finds them by running LLaVA's own code)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import tiny
import torch
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from jaxflow.config import ModelConfig, UnsupportedConfigError
from jaxflow.convert import convert
from jaxflow.geometry import image_layout
from jaxflow.model import prepare_inputs

# liuhaotian/llava-v1.6-* config.json: (width, height) pairs, as LLaVA reads them against image.size
LLAVA_16_PINPOINTS_WH = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
SIDE, PATCH = 336, 14
G = SIDE // PATCH  # 24 patches per crop side

# (W, H) where the two rules disagree, e.g.
#   55 x 176: crops 1 wide x 2 high -> 24 x 48 patches; kept width 55 * (48 / 176) = 14.999999999999998:
#             LLaVA int() -> 14, pad 5, 14 columns; transformers round(., 7) -> 15, pad 4, 16 columns.
#             LLaVA: 576 + 48 * (14 + 1) = 1296 features; transformers: 576 + 48 * (16 + 1) = 1392.
#   88 x 99:  crops 1 x 2 -> 24 x 48 patches; kept height 99 * (24 / 88) = 26.999999999999996:
#             LLaVA 26 rows (pad 11): 576 + 26 * 25 = 1226; transformers 27 -> pad 10, 28 rows: 1276.
DIFFERING_WH = [(55, 176), (88, 55), (88, 99), (110, 352), (176, 110), (176, 198), (328, 205), (352, 110),
                (47, 1128), (396, 704), (704, 396), (861, 328), (1128, 235)]
AGREEING_WH = [(640, 480), (500, 375), (320, 240), (1280, 720), (143, 500), (336, 336)]


def llava_rule(w: int, h: int) -> tuple[int, int, int, int, int, int]:
    """LLaVA's geometry, written out from llava-torch 1.2.2 (mm_utils.select_best_resolution,
    get_anyres_image_grid_shape; llava_arch.unpad_image) in its own (width, height) terms.
    Returns (crop rows, crop cols, first kept patch row, end row, first kept patch col, end col)."""
    best, best_kept, best_waste = None, -1, None
    for pw, ph in LLAVA_16_PINPOINTS_WH:
        scale = min(pw / w, ph / h)
        kept = min(int(w * scale) * int(h * scale), w * h)
        waste = pw * ph - kept
        if kept > best_kept or (kept == best_kept and waste < best_waste):
            best, best_kept, best_waste = (pw, ph), kept, waste
    cols, rows = best[0] // SIDE, best[1] // SIDE
    cur_w, cur_h = cols * G, rows * G  # the patch grid
    if w / h > cur_w / cur_h:
        pad = (cur_h - int(h * (cur_w / w))) // 2
        return rows, cols, pad, cur_h - pad, 0, cur_w
    pad = (cur_w - int(w * (cur_h / h))) // 2
    return rows, cols, 0, cur_h, pad, cur_w - pad


def llava_count(w: int, h: int) -> int:
    """Base crop, then one image_newline after each kept row (llava_arch, spatial_unpad)."""
    _, _, r0, r1, c0, c1 = llava_rule(w, h)
    return G * G + (r1 - r0) * (c1 - c0 + 1)


def transformers_count(w: int, h: int) -> int:
    """transformers' own LlavaNext functions on a stand-in feature grid (pinpoints and sizes (H, W))."""
    pinpoints_hw = [[ph, pw] for pw, ph in LLAVA_16_PINPOINTS_WH]
    rows, cols = get_anyres_image_grid_shape((h, w), pinpoints_hw, SIDE)
    kept = unpad_image(torch.empty(1, rows * G, cols * G), torch.tensor([h, w]))
    return G * G + kept.shape[1] * (kept.shape[2] + 1)


def config(geometry: str | None) -> ModelConfig:
    d = tiny.hf_config("llava_next", image_size=SIDE,
                       pinpoints=[[ph, pw] for pw, ph in LLAVA_16_PINPOINTS_WH]).to_dict()
    if geometry is not None:
        d["jaxflow_image_geometry"] = geometry
    return ModelConfig.from_hf(d)


def test_known_llava_counts():
    # measured with LLaVA's prepare_inputs_labels_for_multimodal (scripts/compare_llava_geometry.py)
    assert llava_count(55, 176) == 1296 and llava_count(88, 99) == 1226
    assert transformers_count(55, 176) == 1392 and transformers_count(88, 99) == 1276


@pytest.mark.parametrize("size_wh", DIFFERING_WH + AGREEING_WH, ids=[f"{w}x{h}" for w, h in DIFFERING_WH + AGREEING_WH])
def test_feature_counts_follow_the_geometry(size_wh):
    w, h = size_wh
    llava, transformers = llava_count(w, h), transformers_count(w, h)
    assert (llava != transformers) == (size_wh in DIFFERING_WH)
    assert config("llava").image.geometry == "llava"
    assert len(image_layout(config("llava"), (h, w))) == llava
    assert len(image_layout(config("transformers"), (h, w))) == transformers
    assert config(None).image.geometry == "transformers"  # llava-hf configs carry no attribute
    assert len(image_layout(config(None), (h, w))) == transformers


@pytest.mark.parametrize("size_wh", DIFFERING_WH, ids=[f"{w}x{h}" for w, h in DIFFERING_WH])
def test_llava_feature_order(size_wh):
    """Row-major over the kept patch rows/cols of the crop grid, a newline closing each row, as LLaVA's
    permute(4, 0, 2, 1, 3) + flatten + unpad + newline concat lays them out."""
    w, h = size_wh
    rows, cols, r0, r1, c0, c1 = llava_rule(w, h)
    lay = image_layout(config("llava"), (h, w))
    assert lay.grid == (rows, cols)
    grid = slice(G * G, None)
    rr, cc = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1 + 1), indexing="ij")
    newline = cc == c1
    np.testing.assert_array_equal(lay.is_newline[grid], newline.ravel())
    np.testing.assert_array_equal(lay.row[grid][~newline.ravel()], rr[~newline])
    np.testing.assert_array_equal(lay.col[grid][~newline.ravel()], cc[~newline])
    np.testing.assert_array_equal(lay.crop[grid][~newline.ravel()], (1 + (rr // G) * cols + cc // G)[~newline])


def test_unknown_geometry_is_refused():
    d = tiny.hf_config("llava_next").to_dict()
    with pytest.raises(UnsupportedConfigError, match="jaxflow_image_geometry='pytorch'"):
        ModelConfig.from_hf({**d, "jaxflow_image_geometry": "pytorch"})


def test_converted_checkpoints_name_their_geometry(twins):
    _, original = twins("llava_next", "original")
    _, hf = twins("llava_next", "llava-hf")
    assert original.config.image.geometry == "llava"
    assert hf.config.image.geometry == "transformers"
    with open(os.path.join(original.path, "config.json")) as f:
        assert json.load(f)["jaxflow_image_geometry"] == "llava"


def test_converted_original_model_takes_llavas_feature_count(tmp_path):
    """An original LLaVA-1.6-geometry checkpoint, converted: a 55 x 176 image needs LLaVA's 1296 image tokens."""
    twin = tiny.hf_model("llava_next", image_size=SIDE, pinpoints=[[ph, pw] for pw, ph in LLAVA_16_PINPOINTS_WH])
    src, clip = tiny.save_original(twin, str(tmp_path / "src"), str(tmp_path / "clip"))
    cfg = ModelConfig.from_pretrained(convert(src, str(tmp_path / "out"), clip=clip, progress=False))
    assert cfg.image.geometry == "llava"
    pixels = np.zeros((1, 3, 3, SIDE, SIDE), np.float32)  # base + 2 x 1 crops
    for n, ok in ((1296, True), (1392, False)):
        ids = np.array([[1] + [cfg.image_token_id] * n + [2]])
        if ok:
            inputs = prepare_inputs(cfg, ids, pixels, [(176, 55)])
            assert int((np.asarray(inputs.feature_index) >= 0).sum()) == n
        else:
            with pytest.raises(ValueError, match="1392 image tokens but the images give 1296 features"):
                prepare_inputs(cfg, ids, pixels, [(176, 55)])
