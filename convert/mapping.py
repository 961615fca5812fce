"""Where weights get renamed: checkpoint layouts -> canonical names -> jaxflow parameters.

Two declarative tables:
- LAYOUTS: per checkpoint layout, prefix rewrites from on-disk tensor names to canonical names
  (None drops tensors the layout carries but LLaVA never uses);
- PARAMS: jaxflow parameter (with {i} for a layer index) -> (canonical name, transform).
"""

from __future__ import annotations

import re

import numpy as np

# --- transforms (numpy, one tensor at a time) ---------------------------------------------


def identity(x: np.ndarray) -> np.ndarray:
    return x


def linear(x: np.ndarray) -> np.ndarray:
    """PyTorch Linear weight [out, in] -> kernel [in, out]."""
    return np.ascontiguousarray(x.T)


def conv_patch(x: np.ndarray) -> np.ndarray:
    """Conv2d weight [D, C, p, p] -> matmul kernel [C*p*p, D] over flattened (C, p, p) patches."""
    return np.ascontiguousarray(_conv_patch_view(x))


def _conv_patch_view(x: np.ndarray) -> np.ndarray:
    return x.reshape(x.shape[0], -1).T


# each transform as a view of its input (no copy); `apply` writes it into an array of its own
VIEWS = {"identity": identity, "linear": np.transpose, "conv_patch": _conv_patch_view}


def apply(transform: str, x: np.ndarray, dtype, empty=np.empty) -> np.ndarray:
    """x transformed and cast to dtype in one pass, into `empty(shape, dtype)`; x itself when that changes
    nothing. Equal to TRANSFORMS[transform](x.astype(dtype))."""
    view = VIEWS[transform](x)
    if view is x and x.dtype == np.dtype(dtype):
        return x
    out = empty(view.shape, dtype)
    np.copyto(out, view, casting="unsafe")
    return out


TRANSFORMS = {"identity": identity, "linear": linear, "conv_patch": conv_patch}

# --- checkpoint layouts ------------------------------------------------------------------

