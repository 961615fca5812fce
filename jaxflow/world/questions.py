"""The six GQA task kinds of the study, asked about toy scenes, answered by construction.

Each builder takes a random generator and the answer it must produce (so answers are balanced by
the caller) and returns the scene and one task-file row in the exact column layout of the study's
GQA task files (see `COLUMNS`), or None when the random draw did not fit (the caller retries).

- ChooseAttr: "Is the circle red or blue?" -> an attribute (colour, material, size); box: central object.
- ChooseCat: "What is this, a star or a circle?" (one object) / "Which shape is red, the star or the circle?"
  -> a shape; box: central object.
- ChooseRel: "Is the star to the left or to the right of the square?" -> left / right; boxes: object1 (the
  reference), object2 (the subject).
- CompareAttr: "What do the circle and the star have in common?" -> color / material; boxes: object1, object2.
- LogicalObj: "Is there either a circle or a star that is red?" / "... that is not red?" -> yes / no; boxes:
  object1, object2 (`-` when absent).
- QueryAttr: "On which side of the image is the star?" -> left / right; box: central object.

`answer(row, scene)` asks a row's question of any scene by running the row's GQA program (`operations`); it
gives every gold answer back and decides the answers of the counterfactual images (`counterfactuals.py`).
"""

from __future__ import annotations

import ast
import dataclasses
from collections.abc import Mapping

import numpy as np

from jaxflow.world.scene import (
    ATTRIBUTES,
    COLORS,
    IMAGE_SIZE,
    MATERIALS,
    PLURALS,
    SHAPES,
    SIZES,
    Obj,
    Scene,
    place,
)

TASKS = ("ChooseAttr", "ChooseCat", "ChooseRel", "CompareAttr", "LogicalObj", "QueryAttr")

# The header of each GQA task file, column for column.
COLUMNS = {
    "ChooseAttr": ["question_id", "img_id", "question", "answer", "true option", "false option",
                   "central object name", "central object id", "central object attributes",
                   "central object question attribute", "all objects", "all objects attributes", "type_detailed",
                   "type_semantic", "type_structural", "operations", "operation_1", "operation_2", "captions",
                   "image_w", "image_h", "central object w", "central object h", "central object x",
                   "central object y", "full answer"],
    "ChooseCat": ["question_id", "img_id", "question", "answer", "true option", "false option", "central object name",
                  "central object id", "type_detailed", "type_semantic", "type_structural", "operations", "captions",
                  "image_w", "image_h", "central object w", "central object h", "central object x",
                  "central object y"],
    "ChooseRel": ["question_id", "img_id", "question", "answer", "true option", "false option", "object1 name",
                  "object1 id", "object2 name", "object2 id", "type_detailed", "type_semantic", "type_structural",
                  "operations", "captions", "image_w", "image_h", "object1 w", "object1 h", "object1 x", "object1 y",
                  "object2 w", "object2 h", "object2 x", "object2 y"],
    "CompareAttr": ["question_id", "img_id", "question", "answer", "object1 name", "object1 id", "object2 name",
                    "object2 id", "question word", "type_detailed", "type_semantic", "type_structural", "operations",
                    "captions", "image_w", "image_h", "object1 w", "object1 h", "object1 x", "object1 y", "object2 w",
                    "object2 h", "object2 x", "object2 y"],
    "LogicalObj": ["question_id", "img_id", "question", "answer", "object1 name", "object1 id", "object2 name",
                   "object2 id", "question word", "type_detailed", "type_semantic", "type_structural", "operations",
                   "captions", "image_w", "image_h", "object1 w", "object1 h", "object1 x", "object1 y", "object2 w",
                   "object2 h", "object2 x", "object2 y"],
    "QueryAttr": ["question_id", "img_id", "question", "answer", "central object name", "central object id",
                  "question word", "type_detailed", "type_semantic", "type_structural", "operations", "captions",
                  "image_w", "image_h", "central object w", "central object h", "central object x",
                  "central object y"],
}

# Answers each task cycles through (balanced); ChooseAttr / ChooseCat draw theirs per attribute kind.
BINARY_ANSWERS = {"ChooseRel": ("left", "right"), "CompareAttr": ("color", "material"),
                  "LogicalObj": ("yes", "no"), "QueryAttr": ("left", "right")}
