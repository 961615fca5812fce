"""Seeded data sets of the toy world, in memory or written as GQA task files.

`generate(out_dir, n_per_task, seed)` writes
  out_dir/<Task>.csv      one per task, the study's GQA column layout (`jaxflow.inputs.gqa.load_tasks` reads it)
                          plus two last columns: `counterfactual_image` (the id of the question's counterfactual
                          image, `images/<id>.jpg` like img_id) and `counterfactual_answer` (its gold answer)
  out_dir/images/<img_id>.jpg, out_dir/images/<img_id>cf.jpg (the counterfactual, see `counterfactuals.py`)
  out_dir/scenes.json     every scene's objects (shape, colour, material, size, centre, box), counterfactuals
                          included: the ground truth
so `jaxflow sweep --data out_dir/ChooseAttr.csv --images out_dir/images` runs on it unchanged.

Images are stored as JPEG (quality 95, no chroma subsampling); `examples` returns the decoded JPEG,
so a model trained in memory sees exactly the pixels a sweep later reads from disk.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
from collections.abc import Sequence

import numpy as np
import PIL.Image

from jaxflow.world.counterfactuals import counterfactual
from jaxflow.world.questions import COLUMNS, TASKS, Example, make_example
from jaxflow.world.scene import Scene, render

JPEG_QUALITY = 95
COUNTERFACTUAL_COLUMNS = ["counterfactual_image", "counterfactual_answer"]  # after the study's columns


def jpeg_bytes(image: PIL.Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=JPEG_QUALITY, subsampling=0)
    return buf.getvalue()


def decode(data: bytes) -> PIL.Image.Image:
    with PIL.Image.open(io.BytesIO(data)) as im:
        return im.convert("RGB")


def examples(n_per_task: int, seed: int, tasks: Sequence[str] = TASKS, max_objects: int | None = None) -> list[Example]:
    """n_per_task questions of each task, deterministic in `seed` (each task draws from its own stream)."""
    out = []
    for task in tasks:
        rng = np.random.default_rng([seed, TASKS.index(task)])
        k = TASKS.index(task) + 1
        for i in range(n_per_task):
            # ids as GQA writes them: numeric strings, question ids with a leading zero
            out.append(make_example(task, rng, i, question_id=f"{seed % 100:02d}{k}{i:06d}",
                                    img_id=f"{k}{seed % 100:02d}{i:06d}", max_objects=max_objects))
    return out


def verify_examples(n: int, seed: int) -> list[Example]:
    """n training-only yes/no questions "Is the circle red?" on ChooseAttr's scenes, half of them true: the
    one-object check that LogicalObj combines. Tagged LogicalObj (same answers); never in task files."""
    rng = np.random.default_rng([seed, len(TASKS)])
    out = []
    for ex in examples(n, seed, tasks=["ChooseAttr"]):
        yes = bool(rng.random() < 0.5)
        value = ex.row["true option" if yes else "false option"]
        question = f"Is the {ex.row['central object name']} {value}?"
        row = ex.row | {"question": question, "answer": "yes" if yes else "no"}
        out.append(dataclasses.replace(ex, task="LogicalObj", row=row))
    return out


def image_of(example: Example | Scene) -> PIL.Image.Image:
    """The image as stored on disk (rendered, JPEG-encoded, decoded)."""
    scene = example.scene if isinstance(example, Example) else example
    return decode(jpeg_bytes(render(scene)))


def write_csv(path: str, task: str, rows: Sequence[dict]) -> str:
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS[task] + COUNTERFACTUAL_COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def generate(out_dir: str | os.PathLike, n_per_task: int, seed: int = 0, tasks: Sequence[str] = TASKS) -> dict:
    """Writes the task files, images and scenes.json into out_dir; returns {task: csv path}."""
    out_dir = os.fspath(out_dir)
    image_dir = os.path.join(out_dir, "images")
    os.makedirs(image_dir, exist_ok=True)
    items = examples(n_per_task, seed, tasks)
    scenes, rows = {}, {task: [] for task in tasks}
    for ex in items:
        cf_scene, cf_answer = counterfactual(ex)
        for scene in (ex.scene, cf_scene):
            with open(os.path.join(image_dir, f"{scene.img_id}.jpg"), "wb") as f:
                f.write(jpeg_bytes(render(scene)))
            scenes[scene.img_id] = scene.to_dict()
        rows[ex.task].append(ex.row | {"counterfactual_image": cf_scene.img_id, "counterfactual_answer": cf_answer})
    with open(os.path.join(out_dir, "scenes.json"), "w") as f:
        f.write(json.dumps(scenes))  # one string: about twice as fast as json.dump
    return {task: write_csv(os.path.join(out_dir, f"{task}.csv"), task, rows[task]) for task in tasks}


def load_scenes(out_dir: str | os.PathLike) -> dict[str, Scene]:
    with open(os.path.join(os.fspath(out_dir), "scenes.json")) as f:
        return {k: Scene.from_dict(v) for k, v in json.load(f).items()}


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m jaxflow.world", description="write a toy-world GQA data set")
    p.add_argument("out", help="output directory")
    p.add_argument("--n", type=int, default=100, help="questions per task (default 100)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    args = p.parse_args(argv)
    for task, path in generate(args.out, args.n, args.seed, args.tasks).items():
        print(f"{task}: {path}")
    print(f"images: {os.path.join(args.out, 'images')}")
    return 0
