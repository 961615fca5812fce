"""`jaxflow convert SRC OUT`: stream a LLaVA checkpoint into a jaxflow model directory.

Every check (layout, config, tokenizer, missing / unexpected / mis-shaped tensors) runs before any
parameter is written. Each parameter group (a layer) is then written as one orbax checkpoint, with the
digests of what it holds (`checkpoint.GroupWriter`), into a temporary directory `.OUT.tmp-<host>-<pid>-*`
that is renamed to OUT only when complete. A group's tensors are written one at a time: each is read, cast
and transformed only when the writer comes to it, into a memory map of its own (`sources.mapped_empty`),
and released once written, so peak memory follows the largest tensor, not the group or the checkpoint. A
killed conversion leaves only its temporary directory; the next conversion into OUT on the same host
removes those whose process is gone.

Models that are not LLaVA-style (Qwen2-VL's M-RoPE, mllama's cross-attention, pixtral, idefics) and unknown
model types are refused from config.json alone, before any tensor is read (`refuse_architecture`).

Original-layout checkpoints (liuhaotian/*, lmms-lab/*) are converted as LLaVA's own code
(llava-torch 1.2.2) runs them:
- decoder: the class config.json names in `architectures` (LlavaLlamaForCausalLM, LlavaMistralForCausalLM,
  lmms-lab's LlavaQwenForCausalLM), else its model_type (llava_llama, llava_mistral, llava_qwen), else Llama;
  the family's own attributes (Mistral's sliding_window; Qwen2's use_sliding_window, max_window_layers) go into
  text_config. (LLaVA's loader picks the class from the checkpoint's directory name instead.)
- vision tower: LLaVA builds the CLIP tower before loading the checkpoint, so the tower stored in
  it (model.vision_tower.vision_tower.vision_model.*) replaces the separate CLIP, when config.json
  says the tower was trained (`unfreeze_mm_vision_tower`, or `mm_tunable_parts` naming
  `mm_vision_tower`, as LLaVA-NeXT's code reads it). Otherwise LLaVA runs the --clip checkpoint;
  a complete stored tower then is a frozen copy of it, checked here: one that differs from --clip
  beyond rounding to the stored dtype was trained anyway and is used (`vision_tower="auto"`).
  --clip supplies the vision config and the image processor in every case.
- `image_grid_pinpoints`: LLaVA reads (width, height) pairs; they are stored as jaxflow's
  (height, width).
- image geometry: config.json gets `"jaxflow_image_geometry": "llava"`, so the anyres features
  follow LLaVA's unpadding arithmetic, not transformers' (jaxflow.geometry).
- image processor: LLaVA uses the CLIP tower's (CLIPImageProcessor.from_pretrained(--clip)).
- tokenizer: LLaVA-1.5/1.6 ship only a SentencePiece tokenizer.model; a fast tokenizer.json is
  built from it here (transformers, with sentencepiece and protobuf), so loading is fast and has
  character offsets.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import socket
import tempfile
from collections import defaultdict

import ml_dtypes
import numpy as np
from tqdm import tqdm

from jaxflow import checkpoint
from jaxflow.config import MODEL_TYPES, ModelConfig
from jaxflow.convert import mapping
from jaxflow.convert.sources import CheckpointError, PickleSource, Source, mapped_empty, open_source

DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16, "float16": np.float16}
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model", "added_tokens.json",
    "chat_template.json", "chat_template.jinja", "generation_config.json", "processor_config.json", "vocab.json",
    "merges.txt",
)
PREPROCESSOR_FILE = "preprocessor_config.json"
VISION_TOWER_CHOICES = ("auto", "checkpoint", "clip")


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


# mm_* attributes of original configs that are read below or never change inference (learning rates)
_ORIGINAL_HANDLED_MM = {
    "mm_vision_tower", "mm_hidden_size", "mm_projector_type", "mm_vision_select_layer",
    "mm_vision_select_feature", "mm_use_im_start_end", "mm_use_im_patch_token", "mm_patch_merge_type",
    "mm_projector_lr", "mm_vision_tower_lr", "mm_newline_position", "mm_spatial_pool_mode", "mm_tunable_parts",
}
_TUNABLE_PARTS = {"mm_vision_tower", "mm_mlp_adapter", "mm_language_model", "mm_vision_resampler"}
_LLAMA_KEYS = (
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "rope_theta", "rope_scaling", "max_position_embeddings",
    "hidden_act", "attention_bias", "mlp_bias", "pretraining_tp", "tie_word_embeddings", "head_dim",
    "bos_token_id", "eos_token_id", "pad_token_id",
)
IMAGE_TOKEN_INDEX_ORIGINAL = -200  # LLaVA's placeholder id; never looked up in the embedding
# Original LLaVA's model classes (config.json `architectures`) and model types -> text_config.model_type, and the
# attributes each decoder family adds to _LLAMA_KEYS. model_type "llava" names no decoder (LLaVA-1.5/1.6 saves).
ORIGINAL_DECODERS = {"LlavaLlamaForCausalLM": "llama", "LlavaMistralForCausalLM": "mistral",
                     "LlavaQwenForCausalLM": "qwen2"}
ORIGINAL_MODEL_TYPES = {"llava": None, "llava_llama": "llama", "llava_mistral": "mistral", "llava_qwen": "qwen2"}
_DECODER_KEYS = {"llama": (), "mistral": ("sliding_window",),
                 "qwen2": ("use_sliding_window", "sliding_window", "max_window_layers")}
# Top-level model types that are not LLaVA-style (vision features placed as tokens into a RoPE decoder), and why.
NOT_LLAVA = {
    "qwen2_vl": "M-RoPE (multimodal rotary positions over time, height and width)",
    "qwen2_5_vl": "M-RoPE (multimodal rotary positions over time, height and width)",
    "mllama": "cross-attention layers (the image enters the decoder through cross-attention, not as tokens)",
    "pixtral": "the Pixtral vision encoder (2D RoPE over variable-size images, [IMG_BREAK] row tokens)",
    "idefics": "gated cross-attention layers (Flamingo-style)",
    "idefics2": "a perceiver-resampler connector",
    "idefics3": "a pixel-shuffle connector over image tiles",
}


def refuse_architecture(raw: dict, where: str) -> None:
    """Refuses a config.json whose model is not LLaVA-style (NOT_LLAVA) or of no model type jaxflow knows, in one
    line naming the model type (or vision_config.model_type) and what it has that jaxflow does not implement."""
    supported = (f"jaxflow supports {', '.join(MODEL_TYPES)} (llava-hf layout) and "
                 f"{', '.join(ORIGINAL_MODEL_TYPES)} (original LLaVA layout)")
    kind = raw.get("model_type")
    vision = raw.get("vision_config")
    vision = vision.get("model_type") if isinstance(vision, dict) else None
    if kind in NOT_LLAVA:
        raise ConversionError(f"{where}: model_type={kind!r} is not supported: {NOT_LLAVA[kind]} is not a "
                              f"LLaVA-style model; {supported}")
    if vision in NOT_LLAVA:
        raise ConversionError(f"{where}: vision_config.model_type={vision!r} is not supported: {NOT_LLAVA[vision]}; "
                              f"{supported}")
    if kind not in MODEL_TYPES and kind not in ORIGINAL_MODEL_TYPES:
        raise ConversionError(f"{where}: model_type={kind!r} is not supported: not a LLaVA-style model jaxflow "
                              f"knows; {supported}")


def original_decoder(cfg: dict, where: str) -> str:
    """The text_config.model_type of an original config: from its model class (`architectures`), else its
    model_type; Llama when neither names one (LLaVA-1.5's saves)."""
    archs = cfg.get("architectures") or []
    by_type = ORIGINAL_MODEL_TYPES.get(cfg.get("model_type"))
    if archs and (len(archs) != 1 or archs[0] not in ORIGINAL_DECODERS):
        raise ConversionError(f"{where}: config attribute architectures={archs!r} is not supported (jaxflow "
                              f"implements {', '.join(ORIGINAL_DECODERS)})")
    by_class = ORIGINAL_DECODERS[archs[0]] if archs else None
    if by_class and by_type and by_class != by_type:
        raise ConversionError(f"{where}: architectures={archs!r} and model_type={cfg.get('model_type')!r} name "
                              "different decoders")
    return by_class or by_type or "llama"


def tower_trained(cfg: dict) -> str | None:
    """Why an original config says its vision tower was trained (LLaVA then runs the tower stored in the
    checkpoint), or None."""
    if cfg.get("unfreeze_mm_vision_tower"):
        return "config.json: unfreeze_mm_vision_tower is true"
    if "mm_vision_tower" in _tunable_parts(cfg):
        return "config.json: mm_tunable_parts names mm_vision_tower"
    return None


def _tunable_parts(cfg: dict) -> set[str]:
    value = cfg.get("mm_tunable_parts") or ""
    return {p.strip() for p in value.split(",") if p.strip()} if isinstance(value, str) else {None}


def pinpoints_hw(value, where: str) -> list[list[int]]:
    """An original config's image_grid_pinpoints, (width, height) pairs as LLaVA reads them (a list, or a string
    holding a Python list literal), as jaxflow's (height, width) pairs."""
    given, problem = value, "expected a list of [width, height] pairs"
    if isinstance(value, str):
        if re.search(r"\d\s*x\s*\d", value):
            problem = "the grid-range form '(1x1),...,(3x3)' of later LLaVA-NeXT code is not supported"
            value = None
        else:
            try:
                value = ast.literal_eval(value)  # llava-torch 1.2.2 reads a string this way
            except (ValueError, SyntaxError):
                value = None
    ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(
        isinstance(p, (list, tuple)) and len(p) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in p) for p in value)
    if not ok:
        raise ConversionError(f"{where}: config attribute image_grid_pinpoints={given!r} is not supported: {problem}")
    return [[h, w] for w, h in value]


