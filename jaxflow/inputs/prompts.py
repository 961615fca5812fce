"""Prompt templates of the LLaVA family, and their tokenization into model inputs with character offsets.

`build_prompt` renders a question into the text the original LLaVA code feeds the model and records the character
spans of the question, the `<image>` placeholder and the instruction. `encode` tokenizes that text the way either
code base does and expands the placeholder into the image features' positions; every token keeps the character span
it came from, so `token_span` turns any substring of the prompt (question, answer options, ...) into token positions.

Templates (exact strings, `{q}` the question, `{i}` the instruction suffix " \\nAnswer the question using a single
word or phrase." which the study appends to the question, on by default). The text is the same in both tokenization
modes except for `chatml_direct`, where LLaVA's conversation and the llava-hf chat template disagree:

- `vicuna_v1` (LLaVA-1.5, LLaVA-1.6-vicuna; LLaVA's `conv_vicuna_v1`, SeparatorStyle.TWO with sep " ", sep2 "</s>",
  roles USER / ASSISTANT, the assistant turn left open):
  `"{SYSTEM_VICUNA} USER: <image>\\n{q}{i} ASSISTANT:"`
- `llava_llama_3` (llama3-llava-next-8b; LLaVA-NeXT's `conv_llava_llama_3`, rendered by the Meta-Llama-3-Instruct
  chat template with the generation prompt, user content trimmed by the template; the study then appends " \\n"):
  `"<|begin_of_text|><|start_header_id|>system<|end_header_id|>\\n\\n{SYSTEM_LLAMA3}<|eot_id|>"`
  `"<|start_header_id|>user<|end_header_id|>\\n\\n<image>\\n{q}{i}<|eot_id|>"`
  `"<|start_header_id|>assistant<|end_header_id|>\\n\\n \\n"`
  The text carries `<|begin_of_text|>` because the chat template renders `bos_token`; a tokenizer that adds its own
  BOS (Meta-Llama-3's does) therefore yields two BOS tokens in both modes, as LLaVA-NeXT's own pipeline does;
  `encode(..., add_special_tokens=False)` gives one (llava-hf mode).
- `mistral_instruct` (llava-v1.6-mistral-7b; LLaVA's `conv_mistral_instruct`, SeparatorStyle.LLAMA_2 with an empty
  system text, so no `<<SYS>>` block): `"[INST] <image>\\n{q}{i} [/INST]"`. The llava-hf chat template renders the
  same text; neither puts `<s>` in the text: the tokenizer adds it.
- `chatml_direct` (llava-v1.6-34b, Yi; LLaVA's `conv_chatml_direct`, SeparatorStyle.MPT with sep `<|im_end|>`):
  original: `"<|im_start|>system\\nAnswer the questions.<|im_end|><|im_start|>user\\n<image>\\n{q}{i}<|im_end|>"`
  `"<|im_start|>assistant\\n"` (no newline after `<|im_end|>`, as the model was trained); llava-hf: what the
  llava-v1.6-34b-hf chat template renders with that system message, a newline after every `<|im_end|>`.
- `qwen_1_5` (LLaVA-OneVision, LLaVA-interleave, LLaVA-NeXT-72b/110b, Qwen2 decoders; LLaVA-NeXT's `conv_qwen`,
  SeparatorStyle.CHATML): `"<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n<|im_start|>user\\n"`
  `"<image>\\n{q}{i}<|im_end|>\\n<|im_start|>assistant\\n"`; the llava-hf OneVision chat template renders the same
  text when given that system message (it adds none of its own).
- `plain` (LLaVA's `conv_llava_plain`, SeparatorStyle.PLAIN, sep "\\n", no system text): `"<image>\\n{q}{i}\\n"`.

`default_template` picks the template a checkpoint's chat template (or, without one, its vocabulary or name)
belongs to.

Tokenization modes of `encode`:

- `"llava-hf"`: transformers' `LlavaProcessor` / `LlavaNextProcessor`: the text is tokenized in one call with
  `<image>` an added special token of the vocabulary, and that token is repeated once per image feature (the
  processor repeats the string before tokenizing, which gives the same ids because an added token always stands
  alone).
- `"original"`: LLaVA's `tokenizer_image_token`: the text is split on `<image>`, each chunk is tokenized on its own
  (each call adds the tokenizer's BOS), and the chunks are joined with the placeholder id (-200 in LLaVA) between
  them; when the first chunk starts with BOS, that BOS is kept once and the first token of every chunk is dropped
  (the per-chunk BOS). The model later expands the placeholder into the image features; `encode` does that
  expansion here. Because every chunk is tokenized as a fresh text, a SentencePiece tokenizer prepends its word
  marker `▁` to the chunk after the image ("\\nIs..." -> `▁`, `<0x0A>`, ...), which the one-call llava-hf
  tokenization does not do after an added token when the Metaspace prepend scheme is "first" (transformers'
  LlamaTokenizer with legacy=False): the original sequence then has one extra token right after the image, and
  every later position is shifted by one. With prepend scheme "always" (legacy=True) both modes agree token for
  token; byte-level tokenizers (Llama-3) have no marker and agree too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np

IMAGE_PLACEHOLDER = "<image>"
INSTRUCTION = "Answer the question using a single word or phrase."
INSTRUCTION_SUFFIX = " \n" + INSTRUCTION  # what the study appends to the question
SYSTEM_VICUNA = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SYSTEM_LLAMA3 = ("You are a helpful language and vision assistant. You are able to understand the visual content that "
                 "the user provides, and assist the user with a variety of tasks using natural language.")
LLAMA3_STUDY_SUFFIX = " \n"  # the study appends this after the llava_llama_3 prompt
SYSTEM_CHATML_DIRECT = "Answer the questions."
SYSTEM_QWEN = "You are a helpful assistant."
MODES = ("llava-hf", "original")


@dataclasses.dataclass(frozen=True)
class Template:
    """A conversation format: the text before and after the user turn (`<image>\\n{question}{instruction}`)."""

    prefix: str
    suffix: str
    trim_user: bool = False  # the chat template trims the user content (Llama-3's does)
    study_suffix: str = ""  # what the study appends after the prompt
    llava_hf: tuple[str, str] | None = None  # (prefix, suffix) where the llava-hf chat template renders otherwise


_LLAMA3_HEADER = "<|start_header_id|>{}<|end_header_id|>\n\n"
_TEMPLATES = {
    "vicuna_v1": Template(SYSTEM_VICUNA + " USER: ", " ASSISTANT:"),
    "llava_llama_3": Template("<|begin_of_text|>" + _LLAMA3_HEADER.format("system") + SYSTEM_LLAMA3 + "<|eot_id|>"
                              + _LLAMA3_HEADER.format("user"), "<|eot_id|>" + _LLAMA3_HEADER.format("assistant"),
                              trim_user=True, study_suffix=LLAMA3_STUDY_SUFFIX),
    "mistral_instruct": Template("[INST] ", " [/INST]"),
    "chatml_direct": Template(
        f"<|im_start|>system\n{SYSTEM_CHATML_DIRECT}<|im_end|><|im_start|>user\n", "<|im_end|><|im_start|>assistant\n",
        llava_hf=(f"<|im_start|>system\n{SYSTEM_CHATML_DIRECT}<|im_end|>\n<|im_start|>user\n",
                  "<|im_end|>\n<|im_start|>assistant\n")),
    "qwen_1_5": Template(f"<|im_start|>system\n{SYSTEM_QWEN}<|im_end|>\n<|im_start|>user\n",
                         "<|im_end|>\n<|im_start|>assistant\n"),
    "plain": Template("", "\n"),
}
TEMPLATES = tuple(_TEMPLATES)


@dataclasses.dataclass(frozen=True)
class Prompt:
    """A rendered prompt. Spans are half-open character ranges [start, end) into `text`."""

    text: str
    template: str
    question: str
    question_span: tuple[int, int]
    image_span: tuple[int, int]
    instruction_span: tuple[int, int] | None  # the instruction sentence, without the " \n" before it

    def question_substring_span(self, start: int, end: int) -> tuple[int, int]:
        """The span in `text` of the question's characters [start, end) (e.g. an answer option)."""
        if not 0 <= start <= end <= len(self.question):
            raise ValueError(f"span ({start}, {end}) is not inside the question (length {len(self.question)})")
        return self.question_span[0] + start, self.question_span[0] + end


