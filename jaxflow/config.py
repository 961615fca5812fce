"""Frozen model configs, read from a checkpoint's transformers `config.json`.

transformers parses the file (and fills its defaults); we then check every attribute against a
table. An attribute we do not implement with a non-default value raises `UnsupportedConfigError`
naming it, so an unsupported variant never silently computes something else.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any


class UnsupportedConfigError(ValueError):
    """A config attribute holds a value jaxflow does not implement."""


# Attributes that never change the forward computation (metadata, training-only, output flags).
_IGNORED = {
    "_name_or_path", "architectures", "chunk_size_feed_forward", "dtype", "torch_dtype", "id2label",
    "label2id", "is_encoder_decoder", "output_attentions", "output_hidden_states", "problem_type",
    "return_dict", "transformers_version", "initializer_range", "initializer_factor", "attention_dropout",
    "use_cache", "max_position_embeddings", "ignore_index", "image_seq_length", "projection_dim",
    "pad_token_id", "bos_token_id", "eos_token_id", "vocab_size", "model_type", "tie_word_embeddings",
    "text_config", "vision_config", "dropout", "hidden_dropout", "use_bfloat16", "tf_legacy_loss",
    "pruned_heads", "torchscript", "tokenizer_class", "prefix", "sep_token_id", "decoder_start_token_id",
    "task_specific_params", "finetuning_task", "cross_attention_hidden_size", "add_cross_attention",
    "is_decoder", "tie_encoder_decoder", "_attn_implementation_autoset", "image_token_id",
}

# Attributes we do not implement: only this value is accepted.
_REQUIRED_TEXT = {"hidden_act": "silu", "attention_bias": False, "mlp_bias": False, "pretraining_tp": 1,
                  "rope_scaling": None}
# Decoder families (text_config.model_type), all Llama arithmetic: the attributes each adds to the Llama ones,
# and whether its q/k/v projections carry a bias (Qwen2: q/k/v yes, o_proj no).
TEXT_TYPES = {
    "llama": {"handled": set(), "qkv_bias": False},
    "mistral": {"handled": {"sliding_window"}, "qkv_bias": False},
    "qwen2": {"handled": {"sliding_window", "use_sliding_window", "max_window_layers", "layer_types"},
              "qkv_bias": True},
}
# Vision towers by `vision_config.model_type`: the value each unimplemented attribute must hold.
_REQUIRED_VISION = {
    "clip_vision_model": {"hidden_act": "quick_gelu", "num_channels": 3},
    "siglip_vision_model": {"hidden_act": "gelu_pytorch_tanh", "num_channels": 3},
}
VISION_TOWERS = {"clip_vision_model": "clip", "siglip_vision_model": "siglip"}
_REQUIRED_TOP = {"projector_hidden_act": "gelu"}

# Whose anyres arithmetic a checkpoint's image features follow (jaxflow.geometry): transformers'
# LlavaNext for llava-hf checkpoints, LLaVA's own code for original-layout ones. The converter writes
# `jaxflow_image_geometry` into config.json for the latter; absent means "transformers".
IMAGE_GEOMETRIES = ("transformers", "llava")
# Top-level model types (transformers' `model_type`) of the checkpoints jaxflow reads.
MODEL_TYPES = ("llava", "llava_next", "llava_onevision")


def _check(section: str, d: dict, handled: set[str], required: dict[str, Any]) -> None:
    for key, value in d.items():
        where = f"{section}.{key}" if section else key
        if key in required:
            if value != required[key]:
                raise UnsupportedConfigError(
                    f"config attribute {where}={value!r} is not supported (jaxflow implements {required[key]!r})"
                )
        elif key not in handled and key not in _IGNORED:
            if value in (None, False, {}, []):
                continue
            raise UnsupportedConfigError(f"config attribute {where}={value!r} is not known to jaxflow")


def _max_grid_crops(value) -> int:
    """N of OneVision's vision_aspect_ratio "anyres_max_N"."""
    digits = value[len(ANYRES_MAX_PREFIX):] if isinstance(value, str) and value.startswith(ANYRES_MAX_PREFIX) else ""
    if not digits.isdigit() or int(digits) < 1:
        raise UnsupportedConfigError(f"config attribute vision_aspect_ratio={value!r} is not supported "
                                     f"(jaxflow implements '{ANYRES_MAX_PREFIX}N', N >= 1)")
    return int(digits)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """ViT vision tower. `kind` "clip": CLS token, pre-layernorm, quick_gelu, conv without bias; "siglip": no CLS,
    no pre-layernorm, tanh-approximated gelu, conv with bias. Neither's post-layernorm is used by LLaVA."""

    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float = 1e-5
    kind: str = "clip"  # one of VISION_TOWERS' values

    @functools.cached_property
    def grid(self) -> int:
        """Patches per side of one image crop (24 for ViT-L/14 at 336 px)."""
        return self.image_size // self.patch_size

    @functools.cached_property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @functools.cached_property
    def has_cls(self) -> bool:
        """Whether the tower's tokens start with a CLS token (CLIP) or are the patches alone (SigLIP)."""
        return self.kind == "clip"

    @classmethod
    def from_hf(cls, d: dict) -> VisionConfig:
        model_type = d.get("model_type")
        if model_type not in VISION_TOWERS:
            raise UnsupportedConfigError(
                f"config attribute vision_config.model_type={model_type!r} is not supported (jaxflow implements "
                f"{', '.join(map(repr, VISION_TOWERS))})")
        handled = {"hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                   "image_size", "patch_size", "layer_norm_eps"}
        if model_type == "siglip_vision_model":
            handled.add("vision_use_head")  # the attention-pooling head; LLaVA never runs it
        _check("vision_config", d, handled, _REQUIRED_VISION[model_type])
        if d["hidden_size"] % d["num_attention_heads"]:
            raise UnsupportedConfigError("vision_config.hidden_size must be a multiple of num_attention_heads")
        return cls(d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"],
                   d["num_attention_heads"], d["image_size"], d["patch_size"], d.get("layer_norm_eps", 1e-5),
                   VISION_TOWERS[model_type])


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """The decoder: Llama arithmetic (RMSNorm, RoPE, MHA or GQA, SwiGLU) for Llama, Mistral and Qwen2 (`TEXT_TYPES`).

    sliding_window: query q attends key k only if q - k < sliding_window (transformers' sliding-window
    mask), in every layer; None: no window. qkv_bias: the q/k/v projections carry a bias (Qwen2).
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    sliding_window: int | None = None
    qkv_bias: bool = False
    model_type: str = "llama"  # one of TEXT_TYPES

    @classmethod
    def from_hf(cls, d: dict) -> TextConfig:
        kind = d.get("model_type", "llama")
        if kind not in TEXT_TYPES:
            raise UnsupportedConfigError(f"config attribute text_config.model_type={kind!r} is not supported "
                                         f"(jaxflow implements {', '.join(map(repr, TEXT_TYPES))})")
        handled = {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                   "num_attention_heads", "num_key_value_heads", "head_dim", "rms_norm_eps",
                   "rope_parameters", "rope_theta"} | TEXT_TYPES[kind]["handled"]
        _check("text_config", d, handled, _REQUIRED_TEXT)
        rope = d.get("rope_parameters") or {"rope_type": "default", "rope_theta": d.get("rope_theta", 10000.0)}
        for key, value in rope.items():
            if key == "rope_type" and value != "default":
                raise UnsupportedConfigError(
                    f"config attribute text_config.rope_parameters.rope_type={value!r} is not supported "
                    "(jaxflow implements 'default')")
            if key not in ("rope_type", "rope_theta"):
                raise UnsupportedConfigError(
                    f"config attribute text_config.rope_parameters.{key}={value!r} is not known to jaxflow")
        heads = d["num_attention_heads"]
        kv_heads = d.get("num_key_value_heads") or heads
        if heads % kv_heads:
            raise UnsupportedConfigError("text_config.num_attention_heads must be a multiple of num_key_value_heads")
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        return cls(d["vocab_size"], d["hidden_size"], d["intermediate_size"], d["num_hidden_layers"],
                   heads, kv_heads, head_dim, d.get("rms_norm_eps", 1e-6), float(rope["rope_theta"]),
                   _sliding_window(kind, d), TEXT_TYPES[kind]["qkv_bias"], kind)


def _sliding_window(kind: str, d: dict) -> int | None:
    """The window every layer applies (None: none), as transformers' Mistral / Qwen2 read the config."""
    window = d.get("sliding_window")
    if kind == "qwen2":
        # Qwen2 slides only with use_sliding_window, and then only in layers >= max_window_layers
        # (transformers writes that rule out as layer_types)
        if not d.get("use_sliding_window"):
            window = None
        n = d["num_hidden_layers"]
        types = d.get("layer_types") or [
            "sliding_attention" if window is not None and i >= d.get("max_window_layers", 28) else "full_attention"
            for i in range(n)]
        if set(types) - {"full_attention", "sliding_attention"} or len(types) != n:
            raise UnsupportedConfigError(f"config attribute text_config.layer_types={types!r} is not supported "
                                         "(jaxflow implements 'full_attention' and 'sliding_attention', one per layer)")
        if len(set(types)) > 1:
            raise UnsupportedConfigError(
                f"config attribute text_config.use_sliding_window=true with max_window_layers="
                f"{d.get('max_window_layers')!r} (sliding-window attention in some layers only, layer_types={types}) "
                "is not supported: jaxflow applies one window to every layer or none")
        window = window if types[0] == "sliding_attention" else None
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window < 1):
        raise UnsupportedConfigError(f"config attribute text_config.sliding_window={window!r} is not supported "
                                     "(expected null or a positive integer)")
    return window