def original_to_hf_config(cfg: dict, clip_cfg: dict, where: str) -> dict:
    """An original LLaVA config (+ its CLIP config) as a transformers llava / llava_next config."""

    def refuse(key):
        raise ConversionError(f"{where}: config attribute {key}={cfg.get(key)!r} is not supported")

    for key, value in cfg.items():
        if key.startswith("mm_") and key not in _ORIGINAL_HANDLED_MM and value not in (None, False):
            refuse(key)
    if not _tunable_parts(cfg) <= _TUNABLE_PARTS:
        refuse("mm_tunable_parts")
    if cfg.get("mm_projector_type", "linear") != "mlp2x_gelu":
        refuse("mm_projector_type")
    for key in ("mm_use_im_start_end", "mm_use_im_patch_token"):
        if cfg.get(key):
            refuse(key)
    select = cfg.get("mm_vision_select_feature", "patch")
    if select not in ("patch", "cls_patch"):
        refuse("mm_vision_select_feature")
    aspect = cfg.get("image_aspect_ratio")
    anyres = aspect == "anyres"
    if aspect not in ("pad", "anyres"):
        # LLaVA's process_images then runs the CLIP processor alone (shortest-edge resize and centre crop, the
        # image's borders cut off); jaxflow implements LLaVA-1.5's pad and LLaVA-NeXT's anyres
        raise ConversionError(f"{where}: config attribute image_aspect_ratio={aspect!r} is not supported (jaxflow "
                              "implements 'pad' and 'anyres'; without either LLaVA centre-crops the image)")
    if anyres and cfg.get("mm_patch_merge_type", "flat") != "spatial_unpad":
        refuse("mm_patch_merge_type")
    vision = dict(clip_cfg.get("vision_config", clip_cfg))
    vision["model_type"] = "clip_vision_model"
    decoder = original_decoder(cfg, where)
    text = {k: cfg[k] for k in _LLAMA_KEYS + _DECODER_KEYS[decoder] if k in cfg}
    text["model_type"] = decoder
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
        "jaxflow_image_geometry": "llava",  # LLaVA's own anyres arithmetic (jaxflow.geometry)
    }
    if anyres:
        out["image_grid_pinpoints"] = pinpoints_hw(cfg.get("image_grid_pinpoints"), where)
    return out


