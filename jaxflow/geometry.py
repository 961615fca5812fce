"""Image geometry, in one place: image -> crops -> patches -> feature slots, and a box -> the same slots.

- Crops: the LLaVA-1.5 square (`pad_geometry`) or the anyres canvas of LLaVA-NeXT (`anyres_geometry`:
  best resolution, aspect-preserving resize, centred paste), cut into `image_size` crops.
- Feature slots (`image_layout`): for every image feature in sequence order, the crop it comes from and its
  patch row/column, or an `image_newline` slot. The model turns the plan into one gather
  (`ImageLayout.feature_index`); preprocessing and the region code read the same plan, so all agree.
- Boxes (`box_in_base`, `box_in_grid`, `overlap_features`, `patch_features`): a box carried into the same
  crops, and per-patch facts mapped onto the feature slots.

The arithmetic is transformers' LlavaNext, or LLaVA's own code (llava-torch 1.2.2) when
`cfg.image_geometry == "llava"` (original-layout checkpoints): they differ only in how unpadding turns the
scaled image side into whole patches (`KEPT_SIDE`). Sizes are (height, width) throughout, as in
transformers' LlavaNext; boxes are (x, y, w, h) in original image pixels, rectangles (x0, y0, x1, y1).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np

from jaxflow.config import LlavaConfig

Box = tuple[float, float, float, float]  # (x, y, w, h) in original image pixels
Rect = tuple[float, float, float, float]  # (x0, y0, x1, y1)


# ---- crops ---------------------------------------------------------------------------------------------------------


def select_best_resolution(size: tuple[int, int], pinpoints) -> tuple[int, int]:
    """The pinpoint (height, width) that keeps the most of an image of `size` (height, width)."""
    height, width = size
    best, best_effective, best_wasted = None, 0, float("inf")
    for ph, pw in pinpoints:
        scale = min(pw / width, ph / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = ph * pw - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (ph, pw), effective, wasted
    return best


def grid_shape(cfg: LlavaConfig, size: tuple[int, int]) -> tuple[int, int]:
    """Number of crops (rows, cols) of the anyres grid for an image of `size` (height, width)."""
    ph, pw = select_best_resolution(size, cfg.image_grid_pinpoints)
    return ph // cfg.vision.image_size, pw // cfg.vision.image_size


def pad_geometry(size: tuple[int, int]) -> tuple[int, int, int]:
    """Side of the LLaVA-1.5 square and the (x, y) offset of the pasted image (odd remainder right/bottom)."""
    h, w = size
    side = max(h, w)
    return side, (side - w) // 2, (side - h) // 2


def fit_size(size: tuple[int, int], target: tuple[int, int]) -> tuple[int, int]:
    """(height, width) of the aspect-preserving resize into target (transformers' get_patch_output_size: ceil)."""
    h, w = size
    th, tw = target
    scale_w, scale_h = tw / w, th / h
    if scale_w < scale_h:
        return min(math.ceil(h * scale_w), th), tw
    return th, min(math.ceil(w * scale_h), tw)


def anyres_geometry(cfg: LlavaConfig, size: tuple[int, int]):
    """Best resolution (h, w), resized content size (h, w) and paste offset (y, x) of the anyres canvas."""
    if not cfg.is_next:
        raise ValueError("the anyres grid exists only for LLaVA-NeXT configs")
    if not cfg.image_grid_pinpoints:
        raise ValueError("LLaVA-NeXT config has no image_grid_pinpoints")
    s = cfg.vision.image_size
    best = select_best_resolution(size, cfg.image_grid_pinpoints)
    if best[0] % s or best[1] % s:
        raise ValueError(f"pinpoint {best} is not a multiple of the vision image_size {s}")
    fit = fit_size(size, best)
    paste = ((best[0] - fit[0]) // 2, (best[1] - fit[1]) // 2)  # odd remainder goes bottom/right
    return best, fit, paste


# Unpadding: the image side scaled to the patch grid, as a whole number of patches. transformers rounds to 7
# decimals before truncating, LLaVA's unpad_image truncates: 55 * (48 / 176) = 14.999999999999998 keeps 15
# patch columns in transformers, 14 in LLaVA.
KEPT_SIDE = {
    "transformers": lambda x: int(round(x, 7)),
    "llava": int,
}


def unpad_box(size: tuple[int, int], grid_hw: tuple[int, int],
              geometry: str = "transformers") -> tuple[int, int, int, int]:
    """Rows [r0, r1) and columns [c0, c1) of a patch grid of grid_hw that hold the image content."""
    height, width = size
    gh, gw = grid_hw
    kept = KEPT_SIDE[geometry]
    if width / height > gw / gh:
        new_h = kept(height * (gw / width))
        pad = (gh - new_h) // 2
        return pad, gh - pad, 0, gw
    new_w = kept(width * (gh / height))
    pad = (gw - new_w) // 2
    return 0, gh, pad, gw - pad


# ---- feature slots -------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """Per feature, in sequence order: crop index (0 = base image, -1 = newline), patch row and
    column in that crop's coordinate frame (the full anyres grid for grid crops; -1 for CLS and
    newline)."""

    crop: np.ndarray  # [F] int
    row: np.ndarray  # [F] int
    col: np.ndarray  # [F] int
    num_crops: int
    grid: tuple[int, int] = (1, 1)  # crops (rows, cols) of the anyres grid

    def __len__(self) -> int:
        return len(self.crop)

    @property
    def is_newline(self) -> np.ndarray:
        return self.crop < 0

    def feature_index(self, cfg: LlavaConfig, crop_offset: int) -> np.ndarray:
        """Index of each feature in the flat [crops * features_per_crop (+1 newline)] array; the
        newline maps to -2 (resolved by the caller)."""
        g = cfg.vision.grid
        full = cfg.select_strategy == "full"
        local_r = np.where(self.crop > 0, self.row % g, self.row)
        local_c = np.where(self.crop > 0, self.col % g, self.col)
        within = np.where(self.row < 0, 0, local_r * g + local_c + full)
        index = (crop_offset + self.crop) * cfg.features_per_crop + within
        return np.where(self.is_newline, -2, index)


def image_layout(cfg: LlavaConfig, size: tuple[int, int] | None = None) -> ImageLayout:
    """The feature plan of one image; `size` (height, width) is needed for LLaVA-NeXT."""
    g = cfg.vision.grid
    rows, cols = np.divmod(np.arange(g * g), g)
    if cfg.select_strategy == "full":
        rows, cols = np.concatenate([[-1], rows]), np.concatenate([[-1], cols])
    base = (np.zeros(len(rows), int), rows, cols)
    if not cfg.is_next:
        return ImageLayout(*base, num_crops=1)
    if size is None:
        raise ValueError("image_sizes: LLaVA-NeXT needs each image's (height, width)")
    nh, nw = grid_shape(cfg, size)
    r0, r1, c0, c1 = unpad_box(size, (nh * g, nw * g), cfg.image_geometry)
    rr, cc = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1 + 1), indexing="ij")  # +1: newline column
    newline = cc == c1
    crop = np.where(newline, -1, 1 + (rr // g) * nw + cc // g)
    grid = (crop.ravel(), np.where(newline, -1, rr).ravel(), np.where(newline, -1, cc).ravel())
    return ImageLayout(*(np.concatenate([a, b]) for a, b in zip(base, grid, strict=True)),
                       num_crops=1 + nh * nw, grid=(nh, nw))


# ---- boxes -> slots ------------------------------------------------------------------------------------------------


def box_in_base(box: Box, size: tuple[int, int], cfg: LlavaConfig) -> Rect:
    """(x0, y0, x1, y1) of `box` in the pixel frame of the base crop (S x S)."""
    x, y, w, h = box
    s = cfg.vision.image_size
    if cfg.is_next:  # squash resize
        ih, iw = size
        return x * s / iw, y * s / ih, (x + w) * s / iw, (y + h) * s / ih
    side, ox, oy = pad_geometry(size)  # pad to square, resize to S x S (the center crop is then a no-op)
    return (x + ox) * s / side, (y + oy) * s / side, (x + w + ox) * s / side, (y + h + oy) * s / side


def box_in_grid(box: Box, size: tuple[int, int], cfg: LlavaConfig) -> Rect:
    """(x0, y0, x1, y1) of `box` in the padded best-resolution frame of the anyres grid (LLaVA-NeXT)."""
    x, y, w, h = box
    _, (fh, fw), (py, px) = anyres_geometry(cfg, size)
    ih, iw = size
    return x * fw / iw + px, y * fh / ih + py, (x + w) * fw / iw + px, (y + h) * fh / ih + py


def _clip_to_image(box: Box, size: tuple[int, int]) -> Box:
    x, y, w, h = box
    x0, y0 = max(x, 0), max(y, 0)
    return x0, y0, min(x + w, size[1]) - x0, min(y + h, size[0]) - y0


def overlap_features(cfg: LlavaConfig, size: tuple[int, int], boxes: Iterable[Box]) -> np.ndarray:
    """The "overlap" rule, per image feature (order of `image_layout(cfg, size)`): does its patch overlap any
    box with positive area? Boxes are (x, y, w, h) in original pixels, clipped to the image first."""
    size = (int(size[0]), int(size[1]))
    layout = image_layout(cfg, size)
    related = np.zeros(len(layout), bool)
    boxes: Sequence[Box] = [_clip_to_image(b, size) for b in boxes]
    if not boxes:
        return related
    p = cfg.vision.patch_size
    patch = (layout.crop >= 0) & (layout.row >= 0)
    frames = [(layout.crop == 0, [box_in_base(b, size, cfg) for b in boxes])]
    if cfg.is_next:
        frames.append((layout.crop > 0, [box_in_grid(b, size, cfg) for b in boxes]))
    for in_frame, rects in frames:
        sel = patch & in_frame
        r = np.asarray(rects, np.float64)  # [B, 4]
        x0, y0 = layout.col[sel, None] * p, layout.row[sel, None] * p
        dx = np.minimum(x0 + p, r[:, 2]) - np.maximum(x0, r[:, 0])
        dy = np.minimum(y0 + p, r[:, 3]) - np.maximum(y0, r[:, 1])
        related[sel] = ((dx > 0) & (dy > 0)).any(axis=1)
    return related


def patch_features(cfg: LlavaConfig, size: tuple[int, int], per_patch: np.ndarray) -> np.ndarray:
    """Per image feature (order of `image_layout(cfg, size)`): the value of `per_patch` [crops, g, g] bool
    (one value per patch of each crop the vision tower sees) at the patch that feeds it; False for CLS and
    newline features."""
    layout = image_layout(cfg, size)
    g = cfg.vision.grid
    per_patch = np.asarray(per_patch, bool).reshape(len(per_patch), g * g)  # [N, g*g]
    per_feature = np.zeros((len(per_patch), cfg.features_per_crop), bool)  # [N, features_per_crop], CLS first
    per_feature[:, cfg.features_per_crop - g * g:] = per_patch
    index = layout.feature_index(cfg, 0)  # the model's own gather plan; newline: -2
    return np.where(index >= 0, per_feature.ravel()[np.maximum(index, 0)], False)
