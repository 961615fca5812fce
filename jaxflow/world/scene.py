"""Scenes of the toy world: a few flat shapes on a plain background, drawn with PIL, with exact boxes.

An object has a shape (`SHAPES`), a colour (`COLORS`), a material (`MATERIALS`: a solid fill, or
diagonal stripes of its colour and white), a size (`SIZES`) and a position. Every object of a scene
has a different shape, so "the star" always names one object. Objects may overlap a little (each
keeps at least `MIN_VISIBLE` of its pixels visible); later objects are drawn on top.

Drawing is supersampled (`SUPERSAMPLE` x) and box-filtered down, so small shapes keep their
outline. An object's box (x, y, w, h) is the bounding box of every output pixel its shape touches
(full object, occluded parts included, as GQA annotates), so its colour never appears outside it.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import PIL.Image
import PIL.ImageDraw

SHAPES = ("circle", "square", "triangle", "star", "diamond", "cross")
PLURALS = {s: s + ("es" if s.endswith("s") else "s") for s in SHAPES}
COLORS = {
    "red": (220, 30, 30),
    "green": (30, 160, 50),
    "blue": (30, 70, 225),
    "yellow": (240, 205, 20),
    "purple": (150, 50, 190),
    "black": (25, 25, 25),
}
STRIPE_COLOR = (255, 255, 255)
MATERIALS = ("solid", "striped")
SIZES = ("small", "large")
RADIUS = {"small": (4.5, 5.5), "large": (6.5, 8.0)}  # half-extent in px at IMAGE_SIZE
IMAGE_SIZE = 56
CELL = 14  # objects sit near the centres of a grid of CELL-px cells (the toy model's 14 px patches)
JITTER = 2.5  # px an object's centre may stray from its cell's centre
SUPERSAMPLE = 4
STRIPE_PERIOD = 4  # px at output scale: 2 px colour, 2 px white, diagonal
MIN_VISIBLE = 0.7  # fraction of each object's pixels no later object covers
BACKGROUND = (205, 205, 205)
ATTRIBUTES = {"color": tuple(COLORS), "material": MATERIALS, "size": SIZES}

Box = tuple[int, int, int, int]  # x, y, w, h in image pixels


@dataclasses.dataclass(frozen=True)
class Obj:
    """One object. `cx`, `cy`, `r`: centre and half-extent in image pixels; `box` filled in by `place`."""

    id: str
    shape: str
    color: str
    material: str
    size: str
    cx: float = 0.0
    cy: float = 0.0
    r: float = 0.0
    box: Box = (0, 0, 0, 0)

    def attr(self, kind: str) -> str:
        return getattr(self, kind)

    def attributes(self) -> list[str]:
        return [self.color, self.material, self.size]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self) | {"box": list(self.box)}

    @classmethod
    def from_dict(cls, d: dict) -> Obj:
        return cls(**{**d, "box": tuple(d["box"])})


@dataclasses.dataclass(frozen=True)
class Scene:
    img_id: str
    width: int
    height: int
    background: tuple[int, int, int]
    objects: tuple[Obj, ...]  # in drawing order

    def find(self, shape: str) -> Obj | None:
        return next((o for o in self.objects if o.shape == shape), None)

    def to_dict(self) -> dict:
        return {"img_id": self.img_id, "width": self.width, "height": self.height,
                "background": list(self.background), "objects": [o.to_dict() for o in self.objects]}

    @classmethod
    def from_dict(cls, d: dict) -> Scene:
        return cls(d["img_id"], d["width"], d["height"], tuple(d["background"]),
                   tuple(Obj.from_dict(o) for o in d["objects"]))


def _star(cx, cy, r, points=5, inner=0.45):
    return [(cx + (r if k % 2 == 0 else r * inner) * math.sin(math.pi * k / points),
             cy - (r if k % 2 == 0 else r * inner) * math.cos(math.pi * k / points)) for k in range(2 * points)]


def outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon vertices of a shape (None for the circle, drawn as an ellipse)."""
    if shape == "circle":
        return None
    if shape == "square":
        a = 0.85 * r
        return [(cx - a, cy - a), (cx + a, cy - a), (cx + a, cy + a), (cx - a, cy + a)]
    if shape == "triangle":
        y0 = cy + 0.2 * r  # the centroid sits low in an upright triangle: centre the box instead
        return [(cx + r * math.cos(a), y0 + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "star":
        return _star(cx, cy + 0.1 * r, r)
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "cross":
        a, b = r, 0.36 * r
        return [(cx - b, cy - a), (cx + b, cy - a), (cx + b, cy - b), (cx + a, cy - b), (cx + a, cy + b),
                (cx + b, cy + b), (cx + b, cy + a), (cx - b, cy + a), (cx - b, cy + b), (cx - a, cy + b),
                (cx - a, cy - b), (cx - b, cy - b)]
    raise ValueError(f"unknown shape {shape!r}")


def _mask_big(obj: Obj, width: int, height: int) -> PIL.Image.Image:
    """The object's silhouette at SUPERSAMPLE x resolution ('L', 255 inside)."""
    k = SUPERSAMPLE
    mask = PIL.Image.new("L", (width * k, height * k), 0)
    draw = PIL.ImageDraw.Draw(mask)
    poly = outline(obj.shape, obj.cx * k, obj.cy * k, obj.r * k)
    if poly is None:
        draw.ellipse((k * (obj.cx - obj.r), k * (obj.cy - obj.r), k * (obj.cx + obj.r), k * (obj.cy + obj.r)), fill=255)
    else:
        draw.polygon(poly, fill=255)
    return mask


def coverage(obj: Obj, width: int, height: int) -> np.ndarray:
    """[H, W] float in [0, 1]: the fraction of each output pixel the object's shape covers."""
    return np.asarray(_mask_big(obj, width, height).reduce(SUPERSAMPLE), np.float32) / 255.0


def bounding_box(obj: Obj, width: int, height: int) -> Box:
    """(x, y, w, h) of the output pixels the shape touches at all."""
    ys, xs = np.nonzero(coverage(obj, width, height) > 0)
    x0, y0 = int(xs.min()), int(ys.min())
    return x0, y0, int(xs.max()) + 1 - x0, int(ys.max()) + 1 - y0


@functools.cache
def _texture(color: str, material: str, width: int, height: int) -> PIL.Image.Image:
    """The fill of an object (cached: a few colours x materials x image sizes)."""
    k = SUPERSAMPLE
    if material == "solid":
        return PIL.Image.new("RGB", (width * k, height * k), COLORS[color])
    yy, xx = np.mgrid[0:height * k, 0:width * k]
    on = ((xx + yy) // (k * STRIPE_PERIOD // 2)) % 2 == 0  # diagonal stripes, half colour, half white
    pixels = np.where(on[..., None], np.asarray(COLORS[color], np.uint8), np.asarray(STRIPE_COLOR, np.uint8))
    return PIL.Image.fromarray(pixels.astype(np.uint8), "RGB")


def render(scene: Scene) -> PIL.Image.Image:
    """The scene as an RGB image of scene.width x scene.height."""
    w, h, k = scene.width, scene.height, SUPERSAMPLE
    canvas = PIL.Image.new("RGB", (w * k, h * k), scene.background)
    for obj in scene.objects:
        mask = _mask_big(obj, w, h)
        region = mask.getbbox()  # paste only where the shape is: same pixels, a fraction of the work
        if region is None:
            continue
        mask = mask.crop(region)
        canvas.paste(_texture(obj.color, obj.material, w, h).crop(region), region[:2], mask)
        if obj.material != "solid":  # a coloured rim keeps a striped silhouette readable
            rim = PIL.Image.new("L", mask.size, 0)
            draw = PIL.ImageDraw.Draw(rim)
            cx, cy = obj.cx * k - region[0], obj.cy * k - region[1]
            poly = outline(obj.shape, cx, cy, obj.r * k)
            if poly is None:
                draw.ellipse((cx - k * obj.r, cy - k * obj.r, cx + k * obj.r, cy + k * obj.r), outline=255, width=k)
            else:
                draw.polygon(poly, outline=255, width=k)  # 1 output px wide
            rim = PIL.Image.fromarray(np.minimum(np.asarray(rim), np.asarray(mask)))  # stay inside the shape
            canvas.paste(PIL.Image.new("RGB", mask.size, COLORS[obj.color]), region[:2], rim)
    return canvas.reduce(k)


def place(rng: np.random.Generator, specs: list[Obj], width: int = IMAGE_SIZE, height: int = IMAGE_SIZE,
          constraint=None, tries: int = 200) -> list[Obj] | None:
    """Positions for `specs` (shape/colour/material/size set): each object in its own cell of a CELL-px grid
    (as in Sort-of-CLEVR: a 14 px patch of the toy model sees one object whole), its centre up to JITTER px
    off the cell's centre, so large objects reach into the next cells and neighbours may overlap a little
    (each keeping MIN_VISIBLE of its pixels under the ones drawn later). `constraint(objects)` may reject a
    layout. Returns the placed objects (with boxes) or None when no layout was found in `tries`."""
    cols, rows = width // CELL, height // CELL
    for _ in range(tries):
        objs = []
        cells = rng.choice(cols * rows, len(specs), replace=False)
        for s, cell in zip(specs, cells, strict=True):
            r = float(rng.uniform(*RADIUS[s.size]))
            row, col = divmod(int(cell), cols)
            cx = float(np.clip(CELL * (col + 0.5) + rng.uniform(-JITTER, JITTER), r + 0.5, width - r - 0.5))
            cy = float(np.clip(CELL * (row + 0.5) + rng.uniform(-JITTER, JITTER), r + 0.5, height - r - 0.5))
            objs.append(dataclasses.replace(s, cx=round(cx, 2), cy=round(cy, 2), r=round(r, 2)))
        if constraint is not None and not constraint(objs):
            continue
        covers = [coverage(o, width, height) for o in objs]
        above = np.zeros((height, width), np.float32)
        ok = True
        for c in reversed(covers):  # the last drawn object is fully visible
            if (c * (1 - above)).sum() < MIN_VISIBLE * c.sum():
                ok = False
                break
            above = np.maximum(above, c)
        if ok:
            return [dataclasses.replace(o, box=bounding_box(o, width, height)) for o in objs]
    return None


def visible_fraction(scene: Scene, index: int) -> float:
    """Fraction of object `index`'s pixels that no later object covers."""
    w, h = scene.width, scene.height
    c = coverage(scene.objects[index], w, h)
    above = np.zeros_like(c)
    for o in scene.objects[index + 1:]:
        above = np.maximum(above, coverage(o, w, h))
    return float((c * (1 - above)).sum() / c.sum())
