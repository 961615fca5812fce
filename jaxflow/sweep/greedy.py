"""The study's filter: greedy-decode each sample's answer until EOS (at most `max_new_tokens`, the study's
128 by default) and keep the samples whose decoded answer, special tokens skipped, stripped and
lowercased, equals the gold answer."""

from __future__ import annotations

import json
import os

import numpy as np

from jaxflow.model import Model, ModelInputs, Prefill
from jaxflow.sweep.rows import NONFINITE

MAX_NEW_TOKENS = 128  # the study's base decoding limit


def stop_tokens(model: Model) -> tuple[int, ...]:
    """Token ids that end an answer: the tokenizer's eos and the eos id(s) of the model's
    generation_config.json (what transformers' generate stops on), in that order."""
    ids = [] if model.tokenizer is None or model.tokenizer.eos_token_id is None else [model.tokenizer.eos_token_id]
    path = os.path.join(model.path, "generation_config.json") if model.path else None
    if path and os.path.isfile(path):
        with open(path) as f:
            eos = json.load(f).get("eos_token_id")
        ids += [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    if not ids:
        raise ValueError(f"{model.path}: no eos token (tokenizer or generation_config.json): greedy answers cannot end")
    return tuple(dict.fromkeys(int(i) for i in ids))


def decode_answer(tokenizer, tokens: np.ndarray, stop: tuple[int, ...]) -> str:
    """The answer text of one row of generated tokens: up to the first stop token, special tokens skipped,
    stripped (the leading space of a SentencePiece word goes with the strip)."""
    tokens = tokens.tolist()
    end = next((i for i, t in enumerate(tokens) if t in stop), len(tokens))
    return tokenizer.decode(tokens[:end], skip_special_tokens=True).strip()


def greedy_filter(model: Model, group: list, inputs: ModelInputs, *, max_new_tokens: int, filter_correct: bool,
                  prefill: Prefill | None = None):
    """Greedy-decodes a batch (rows beyond `group` are padding), continuing from `prefill` (`Model.prefill`
    of `inputs`) when given. Returns (first answer token [B],
    kept [(row, Prepared, predicted answer)], skipped [(Prepared, reason)]).

    A sample whose first-token distribution is not finite is skipped (its answer says nothing). Then, with
    filter_correct, a sample is skipped when its answer did not end within max_new_tokens, or when it
    differs from the gold answer; without, every sample is kept (an unfinished answer as decoded so far)."""
    stop = stop_tokens(model)
    gen = model.generate(inputs, max_new_tokens=max_new_tokens, eos_token_id=stop, prefill=prefill)
    finite = np.isfinite(gen.first_token_probs).all(-1)  # [B]
    keep, skip = [], []
    for j, p in enumerate(group):
        predicted = decode_answer(model.tokenizer, gen.tokens[j], stop)
        if not finite[j]:
            skip.append((p, f"non-finite next-token distribution of the prompt: {NONFINITE}"))
        elif filter_correct and not gen.finished[j]:
            shown = predicted if len(predicted) <= 60 else predicted[:60] + "..."
            skip.append((p, f"no EOS within {max_new_tokens} new tokens: decoded {shown!r}, gold {p.sample.answer!r}"))
        elif filter_correct and predicted.lower() != p.sample.answer.strip().lower():
            skip.append((p, f"wrong answer: predicted {predicted!r}, gold {p.sample.answer!r}"))
        else:
            keep.append((j, p, predicted))
    return gen.tokens[:, 0], keep, skip
