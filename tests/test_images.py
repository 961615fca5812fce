"""Image preprocessing parity with transformers' PIL processors, and box -> related-feature geometry (the overlap
rule here; the study's red-mask rule in test_related_patches.py).

Real-model settings: CLIP ViT-L/14 at 336 px, llava-1.6 pinpoints. Run with -s to see the measured errors.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction

import numpy as np
import PIL.Image
import pytest
import transformers
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

from jaxflow.config import ModelConfig
from jaxflow.geometry import image_layout
from jaxflow.inputs.images import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ProcessorSettings,
    box_in_base,
    box_in_grid,
    preprocess,
    related_features,
)

S, P, G = 336, 14, 24
PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
# (height, width): tiny, square, tall, wide, extreme aspect, larger than every pinpoint, odd differences
SIZES = [(5, 7), (7, 5), (1, 1), (336, 336), (337, 673), (500, 300), (300, 500), (900, 1500), (1500, 900),
         (2, 1000), (1000, 3), (480, 640), (641, 479), (333, 1000), (1200, 1200), (99, 1001)]


def _config(kind: str, strategy: str = "default") -> ModelConfig:
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=S, patch_size=P, hidden_act="quick_gelu")
    text = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    common = dict(vision_config=vision, text_config=text, vision_feature_select_strategy=strategy)
    if kind == "llava_next":
        return ModelConfig.from_hf(transformers.LlavaNextConfig(image_grid_pinpoints=PINPOINTS, **common).to_dict())
    return ModelConfig.from_hf(transformers.LlavaConfig(**common).to_dict())


CFG15 = _config("llava")
CFGNEXT = _config("llava_next")


def _hf_processors(mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD):
    common = dict(size={"shortest_edge": S}, crop_size={"height": S, "width": S}, image_mean=list(mean),
                  image_std=list(std))
    return (LlavaImageProcessorPil(do_pad=True, **common),
            LlavaNextImageProcessorPil(image_grid_pinpoints=PINPOINTS, **common))


HF15, HFNEXT = _hf_processors()


def _random_image(h, w, seed, mode="RGB"):
    rng = np.random.default_rng(seed)
    channels = {"RGB": 3, "RGBA": 4, "L": None, "LA": 2}[mode]
    shape = (h, w) if channels is None else (h, w, channels)
    return PIL.Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8), mode)


def _max_err(image, hf15=HF15, hfnext=HFNEXT, settings=None):
    """Max |ours - transformers| for 1.5 and NeXT; checks shapes, image sizes and crop counts."""
    ours, size = preprocess(image, CFG15, settings)
    theirs = np.asarray(hf15(image)["pixel_values"][0])
    assert ours.shape == (1, 3, S, S) and ours.dtype == np.float32
    assert size == (image.height, image.width)
    err15 = float(np.abs(ours[0] - theirs).max())

    ours, size = preprocess(image, CFGNEXT, settings)
    out = hfnext(image)
    theirs = np.asarray(out["pixel_values"][0])
    assert ours.shape == (1, *theirs.shape) and ours.dtype == np.float32
    assert size == tuple(int(v) for v in out["image_sizes"][0]) == (image.height, image.width)
    assert ours.shape[1] == image_layout(CFGNEXT, size).num_crops
    return err15, float(np.abs(ours[0] - theirs).max())


def test_pixel_parity_many_sizes():
    worst = [0.0, 0.0]
    for i, (h, w) in enumerate(SIZES):
        errs = _max_err(_random_image(h, w, seed=i))
        print(f"size {h}x{w}: max |diff| pad {errs[0]:.3g}, anyres {errs[1]:.3g}")
        worst = [max(a, b) for a, b in zip(worst, errs, strict=True)]
    print(f"max preprocessing error over {len(SIZES)} sizes: LLaVA-1.5 pad {worst[0]:.3g}, NeXT anyres {worst[1]:.3g}")
    assert max(worst) <= 1e-5


@pytest.mark.parametrize("mode", ["L", "LA", "RGBA", "P", "P+transparency", "CMYK"])
def test_pixel_parity_non_rgb(mode):
    rgb = _random_image(123, 77, seed=5)
    if mode == "P+transparency":
        image = rgb.quantize(16)
        image.info["transparency"] = 3
    elif mode == "P":
        image = rgb.quantize(16)
    elif mode == "CMYK":
        image = rgb.convert("CMYK")
    else:
        image = _random_image(123, 77, seed=5, mode=mode)
    errs = _max_err(image)
    print(f"mode {mode}: max |diff| pad {errs[0]:.3g}, anyres {errs[1]:.3g}")
    assert max(errs) <= 1e-5


def test_settings_from_dir(tmp_path):
    assert ProcessorSettings.from_dir(tmp_path) == ProcessorSettings()
    mean, std = [0.5, 0.25, 0.75], [0.2, 0.3, 0.4]
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": mean, "image_std": std, "size": {"shortest_edge": S}, "crop_size": {"height": S, "width": S},
         "resample": 3, "do_pad": True}))
    settings = ProcessorSettings.from_dir(tmp_path)
    assert settings == ProcessorSettings(tuple(mean), tuple(std), S, S, 3)
    errs = _max_err(_random_image(210, 380, seed=7), *_hf_processors(mean, std), settings=settings)
    print(f"custom mean/std: max |diff| pad {errs[0]:.3g}, anyres {errs[1]:.3g}")
    assert max(errs) <= 1e-5

    clip_dir = tmp_path / "clip"  # CLIP's own file: ints for size and crop_size
    clip_dir.mkdir()
    (clip_dir / "processor_config.json").write_text(json.dumps(
        {"image_processor": {"crop_size": S, "size": S, "image_mean": mean, "image_std": std}}))
    assert ProcessorSettings.from_dir(clip_dir) == ProcessorSettings(tuple(mean), tuple(std), S, S)

    with pytest.raises(ValueError, match="image_size"):
        preprocess(_random_image(20, 20, seed=0), CFG15, ProcessorSettings(size=224))


def _local_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1, "hello": 2}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>",
                                                additional_special_tokens=["<image>"])


def test_feature_count_equals_processor_tokens():
    processor = transformers.LlavaNextProcessor(
        image_processor=HFNEXT, tokenizer=_local_tokenizer(), patch_size=P,
        vision_feature_select_strategy="default", num_additional_image_tokens=1)
    counts = processor._get_num_multimodal_tokens(image_sizes=SIZES).num_image_tokens
    for (h, w), count in zip(SIZES, counts, strict=True):
        assert len(image_layout(CFGNEXT, (h, w))) == count, (h, w)
    for h, w in [(5, 7), (500, 300), (900, 1500)]:  # the full processor call: tokens in the expanded prompt
        out = processor(images=_random_image(h, w, seed=1), text="<image> hello")
        assert int((np.asarray(out["input_ids"]) == 1).sum()) == len(image_layout(CFGNEXT, (h, w)))
        ours, _ = preprocess(_random_image(h, w, seed=1), CFGNEXT)
        assert float(np.abs(ours[0] - np.asarray(out["pixel_values"][0])).max()) <= 1e-5


# ---------------------------------------------------------------- boxes: an independent exact brute force


def _expected_related(kind, size_hw, boxes):
    """Related flags in sequence order, from explicit geometry in exact rational arithmetic."""
    h, w = size_hw
    clipped = []
    for x, y, bw, bh in boxes:
        x, y, bw, bh = map(Fraction, (x, y, bw, bh))
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + bw, w), min(y + bh, h)
        clipped.append((x0, y0, x1, y1))

    def hit(r, c, rects):
        return any(min((c + 1) * P, X1) - max(c * P, X0) > 0 and min((r + 1) * P, Y1) - max(r * P, Y0) > 0
                   for X0, Y0, X1, Y1 in rects)

    if kind == "llava":  # paste on a max(h, w) square at ((side - w) // 2, (side - h) // 2), resize to S
        side = max(h, w)
        ox, oy, k = (side - w) // 2, (side - h) // 2, Fraction(S, side)
        base = [((x0 + ox) * k, (y0 + oy) * k, (x1 + ox) * k, (y1 + oy) * k) for x0, y0, x1, y1 in clipped]
        return [hit(r, c, base) for r in range(G) for c in range(G)]

    kx, ky = Fraction(S, w), Fraction(S, h)  # base image: squash to S x S
    base = [(x0 * kx, y0 * ky, x1 * kx, y1 * ky) for x0, y0, x1, y1 in clipped]
    flags = [hit(r, c, base) for r in range(G) for c in range(G)]
    ph, pw = hf_select_best_resolution((h, w), PINPOINTS)
    # fit inside (ph, pw) keeping the aspect ratio, the side rounded up in float arithmetic as transformers
    # does: 375 * (672 / 500) = 504.00000000000006 rounds up to 505 (GQA's most common image size)
    if pw / w < ph / h:
        fh, fw = min(math.ceil(h * (pw / w)), ph), pw
    else:
        fh, fw = ph, min(math.ceil(w * (ph / h)), pw)
    py, px = (ph - fh) // 2, (pw - fw) // 2
    kx, ky = Fraction(fw, w), Fraction(fh, h)
    grid = [(x0 * kx + px, y0 * ky + py, x1 * kx + px, y1 * ky + py) for x0, y0, x1, y1 in clipped]
    rows, cols = ph // S * G, pw // S * G  # unpadding, as transformers' LlavaNextProcessor counts it
    r0, r1, c0, c1 = 0, rows, 0, cols
    if w / h > cols / rows:
        pad = (rows - int(round(h * (cols / w), 7))) // 2
        r0, r1 = pad, rows - pad
    else:
        pad = (cols - int(round(w * (rows / h), 7))) // 2
        c0, c1 = pad, cols - pad
    for r in range(r0, r1):
        flags += [hit(r, c, grid) for c in range(c0, c1)] + [False]  # image_newline closes each row
    return flags


def _random_boxes(rng, h, w, n):
    boxes = []
    for _ in range(n):  # quarter-pixel coordinates, sometimes sticking out of the image
        x, y = rng.integers(-w // 4, w) + rng.integers(0, 4) / 4, rng.integers(-h // 4, h) + rng.integers(0, 4) / 4
        bw, bh = rng.integers(0, w + 1) + rng.integers(0, 4) / 4, rng.integers(0, h + 1) + rng.integers(0, 4) / 4
        boxes.append((float(x), float(y), float(bw), float(bh)))
    return boxes


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_related_features_brute_force(kind):
    cfg = CFG15 if kind == "llava" else CFGNEXT
    rng = np.random.default_rng(0)
    sizes = SIZES + [tuple(int(v) for v in rng.integers(1, 1600, 2)) for _ in range(16)]
    checked = 0
    for size in sizes:
        h, w = size
        cases = [[], [(0, 0, w, h)], [(w / 2, h / 2, 0, h)], [(-10, -10, 5, 5)]]
        cases += [_random_boxes(rng, h, w, n) for n in (1, 1, 2, 3)] + [[(0, 0, w / 2, h / 2)]]
        for boxes in cases:
            got = related_features(cfg, size, boxes, "overlap")
            assert got.dtype == bool and len(got) == len(image_layout(cfg, size))
            np.testing.assert_array_equal(got, _expected_related(kind, size, boxes), err_msg=f"{size} {boxes}")
            checked += 1
    print(f"{kind}: overlap related_features equals the exact brute force on {checked} (size, boxes) cases")


@pytest.mark.parametrize("rule", ["study", "overlap"])
def test_whole_image_box(rule):
    for size in SIZES:
        h, w = size
        lay = image_layout(CFGNEXT, size)
        np.testing.assert_array_equal(related_features(CFGNEXT, size, [(0, 0, w, h)], rule), lay.crop >= 0)
        assert not related_features(CFGNEXT, size, [], rule).any()
    sq = related_features(CFG15, (300, 300), [(0, 0, 300, 300)], rule)
    assert sq.all() and len(sq) == G * G
    wide = related_features(CFG15, (300, 600), [(0, 0, 600, 300)], rule).reshape(G, G)  # pad rows 0-5 and 18-23
    assert wide[6:18].all() and not wide[:6].any() and not wide[18:].any()
    full = _config("llava", strategy="full")  # the CLS feature is never related
    flags = related_features(full, (300, 300), [(0, 0, 300, 300)], rule)
    assert len(flags) == G * G + 1 and not flags[0] and flags[1:].all()


def test_box_transforms():
    assert box_in_base((0, 0, 600, 300), (300, 600), CFG15) == (0, 84, 336, 252)
    assert box_in_base((0, 0, 600, 300), (300, 600), CFGNEXT) == (0, 0, 336, 336)
    # 300x600 -> pinpoint (336, 672): exact fit, no padding
    assert box_in_grid((150, 75, 300, 150), (300, 600), CFGNEXT) == (168, 84, 504, 252)
    # 500x300 (h, w) -> pinpoint (672, 336) (as large an effective size as (672, 672), less waste):
    # resized to 560 x 336, pasted at y = 56
    assert box_in_grid((0, 0, 300, 500), (500, 300), CFGNEXT) == (0, 56, 336, 616)
    # 37x53 (h, w) -> pinpoint (336, 672): scale 336/37 -> width ceil(481.3...) = 482, pasted at x = 95
    assert box_in_grid((0, 0, 53, 37), (37, 53), CFGNEXT) == (95, 0, 577, 336)
    with pytest.raises(ValueError, match="LLaVA-NeXT"):
        box_in_grid((0, 0, 1, 1), (10, 10), CFG15)


def test_box_edges_on_patch_boundaries():
    """A box whose edges land exactly on patch edges relates only the patches inside (touching is not overlap)."""
    box = (25, 0, 25, 300)  # in a 300x600 (h, w) image
    base15 = related_features(CFG15, (300, 600), [box], "overlap").reshape(G, G)  # x 25..50 -> 14..28, y -> 84..252
    expected = np.zeros((G, G), bool)
    expected[6:18, 1] = True
    np.testing.assert_array_equal(base15, expected)
    lay = image_layout(CFGNEXT, (300, 600))
    flags = related_features(CFGNEXT, (300, 600), [box], "overlap")
    base = flags[lay.crop == 0].reshape(G, G)  # squash: x -> 14..28, y -> 0..336
    expected = np.zeros((G, G), bool)
    expected[:, 1] = True
    np.testing.assert_array_equal(base, expected)
    grid = lay.crop > 0  # exact fit into (336, 672): x -> 28..56 (columns 2, 3), every row
    np.testing.assert_array_equal(flags[grid], np.isin(lay.col[grid], [2, 3]))


# ---------------------------------------------------------------- boxes: what the pixels show


def _tint_planes(pixels, cfg, size):
    """Per patch plane (base, and the reassembled anyres grid), R - G in 0..255 pixel units."""
    mean, std = np.asarray(OPENAI_CLIP_MEAN)[:, None, None], np.asarray(OPENAI_CLIP_STD)[:, None, None]
    rgb = (pixels.reshape(-1, 3, S, S) * std + mean) * 255  # [crops, 3, S, S]
    tint = rgb[:, 0] - rgb[:, 1]
    planes = {0: tint[0]}
    if cfg.image.anyres:
        nh, nw = image_layout(cfg, size).grid
        planes[1] = tint[1:].reshape(nh, nw, S, S).transpose(0, 2, 1, 3).reshape(nh * S, nw * S)
    return planes


@pytest.mark.parametrize("rule", ["study", "overlap"])
@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_related_features_match_drawn_box(kind, rule):
    cfg = CFG15 if kind == "llava" else CFGNEXT
    rng = np.random.default_rng(3)
    dominated_seen = 0
    for h, w in [(480, 640), (640, 480), (300, 1000), (37, 53), (900, 1500), (1000, 333), (336, 336)]:
        for _ in range(3):
            bw, bh = int(rng.integers(w * 3 // 10, w // 2 + 1)), int(rng.integers(h * 3 // 10, h // 2 + 1))
            x, y = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            pixels = np.full((h, w, 3), 60, np.uint8)  # neutral background; pads are neutral too (R - G <= 6)
            pixels[y:y + bh, x:x + bw] = (255, 0, 255)  # the box: R - G = 255
            pv, size = preprocess(PIL.Image.fromarray(pixels), cfg)
            planes = _tint_planes(pv, cfg, size)
            lay = image_layout(cfg, size)
            related = related_features(cfg, size, [(x, y, bw, bh)], rule)
            for plane, tint in planes.items():
                rows, cols = tint.shape[0] // P, tint.shape[1] // P
                per_patch = tint.reshape(rows, P, cols, P).transpose(0, 2, 1, 3).reshape(rows, cols, P * P)
                dominated = (per_patch > 200).mean(-1) > 0.5
                peak = np.pad(per_patch.max(-1), 1, constant_values=0)
                near = np.max([peak[i:i + rows, j:j + cols] for i in range(3) for j in range(3)], axis=0) > 40
                sel = (lay.crop == 0) if plane == 0 else (lay.crop > 0)
                r, c, rel = lay.row[sel], lay.col[sel], related[sel]
                assert rel[dominated[r, c]].all(), (size, (x, y, bw, bh), plane)
                assert not rel[~near[r, c]].any(), (size, (x, y, bw, bh), plane)
                dominated_seen += int(dominated[r, c].sum())
    assert dominated_seen > 100
