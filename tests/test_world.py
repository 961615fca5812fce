"""The toy world: boxes match the drawn pixels, answers are right (recomputed here from the scene
description, independently of the generator's logic), task files load like the study's GQA files and
their questions map onto whole tokens of the toy tokenizer."""

import collections
import csv
import dataclasses
import os
import re

import numpy as np
import pytest
from PIL import Image

from jaxflow.config import ModelConfig
from jaxflow.inputs import gqa
from jaxflow.inputs.regions import build_sample
from jaxflow.world import TASKS, counterfactual, examples, generate, image_of, load_scenes, render
from jaxflow.world.generate import COUNTERFACTUAL_COLUMNS, verify_examples
from jaxflow.world.questions import answer
from jaxflow.world.scene import (
    COLORS,
    MIN_VISIBLE,
    PLURALS,
    RADIUS,
    SHAPES,
    bounding_box,
    coverage,
    visible_fraction,
)
from jaxflow.world.tokenizer import build_tokenizer

GQA = str(gqa.TASK_DIR)
SINGULAR = {p: s for s, p in PLURALS.items()}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy-gqa")
    paths = generate(out, n_per_task=24, seed=3)
    return out, paths, load_scenes(out)


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


def _center_x(obj) -> float:
    x, _, w, _ = obj["box"]
    return x + w / 2


def _obj(scene, shape):
    found = [o for o in scene["objects"] if o["shape"] == shape]
    assert len(found) <= 1, f"two {shape}s in {scene['img_id']}"
    return found[0] if found else None


def _kind(value: str) -> str:
    return "color" if value in COLORS else "material" if value in ("solid", "striped") else "size"


def recompute(task: str, question: str, scene: dict) -> str:
    """The answer from the scene description alone (the generator's code is not used)."""
    if task == "ChooseAttr":
        m = re.fullmatch(r"(?:Is|Which color is) the (\w+),? (\w+) or (\w+)\?", question)
        o = _obj(scene, m[1])
        hits = [v for v in (m[2], m[3]) if o[_kind(v)] == v]
        assert len(hits) == 1, question
        return hits[0]
    if task == "ChooseCat":
        m = re.fullmatch(r"(?:What is this|Which shape is this|Is this),? a (\w+) or a (\w+)\?", question)
        if m:
            assert len(scene["objects"]) == 1
            shape = scene["objects"][0]["shape"]
            assert shape in (m[1], m[2])
            return shape
        m = re.fullmatch(r"Which shape is (\w+), the (\w+) or the (\w+)\?", question)
        hits = [s for s in (m[2], m[3]) if (o := _obj(scene, s)) is not None and o[_kind(m[1])] == m[1]]
        assert len(hits) == 1, question
        return hits[0]
    if task == "ChooseRel":
        m = re.fullmatch(r"Is the (\w+) to the (?:left|right) or to the (?:left|right) of the (\w+)\?", question)
        dx = _center_x(_obj(scene, m[1])) - _center_x(_obj(scene, m[2]))
        assert abs(dx) >= 5
        return "left" if dx < 0 else "right"
    if task == "CompareAttr":
        m = re.fullmatch(r"What (?:do|do both|is common to) the (\w+) and the (\w+)(?: have in common)?\?", question)
        a, b = _obj(scene, m[1]), _obj(scene, m[2])
        shared = [k for k in ("color", "material") if a[k] == b[k]]
        assert len(shared) == 1, question
        return shared[0]
    if task == "LogicalObj":
        m = (re.fullmatch(r"Is there (?:either|any) a? ?(\w+) or a? ?(\w+) that is (not )?(\w+)\?", question)
             or re.fullmatch(r"Are there (?:either|any) (\w+) or (\w+) that are (not )?(\w+)\?", question))
        shapes = [SINGULAR.get(s, s) for s in (m[1], m[2])]
        assert all(s in SHAPES for s in shapes), question
        value, negated = m[4], m[3] is not None
        objs = [o for s in shapes if (o := _obj(scene, s)) is not None]
        has = [o[_kind(value)] == value for o in objs]
        return "yes" if any((not h) if negated else h for h in has) else "no"
    if task == "QueryAttr":
        m = (re.fullmatch(r"On which side (?:of the (?:image|photo) )?is the (\w+)\?", question)
             or re.fullmatch(r"Which side is the (\w+) on\?", question))
        cx = _center_x(_obj(scene, m[1]))
        assert abs(cx - scene["width"] / 2) >= 5
        return "left" if cx < scene["width"] / 2 else "right"
    raise AssertionError(task)


