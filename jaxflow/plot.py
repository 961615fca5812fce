"""Values drawn on the original image: one value per image position, through the sample's own geometry (any crop
layout: LLaVA-1.5's padded square, LLaVA-NeXT's anyres grid and newline slots, OneVision's downsampled cells).

    jaxflow.plot.on_image(sample, values)                    # one panel
    jaxflow.plot.layers_on_image(sample, per_layer, layers)  # one panel per layer, one colour scale
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from jaxflow.geometry import CELL
from jaxflow.sample import Sample

VIEWS = ("auto", "base", "grid", "all")


def _view(sample: Sample, view: str) -> np.ndarray:
    """[F] bool: the image positions drawn. A place of the image is seen by the base crop and, on anyres models, again
    by the grid; "auto" draws the finer grid on anyres models, else the base crop."""
    crop = sample.layout.crop
    anyres = bool((crop != 0).any())
    if view not in VIEWS:
        raise ValueError(f"view: {view!r}, expected one of {', '.join(VIEWS)}")
    if view == "auto":
        view = "grid" if anyres else "base"
    if view == "grid" and not anyres:
        raise ValueError("view='grid': this model has no anyres grid")
    return {"base": crop == 0, "grid": (crop > 0) | (crop == CELL), "all": crop != -1}[view]


def _norm(values: np.ndarray, norm=None):
    """A scale symmetric about 0 when the values have both signs (a relative change: 0 stays white), else linear."""
    from matplotlib.colors import Normalize

    if norm is not None:
        return norm
    finite = values[np.isfinite(values)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if lo < 0 < hi:
        return Normalize(-max(-lo, hi), max(-lo, hi))
    return Normalize(lo, hi if hi > lo else lo + 1e-12)


def on_image(sample: Sample, values, ax=None, *, view: str = "auto", cmap=None, norm=None, alpha: float = 0.6,
             title: str | None = None, colorbar: bool = True, boxes: bool = True, related: bool = True,
             label: str | None = None):
    """Draws `values` ([F], one per image position in `sample.image_positions` order; [T], one per sequence
    position; None: nothing but the outlines) over the original image: each position's rectangle
    (`sample.image_rects`) filled by its value, the sample's boxes outlined in yellow and its related image patches
    in red. NaN values are not drawn.

    view: which positions ("auto": the anyres grid on anyres models, else the base crop; "base", "grid", "all").
    cmap / norm: matplotlib's (default: blue-white-red symmetric about 0 for values of both signs, else viridis).
    Returns the matplotlib Axes."""
    import matplotlib.pyplot as plt
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    f, t = len(sample.image_positions), len(sample)
    values = np.full(f, np.nan) if values is None else np.asarray(values, np.float64)
    if values.shape == (t,) and t != f:
        values = values[sample.image_positions]
    if values.shape != (f,):
        raise ValueError(f"values: expected [{f}] (one per image position) or [{t}] (one per position), "
                         f"got shape {values.shape}")
    if ax is None:
        _, ax = plt.subplots(figsize=(6, 5 * sample.image.height / sample.image.width + 0.4), layout="constrained")
    w, h = sample.image.size
    ax.imshow(np.asarray(sample.image), extent=(0, w, h, 0))
    rects = sample.image_rects
    drawn = _view(sample, view) & np.isfinite(values) & ~np.isnan(rects[:, 0])
    norm = _norm(values[drawn], norm)
    cmap = cmap or ("RdBu_r" if norm.vmin < 0 < norm.vmax else "viridis")
    cells = PatchCollection([Rectangle((x0, y0), x1 - x0, y1 - y0) for x0, y0, x1, y1 in rects[drawn]], cmap=cmap,
                            norm=norm, alpha=alpha, linewidth=0)
    cells.set_array(values[drawn])
    ax.add_collection(cells)
    if related and "related_image_patches" in sample.regions:
        mark = np.isin(sample.image_positions, sample.regions["related_image_patches"]) & drawn
        ax.add_collection(PatchCollection([Rectangle((x0, y0), x1 - x0, y1 - y0) for x0, y0, x1, y1 in rects[mark]],
                                          facecolor="none", edgecolor="red", linewidth=0.6))
    if boxes:
        for name, (x, y, bw, bh) in sample.boxes.items():
            ax.add_patch(Rectangle((x, y), bw, bh, fill=False, edgecolor="yellow", linewidth=1.6))
            ax.text(x, y, f" {name}", color="black", fontsize=7, va="bottom",
                    bbox={"facecolor": "yellow", "edgecolor": "none", "pad": 1})
    ax.set_xlim(0, w)
    ax.set_ylim(h, 0)
    ax.set_xticks([])
    ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=9)
    if colorbar and drawn.any():
        ax.figure.colorbar(cells, ax=ax, fraction=0.046, pad=0.03, label=label)
    return ax


def layers_on_image(sample: Sample, values, layers: Sequence[int] | None = None, *, ncols: int = 4,
                    title: str | None = None, label: str | None = None, view: str = "auto", cmap=None):
    """One `on_image` panel per layer of `values` [L, F] (e.g. `jaxflow.attention_on_image`, an image-token lens),
    all on one colour scale. layers: which rows to draw (default: about eight spread over all). Returns the Figure."""
    import matplotlib.pyplot as plt

    values = np.asarray(values, np.float64)
    layers = list(np.unique(np.linspace(0, len(values) - 1, min(8, len(values))).astype(int)) if layers is None
                  else layers)
    shown = values[layers]
    norm = _norm(shown[:, _view(sample, view)])
    ncols = min(ncols, len(layers))
    nrows = -(-len(layers) // ncols)
    aspect = sample.image.height / sample.image.width
    fig, axes = plt.subplots(nrows, ncols, figsize=(3 * ncols + 0.8, 3 * aspect * nrows + 0.6), squeeze=False)
    for ax, layer, row in zip(axes.flat, layers, shown, strict=False):
        on_image(sample, row, ax, view=view, cmap=cmap, norm=norm, title=f"layer {layer}", colorbar=False,
                 related=False)
    for ax in axes.flat[len(layers):]:
        ax.axis("off")
    mappable = axes.flat[0].collections[0]
    fig.colorbar(mappable, ax=axes, fraction=0.03, pad=0.02, label=label)
    if title:
        fig.suptitle(title, fontsize=10)
    return fig
