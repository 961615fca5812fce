"""GQA task files: the six real CSVs, per-row validation, answer options, and question spans under both toy
tokenizers and both tokenization modes."""

from __future__ import annotations

import csv
import dataclasses
import os

import PIL.Image
import pytest
import toy_tokenizers as toy

from jaxflow.inputs.gqa import (
    TASK_DIR,
    TASKS,
    GQASample,
    RowError,
    find_option,
    load_tasks,
    option_spans,
    token_error,
)
from jaxflow.inputs.prompts import build_prompt, encode, token_span

DATA = str(TASK_DIR)
ROWS = {"ChooseAttr": 1000, "ChooseCat": 1000, "QueryAttr": 1000, "ChooseRel": 964, "CompareAttr": 570,
        "LogicalObj": 991}
# Rows whose box lies far outside the image (more than the 2 px tolerance): (row, question_id, object)
OUTSIDE = {"ChooseCat": [(806, "1595102", "central object")], "CompareAttr": [(361, "11571132", "object2")],
           "QueryAttr": [(821, "1594913", "central object")]}
LEADING_ZERO = {"ChooseAttr": 523, "ChooseCat": 505, "QueryAttr": 506, "ChooseRel": 479, "CompareAttr": 291,
                "LogicalObj": 511}  # question_ids with a leading zero
CHOOSE = ("ChooseAttr", "ChooseCat", "ChooseRel")

def path(task):
    return os.path.join(DATA, f"{task}.csv")


@pytest.fixture(scope="module")
def tasks():
    return {task: load_tasks(path(task)) for task in ROWS}


@pytest.mark.parametrize("task", ROWS)
def test_real_files_load(tasks, task):
    samples, errors = tasks[task]
    assert len(samples) + len(errors) == ROWS[task]
    assert [(e.row, e.question_id) for e in errors] == [(r, q) for r, q, _ in OUTSIDE.get(task, [])]
    for e, (_, _, obj) in zip(errors, OUTSIDE.get(task, []), strict=True):
        assert e.reason.startswith(f"{obj} box") and "outside" in e.reason and e.task == task
    with open(path(task), newline="", encoding="utf-8") as f:
        raw = list(csv.DictReader(f))
    bad = {e.row for e in errors}
    assert [s.row for s in samples] == [i for i in range(len(raw)) if i not in bad]
    for s in samples:
        r = raw[s.row]
        assert s.task == task and s.question_id == r["question_id"] and s.question == r["question"]
        assert s.image_size == (int(r["image_h"]), int(r["image_w"]))
        assert s.image_file == f"{r['img_id']}.jpg" and s.image_path is None
        assert dict(s.columns) == r  # every column kept, as strings
        assert all(w > 0 and h > 0 for _, _, w, h in s.boxes) and len(s.boxes) == len(s.box_names)
        if task in CHOOSE:
            assert (s.true_option, s.false_option) == (r["true option"], r["false option"])
        else:
            assert s.true_option is None and s.true_option_span is None
    # question_id is a string: leading zeros survive
    assert sum(s.question_id.startswith("0") for s in samples) == LEADING_ZERO[task]


def test_real_file_details(tasks):
    cat = {s.question_id: s for s in tasks["ChooseCat"][0]}
    s = cat["00556075"]
    assert (s.row, s.question, s.answer, s.true_option, s.false_option) == (
        1, "What is this, a cabinet or a bed?", "bed", "bed", "cabinet")
    assert s.question[slice(*s.true_option_span)] == "bed" and s.question[slice(*s.false_option_span)] == "cabinet"
    logical = tasks["LogicalObj"][0]
    assert sum(len(s.boxes) == 1 for s in logical) == 910  # object2 "-": not in the image
    assert all(len(s.boxes) == 2 for s in tasks["ChooseRel"][0] + tasks["CompareAttr"][0])
    assert all(len(s.boxes) == 1 for t in ("ChooseAttr", "ChooseCat", "QueryAttr") for s in tasks[t][0])
    first = tasks["ChooseRel"][0][0]
    assert first.box_names == ("surfboard", "surfer") and first.question_id == "13515212"


