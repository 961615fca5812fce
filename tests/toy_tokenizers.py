"""Two small offline tokenizers shaped like the ones LLaVA checkpoints ship, for prompt and region tests.

- `llama2_tokenizer()`: Llama-2 / Vicuna style (LLaVA-1.5, LLaVA-1.6-vicuna). SentencePiece-like BPE: a Metaspace
  pre-tokenizer (`▁` starts a word, prepended only at the very start of the text: prepend scheme "first", which is
  what transformers' LlamaTokenizer builds with legacy=False; "always", legacy=True, is an option), byte fallback
  to `<0x00>`..`<0xFF>`, ids laid out as in Llama (0 `<unk>`, 1 `<s>`, 2 `</s>`, 3..258 the byte tokens), a
  post-processor adding `<s>`, and the two tokens llava-hf appends to the vocabulary: `<image>` and `<pad>`
  (special added tokens).
- `llama3_tokenizer()`: Llama-3 style (llama3-llava-next-8b). Byte-level BPE behind the Llama-3 split regex, a
  post-processor adding `<|begin_of_text|>`, the Llama-3 header / turn tokens, `<image>`, and the Llama-3-Instruct
  chat template.

- `mistral_tokenizer()`: Mistral-7B-Instruct-v0.2 style (llava-v1.6-mistral-7b): the Llama-2 layout, trained on
  `[INST] ... [/INST]` prompts (plain text in this vocabulary, no control tokens), `<image>` at id 32000 and `<pad>`
  at 32001 as in llava-v1.6-mistral-7b-hf, the llava-hf chat template.
- `yi_tokenizer()`: Yi style (llava-v1.6-34b): SentencePiece-like BPE without a dummy prefix (Metaspace prepend
  scheme "never": no `▁` at the start of a text or after an added token), newline a piece of its own, byte fallback,
  `<unk>` `<|startoftext|>` `<|endoftext|>` `<|im_start|>` `<|im_end|>` first, 64000 pieces, `<image>` at 64000,
  no BOS added by default, the llava-v1.6-34b-hf chat template.
- `qwen2_tokenizer()`: Qwen2 style (OneVision, interleave, NeXT-72b/110b): byte-level BPE behind the Qwen2 split
  regex (digits one by one) with an NFC normalizer, no BOS, 151643 pieces, then `<|endoftext|>` `<|im_start|>`
  `<|im_end|>` (151643..151645) and llava-hf's `<image>` (151646) and `<video>` (151647), the OneVision chat template.

All are trained on a small built-in corpus (prompt templates and GQA-like questions) in about a second; ids beyond
what the corpus needs are unreachable filler pieces, so the added tokens sit at the real checkpoints' ids. They are
`transformers` fast tokenizers and round-trip through `save_pretrained` / `AutoTokenizer.from_pretrained`.
"""

from __future__ import annotations

import functools
import json

from tokenizers import AddedToken, Regex, Tokenizer, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE
from tokenizers.trainers import BpeTrainer
from transformers import PreTrainedTokenizerFast

from jaxflow.world.tokenizer import (
    _SCRIPT_SPLIT,
    BYTE_TOKENS,
    SPECIALS,
    bpe_trainer_tokenizer,
    llama_layout,
    sentencepiece_bpe,
)

SYSTEM_VICUNA = ("A chat between a curious user and an artificial intelligence assistant. "
                 "The assistant gives helpful, detailed, and polite answers to the user's questions.")
SYSTEM_LLAMA3 = ("You are a helpful language and vision assistant. You are able to understand the visual content that "
                 "the user provides, and assist the user with a variety of tasks using natural language.")
INSTRUCTION = "Answer the question using a single word or phrase."

# The Meta-Llama-3-8B-Instruct chat template (LLaVA-NeXT's llava_llama_3 conversation renders through it).
LLAMA3_CHAT_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    "+ message['content'] | trim + '<|eot_id|>' %}"
    "{% if loop.index0 == 0 %}{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