def build_prompt(question: str, template: str = "vicuna_v1", *, instruction: bool = True,
                 study_suffix: bool = True, mode: str = "llava-hf") -> Prompt:
    """Renders `question` with `template` (one of `TEMPLATES`) as the `mode`'s code base does (see the module
    docstring: only chatml_direct differs).

    `instruction` appends " \\nAnswer the question using a single word or phrase." to the question (the study's
    GQA prompt). `study_suffix` appends " \\n" after the llava_llama_3 prompt, as the study does for
    llama3-llava-next-8b (the other templates have no such suffix).
    """
    if template not in _TEMPLATES:
        raise ValueError(f"unknown prompt template {template!r}; known: {', '.join(TEMPLATES)}")
    if mode not in MODES:
        raise ValueError(f"unknown tokenization mode {mode!r}; known: {', '.join(MODES)}")
    if not question.strip():
        raise ValueError("the question is empty")
    if IMAGE_PLACEHOLDER in question:
        raise ValueError(f"the question contains the image placeholder {IMAGE_PLACEHOLDER!r}: {question!r}")
    spec = _TEMPLATES[template]
    prefix, suffix = spec.llava_hf if mode == "llava-hf" and spec.llava_hf else (spec.prefix, spec.suffix)
    if study_suffix:
        suffix += spec.study_suffix
    user = IMAGE_PLACEHOLDER + "\n" + question + (INSTRUCTION_SUFFIX if instruction else "")
    if spec.trim_user:
        user = user.strip()
    text = prefix + user + suffix
    image_start = len(prefix)
    q_start = image_start + len(IMAGE_PLACEHOLDER) + 1
    q_end = min(q_start + len(question), len(prefix) + len(user))
    instruction_span = None
    if instruction:
        i_end = len(prefix) + len(user)
        instruction_span = (i_end - len(INSTRUCTION), i_end)
    return Prompt(text, template, question, (q_start, q_end), (image_start, image_start + len(IMAGE_PLACEHOLDER)),
                  instruction_span)