LAYOUTS: dict[str, list[tuple[str, str | None]]] = {
    # transformers llava-hf as saved on disk (older saves nest the vision tower in vision_model)
    "llava-hf": [
        ("language_model.model.", "text."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.vision_model.", "vision."),
        ("vision_tower.", "vision."),
        ("multi_modal_projector.", "projector."),
        ("image_newline", "image_newline"),
    ],
    # transformers 5.x in-memory names, as some checkpoints are saved
    "llava-hf-model": [
        ("model.language_model.", "text."),
        ("lm_head.", "lm_head."),
        ("model.vision_tower.vision_model.", "vision."),
        ("model.vision_tower.", "vision."),
        ("model.multi_modal_projector.", "projector."),
        ("model.image_newline", "image_newline"),
    ],
    # original LLaVA (liuhaotian/*, lmms-lab/*). The CLIP tower LLaVA trained with is stored under
    # STORED_TOWER_PREFIX; the converter decides whether it or the --clip checkpoint's tower is used
    "original": [
        ("model.mm_projector.0.", "projector.linear_1."),
        ("model.mm_projector.2.", "projector.linear_2."),
        ("model.image_newline", "image_newline"),
        ("model.vision_tower.vision_tower.vision_model.", "vision."),
        ("model.vision_tower.", None),
        ("model.", "text."),
        ("lm_head.", "lm_head."),
    ],
    # a CLIP checkpoint (CLIPModel or CLIPVisionModel) for the original layout
    "clip": [
        ("vision_model.", "vision."),
        ("text_model.", None),
        ("visual_projection.", None),
        ("text_projection.", None),
        ("logit_scale", None),
    ],
}

STORED_TOWER_PREFIX = "model.vision_tower.vision_tower.vision_model."

# Canonical tensors that exist in real checkpoints but are not parameters of the computation.
IGNORED = [
    r"vision\.post_layernorm\..*",
    r"vision\.head\..*",  # SigLIP's attention-pooling head
    r"vision\.embeddings\.position_ids",
    r"text\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq",
    r"text\.rotary_emb\.inv_freq",
]


def detect_layout(names: list[str]) -> str:
    if any(n.startswith("model.language_model.") for n in names):
        return "llava-hf-model"
    if any(n.startswith("language_model.model.") for n in names):
        return "llava-hf"
    if any(n.startswith("model.layers.") for n in names):
        return "original"
    raise ValueError("unrecognised checkpoint layout: expected language_model.model.*, model.language_model.* "
                     f"or model.layers.* tensor names; first names: {sorted(names)[:5]}")


def canonical(layout: str, name: str) -> str | None:
    """On-disk name -> canonical name; None when the layout drops it; unchanged if no rule applies."""
    for prefix, target in LAYOUTS[layout]:
        if name.startswith(prefix):
            return None if target is None else target + name[len(prefix):]
    return name


# --- jaxflow parameters ------------------------------------------------------------------

_CLIP_ATTN = ("q_proj", "k_proj", "v_proj", "out_proj")
_VISION_LAYER = {
    "layer_norm1.scale": ("layer_norm1.weight", "identity"),
    "layer_norm1.bias": ("layer_norm1.bias", "identity"),
    "layer_norm2.scale": ("layer_norm2.weight", "identity"),
    "layer_norm2.bias": ("layer_norm2.bias", "identity"),
    **{f"self_attn.{p}.kernel": (f"self_attn.{p}.weight", "linear") for p in _CLIP_ATTN},
    **{f"self_attn.{p}.bias": (f"self_attn.{p}.bias", "identity") for p in _CLIP_ATTN},
    "fc1.kernel": ("mlp.fc1.weight", "linear"),
    "fc1.bias": ("mlp.fc1.bias", "identity"),
    "fc2.kernel": ("mlp.fc2.weight", "linear"),
    "fc2.bias": ("mlp.fc2.bias", "identity"),
}
_TEXT_LAYER = {
    "input_layernorm.scale": ("input_layernorm.weight", "identity"),
    "post_attention_layernorm.scale": ("post_attention_layernorm.weight", "identity"),
    **{f"self_attn.{p}.kernel": (f"self_attn.{p}.weight", "linear") for p in ("q_proj", "k_proj", "v_proj", "o_proj")},
    **{f"self_attn.{p}.bias": (f"self_attn.{p}.bias", "identity") for p in ("q_proj", "k_proj", "v_proj")},  # Qwen2
    **{f"{p}.kernel": (f"mlp.{p}.weight", "linear") for p in ("gate_proj", "up_proj", "down_proj")},
}

PARAMS: dict[str, tuple[str, str]] = {
    "vision_tower.patch_embed.kernel": ("vision.embeddings.patch_embedding.weight", "conv_patch"),
    "vision_tower.patch_embed.bias": ("vision.embeddings.patch_embedding.bias", "identity"),  # SigLIP
    "vision_tower.class_embed": ("vision.embeddings.class_embedding", "identity"),  # CLIP
    "vision_tower.pos_embed": ("vision.embeddings.position_embedding.weight", "identity"),
    "vision_tower.pre_norm.scale": ("vision.pre_layrnorm.weight", "identity"),  # CLIP
    "vision_tower.pre_norm.bias": ("vision.pre_layrnorm.bias", "identity"),
    **{f"vision_tower.layers.{{i}}.{k}": (f"vision.encoder.layers.{{i}}.{s}", t)
       for k, (s, t) in _VISION_LAYER.items()},
    "projector.linear_1.kernel": ("projector.linear_1.weight", "linear"),
    "projector.linear_1.bias": ("projector.linear_1.bias", "identity"),
    "projector.linear_2.kernel": ("projector.linear_2.weight", "linear"),
    "projector.linear_2.bias": ("projector.linear_2.bias", "identity"),
    "image_newline": ("image_newline", "identity"),
    "language_model.embed_tokens.embedding": ("text.embed_tokens.weight", "identity"),
    **{f"language_model.layers.{{i}}.{k}": (f"text.layers.{{i}}.{s}", t) for k, (s, t) in _TEXT_LAYER.items()},
    "language_model.norm.scale": ("text.norm.weight", "identity"),
    "language_model.lm_head.kernel": ("lm_head.weight", "linear"),
}


def source_of(param: str) -> tuple[str, str]:
    """jaxflow parameter name -> (canonical source name, transform name)."""
    match = re.search(r"\.layers\.(\d+)\.", param)
    key = param if match is None else param.replace(f".layers.{match[1]}.", ".layers.{i}.")
    if key not in PARAMS:
        raise KeyError(f"no mapping for jaxflow parameter {param}")
    source, transform = PARAMS[key]
    return (source if match is None else source.format(i=match[1])), transform


def is_ignored(name: str) -> bool:
    return any(re.fullmatch(p, name) for p in IGNORED)
