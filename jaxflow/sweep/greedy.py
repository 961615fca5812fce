"""The study's filter: greedy-decode each sample's answer and keep the samples answered correctly."""

from __future__ import annotations

import numpy as np

from jaxflow.model import Model, ModelInputs


def decode_answer(tokenizer, tokens: np.ndarray) -> str:
    eos = tokenizer.eos_token_id
    out = []
    for t in tokens.tolist():
        if t == eos:
            break
        out.append(t)
    return tokenizer.decode(out, skip_special_tokens=True).strip()


def greedy_filter(model: Model, group: list, inputs: ModelInputs, *, max_new_tokens: int, filter_correct: bool):
    """Greedy-decodes a batch (rows beyond `group` are padding). Returns (first answer token [B],
    kept [(row, Prepared, predicted answer)], skipped [(Prepared, reason)])."""
    gen = model.generate(inputs, max_new_tokens=max_new_tokens)
    keep, skip = [], []
    for j, p in enumerate(group):
        predicted = decode_answer(model.tokenizer, gen.tokens[j])
        if filter_correct and predicted.lower() != p.sample.answer.strip().lower():
            skip.append((p, f"wrong answer: predicted {predicted!r}, gold {p.sample.answer!r}"))
        else:
            keep.append((j, p, predicted))
    return gen.tokens[:, 0], keep, skip
