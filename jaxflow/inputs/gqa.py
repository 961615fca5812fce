"""GQA task files (the study's six CSVs): one `GQASample` per row, per-row `RowError`s instead of exceptions.

`load_tasks(csv_path, images_dir=None)` reads every column as a string (`question_id` keeps its leading zeros) and
validates each row on its own; a bad row becomes a `RowError(row, question_id, reason)` and the other rows still
load. Checked per row:

- numbers: `image_w`, `image_h` and the box columns must be numbers (integral for the image size);
- boxes: (x, y, w, h) in original-image pixels, w and h positive, inside the image. Boxes touching the border are
  fine, and a box may overshoot the image by up to `box_tolerance` pixels (default 2) on any side: GQA's
  annotations round to whole pixels and about 1% of the boxes in the six files end 1-2 px past the right or bottom
  edge. Such boxes are kept unchanged (the patch geometry clips them); anything further out is an error (three rows
  in the six files: boxes 34, 166 and 167 px outside their images);
- answer options (files with `true option` / `false option`): each must occur in the question (`option_spans`);
- the image (only when `images_dir` is given and `check_images`): `<images_dir>/<img_id>.jpg` must exist, open, and
  have the size the row states.

An optional `counterfactual_image` column names, per row, the image id of a minimal-pair image (the same scene with
the asked-about content changed): `<images_dir>/<id>.jpg`, in `GQASample.counterfactual_path`; a row without the
column or with an empty cell has None there. Only `jaxflow trace --corrupt counterfactual` reads that file.

Whether the question's characters map onto whole tokens depends on the tokenizer, so the caller checks that after
tokenizing: `token_error(sample, prompt, encoded)`.
"""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path

from jaxflow.inputs.prompts import Encoded, Prompt, span_problem

TASK_DIR = Path(__file__).resolve().parent.parent / "data" / "gqa_tasks"  # the study's six files, packaged
TASKS = ("ChooseAttr", "ChooseCat", "ChooseRel", "CompareAttr", "LogicalObj", "QueryAttr")
CENTRAL = ("central object",)
PAIR = ("object1", "object2")
REQUIRED = ("question_id", "img_id", "question", "answer", "image_w", "image_h")
DEFAULT_BOX_TOLERANCE = 2.0

Box = tuple[float, float, float, float]  # x, y, w, h; ints when the file holds integers


@dataclasses.dataclass(frozen=True)
class RowError:
    """A row that cannot be used. `row` is the 0-based index among the file's data rows (the pandas index)."""

    row: int
    question_id: str
    reason: str
    task: str = ""

    def __str__(self) -> str:
        where = f"{self.task} " if self.task else ""
        return f"{where}row {self.row} (question_id {self.question_id}): {self.reason}"


@dataclasses.dataclass(frozen=True)
class GQASample:
    """One task row. Spans are half-open character ranges into `question`."""

    task: str
    row: int
    question_id: str
    img_id: str
    image_file: str
    image_path: str | None  # <images_dir>/<image_file>, None without an images_dir
    question: str
    answer: str
    true_option: str | None
    false_option: str | None
    true_option_span: tuple[int, int] | None
    false_option_span: tuple[int, int] | None
    boxes: tuple[Box, ...]  # question-related objects: the central object, or object1 (and object2)
    box_names: tuple[str, ...]  # their names (`central object name`, `object1 name`, ...), one per box
    image_size: tuple[int, int]  # (height, width), as transformers' LlavaNext
    columns: Mapping[str, str] = dataclasses.field(repr=False, compare=False)  # the whole row, as read
    counterfactual_image: str | None = None  # the `counterfactual_image` column's image id (None: absent or empty)
    counterfactual_path: str | None = None  # <images_dir>/<id>.jpg, None without an images_dir or an id


class _Bad(ValueError):
    pass


def _number(columns: Mapping[str, str], name: str) -> float:
    raw = columns.get(name)
    text = (raw or "").strip()
    try:
        value = int(text)
    except ValueError:
        try:
            value = float(text)
        except ValueError:
            raise _Bad(f"malformed number in column {name!r}: {raw!r}") from None
        if not math.isfinite(value):
            raise _Bad(f"malformed number in column {name!r}: {raw!r}") from None
        if value.is_integer():
            value = int(value)
    return value


def _image_size(columns: Mapping[str, str]) -> tuple[int, int]:
    w, h = _number(columns, "image_w"), _number(columns, "image_h")
    for name, v in (("image_w", w), ("image_h", h)):
        if not isinstance(v, int) or v <= 0:
            raise _Bad(f"column {name!r} must be a positive integer, got {columns[name]!r}")
    return h, w