_QUESTIONS = [
    "Is the jar full or empty?", "Is that floor brown or white?", "Which kind of animal is this, a cat or a bird?",
    "What is this, a cabinet or a bed?", "Is the surfer to the left or to the right of the surfboard?",
    "Is the faucet to the right or to the left of the toilet?", "What do the marker and the post have in common?",
    "What do both the stump and the fence have in common?", "Is there any grass or mud that is not brown?",
    "Is there either a table or a bookcase that is made of wood?", "On which side of the photo is the curtain?",
    "On which side of the photo is the coleslaw?", "Which side of the picture is the man on?",
    "Is the shirt red or blue?", "Are the pants long or short?", "Is the sky cloudy or clear?",
    "Which color is the car, black or silver?", "Is the plate round or square?", "Is the water calm or wavy?",
    "Which type of furniture is white, the table or the bed?", "What type of device is orange, the phone or laptop?",
    "Which vehicle is white, the train car or the car?", "Is the person to the right or to the left of the chair?",
    "Are there both cars and trucks in the picture?", "Is there a dog or a horse in the image?",
    "What do the shirt and the cap have in common?", "Are the bowl and the cup made of the same material?",
    "Is the woman wearing a hat or glasses?", "Which kind of vehicle is parked, a bus or a truck?",
    "Is the lamp on the left or on the right?", "Is the grass green or dry?", "Is the building tall or short?",
    "Which animal is standing, the zebra or the giraffe?", "Is the fence wooden or metallic?",
    "Is the pillow on the bed yellow or white?", "Which side is the bottle on?", "Who is holding the umbrella?",
    "What color is the boat near the dock?", "Is the elephant small or large?", "Is the tree tall or short?",
    "Is there a clock or a sign that is not silver?", "Is the laptop open or closed?",
]
_WORDS = ("yes no left right top bottom red green blue yellow white black brown gray orange pink purple wood metal "
          "plastic glass cat dog bird horse cow sheep man woman boy girl person people table chair bed sofa couch "
          "window door wall floor ceiling sky tree grass water road street car truck bus train bike bicycle plane boat "
          "shirt pants hat jacket helmet bag plate cup bowl bottle glass pizza cake banana apple photo picture image")


def corpus() -> list[str]:
    """Lines the toy tokenizers are trained on: rendered prompts, GQA-like questions and common answer words."""
    lines = []
    for q in _QUESTIONS:
        lines.append(f"{SYSTEM_VICUNA} USER: <image>\n{q} \n{INSTRUCTION} ASSISTANT:")
        lines.append(f"{SYSTEM_LLAMA3}\n\n<image>\n{q} \n{INSTRUCTION}\n\n \n")
        lines.append(q)
    lines += [_WORDS, _WORDS.title(), "0 1 2 3 4 5 6 7 8 9 10 100 2024, (x, y); [a] {b} - _ + = ! ? . : ' \" / \\"]
    return lines


def _wrap(tk: Tokenizer, **kwargs) -> PreTrainedTokenizerFast:
    return PreTrainedTokenizerFast(tokenizer_object=tk, clean_up_tokenization_spaces=False, **kwargs)


@functools.cache
def _llama2_backend(vocab_size: int, prepend_scheme: str) -> Tokenizer:
    trainer_tk = bpe_trainer_tokenizer()
    trainer = BpeTrainer(vocab_size=vocab_size - len(BYTE_TOKENS), special_tokens=SPECIALS, show_progress=False)
    # Like Llama's SentencePiece model, no piece holds a newline: "\n" always falls back to the byte <0x0A>.
    trainer_tk.train_from_iterator([line.replace("\n", " ") for line in corpus()], trainer)
    return llama_layout(trainer_tk, prepend_scheme)


def llama2_tokenizer(vocab_size: int = 1000, prepend_scheme: str = "first") -> PreTrainedTokenizerFast:
    """Llama-2 / Vicuna-style SentencePiece-like tokenizer with `<image>` and `<pad>` added (llava-hf layout).

    `prepend_scheme` "first" puts `▁` only at the start of the text (transformers' LlamaTokenizer with
    legacy=False); "always" also after every added token, e.g. after `<image>` (legacy=True)."""
    tk = _llama2_backend(vocab_size, prepend_scheme)
    return _wrap(tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
                 extra_special_tokens={"image_token": "<image>"})


LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


@functools.cache
def _llama3_backend(vocab_size: int) -> Tokenizer:
    tk = Tokenizer(BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=False),
    ])
    tk.decoder = decoders.ByteLevel()
    trainer = BpeTrainer(vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                         show_progress=False)
    tk.train_from_iterator(corpus(), trainer)
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in LLAMA3_SPECIALS])
    bos = tk.token_to_id("<|begin_of_text|>")
    tk.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A <|begin_of_text|> $B",
                                      special_tokens=[("<|begin_of_text|>", bos)]),
    ])
    tk.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    return tk


def llama3_tokenizer(vocab_size: int = 1200) -> PreTrainedTokenizerFast:
    """Llama-3-style byte-level BPE tokenizer with the Llama-3 chat tokens and `<image>` added."""
    tk = _llama3_backend(vocab_size)
    return _wrap(tk, bos_token="<|begin_of_text|>", eos_token="<|eot_id|>", chat_template=LLAMA3_CHAT_TEMPLATE,
                 extra_special_tokens={"image_token": "<image>"})


def save(tokenizer: PreTrainedTokenizerFast, path) -> str:
    """Saves `tokenizer` to the directory `path` (reload it with `AutoTokenizer.from_pretrained(path)`)."""
    tokenizer.save_pretrained(str(path))
    return str(path)


# ---------------------------------------------------------------- Mistral, Yi, Qwen2

# The chat templates the llava-hf processors ship (chat_template.json) for llava-v1.6-mistral-7b-hf, llava-v1.6-34b-hf
# and llava-onevision-qwen2-*-hf, and Qwen2-Instruct's tokenizer template (lmms-lab's original-layout Qwen saves).
LLAVA_HF_MISTRAL_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ '[INST] ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{' [/INST]' }}{% elif message['role'] == 'assistant' %}{{ ' ' + message['content'][0]['text'] + '</s> '}}"
    "{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)
LLAVA_HF_YI_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAVA_HF_ONEVISION_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}{{ '<video>\n' }}{% endfor %}"
    "{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}"
    "{{'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
QWEN2_INSTRUCT_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

MISTRAL_VOCAB, YI_VOCAB, QWEN2_VOCAB = 32000, 64000, 151643  # pieces before the added tokens
YI_SPECIALS = ["<unk>", "<|startoftext|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")


def family_corpus(prefix: str, suffix: str) -> list[str]:
    """`corpus()` plus every question in one family's prompt format."""
    return corpus() + [f"{prefix}<image>\n{q} \n{INSTRUCTION}{suffix}" for q in _QUESTIONS]


def _pieces(trained: Tokenizer, first: list[str], keep_newline: bool, size: int) -> tuple[dict, list]:
    """`first` tokens, the 256 byte-fallback tokens, the learned pieces, then unreachable fillers up to `size`."""
    learned = json.loads(trained.to_str())["model"]
    vocab = {tok: i for i, tok in enumerate(first + BYTE_TOKENS)}
    for tok, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]):
        if keep_newline or "\n" not in tok:
            vocab.setdefault(tok, len(vocab))
    merges = [tuple(m.split(" ", 1)) if isinstance(m, str) else tuple(m) for m in learned["merges"]]
    merges = [m for m in merges if keep_newline or "\n" not in m[0] + m[1]]
    vocab.update({f"<filler{i}>": i for i in range(len(vocab), size)})
    return vocab, merges


def _added(tk: Tokenizer, tokens: list[str]) -> None:
    tk.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in tokens])


@functools.cache
def _mistral_backend(prepend_scheme: str) -> Tokenizer:
    trainer_tk = bpe_trainer_tokenizer()
    trainer_tk.train_from_iterator([line.replace("\n", " ") for line in family_corpus("[INST] ", " [/INST]")],
                                   BpeTrainer(vocab_size=800, special_tokens=SPECIALS, show_progress=False))
    vocab, merges = _pieces(trainer_tk, SPECIALS, keep_newline=False, size=MISTRAL_VOCAB)
    tk = sentencepiece_bpe(vocab, merges, prepend_scheme)
    _added(tk, SPECIALS + ["<image>", "<pad>"])
    return tk