CHOOSE_ATTR_KINDS = ("color", "color", "material", "size")  # cycled
REL_MARGIN = 10.0  # px between the two centres of a left/right pair
SIDE_MARGIN = 0.12  # a queried object's centre is this far (fraction of the width) from the middle
MIN_OBJECTS, MAX_OBJECTS = 2, 4

TEMPLATES = {
    "ChooseAttr": ["Is the {s} {a} or {b}?"],
    "ChooseAttr.color": ["Which color is the {s}, {a} or {b}?"],
    "ChooseCat.this": ["What is this, a {a} or a {b}?", "Which shape is this, a {a} or a {b}?",
                       "Is this a {a} or a {b}?"],
    "ChooseCat.that": ["Which shape is {v}, the {a} or the {b}?"],
    "ChooseRel": ["Is the {s} to the left or to the right of the {o}?",
                  "Is the {s} to the right or to the left of the {o}?"],
    "CompareAttr": ["What do the {a} and the {b} have in common?", "What do both the {a} and the {b} have in common?",
                    "What is common to the {a} and the {b}?"],
    "LogicalObj.or": ["Is there either a {a} or a {b} that is {v}?", "Are there either {pa} or {pb} that are {v}?"],
    "LogicalObj.not": ["Is there any {a} or {b} that is not {v}?", "Are there any {pa} or {pb} that are not {v}?"],
    "QueryAttr": ["On which side of the image is the {s}?", "On which side of the photo is the {s}?",
                  "On which side is the {s}?", "Which side is the {s} on?"],
}


@dataclasses.dataclass(frozen=True)
class Example:
    """One question: its scene and task-file row (every value a string)."""

    task: str
    scene: Scene
    row: dict[str, str]

    @property
    def question(self) -> str:
        return self.row["question"]

    @property
    def answer(self) -> str:
        return self.row["answer"]

    @property
    def boxes(self) -> dict[str, tuple[float, float, float, float]]:
        """The question-related objects, name -> (x, y, w, h): what `Model.sample` takes as boxes."""
        out = {}
        for prefix in ("central object", "object1", "object2"):
            name = self.row.get(f"{prefix} name")
            if name and self.row.get(f"{prefix} x", "-") != "-":
                out[name] = tuple(float(self.row[f"{prefix} {k}"]) for k in "xywh")
        return out

    @property
    def options(self) -> tuple[str, str] | None:
        """(true option, false option) of a Choose question, else None."""
        return (self.row["true option"], self.row["false option"]) if "true option" in self.row else None


def _pick(rng: np.random.Generator, values, exclude=()):
    choices = [v for v in values if v not in exclude]
    return choices[int(rng.integers(len(choices)))]


def _random_obj(rng, shape: str, **fixed) -> Obj:
    attrs = {k: _pick(rng, v) for k, v in ATTRIBUTES.items()}
    return Obj(id="", shape=shape, **(attrs | fixed))


def _build_scene(rng, img_id: str, required: list[Obj], n: int | None = None, constraint=None, max_objects=None,
                 free_shapes: tuple[str, ...] | None = None) -> Scene | None:
    """Required objects plus random distractors of unused shapes (n objects in all), in random drawing order."""
    top = MAX_OBJECTS if max_objects is None else max_objects
    n = max(len(required), int(rng.integers(min(MIN_OBJECTS, top), top + 1)) if n is None else n)
    used = {o.shape for o in required}
    pool = [s for s in (free_shapes if free_shapes is not None else SHAPES) if s not in used]
    extra = [_random_obj(rng, s) for s in rng.permutation(pool)[: n - len(required)].tolist()]
    specs = required + extra
    order = rng.permutation(len(specs)).tolist()
    specs = [dataclasses.replace(specs[i], id=f"{img_id}{k}") for k, i in enumerate(order)]
    placed = place(rng, specs, constraint=constraint)
    if placed is None:
        return None
    bg = tuple(int(np.clip(c + rng.integers(-12, 13), 0, 255)) for c in (205, 205, 205))
    return Scene(img_id, IMAGE_SIZE, IMAGE_SIZE, bg, tuple(placed))


def _describe(o: Obj) -> str:
    return f"a {o.size} {o.color} {o.material} {o.shape}"


def _common(scene: Scene) -> dict[str, str]:
    return {"captions": ". ".join(_describe(o) for o in scene.objects) + ".",
            "image_w": str(scene.width), "image_h": str(scene.height)}


