"""Counterfactual images: for a question, the same scene with only what the question asks about changed so
that its answer changes (the semantic image pairs of causal tracing with semantic corruption, NOTICE).

The counterfactual keeps the image size, the background, every object's id and the drawing order; each
task changes the fewest objects it can, all of them question objects:
- ChooseAttr: the central object takes the false option. Colour and material keep its box; a size change
  draws a radius of the other size around the same centre (moved inward where it would leave the image), so
  its box grows or shrinks.
- ChooseCat: the answer object takes the false option's shape and an object of that shape, if any, takes the
  answer's shape; centres and radii stay, the boxes follow the new outlines (a few pixels). Where a new
  outline would hide too much of a neighbour, other radii of the same size are drawn.
- ChooseRel: the two objects swap centres (each moved inward where it would leave the image): each keeps its
  look, the two boxes trade places (the same two boxes when the objects share shape and radius). Where that
  hides too much of an object or brings the centres closer than `REL_MARGIN`, the subject alone moves by
  whole pixels (its box keeps its size) to the reference's other side, nearest to its mirror image first.
- CompareAttr: one of the two objects takes the other's value of the attribute they did not share and a new
  value of the one they shared (boxes kept).
- LogicalObj: "yes" -> every question object that made it true gets a value that does not; "no" -> one
  question object gets a value that makes it true (boxes kept).
- QueryAttr: the object moves by whole pixels (its box keeps its size) to the other side: to its mirror
  position, or where that hides too much of an object, the nearest position that does not.
The new answer is what `questions.answer` finds by running the question's program on the new scene, and a
change is accepted only where that answer differs from the gold one and every object stays visible
(`MIN_VISIBLE`) and inside the image. Random choices are seeded by the question id.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator

import numpy as np

from jaxflow.world.questions import (
    ATTRIBUTES,
    REL_MARGIN,
    SIDE_MARGIN,
    Example,
    answer,
    kind_of,
    program,
)
from jaxflow.world.scene import MIN_VISIBLE, RADIUS, Obj, Scene, bounding_box, coverage

RADIUS_TRIES = 20  # radii drawn for a size or shape change before giving up

Changes = dict[str, Obj]  # object id -> the object as changed


def counterfactual_id(img_id: str) -> str:
    """The image id of a question's counterfactual image (`<images>/<id>.jpg`, like img_id)."""
    return f"{img_id}cf"


def counterfactual(example: Example, rng: np.random.Generator | None = None) -> tuple[Scene, str]:
    """(the counterfactual scene, its answer) of a task-file question; `rng` defaults to one seeded by the
    question id, so the same question always gets the same counterfactual. Raises RuntimeError, naming the
    question, where no change the task tries fits (none did for the 60,000 questions of seeds 0-99)."""
    qid = example.row["question_id"]
    rng = np.random.default_rng(list(qid.encode())) if rng is None else rng
    scene = example.scene
    for changes in EDITS[example.task](example.row, scene, rng):
        if not all(_in_image(scene, o) for o in changes.values()):
            continue
        reshaped = {o.id for o in scene.objects if o.id in changes and _outline(changes[o.id]) != _outline(o)}
        objects = tuple(changes.get(o.id, o) for o in scene.objects)
        objects = tuple(dataclasses.replace(o, box=bounding_box(o, scene.width, scene.height)) if o.id in reshaped
                        else o for o in objects)  # boxes measured again where outlines changed
        changed = dataclasses.replace(scene, img_id=counterfactual_id(scene.img_id), objects=objects)
        new = answer(example.row, changed)
        # a new colour or material hides nothing more: only new outlines need the visibility check
        if new is not None and new != example.answer and (not reshaped or _visible(changed)):
            return changed, new
    raise RuntimeError(f"{example.task} question {qid}: no change gives another answer with every object inside "
                       f"the image and visible")


def _outline(obj: Obj) -> tuple:
    """What decides the pixels an object covers (and so its box)."""
    return obj.shape, obj.cx, obj.cy, obj.r


_coverage = functools.lru_cache(maxsize=64)(coverage)  # a search moves one object: the others' are reused


def _in_image(scene: Scene, obj: Obj) -> bool:
    """Whether the object lies inside the image with half a pixel to spare, as `place` puts it (up to the
    rounding of centres and radii to 0.01 px)."""
    margin = obj.r + 0.5 - 0.01
    return margin <= obj.cx <= scene.width - margin and margin <= obj.cy <= scene.height - margin


def _visible(scene: Scene) -> bool:
    """Every object keeps MIN_VISIBLE of its pixels (up to float32 rounding, as `place` checked it)."""
    above = np.zeros((scene.height, scene.width), np.float32)  # [H, W] cover of the objects drawn later
    for obj in reversed(scene.objects):
        cover = _coverage(obj, scene.width, scene.height)
        if (cover * (1 - above)).sum() < (MIN_VISIBLE - 1e-6) * cover.sum():
            return False
        above = np.maximum(above, cover)
    return True


def _centred_at(scene: Scene, obj: Obj, cx: float, cy: float) -> Obj:
    """obj centred at (cx, cy), moved inward as far as it needs to lie inside the image."""
    cx = float(np.clip(cx, obj.r + 0.5, scene.width - obj.r - 0.5))
    cy = float(np.clip(cy, obj.r + 0.5, scene.height - obj.r - 0.5))
    return dataclasses.replace(obj, cx=round(cx, 2), cy=round(cy, 2))


def _by_id(scene: Scene, obj_id: str) -> Obj | None:
    return next((o for o in scene.objects if o.id == obj_id), None)


