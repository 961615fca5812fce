"""Prompt templates, tokenization in both modes (llava-hf processor and original LLaVA), and token spans."""

from __future__ import annotations

import re

import numpy as np
import pytest
import toy_tokenizers as toy
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from jaxflow.inputs.prompts import (
    INSTRUCTION,
    SYSTEM_LLAMA3,
    SYSTEM_VICUNA,
    TEMPLATES,
    build_prompt,
    encode,
    span_problem,
    token_span,
)

Q = "Is the jar full or empty?"
ORIGINAL_IMAGE_ID = -200
N = 7


@pytest.fixture(scope="module", params=["llama2", "llama3"])
def tok(request):
    return toy.llama2_tokenizer() if request.param == "llama2" else toy.llama3_tokenizer()


def image_id(tokenizer, mode):
    return tokenizer.convert_tokens_to_ids("<image>") if mode == "llava-hf" else ORIGINAL_IMAGE_ID


def norm(s: str) -> str:
    return " ".join(s.split())


def decode(tokenizer, encoded, positions):
    return norm(tokenizer.decode(encoded.input_ids[positions].tolist()))


# ---------------------------------------------------------------- templates


def test_template_strings():
    assert build_prompt(Q, "vicuna_v1").text == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nIs the jar full or empty? \n"
        "Answer the question using a single word or phrase. ASSISTANT:")
    assert build_prompt(Q, "vicuna_v1", instruction=False).text == (
        f"{SYSTEM_VICUNA} USER: <image>\nIs the jar full or empty? ASSISTANT:")
    assert build_prompt(Q, "plain").text == (
        "<image>\nIs the jar full or empty? \nAnswer the question using a single word or phrase.\n")
    assert build_prompt(Q, "plain", instruction=False).text == "<image>\nIs the jar full or empty?\n"
    llama3 = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are a helpful language and vision "
        "assistant. You are able to understand the visual content that the user provides, and assist the user with "
        "a variety of tasks using natural language.<|eot_id|><|start_header_id|>user<|end_header_id|>\n\n<image>\n"
        "Is the jar full or empty? \nAnswer the question using a single word or phrase.<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert build_prompt(Q, "llava_llama_3").text == llama3 + " \n"
    assert build_prompt(Q, "llava_llama_3", study_suffix=False).text == llama3
    assert build_prompt(Q, "llava_llama_3", instruction=False, study_suffix=False).text == llama3.replace(
        " \nAnswer the question using a single word or phrase.", "")


@pytest.mark.parametrize("instruction", [True, False])
def test_llama3_template_is_the_llama3_chat_template(instruction):
    """LLaVA-NeXT renders llava_llama_3 through the Meta-Llama-3-Instruct chat template."""
    user = "<image>\n" + Q + (" \n" + INSTRUCTION if instruction else "")
    rendered = toy.llama3_tokenizer().apply_chat_template(
        [{"role": "system", "content": SYSTEM_LLAMA3}, {"role": "user", "content": user}],
        tokenize=False, add_generation_prompt=True)
    assert build_prompt(Q, "llava_llama_3", instruction=instruction).text == rendered + " \n"


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("instruction", [True, False])
def test_spans_are_exact(template, instruction):
    p = build_prompt(Q, template, instruction=instruction)
    assert p.text[slice(*p.question_span)] == Q
    assert p.text[slice(*p.image_span)] == "<image>"
    assert p.text[p.image_span[1]] == "\n" and p.question_span[0] == p.image_span[1] + 1
    if instruction:
        assert p.text[slice(*p.instruction_span)] == INSTRUCTION
        assert p.text[p.question_span[1]:p.instruction_span[0]] == " \n"
    else:
        assert p.instruction_span is None
    assert p.text[slice(*p.question_substring_span(7, 10))] == "jar"


def test_bad_prompts():
    with pytest.raises(ValueError, match="unknown prompt template"):
        build_prompt(Q, "vicuna")
    with pytest.raises(ValueError, match="placeholder"):
        build_prompt("What is in <image>?")
    with pytest.raises(ValueError, match="empty"):
        build_prompt("  ")


