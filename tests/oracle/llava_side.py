"""The LLaVA side of the oracle tier: tiny original-layout checkpoints built and run with LLaVA's own code.

Runs under the LLaVA environment of `scripts/setup_llava_oracle.sh` (llava-torch 1.2.2.post1, transformers
4.36.2, torch 2.13.0 CPU) and never imports jaxflow:

    .venv-llava/bin/python tests/oracle/llava_side.py JOB.json

JOB (written by tests/test_llava_oracle.py): {"out": DIR, "rows": [{"id", "question", "answer", "image",
"boxes": [[x, y, w, h], ...]}], "variants": [{"name", "seed", "image_aspect_ratio", ...}], "flows": [...],
"window": k, "max_new_tokens": n}.

Writes DIR/tokenizer (SentencePiece trained here), DIR/clip (a tiny CLIPVisionModel + preprocessor config), and
per variant DIR/llava-NAME (an original-layout checkpoint: config.json, model.safetensors, tokenizer.model,
tokenizer_config.json, special_tokens_map.json) and DIR/llava-NAME.result.json / .npz, holding per row what LLaVA
computes: process_images pixels, tokenizer_image_token ids, prepare_inputs_labels_for_multimodal embeddings and
the provenance of every image position, greedy decoding (LLaVA's generate), the first token's probability, the
study's regions (related image patches by the red-mask rule) and the knocked-out probabilities per (flow, layer).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import io
import json
import math
import os
import shutil
import sys
import types
import warnings

import numpy as np
import sentencepiece as spm
import torch
from llava.constants import IMAGE_TOKEN_INDEX
from llava.conversation import conv_templates
from llava.mm_utils import get_anyres_image_grid_shape, process_images, select_best_resolution, tokenizer_image_token
from llava.model import LlavaLlamaForCausalLM, LlavaMistralForCausalLM, builder
from llava.model.language_model.llava_llama import LlavaConfig
from llava.model.language_model.llava_mistral import LlavaMistralConfig
from PIL import Image, ImageDraw
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel
from transformers import logging as hf_logging

INSTRUCTION = " \nAnswer the question using a single word or phrase."  # the study's suffix to every question
TAG = 4096.0  # marks tagged image features in the provenance run (text embeddings never hold it)
# The study's six flows: source region -> target region (targets may not attend to sources).
FLOWS = {
    "Image->Question": ("image", "question"),
    "Image->Last": ("image", "last"),
    "Question->Last": ("question", "last"),
    "Last->Last": ("last", "last"),
    "Related image patches->Question": ("related_image_patches", "question"),
    "Other image patches->Question": ("other_image_patches", "question"),
}
RED = (255, 0, 0)


# ---- checkpoints ---------------------------------------------------------------------------------------------


def build_tokenizer(out: str, rows: list[dict], vocab_size: int) -> str:
    """A Llama-style SentencePiece BPE tokenizer (byte fallback, dummy prefix, ids unk 0 / bos 1 / eos 2),
    trained offline on the prompt's fixed text and the rows' questions and answers."""
    system = conv_templates["vicuna_v1"].system
    texts = [system, "USER:", "ASSISTANT:", INSTRUCTION.strip()]
    for r in rows:
        texts += [r["question"], r["answer"], f"The answer is {r['answer']}."]
    corpus = [t for t in texts for _ in range(4)]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus), model_writer=model, vocab_size=vocab_size, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, split_digits=True, allow_whitespace_only_pieces=True,
        add_dummy_prefix=True, remove_extra_whitespaces=False, normalization_rule_name="identity",
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1, hard_vocab_limit=False, minloglevel=2)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    config = {  # as liuhaotian/llava-v1.5-7b ships it
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "pad_token": None, "clean_up_tokenization_spaces": False, "legacy": False, "model_max_length": 2048,
        "padding_side": "right", "sp_model_kwargs": {}, "tokenizer_class": "LlamaTokenizer",
    }
    _write_json(os.path.join(out, "tokenizer_config.json"), config)
    _write_json(os.path.join(out, "special_tokens_map.json"),
                {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<unk>", "unk_token": "<unk>"})
    return out


def randomize(module: torch.nn.Module, seed: int, skip: str | None = None) -> None:
    """Seeded random weights large enough that attention and outputs are far from uniform: matrices
    N(0, (gain / sqrt(fan_in))^2), norm scales 1 + N(0, 0.2^2), biases N(0, 0.1^2), embeddings and other vectors
    N(0, 1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if skip and name.startswith(skip):
                continue
            noise = torch.randn(p.shape, generator=gen)
            if p.ndim == 1 and "norm" in name:
                p.copy_(1 + 0.2 * noise)
            elif name.endswith("bias"):
                p.copy_(0.1 * noise)
            elif p.ndim >= 2 and "embed" not in name:
                gain = 4.0 if "lm_head" in name else 2.0 if name.endswith(("q_proj.weight", "k_proj.weight")) else 1.0
                p.copy_(noise * gain / math.sqrt(p[0].numel()))
            else:
                p.copy_(noise)


def build_clip(out: str, spec: dict) -> str:
    """A tiny CLIP vision tower saved as a CLIP checkpoint directory (safetensors + preprocessor_config.json)."""
    s = spec["image_size"]
    config = CLIPVisionConfig(hidden_size=spec["hidden"], intermediate_size=2 * spec["hidden"],
                              num_hidden_layers=spec["layers"], num_attention_heads=spec["heads"], image_size=s,
                              patch_size=spec["patch"], hidden_act="quick_gelu", projection_dim=spec["hidden"])
    model = CLIPVisionModel(config).eval()
    randomize(model, spec["seed"])
    model.save_pretrained(out, safe_serialization=True)
    CLIPImageProcessor(size=s, crop_size=s, image_mean=spec["image_mean"], image_std=spec["image_std"],
                       do_center_crop=True, resample=3).save_pretrained(out)
    return out


def llava_config(v: dict, clip_dir: str, clip_spec: dict, vocab: int) -> dict:
    """config.json as liuhaotian / lmms-lab write it (Llama fields + the mm_* fields LLaVA reads)."""
    cfg = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        "vocab_size": vocab, "hidden_size": v["hidden"], "intermediate_size": 2 * v["hidden"],
        "num_hidden_layers": v["layers"], "num_attention_heads": v["heads"], "num_key_value_heads": v["kv_heads"],
        "rope_theta": v["rope_theta"], "rms_norm_eps": 1e-5, "max_position_embeddings": 4096, "hidden_act": "silu",
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0, "pretraining_tp": 1,
        "rope_scaling": None, "attention_bias": False, "torch_dtype": "float32", "use_cache": True,
        "mm_vision_tower": clip_dir, "mm_hidden_size": clip_spec["hidden"], "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch", "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False, "mm_projector_lr": None, "mm_resampler_type": None, "use_mm_proj": True,
        "freeze_mm_mlp_adapter": False, "tune_mm_mlp_adapter": False, "tokenizer_model_max_length": 2048,
        "tokenizer_padding_side": "right", "image_aspect_ratio": v["image_aspect_ratio"],
        "mm_patch_merge_type": v["mm_patch_merge_type"],
    }
    if v.get("decoder") == "mistral":  # as LlavaMistralForCausalLM saves (MistralConfig has no Llama-only fields)
        for key in ("pretraining_tp", "rope_scaling", "attention_bias"):
            del cfg[key]
        cfg.update(architectures=["LlavaMistralForCausalLM"], model_type="llava_mistral",
                   sliding_window=v["sliding_window"])
    if v.get("image_grid_pinpoints"):
        cfg["image_grid_pinpoints"] = v["image_grid_pinpoints"]
    if v.get("tuned_tower"):
        cfg.update(unfreeze_mm_vision_tower=True, mm_vision_tower_lr=2e-6)
    return cfg