def _transformed_shape(shape: tuple, transform: str) -> tuple:
    if transform == "linear":
        return tuple(reversed(shape))
    if transform == "conv_patch":
        return (int(np.prod(shape[1:])), shape[0])
    return tuple(shape)


def convert(src: str, out: str, clip: str | None = None, dtype: str = "float32", progress: bool = True,
            allow_pickle: bool = False, vision_tower: str = "auto") -> str:
    """Converts `src` into a new directory `out`; returns `out`.

    clip: the CLIP checkpoint directory, for original-layout checkpoints. allow_pickle: read PyTorch pickle
    checkpoints (weights-only, see convert.sources). vision_tower (original layout): "auto" (as LLaVA, module
    docstring), or "checkpoint" / "clip" to force the stored tower or the --clip one.
    """
    if dtype not in DTYPES:
        raise ConversionError(f"--dtype {dtype!r}: choose one of {sorted(DTYPES)}")
    if vision_tower not in VISION_TOWER_CHOICES:
        raise ConversionError(f"--vision-tower {vision_tower!r}: choose one of {list(VISION_TOWER_CHOICES)}")
    if os.path.exists(out):
        raise ConversionError(f"{out}: already exists; remove it or choose another output directory")
    src_dir = src if os.path.isdir(src) else os.path.dirname(src)
    config_path = os.path.join(src_dir, "config.json")
    if os.path.isfile(config_path):  # before the layout: a refused model's tensors may look like LLaVA's
        refuse_architecture(_read_json(config_path), config_path)
    main = _open(src, allow_pickle)
    try:
        layout = mapping.detect_layout(main.keys())
    except ValueError as e:
        raise ConversionError(f"{src}: {e}") from e

    # config.json in llava-hf form
    raw = _read_json(config_path)
    clip_dir = None
    if layout == "original":
        if clip is None:
            raise ConversionError(f"{src}: original LLaVA layout: pass the CLIP vision checkpoint with --clip")
        clip_dir = clip if os.path.isdir(clip) else os.path.dirname(clip)
        hf_config = original_to_hf_config(raw, _read_json(os.path.join(clip_dir, "config.json")), config_path)
    else:
        if clip is not None:
            raise ConversionError(f"--clip: {src} is a llava-hf checkpoint with its own vision tower")
        if vision_tower != "auto":
            raise ConversionError(f"--vision-tower: {src} is a llava-hf checkpoint with its own vision tower")
        hf_config = raw

    parent = os.path.dirname(os.path.abspath(out))
    os.makedirs(parent, exist_ok=True)
    _remove_stale_temps(parent, os.path.basename(out))
    tmp = tempfile.mkdtemp(prefix=f"{_temp_prefix(os.path.basename(out))}{socket.gethostname()}-{os.getpid()}-",
                           dir=parent)
    try:
        with open(os.path.join(tmp, "config.json"), "w") as f:
            json.dump(hf_config, f, indent=1)
        try:
            cfg = ModelConfig.from_pretrained(tmp)
        except ValueError as e:  # it names the temporary copy; the user knows the source's config.json
            raise ConversionError(f"{config_path}: {str(e).removeprefix(os.path.join(tmp, 'config.json') + ': ')}"
                                  ) from e
        if layout == "original":
            sources, tower = _original_sources(cfg, raw, main, src, clip, allow_pickle, vision_tower)
        else:
            sources = [(layout, main, ())]
            tower = {"vision_tower": "checkpoint", "vision_tower_path": os.path.abspath(src)}
        plan = _plan(cfg, sources)
        files = _copy_side_files(src_dir, clip_dir, tmp)
        groups: dict[str, list[str]] = defaultdict(list)
        for param in plan:
            groups[checkpoint.group_of(param)].append(param)
        writer = checkpoint.GroupWriter(tmp)
        np_dtype = DTYPES[dtype]
        for group, params in tqdm(groups.items(), desc="convert", unit="group", disable=not progress):
            # each tensor is read when the writer comes to it and released once written: never a whole group
            writer.write(group, {param: _lazy(*plan[param], np_dtype) for param in params})
        writer.finish(dtype=dtype, layout=layout, source=os.path.abspath(src),
                      source_format="pickle" if isinstance(main, PickleSource) else "safetensors",
                      image_aspect_ratio=raw.get("image_aspect_ratio"), **tower, **files)
        try:
            os.rename(tmp, out)
        except OSError as e:
            raise ConversionError(f"{out}: appeared while converting (another conversion into it?); this one is "
                                  f"discarded ({e.strerror})") from e
    except CheckpointError as e:  # a tensor that cannot be read
        shutil.rmtree(tmp, ignore_errors=True)
        raise ConversionError(str(e)) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def _lazy(source: Source, name: str, transform: str, np_dtype) -> checkpoint.LazyArray:
    """The jaxflow parameter from `name`: read, cast and transformed when loaded."""
    def load() -> np.ndarray:
        # no name keeps the source array alive: only its transformed copy lives on into the write
        return mapping.apply(transform, source.get(name), np_dtype, empty=mapped_empty)

    return checkpoint.LazyArray(_transformed_shape(source.shape(name), transform), np_dtype, load)