def _box_columns(prefix: str, o: Obj | None) -> dict[str, str]:
    if o is None:
        return {f"{prefix} {k}": "-" for k in "whxy"}
    x, y, w, h = o.box
    return {f"{prefix} w": str(w), f"{prefix} h": str(h), f"{prefix} x": str(x), f"{prefix} y": str(y)}


def _ops(*ops) -> str:
    return repr([{"operation": op, "dependencies": deps, "argument": arg} for op, deps, arg in ops])


def _by_shape(scene: Scene, shape: str) -> Obj:
    obj = scene.find(shape)
    assert obj is not None, shape
    return obj


def choose_attr(rng, img_id: str, kind: str, answer: str, max_objects: int | None = None) -> tuple[Scene, dict] | None:
    shape = _pick(rng, SHAPES)
    false = _pick(rng, ATTRIBUTES[kind], exclude=(answer,))
    scene = _build_scene(rng, img_id, [_random_obj(rng, shape, **{kind: answer})], max_objects=max_objects)
    if scene is None:
        return None
    o = _by_shape(scene, shape)
    a, b = (answer, false) if rng.random() < 0.5 else (false, answer)
    templates = TEMPLATES["ChooseAttr"] + (TEMPLATES["ChooseAttr.color"] if kind == "color" else [])
    question = _pick(rng, templates).format(s=shape, a=a, b=b)
    detailed = {"color": "chooseAttr", "material": "materialChoose", "size": "chooseAttr"}[kind]
    op = f"choose {kind}"
    row = {"question": question, "answer": answer, "true option": answer, "false option": false,
           "central object name": shape, "central object id": o.id,
           "central object attributes": ", ".join(o.attributes()), "central object question attribute": answer,
           "all objects": ", ".join(x.shape for x in scene.objects),
           "all objects attributes": ", ".join(sorted({v for x in scene.objects for v in x.attributes()})),
           "type_detailed": detailed, "type_semantic": "attr", "type_structural": "choose",
           "operations": _ops(("select", [], f"{shape} ({o.id})"), (op, [0], f"{a}|{b}")),
           "operation_1": repr(["select", f"{shape} ({o.id})"]), "operation_2": repr([op, f"{a}|{b}"]),
           **_common(scene), **_box_columns("central object", o), "full answer": f"The {shape} is {answer}."}
    return scene, row


def choose_cat(rng, img_id: str, form: str, answer: str, max_objects: int | None = None) -> tuple[Scene, dict] | None:
    false = _pick(rng, SHAPES, exclude=(answer,))
    a, b = (answer, false) if rng.random() < 0.5 else (false, answer)
    if form == "this":
        scene = _build_scene(rng, img_id, [_random_obj(rng, answer)], n=1)
        if scene is None:
            return None
        question = _pick(rng, TEMPLATES["ChooseCat.this"]).format(a=a, b=b)
        detailed, select = "objThisChoose", "this"
        filt = None
    else:  # "that": the true shape has the attribute value, the false one is absent or lacks it
        kind = _pick(rng, ("color", "color", "material"))
        value = _pick(rng, ATTRIBUTES[kind])
        required = [_random_obj(rng, answer, **{kind: value})]
        if rng.random() < 0.5:
            required.append(_random_obj(rng, false, **{kind: _pick(rng, ATTRIBUTES[kind], exclude=(value,))}))
        free = tuple(s for s in SHAPES if s != false)
        scene = _build_scene(rng, img_id, required, free_shapes=free, max_objects=max_objects)
        if scene is None:
            return None
        question = _pick(rng, TEMPLATES["ChooseCat.that"]).format(v=value, a=a, b=b)
        detailed, select = "categoryThatChoose", "shape"
        filt = (f"filter {kind}", [0], value)
    o = _by_shape(scene, answer)
    ops = [("select", [], f"{select} ({o.id})")] + ([filt] if filt else [])
    ops.append(("choose name", [len(ops) - 1], f"{a}|{b}"))
    row = {"question": question, "answer": answer, "true option": answer, "false option": false,
           "central object name": select, "central object id": o.id, "type_detailed": detailed,
           "type_semantic": "cat", "type_structural": "choose", "operations": _ops(*ops), **_common(scene),
           **_box_columns("central object", o)}
    return scene, row