def test_answers_correct_by_recomputation_and_balanced(dataset):
    out, paths, _ = dataset
    import json

    with open(os.path.join(out, "scenes.json")) as f:
        scenes = json.load(f)
    for task, path in paths.items():
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == 24
        for row in rows:
            assert recompute(task, row["question"], scenes[row["img_id"]]) == row["answer"], row["question"]
        counts = collections.Counter(r["answer"] for r in rows)
        if task in ("ChooseRel", "CompareAttr", "LogicalObj", "QueryAttr"):
            assert len(counts) == 2 and len(set(counts.values())) == 1, (task, counts)
        if "true option" in rows[0]:  # the true option comes first half of the time, roughly
            first = sum(r["question"].index(r["true option"]) < r["question"].index(r["false option"]) for r in rows)
            assert 4 <= first <= 20, (task, first)


def test_verify_questions_correct_and_balanced():
    items = verify_examples(60, 5)
    truths, kinds = [], collections.Counter()
    for ex in items:
        m = re.fullmatch(r"Is the (\w+) (\w+)\?", ex.question)
        (obj,) = [o for o in ex.scene.objects if o.shape == m[1]]
        kinds[_kind(m[2])] += 1
        truths.append(getattr(obj, _kind(m[2])) == m[2])
        assert ex.answer == ("yes" if truths[-1] else "no"), ex.question
    assert 20 <= sum(truths) <= 40 and set(kinds) == {"color", "material", "size"}
    assert {ex.task for ex in items} == {"LogicalObj"}
    assert [ex.question for ex in verify_examples(60, 5)] == [ex.question for ex in items]


def test_boxes_match_drawn_pixels(dataset):
    """Every object's colour fills part of its box and appears nowhere outside it (objects whose colour is
    unique in the scene; 2 px of JPEG blur allowed)."""
    _, _, scenes = dataset
    checked = 0
    for scene in list(scenes.values())[::3]:
        assert all(visible_fraction(scene, i) >= MIN_VISIBLE - 1e-6 for i in range(len(scene.objects)))
        pixels = np.asarray(image_of(scene), np.float32)
        colors = collections.Counter(o.color for o in scene.objects)
        for k, obj in enumerate(scene.objects):
            if colors[obj.color] > 1:
                continue
            near = np.linalg.norm(pixels - np.asarray(COLORS[obj.color], np.float32), axis=-1) < 60
            x, y, w, h = obj.box
            inside = near[y:y + h, x:x + w].sum()
            grown = np.zeros_like(near)
            grown[max(y - 2, 0):y + h + 2, max(x - 2, 0):x + w + 2] = True
            # the shape's own area (independent of the box), about half of it coloured when striped
            area = coverage(obj, scene.width, scene.height).sum() * visible_fraction(scene, k)
            expected = area * (0.4 if obj.material == "striped" else 1.0)
            assert inside > 0.5 * expected, (scene.img_id, obj, inside, expected)
            assert near[~grown].sum() == 0, (scene.img_id, obj, int(near[~grown].sum()))
            checked += 1
    assert checked > 50


def test_same_seed_same_data():
    a, b, c = examples(3, 11), examples(3, 11), examples(3, 12)
    assert [e.row for e in a] == [e.row for e in b]
    assert [e.row for e in a] != [e.row for e in c]
    assert np.array_equal(np.asarray(image_of(a[0])), np.asarray(image_of(b[0])))


def test_task_files_load_and_questions_tokenize(dataset, tokenizer):
    out, paths, _ = dataset
    from jaxflow.world.train import hf_config

    cfg = ModelConfig.from_hf(hf_config(tokenizer))
    image_dir = os.path.join(out, "images")
    for task in TASKS:
        path = paths[task]
        with open(os.path.join(GQA, f"{task}.csv"), newline="") as f, open(path, newline="") as g:
            # the very header of the study's file, then the counterfactual's columns
            assert next(csv.reader(g)) == next(csv.reader(f)) + COUNTERFACTUAL_COLUMNS
        samples, errors = gqa.load_tasks(path, image_dir)
        assert errors == [] and len(samples) == 24
        assert all(s.question_id.startswith("0") for s in samples)  # read as strings
        for s in samples[:8]:
            with open(s.image_path, "rb") as f:
                image = Image.open(f).convert("RGB")
            sample = build_sample(cfg, tokenizer, image, s.question, boxes=s.boxes,
                                  option_spans=(s.true_option_span, s.false_option_span))
            assert gqa.token_error(s, sample.prompt, sample.encoded) is None
            question = tokenizer.decode(sample.input_ids[sample.regions["question"]])
            assert question == s.question, (question, s.question)
            assert len(sample.regions["related_image_patches"]) > 0
            assert len(sample.regions["image"]) == cfg.features_per_crop
            for option in ("true_option", "false_option"):
                if option in sample.regions:
                    assert tokenizer.decode(sample.input_ids[sample.regions[option]]) == \
                        getattr(s, option).strip()
            # the answer is one piece that decodes to the answer, so greedy decoding can produce it
            ids = tokenizer.encode(s.answer, add_special_tokens=False)
            assert len(ids) == 1 and tokenizer.decode(ids) == s.answer
            full = tokenizer(sample.prompt.text + " " + s.answer)["input_ids"]
            assert full[-1] == ids[0]