# ---------------------------------------------------------------- encode


@pytest.mark.parametrize("template", TEMPLATES)
@pytest.mark.parametrize("mode", ["llava-hf", "original"])
def test_image_tokens_and_question_span(tok, template, mode):
    p = build_prompt("Which vehicle is white, the train car or the car?", template)
    img = image_id(tok, mode)
    e = encode(p, tok, img, N, mode)
    assert e.input_ids.dtype == np.int64 and e.offsets.dtype == np.int64 and e.offsets.shape == (len(e), 2)
    where = np.flatnonzero(e.input_ids == img)
    assert where.tolist() == e.image_positions.tolist() and len(where) == N
    assert np.all(np.diff(where) == 1)  # contiguous
    assert np.all(e.offsets[where] == p.image_span)
    # The image sits where the placeholder was: every token before it comes from text before the placeholder.
    assert np.all(e.offsets[: where[0], 1] <= p.image_span[0])
    assert np.all(e.offsets[where[-1] + 1:, 0] >= p.image_span[1])
    assert e.input_ids[0] == tok.bos_token_id and tuple(e.offsets[0]) == (0, 0)
    assert e.offsets[-1, 1] == len(p.text)  # the last position holds the prompt's last character
    q = token_span(e, *p.question_span)
    assert q == list(range(q[0], q[-1] + 1)) and q[0] > where[-1]
    assert decode(tok, e, q) == p.question
    assert span_problem(e, *p.question_span) is None
    # option and object words decode to themselves
    for word in ("train car", "car?", "white", "vehicle"):
        start = p.question.rindex(word)
        span = p.question_substring_span(start, start + len(word))
        assert decode(tok, e, token_span(e, *span)) == word
    # the instruction is not part of the question, and vice versa
    assert not set(q) & set(token_span(e, *p.instruction_span))


@pytest.mark.parametrize("mode", ["llava-hf", "original"])
def test_byte_fallback_question(tok, mode):
    p = build_prompt("Is the café ☕ open?", "vicuna_v1")
    e = encode(p, tok, image_id(tok, mode), N, mode)
    q = token_span(e, *p.question_span)
    assert decode(tok, e, q) == p.question
    start = p.question.index("café")
    assert decode(tok, e, token_span(e, *p.question_substring_span(start, start + 4))) == "café"


def test_llama2_byte_fallback_is_used():
    tok = toy.llama2_tokenizer()
    assert tok.convert_ids_to_tokens(tok("é\n", add_special_tokens=False).input_ids)[-3:] == [
        "<0xC3>", "<0xA9>", "<0x0A>"]


@pytest.mark.parametrize("template", TEMPLATES)
def test_llava_hf_mode_equals_transformers_llava_processor(tok, template):
    """transformers' LlavaProcessor (2x2 patches + CLS, "default" strategy -> 4 image tokens) gives the same ids."""
    import PIL.Image
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tok, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    p = build_prompt(Q, template)
    ids = processor(images=PIL.Image.new("RGB", (40, 30)), text=p.text, return_tensors="np")["input_ids"][0]
    e = encode(p, tok, tok.convert_tokens_to_ids("<image>"), 4, "llava-hf")
    assert e.input_ids.tolist() == ids.tolist()


def reference_tokenizer_image_token(text, tokenizer, image_token_index):
    """The published behaviour of LLaVA's `tokenizer_image_token` (llava/mm_utils.py), restated for the test."""
    chunks = [tokenizer(c).input_ids for c in text.split("<image>")]
    strip = int(bool(chunks and chunks[0] and chunks[0][0] == tokenizer.bos_token_id))
    out = chunks[0][:1] if strip else []
    for i, chunk in enumerate(chunks):
        if i:
            out.append(image_token_index)
        out.extend(chunk[strip:])
    return out