def choose_rel(rng, img_id: str, answer: str, max_objects: int | None = None) -> tuple[Scene, dict] | None:
    subject, reference = rng.permutation(SHAPES)[:2].tolist()

    def ok(objs):
        s = next(o for o in objs if o.shape == subject)
        r = next(o for o in objs if o.shape == reference)
        dx = s.cx - r.cx
        return abs(dx) >= REL_MARGIN and (dx < 0) == (answer == "left")

    scene = _build_scene(rng, img_id, [_random_obj(rng, subject), _random_obj(rng, reference)], constraint=ok,
                         max_objects=max_objects)
    if scene is None:
        return None
    s, r = _by_shape(scene, subject), _by_shape(scene, reference)
    question = _pick(rng, TEMPLATES["ChooseRel"]).format(s=subject, o=reference)
    first = "left" if question.index("left") < question.index("right") else "right"
    rel = "to the left of|to the right of" if first == "left" else "to the right of|to the left of"
    row = {"question": question, "answer": answer, "true option": answer,
           "false option": "right" if answer == "left" else "left",
           "object1 name": reference, "object1 id": r.id, "object2 name": subject, "object2 id": s.id,
           "type_detailed": "relChooser", "type_semantic": "rel", "type_structural": "choose",
           "operations": _ops(("select", [], f"{reference} ({r.id})"),
                              ("choose rel", [0], f"{subject},{rel},s ({s.id})")),
           **_common(scene), **_box_columns("object1", r), **_box_columns("object2", s)}
    return scene, row


def compare_attr(rng, img_id: str, answer: str, max_objects: int | None = None) -> tuple[Scene, dict] | None:
    a, b = rng.permutation(SHAPES)[:2].tolist()
    color = _pick(rng, tuple(COLORS))
    material = _pick(rng, MATERIALS)
    if answer == "color":  # same colour, different material
        specs = [_random_obj(rng, a, color=color, material=material),
                 _random_obj(rng, b, color=color, material=_pick(rng, MATERIALS, exclude=(material,)))]
    else:  # same material, different colour
        specs = [_random_obj(rng, a, color=color, material=material),
                 _random_obj(rng, b, color=_pick(rng, tuple(COLORS), exclude=(color,)), material=material)]
    scene = _build_scene(rng, img_id, specs, max_objects=max_objects)
    if scene is None:
        return None
    oa, ob = _by_shape(scene, a), _by_shape(scene, b)
    question = _pick(rng, TEMPLATES["CompareAttr"]).format(a=a, b=b)
    row = {"question": question, "answer": answer, "object1 name": a, "object1 id": oa.id, "object2 name": b,
           "object2 id": ob.id, "question word": "common", "type_detailed": "twoCommon", "type_semantic": "attr",
           "type_structural": "compare",
           "operations": _ops(("select", [], f"{a} ({oa.id})"), ("select", [], f"{b} ({ob.id}) "),
                              ("common", [0, 1], "")),
           **_common(scene), **_box_columns("object1", oa), **_box_columns("object2", ob)}
    return scene, row