def _box(columns: Mapping[str, str], prefix: str, width: int, height: int, tolerance: float) -> Box:
    x, y, w, h = (_number(columns, f"{prefix} {k}") for k in "xywh")
    if w <= 0 or h <= 0:
        raise _Bad(f"{prefix} box {(x, y, w, h)} has no area")
    over = max(-x, -y, x + w - width, y + h - height)
    if over > tolerance:
        raise _Bad(f"{prefix} box {(x, y, w, h)} extends {over:g} px outside the {width}x{height} image "
                   f"(tolerance {tolerance:g} px)")
    return x, y, w, h


def _word_candidates(question: str, option: str) -> list[tuple[int, int, bool]]:
    """(start, end, exact) for each occurrence of `option` in `question`, case-insensitive: whole-word matches
    (exact), or, when there is none, the words containing it ("elephant" in "elephants", "phone" in "telephone")."""
    if not option.strip():
        return []
    pattern = re.escape(option.strip())
    found = [(m.start(), m.end(), True) for m in re.finditer(rf"(?<!\w){pattern}(?!\w)", question, re.IGNORECASE)]
    if found:
        return found
    spans = set()
    for m in re.finditer(pattern, question, re.IGNORECASE):
        s, e = m.start(), m.end()
        while s > 0 and question[s - 1].isalnum():
            s -= 1
        while e < len(question) and question[e].isalnum():
            e += 1
        spans.add((s, e, False))
    return sorted(spans)


def option_spans(question: str, true_option: str | None, false_option: str | None
                 ) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """Character spans of the two answer options inside a Choose* question (None where an option is absent).

    Matching is case-insensitive and prefers whole words; when an option only occurs inside a longer word
    ("elephant" in "elephants") that word's span is returned. When an option occurs more than once ("the train car
    or the car", "to the left of the chair on the left side") the two spans are chosen jointly: they must not
    overlap, and they lie closest to the " or " that separates the alternatives.
    """
    cands = [_word_candidates(question, o) if o else [] for o in (true_option, false_option)]
    ors = [(m.start(), m.end()) for m in re.finditer(r"\s+or\s+", question)]

    def distance(span):
        if not ors:
            return 0
        return min(min(abs(span[1] - a), abs(span[0] - b)) for a, b in ors)

    best, best_key = (None, None), None
    for t in cands[0] or [None]:
        for f in cands[1] or [None]:
            if t and f and t[0] < f[1] and f[0] < t[1]:
                continue
            chosen = [c for c in (t, f) if c]
            key = (-len(chosen), sum(not c[2] for c in chosen), sum(distance(c) for c in chosen))
            if best_key is None or key < best_key:
                best_key, best = key, (t, f)
    return tuple((c[0], c[1]) if c else None for c in best)


def find_option(question: str, option: str) -> tuple[int, int] | None:
    """Character span of one option inside the question (see `option_spans`), or None when it does not occur."""
    return option_spans(question, option, None)[0]


def find_name(question: str, name: str) -> tuple[int, int] | None:
    """Character span of an object name inside the question: its first whole-word occurrence (case-insensitive),
    else, for a name of three or more characters, the first word containing it ("table" in "tables", "tie" in
    "necktie"); None otherwise. A shorter name must occur as a word: "he" would otherwise land inside "the"."""
    found = _word_candidates(question, name)
    if not found or (not found[0][2] and len(name.strip()) < 3):
        return None
    return found[0][0], found[0][1]


def _parse_row(task: str, index: int, columns: dict[str, str], prefixes: tuple[str, ...], images_dir: str | None,
               check_images: bool, tolerance: float) -> GQASample:
    question, answer = columns["question"], columns["answer"]
    img_id = columns["img_id"].strip()
    if not question.strip():
        raise _Bad("empty question")
    if not img_id:
        raise _Bad("empty img_id")
    height, width = _image_size(columns)
    boxes, names = [], []
    for prefix in prefixes:
        raw = [columns.get(f"{prefix} {k}", "").strip() for k in "xywh"]
        if prefix == "object2" and all(v == "-" for v in raw):
            continue  # LogicalObj: the second object is absent from the image
        boxes.append(_box(columns, prefix, width, height, tolerance))
        names.append(columns.get(f"{prefix} name", ""))
    true_option = columns.get("true option")
    false_option = columns.get("false option")
    t_span, f_span = option_spans(question, true_option, false_option)
    for label, option, span in (("true", true_option, t_span), ("false", false_option, f_span)):
        if option is not None and span is None:
            raise _Bad(f"{label} option {option!r} does not occur in the question {question!r}")
    image_file = _image_file(img_id)
    image_path = os.path.join(images_dir, image_file) if images_dir is not None else None
    if image_path is not None and check_images:
        _check_image(image_path, width, height)
    counterfactual = columns.get("counterfactual_image", "").strip() or None
    counterfactual_path = None if counterfactual is None or images_dir is None else \
        os.path.join(images_dir, _image_file(counterfactual))
    return GQASample(task, index, columns["question_id"], img_id, image_file, image_path, question, answer,
                     true_option, false_option, t_span, f_span, tuple(boxes), tuple(names), (height, width),
                     columns, counterfactual, counterfactual_path)


