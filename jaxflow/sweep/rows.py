"""The tables a sweep writes: their columns and one sample's rows."""

from __future__ import annotations

from collections import Counter

import numpy as np

from jaxflow.sweep.flows import window

RESULT_COLUMNS = [
    # the study's columns
    "question_id", "image", "answer", "predicted_answer", "question", "block_desc", "layer",
    "base_score_first", "new_score_first", "relative_diff_first",
    # ours
    "task", "source", "target", "heads", "window_start", "window_end", "answer_token", "new_top1", "top1_changed",
    "method", "related_patches", "n_source", "n_target",  # n_*: sizes of the source / target regions (0: nothing cut)
]
LENS_COLUMNS = ["question_id", "task", "answer", "layer", "norm", "p_answer", "p_answer_capitalized",
                "p_false_option", "answer_token", "capitalized_token", "false_option_token"]
SKIP_COLUMNS = ["question_id", "task", "reason"]


NONFINITE = "an overflow (float16?) or broken weights"


def skip_row(sample, reason: str) -> dict:
    return {"question_id": sample.question_id, "task": sample.task, "reason": reason}


def common_skip_reasons(rows, n: int = 3) -> list[tuple[str, int]]:
    """The n most common kinds of skip reason among skipped.csv `rows`, with their counts. A reason's kind is its
    text before the first ': ', without the sample's details ('image file not found: 1.jpg' -> 'image file not
    found', "wrong answer: predicted 'no', gold 'yes'" -> 'wrong answer')."""
    return Counter(r["reason"].split(": ", 1)[0] for r in rows).most_common(n)


def spans(ints) -> str:
    """[0, 1, 2, 5] -> '0-2,5'."""
    out, ints = [], list(ints)
    for i, n in enumerate(ints):
        if i == 0 or n != ints[i - 1] + 1:
            out.append([n, n])
        else:
            out[-1][1] = n
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in out)


def knockout_nonfinite(flows, num_layers: int, p_base: float, p_block) -> str | None:
    """Why one sample's knockout numbers cannot be written (None when they can): its base probability
    or its knocked-out probabilities p_block [F * L] (configuration f * L + l) are not finite."""
    if not np.isfinite(p_base):
        return f"non-finite base probability of the answer token ({p_base}): {NONFINITE}"
    bad = ~np.isfinite(np.asarray(p_block)).reshape(len(flows), num_layers)  # [F, L]
    if not bad.any():
        return None
    where = "; ".join(f"{flow.name} layers {spans(np.flatnonzero(b))}" for flow, b in zip(flows, bad, strict=True)
                      if b.any())
    return (f"non-finite knocked-out probability in {int(bad.sum())} of {bad.size} configurations ({where}): "
            f"{NONFINITE}")


def lens_nonfinite(lens, has_false: bool) -> str | None:
    """The same for one sample's logit lens [2 (norm), L + 1, 3] (the false option only if it has one)."""
    bad = (~np.isfinite(np.asarray(lens)[..., : 3 if has_false else 2])).any(-1)  # [2, L + 1]
    if not bad.any():
        return None
    where = "; ".join(f"{('raw', 'final-norm')[n]} layers {spans(np.flatnonzero(bad[n]))}" for n in (0, 1)
                      if bad[n].any())
    return f"non-finite logit-lens probability ({where}): {NONFINITE}"


def result_rows(p, predicted: str, flows, num_layers: int, k: int, token: int, p_base: float, p_block, top1,
                method: str) -> list[dict]:
    """One row per (flow, layer) configuration f * L + l; p_block, top1 [F * L] for this sample."""
    s = p.sample
    rows = []
    for f, flow in enumerate(flows):
        for layer in range(num_layers):
            i = f * num_layers + layer
            win = window(layer, k, num_layers)
            new = float(p_block[i])
            rows.append({
                "question_id": s.question_id, "image": s.image_file, "answer": s.answer, "predicted_answer": predicted,
                "question": s.question, "block_desc": flow.name, "layer": layer,
                "base_score_first": p_base, "new_score_first": new,
                "relative_diff_first": (new - p_base) / p_base * 100,
                "task": s.task, "source": flow.source, "target": flow.target,
                "heads": "all" if flow.heads is None else " ".join(map(str, flow.heads)),
                "window_start": win[0], "window_end": win[-1], "answer_token": token, "new_top1": int(top1[i]),
                "top1_changed": int(top1[i]) != token, "method": method, "related_patches": p.inputs.related_patches,
                "n_source": len(p.inputs.regions[flow.source]), "n_target": len(p.inputs.regions[flow.target]),
            })
    return rows


def first_token(tokenizer, word: str) -> int:
    ids = tokenizer.encode(word, add_special_tokens=False)
    if not ids:
        raise ValueError(f"{word!r} tokenizes to nothing")
    return ids[0]


def lens_words(tokenizer, keep, n: int):
    """Token ids [n, 3] read by the lens (lowercase answer, capitalized answer, false option) of the kept
    rows, and which rows have a false option [n]."""
    words = np.zeros((n, 3), np.int64)
    has_false = np.zeros(n, bool)
    for j, p, _ in keep:
        answer = p.sample.answer.strip()
        words[j, 0] = first_token(tokenizer, answer.lower())
        words[j, 1] = first_token(tokenizer, answer[:1].upper() + answer[1:].lower())
        if p.sample.false_option:
            words[j, 2] = first_token(tokenizer, p.sample.false_option.strip())
            has_false[j] = True
    return words, has_false


def lens_rows(p, lens, words, has_false: bool) -> list[dict]:
    """lens [2 (norm), L + 1, 3] probabilities of `words` [3] for one sample."""
    rows = []
    for norm in (0, 1):
        for layer in range(lens.shape[1]):
            v = lens[norm, layer]
            rows.append({"question_id": p.sample.question_id, "task": p.sample.task, "answer": p.sample.answer,
                         "layer": layer, "norm": bool(norm), "p_answer": float(v[0]),
                         "p_answer_capitalized": float(v[1]),
                         "p_false_option": float(v[2]) if has_false else "",
                         "answer_token": int(words[0]), "capitalized_token": int(words[1]),
                         "false_option_token": int(words[2]) if has_false else ""})
    return rows
