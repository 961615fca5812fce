"""Regions on every row of the six real GQA task files, at the real models' geometry (CLIP 336 px,
llava-1.6 pinpoints) with the rows' image sizes: the Question span decodes back to the question,
options and object names decode to their words, related patches (overlap rule) equal an exact brute
force, and LLaVA-NeXT feature counts equal transformers' processor counts. The study's red-mask rule on
every row: scripts/compare_related_patches.py. The text regions on every row are checked again with each of the
family's other tokenizers (Mistral and Yi SentencePiece, Qwen2 byte-level BPE) and their templates, in both
tokenization modes."""

import os
import re

import numpy as np
import pytest
import toy_tokenizers
import transformers
from test_images import HFNEXT, PINPOINTS, _expected_related, _local_tokenizer

from jaxflow.config import ModelConfig
from jaxflow.geometry import image_layout
from jaxflow.inputs import gqa, prompts
from jaxflow.inputs.regions import locate

GQA = str(gqa.TASK_DIR)
TASKS = ["ChooseAttr", "ChooseCat", "ChooseRel", "CompareAttr", "LogicalObj", "QueryAttr"]


def _config(kind, image_token):
    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  image_size=336, patch_size=14, hidden_act="quick_gelu")
    text = dict(vocab_size=2000, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    common = dict(vision_config=vision, text_config=text, image_token_index=image_token)
    if kind == "llava_next":
        return ModelConfig.from_hf(transformers.LlavaNextConfig(image_grid_pinpoints=PINPOINTS, **common).to_dict())
    return ModelConfig.from_hf(transformers.LlavaConfig(**common).to_dict())


def _norm(text):
    return " ".join(text.split())


@pytest.mark.parametrize("kind,tok_name,template", [("llava", "llama2", "vicuna_v1"),
                                                    ("llava_next", "llama3", "llava_llama_3")])
def test_regions_on_every_real_row(kind, tok_name, template):
    tok = toy_tokenizers.llama2_tokenizer() if tok_name == "llama2" else toy_tokenizers.llama3_tokenizer()
    cfg = _config(kind, tok.convert_tokens_to_ids("<image>"))
    processor = transformers.LlavaNextProcessor(image_processor=HFNEXT, tokenizer=_local_tokenizer(), patch_size=14,
                                                vision_feature_select_strategy="default",
                                                num_additional_image_tokens=1)
    total, passed, invalid, no_name = 0, 0, [], []
    for task in TASKS:
        samples, errors = gqa.load_tasks(os.path.join(GQA, f"{task}.csv"))
        invalid += errors
        total += len(samples) + len(errors)
        sizes = sorted({s.image_size for s in samples})
        if kind == "llava_next":
            counts = processor._get_num_multimodal_tokens(image_sizes=sizes).num_image_tokens
            for size, count in zip(sizes, counts, strict=True):
                assert len(image_layout(cfg, size)) == count, size
        for s in samples:
            _, enc, regions = locate(cfg, tok, s.image_size, s.question, template=template, boxes=s.boxes,
                                     option_spans=(s.true_option_span, s.false_option_span),
                                     object_names=s.box_names, related_patches="overlap")
            ids = enc.input_ids
            assert _norm(tok.decode(ids[regions["question"]])) == _norm(s.question), s.question_id
            for name, option in (("true_option", s.true_option), ("false_option", s.false_option)):
                if option is not None:
                    decoded = _norm(tok.decode(ids[regions[name]])).lower()
                    assert option.lower() in decoded, (s.question_id, option, decoded)
            if "central_object" in regions:  # every name, or the word holding it ("tables", "necktie")
                decoded = _norm(tok.decode(ids[regions["central_object"]])).lower()
                assert all(n.lower() in decoded for n in s.box_names), (s.question_id, s.box_names, decoded)
                assert set(regions["central_object"]) <= set(regions["question"])
            else:  # a name that is not a word of the question, and too short to look inside words
                why = regions.undefined["central_object"]
                name = next(n for n in s.box_names if repr(n) in why)
                assert not re.search(rf"(?<!\w){re.escape(name)}(?!\w)", s.question, re.IGNORECASE), why
                assert len(name) < 3 or name.lower() not in s.question.lower(), why
                no_name.append(s.question_id)
            related = np.asarray(_expected_related(kind, s.image_size, s.boxes))
            image = regions["image"]
            assert np.array_equal(regions["related_image_patches"], image[related]), s.question_id
            newline = image_layout(cfg, s.image_size).is_newline
            assert np.array_equal(regions["other_image_patches"], image[~related & ~newline])
            assert regions["last"][0] == len(ids) - 1 and regions["question"][-1] < regions["last"][0]
            passed += 1
    print(f"{kind}/{tok_name}: {passed} of {total} rows pass the region checks; "
          f"{len(invalid)} invalid rows: {[str(e) for e in invalid]}; central_object undefined on {len(no_name)}")
    assert total == 5525
    assert passed == total - len(invalid) and len(invalid) == 3
    assert len(no_name) < 0.01 * total


FAMILIES = {  # tokenizer family -> (toy tokenizer, the template its checkpoints use)
    "mistral": (toy_tokenizers.mistral_tokenizer, "mistral_instruct"),  # SentencePiece, Llama layout, [INST] text
    "yi": (toy_tokenizers.yi_tokenizer, "chatml_direct"),  # SentencePiece without dummy prefix, ChatML tokens
    "qwen2": (toy_tokenizers.qwen2_tokenizer, "qwen_1_5"),  # byte-level BPE, 151k vocabulary, ChatML tokens
}


@pytest.mark.parametrize("mode", ["llava-hf", "original"])
@pytest.mark.parametrize("family", list(FAMILIES))
def test_text_regions_on_every_real_row_per_tokenizer_family(family, mode):
    """The text regions of every GQA row with each new tokenizer family and its template, in both tokenization
    modes (the image regions do not depend on the tokenizer: the test above): the question decodes back to the
    question, options and object names to their words, nothing of them falls on the image or the instruction."""
    make, template = FAMILIES[family]
    tok = make()
    image_token = tok.convert_tokens_to_ids("<image>") if mode == "llava-hf" else -200
    cfg = _config("llava", image_token)
    total, passed, invalid, no_name = 0, 0, [], []
    for task in TASKS:
        samples, errors = gqa.load_tasks(os.path.join(GQA, f"{task}.csv"))
        invalid += errors
        total += len(samples) + len(errors)
        for s in samples:
            prompt, enc, regions = locate(cfg, tok, s.image_size, s.question, mode=mode, template=template,
                                          boxes=s.boxes, option_spans=(s.true_option_span, s.false_option_span),
                                          object_names=s.box_names, related_patches="overlap")
            ids = enc.input_ids
            assert prompt.template == template and prompt.text.count("<image>") == 1
            question = regions["question"]
            assert _norm(tok.decode(ids[question])) == _norm(s.question), (s.question_id, tok.decode(ids[question]))
            assert not set(question) & set(regions["image"])
            between = np.arange(regions["image"][-1] + 1, question[0])  # the "\n" (Mistral original: "▁", "\n")
            assert len(between) == 1 + (family == "mistral" and mode == "original") and enc.blank[between].all()
            instruction = np.asarray(prompts.token_span(enc, *prompt.instruction_span))
            assert _norm(tok.decode(ids[instruction])) == prompts.INSTRUCTION and question[-1] < instruction[0]
            for name, option in (("true_option", s.true_option), ("false_option", s.false_option)):
                if option is not None:
                    decoded = _norm(tok.decode(ids[regions[name]])).lower()
                    assert option.lower() in decoded, (s.question_id, option, decoded)
                    assert set(regions[name]) <= set(question)
            if "central_object" in regions:
                decoded = _norm(tok.decode(ids[regions["central_object"]])).lower()
                assert all(n.lower() in decoded for n in s.box_names), (s.question_id, s.box_names, decoded)
                assert set(regions["central_object"]) <= set(question)
            else:
                no_name.append(s.question_id)
            assert regions["last"][0] == len(ids) - 1 and len(regions["image"]) == len(image_layout(cfg, s.image_size))
            passed += 1
    print(f"{family}/{template}/{mode}: {passed} of {total} rows pass; {len(invalid)} invalid; "
          f"central_object undefined on {len(no_name)}")
    assert total == 5525 and passed == total - len(invalid) and len(invalid) == 3
    assert len(no_name) < 0.01 * total
