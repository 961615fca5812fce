"""Image pixels for LLaVA-1.5 ("pad"), LLaVA-NeXT and OneVision ("anyres"), and the related-patch rules; numpy + PIL.

`preprocess` reproduces the pixel values of transformers' PIL image processors
(`LlavaImageProcessorPil(do_pad=True)` for LLaVA-1.5, i.e. the original LLaVA `expand2square`,
`LlavaNextImageProcessorPil` for LLaVA-NeXT and `LlavaOnevisionImageProcessorPil` for OneVision, whose crops
are cut the same way; `SiglipImageProcessorPil` for a LLaVA-1.5-style model whose processor resizes to an exact
size, as SigLIP's does: squashed to S x S, no pad, no crop). Every step works on uint8 pixels through PIL exactly
as transformers does; only the final rescale/normalize is float.

`related_features` marks the image features that hold a question-related object (boxes (x, y, w, h) in
original image pixels), in the feature order of `jaxflow.geometry.image_layout` (the model's own plan;
newline and CLS features are never related), by one of two rules (`RELATED_PATCH_RULES`):

- "study" (the study's released code): the boxes are drawn pure red on a pure green mask of the image's size
  (`study_mask`), the mask goes through the very crops the image goes through (`vision_crops`: the same pad /
  resize / anyres code, without rescale and normalize), and a patch is related when any of its pixels is still
  exactly (255, 0, 0). Bicubic resizing blends the box border, so a tiny box can have no related patch at all.
  A downsampled OneVision cell is related when every patch it blends (positive bilinear weight) is: the red-patch
  indicator, resized as the features are, is still exactly 1 (`jaxflow.geometry.patch_features`).
- "overlap": the patch rectangle overlaps a box with positive area, the box carried through the same geometry
  into the pixel frame of the base crop (`box_in_base`) or of the padded best-resolution anyres image
  (`box_in_grid`). It marks the blended border patches too. A downsampled OneVision cell covers its share of
  the unpadded grid (`ImageLayout.rects`) and is related when a box overlaps that rectangle.

Every size, offset and crop box comes from `jaxflow.geometry`; this module only moves pixels.
Sizes are (height, width) throughout, as in transformers' LlavaNext; boxes and PIL sizes are (x, y, ...).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterable

import numpy as np
import PIL.Image
import PIL.ImageDraw

from jaxflow.config import ModelConfig
from jaxflow.geometry import (  # box_in_base, box_in_grid: re-exported for callers of this module
    Box,
    anyres_geometry,
    box_in_base,  # noqa: F401
    box_in_grid,  # noqa: F401
    crop_boxes,
    image_layout,
    overlap_features,
    pad_geometry,
    patch_features,
)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

RELATED_PATCH_RULES = ("study", "overlap")
RED, GREEN = (255, 0, 0), (0, 255, 0)  # the study's mask colours: box, background
# How a processor resizes, read from the form of its `size` (as transformers' resize does):
# {"shortest_edge": s} (CLIPImageProcessor): shortest edge to s, then the centre crop;
# {"height": s, "width": s} (SiglipImageProcessor): straight to s x s, the aspect ratio not kept.
RESIZE_MODES = ("shortest_edge", "exact")


def _side(value, key: str) -> int | None:
    """An image side from a preprocessor config entry: an int, or a dict with shortest_edge or a square height/width."""
    if value is None or isinstance(value, int):
        return value
    if "shortest_edge" in value:
        return int(value["shortest_edge"])
    if "height" in value and "width" in value:
        if value["height"] != value["width"]:
            raise ValueError(f"preprocessor config {key}={value!r}: only square sizes are supported")
        return int(value["height"])
    raise ValueError(f"preprocessor config {key}={value!r}: expected an int, shortest_edge, or height and width")


@dataclasses.dataclass(frozen=True)
class ProcessorSettings:
    """Preprocessing settings (CLIP's by default). `size` (the resize target, see `resize`) and `crop_size` of
    None mean the model's vision image_size; other values must equal it (the vision tower sees image_size
    crops). `resize`: one of RESIZE_MODES."""

    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD
    size: int | None = None
    crop_size: int | None = None
    resample: int = int(PIL.Image.Resampling.BICUBIC)
    resize: str = "shortest_edge"

    def __post_init__(self):
        if self.resize not in RESIZE_MODES:
            raise ValueError(f"processor settings resize={self.resize!r}: expected one of {', '.join(RESIZE_MODES)}")

    @classmethod
    def from_dict(cls, d: dict) -> ProcessorSettings:
        """From a transformers / CLIP `preprocessor_config.json` dict; missing keys take the defaults."""
        mean = tuple(float(v) for v in d.get("image_mean", OPENAI_CLIP_MEAN))
        std = tuple(float(v) for v in d.get("image_std", OPENAI_CLIP_STD))
        if len(mean) != 3 or len(std) != 3:
            raise ValueError(f"preprocessor config: image_mean/image_std need 3 values, got {mean}, {std}")
        resample = d.get("resample")
        size = d.get("size")
        resize = "exact" if isinstance(size, dict) and "shortest_edge" not in size else "shortest_edge"
        kind = d.get("image_processor_type") or ""
        if kind.startswith("Siglip") and resize != "exact":
            raise ValueError(f"preprocessor config size={size!r}: {kind} resizes to a height and width")
        return cls(mean, std, _side(size, "size"), _side(d.get("crop_size"), "crop_size"),
                   int(PIL.Image.Resampling.BICUBIC) if resample is None else int(resample), resize)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> ProcessorSettings:
        """Reads `preprocessor_config.json` (or the `image_processor` section of `processor_config.json`) in a
        model directory; OpenAI CLIP defaults when there is neither."""
        pre = os.path.join(path, "preprocessor_config.json")
        if os.path.isfile(pre):
            with open(pre) as f:
                return cls.from_dict(json.load(f))
        proc = os.path.join(path, "processor_config.json")
        if os.path.isfile(proc):
            with open(proc) as f:
                section = json.load(f).get("image_processor")
            if isinstance(section, dict):
                return cls.from_dict(section)
        return cls()


def _check_settings(settings: ProcessorSettings, cfg: ModelConfig) -> None:
    s = cfg.vision.image_size
    for key in ("size", "crop_size"):
        value = getattr(settings, key)
        if value is not None and value != s:
            raise ValueError(f"processor settings {key}={value} differ from the model's vision image_size {s}")


def _to_rgb(image: PIL.Image.Image) -> PIL.Image.Image:
    """RGB, compositing transparency onto white (as transformers' convert_to_rgb)."""
    if "A" in image.getbands() or image.info.get("transparency") is not None:
        rgba = image.convert("RGBA")
        white = PIL.Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return PIL.Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def _resize_crop(image: PIL.Image.Image, side: int, settings: ProcessorSettings) -> np.ndarray:
    """The processor's geometric steps on one RGB image: resize the shortest edge to `side` and center crop
    side x side (CLIP), or resize to side x side (`resize="exact"`). Returns [side, side, 3] uint8."""
    resample = settings.resample
    if settings.resize == "exact":
        return np.asarray(image if image.size == (side, side) else image.resize((side, side), resample=resample))
    w, h = image.size
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(side * long / short)  # transformers' get_resize_output_image_size truncates
    new_w, new_h = (side, new_long) if w <= h else (new_long, side)
    if (new_w, new_h) != (w, h):
        image = image.resize((new_w, new_h), resample=resample)
    top, left = (new_h - side) // 2, (new_w - side) // 2
    return np.asarray(image)[top:top + side, left:left + side]


def normalize(crops: np.ndarray, settings: ProcessorSettings) -> np.ndarray:
    """Rescale 1/255 and normalize uint8 crops [N, S, S, 3]; returns [N, 3, S, S] float32."""
    x = (crops.astype(np.float64) * (1 / 255)).astype(np.float32)
    x = (x - np.asarray(settings.image_mean, np.float32)) / np.asarray(settings.image_std, np.float32)
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def vision_crops(image: PIL.Image.Image, cfg: ModelConfig,
                 settings: ProcessorSettings | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """The crops the vision tower sees, as uint8 pixels [N, S, S, 3] before rescale and normalize, and the
    image's (height, width).

    LLaVA-1.5: N = 1 (pad to a square of the mean colour, CLIP resize and center crop; with `resize="exact"`
    no pad, the image squashed to S x S).
    LLaVA-NeXT: N = 1 + grid crops (the base image squashed to S x S, then the anyres grid crops row-major,
    cut from the best-resolution canvas: the image resized into it keeping its aspect, centred on black).
    """
    settings = settings or ProcessorSettings()
    _check_settings(settings, cfg)
    image = _to_rgb(image)
    s = cfg.vision.image_size
    size_hw = (image.height, image.width)
    if not cfg.image.anyres:
        side, ox, oy = pad_geometry(size_hw)
        if settings.resize == "shortest_edge" and (side != image.width or side != image.height):
            fill = tuple(int(x * 255) for x in settings.image_mean)  # truncation, as LLaVA / transformers
            square = PIL.Image.new("RGB", (side, side), fill)
            square.paste(image, (ox, oy))
            image = square
        return _resize_crop(image, s, settings)[None], size_hw
    (bh, bw), (fh, fw), (py, px) = anyres_geometry(cfg, size_hw)
    canvas = PIL.Image.new("RGB", (bw, bh), (0, 0, 0))
    canvas.paste(image.resize((fw, fh), resample=settings.resample), (px, py))
    crops = [image.resize((s, s), resample=settings.resample)]
    crops += [canvas.crop(box) for box in crop_boxes(cfg, (bh, bw))]
    return np.stack([_resize_crop(c, s, settings) for c in crops]), size_hw


def preprocess(image: PIL.Image.Image, cfg: ModelConfig,
               settings: ProcessorSettings | None = None) -> tuple[np.ndarray, tuple[int, int]]:
    """Pixel values of one image for `cfg` and its (height, width).

    LLaVA-1.5: [1, 3, S, S] (pad to a square of the mean colour, then CLIP preprocessing).
    LLaVA-NeXT: [1, crops, 3, S, S] (base image squashed to S x S, then the anyres grid crops row-major).
    """
    settings = settings or ProcessorSettings()
    crops, size_hw = vision_crops(image, cfg, settings)
    x = normalize(crops, settings)  # [N, 3, S, S]
    return (x[None] if cfg.image.anyres else x), size_hw


def study_mask(size_hw: tuple[int, int], boxes: Iterable[Box]) -> PIL.Image.Image:
    """The study's mask of an image of size_hw: pure green, each box (x, y, w, h) filled pure red with
    `ImageDraw.rectangle((x, y, x + w, y + h))` after truncating x, y, w and h to integers, as the study does.
    Both corners are inclusive, so a box covers (w + 1) x (h + 1) pixels."""
    h, w = int(size_hw[0]), int(size_hw[1])
    mask = PIL.Image.new("RGB", (w, h), GREEN)
    draw = PIL.ImageDraw.Draw(mask)
    for box in boxes:
        x, y, bw, bh = (int(v) for v in box)
        if bw < 0 or bh < 0:
            raise ValueError(f"box {tuple(box)}: width and height must not be negative")
        draw.rectangle((x, y, x + bw, y + bh), fill=RED)
    return mask


def study_features(cfg: ModelConfig, size_hw: tuple[int, int], boxes: Iterable[Box],
                   settings: ProcessorSettings | None = None) -> np.ndarray:
    """The "study" rule, per image feature (order of `image_layout(cfg, size_hw)`): does its patch, in the crops
    the vision tower sees of the `study_mask`, hold a pixel that is exactly pure red?"""
    size_hw = (int(size_hw[0]), int(size_hw[1]))
    boxes = list(boxes)
    if not boxes:
        return np.zeros(len(image_layout(cfg, size_hw)), bool)
    crops, _ = vision_crops(study_mask(size_hw, boxes), cfg, settings)  # [N, S, S, 3] uint8
    g, p = cfg.vision.grid, cfg.vision.patch_size
    c = crops[:, :g * p, :g * p]
    red = (c[..., 0] == RED[0]) & (c[..., 1] == RED[1]) & (c[..., 2] == RED[2])  # [N, g*p, g*p]
    return patch_features(cfg, size_hw, red.reshape(len(crops), g, p, g, p).any(axis=(2, 4)))  # [N, g, g]


def related_features(cfg: ModelConfig, size_hw: tuple[int, int], boxes: Iterable[Box], rule: str = "study",
                     settings: ProcessorSettings | None = None) -> np.ndarray:
    """Per image feature (order of `image_layout(cfg, size_hw)`): is it a related image patch of `boxes` under
    `rule` ("study" or "overlap", see the module docstring)? `settings`: the model's processor settings.
    Newline and CLS features are never related."""
    if rule == "study":
        return study_features(cfg, size_hw, boxes, settings)
    if rule == "overlap":
        return overlap_features(cfg, size_hw, boxes, (settings or ProcessorSettings()).resize)
    raise ValueError(f"related_patches={rule!r}: expected one of {', '.join(RELATED_PATCH_RULES)}")