def logical_obj(rng, img_id: str, negated: bool, answer: str,
                max_objects: int | None = None) -> tuple[Scene, dict] | None:
    """object1 is in the image; object2 is in it half the time. Plain form: does object1 or object2 have the
    value? Negated form: does object1 or object2 lack it?"""
    s1, s2 = rng.permutation(SHAPES)[:2].tolist()
    kind = _pick(rng, ("color", "color", "material"))
    value = _pick(rng, ATTRIBUTES[kind])
    present2 = rng.random() < 0.5
    n_present = 1 + present2
    # has[i]: does present object i have the value? Want any(has) (plain) or any(not has) (negated) == yes.
    yes = answer == "yes"
    if negated:
        lacks = [bool(rng.random() < 0.5) for _ in range(n_present)] if yes else [False] * n_present
        if yes and not any(lacks):
            lacks[int(rng.integers(n_present))] = True
        has = [not x for x in lacks]
    else:
        has = [bool(rng.random() < 0.5) for _ in range(n_present)] if yes else [False] * n_present
        if yes and not any(has):
            has[int(rng.integers(n_present))] = True
    specs = []
    for shape, h in zip((s1, s2)[:n_present], has, strict=True):
        v = value if h else _pick(rng, ATTRIBUTES[kind], exclude=(value,))
        specs.append(_random_obj(rng, shape, **{kind: v}))
    free = tuple(s for s in SHAPES if present2 or s != s2)
    scene = _build_scene(rng, img_id, specs, free_shapes=free, max_objects=max_objects)
    if scene is None:
        return None
    o1, o2 = _by_shape(scene, s1), scene.find(s2)
    a, b = (s1, s2) if rng.random() < 0.5 else (s2, s1)
    key = "LogicalObj.not" if negated else "LogicalObj.or"
    question = _pick(rng, TEMPLATES[key]).format(a=a, b=b, pa=PLURALS[a], pb=PLURALS[b], v=value)
    arg = f"not({value})" if negated else value
    id2 = o2.id if o2 is not None else "-"
    row = {"question": question, "answer": answer, "object1 name": s1, "object1 id": o1.id, "object2 name": s2,
           "object2 id": id2, "question word": "common", "type_detailed": "existThatOrC" if negated else "existThatOr",
           "type_semantic": "obj", "type_structural": "logical",
           "operations": _ops(("select", [], f"{s1} ({o1.id})"), (f"filter {kind}", [0], arg), ("exist", [1], "?"),
                              ("select", [], f"{s2} ({id2}) "), (f"filter {kind}", [3], arg), ("exist", [4], "?"),
                              ("or", [2, 5], "")),
           **_common(scene), **_box_columns("object1", o1), **_box_columns("object2", o2)}
    return scene, row


def query_attr(rng, img_id: str, answer: str, max_objects: int | None = None) -> tuple[Scene, dict] | None:
    shape = _pick(rng, SHAPES)

    def ok(objs):
        o = next(o for o in objs if o.shape == shape)
        off = o.cx / IMAGE_SIZE - 0.5
        return abs(off) >= SIDE_MARGIN and (off < 0) == (answer == "left")

    scene = _build_scene(rng, img_id, [_random_obj(rng, shape)], constraint=ok, max_objects=max_objects)
    if scene is None:
        return None
    o = _by_shape(scene, shape)
    question = _pick(rng, TEMPLATES["QueryAttr"]).format(s=shape)
    row = {"question": question, "answer": answer, "central object name": shape, "central object id": o.id,
           "question word": "common", "type_detailed": "positionQuery", "type_semantic": "attr",
           "type_structural": "query",
           "operations": _ops(("select", [], f"{shape} ({o.id})"), ("query", [0], "hposition")),
           **_common(scene), **_box_columns("central object", o)}
    return scene, row