def build_llava(out: str, v: dict, clip_dir: str, clip_spec: dict, tok_dir: str) -> dict:
    """A random LlavaLlamaForCausalLM (LlavaMistralForCausalLM for decoder "mistral") saved with safetensors;
    with tuned_tower the tower (loaded from the CLIP directory at construction, as LLaVA does under
    unfreeze_mm_vision_tower) is perturbed and saved inside as model.vision_tower.vision_tower.*.
    Returns facts about the saved checkpoint."""
    sp = spm.SentencePieceProcessor(model_file=os.path.join(tok_dir, "tokenizer.model"))
    config_cls, model_cls = ((LlavaMistralConfig, LlavaMistralForCausalLM) if v.get("decoder") == "mistral"
                             else (LlavaConfig, LlavaLlamaForCausalLM))
    config = config_cls(**llava_config(v, clip_dir, clip_spec, sp.get_piece_size()))
    torch.manual_seed(v["seed"])
    model = model_cls(config).eval()
    randomize(model, v["seed"], skip="model.vision_tower.")
    with torch.no_grad():  # answers that read like text: byte pieces seldom, the end of sequence now and then
        model.lm_head.weight[[i for i in range(sp.get_piece_size()) if sp.is_byte(i)]] *= 0.3
        model.lm_head.weight[sp.eos_id()] *= 1.5
    if v.get("tuned_tower"):
        gen = torch.Generator().manual_seed(v["seed"] + 1)
        with torch.no_grad():
            for p in model.get_model().get_vision_tower().vision_tower.parameters():
                p.add_(0.3 * p.std().clamp(min=0.1) * torch.randn(p.shape, generator=gen))
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.model", "tokenizer_config.json", "special_tokens_map.json"):
        shutil.copy(os.path.join(tok_dir, name), os.path.join(out, name))
    with open(os.path.join(out, "config.json")) as f:
        facts = {"saved_config": json.load(f)}
    with safe_open(os.path.join(out, "model.safetensors"), "pt") as f:
        facts["tower_keys"] = sum(k.startswith("model.vision_tower.") for k in f.keys())
    return facts


