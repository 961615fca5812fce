"""`jaxflow convert SRC OUT`: stream a LLaVA safetensors checkpoint into a jaxflow model directory.

Every check (layout, config, missing / unexpected / mis-shaped tensors) runs before anything is
written. Tensors are then read, cast and transformed one at a time and written one parameter
group (a layer) at a time, into a temporary directory that is renamed to OUT only when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections import defaultdict

import ml_dtypes
import numpy as np
from tqdm import tqdm

from convert import mapping
from convert.safetensors_source import CheckpointError, SafetensorsSource
from jaxflow import checkpoint
from jaxflow.config import LlavaConfig

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "added_tokens.json",
    "chat_template.json", "chat_template.jinja", "generation_config.json", "preprocessor_config.json",
    "processor_config.json", "vocab.json", "merges.txt",
)


class ConversionError(ValueError):
    """The source checkpoint cannot be converted; the message names the file, key or attribute."""


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        raise ConversionError(f"{path}: not found")
    try:
        with open(path) as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON ({e})") from e


_ORIGINAL_HANDLED_MM = {
    "mm_vision_tower", "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer",
    "mm_vision_select_feature", "mm_use_im_start_end", "mm_use_im_patch_token", "mm_patch_merge_type",
    "mm_projector_lr", "mm_vision_tower_lr", "mm_newline_position", "mm_spatial_pool_mode",
}
_LLAMA_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
    "hidden_act", "attention_bias", "mlp_bias", "pretraining_tp", "tie_word_embeddings", "head_dim",
    "bos_token_id", "eos_token_id", "pad_token_id",
)
IMAGE_TOKEN_INDEX_ORIGINAL = -200  # LLaVA's placeholder id; never looked up in the embedding


def original_to_hf_config(cfg: dict, clip_cfg: dict, where: str) -> dict:
    """An original LLaVA config (+ its CLIP config) as a transformers llava / llava_next config."""

    def refuse(key):
        raise ConversionError(f"{where}: config attribute {key}={cfg.get(key)!r} is not supported")

    for key, value in cfg.items():
        if key.startswith("mm_") and key not in _ORIGINAL_HANDLED_MM and value not in (None, False):
            refuse(key)
    if cfg.get("mm_projector_type", "linear") != "mlp2x_gelu":
        refuse("mm_projector_type")
    for key in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if cfg.get(key):
            refuse(key)
    select = cfg.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        refuse("mm_vision_select_feature")
    aspect = cfg.get("image_aspect_ratio") or "square"
    anyres = aspect.startswith("anyres")
    if aspect not in ("pad", "square", "anyres"):
        refuse("image_aspect_ratio")
    if anyres and cfg.get("mm_patch_merge_type", "flat") != "spatial_unpad":
        refuse("mm_patch_merge_type")
    vision = dict(clip_cfg.get("vision_config", clip_cfg))
    vision["model_type"] = "clip_vision_model"
    text = {k: cfg[k] for k in _LLAMA_KEYS if k in cfg}
    text["model_type"] = "llama"
    out = {
        "model_type": "llava_next" if anyres else "llava",
        "text_config": text,
        "vision_config": vision,
        "image_token_index": IMAGE_TOKEN_INDEX_ORIGINAL,
        "vision_feature_layer": cfg.get("mm_vision_select_layer", -2),
        "vision_feature_select_strategy": "default" if select == "patch" else "full",
        "projector_hidden_act": "gelu",
        "multimodal_projector_bias": True,
        "tie_word_embeddings": bool(cfg.get("tie_word_embeddings", False)),
    }
    if anyres:
        out["image_grid_pinpoints"] = cfg.get("image_grid_pinpoints")
    return out


def _transformed_shape(shape: tuple, transform: str) -> tuple:
    if transform == "linear":
        return tuple(reversed(shape))
    if transform == "conv_patch":
        return (int(np.prod(shape[1:])), shape[0])
    return tuple(shape)


def convert(src: str, out: str, clip: str | None = None, dtype: str = "float32", progress: bool = True) -> str:
    """Converts `src` into a new directory `out`; returns `out`."""
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    if os.path.exists(out):
        raise ConversionError(f"{out}: already exists; remove it or choose another output directory")
    src_dir = src if os.path.isdir(src) else os.path.dirname(src)
    try:
        main = SafetensorsSource(src)
        layout = mapping.detect_layout(main.keys())
    except (CheckpointError, ValueError) as e:
        raise ConversionError(str(e)) from e

    # config.json in llava-hf form
    raw = _read_json(os.path.join(src_dir, "config.json"))
    sources = [(layout, main)]
    if layout == "original":
        if clip is None:
            raise ConversionError(f"{src}: original LLaVA layout: pass the CLIP vision checkpoint with --clip")
        try:
            clip_source = SafetensorsSource(clip)
        except CheckpointError as e:
            raise ConversionError(str(e)) from e
        clip_dir = clip if os.path.isdir(clip) else os.path.dirname(clip)
        hf_config = original_to_hf_config(raw, _read_json(os.path.join(clip_dir, "config.json")),
                                          os.path.join(src_dir, "config.json"))
        sources.append(("clip", clip_source))
    else:
        if clip is not None:
            raise ConversionError(f"--clip: {src} is a llava-hf checkpoint with its own vision tower")
        hf_config = raw

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.tmp-", dir=parent)
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=1)
        try:
            cfg = LlavaConfig.from_pretrained(tmp)
        except ValueError as e:
            raise ConversionError(f"{os.path.join(src_dir, 'config.json')}: {e}") from e
        plan = _plan(cfg, sources)
        groups: dict[str, list[str]] = defaultdict(list)
        for param in plan:
            groups[checkpoint.group_of(param)].append(param)
        writer = checkpoint.GroupWriter(tmp)
        np_dtype = DTYPES[dtype]
        for group, params in tqdm(groups.items(), desc="convert", unit="group", disable=not progress):
            tensors = {}
            for param in params:
                source, name, transform = plan[param]
                # no name keeps the source array alive: only its transformed copy lives on into the write
                tensors[param] = mapping.TRANSFORMS[transform](source.get(name).astype(np_dtype, copy=False))
            writer.write(group, tensors)
            del tensors
        writer.finish(dtype=dtype, layout=layout, source=os.path.abspath(src),
                      image_aspect_ratio=raw.get("image_aspect_ratio"))
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(src_dir, name)):
                shutil.copy2(os.path.join(src_dir, name), os.path.join(tmp, name))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _plan(cfg: LlavaConfig, sources) -> dict[str, tuple[SafetensorsSource, str, str]]:
    """jaxflow parameter -> (source, on-disk name, transform), after checking every name and shape."""
    from jaxflow.model import param_shapes

    by_canonical: dict[str, tuple[SafetensorsSource, str]] = {}
    dropped: set[str] = set()
    for layout, source in sources:
        for name in source.keys():
            canon = mapping.canonical(layout, name)
            if canon is None:
                dropped.add(name)
            else:
                by_canonical[canon] = (source, name)
    targets = param_shapes(cfg)
    plan, missing, misshaped = {}, [], []
    for param, spec in targets.items():
        canon, transform = mapping.source_of(param)
        if canon not in by_canonical:
            missing.append(canon)
            continue
        source, name = by_canonical[canon]
        shape = _transformed_shape(source.shape(name), transform)
        if shape != tuple(spec.shape):
            misshaped.append(f"{name} {source.shape(name)} (expected {tuple(spec.shape)} after {transform})")
        plan[param] = (source, name, transform)
    used = {mapping.source_of(p)[0] for p in targets}
    needed = cfg.vision_layers_needed()
    unexpected = []
    for canon, (_, name) in by_canonical.items():
        if canon in used or mapping.is_ignored(canon):
            continue
        layer = re.fullmatch(r"vision\.encoder\.layers\.(\d+)\..*", canon)
        if layer and needed <= int(layer[1]) < cfg.vision.num_layers:
            continue  # CLIP layers after the selected feature layer never run
        if canon == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        unexpected.append(name)
    if missing or unexpected or misshaped:
        lines = []
        if missing:
            lines.append(f"missing tensors ({len(missing)}): {sorted(missing)}")
        if unexpected:
            lines.append(f"unexpected tensors ({len(unexpected)}): {sorted(unexpected)}")
        if misshaped:
            lines.append(f"mis-shaped tensors ({len(misshaped)}): {misshaped}")
        raise ConversionError(f"{sources[0][1].path}: checkpoint does not match its config:\n  " + "\n  ".join(lines))
    return plan