def _image_file(img_id: str) -> str:
    """An image id's file name in the image folder: `<id>.jpg` (an id already ending in .jpg as it is)."""
    return img_id if img_id.lower().endswith(".jpg") else f"{img_id}.jpg"


def _check_image(path: str, width: int, height: int) -> None:
    import PIL.Image

    if not os.path.isfile(path):
        raise _Bad(f"image file not found: {path}")
    try:
        with PIL.Image.open(path) as im:
            size = im.size
            im.verify()
    except Exception as e:  # PIL raises many types for broken files
        raise _Bad(f"unreadable image {path}: {type(e).__name__}: {e}") from None
    if size != (width, height):
        raise _Bad(f"image {path} is {size[0]}x{size[1]}, the row says {width}x{height}")


def task_file(name_or_path: str | os.PathLike) -> Path:
    """A task CSV: an existing path as given, else one of the packaged study tasks by name ("ChooseAttr")."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    if os.fspath(name_or_path) in TASKS:
        return TASK_DIR / f"{name_or_path}.csv"
    raise FileNotFoundError(f"{os.fspath(name_or_path)}: no such task file, and not a packaged task name "
                            f"({', '.join(TASKS)})")


def load_tasks(csv_path: str | os.PathLike, images_dir: str | os.PathLike | None = None, *, check_images: bool = True,
               box_tolerance: float = DEFAULT_BOX_TOLERANCE) -> tuple[list[GQASample], list[RowError]]:
    """Loads one task CSV; returns the valid samples and a `RowError` for every other row, both in file order.

    `csv_path` may also name a packaged task ("ChooseAttr", see `task_file`). The task name is the file's stem.
    Image files are checked only when `images_dir` is given and `check_images`. A file that is not a task file
    (missing columns) raises ValueError.
    """
    path = task_file(csv_path)
    task = path.stem
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED if c not in header]
        if all(f"{CENTRAL[0]} {k}" in header for k in "xywh"):
            prefixes = CENTRAL
        elif all(f"object1 {k}" in header for k in "xywh"):
            prefixes = PAIR if all(f"object2 {k}" in header for k in "xywh") else PAIR[:1]
        else:
            prefixes = ()
            missing.append("central object x/y/w/h or object1 x/y/w/h")
        if missing:
            raise ValueError(f"{path}: not a GQA task file, missing columns: {', '.join(missing)}")
        rows = list(reader)
    images = os.fspath(images_dir) if images_dir is not None else None
    samples, errors = [], []
    for index, row in enumerate(rows):
        columns = {k: (v if v is not None else "") for k, v in row.items() if k is not None}
        qid = columns.get("question_id", "")
        if None in row:  # more fields than the header names
            errors.append(RowError(index, qid, f"{len(row[None])} fields more than the header has", task))
            continue
        try:
            samples.append(_parse_row(task, index, columns, prefixes, images, check_images, box_tolerance))
        except _Bad as e:
            errors.append(RowError(index, qid, str(e), task))
    return samples, errors


def token_error(sample: GQASample, prompt: Prompt, encoded: Encoded) -> RowError | None:
    """A `RowError` when the question (or an answer option) of `sample` does not map onto whole tokens of
    `encoded` (the tokenization of `prompt`), else None. Run it after `encode`, once per tokenizer."""
    if prompt.question != sample.question:
        raise ValueError("the prompt was not built from this sample's question")
    checks = [("question", prompt.question_span)]
    for label, span in (("true option", sample.true_option_span), ("false option", sample.false_option_span)):
        if span is not None:
            checks.append((label, prompt.question_substring_span(*span)))
    for label, (start, end) in checks:
        problem = span_problem(encoded, start, end)
        if problem is not None:
            return RowError(sample.row, sample.question_id, f"{label}: {problem}", sample.task)
    return None