def test_options_found_in_every_choose_question(tasks):
    """Every Choose* option occurs in its question; the two spans never overlap. Where an option only occurs
    inside a longer word (3 ChooseCat rows: "phone" in "telephone", "elephant" in "elephants") the span is that
    word; everywhere else it is the option itself, case-insensitively."""
    inexact = []
    for task in CHOOSE:
        for s in tasks[task][0]:
            t, f = s.true_option_span, s.false_option_span
            assert t and f and (t[1] <= f[0] or f[1] <= t[0])
            for option, span in ((s.true_option, t), (s.false_option, f)):
                if s.question[slice(*span)].lower() != option.lower():
                    inexact.append((option, s.question[slice(*span)]))
                    assert option.lower() in s.question[slice(*span)].lower()
    assert sorted(inexact) == [("elephant", "elephants"), ("elephant", "elephants"), ("phone", "telephone")]


def test_option_spans_resolve_repeated_words():
    def words(q, t, f):
        spans = option_spans(q, t, f)
        return [q[slice(*s)] if s else None for s in spans], spans

    q = "Which vehicle is white, the train car or the car?"
    (tw, fw), (ts, fs) = words(q, "car", "train car")
    assert (tw, fw) == ("car", "train car") and ts[0] == q.rindex("car")
    q = "Which type of vehicle is not old, the truck or the truck taxi?"
    (tw, fw), (ts, fs) = words(q, "truck", "truck taxi")
    assert ts[0] == q.index("truck") and fs[0] == q.rindex("truck")
    q = "Is the person to the right or to the left of the chair on the left side?"
    assert option_spans(q, "right", "left")[1][0] == q.index("left")
    assert find_option("Is the jar full or empty?", "Full") == (11, 15)
    assert find_option("Is the jar full or empty?", "blue") is None
    assert find_option("Which animals are those, giraffes or elephants?", "elephant") == (37, 46)


@pytest.mark.parametrize("tokenizer,template", [("llama2", "vicuna_v1"), ("llama3", "llava_llama_3")])
def test_every_question_span_is_found(tasks, tokenizer, template, capsys):
    """Every row's question (and options) maps onto whole tokens, in both modes; reports the counts."""
    tok = toy.llama2_tokenizer() if tokenizer == "llama2" else toy.llama3_tokenizer()
    lines, failures = [], []
    for task in ROWS:
        samples = tasks[task][0]
        for mode, image_id in (("llava-hf", tok.convert_tokens_to_ids("<image>")), ("original", -200)):
            found = 0
            for s in samples:
                prompt = build_prompt(s.question, template)
                error = token_error(s, prompt, encode(prompt, tok, image_id, 4, mode))
                found += error is None
                if error is not None:
                    failures.append(f"{mode}: {error}")
            lines.append(f"{tokenizer} {mode:8s} {task:11s} question span found {found}/{len(samples)}")
    with capsys.disabled():
        print("\n" + "\n".join(lines))
    assert not failures, "\n".join(failures[:20])


def test_question_tokens_decode_to_the_question(tasks):
    """A sample of rows per file: the Question tokens decode back to the question, option tokens to the option word."""
    for tok, template in ((toy.llama2_tokenizer(), "vicuna_v1"), (toy.llama3_tokenizer(), "llava_llama_3")):
        for task in ROWS:
            for s in tasks[task][0][::50]:
                p = build_prompt(s.question, template)
                for mode, image_id in (("llava-hf", tok.convert_tokens_to_ids("<image>")), ("original", -200)):
                    e = encode(p, tok, image_id, 3, mode)
                    assert tok.decode(e.input_ids[token_span(e, *p.question_span)]).strip() == s.question
                    if s.true_option_span:
                        span = p.question_substring_span(*s.true_option_span)
                        assert tok.decode(e.input_ids[token_span(e, *span)]).strip() == s.question[
                            slice(*s.true_option_span)]