# What a chat template writes -> its family, checked in order. Yi's and Qwen's ChatML templates render alike; the
# vocabulary tells them apart (Yi's BOS is <|startoftext|>, Qwen has no BOS).
_CHAT_TEMPLATE_MARKERS = (("<|start_header_id|>", "llava_llama_3"), ("[INST]", "mistral_instruct"),
                          ("<|im_start|>", "chatml"), ("ASSISTANT:", "vicuna_v1"))
_VOCAB_MARKERS = (("<|start_header_id|>", "llava_llama_3"), ("[INST]", "mistral_instruct"), ("<|im_start|>", "chatml"))
_YI_BOS = "<|startoftext|>"
# A checkpoint's name (lower-cased) -> its template, checked in order.
_NAME_RULES = ((re.compile(r"llama-?3"), "llava_llama_3"), (re.compile(r"mistral"), "mistral_instruct"),
               (re.compile(r"34b"), "chatml_direct"), (re.compile(r"qwen|onevision|interleave|72b|110b"), "qwen_1_5"))
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


def read_chat_template(directory: str | os.PathLike | None) -> str | None:
    """The chat template a checkpoint directory ships (processor or tokenizer: `CHAT_TEMPLATE_FILES`, first found;
    of a list of named templates the "default" one), or None."""
    if directory is None:
        return None
    for name in CHAT_TEMPLATE_FILES:
        path = os.path.join(directory, name)
        if not os.path.isfile(path):
            continue
        with open(path, encoding="utf-8") as f:
            if name.endswith(".jinja"):
                return f.read()
            try:
                template = json.load(f).get("chat_template")
            except (json.JSONDecodeError, AttributeError) as e:
                raise ValueError(f"{path}: not a JSON object ({e})") from None
        if isinstance(template, list):  # [{"name": ..., "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
            template = named.get("default")
        if isinstance(template, str) and template:
            return template
    return None


def default_template(tokenizer: Any = None, chat_template: str | None = None, names: Sequence[str] = ()) -> str:
    """The template a checkpoint was trained with, from the first of: its chat template (`chat_template`, else the
    tokenizer's), the chat tokens of its vocabulary, its `names` (checkpoint or directory names), else vicuna_v1."""
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    chat_template = chat_template or getattr(tokenizer, "chat_template", None)
    if isinstance(chat_template, dict):  # transformers keeps several named templates as a dict
        chat_template = chat_template.get("default")
    family = None
    if isinstance(chat_template, str):
        family = next((t for marker, t in _CHAT_TEMPLATE_MARKERS if marker in chat_template), None)
    family = family or next((t for marker, t in _VOCAB_MARKERS if marker in vocab), None)
    if family == "chatml":
        return "chatml_direct" if _YI_BOS in vocab else "qwen_1_5"
    if family:
        return family
    for name in names:
        found = next((t for rule, t in _NAME_RULES if name and rule.search(name.lower())), None)
        if found:
            return found
    return "vicuna_v1"