ANYRES_MAX_PREFIX = "anyres_max_"  # OneVision's vision_aspect_ratio: at most N crops' worth of grid features


@dataclasses.dataclass(frozen=True)
class ProjectorConfig:
    """The connector from the vision tower to the decoder. kind "mlp": LLaVA's linear -> GELU -> linear over the
    selected tower layers' states, concatenated; select_strategy "default" drops the tower's first token."""

    kind: str = "mlp"
    feature_layers: tuple[int, ...] = (-2,)
    select_strategy: str = "default"
    bias: bool = True


@dataclasses.dataclass(frozen=True)
class ImageConfig:
    """How an image becomes crops and image-token slots (`jaxflow.geometry` reads it). layout "single": one
    crop (LLaVA-1.5); "anyres": a base crop and a grid of crops from `pinpoints` (height, width), unpadded, one
    image_newline per row (LLaVA-NeXT), downsampled past `max_grid_crops` crops when set (OneVision's
    anyres_max_N). geometry: whose arithmetic the features follow (one of IMAGE_GEOMETRIES)."""

    layout: str = "single"
    pinpoints: tuple[tuple[int, int], ...] = ()
    geometry: str = "transformers"
    max_grid_crops: int | None = None

    @functools.cached_property
    def anyres(self) -> bool:
        """A base crop plus a grid of crops, and image_newline tokens."""
        return self.layout == "anyres"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A vision-language model: a vision tower, a projector and a decoder, each chosen from config.json, and how
    images become tokens. model_type: transformers' top-level type (`MODEL_TYPES`): "llava" (LLaVA-1.5),
    "llava_next" (anyres), "llava_onevision" (anyres whose unpadded grid is downsampled)."""

    model_type: str
    vision: VisionConfig
    projector: ProjectorConfig
    text: TextConfig
    image: ImageConfig
    image_token_id: int
    tie_word_embeddings: bool = False

    @functools.cached_property
    def patch_offset(self) -> int:
        """The patch index of a crop's first image feature (-1: the CLS token). As transformers does, strategy
        "default" drops the tower's first token: CLIP's CLS (0), but for SigLIP, which has none, its first patch
        (1); "full" keeps every token: CLIP's CLS first (-1), SigLIP's patches alone (0)."""
        return (self.projector.select_strategy == "default") - self.vision.has_cls

    @functools.cached_property
    def features_per_crop(self) -> int:
        """Image features one crop yields (576 for ViT-L/14 at 336 px with the CLS token dropped, 729 for SigLIP
        so400m-patch14-384 with strategy "full")."""
        return self.vision.grid**2 - self.patch_offset

    @classmethod
    def from_hf(cls, d: dict) -> ModelConfig:
        """Builds the config from a transformers config dict with every default filled in."""
        kind = d.get("model_type")
        if kind not in MODEL_TYPES:
            raise UnsupportedConfigError(
                f"config attribute model_type={kind!r} is not supported "
                f"(jaxflow implements {', '.join(map(repr, MODEL_TYPES))})")
        handled = {"image_token_index", "vision_feature_layer", "vision_feature_select_strategy",
                   "multimodal_projector_bias", "image_grid_pinpoints", "jaxflow_image_geometry"}
        if kind == "llava_onevision":  # videos are not run: their token id is only metadata here
            handled |= {"vision_aspect_ratio", "video_token_index", "video_token_id"}
        _check("", d, handled, _REQUIRED_TOP)
        strategy = d.get("vision_feature_select_strategy", "default")
        vision = VisionConfig.from_hf(d["vision_config"])
        # anyres packs each crop's features as its patch grid: exactly the patches, no CLS, none dropped
        if strategy not in ("default", "full") or (kind != "llava" and (strategy == "default") != vision.has_cls):
            raise UnsupportedConfigError(
                f"config attribute vision_feature_select_strategy={strategy!r} is not supported for {kind} with "
                f"a {vision.kind} vision tower")
        max_crops = _max_grid_crops(d.get("vision_aspect_ratio", "anyres_max_9")) if kind == "llava_onevision" else None
        layers = d.get("vision_feature_layer", -2)
        layers = (layers,) if isinstance(layers, int) else tuple(layers)
        text = TextConfig.from_hf(d["text_config"])
        for layer in layers:
            if not -vision.num_layers - 1 <= layer <= vision.num_layers:
                raise UnsupportedConfigError(f"config attribute vision_feature_layer={layer} is out of range")
        pinpoints = tuple(tuple(p) for p in d.get("image_grid_pinpoints") or ()) if kind != "llava" else ()
        tie = bool(d.get("tie_word_embeddings") or d["text_config"].get("tie_word_embeddings"))
        image_token = d.get("image_token_index", d.get("image_token_id"))
        geometry = d.get("jaxflow_image_geometry") or "transformers"
        if geometry not in IMAGE_GEOMETRIES:
            raise UnsupportedConfigError(f"config attribute jaxflow_image_geometry={geometry!r} is not supported "
                                         f"(jaxflow implements {', '.join(map(repr, IMAGE_GEOMETRIES))})")
        projector = ProjectorConfig("mlp", layers, strategy, bool(d.get("multimodal_projector_bias", True)))
        image = ImageConfig("single" if kind == "llava" else "anyres", pinpoints, geometry, max_crops)
        return cls(kind, vision, projector, text, image, image_token, tie)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> ModelConfig:
        """Reads `config.json` in `path` (a directory) through transformers' own parser."""
        from transformers import AutoConfig

        config_file = os.path.join(path, "config.json")
        if not os.path.isfile(config_file):
            raise FileNotFoundError(f"{config_file}: no config.json in the checkpoint directory")
        with open(config_file) as f:
            model_type = json.load(f).get("model_type")
        if model_type not in MODEL_TYPES:
            raise UnsupportedConfigError(
                f"{config_file}: model_type={model_type!r} is not supported "
                f"(jaxflow implements {', '.join(map(repr, MODEL_TYPES))})")
        return cls.from_hf(AutoConfig.from_pretrained(path).to_dict())

    def vision_layers_needed(self) -> int:
        """How many vision tower layers must run to produce every selected hidden state."""
        n = self.vision.num_layers
        return max(layer % (n + 1) for layer in self.projector.feature_layers)