class _Float32Torch(types.ModuleType):
    """`torch` for llava.model.builder with float16 read as float32: its loader casts to float16 (a GPU habit);
    the oracle runs LLaVA's own loading steps in float32 on CPU."""

    def __getattr__(self, name):
        return torch.float32 if name == "float16" else getattr(torch, name)


def load(path: str):
    """LLaVA's own loader (llava.model.builder.load_pretrained_model), in float32 on CPU."""
    builder.torch = _Float32Torch("torch")
    try:
        tokenizer, model, processor, _ = builder.load_pretrained_model(path, None, os.path.basename(path),
                                                                       device="cpu")
    finally:
        builder.torch = torch
    return tokenizer, model.eval(), processor


# ---- what LLaVA computes per row -----------------------------------------------------------------------------


def prompt_ids(tokenizer, question: str) -> tuple[str, list[int]]:
    conv = conv_templates["vicuna_v1"].copy()
    conv.append_message(conv.roles[0], "<image>\n" + question + INSTRUCTION)
    conv.append_message(conv.roles[1], None)
    text = conv.get_prompt()
    return text, tokenizer_image_token(text, tokenizer, IMAGE_TOKEN_INDEX)


def multimodal_embeds(model, ids: list[int], pixels, size_wh) -> torch.Tensor:
    """prepare_inputs_labels_for_multimodal -> inputs_embeds [T, D]."""
    out = model.prepare_inputs_labels_for_multimodal(torch.tensor([ids]), None, None, None, None, pixels,
                                                     image_sizes=[size_wh])
    return out[4][0]


def provenance(model, ids: list[int], pixels, size_wh) -> np.ndarray:
    """[T, 2] per position of LLaVA's multimodal sequence: (crop, feature index within that crop) of the image
    feature placed there, (-1, -1) for an image_newline, (-2, -2) for a text token. Found by running
    prepare_inputs_labels_for_multimodal with every feature replaced by a tag naming its crop and index."""
    inner = model.get_model()
    real_encode = model.encode_images

    def tagged(images):
        feats = real_encode(images)  # [N, F, D]
        tag = torch.zeros_like(feats)
        tag[..., 0] = torch.arange(feats.shape[0], dtype=feats.dtype)[:, None]
        tag[..., 1] = torch.arange(feats.shape[1], dtype=feats.dtype)[None, :]
        tag[..., 2] = TAG
        return tag

    newline = getattr(inner, "image_newline", None)
    saved = None if newline is None else newline.detach().clone()
    model.encode_images = tagged
    try:
        if newline is not None:
            with torch.no_grad():
                newline.zero_()
                newline[:3] = torch.tensor([-1.0, -1.0, TAG])
        emb = multimodal_embeds(model, ids, pixels, size_wh)
    finally:
        del model.encode_images
        if newline is not None:
            with torch.no_grad():
                newline.copy_(saved)
    is_image = emb[:, 2] == TAG
    prov = torch.where(is_image[:, None], emb[:, :2], torch.full_like(emb[:, :2], -2.0))
    return prov.round().to(torch.int64).numpy()