@dataclasses.dataclass(frozen=True)
class Encoded:
    """Token ids of one prompt with its image placeholder expanded into the image features' positions.

    `offsets[i]` is the half-open character span in `text` that token i came from: the placeholder's span for image
    positions, a zero-width span for tokens the tokenizer added (BOS). `blank[i]` is True for text tokens that decode
    to whitespace only.
    """

    input_ids: np.ndarray  # (n,) int64
    offsets: np.ndarray  # (n, 2) int64
    image_positions: np.ndarray  # (num_image_features,) int64, contiguous
    blank: np.ndarray  # (n,) bool
    text: str
    mode: str

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def last_position(self) -> int:
        return len(self) - 1


def _tokenize(tokenizer: Any, text: str, add_special_tokens: bool) -> tuple[list[int], list[tuple[int, int]]]:
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError("encode needs a transformers fast tokenizer (character offsets come from `tokenizers`)")
    enc = tokenizer(text, return_offsets_mapping=True, add_special_tokens=add_special_tokens)
    return list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]


_BLANK_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _blank(tokenizer: Any, ids: list[int]) -> list[bool]:
    """Whether each token decodes (on its own) to whitespace only; cached per tokenizer and id."""
    try:
        cache = _BLANK_CACHE.setdefault(tokenizer, {})
    except TypeError:  # not weak-referenceable
        cache = {}
    todo = sorted({t for t in ids if t not in cache})
    if todo:
        for t, s in zip(todo, tokenizer.batch_decode([[t] for t in todo]), strict=True):
            cache[t] = not s.strip()
    return [cache[t] for t in ids]


def encode(prompt: Prompt | str, tokenizer: Any, image_token_id: int, num_image_features: int,
           mode: str = "llava-hf", *, add_special_tokens: bool = True) -> Encoded:
    """Tokenizes a prompt holding exactly one `<image>` and expands it into `num_image_features` copies of
    `image_token_id` (see the module docstring for the two modes).

    In "llava-hf" mode the tokenizer must have `<image>` as an added token whose id is `image_token_id` (a mismatch
    means tokenizer and checkpoint do not belong together). In "original" mode `image_token_id` is whatever the
    checkpoint uses for the image (LLaVA's -200; the converter keeps it). `add_special_tokens=False` tokenizes
    without the tokenizer's own BOS (the original mode then has nothing to strip from the chunks).
    """
    text = prompt.text if isinstance(prompt, Prompt) else prompt
    if mode not in MODES:
        raise ValueError(f"unknown tokenization mode {mode!r}; known: {', '.join(MODES)}")
    if num_image_features < 1:
        raise ValueError(f"num_image_features must be positive, got {num_image_features}")
    if (count := text.count(IMAGE_PLACEHOLDER)) != 1:
        raise ValueError(f"the prompt must hold exactly one {IMAGE_PLACEHOLDER!r}, found {count}")
    image_start = text.index(IMAGE_PLACEHOLDER)
    image_span = (image_start, image_start + len(IMAGE_PLACEHOLDER))

    if mode == "llava-hf":
        placeholder = tokenizer.convert_tokens_to_ids(IMAGE_PLACEHOLDER)
        if IMAGE_PLACEHOLDER not in tokenizer.get_added_vocab():
            raise ValueError(f"the tokenizer has no added {IMAGE_PLACEHOLDER!r} token (an original-layout LLaVA "
                             "tokenizer?): use mode='original'")
        if placeholder != image_token_id:
            raise ValueError(f"the tokenizer's {IMAGE_PLACEHOLDER!r} id is {placeholder}, but the model's "
                             f"image_token_id is {image_token_id}: tokenizer and checkpoint do not match")
        ids, offsets = _tokenize(tokenizer, text, add_special_tokens)
        where = [i for i, t in enumerate(ids) if t == placeholder]
        if len(where) != 1 or offsets[where[0]] != image_span:
            raise ValueError(f"{IMAGE_PLACEHOLDER!r} did not tokenize into one token at characters {image_span}")
        k = where[0]
        ids_a, off_a, ids_b, off_b = ids[:k], offsets[:k], ids[k + 1:], offsets[k + 1:]
    else:
        before, after = text[:image_start], text[image_span[1]:]
        (ids0, off0), (ids1, off1) = (_tokenize(tokenizer, chunk, add_special_tokens) for chunk in (before, after))
        off1 = [(s + image_span[1], e + image_span[1]) for s, e in off1]
        bos = tokenizer.bos_token_id
        head: tuple[list[int], list[tuple[int, int]]] = ([], [])
        if ids0 and bos is not None and ids0[0] == bos:
            # LLaVA keeps the first chunk's BOS once and drops the first token of every chunk (its BOS).
            if not ids1 or ids1[0] != bos:
                raise ValueError("the tokenizer added BOS to the first chunk but not to the one after the image; "
                                 "LLaVA's tokenizer_image_token would drop a real token here")
            head = ([ids0[0]], [off0[0]])
            ids0, off0, ids1, off1 = ids0[1:], off0[1:], ids1[1:], off1[1:]
        ids_a, off_a, ids_b, off_b = head[0] + ids0, head[1] + off0, ids1, off1

    n_a = len(ids_a)
    input_ids = np.asarray(ids_a + [image_token_id] * num_image_features + ids_b, dtype=np.int64)
    offsets = np.asarray(off_a + [image_span] * num_image_features + off_b, dtype=np.int64).reshape(-1, 2)
    blank_text = _blank(tokenizer, ids_a + ids_b)
    blank = np.asarray(blank_text[:n_a] + [False] * num_image_features + blank_text[n_a:], dtype=bool)
    image_positions = np.arange(n_a, n_a + num_image_features, dtype=np.int64)
    return Encoded(input_ids, offsets, image_positions, blank, text, mode)