def _filter(row: dict[str, str]) -> tuple[str, str, bool]:
    """(kind, value, negated) of the question's filter: "filter color" with "red" or "not(red)"."""
    step = next(s for s in program(row) if s["operation"].startswith("filter "))
    arg = step["argument"]
    negated = arg.startswith("not(")
    return step["operation"].split()[1], arg[4:-1] if negated else arg, negated


def _other(rng, kind: str, value: str) -> str:
    """A random value of the attribute `kind` other than `value`."""
    values = [v for v in ATTRIBUTES[kind] if v != value]
    return values[int(rng.integers(len(values)))]


def _resized(scene: Scene, obj: Obj, rng, size: str | None = None) -> Obj:
    """obj with a new radius drawn for `size` (default: its own), about the same centre where it fits."""
    size = obj.size if size is None else size
    resized = dataclasses.replace(obj, size=size, r=round(float(rng.uniform(*RADIUS[size])), 2))
    return _centred_at(scene, resized, obj.cx, obj.cy)


def _choose_attr(row, scene: Scene, rng) -> Iterator[Changes]:
    obj = _by_id(scene, row["central object id"])
    value = row["false option"]
    kind = kind_of(value)
    if kind != "size":
        yield {obj.id: dataclasses.replace(obj, **{kind: value})}
        return
    for _ in range(RADIUS_TRIES):
        yield {obj.id: _resized(scene, obj, rng, value)}


def _choose_cat(row, scene: Scene, rng) -> Iterator[Changes]:
    obj = _by_id(scene, row["central object id"])
    other = scene.find(row["false option"])  # takes the answer's shape, if present
    changes = {obj.id: dataclasses.replace(obj, shape=row["false option"])}
    if other is not None:
        changes[other.id] = dataclasses.replace(other, shape=obj.shape)
    yield changes
    for _ in range(RADIUS_TRIES):  # a new outline may hide a neighbour: other radii of the same sizes
        yield {k: _resized(scene, o, rng) for k, o in changes.items()}


def _moves(scene: Scene, obj: Obj, dx: float, accept) -> Iterator[Obj]:
    """obj moved by whole pixels (so its box keeps its size) to every position inside the image where
    `accept(moved)` holds, nearest to (obj.cx + dx, obj.cy) first."""
    margin = obj.r + 0.5
    steps_x = np.arange(math.ceil(margin - obj.cx), math.floor(scene.width - margin - obj.cx) + 1)
    steps_y = np.arange(math.ceil(margin - obj.cy), math.floor(scene.height - margin - obj.cy) + 1)
    steps_x, steps_y = (s.ravel() for s in np.meshgrid(steps_x, steps_y, indexing="ij"))  # [S] each
    order = np.lexsort((steps_y, steps_x, (steps_x - dx) ** 2 + steps_y ** 2))  # nearest first, ties by step
    for i, j in zip(steps_x[order].tolist(), steps_y[order].tolist(), strict=True):
        moved = dataclasses.replace(obj, cx=round(obj.cx + i, 2), cy=round(obj.cy + j, 2))
        if accept(moved):
            yield moved


def _choose_rel(row, scene: Scene, rng) -> Iterator[Changes]:
    reference, subject = _by_id(scene, row["object1 id"]), _by_id(scene, row["object2 id"])
    yield {subject.id: _centred_at(scene, subject, reference.cx, reference.cy),
           reference.id: _centred_at(scene, reference, subject.cx, subject.cy)}
    left = subject.cx < reference.cx
    for moved in _moves(scene, subject, 2 * (reference.cx - subject.cx),
                        lambda o: abs(o.cx - reference.cx) >= REL_MARGIN and (o.cx < reference.cx) != left):
        yield {subject.id: moved}


def _compare_attr(row, scene: Scene, rng) -> Iterator[Changes]:
    objs = [_by_id(scene, row["object1 id"]), _by_id(scene, row["object2 id"])]
    shared = row["answer"]
    unshared = "material" if shared == "color" else "color"
    k = int(rng.integers(2))  # the object that changes
    obj, other = objs[k], objs[1 - k]
    new = {unshared: other.attr(unshared), shared: _other(rng, shared, obj.attr(shared))}
    yield {obj.id: dataclasses.replace(obj, **new)}


def _logical_obj(row, scene: Scene, rng) -> Iterator[Changes]:
    kind, value, negated = _filter(row)
    present = [o for o in (_by_id(scene, row["object1 id"]), _by_id(scene, row["object2 id"])) if o is not None]
    if row["answer"] == "yes":  # every object that passes the filter stops passing it
        yield {o.id: dataclasses.replace(o, **{kind: value if negated else _other(rng, kind, value)})
               for o in present if (o.attr(kind) == value) != negated}
    else:  # one object starts passing it
        o = present[int(rng.integers(len(present)))]
        yield {o.id: dataclasses.replace(o, **{kind: _other(rng, kind, value) if negated else value})}


def _query_attr(row, scene: Scene, rng) -> Iterator[Changes]:
    obj = _by_id(scene, row["central object id"])
    left = obj.cx < scene.width / 2
    for moved in _moves(scene, obj, scene.width - 2 * obj.cx,
                        lambda o: abs(o.cx / scene.width - 0.5) >= SIDE_MARGIN and (o.cx < scene.width / 2) != left):
        yield {obj.id: moved}


EDITS = {"ChooseAttr": _choose_attr, "ChooseCat": _choose_cat, "ChooseRel": _choose_rel,
         "CompareAttr": _compare_attr, "LogicalObj": _logical_obj, "QueryAttr": _query_attr}