@pytest.mark.parametrize("template", TEMPLATES)
def test_original_mode_equals_llava_tokenizer_image_token(tok, template):
    p = build_prompt(Q, template)
    e = encode(p, tok, ORIGINAL_IMAGE_ID, N, "original")
    ref = reference_tokenizer_image_token(p.text, tok, ORIGINAL_IMAGE_ID)
    k = ref.index(ORIGINAL_IMAGE_ID)
    assert e.input_ids.tolist() == ref[:k] + [ORIGINAL_IMAGE_ID] * N + ref[k + 1:]


@pytest.mark.parametrize("template", TEMPLATES)
def test_modes_agree_except_right_after_the_image(template):
    """Where llava-hf and original LLaVA tokenization differ, with a Llama-2 (SentencePiece, Metaspace "first")
    tokenizer: the original tokenizes the text after the image as a fresh text, so it starts with the word marker
    `▁` (aligned with the "\\n"); llava-hf tokenizes in one call and prepends nothing after the added `<image>`.
    Everything before the image and every token after that extra `▁` is identical; the question (and the last
    position) sit one position later in the original sequence. Byte-level Llama-3 tokenization has no such marker:
    both modes give the same sequence."""
    p = build_prompt(Q, template)
    for tokenizer, extra in ((toy.llama2_tokenizer(), 1), (toy.llama3_tokenizer(), 0)):
        hf = encode(p, tokenizer, tokenizer.convert_tokens_to_ids("<image>"), N, "llava-hf")
        orig = encode(p, tokenizer, ORIGINAL_IMAGE_ID, N, "original")
        k = int(hf.image_positions[-1]) + 1  # first position after the image
        assert hf.image_positions.tolist() == orig.image_positions.tolist()
        assert hf.input_ids[:k - N].tolist() == orig.input_ids[:k - N].tolist()
        assert len(orig) == len(hf) + extra
        assert hf.input_ids[k:].tolist() == orig.input_ids[k + extra:].tolist()
        assert np.array_equal(hf.offsets[k:], orig.offsets[k + extra:])
        if extra:
            assert tokenizer.convert_ids_to_tokens(int(orig.input_ids[k])) == "▁"
            assert orig.blank[k] and p.text[slice(*orig.offsets[k])] == "\n"
        q_hf, q_orig = token_span(hf, *p.question_span), token_span(orig, *p.question_span)
        assert q_orig == [i + extra for i in q_hf]


@pytest.mark.parametrize("template", TEMPLATES)
def test_modes_agree_with_prepend_scheme_always(template):
    """A Llama tokenizer whose Metaspace prepends `▁` after added tokens too (transformers' LlamaTokenizer with
    legacy=True) puts the same `▁` after `<image>` in one call: then both modes give identical sequences. Which
    case a checkpoint is in shows in `tokenizer.backend_tokenizer.pre_tokenizer`."""
    tokenizer = toy.llama2_tokenizer(prepend_scheme="always")
    p = build_prompt(Q, template)
    hf = encode(p, tokenizer, tokenizer.convert_tokens_to_ids("<image>"), N, "llava-hf")
    orig = encode(p, tokenizer, ORIGINAL_IMAGE_ID, N, "original")
    assert np.array_equal(np.where(hf.input_ids == hf.input_ids[hf.image_positions[0]], -1, hf.input_ids),
                          np.where(orig.input_ids == ORIGINAL_IMAGE_ID, -1, orig.input_ids))
    assert np.array_equal(hf.offsets, orig.offsets)