def _temp_prefix(name: str) -> str:
    return f".{name}.tmp-"


def _remove_stale_temps(parent: str, name: str) -> None:
    """Removes the temporary directories of conversions into `name` that were killed on this host: their names
    carry the host and the process id, and that process no longer exists. Others (another host's, a running
    conversion's) are left alone."""
    prefix, host = _temp_prefix(name), socket.gethostname()
    for entry in os.listdir(parent):
        parts = entry[len(prefix):].rsplit("-", 2) if entry.startswith(prefix) else []
        if len(parts) == 3 and parts[0] == host and parts[1].isdigit() and not _process_alive(int(parts[1])):
            shutil.rmtree(os.path.join(parent, entry), ignore_errors=True)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _open(path: str, allow_pickle: bool) -> Source:
    try:
        return open_source(path, allow_pickle)
    except CheckpointError as e:
        raise ConversionError(str(e)) from e


def _original_sources(cfg: ModelConfig, raw: dict, main: Source, src: str, clip: str, allow_pickle: bool,
                      choice: str):
    """Where the vision tower of an original-layout checkpoint comes from (see the module docstring):
    the `_plan` sources, and the jaxflow.json record of the choice."""
    from jaxflow.model import param_shapes

    needed = sorted({mapping.source_of(p)[0] for p in param_shapes(cfg) if p.startswith("vision_tower.")})
    stored = {mapping.canonical("original", n): n for n in main.keys() if n.startswith(mapping.STORED_TOWER_PREFIX)}
    missing = [mapping.STORED_TOWER_PREFIX + c[len("vision."):] for c in needed if c not in stored]
    trained = tower_trained(raw)
    clip_source = None
    if choice != "auto":
        use, reason = choice, f"--vision-tower {choice}"
    elif trained:
        use, reason = "checkpoint", trained
    elif missing:
        use, reason = "clip", "config.json does not flag the tower as trained and the checkpoint stores no complete one"
    else:
        clip_source = _open(clip, allow_pickle)
        differs = _first_difference(main, stored, clip_source, needed)
        if differs:
            use, reason = "checkpoint", ("config.json does not flag the tower as trained, but the stored tower "
                                         f"differs from --clip ({differs})")
        else:
            use, reason = "clip", "the stored tower is a frozen copy of --clip (equal up to rounding)"
    if use == "checkpoint" and missing:
        raise ConversionError(f"{src}: the vision tower stored in the checkpoint is to be used ({reason}), but it is "
                              f"incomplete: missing tensors ({len(missing)}): {missing}")
    record = {"vision_tower": use, "vision_tower_reason": reason}
    if use == "checkpoint":
        # the stored tower replaces CLIP; --clip gives only the vision config and the image processor
        record["vision_tower_path"] = os.path.abspath(src)
        return [("original", main, ())], record
    record["vision_tower_path"] = os.path.abspath(clip)
    clip_source = clip_source or _open(clip, allow_pickle)
    return [("original", main, ("vision.",)), ("clip", clip_source, ())], record