def _trim(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def token_span(encoded: Encoded, char_start: int, char_end: int) -> list[int]:
    """Positions of the tokens whose character offsets overlap [char_start, char_end), ascending.

    The range is first trimmed of surrounding whitespace: SentencePiece (`▁word`) and byte-level (`Ġword`) tokens
    report offsets that include the space before the word, so the word's token counts for a span starting at the
    word, while a token that touches the span only through a leading or trailing space (`▁` alone, `Ġ\\n` after a
    question) does not. Whitespace-only tokens at either end of the selection are dropped too (a SentencePiece `▁`
    prepended at the start of a chunk is aligned with the chunk's first character). Zero-width tokens (BOS added by
    the tokenizer) never count; image positions count only when the range covers the `<image>` placeholder.
    """
    start, end = _trim(encoded.text, char_start, char_end)
    if start >= end:
        return []
    s, e = encoded.offsets[:, 0], encoded.offsets[:, 1]
    positions = np.flatnonzero((s < end) & (e > start) & (e > s)).tolist()
    while positions and encoded.blank[positions[0]]:
        positions.pop(0)
    while positions and encoded.blank[positions[-1]]:
        positions.pop()
    return positions


def span_problem(encoded: Encoded, char_start: int, char_end: int) -> str | None:
    """Why the tokens of [char_start, char_end) do not represent exactly that text, or None when they do.

    Problems: no token overlaps the span; the span's first or last non-space character is not covered; a boundary
    falls inside a token that also covers non-space characters outside the span (a merge across the boundary); the
    positions are not contiguous.
    """
    text = encoded.text
    start, end = _trim(text, char_start, char_end)
    what = repr(text[start:end])
    positions = token_span(encoded, start, end)
    if not positions:
        return f"no token covers {what}"
    if positions != list(range(positions[0], positions[-1] + 1)):
        return f"the tokens of {what} are not contiguous: {positions}"
    first, last = encoded.offsets[positions[0]], encoded.offsets[positions[-1]]
    if first[0] > start or last[1] < end:
        return f"the tokens of {what} cover characters {int(first[0])}..{int(last[1])}, not {start}..{end}"
    outside = text[first[0]:start] + text[end:last[1]]
    if outside.strip():
        return f"a token boundary of {what} falls inside a token that also covers {outside.strip()!r}"
    return None