def red_patches(model, processor, image: Image.Image, boxes) -> np.ndarray:
    """The study's rule: per crop and patch [N, F], whether any pixel of the patch is exactly pure red after the
    mask image (boxes drawn filled red with both corners inclusive on green) goes through process_images with
    rescale and normalize off."""
    mask = Image.new("RGB", image.size, (0, 255, 0))
    draw = ImageDraw.Draw(mask)
    for x, y, w, h in boxes:
        draw.rectangle((int(x), int(y), int(x) + int(w), int(y) + int(h)), fill=RED)
    plain = copy.deepcopy(processor)
    plain.do_rescale, plain.do_normalize = False, False
    crops = process_images([mask], plain, model.config)
    crops = crops.reshape(-1, *crops.shape[-3:]).numpy()  # [N, 3, S, S]
    p = model.get_vision_tower().config.patch_size
    n, _, s, _ = crops.shape
    g = s // p
    blocks = crops.reshape(n, 3, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, 3, p * p)
    red = (blocks[:, :, 0] == RED[0]) & (blocks[:, :, 1] == RED[1]) & (blocks[:, :, 2] == RED[2])
    return red.any(axis=-1)


def question_positions(tokenizer, ids: list[int], question: str, image_dim: int) -> list[int]:
    """The study's rule: the question's characters located in the joined token strings of the text after the
    image (SentencePiece's word marker read as a space), mapped to the tokens that hold them."""
    k = ids.index(IMAGE_TOKEN_INDEX)
    toks = tokenizer.convert_ids_to_tokens(ids[k + 1:])
    start_char = "".join(toks).replace("\u2581", " ").index(question)
    end_char = start_char + len(question)
    first = last = None
    pos = 0
    for j, t in enumerate(toks):
        pos += len(t)
        if first is None and pos > start_char:
            first = j
        if pos >= end_char:
            last = j
            break
    return [k + image_dim + j for j in range(first, last + 1)]