def test_caption_lists_every_object_left_to_right():
    from jaxflow.world.questions import caption

    for ex in examples(2, 8):
        text = caption(ex.scene)
        named = re.findall(r"The (\w+) is (\w+), (\w+) and (\w+)\.", text)
        objs = sorted(ex.scene.objects, key=lambda o: o.box[0] + o.box[2] / 2)
        assert named == [(o.shape, o.size, o.color, o.material) for o in objs] or \
            sorted(named) == sorted((o.shape, o.size, o.color, o.material) for o in objs)


def _task_rows(paths) -> dict[str, list[dict]]:
    out = {}
    for task, path in paths.items():
        with open(path, newline="") as f:
            out[task] = list(csv.DictReader(f))
    return out


def _question_ids(row, scene) -> set[str]:
    """Ids of the objects the question names: its box columns' objects and, for ChooseCat, both options."""
    ids = {row[f"{p} id"] for p in ("central object", "object1", "object2") if f"{p} id" in row}
    options = (row.get("true option"), row.get("false option"))
    return ids | {o.id for o in scene.objects if o.shape in options}


def test_counterfactuals_change_the_answer_and_only_question_objects(dataset):
    """Every question's counterfactual: same image size, background, object ids and drawing order; its answer,
    recomputed from its scene description alone, is `counterfactual_answer` and not the gold answer; only
    objects the question names change, and their boxes as counterfactuals.py says for each task."""
    out, paths, scenes = dataset
    largest_step = max(r[1] for r in RADIUS.values()) - min(r[0] for r in RADIUS.values())  # inward move, px
    for task, rows in _task_rows(paths).items():
        for row in rows:
            before, after = scenes[row["img_id"]], scenes[row["counterfactual_image"]]
            assert after.img_id != before.img_id
            with Image.open(os.path.join(out, "images", after.img_id + ".jpg")) as im:
                assert im.size == (int(row["image_w"]), int(row["image_h"])) == (after.width, after.height)
            assert after.background == before.background
            assert [o.id for o in after.objects] == [o.id for o in before.objects]
            assert all(visible_fraction(after, i) >= MIN_VISIBLE - 1e-6 for i in range(len(after.objects)))
            assert recompute(task, row["question"], after.to_dict()) == row["counterfactual_answer"] != row["answer"]
            pairs = {a.id: (a, b) for a, b in zip(before.objects, after.objects, strict=True) if a != b}
            assert pairs and set(pairs) <= _question_ids(row, before), (task, row["question"])
            for a, b in pairs.values():
                if task == "ChooseAttr" and row["answer"] in RADIUS:  # size: a new radius, centre kept if it fits
                    assert b.size == row["counterfactual_answer"] and RADIUS[b.size][0] <= b.r <= RADIUS[b.size][1]
                    assert abs(b.cx - a.cx) <= largest_step and abs(b.cy - a.cy) <= largest_step
                elif task == "ChooseCat":  # a new shape around the same centre
                    assert b.shape != a.shape and (b.cx, b.cy, b.size) == (a.cx, a.cy, a.size)
                elif task == "ChooseRel":  # the two objects trade centres
                    (c,) = [before_obj for k, (before_obj, _) in pairs.items() if k != a.id]
                    assert abs(b.cx - c.cx) <= largest_step and abs(b.cy - c.cy) <= largest_step
                    assert (b.shape, b.r) == (a.shape, a.r)
                elif task == "QueryAttr":  # moved by whole pixels
                    steps = (b.cx - a.cx, b.cy - a.cy)
                    assert b.box[2:] == a.box[2:] and all(abs(d - round(d)) < 1e-6 for d in steps)
                else:
                    assert b.box == a.box, (task, row["question"], a, b)