def _first_difference(main: Source, stored: dict[str, str], clip_source: Source, needed: list[str]) -> str | None:
    """The first needed tower tensor in which the checkpoint's copy differs from --clip by more than rounding to
    bfloat16 / float16 (relative 2^-8), described; None when all agree. Tensors --clip lacks are not compared
    (converting with --clip then names them as missing)."""
    clip_names = {mapping.canonical("clip", n): n for n in clip_source.keys()}
    for canon in needed:
        if canon not in clip_names:
            continue
        s, c = main.get(stored[canon]), clip_source.get(clip_names[canon])
        if s.shape != c.shape:
            return f"{stored[canon]} has shape {s.shape}, --clip {clip_names[canon]} {c.shape}"
        s, c = s.reshape(-1), c.reshape(-1)
        differs, largest = False, []
        for i in range(0, s.size, _COMPARE_CHUNK):  # float32 temporaries of a chunk, not of the tensor
            si, ci = s[i:i + _COMPARE_CHUNK].astype(np.float32), c[i:i + _COMPARE_CHUNK].astype(np.float32)
            err = np.abs(si - ci)
            differs = differs or not np.all(err <= 2.0**-8 * np.abs(ci) + 2.0**-24)
            largest.append(err.max())
        if differs:
            return f"{stored[canon]}: max |diff| {np.max(largest):.3g}"
    return None