def window(layer: int, k: int, num_layers: int) -> list[int]:
    return list(range(max(0, layer - k // 2), min(num_layers, layer + math.ceil(k / 2))))


def cut_mask(t: int, source, target, dtype, sliding_window=None) -> torch.Tensor:
    """Additive mask [1, 1, T, T]: finfo.min above the diagonal (causal), at (target row, source column), and
    (Mistral's sliding window, as transformers 4.36 masks it) where the key lies sliding_window or more back."""
    blocked = torch.ones(t, t, dtype=torch.bool).triu(1)
    if sliding_window is not None:
        blocked |= torch.ones(t, t, dtype=torch.bool).tril(-sliding_window)
    if len(source) and len(target):
        blocked[torch.tensor(target)[:, None], torch.tensor(source)[None, :]] = True
    return torch.zeros(t, t, dtype=dtype).masked_fill(blocked, torch.finfo(dtype).min)[None, None]


@contextlib.contextmanager
def mask_in_layers(model, layers, mask):
    """Each decoder layer in `layers` gets `mask` as its attention mask instead of the model's own."""
    decoder = model.get_model().layers

    def wrap(forward):
        def forward_with_cut(*args, **kwargs):
            if "attention_mask" not in kwargs:
                raise RuntimeError("LlamaDecoderLayer was called without an attention_mask keyword: the cut "
                                   "cannot be applied (transformers' call convention changed)")
            kwargs["attention_mask"] = mask
            return forward(*args, **kwargs)

        return forward_with_cut

    for layer in layers:
        decoder[layer].forward = wrap(decoder[layer].forward)
    try:
        yield
    finally:
        for layer in layers:
            del decoder[layer].forward


def last_probs(model, embeds: torch.Tensor, **kwargs):
    """One forward of the multimodal embeddings [T, D]; softmax at the last position [V] (and the output)."""
    t = embeds.shape[0]
    out = model(inputs_embeds=embeds[None], attention_mask=torch.ones(1, t, dtype=torch.long),
                position_ids=torch.arange(t)[None], use_cache=False, **kwargs)
    return torch.softmax(out.logits[0, -1].float(), dim=-1), out


def run_row(model, tokenizer, processor, row: dict, job: dict) -> tuple[dict, dict]:
    image = Image.open(row["image"]).convert("RGB")
    size_wh = image.size
    pixels = process_images([image], processor, model.config)  # [1, 3, S, S] or [1, crops, 3, S, S]
    text, ids = prompt_ids(tokenizer, row["question"])
    with torch.no_grad():
        embeds = multimodal_embeds(model, ids, pixels, size_wh)
        prov = provenance(model, ids, pixels, size_wh)
        gen = model.generate(torch.tensor([ids]), images=pixels, image_sizes=[size_wh], do_sample=False, num_beams=1,
                             max_new_tokens=job["max_new_tokens"], use_cache=True, return_dict_in_generate=True,
                             output_scores=True, pad_token_id=tokenizer.eos_token_id)
    # transformers 4.36 starts the sequences of an inputs_embeds-only generate with a dummy BOS: the generated
    # tokens are the last len(scores)
    tokens = gen.sequences[0, -len(gen.scores):].tolist()
    first = tokens[0]
    p_generate = float(torch.softmax(gen.scores[0][0].float(), dim=-1)[first])

    t = embeds.shape[0]
    image_dim = t - (len(ids) - 1)
    start = ids.index(IMAGE_TOKEN_INDEX)
    red = red_patches(model, processor, image, row["boxes"])
    is_feature = prov[:, 0] >= 0
    related = [i for i in range(t) if is_feature[i] and red[prov[i, 0], prov[i, 1]]]
    regions = {
        "image": list(range(start, start + image_dim)),
        "question": question_positions(tokenizer, ids, row["question"], image_dim),
        "last": [t - 1],
        "related_image_patches": related,
        "other_image_patches": [i for i in range(t) if is_feature[i] and i not in set(related)],
    }
    num_layers = model.config.num_hidden_layers
    with torch.no_grad():
        base, _ = last_probs(model, embeds)
        p_block = np.zeros((len(job["flows"]), num_layers))
        for f, flow in enumerate(job["flows"]):
            source, target = (regions[r] for r in FLOWS[flow])
            mask = cut_mask(t, source, target, embeds.dtype, getattr(model.config, "sliding_window", None))
            for layer in range(num_layers):
                with mask_in_layers(model, window(layer, job["window"], num_layers), mask):
                    p_block[f, layer] = float(last_probs(model, embeds)[0][first])
    best = None
    if getattr(model.config, "image_aspect_ratio", None) == "anyres":
        best = list(select_best_resolution(size_wh, model.config.image_grid_pinpoints))
    result = {
        "id": row["id"], "prompt": text, "input_ids": ids, "image_size_wh": list(size_wh),
        "image_sha256": hashlib.sha256(np.asarray(image).tobytes()).hexdigest(),
        "num_features": image_dim, "best_resolution_wh": best,
        "grid_wh": None if best is None else list(get_anyres_image_grid_shape(
            size_wh, model.config.image_grid_pinpoints, model.get_vision_tower().config.image_size)),
        "generated": tokens, "answer": tokenizer.decode(tokens, skip_special_tokens=True).strip(),
        "first_token": first, "p_base": float(base[first]), "p_base_generate": p_generate,
        "p_block": p_block.tolist(), "regions": regions,
    }
    arrays = {"pixels": pixels.numpy().astype(np.float32), "embeds": embeds.numpy().astype(np.float32),
              "provenance": prov}
    return result, arrays


def cut_check(model, tokenizer, processor, row: dict, job: dict) -> dict:
    """The mechanism itself (eager attention, output_attentions): the largest attention probability on a cut
    (last row, image column) edge in the window's layers, and without the cut the smallest (over those layers)
    attention mass the last position gives the image in its most image-attending head."""
    image = Image.open(row["image"]).convert("RGB")
    pixels = process_images([image], processor, model.config)
    _, ids = prompt_ids(tokenizer, row["question"])
    with torch.no_grad():
        embeds = multimodal_embeds(model, ids, pixels, image.size)
        t = embeds.shape[0]
        start = ids.index(IMAGE_TOKEN_INDEX)
        image_pos = list(range(start, start + t - (len(ids) - 1)))
        layers = window(model.config.num_hidden_layers // 2, job["window"], model.config.num_hidden_layers)
        sliding = getattr(model.config, "sliding_window", None)
        with mask_in_layers(model, layers, cut_mask(t, image_pos, [t - 1], embeds.dtype, sliding)):
            _, cut = last_probs(model, embeds, output_attentions=True)
        _, uncut = last_probs(model, embeds, output_attentions=True)
    cut_max = max(float(cut.attentions[layer][0, :, t - 1, image_pos].max()) for layer in layers)
    uncut_mass = min(float(uncut.attentions[layer][0, :, t - 1, image_pos].sum(-1).max()) for layer in layers)
    return {"layers": layers, "cut_max": cut_max, "uncut_mass": uncut_mass}


def tower_differences(tower, checkpoint: str, clip_dir: str) -> dict:
    """Largest absolute difference of the vision tower LLaVA runs to the separate CLIP checkpoint and (when the
    checkpoint stores one) to the tower stored inside it."""
    running = tower.state_dict()
    clip = load_file(os.path.join(clip_dir, "model.safetensors"))
    inner = "model.vision_tower.vision_tower."
    stored = {k[len(inner):]: v for k, v in load_file(os.path.join(checkpoint, "model.safetensors")).items()
              if k.startswith(inner)}

    def diff(ref):
        return max(float((running[k] - v).abs().max()) for k, v in ref.items()) if ref else None

    return {"running_tower_vs_clip": diff(clip), "running_tower_vs_stored": diff(stored)}


def _write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1)


def main(job_path: str) -> None:
    with open(job_path) as f:
        job = json.load(f)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    warnings.filterwarnings("ignore")  # LLaVA's loader under transformers 4.36 warns a lot; errors still raise
    hf_logging.set_verbosity_error()
    out = job["out"]
    unknown = [f for f in job["flows"] if f not in FLOWS]
    if unknown:
        raise SystemExit(f"{job_path}: unknown flows {unknown}; known: {list(FLOWS)}")
    tok_dir = build_tokenizer(os.path.join(out, "tokenizer"), job["rows"], job["vocab_size"])
    clip_dir = build_clip(os.path.join(out, "clip"), job["clip"])
    for v in job["variants"]:
        path = os.path.join(out, f"llava-{v['name']}")
        facts = build_llava(path, v, clip_dir, job["clip"], tok_dir)
        tokenizer, model, processor = load(path)
        tower = model.get_model().get_vision_tower()
        facts.update(tower_differences(tower.vision_tower, path, clip_dir))
        facts.update(model_class=type(model).__name__, tokenizer_class=type(tokenizer).__name__,
                     attn_implementation=model.config._attn_implementation,
                     vocab_size=len(tokenizer), templates=sorted(conv_templates),
                     dtypes=sorted({str(p.dtype) for p in model.parameters()}),
                     tower_loaded_from=tower.vision_tower_name)
        rows, arrays = [], {}
        for i, row in enumerate(job["rows"]):
            result, arr = run_row(model, tokenizer, processor, row, job)
            rows.append(result)
            arrays.update({f"{i}.{k}": a for k, a in arr.items()})
        facts["cut_check"] = cut_check(model, tokenizer, processor, job["rows"][0], job)
        _write_json(path + ".result.json", {"variant": v["name"], "checkpoint": path, "clip": clip_dir,
                                            "facts": facts, "rows": rows})
        np.savez(path + ".result.npz", **arrays)
        print(f"llava_side: {v['name']}: {len(rows)} rows", flush=True)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit("usage: llava_side.py JOB.json")
    main(sys.argv[1])