def test_counterfactual_pixels_change_only_inside_the_changed_boxes(dataset):
    """Rendered, a counterfactual equals its original exactly outside the old and new boxes of the changed
    objects (a box holds every pixel its shape touches). Stored as JPEG, every 8x8 block those boxes do not
    touch decodes to the same pixels (JPEG codes blocks independently; no chroma subsampling here); in the
    touched blocks, outside the boxes, only ringing of the quantised edges differs (at quality 95, measured
    at most 8 grey levels on average over a block's pixels, 31 at worst; bounds 12 and 48)."""
    out, paths, scenes = dataset
    for rows in _task_rows(paths).values():
        for row in rows:
            before, after = scenes[row["img_id"]], scenes[row["counterfactual_image"]]
            boxes = np.zeros((before.height, before.width), bool)
            blocks = np.zeros_like(boxes)
            for a, b in zip(before.objects, after.objects, strict=True):
                for x, y, w, h in ({a.box, b.box} if a != b else ()):
                    boxes[y:y + h, x:x + w] = True
                    blocks[y // 8 * 8:-(-(y + h) // 8) * 8, x // 8 * 8:-(-(x + w) // 8) * 8] = True
            drawn = np.abs(np.asarray(render(after), np.int16) - np.asarray(render(before), np.int16)).max(-1)
            assert drawn[~boxes].max() == 0 and drawn[boxes].max() > 60, row["question"]
            stored = [np.asarray(Image.open(os.path.join(out, "images", f"{i}.jpg")), np.int16)
                      for i in (row["img_id"], row["counterfactual_image"])]
            assert np.array_equal(stored[1], np.asarray(image_of(after), np.int16))  # the file shows its scene
            noise = np.abs(stored[1] - stored[0]).max(-1)
            assert noise[~blocks].max() == 0 and noise[boxes].max() > 60
            ringing = noise[blocks & ~boxes]
            assert ringing.size == 0 or (ringing.mean() <= 12 and ringing.max() <= 48), row["question"]


def test_answer_reruns_the_question_program():
    """questions.answer gives every gold answer and None where the scene leaves the question open."""
    items = examples(10, 21)
    assert all(answer(ex.row, ex.scene) == ex.answer for ex in items)
    for ex in items:
        if ex.task in ("ChooseRel", "QueryAttr"):  # the asked object put on the reference / the middle
            asked = ex.row["object2 id" if ex.task == "ChooseRel" else "central object id"]
            cx = _by_id(ex.scene, ex.row["object1 id"]).cx if ex.task == "ChooseRel" else ex.scene.width / 2
            objects = tuple(dataclasses.replace(o, cx=cx) if o.id == asked else o for o in ex.scene.objects)
            assert answer(ex.row, dataclasses.replace(ex.scene, objects=objects)) is None


def _by_id(scene, obj_id):
    (obj,) = [o for o in scene.objects if o.id == obj_id]
    return obj


def test_counterfactual_second_choices():
    """Where the first change does not fit: a new circle that would hide the triangle under it gets another
    large radius; a swap that would bring the pair within REL_MARGIN moves the subject alone instead."""
    (ex,) = examples(74, 24, tasks=["ChooseCat"])[73:]  # "Which shape is red, the circle or the cross?"
    scene, new = counterfactual(ex)
    cross, circle = _by_id(ex.scene, ex.row["central object id"]), _by_id(scene, ex.row["central object id"])
    assert (cross.shape, circle.shape, new) == ("cross", "circle", "circle")
    assert circle.r != cross.r and circle.size == cross.size == "large"
    assert all(visible_fraction(scene, i) >= MIN_VISIBLE - 1e-6 for i in range(len(scene.objects)))

    ex = next(e for e in examples(4, 2, tasks=["ChooseRel"]))
    reference = _by_id(ex.scene, ex.row["object1 id"])
    subject = _by_id(ex.scene, ex.row["object2 id"])
    # a large reference next to a small subject at the left edge: swapped, the reference would be moved inward
    reference = dataclasses.replace(reference, size="large", r=8.0, cx=15.5, cy=28.0)
    subject = dataclasses.replace(subject, size="small", r=4.5, cx=5.0, cy=28.0)
    objs = tuple(dataclasses.replace(o, box=bounding_box(o, 56, 56)) for o in (reference, subject))
    ex = dataclasses.replace(ex, scene=dataclasses.replace(ex.scene, objects=objs))
    ex = dataclasses.replace(ex, row=ex.row | {"answer": answer(ex.row, ex.scene)})
    assert ex.answer == "left"
    scene, new = counterfactual(ex)
    moved = _by_id(scene, subject.id)
    assert new == "right" and _by_id(scene, reference.id) == objs[0]
    assert (moved.cx, moved.cy, moved.box[1:]) == (26.0, 28.0, objs[1].box[1:])  # its mirror image, 21 px right


def test_generation_is_byte_for_byte_deterministic(tmp_path):
    generate(tmp_path / "a", n_per_task=2, seed=4)
    generate(tmp_path / "b", n_per_task=2, seed=4)
    names = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert len(names) == 6 + 1 + 2 * 6 * 2  # task files, scenes.json, images and counterfactuals
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)