def test_llama3_double_bos():
    """The Llama-3 chat template renders <|begin_of_text|> into the text and the tokenizer adds its own: both modes
    (like the study's inputs) start with two BOS tokens. add_special_tokens=False leaves the one in the text in
    llava-hf mode; in original mode LLaVA would then take the text's BOS for an added one and drop the first real
    token after the image, so encode refuses."""
    tok = toy.llama3_tokenizer()
    p = build_prompt(Q, "llava_llama_3")
    bos = tok.bos_token_id
    for mode in ("llava-hf", "original"):
        e = encode(p, tok, image_id(tok, mode), N, mode)
        assert e.input_ids[:3].tolist() == [bos, bos, tok.convert_tokens_to_ids("<|start_header_id|>")]
    hf = encode(p, tok, image_id(tok, "llava-hf"), N, "llava-hf")
    single = encode(p, tok, image_id(tok, "llava-hf"), N, "llava-hf", add_special_tokens=False)
    assert single.input_ids.tolist() == hf.input_ids[1:].tolist()
    assert tuple(single.offsets[0]) == (0, len("<|begin_of_text|>"))
    with pytest.raises(ValueError, match="would drop a real token"):
        encode(p, tok, ORIGINAL_IMAGE_ID, N, "original", add_special_tokens=False)
    vicuna = build_prompt(Q, "vicuna_v1")  # no BOS in the text: nothing to strip, nothing dropped
    plain = encode(vicuna, tok, ORIGINAL_IMAGE_ID, N, "original", add_special_tokens=False)
    full = encode(vicuna, tok, ORIGINAL_IMAGE_ID, N, "original")
    assert plain.input_ids.tolist() == full.input_ids[1:].tolist()


def test_processor_expansion_equals_tokenizing_repeated_placeholders(tok):
    p = build_prompt(Q, "vicuna_v1")
    e = encode(p, tok, tok.convert_tokens_to_ids("<image>"), N, "llava-hf")
    assert tok(p.text.replace("<image>", "<image>" * N)).input_ids == e.input_ids.tolist()


def test_encode_errors():
    tok = toy.llama2_tokenizer()
    p = build_prompt(Q)
    with pytest.raises(ValueError, match="do not match"):
        encode(p, tok, 32000, N, "llava-hf")
    with pytest.raises(ValueError, match="exactly one"):
        encode(p.text + "<image>", tok, ORIGINAL_IMAGE_ID, N, "original")
    with pytest.raises(ValueError, match="positive"):
        encode(p, tok, ORIGINAL_IMAGE_ID, 0, "original")
    with pytest.raises(ValueError, match="unknown tokenization mode"):
        encode(p, tok, ORIGINAL_IMAGE_ID, N, "hf")
    words = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1}, unk_token="<unk>"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    plain = PreTrainedTokenizerFast(tokenizer_object=words, unk_token="<unk>", bos_token="<s>")
    with pytest.raises(ValueError, match="no added '<image>' token"):
        encode(p, plain, 5, N, "llava-hf")
    assert len(encode(p, plain, ORIGINAL_IMAGE_ID, N, "original")) > N  # the original mode needs no <image> token


# ---------------------------------------------------------------- token_span


def test_token_span_boundaries():
    tok = toy.llama2_tokenizer()
    p = build_prompt(Q, "vicuna_v1")
    e = encode(p, tok, image_id(tok, "llava-hf"), N, "llava-hf")
    s = p.question_span[0] + Q.index("full")
    full = token_span(e, s, s + 4)
    assert [tok.convert_ids_to_tokens(int(e.input_ids[i])) for i in full] == ["▁full"]
    assert token_span(e, s - 1, s + 4) == full  # a leading space in the range changes nothing
    assert token_span(e, s, s + 5) == full  # nor a trailing one
    assert token_span(e, s - 1, s) == [] and token_span(e, s + 4, s + 5) == []  # spaces alone select nothing
    assert token_span(e, 0, 1) == [1]  # BOS is zero-width and never selected
    assert token_span(e, *p.image_span) == e.image_positions.tolist()
    # A range cut inside a token selects that token, and span_problem says so.
    assert token_span(e, s, s + 3) == full
    assert re.search("inside a token", span_problem(e, s, s + 3))
    assert span_problem(e, s, s + 4) is None
    assert "no token" in span_problem(e, s - 1, s)