def mistral_tokenizer(prepend_scheme: str = "first") -> PreTrainedTokenizerFast:
    """Mistral-7B-Instruct-v0.2-style tokenizer with llava-hf's `<image>` (32000) and `<pad>` (32001)."""
    return _wrap(_mistral_backend(prepend_scheme), bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                 pad_token="<pad>", chat_template=LLAVA_HF_MISTRAL_CHAT_TEMPLATE,
                 extra_special_tokens={"image_token": "<image>"})


@functools.cache
def _yi_backend(add_bos: bool) -> Tokenizer:
    trainer_tk = Tokenizer(BPE(unk_token="<unk>"))
    trainer_tk.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True),
        pre_tokenizers.Split(_SCRIPT_SPLIT, "isolated")])
    lines = family_corpus("<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n",
                          "<|im_end|><|im_start|>assistant\n")
    trainer_tk.train_from_iterator([line.replace("<|im_start|>", "\n").replace("<|im_end|>", "\n") for line in lines],
                                   BpeTrainer(vocab_size=1000, special_tokens=YI_SPECIALS, show_progress=False))
    vocab, merges = _pieces(trainer_tk, YI_SPECIALS, keep_newline=True, size=YI_VOCAB)
    tk = Tokenizer(BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    tk.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()])
    if add_bos:
        bos = vocab["<|startoftext|>"]
        tk.post_processor = processors.TemplateProcessing(
            single="<|startoftext|> $A", pair="<|startoftext|> $A <|startoftext|> $B",
            special_tokens=[("<|startoftext|>", bos)])
    _added(tk, YI_SPECIALS + ["<image>", "<pad>"])
    return tk


def yi_tokenizer(add_bos: bool = False) -> PreTrainedTokenizerFast:
    """Yi-style SentencePiece-like tokenizer (llava-v1.6-34b) with llava-hf's `<image>` (64000) and `<pad>`."""
    return _wrap(_yi_backend(add_bos), bos_token="<|startoftext|>", eos_token="<|im_end|>", unk_token="<unk>",
                 pad_token="<pad>", chat_template=LLAVA_HF_YI_CHAT_TEMPLATE,
                 extra_special_tokens={"image_token": "<image>"})


@functools.cache
def _qwen2_backend() -> Tokenizer:
    split = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    trainer_tk = Tokenizer(BPE())
    trainer_tk.normalizer, trainer_tk.pre_tokenizer = normalizers.NFC(), split
    trainer_tk.train_from_iterator(
        family_corpus("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n",
                      "<|im_end|>\n<|im_start|>assistant\n"),
        BpeTrainer(vocab_size=1200, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    vocab, merges = _pieces(trainer_tk, [], keep_newline=True, size=0)
    vocab = {t: i for t, i in vocab.items() if t not in BYTE_TOKENS}  # byte-level: the alphabet is the bytes
    vocab = {t: i for i, t in enumerate(sorted(vocab, key=vocab.get))}
    vocab.update({f"<filler{i}>": i for i in range(len(vocab), QWEN2_VOCAB)})
    tk = Tokenizer(BPE(vocab=vocab, merges=merges))
    tk.normalizer, tk.pre_tokenizer = normalizers.NFC(), split
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    _added(tk, QWEN2_SPECIALS + ["<image>", "<video>"])
    return tk


def qwen2_tokenizer(chat_template: str = LLAVA_HF_ONEVISION_CHAT_TEMPLATE) -> PreTrainedTokenizerFast:
    """Qwen2-style byte-level BPE (151643 pieces) with the Qwen2 chat tokens and llava-hf's `<image>` (151646)."""
    return _wrap(_qwen2_backend(), eos_token="<|im_end|>", pad_token="<|endoftext|>", chat_template=chat_template,
                 extra_special_tokens={"image_token": "<image>", "video_token": "<video>"})
