"""The toy LLaVA's tokenizer: a small Llama-2 / Vicuna-style SentencePiece-like BPE for the toy world.

Laid out like the llava-1.5 tokenizer: ids 0 `<unk>`, 1 `<s>`, 2 `</s>`, 3..258 the byte-fallback
tokens `<0x00>`..`<0xFF>`, then the learned pieces, then the two tokens llava-hf appends: `<image>`
and `<pad>` (special added tokens). A Metaspace pre-tokenizer marks word starts with `▁` (prepend
scheme "first", as transformers' LlamaTokenizer with legacy=False), a post-processor adds `<s>`.

The BPE is trained on the vicuna_v1 prompt text and every question wording and word of the world
until every word of it is one piece ("▁circle", "▁red", "?"), so an answer's first token decodes to
the whole answer; anything else still tokenizes through the byte fallback.
"""

from __future__ import annotations

import json

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import PreTrainedTokenizerFast

from jaxflow.inputs.prompts import INSTRUCTION, SYSTEM_VICUNA
from jaxflow.world.questions import vocabulary_lines

SPECIALS = ["<unk>", "<s>", "</s>"]
BYTE_TOKENS = [f"<0x{i:02X}>" for i in range(256)]
# Never merge across a change of script (letters / digits / punctuation), as SentencePiece: training sees the text
# pre-split that way, so no learned merge crosses those boundaries and inference needs only the Metaspace split.
_SCRIPT_SPLIT = Regex(r"▁?[^\W\d_]+|▁?\d|▁?[^\w\s▁]+|▁")


def bpe_trainer_tokenizer() -> Tokenizer:
    """An empty BPE tokenizer to train: Metaspace word starts, then the SentencePiece script split."""
    tk = Tokenizer(BPE(unk_token="<unk>"))
    metaspace = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    tk.pre_tokenizer = pre_tokenizers.Sequence([metaspace, pre_tokenizers.Split(_SCRIPT_SPLIT, "isolated")])
    return tk


def sentencepiece_bpe(vocab: dict, merges: list, prepend_scheme: str) -> Tokenizer:
    """A byte-fallback BPE over `vocab`/`merges` that splits, decodes and adds `<s>` as SentencePiece does."""
    tk = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme=prepend_scheme, split=True)
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                    decoders.Strip(" ", 1, 0)])
    tk.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                      special_tokens=[("<s>", vocab["<s>"])])
    return tk


def llama_layout(trained: Tokenizer, prepend_scheme: str = "first") -> Tokenizer:
    """The trained BPE laid out as Llama-2's SentencePiece model and llava-hf's additions: ids `<unk>` `<s>` `</s>`,
    the 256 byte-fallback tokens, the learned pieces (none holding a newline: it falls back to <0x0A>), then
    `<image>` and `<pad>` as special added tokens; a post-processor adds `<s>`."""
    learned = json.loads(trained.to_str())["model"]
    vocab = {tok: i for i, tok in enumerate(SPECIALS + BYTE_TOKENS)}
    for tok, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        if "\n" not in tok:
            vocab.setdefault(tok, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    merges = [m for m in merges if "\n" not in m[0] + m[1]]
    tk = sentencepiece_bpe(vocab, merges, prepend_scheme)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    # llava-hf appends these two after the SentencePiece vocabulary (32000 and 32001 in llava-1.5-7b-hf)
    tk.add_special_tokens([AddedToken("<image>", special=True, normalized=False),
                           AddedToken("<pad>", special=True, normalized=False)])
    return tk


def corpus() -> list[str]:
    turn = "USER: {q} \n" + INSTRUCTION + " ASSISTANT:"
    lines = [f"{SYSTEM_VICUNA} " + turn.format(q="<image>\n" + q) + " yes</s>" + turn.format(q=q)
             for q in vocabulary_lines()]
    lines += vocabulary_lines()
    lines += [w.capitalize() for line in vocabulary_lines()[:1] for w in line.split()]
    return lines


def build_tokenizer() -> PreTrainedTokenizerFast:
    """Deterministic: the same corpus and trainer give the same vocabulary every time."""
    trainer_tk = bpe_trainer_tokenizer()
    # a vocabulary budget larger than the corpus needs: training stops once every word is one piece
    trainer = BpeTrainer(vocab_size=4000, special_tokens=SPECIALS, show_progress=False)
    # "\n" stays a piece of its own in training, so the word after it is learned without "▁" ("\nWhich" ->
    # "\n", "Which"); `llama_layout` then drops every piece holding a newline
    trainer_tk.train_from_iterator(corpus(), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=llama_layout(trainer_tk), bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>", clean_up_tokenization_spaces=False,
                                   extra_special_tokens={"image_token": "<image>"}, model_max_length=512,
                                   padding_side="right")