def test_token_span_drops_whitespace_tokens_at_the_edges():
    """A SentencePiece `▁` prepended at a chunk start is aligned with the chunk's first character; when that
    character starts the range (no newline after <image>), the `▁` still does not belong to the range."""
    tok = toy.llama2_tokenizer()
    text = "<image>Zebras or horses?"
    e = encode(text, tok, ORIGINAL_IMAGE_ID, N, "original")
    first = int(e.image_positions[-1]) + 1
    assert tok.convert_ids_to_tokens(int(e.input_ids[first])) == "▁" and tuple(e.offsets[first]) == (7, 8)
    q = token_span(e, 7, len(text))
    assert q[0] == first + 1 and norm(tok.decode(e.input_ids[q].tolist())) == "Zebras or horses?"


def test_toy_tokenizers_save_and_reload(tmp_path, tok):
    reloaded = AutoTokenizer.from_pretrained(toy.save(tok, tmp_path / "tok"))
    p = build_prompt(Q, "llava_llama_3")
    a = encode(p, tok, image_id(tok, "llava-hf"), N, "llava-hf")
    b = encode(p, reloaded, image_id(reloaded, "llava-hf"), N, "llava-hf")
    assert a.input_ids.tolist() == b.input_ids.tolist() and np.array_equal(a.offsets, b.offsets)
    assert reloaded.bos_token == tok.bos_token
    assert reloaded.convert_tokens_to_ids("<image>") == image_id(tok, "llava-hf")
    assert 256 < len(tok) <= 2000


# ---------------------------------------------------------------- the rest of the family: Mistral, Yi, Qwen2

FAMILIES = {  # tokenizer family -> (toy tokenizer, its template)
    "mistral": (toy.mistral_tokenizer, "mistral_instruct"),
    "yi": (toy.yi_tokenizer, "chatml_direct"),
    "qwen2": (toy.qwen2_tokenizer, "qwen_1_5"),
}
USER = "<image>\n" + Q + " \n" + INSTRUCTION


def test_family_template_strings():
    assert build_prompt(Q, "mistral_instruct").text == f"[INST] {USER} [/INST]"
    chatml_34b = ("<|im_start|>system\nAnswer the questions.<|im_end|>{sep}<|im_start|>user\n" + USER
                  + "<|im_end|>{sep}<|im_start|>assistant\n")
    assert build_prompt(Q, "chatml_direct", mode="original").text == chatml_34b.format(sep="")
    assert build_prompt(Q, "chatml_direct", mode="llava-hf").text == chatml_34b.format(sep="\n")
    qwen = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n" + USER
            + "<|im_end|>\n<|im_start|>assistant\n")
    for mode in ("llava-hf", "original"):
        assert build_prompt(Q, "qwen_1_5", mode=mode).text == qwen
        assert build_prompt(Q, "mistral_instruct", mode=mode).text == build_prompt(Q, "mistral_instruct").text
    assert build_prompt(Q, "qwen_1_5", instruction=False).text == qwen.replace(" \n" + INSTRUCTION, "")
    # the study's " \n" belongs to llava_llama_3 only
    assert build_prompt(Q, "qwen_1_5", study_suffix=False).text == qwen
    with pytest.raises(ValueError, match="unknown tokenization mode"):
        build_prompt(Q, "qwen_1_5", mode="hf")


