"""Random LLaVA checkpoints in the transformers llava-hf on-disk layout, written without torch.

Used by the smoke demo and the benchmarks: the tensor names and shapes are derived from the
converter's own mapping table, inverted, so they always agree with what `convert` expects.
"""

from __future__ import annotations

import json
import os

import numpy as np
from safetensors.numpy import save_file

from jaxflow.config import ModelConfig
from jaxflow.convert import mapping

_DISK_PREFIX = {"text.": "language_model.model.", "lm_head.": "language_model.lm_head.",
                "vision.": "vision_tower.", "projector.": "multi_modal_projector.", "image_newline": "image_newline"}


def _disk_name(canonical: str) -> str:
    for prefix, disk in _DISK_PREFIX.items():
        if canonical.startswith(prefix):
            return disk + canonical[len(prefix):]
    raise KeyError(canonical)


def _source_shape(shape: tuple, transform: str, patch: int) -> tuple:
    if transform == "linear":
        return tuple(reversed(shape))
    if transform == "conv_patch":
        return (shape[1], 3, patch, patch)
    return tuple(shape)


def write_random_checkpoint(path: str, hf_config: dict, seed: int = 0, scale: float = 0.05,
                            max_shard_bytes: int | None = None) -> str:
    """Writes config.json and random float32 weights (sharded above max_shard_bytes) into `path`."""
    from jaxflow.model import param_shapes

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=1)
    cfg = ModelConfig.from_pretrained(path)
    rng = np.random.default_rng(seed)
    shards, current, size = [], {}, 0
    for param, spec in param_shapes(cfg).items():
        canonical, transform = mapping.source_of(param)
        shape = _source_shape(tuple(spec.shape), transform, cfg.vision.patch_size)
        if param.endswith((".scale",)):
            value = 1.0 + scale * rng.standard_normal(shape, np.float32)
        else:
            value = scale * rng.standard_normal(shape, np.float32)
        if max_shard_bytes and current and size + value.nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[_disk_name(canonical)] = value
        size += value.nbytes
    d = cfg.vision.hidden_size
    current["vision_tower.post_layernorm.weight"] = np.ones(d, np.float32)
    current["vision_tower.post_layernorm.bias"] = np.zeros(d, np.float32)
    shards.append(current)
    if len(shards) == 1:
        save_file(shards[0], os.path.join(path, "model.safetensors"))
        return path
    weight_map = {}
    for i, shard in enumerate(shards):
        name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, os.path.join(path, name))
        weight_map.update(dict.fromkeys(shard, name))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f, indent=1)
    return path


def tiny_hf_config(kind: str = "llava", image_size: int = 56, layers: int = 4, hidden: int = 64,
                   heads: int = 4, kv_heads: int = 4, vocab: int = 256, image_token_index: int | None = None) -> dict:
    """A small transformers llava / llava_next / llava_onevision config dict (image token: vocab - 1 unless given;
    OneVision: a CLIP tower with strategy "default", pinpoints up to 6 x 6 crops as OneVision's own)."""
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaOnevisionConfig
    from transformers import LlavaConfig as HFLlavaConfig

    vision = CLIPVisionConfig(hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=3,
                              num_attention_heads=4, image_size=image_size, patch_size=14, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                       num_attention_heads=heads, num_key_value_heads=kv_heads)
    image_token = vocab - 1 if image_token_index is None else image_token_index
    common = dict(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=image_token)
    if kind == "llava_next":
        s = image_size
        pin = [[s, 2 * s], [2 * s, s], [2 * s, 2 * s], [3 * s, s], [s, 3 * s]]
        return LlavaNextConfig(image_grid_pinpoints=pin, **common).to_dict()
    if kind == "llava_onevision":
        pin = [[image_size * i, image_size * j] for i in range(1, 7) for j in range(1, 7)]
        return LlavaOnevisionConfig(image_grid_pinpoints=pin, vision_feature_select_strategy="default",
                                    vision_feature_layer=-1, **common).to_dict()
    return HFLlavaConfig(**common).to_dict()


def _added_token(content: str) -> dict:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": False, "rstrip": False,
            "single_word": False}


def save_sentencepiece_tokenizer(path: str, lines: list[str], vocab: int = 320, legacy: bool = False) -> int:
    """An original-LLaVA tokenizer trained on `lines`: a Llama-2-style SentencePiece BPE tokenizer.model (byte
    fallback, identity normalization, dummy prefix, <unk>/<s>/</s> = 0/1/2) with the tokenizer_config.json and
    special_tokens_map.json LLaVA-1.5 ships, and no tokenizer.json. Returns the vocabulary size."""
    import io

    import sentencepiece as spm

    os.makedirs(path, exist_ok=True)
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab, model_type="bpe",
        byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True, remove_extra_whitespaces=False,
        normalization_rule_name="identity", add_dummy_prefix=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        character_coverage=1.0, minloglevel=2)
    with open(os.path.join(path, "tokenizer.model"), "wb") as f:
        f.write(model.getvalue())
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump({"add_bos_token": True, "add_eos_token": False, "bos_token": _added_token("<s>"),
                   "clean_up_tokenization_spaces": False, "eos_token": _added_token("</s>"), "legacy": legacy,
                   "model_max_length": 2048, "pad_token": None, "padding_side": "right", "sp_model_kwargs": {},
                   "tokenizer_class": "LlamaTokenizer", "unk_token": _added_token("<unk>")}, f)
    with open(os.path.join(path, "special_tokens_map.json"), "w") as f:
        json.dump({"bos_token": _added_token("<s>"), "eos_token": _added_token("</s>"), "pad_token": "<unk>",
                   "unk_token": _added_token("<unk>")}, f)
    return spm.SentencePieceProcessor(model_proto=model.getvalue()).get_piece_size()
