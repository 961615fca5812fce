"""Each image position's rectangle of the original image (`geometry.original_rects`) against the processors' own
arithmetic: an image whose pixels encode their own coordinates goes through transformers' image processors
(LLaVA-1.5 pad, LLaVA-NeXT anyres, OneVision), and the pixel at each patch's centre must decode to the centre
of that patch's rectangle. OneVision's downsampled cells must tile the image."""

from __future__ import annotations

import numpy as np
import PIL.Image
import pytest
from test_images import CFG15, CFGNEXT, HF15, HFNEXT
from test_onevision import _real_geometry
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

from jaxflow.geometry import anyres_geometry, image_layout, original_rects

BLUE = 128  # the coordinate image's constant blue: padding (mean colour or black) never has it


def coordinate_image(h: int, w: int) -> PIL.Image.Image:
    """Red = x, green = y (pixel centres, scaled to 0..255), blue constant."""
    x = np.round(255 * (np.arange(w) + 0.5) / w)
    y = np.round(255 * (np.arange(h) + 0.5) / h)
    rgb = np.stack([np.broadcast_to(x, (h, w)), np.broadcast_to(y[:, None], (h, w)), np.full((h, w), BLUE)], -1)
    return PIL.Image.fromarray(rgb.astype(np.uint8), "RGB")


def check_centres(cfg, size, crops, resize="shortest_edge") -> int:
    """crops [N, S, S, 3] pixels in 0..255 as the processor made them. Asserts every patch whose centre shows the
    image (not padding) has a rectangle, and, away from the image's edges, decodes to its rectangle's centre;
    returns how many were checked."""
    h, w = size
    lay, rects = image_layout(cfg, size), original_rects(cfg, size, resize)
    g, p = cfg.vision.grid, cfg.vision.patch_size
    nw = lay.grid[1]
    checked = 0
    for f in np.flatnonzero((lay.crop >= 0) & (lay.row >= 0)):
        crop = 0 if lay.crop[f] == 0 else 1 + (lay.row[f] // g) * nw + lay.col[f] // g
        r, c = lay.row[f] % g, lay.col[f] % g
        centre = crops[crop, r * p + p // 2 - 1: r * p + p // 2 + 1, c * p + p // 2 - 1: c * p + p // 2 + 1]
        centre = centre.reshape(-1, 3).mean(0)  # the 2 x 2 pixels around the patch centre
        if abs(centre[2] - BLUE) > 2:  # padding
            continue
        x, y = centre[0] / 255 * w, centre[1] / 255 * h  # decoded original coordinates
        x0, y0, x1, y1 = rects[f]
        assert not np.isnan(x0), (size, f)
        if min(x0, y0) <= 0 or x1 >= w or y1 >= h:  # may be clipped, and the resize blends in the padding there
            continue
        tol_x, tol_y = w / 255 + 0.15 * (x1 - x0) + 0.5, h / 255 + 0.15 * (y1 - y0) + 0.5
        assert abs(x - (x0 + x1) / 2) < tol_x and abs(y - (y0 + y1) / 2) < tol_y, (size, f, (x, y), rects[f])
        checked += 1
    return checked


def _pixels(out, processor) -> np.ndarray:
    pv = np.asarray(out["pixel_values"][0], np.float64)  # [(N,) 3, S, S]
    pv = pv[None] if pv.ndim == 3 else pv
    mean, std = np.asarray(processor.image_mean)[:, None, None], np.asarray(processor.image_std)[:, None, None]
    return ((pv * std + mean) * 255).transpose(0, 2, 3, 1)  # [N, S, S, 3]


@pytest.mark.parametrize("size", [(100, 30), (30, 100), (480, 640), (641, 479), (333, 1000)])
def test_pad_and_anyres_rectangles_follow_the_processors(size):
    image = coordinate_image(*size)
    n15 = check_centres(CFG15, size, _pixels(HF15(image), HF15))
    nnext = check_centres(CFGNEXT, size, _pixels(HFNEXT(image), HFNEXT))
    print(f"{size}: {n15} pad patches, {nnext} anyres patches checked")
    assert n15 >= 0.2 * CFG15.vision.grid ** 2 and nnext > n15


def test_onevision_rectangles_follow_the_processor():
    cfg = _real_geometry()
    proc = LlavaOnevisionImageProcessorPil()
    for size in [(480, 640), (300, 700)]:
        assert image_layout(cfg, size).downsampling is None
        assert check_centres(cfg, size, _pixels(proc(coordinate_image(*size)), proc), resize="exact") > 100


@pytest.mark.parametrize("size", [(1500, 1600), (4000, 3000)])
def test_onevision_cells_tile_the_image(size):
    cfg = _real_geometry()
    lay, rects = image_layout(cfg, size), original_rects(cfg, size)
    assert lay.downsampling is not None
    cells = rects[lay.is_cell]  # [M, 4], row-major
    rows, cols = lay.downsampling.cells
    assert len(cells) == rows * cols and not np.isnan(cells).any()
    grid = cells.reshape(rows, cols, 4)
    h, w = size
    _, (fh, fw), _ = anyres_geometry(cfg, size)
    unseen = cfg.vision.image_size - cfg.vision.grid * cfg.vision.patch_size  # canvas px a crop's patches miss
    gap_x, gap_y = unseen * w / fw + 1e-6, unseen * h / fh + 1e-6  # in original pixels
    p = cfg.vision.patch_size  # unpadding keeps whole patches of the grid: edges within a patch of the image's
    edge_x, edge_y = gap_x + p * w / fw, gap_y + p * h / fh
    assert (grid[:, 0, 0] <= edge_x).all() and (grid[:, -1, 2] >= w - edge_x).all()
    assert (grid[0, :, 1] <= edge_y).all() and (grid[-1, :, 3] >= h - edge_y).all()
    dx, dy = grid[:, 1:, 0] - grid[:, :-1, 2], grid[1:, :, 1] - grid[:-1, :, 3]  # neighbours: no overlap, and no
    assert (dx >= -1e-6).all() and (dx <= gap_x).all() and (dy >= -1e-6).all() and (dy <= gap_y).all()  # gap but
    assert (np.isclose(dx, 0).mean() > 0.8) and (np.isclose(dy, 0).mean() > 0.8)  # between crops
    assert np.isnan(rects[lay.is_newline]).all()