def _content(system=None):
    """One user turn (image + text), after an optional system turn, in the llava-hf processors' message format."""
    turns = [{"role": "system", "content": [{"type": "text", "text": system}]}] if system else []
    return turns + [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": Q + " \n" + INSTRUCTION}]}]


@pytest.mark.parametrize("template,chat_template,system", [
    ("mistral_instruct", toy.LLAVA_HF_MISTRAL_CHAT_TEMPLATE, None),
    ("chatml_direct", toy.LLAVA_HF_YI_CHAT_TEMPLATE, "Answer the questions."),
    ("qwen_1_5", toy.LLAVA_HF_ONEVISION_CHAT_TEMPLATE, "You are a helpful assistant."),
])
def test_llava_hf_text_is_what_the_checkpoint_chat_template_renders(template, chat_template, system):
    """llava-hf mode: the text the llava-hf processor's chat template renders for the study's user turn (with the
    system text of LLaVA's conversation; the templates add none themselves)."""
    tokenizer = toy.qwen2_tokenizer()
    rendered = tokenizer.apply_chat_template(_content(system), chat_template=chat_template, tokenize=False,
                                             add_generation_prompt=True)
    assert build_prompt(Q, template, mode="llava-hf").text == rendered


def test_qwen_text_is_what_the_qwen2_instruct_template_renders():
    """Original-layout Qwen checkpoints carry Qwen2-Instruct's tokenizer template, whose default system turn is
    LLaVA-NeXT's qwen_1_5 system text."""
    tokenizer = toy.qwen2_tokenizer(chat_template=toy.QWEN2_INSTRUCT_CHAT_TEMPLATE)
    rendered = tokenizer.apply_chat_template([{"role": "user", "content": USER}], tokenize=False,
                                             add_generation_prompt=True)
    assert build_prompt(Q, "qwen_1_5", mode="original").text == rendered


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    make, template = FAMILIES[request.param]
    return request.param, make(), template


@pytest.mark.parametrize("mode", ["llava-hf", "original"])
def test_family_encode_spans(family, mode):
    name, tokenizer, template = family
    p = build_prompt("Which vehicle is white, the train car or the car?", template, mode=mode)
    img = image_id(tokenizer, mode)
    e = encode(p, tokenizer, img, N, mode)
    where = np.flatnonzero(e.input_ids == img)
    assert where.tolist() == e.image_positions.tolist() and len(where) == N and np.all(np.diff(where) == 1)
    assert np.all(e.offsets[: where[0], 1] <= p.image_span[0])
    assert np.all(e.offsets[where[-1] + 1:, 0] >= p.image_span[1])
    q = token_span(e, *p.question_span)
    assert q == list(range(q[0], q[-1] + 1)) and q[0] > where[-1]
    assert decode(tokenizer, e, q) == p.question and span_problem(e, *p.question_span) is None
    for word in ("train car", "car?", "white", "vehicle"):
        start = p.question.rindex(word)
        span = p.question_substring_span(start, start + len(word))
        assert decode(tokenizer, e, token_span(e, *span)) == word
    assert not set(q) & set(token_span(e, *p.instruction_span))
    # the chat tokens are single added tokens (Yi, Qwen2), or plain text (Mistral's "[INST]")
    first = tokenizer.convert_ids_to_tokens(e.input_ids[:4].tolist())
    expected = {"mistral": ["<s>", "▁[", "INST", "]"], "yi": ["<|im_start|>", "system", "\n", "Answer"],
                "qwen2": ["<|im_start|>", "system", "Ċ", "You"]}[name]
    assert first == expected
    assert e.offsets[-1, 1] == len(p.text)


def test_family_token_ids_are_the_checkpoints():
    """The added tokens sit where the real checkpoints have them (llava-hf image token ids of the issue)."""
    assert toy.mistral_tokenizer().convert_tokens_to_ids(["<image>", "<pad>"]) == [32000, 32001]
    assert toy.yi_tokenizer().convert_tokens_to_ids("<image>") == 64000
    qwen = toy.qwen2_tokenizer()
    assert qwen.convert_tokens_to_ids(["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>"]) == [
        151643, 151644, 151645, 151646]
    assert qwen.bos_token_id is None and toy.yi_tokenizer().bos_token_id == 1


def test_family_modes():
    """Original vs llava-hf tokenization per family: Mistral (Metaspace "first") has the extra `▁` after the image
    like Llama-2; Yi (no dummy prefix) and Qwen2 (byte-level) give identical sequences."""
    for name, (make, template) in FAMILIES.items():
        tokenizer = make()
        p = build_prompt(Q, template, mode="original")
        hf = encode(p, tokenizer, image_id(tokenizer, "llava-hf"), N, "llava-hf")
        orig = encode(p, tokenizer, ORIGINAL_IMAGE_ID, N, "original")
        extra = 1 if name == "mistral" else 0
        k = int(hf.image_positions[-1]) + 1
        assert len(orig) == len(hf) + extra, name
        assert hf.input_ids[:k - N].tolist() == orig.input_ids[:k - N].tolist(), name
        assert hf.input_ids[k:].tolist() == orig.input_ids[k + extra:].tolist(), name
        assert token_span(orig, *p.question_span) == [i + extra for i in token_span(hf, *p.question_span)]
        ref = reference_tokenizer_image_token(p.text, tokenizer, ORIGINAL_IMAGE_ID)
        j = ref.index(ORIGINAL_IMAGE_ID)
        assert orig.input_ids.tolist() == ref[:j] + [ORIGINAL_IMAGE_ID] * N + ref[j + 1:], name


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_llava_hf_mode_equals_transformers_processor(name):
    import PIL.Image
    from transformers import CLIPImageProcessorPil, LlavaProcessor

    make, template = FAMILIES[name]
    tokenizer = make()
    image_processor = CLIPImageProcessorPil(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
    processor = LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                               vision_feature_select_strategy="default", num_additional_image_tokens=1)
    p = build_prompt(Q, template)
    ids = processor(images=PIL.Image.new("RGB", (40, 30)), text=p.text, return_tensors="np")["input_ids"][0]
    assert encode(p, tokenizer, tokenizer.convert_tokens_to_ids("<image>"), 4, "llava-hf").input_ids.tolist() == \
        ids.tolist()


def test_family_tokenizers_save_and_reload(tmp_path, family):
    name, tokenizer, template = family
    reloaded = AutoTokenizer.from_pretrained(toy.save(tokenizer, tmp_path / name))
    p = build_prompt("Is the café ☕ open?", template)
    a = encode(p, tokenizer, image_id(tokenizer, "llava-hf"), N, "llava-hf")
    b = encode(p, reloaded, image_id(reloaded, "llava-hf"), N, "llava-hf")
    assert a.input_ids.tolist() == b.input_ids.tolist() and np.array_equal(a.offsets, b.offsets)
    assert reloaded.chat_template == tokenizer.chat_template


# ---------------------------------------------------------------- the default template of a checkpoint


def test_default_template_from_chat_template():
    """Each toy tokenizer carries its checkpoint's chat template; the default is the family it renders."""
    from jaxflow.inputs.prompts import default_template

    assert default_template(toy.llama3_tokenizer()) == "llava_llama_3"
    assert default_template(toy.llama2_tokenizer()) == "vicuna_v1"
    for make, template in FAMILIES.values():
        assert default_template(make()) == template
    assert default_template(toy.qwen2_tokenizer(chat_template=toy.QWEN2_INSTRUCT_CHAT_TEMPLATE)) == "qwen_1_5"
    # the chat template decides over the name, and over a vocabulary without chat tokens
    llama2 = toy.llama2_tokenizer()
    assert default_template(llama2, toy.LLAVA_HF_MISTRAL_CHAT_TEMPLATE, ["llava-1.5-7b-hf"]) == "mistral_instruct"
    vicuna_hf = ("{% for message in messages %}{{ message['role'].upper() + ': ' }}{{ message['content'] }} "
                 "{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}")
    assert default_template(toy.mistral_tokenizer(), vicuna_hf) == "vicuna_v1"  # bakLlava: Mistral, vicuna format


def test_default_template_without_chat_template():
    """No chat template: the vocabulary's chat tokens (Yi's BOS tells its ChatML from Qwen's), then the name."""
    from jaxflow.inputs.prompts import default_template

    def bare(tokenizer):
        tokenizer.chat_template = None
        return tokenizer

    assert default_template(bare(toy.yi_tokenizer())) == "chatml_direct"
    assert default_template(bare(toy.qwen2_tokenizer())) == "qwen_1_5"
    assert default_template(bare(toy.llama3_tokenizer())) == "llava_llama_3"
    mistral = bare(toy.mistral_tokenizer())
    assert default_template(mistral) == "vicuna_v1"
    for name, template in [("llava-v1.6-mistral-7b", "mistral_instruct"), ("llava-v1.6-34b", "chatml_direct"),
                           ("llava-next-72b-hf", "qwen_1_5"), ("llava-onevision-qwen2-0.5b-ov", "qwen_1_5"),
                           ("llava-interleave-qwen-7b-hf", "qwen_1_5"), ("llama3-llava-next-8b", "llava_llama_3"),
                           ("llava-v1.6-vicuna-7b", "vicuna_v1"), ("llava-1.5-7b-hf", "vicuna_v1")]:
        assert default_template(mistral, None, ["converted", name]) == template, name
    assert default_template(None) == "vicuna_v1"


def test_read_chat_template(tmp_path):
    import json

    from jaxflow.inputs.prompts import read_chat_template

    assert read_chat_template(tmp_path) is None and read_chat_template(None) is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": [
        {"name": "tool_use", "template": "x"}, {"name": "default", "template": toy.QWEN2_INSTRUCT_CHAT_TEMPLATE}]}))
    assert read_chat_template(tmp_path) == toy.QWEN2_INSTRUCT_CHAT_TEMPLATE
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": toy.LLAVA_HF_YI_CHAT_TEMPLATE}))
    assert read_chat_template(tmp_path) == toy.LLAVA_HF_YI_CHAT_TEMPLATE  # the processor's wins
    (tmp_path / "chat_template.jinja").write_text(toy.LLAVA_HF_MISTRAL_CHAT_TEMPLATE)
    assert read_chat_template(tmp_path) == toy.LLAVA_HF_MISTRAL_CHAT_TEMPLATE
    (tmp_path / "chat_template.jinja").unlink()
    (tmp_path / "chat_template.json").write_text("{not json")
    with pytest.raises(ValueError, match="chat_template.json: not a JSON object"):
        read_chat_template(tmp_path)


