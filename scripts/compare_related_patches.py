"""Related image patches on every row of the study's six GQA task files: the study's red-mask rule against
geometric overlap, at LLaVA-1.5 geometry (CLIP 336/14, pad to square) and LLaVA-NeXT geometry (the same tower,
anyres with pinpoints (H, W) [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]).

Only each row's image size and boxes are needed (the rule draws its own mask), so no image is read. The three
rows whose boxes lie further outside the image than the loader's tolerance are included (both rules clip them).

    python scripts/compare_related_patches.py [--workers 2]

Prints, per geometry and task: rows, rows where the two rules differ, rows without any related patch under the
study rule (the Related flow then cuts nothing) and under overlap, patches per row under each rule, and the
distribution of the number of patches on which a row differs (the symmetric difference).
"""

from __future__ import annotations

import argparse
import time
from concurrent.futures import ProcessPoolExecutor

import numpy as np

from jaxflow.config import ModelConfig
from jaxflow.inputs import gqa
from jaxflow.inputs.images import overlap_features, study_features
from jaxflow.testing import tiny_hf_config

PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
GEOMETRIES = {"LLaVA-1.5 (pad)": "llava", "LLaVA-NeXT (anyres)": "llava_next"}
BINS = [(0, 0), (1, 2), (3, 5), (6, 10), (11, 20), (21, None)]


def geometry(kind: str) -> ModelConfig:
    """The real models' image geometry; the language-model sizes do not matter here."""
    cfg = ModelConfig.from_hf(tiny_hf_config(kind, image_size=336))
    assert cfg.vision.patch_size == 14 and cfg.vision.image_size == 336
    assert not cfg.image.anyres or [list(p) for p in cfg.image.pinpoints] == PINPOINTS
    return cfg


def _count(job) -> np.ndarray:
    """[rows, 4]: patches under the study rule, under overlap, only under study, only under overlap."""
    kind, rows = job
    cfg = geometry(kind)
    out = np.zeros((len(rows), 4), np.int64)
    for i, (size, boxes) in enumerate(rows):
        study, overlap = study_features(cfg, size, boxes), overlap_features(cfg, size, boxes)
        out[i] = study.sum(), overlap.sum(), (study & ~overlap).sum(), (overlap & ~study).sum()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="processes (default 2)")
    args = parser.parse_args()
    start = time.time()
    tasks, outside = {}, set()
    for task in gqa.TASKS:
        outside |= {e.question_id for e in gqa.load_tasks(task)[1]}
        samples, errors = gqa.load_tasks(task, box_tolerance=float("inf"))
        assert not errors, errors
        tasks[task] = samples
    jobs = [(kind, task, [(s.image_size, s.boxes) for s in rows[i:i + 250]]) for kind in GEOMETRIES.values()
            for task, rows in tasks.items() for i in range(0, len(rows), 250)]
    with ProcessPoolExecutor(args.workers) as pool:
        counts = list(pool.map(_count, [(kind, rows) for kind, _, rows in jobs]))
    per = {}
    for (kind, task, _), c in zip(jobs, counts, strict=True):
        per.setdefault((kind, task), []).append(c)
    total_rows = sum(len(r) for r in tasks.values())
    print(f"{total_rows} rows of the six task files; related image patches per row, study rule vs overlap\n")
    head = ["geometry", "task", "rows", "differ", "no study patch", "no overlap patch", "study / row",
            "overlap / row", "only study", "only overlap"] + [f"diff {a}" if b == a else f"diff {a}-{b or ''}"
                                                              for a, b in BINS]
    print("| " + " | ".join(head) + " |")
    print("|" + " --- |" * len(head))
    for name, kind in GEOMETRIES.items():
        for task in [*gqa.TASKS, "all"]:
            c = np.concatenate([x for t in (gqa.TASKS if task == "all" else [task]) for x in per[(kind, t)]])
            diff = c[:, 2] + c[:, 3]
            bins = [int(((diff >= a) & (diff <= (b if b is not None else diff.max()))).sum()) for a, b in BINS]
            cells = [name, task, len(c), int((diff > 0).sum()), int((c[:, 0] == 0).sum()), int((c[:, 1] == 0).sum()),
                     f"{c[:, 0].mean():.1f}", f"{c[:, 1].mean():.1f}", int(c[:, 2].sum()), int(c[:, 3].sum()), *bins]
            print("| " + " | ".join(str(x) for x in cells) + " |")
    for name, kind in GEOMETRIES.items():
        for task in gqa.TASKS:
            c = np.concatenate(per[(kind, task)])
            for i in np.flatnonzero(c[:, 0] == 0):
                s = tasks[task][i]
                note = " (box beyond the loader's tolerance)" if s.question_id in outside else ""
                print(f"{name}: no related patch under the study rule: {task} question_id {s.question_id}, "
                      f"image (H, W) {s.image_size}, boxes {s.boxes}, overlap patches {c[i, 1]}{note}")
    print("\ndiffer: rows whose related sets differ; only study / only overlap: patches (summed over rows) one rule"
          " marks and the other does not; diff a-b: rows differing on a to b patches.")
    print(f"time: {time.time() - start:.0f} s with {args.workers} worker process(es)")


if __name__ == "__main__":
    main()
