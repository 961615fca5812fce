"""Where each image feature comes from: the host-side plan of the image tokens.

For every image this module lists, feature by feature in sequence order, which vision crop it
comes from and at which patch row/column, or that it is an `image_newline` embedding. The model
turns the plan into one gather; the region code (related image patches) reads the same plan, so
both always agree. Image sizes are (height, width), as in transformers' LlavaNext.

The arithmetic is transformers' LlavaNext, or LLaVA's own code (llava-torch 1.2.2) when
`cfg.image_geometry == "llava"` (original-layout checkpoints): they differ only in how unpadding
turns the scaled image side into whole patches (`KEPT_SIDE`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from jaxflow.config import LlavaConfig


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
        local_r = np.where(self.crop > 0, self.row % g, self.row)
        local_c = np.where(self.crop > 0, self.col % g, self.col)
        within = np.where(self.row < 0, 0, local_r * g + local_c - cfg.patch_offset)
        index = (crop_offset + self.crop) * cfg.features_per_crop + within
        return np.where(self.is_newline, -2, index)


def image_layout(cfg: LlavaConfig, size: tuple[int, int] | None = None) -> ImageLayout:
    """The feature plan of one image; `size` (height, width) is needed for LLaVA-NeXT."""
    g = cfg.vision.grid
    patch = np.arange(cfg.features_per_crop) + cfg.patch_offset  # -1: the CLS token
    rows, cols = np.where(patch >= 0, patch // g, -1), np.where(patch >= 0, patch % g, -1)
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