_COMPARE_CHUNK = 1 << 18  # elements


def _copy_side_files(src_dir: str, clip_dir: str | None, tmp: str) -> dict:
    """Tokenizer, generation and processor files next to the parameters; a tokenizer.json built when the source
    has only a SentencePiece tokenizer.model. Returns their jaxflow.json record."""
    for name in TOKENIZER_FILES:
        if os.path.isfile(os.path.join(src_dir, name)):
            shutil.copy2(os.path.join(src_dir, name), os.path.join(tmp, name))
    # LLaVA's own code preprocesses with the CLIP tower's image processor; llava-hf saves carry their own
    candidates = [clip_dir, src_dir] if clip_dir is not None else [src_dir]
    preprocessor = next((os.path.join(d, PREPROCESSOR_FILE) for d in candidates
                         if os.path.isfile(os.path.join(d, PREPROCESSOR_FILE))), None)
    if preprocessor:
        shutil.copy2(preprocessor, os.path.join(tmp, PREPROCESSOR_FILE))
    return {"preprocessor_config": preprocessor and os.path.abspath(preprocessor),
            "tokenizer_json": _fast_tokenizer(src_dir, tmp)}


# prompt pieces the built tokenizer.json must tokenize exactly as the tokenizer it was built from
_TOKENIZER_PROBES = (
    "A chat between a curious user and an artificial intelligence assistant. USER: ",
    "\nIs the jar full or empty? \nAnswer the question using a single word or phrase. ASSISTANT:",
)


def _fast_tokenizer(src_dir: str, tmp: str) -> str | None:
    """'source' when the source has a tokenizer.json, 'built' when one is built here from the other tokenizer files,
    None without a tokenizer."""
    if not os.path.isfile(os.path.join(tmp, "tokenizer_config.json")):
        return None
    if os.path.isfile(os.path.join(tmp, "tokenizer.json")):
        return "source"
    where = os.path.join(src_dir, "tokenizer_config.json")
    if os.path.isfile(os.path.join(tmp, "tokenizer.model")):
        try:
            import google.protobuf  # noqa: F401
            import sentencepiece  # noqa: F401
        except ImportError as e:
            raise ConversionError(f"{os.path.join(src_dir, 'tokenizer.model')}: reading a SentencePiece tokenizer "
                                  "needs the sentencepiece and protobuf packages (pip install sentencepiece protobuf)"
                                  ) from e
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(tmp)
    except Exception as e:  # transformers raises many kinds here
        raise ConversionError(f"{where}: the tokenizer does not load with transformers ({e})") from e
    if not getattr(tokenizer, "is_fast", False):
        raise ConversionError(f"{where}: transformers builds no fast tokenizer from these files; jaxflow needs one "
                              "(character offsets)")
    tokenizer.backend_tokenizer.save(os.path.join(tmp, "tokenizer.json"))
    reloaded = AutoTokenizer.from_pretrained(tmp)
    for probe in _TOKENIZER_PROBES:
        if reloaded(probe).input_ids != tokenizer(probe).input_ids:
            raise ConversionError(f"{where}: the tokenizer.json built from it tokenizes {probe!r} differently")
    return "built"


def _plan(cfg: ModelConfig, sources) -> dict[str, tuple[Source, str, str]]:
    """jaxflow parameter -> (source, on-disk name, transform), after checking every name and shape.

    sources: (layout, source, canonical prefixes not to take from this source) in order."""
    from jaxflow.model import param_shapes

    by_canonical: dict[str, tuple[Source, str]] = {}
    for layout, source, skip in sources:
        for name in source.keys():
            canon = mapping.canonical(layout, name)
            if canon is not None and not canon.startswith(skip):
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
