"""Tiny random twins of LLaVA-1.5 and LLaVA-NeXT, built with transformers (PyTorch), and savers
for every checkpoint layout jaxflow converts."""

from __future__ import annotations

import json
import os

import numpy as np
import torch
from safetensors.numpy import save_file
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
)

IMAGE_TOKEN = 127
PAD_TOKEN = 126
IMAGE_SIZE = 42  # 3 x 3 patches of 14 px per crop
PINPOINTS = [[42, 84], [84, 42], [84, 84], [126, 42], [42, 126]]


def hf_config(kind="llava", kv_heads=4, tie=False, strategy="default", feature_layer=-2, init=0.2):
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=IMAGE_SIZE, patch_size=14, hidden_act="quick_gelu",
                              initializer_range=init, initializer_factor=5.0)
    text = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                       num_attention_heads=4, num_key_value_heads=kv_heads, rms_norm_eps=1e-5,
                       initializer_range=init, tie_word_embeddings=tie, pad_token_id=PAD_TOKEN,
                       rope_parameters={"rope_type": "default", "rope_theta": 500000.0 if kv_heads < 4 else 10000.0})
    common = dict(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=IMAGE_TOKEN,
                  vision_feature_select_strategy=strategy, vision_feature_layer=feature_layer,
                  tie_word_embeddings=tie)
    if kind == "llava_next":
        return LlavaNextConfig(image_grid_pinpoints=PINPOINTS, **common)
    return LlavaConfig(**common)


def hf_model(kind="llava", seed=0, **kw):
    torch.manual_seed(seed)
    cls = LlavaNextForConditionalGeneration if kind == "llava_next" else LlavaForConditionalGeneration
    model = cls._from_config(hf_config(kind, **kw), attn_implementation="eager").eval()
    if kind == "llava_next":  # transformers' init leaves the newline small; make it matter
        with torch.no_grad():
            model.model.image_newline.normal_(0, 1.0)
    return model


def make_inputs(cfg, num_text=6, image_sizes=((42, 42),), batch=None, seed=0):
    """input_ids [B, T] with one image per row, pixel_values, image_sizes (H, W) for NeXT.

    The image tokens sit after one BOS-like token; num_text text tokens (per row, or one count) follow.
    """
    from jaxflow.image_layout import image_layout

    rng = np.random.default_rng(seed)
    rows, pixels = [], []
    counts = [num_text] * len(image_sizes) if np.isscalar(num_text) else num_text
    for size, count in zip(image_sizes, counts, strict=True):
        lay = image_layout(cfg, size) if cfg.is_next else image_layout(cfg)
        text = rng.integers(2, 120, count)
        rows.append(np.concatenate([[1], np.full(len(lay), IMAGE_TOKEN), text]))
        crops = lay.num_crops
        pixels.append(rng.standard_normal((crops, 3, IMAGE_SIZE, IMAGE_SIZE)).astype(np.float32))
    t = max(map(len, rows))
    input_ids = np.full((len(rows), t), PAD_TOKEN)
    mask = np.zeros((len(rows), t), np.int64)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    if cfg.is_next:
        p = max(len(x) for x in pixels)
        pv = np.zeros((len(pixels), p, 3, IMAGE_SIZE, IMAGE_SIZE), np.float32)
        for i, x in enumerate(pixels):
            pv[i, : len(x)] = x
        return input_ids, pv, np.asarray(image_sizes), mask
    return input_ids, np.concatenate(pixels), None, mask


# ---- checkpoint layouts ------------------------------------------------------------------------


def _state(model) -> dict[str, np.ndarray]:
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def save_llava_hf(model, path, layout="llava-hf", shard=False):
    """layout: 'llava-hf' (transformers' save), 'llava-hf-legacy' (vision_tower.vision_model.*),
    'llava-hf-model' (model.language_model.* in-memory names)."""
    if layout == "llava-hf":
        model.save_pretrained(path, max_shard_size="40KB" if shard else "5GB")
        return path
    model.save_pretrained(path)  # config and generation config
    for f in os.listdir(path):
        if f.endswith(".safetensors") or f.endswith(".index.json"):
            os.remove(os.path.join(path, f))
    tensors = {}
    for name, value in _state(model).items():
        if layout == "llava-hf-legacy":
            name = name.replace("model.language_model.", "language_model.model.")
            name = name.replace("model.vision_tower.", "vision_tower.vision_model.")
            name = name.replace("model.multi_modal_projector.", "multi_modal_projector.")
            name = name.replace("model.image_newline", "image_newline")
            name = "language_model.lm_head.weight" if name == "lm_head.weight" else name
        tensors[name] = value
    if model.config.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
        tensors.pop("language_model.lm_head.weight", None)
    save_file(tensors, os.path.join(path, "model.safetensors"))
    return path


def save_original(model, path, clip_path):
    """The original LLaVA layout (model.layers.*, model.mm_projector.*) plus a CLIP checkpoint."""
    os.makedirs(path, exist_ok=True)
    os.makedirs(clip_path, exist_ok=True)
    cfg = model.config
    text, vision = cfg.text_config.to_dict(), cfg.vision_config.to_dict()
    llava, clip = {}, {}
    for name, value in _state(model).items():
        if name.startswith("model.vision_tower."):
            clip[name.replace("model.vision_tower.", "vision_model.")] = value
        elif name.startswith("model.language_model."):
            llava[name.replace("model.language_model.", "model.")] = value
        elif name.startswith("model.multi_modal_projector.linear_"):
            idx = {"1": "0", "2": "2"}[name.split("linear_")[1][0]]
            llava[f"model.mm_projector.{idx}." + name.rsplit(".", 1)[1]] = value
        elif name == "model.image_newline":
            llava["model.image_newline"] = value
        else:
            llava[name] = value
    llava["model.vision_tower.vision_tower.vision_model.post_layernorm.weight"] = np.ones(32, np.float32)  # stale
    save_file(llava, os.path.join(path, "model.safetensors"))
    save_file(clip, os.path.join(clip_path, "model.safetensors"))
    next_ = cfg.model_type == "llava_next"
    original = {
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        **{k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "hidden_act",
                                "max_position_embeddings", "tie_word_embeddings")},
        "rope_theta": text["rope_parameters"]["rope_theta"],
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": vision["hidden_size"],
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": cfg.vision_feature_layer,
        "mm_vision_select_feature": "patch" if cfg.vision_feature_select_strategy == "default" else "cls_patch",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "image_aspect_ratio": "anyres" if next_ else "pad",
        "mm_patch_merge_type": "spatial_unpad" if next_ else "flat",
    }
    if next_:
        original["image_grid_pinpoints"] = cfg.image_grid_pinpoints
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(original, f)
    with open(os.path.join(clip_path, "config.json"), "w") as f:
        json.dump({**vision, "model_type": "clip_vision_model"}, f)
    return path, clip_path
