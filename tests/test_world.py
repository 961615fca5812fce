"""The toy world: boxes match the drawn pixels, answers are right (recomputed here from the scene
description, independently of the generator's logic), task files load like the study's GQA files and
their questions map onto whole tokens of the toy tokenizer."""

import collections
import csv
import os
import re

import numpy as np
import pytest

from jaxflow.config import ModelConfig
from jaxflow.inputs import gqa
from jaxflow.inputs.regions import build_sample
from jaxflow.world import TASKS, examples, generate, image_of, load_scenes
from jaxflow.world.generate import verify_examples
from jaxflow.world.scene import COLORS, MIN_VISIBLE, PLURALS, SHAPES, coverage, visible_fraction
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
            assert next(csv.reader(g)) == next(csv.reader(f))  # the very header of the study's file
        samples, errors = gqa.load_tasks(path, image_dir)
        assert errors == [] and len(samples) == 24
        assert all(s.question_id.startswith("0") for s in samples)  # read as strings
        for s in samples[:8]:
            with open(s.image_path, "rb") as f:
                from PIL import Image

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