def test_token_error_names_the_row():
    tok = toy.llama2_tokenizer()
    q = "Is the jar full or empty?"
    p = build_prompt(q)
    e = encode(p, tok, -200, 4, "original")
    s = sample(q)
    assert token_error(s, p, e) is None
    cut = dataclasses.replace(s, true_option_span=(11, 14))  # "ful": ends inside the token "▁full"
    err = token_error(cut, p, e)
    assert isinstance(err, RowError) and (err.row, err.question_id) == (3, "00123")
    assert err.reason.startswith("true option:") and "inside a token" in err.reason
    with pytest.raises(ValueError):
        token_error(s, build_prompt("Another question?"), e)


def sample(question):
    return GQASample("T", 3, "00123", "1", "1.jpg", None, question, "full", "full", "empty", (11, 15), (19, 24),
                     ((0, 0, 1, 1),), ("jar",), (10, 10), {})


# ---------------------------------------------------------------- broken rows


HEADER = ["question_id", "img_id", "question", "answer", "true option", "false option", "central object name",
          "image_w", "image_h", "central object w", "central object h", "central object x", "central object y"]


def write_csv(p, rows):
    with open(p, "w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(HEADER)
        w.writerows(rows)


def row(qid, img, w=40, h=30, box=(0, 0, 40, 30), q="Is the jar full or empty?", t="full", f="empty"):
    x, y, bw, bh = box
    return [qid, img, q, t, t, f, "jar", w, h, bw, bh, x, y]


def test_broken_rows_in_an_edited_copy(tmp_path):
    """An edited copy of a real task file: the broken rows become RowErrors naming row and question_id."""
    with open(path("ChooseAttr"), newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))[:8]
    rows[1]["image_w"] = "5OO"  # malformed number
    rows[2]["central object x"] = str(int(rows[2]["image_w"]) + 10)  # box outside the image
    rows[3]["central object w"] = str(int(rows[3]["image_w"]) - int(rows[3]["central object x"]) + 2)  # 2 px: ok
    rows[4]["central object y"] = "12.5.1"
    rows[5]["true option"] = "purple"  # not in the question
    edited = tmp_path / "ChooseAttr.csv"
    with open(edited, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    images = tmp_path / "images"
    images.mkdir()
    for i, r in enumerate(rows):
        if i == 6:
            continue  # missing image
        size = (int(r["image_w"]), int(r["image_h"])) if i != 1 else (10, 10)
        PIL.Image.new("RGB", size if i != 0 else (size[0] + 1, size[1]), (i, 0, 0)).save(images / f"{r['img_id']}.jpg")
    (images / f"{rows[7]['img_id']}.jpg").write_bytes(b"not a jpeg")

    samples, errors = load_tasks(edited)  # no images_dir: only the rows themselves are checked
    assert [e.row for e in errors] == [1, 2, 4, 5]
    assert [s.row for s in samples] == [0, 3, 6, 7]
    assert all(e.question_id == rows[e.row]["question_id"] and e.task == "ChooseAttr" for e in errors)
    reasons = {e.row: e.reason for e in errors}
    assert "malformed number in column 'image_w'" in reasons[1]
    assert "outside" in reasons[2] and "tolerance 2 px" in reasons[2]
    assert "malformed number in column 'central object y'" in reasons[4]
    assert "true option 'purple' does not occur" in reasons[5]
    assert f"row 1 (question_id {rows[1]['question_id']})" in str(errors[0])
    assert samples[1].question_id == rows[3]["question_id"]  # touching the border within tolerance loads

    samples, errors = load_tasks(edited, images)
    reasons = {e.row: e.reason for e in errors}
    assert sorted(reasons) == [0, 1, 2, 4, 5, 6, 7] and [s.row for s in samples] == [3]
    assert "the row says" in reasons[0]  # image size differs from image_w x image_h
    assert "image file not found" in reasons[6] and "unreadable image" in reasons[7]
    assert samples[0].image_path == str(images / f"{rows[3]['img_id']}.jpg")

    samples, errors = load_tasks(edited, images, check_images=False)
    assert [e.row for e in errors] == [1, 2, 4, 5] and samples[0].image_path is not None


def test_synthetic_rows(tmp_path):
    p = tmp_path / "Tiny.csv"
    write_csv(p, [
        row("001", "a"),  # box = whole image: fine
        row("002", "b", box=(-2, -1, 42, 31)),  # 2 px over on the left/top and right: within tolerance
        row("003", "c", box=(-3, 0, 10, 10)),  # 3 px outside
        row("004", "d", box=(5, 5, 0, 10)),  # no area
        row("005", "e", w="0"),
        row("006", "f", w="nan"),
        row("007", "g", q=""),
    ])
    samples, errors = load_tasks(p)
    assert [s.question_id for s in samples] == ["001", "002"] and samples[0].task == "Tiny"
    assert samples[0].boxes == ((0, 0, 40, 30),) and samples[0].image_size == (30, 40)
    assert [(e.row, e.question_id) for e in errors] == [(2, "003"), (3, "004"), (4, "005"), (5, "006"), (6, "007")]
    assert "no area" in errors[1].reason and "positive integer" in errors[2].reason
    _, errors = load_tasks(p, box_tolerance=0)
    assert [e.question_id for e in errors][:2] == ["002", "003"]


def test_object2_dash_and_bad_files(tmp_path):
    header = ["question_id", "img_id", "question", "answer", "image_w", "image_h"] + [
        f"object{i} {k}" for i in (1, 2) for k in ("name", "x", "y", "w", "h")]
    p = tmp_path / "LogicalObj.csv"
    with open(p, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerow(["010", "1", "Is there any grass or mud?", "no", 40, 30, "grass", 1, 2, 3, 4, "mud"] + ["-"] * 4)
        w.writerow(["011", "2", "Is there a cat or a dog?", "yes", 40, 30, "cat", 1, 2, 3, 4, "dog", 5, 6, 7, 8])
        w.writerow(["012", "3", "Is there a cat or a dog?", "yes", 40, 30, "cat", 1, 2, 3, 4, "dog", "-", 6, 7, 8])
    samples, errors = load_tasks(p)
    assert [s.boxes for s in samples] == [((1, 2, 3, 4),), ((1, 2, 3, 4), (5, 6, 7, 8))]
    assert samples[1].box_names == ("cat", "dog")
    assert [(e.row, e.question_id) for e in errors] == [(2, "012")] and "object2 x" in errors[0].reason
    bad = tmp_path / "bad.csv"
    bad.write_text("question_id,question\n1,What?\n")
    with pytest.raises(ValueError, match="not a GQA task file"):
        load_tasks(bad)


def test_packaged_tasks_resolve_by_name_and_path(tmp_path):
    assert set(TASKS) == set(ROWS)
    for task in TASKS:
        assert load_tasks(task)[0] == load_tasks(path(task))[0]  # a task name reads the packaged file
    assert {f for f in os.listdir(DATA) if f.endswith(".csv")} == {f"{t}.csv" for t in TASKS}
    notice = open(os.path.join(DATA, "README.md")).read()
    assert "CC BY 4.0" in notice and "MIT" in open(os.path.join(DATA, "LICENSE-study-code.txt")).read()
    copy = tmp_path / "ChooseAttr.csv"  # a path still wins over the packaged name
    with open(path("ChooseAttr"), newline="") as f:
        lines = f.readlines()
    copy.write_text("".join(lines[:4]))
    assert len(load_tasks(copy)[0]) == 3
    with pytest.raises(FileNotFoundError, match="ChooseAtr: no such task file.*ChooseAttr, ChooseCat"):
        load_tasks("ChooseAtr")
