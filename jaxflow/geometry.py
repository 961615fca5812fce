"""Image geometry, in one place: image -> crops -> patches -> feature slots, and a box -> the same slots.

- Crops: the LLaVA-1.5 square (`pad_geometry`) or the anyres canvas of LLaVA-NeXT and OneVision
  (`anyres_geometry`: best resolution, aspect-preserving resize, centred paste), cut into `image_size` crops
  (`crop_boxes`).
- Feature slots (`image_layout`): for every image feature in sequence order, the crop it comes from and its
  patch row/column, or an `image_newline` slot, or (LLaVA-OneVision, `anyres_max_N`) a cell of the unpadded
  grid bilinearly downsampled when it holds more than N crops' worth of patches (`downsampled_shape`,
  `bilinear_taps`: four source patches and their weights). The model turns the plan into one gather
  (`ImageLayout.feature_index`, `ImageLayout.taps`); preprocessing and the region code read the same plan,
  so all agree.
- Boxes (`box_in_base`, `box_in_grid`, `overlap_features`, `patch_features`): a box carried into the same
  crops, and per-patch facts mapped onto the feature slots.

The arithmetic is transformers' LlavaNext, or LLaVA's own code (llava-torch 1.2.2) when
`cfg.image.geometry == "llava"` (original-layout checkpoints): they differ only in how unpadding turns the
scaled image side into whole patches (`KEPT_SIDE`). Sizes are (height, width) throughout, as in
transformers' LlavaNext; boxes are (x, y, w, h) in original image pixels, rectangles (x0, y0, x1, y1).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence

import numpy as np

from jaxflow.config import ModelConfig

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


def grid_shape(cfg: ModelConfig, size: tuple[int, int]) -> tuple[int, int]:
    """Number of crops (rows, cols) of the anyres grid for an image of `size` (height, width)."""
    ph, pw = select_best_resolution(size, cfg.image.pinpoints)
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


def anyres_geometry(cfg: ModelConfig, size: tuple[int, int]):
    """Best resolution (h, w), resized content size (h, w) and paste offset (y, x) of the anyres canvas."""
    if not cfg.image.anyres:
        raise ValueError("the anyres grid exists only for LLaVA-NeXT configs")
    if not cfg.image.pinpoints:
        raise ValueError("LLaVA-NeXT config has no image_grid_pinpoints")
    s = cfg.vision.image_size
    best = select_best_resolution(size, cfg.image.pinpoints)
    if best[0] % s or best[1] % s:
        raise ValueError(f"pinpoint {best} is not a multiple of the vision image_size {s}")
    fit = fit_size(size, best)
    paste = ((best[0] - fit[0]) // 2, (best[1] - fit[1]) // 2)  # odd remainder goes bottom/right
    return best, fit, paste


def crop_boxes(cfg: ModelConfig, best: tuple[int, int]) -> list[tuple[int, int, int, int]]:
    """(x0, y0, x1, y1) of each grid crop in the best-resolution canvas of (height, width) `best`, row-major."""
    s = cfg.vision.image_size
    return [(c * s, r * s, (c + 1) * s, (r + 1) * s) for r in range(best[0] // s) for c in range(best[1] // s)]


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


def downsampled_shape(cfg: ModelConfig, unpadded: tuple[int, int]) -> tuple[int, int] | None:
    """OneVision (`anyres_max_N`): the (rows, cols) an unpadded grid of `unpadded` patches is bilinearly resized
    to, when it holds more than 1.1^2 times N crops' worth of patches; None when it is kept as it is."""
    if cfg.image.max_grid_crops is None:
        return None
    h, w = unpadded
    ratio = math.sqrt(h * w / (cfg.image.max_grid_crops * cfg.vision.grid**2))
    return (int(h // ratio), int(w // ratio)) if ratio > 1.1 else None


def bilinear_taps(n_in: int, n_out: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per output index of a 1-D bilinear resize from n_in to n_out samples (torch `interpolate(mode="bilinear",
    align_corners=False)` with an output size, in its float32 arithmetic): the two input indices [n_out, 2] and
    their weights [n_out, 2] float32, plus the input interval [n_out, 2] (start, end) each output covers."""
    scale = np.float32(n_in) / np.float32(n_out)
    dst = np.arange(n_out, dtype=np.float32)
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0))
    i0 = np.minimum(np.floor(src).astype(np.int64), n_in - 1)
    lam = np.clip(src - i0.astype(np.float32), np.float32(0), np.float32(1))
    i1 = i0 + (i0 < n_in - 1)
    span = np.arange(n_out + 1) * (n_in / n_out)
    return (np.stack([i0, i1], 1), np.stack([np.float32(1) - lam, lam], 1).astype(np.float32),
            np.stack([span[:-1], span[1:]], 1))


# ---- feature slots -------------------------------------------------------------------------------------------------

CELL = -2  # ImageLayout.crop of a downsampled grid cell (OneVision); -1 is the newline, 0 the base crop


@dataclasses.dataclass(frozen=True)
class Downsampling:
    """OneVision: the unpadded grid, patch rows [r0, r0 + rows) and cols [c0, c0 + cols) of the full grid
    frame, bilinearly resized to `cells` (rows, cols)."""

    origin: tuple[int, int]  # (r0, c0)
    source: tuple[int, int]  # (rows, cols) of unpadded patches
    cells: tuple[int, int]  # (rows, cols) after the resize


@dataclasses.dataclass(frozen=True)
class ImageLayout:
    """Per feature, in sequence order: crop index (0 = base image, k >= 1 = grid crop, -1 = newline,
    CELL = downsampled grid cell), patch row and column in that crop's coordinate frame (the full
    anyres grid for grid crops; the cell grid for cells; -1 for CLS and newline)."""

    crop: np.ndarray  # [F] int
    row: np.ndarray  # [F] int
    col: np.ndarray  # [F] int
    num_crops: int
    grid: tuple[int, int] = (1, 1)  # crops (rows, cols) of the anyres grid
    downsampling: Downsampling | None = None  # OneVision, when the unpadded grid was resized

    def __len__(self) -> int:
        return len(self.crop)

    @property
    def is_newline(self) -> np.ndarray:
        return self.crop == -1

    @property
    def is_cell(self) -> np.ndarray:
        return self.crop == CELL

    def _flat(self, cfg: ModelConfig, crop: np.ndarray, row: np.ndarray, col: np.ndarray) -> np.ndarray:
        """Index in the flat [crops * features_per_crop] array of patch (row, col) of `crop` (grid crops in the
        full grid frame; row -1: the CLS feature)."""
        g = cfg.vision.grid
        local_r = np.where(crop > 0, row % g, row)
        local_c = np.where(crop > 0, col % g, col)
        within = np.where(row < 0, 0, local_r * g + local_c - cfg.patch_offset)
        return crop * cfg.features_per_crop + within

    def feature_index(self, cfg: ModelConfig, crop_offset: int) -> np.ndarray:
        """Index of each feature in the flat [crops * features_per_crop (+1 newline)] array; the
        newline maps to -2 and a downsampled cell to -3 (both resolved by the caller: cells from `taps`)."""
        index = self._flat(cfg, crop_offset + np.maximum(self.crop, 0), self.row, self.col)
        return np.where(self.is_newline, -2, np.where(self.is_cell, -3, index))

    def taps(self, cfg: ModelConfig, crop_offset: int) -> tuple[np.ndarray, np.ndarray]:
        """The bilinear sources of the downsampled cells, in sequence order: flat feature indices [M, 4] (as
        `feature_index`) and weights [M, 4] float32, taps ordered (top-left, top-right, bottom-left,
        bottom-right). Empty when the grid is not downsampled."""
        d = self.downsampling
        if d is None:
            return np.zeros((0, 4), np.int64), np.zeros((0, 4), np.float32)
        rows, cols = self.row[self.is_cell], self.col[self.is_cell]
        (ri, rw, _), (ci, cw, _) = bilinear_taps(d.source[0], d.cells[0]), bilinear_taps(d.source[1], d.cells[1])
        r = d.origin[0] + ri[rows][:, [0, 0, 1, 1]]  # [M, 4] full-grid patch rows
        c = d.origin[1] + ci[cols][:, [0, 1, 0, 1]]
        g, nw = cfg.vision.grid, self.grid[1]
        crop = crop_offset + 1 + (r // g) * nw + c // g
        weight = rw[rows][:, [0, 0, 1, 1]] * cw[cols][:, [0, 1, 0, 1]]
        return self._flat(cfg, crop, r, c), weight.astype(np.float32)

    def rects(self, cfg: ModelConfig) -> np.ndarray:
        """[F, 4] (x0, y0, x1, y1) of each feature's patch in pixels of its frame (the base crop for crop 0, the
        padded best-resolution canvas for grid patches and cells); NaN for CLS and newline features. A crop's
        patches cover its first grid * patch_size pixels (384 px crops of 14 px patches leave 6 px unseen)."""
        p, g, s = cfg.vision.patch_size, cfg.vision.grid, cfg.vision.image_size

        def canvas(u, end=False):  # full-grid patch coordinate (fractional for cells) -> canvas pixels
            crop = np.maximum(np.ceil(u / g) - 1, 0) if end else np.floor(u / g)  # an end on a crop edge ends a crop
            return crop * s + (u - crop * g) * p

        y0, x0 = (self.row * p).astype(np.float64), (self.col * p).astype(np.float64)
        out = np.stack([x0, y0, x0 + p, y0 + p], 1)
        grid = self.crop > 0
        r, c = self.row[grid].astype(np.float64), self.col[grid].astype(np.float64)
        out[grid] = np.stack([canvas(c), canvas(r), canvas(c) + p, canvas(r) + p], 1)
        d = self.downsampling
        if d is not None:
            cell = self.is_cell
            (_, _, rs), (_, _, cs) = bilinear_taps(d.source[0], d.cells[0]), bilinear_taps(d.source[1], d.cells[1])
            ys, xs = d.origin[0] + rs[self.row[cell]], d.origin[1] + cs[self.col[cell]]  # [M, 2] in patches
            out[cell] = np.stack([canvas(xs[:, 0]), canvas(ys[:, 0]), canvas(xs[:, 1], end=True),
                                  canvas(ys[:, 1], end=True)], 1)
        out[(self.row < 0) | self.is_newline] = np.nan
        return out


def image_layout(cfg: ModelConfig, size: tuple[int, int] | None = None) -> ImageLayout:
    """The feature plan of one image; `size` (height, width) is needed for LLaVA-NeXT."""
    g = cfg.vision.grid
    patch = np.arange(cfg.features_per_crop) + cfg.patch_offset  # -1: the CLS token
    rows, cols = np.where(patch >= 0, patch // g, -1), np.where(patch >= 0, patch % g, -1)
    base = (np.zeros(len(rows), int), rows, cols)
    if not cfg.image.anyres:
        return ImageLayout(*base, num_crops=1)
    if size is None:
        raise ValueError("image_sizes: LLaVA-NeXT needs each image's (height, width)")
    nh, nw = grid_shape(cfg, size)
    r0, r1, c0, c1 = unpad_box(size, (nh * g, nw * g), cfg.image.geometry)
    cells = downsampled_shape(cfg, (r1 - r0, c1 - c0))
    down = None if cells is None else Downsampling((r0, c0), (r1 - r0, c1 - c0), cells)
    if down is not None:  # cell rows and columns, each row ending in a newline slot
        r0, r1, c0, c1 = 0, cells[0], 0, cells[1]
    rr, cc = np.meshgrid(np.arange(r0, r1), np.arange(c0, c1 + 1), indexing="ij")  # +1: newline column
    newline = cc == c1
    crop = np.where(newline, -1, CELL if down else 1 + (rr // g) * nw + cc // g)
    grid = (crop.ravel(), np.where(newline, -1, rr).ravel(), np.where(newline, -1, cc).ravel())
    return ImageLayout(*(np.concatenate([a, b]) for a, b in zip(base, grid, strict=True)),
                       num_crops=1 + nh * nw, grid=(nh, nw), downsampling=down)


# ---- boxes -> slots ------------------------------------------------------------------------------------------------


def box_in_base(box: Box, size: tuple[int, int], cfg: ModelConfig, resize: str = "shortest_edge") -> Rect:
    """(x0, y0, x1, y1) of `box` in the pixel frame of the base crop (S x S); `resize`: the processor's
    (`ProcessorSettings.resize`: "exact" squashes a LLaVA-1.5 image too, as SigLIP's processor does)."""
    x, y, w, h = box
    s = cfg.vision.image_size
    if cfg.image.anyres or resize == "exact":  # squash resize
        ih, iw = size
        return x * s / iw, y * s / ih, (x + w) * s / iw, (y + h) * s / ih
    side, ox, oy = pad_geometry(size)  # pad to square, resize to S x S (the center crop is then a no-op)
    return (x + ox) * s / side, (y + oy) * s / side, (x + w + ox) * s / side, (y + h + oy) * s / side


def box_in_grid(box: Box, size: tuple[int, int], cfg: ModelConfig) -> Rect:
    """(x0, y0, x1, y1) of `box` in the padded best-resolution frame of the anyres grid (LLaVA-NeXT)."""
    x, y, w, h = box
    _, (fh, fw), (py, px) = anyres_geometry(cfg, size)
    ih, iw = size
    return x * fw / iw + px, y * fh / ih + py, (x + w) * fw / iw + px, (y + h) * fh / ih + py


def original_rects(cfg: ModelConfig, size: tuple[int, int], resize: str = "shortest_edge") -> np.ndarray:
    """[F, 4] (x0, y0, x1, y1) in original image pixels of what each image feature (order of `image_layout(cfg,
    size)`) sees: its patch (or OneVision cell) carried back through the crop's geometry (`box_in_base`,
    `box_in_grid` inverted) and clipped to the image. NaN for CLS and newline features and for a patch that
    holds only padding."""
    h, w = size
    layout = image_layout(cfg, size)
    rect = layout.rects(cfg)  # [F, 4] in each feature's frame
    s = cfg.vision.image_size
    out = np.full_like(rect, np.nan)
    base = layout.crop == 0
    if cfg.image.anyres or resize == "exact":  # the base crop is the image squashed to S x S
        out[base] = rect[base] * np.asarray([w, h, w, h]) / s
    else:  # padded to a square of `side`, then resized to S x S
        side, ox, oy = pad_geometry(size)
        out[base] = rect[base] * side / s - np.asarray([ox, oy, ox, oy])
    if cfg.image.anyres:
        grid = ~base
        _, (fh, fw), (py, px) = anyres_geometry(cfg, size)
        out[grid] = (rect[grid] - np.asarray([px, py, px, py])) * np.asarray([w / fw, h / fh, w / fw, h / fh])
    out = np.clip(out, 0, np.asarray([w, h, w, h], np.float64))
    out[(out[:, 2] <= out[:, 0]) | (out[:, 3] <= out[:, 1])] = np.nan  # padding only (NaN rows stay NaN)
    return out


def _clip_to_image(box: Box, size: tuple[int, int]) -> Box:
    x, y, w, h = box
    x0, y0 = max(x, 0), max(y, 0)
    return x0, y0, min(x + w, size[1]) - x0, min(y + h, size[0]) - y0


def overlap_features(cfg: ModelConfig, size: tuple[int, int], boxes: Iterable[Box],
                     resize: str = "shortest_edge") -> np.ndarray:
    """The "overlap" rule, per image feature (order of `image_layout(cfg, size)`): does its patch overlap any
    box with positive area? Boxes are (x, y, w, h) in original pixels, clipped to the image first; `resize` as
    in `box_in_base`."""
    size = (int(size[0]), int(size[1]))
    layout = image_layout(cfg, size)
    related = np.zeros(len(layout), bool)
    boxes: Sequence[Box] = [_clip_to_image(b, size) for b in boxes]
    if not boxes:
        return related
    patches = layout.rects(cfg)  # [F, 4], NaN rows never overlap
    frames = [(layout.crop == 0, [box_in_base(b, size, cfg, resize) for b in boxes])]
    if cfg.image.anyres:
        frames.append((layout.crop != 0, [box_in_grid(b, size, cfg) for b in boxes]))
    for sel, rects in frames:
        r, q = np.asarray(rects, np.float64), patches[sel, None]  # [B, 4], [n, 1, 4]
        dx = np.minimum(q[..., 2], r[:, 2]) - np.maximum(q[..., 0], r[:, 0])
        dy = np.minimum(q[..., 3], r[:, 3]) - np.maximum(q[..., 1], r[:, 1])
        related[sel] = ((dx > 0) & (dy > 0)).any(axis=1)
    return related


def patch_features(cfg: ModelConfig, size: tuple[int, int], per_patch: np.ndarray) -> np.ndarray:
    """Per image feature (order of `image_layout(cfg, size)`): the value of `per_patch` [crops, g, g] bool
    (one value per patch of each crop the vision tower sees) at the patch that feeds it; False for CLS and
    newline features. A downsampled cell (OneVision) is True when every patch it blends with a positive
    weight is: the indicator resized like the features stays exactly 1."""
    layout = image_layout(cfg, size)
    g = cfg.vision.grid
    per_patch = np.asarray(per_patch, bool).reshape(len(per_patch), g * g)  # [N, g*g]
    patch = np.arange(cfg.features_per_crop) + cfg.patch_offset  # each feature's patch; -1: CLS
    flat = np.where(patch >= 0, per_patch[:, np.maximum(patch, 0)], False).ravel()  # [N * features_per_crop]
    index = layout.feature_index(cfg, 0)  # the model's own gather plan; newline: -2, cell: -3
    out = np.where(index >= 0, flat[np.maximum(index, 0)], False)
    taps, weights = layout.taps(cfg, 0)  # [M, 4]
    out[layout.is_cell] = (flat[taps] | (weights == 0)).all(axis=1)
    return out