def test_model_default_template_reads_the_converted_directory(tmp_path):
    """`Model.default_template`: the chat template file in the converted directory decides; without one, the
    vocabulary, then the source checkpoint's name (jaxflow.json `source`)."""
    import json

    from jaxflow.model import Model

    def model(tokenizer, source):
        return Model(None, None, tokenizer, str(tmp_path), {"source": source})

    mistral = toy.mistral_tokenizer()
    mistral.chat_template = None
    assert model(mistral, "/ckpt/llava-v1.6-vicuna-7b-hf").default_template == "vicuna_v1"
    assert model(mistral, "/ckpt/llava-v1.6-mistral-7b").default_template == "mistral_instruct"  # by name
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": toy.LLAVA_HF_YI_CHAT_TEMPLATE}))
    assert model(toy.yi_tokenizer(), "/ckpt/whatever").default_template == "chatml_direct"
    assert model(toy.qwen2_tokenizer(), "/ckpt/whatever").default_template == "qwen_1_5"


@pytest.mark.parametrize("command", ["sweep", "lens", "regions"])
def test_cli_template_choices_are_the_templates(command, capsys):
    from jaxflow.cli import build_parser

    required = {"regions": ["--model", "m", "--image", "i.jpg", "--question", "q?"],
                "sweep": ["--model", "m", "--data", "d.csv", "--out", "o"]}
    args = [command] + required.get(command, required["sweep"])
    parser = build_parser()
    for template in TEMPLATES:
        assert parser.parse_args(args + ["--template", template]).template == template
    assert parser.parse_args(args).template is None  # the checkpoint's default, resolved at run time
    with pytest.raises(SystemExit):
        parser.parse_args(args + ["--template", "qwen"])
    assert "invalid choice: 'qwen'" in capsys.readouterr().err