def make_example(task: str, rng: np.random.Generator, index: int, question_id: str, img_id: str,
                 max_objects: int | None = None) -> Example:
    """The `index`-th question of `task`: answers and question forms cycle with `index` so a set is balanced."""
    for _ in range(100):
        if task == "ChooseAttr":
            kind = CHOOSE_ATTR_KINDS[index % len(CHOOSE_ATTR_KINDS)]
            out = choose_attr(rng, img_id, kind, _pick(rng, ATTRIBUTES[kind]), max_objects=max_objects)
        elif task == "ChooseCat":
            out = choose_cat(rng, img_id, ("this", "that")[index % 2], _pick(rng, SHAPES), max_objects=max_objects)
        elif task == "ChooseRel":
            out = choose_rel(rng, img_id, BINARY_ANSWERS[task][index % 2], max_objects=max_objects)
        elif task == "CompareAttr":
            out = compare_attr(rng, img_id, BINARY_ANSWERS[task][index % 2], max_objects=max_objects)
        elif task == "LogicalObj":
            out = logical_obj(rng, img_id, negated=bool((index // 2) % 2), answer=BINARY_ANSWERS[task][index % 2],
                              max_objects=max_objects)
        elif task == "QueryAttr":
            out = query_attr(rng, img_id, BINARY_ANSWERS[task][index % 2], max_objects=max_objects)
        else:
            raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
        if out is not None:
            scene, row = out
            full = {"question_id": question_id, "img_id": img_id, **row}
            missing = [c for c in COLUMNS[task] if c not in full]
            if missing or set(full) - set(COLUMNS[task]):
                raise AssertionError(f"{task}: row columns differ from the header: {missing}")
            return Example(task, scene, {c: full[c] for c in COLUMNS[task]})
    raise RuntimeError(f"{task}: no scene fits after 100 draws")


def kind_of(value: str) -> str:
    """The attribute kind ("color", "material", "size") a value belongs to (no value is in two kinds)."""
    return next(kind for kind, values in ATTRIBUTES.items() if value in values)


def _name(argument: str) -> str:
    """The object name of a select argument: "star (100000030)" -> "star"."""
    return argument.split(" (")[0].strip()


def program(row: Mapping[str, str]) -> list[dict]:
    """The row's GQA program: steps {"operation", "dependencies", "argument"}."""
    return ast.literal_eval(row["operations"])


def answer(row: Mapping[str, str], scene: Scene) -> str | None:
    """The answer to the row's question about `scene`, found by running the row's GQA program (`operations`)
    on the scene's objects, or None where the scene leaves the question open: a choice with neither or both
    options true, a relation or a side within its margin (`REL_MARGIN`, `SIDE_MARGIN`), two objects sharing no
    or both compared attributes, a name that picks out no single object. Objects are selected by name (their
    ids in the program are ignored), so the question can be asked of any scene."""
    results = []  # one per step: a list of objects, a bool or an answer word
    for step in program(row):
        op, arg = step["operation"], step["argument"]
        inputs = [results[d] for d in step["dependencies"]]
        if op == "select":
            name = _name(arg)
            result = list(scene.objects) if name in ("this", "shape") else [o for o in scene.objects
                                                                           if o.shape == name]
        elif op.startswith("filter "):
            kind, negated = op.split()[1], arg.startswith("not(")
            value = arg[4:-1] if negated else arg
            result = [o for o in inputs[0] if (o.attr(kind) == value) != negated]
        elif op == "exist":
            result = bool(inputs[0])
        elif op == "or":
            result = any(inputs)
        elif op == "choose name":
            hits = [v for v in arg.split("|") if any(o.shape == v for o in inputs[0])]
            result = hits[0] if len(hits) == 1 else None
        elif op.startswith("choose ") and op.split()[1] in ATTRIBUTES:
            kind = op.split()[1]
            hits = [v for v in arg.split("|") if len(inputs[0]) == 1 and inputs[0][0].attr(kind) == v]
            result = hits[0] if len(hits) == 1 else None
        elif op == "choose rel":  # argument "subject,to the left of|to the right of,s (id)"
            subjects = [o for o in scene.objects if o.shape == arg.split(",")[0]]
            if len(subjects) != 1 or len(inputs[0]) != 1:
                return None
            dx = subjects[0].cx - inputs[0][0].cx
            result = None if abs(dx) < REL_MARGIN else "left" if dx < 0 else "right"
        elif op == "common":
            if any(len(objs) != 1 for objs in inputs):
                return None
            (a,), (b,) = inputs
            shared = [k for k in ("color", "material") if a.attr(k) == b.attr(k)]
            result = shared[0] if len(shared) == 1 else None
        elif op == "query" and arg == "hposition":
            if len(inputs[0]) != 1:
                return None
            off = inputs[0][0].cx / scene.width - 0.5
            result = None if abs(off) < SIDE_MARGIN else "left" if off < 0 else "right"
        else:
            raise ValueError(f"question {row.get('question_id', '?')}: unknown operation {op!r}")
        if result is None:
            return None
        results.append(result)
    final = results[-1]
    return ("yes" if final else "no") if isinstance(final, bool) else final


def caption(scene: Scene) -> str:
    """Every object, left to right, shape first: "The circle is large, red and striped. The star is small, blue
    and solid." (the text of LLaVA's first training stage, which aligns image features with words)."""
    objs = sorted(scene.objects, key=lambda o: (o.box[0] + o.box[2] / 2, o.box[1]))
    return " ".join(f"The {o.shape} is {o.size}, {o.color} and {o.material}." for o in objs)


def vocabulary_lines() -> list[str]:
    """Every question wording with every word the world can put in it (for building the tokenizer)."""
    words = list(SHAPES) + list(PLURALS.values()) + list(COLORS) + list(MATERIALS) + list(SIZES)
    words += ["left", "right", "yes", "no", "color", "material", "this", "shape"]
    lines = [" ".join(words)]
    for templates in TEMPLATES.values():
        for t in templates:
            lines.append(t.format(s="circle", o="square", a="star", b="cross", pa="stars", pb="crosses", v="red"))
    lines.append("The circle is large, red and striped. The star is small, blue and solid.")
    return lines
