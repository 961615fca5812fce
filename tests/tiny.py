"""Tiny random twins of LLaVA-1.5 and LLaVA-NeXT, built with transformers (PyTorch), and savers
for every checkpoint layout jaxflow converts (safetensors or pickle, the tokenizer files of original
LLaVA)."""

from __future__ import annotations

import json
import os

import ml_dtypes
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
    MistralConfig,
    Qwen2Config,
    SiglipVisionConfig,
)

IMAGE_TOKEN = 127
PAD_TOKEN = 126
IMAGE_SIZE = 42  # 3 x 3 patches of 14 px per crop
PINPOINTS = [[42, 84], [84, 42], [84, 84], [126, 42], [42, 126]]


TEXT_CONFIGS = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}


def hf_config(kind="llava", kv_heads=4, tie=False, strategy="default", feature_layer=-2, init=0.2, vocab=128,
              image_size=IMAGE_SIZE, pinpoints=PINPOINTS, text_type="llama", sliding_window=None,
              image_token=IMAGE_TOKEN, vision_type="clip"):
    """pinpoints: (height, width) pairs, transformers' convention. text_type: the decoder family (TEXT_CONFIGS);
    sliding_window (mistral, qwen2): the window every layer applies, None for none. vision_type: "clip" or
    "siglip" (its transformers defaults: gelu_pytorch_tanh, LayerNorm eps 1e-6, the attention-pooling head)."""
    shape = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                 image_size=image_size, patch_size=14)
    if vision_type == "siglip":
        vision = SiglipVisionConfig(**shape)
    else:
        vision = CLIPVisionConfig(**shape, hidden_act="quick_gelu", initializer_range=init, initializer_factor=5.0)
    family = {"llama": {}, "mistral": {"sliding_window": sliding_window},
              "qwen2": {"use_sliding_window": sliding_window is not None, "sliding_window": sliding_window,
                        "max_window_layers": 0}}[text_type]
    theta = 1e6 if text_type != "llama" else 500000.0 if kv_heads < 4 else 10000.0
    text = TEXT_CONFIGS[text_type](vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, rms_norm_eps=1e-5,
                                   initializer_range=init, tie_word_embeddings=tie, pad_token_id=PAD_TOKEN,
                                   rope_parameters={"rope_type": "default", "rope_theta": theta}, **family)
    common = dict(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=image_token,
                  vision_feature_select_strategy=strategy, vision_feature_layer=feature_layer,
                  tie_word_embeddings=tie)
    if kind == "llava_next":
        return LlavaNextConfig(image_grid_pinpoints=[list(p) for p in pinpoints], **common)
    return LlavaConfig(**common)


def hf_model(kind="llava", seed=0, **kw):
    torch.manual_seed(seed)
    cls = LlavaNextForConditionalGeneration if kind == "llava_next" else LlavaForConditionalGeneration
    model = cls._from_config(hf_config(kind, **kw), attn_implementation="eager").eval()
    with torch.no_grad():
        if kind == "llava_next":  # transformers' init leaves the newline small; make it matter
            model.model.image_newline.normal_(0, 1.0)
        for name, p in model.model.language_model.named_parameters():
            if name.endswith("_proj.bias"):  # Qwen2's q/k/v biases start at zero
                p.normal_(0, 0.5)
        if kw.get("vision_type") == "siglip":  # SigLIP's init leaves norms at 1 / 0 and biases ~1e-6; make them matter
            for p in model.model.vision_tower.parameters():
                if p.ndim == 1:
                    p.add_(torch.randn_like(p), alpha=0.2)
    return model


def make_inputs(cfg, num_text=6, image_sizes=((42, 42),), batch=None, seed=0, image_token=IMAGE_TOKEN):
    """input_ids [B, T] with one image per row, pixel_values, image_sizes (H, W) for NeXT.

    The image tokens sit after one BOS-like token; num_text text tokens (per row, or one count) follow.
    """
    from jaxflow.geometry import image_layout

    rng = np.random.default_rng(seed)
    size_px = cfg.vision.image_size
    rows, pixels = [], []
    counts = [num_text] * len(image_sizes) if np.isscalar(num_text) else num_text
    for size, count in zip(image_sizes, counts, strict=True):
        lay = image_layout(cfg, size) if cfg.image.anyres else image_layout(cfg)
        text = rng.integers(2, 120, count)
        rows.append(np.concatenate([[1], np.full(len(lay), image_token), text]))
        crops = lay.num_crops
        pixels.append(rng.standard_normal((crops, 3, size_px, size_px)).astype(np.float32))
    t = max(map(len, rows))
    input_ids = np.full((len(rows), t), PAD_TOKEN)
    mask = np.zeros((len(rows), t), np.int64)
    for i, r in enumerate(rows):
        input_ids[i, : len(r)] = r
        mask[i, : len(r)] = 1
    if cfg.image.anyres:
        p = max(len(x) for x in pixels)
        pv = np.zeros((len(pixels), p, 3, size_px, size_px), np.float32)
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


STORED_TOWER = "model.vision_tower.vision_tower.vision_model."  # where LLaVA's own save puts the CLIP tower
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def original_tensors(model) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray], dict[str, np.ndarray]]:
    """The twin's tensors in original-LLaVA names: (language model + projector, stored tower, CLIP checkpoint)."""
    llava, tower, clip = {}, {}, {}
    for name, value in _state(model).items():
        if name.startswith("model.vision_tower."):
            rest = name[len("model.vision_tower."):]
            clip["vision_model." + rest] = value
            tower[STORED_TOWER + rest] = value
        elif name.startswith("model.language_model."):
            llava[name.replace("model.language_model.", "model.")] = value
        elif name.startswith("model.multi_modal_projector.linear_"):
            idx = {"1": "0", "2": "2"}[name.split("linear_")[1][0]]
            llava[f"model.mm_projector.{idx}." + name.rsplit(".", 1)[1]] = value
        elif name == "model.image_newline":
            llava["model.image_newline"] = value
        else:
            llava[name] = value
    return llava, tower, clip


def save_tensors(tensors: dict[str, np.ndarray], path: str, pickle=False, shards=1, dtype=None) -> None:
    """Writes `tensors` into directory `path` as model.safetensors or (pickle) pytorch_model.bin, in `shards`
    files with an index when shards > 1; dtype (e.g. "bfloat16") casts every floating tensor."""
    names = list(tensors)
    if dtype is not None:
        tensors = {k: v.astype(np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else dtype)
                   if v.dtype.kind == "f" else v for k, v in tensors.items()}
    stem, ext = ("pytorch_model", "bin") if pickle else ("model", "safetensors")
    parts = [names[i::shards] for i in range(shards)]
    files = [f"{stem}.{ext}"] if shards == 1 else [f"{stem}-{i + 1:05d}-of-{shards:05d}.{ext}" for i in range(shards)]
    for file, part in zip(files, parts, strict=True):
        chunk = {k: tensors[k] for k in part}
        if pickle:
            torch.save({k: _torch(v) for k, v in chunk.items()}, os.path.join(path, file))
        else:
            save_file(chunk, os.path.join(path, file))
    if shards > 1:
        index = f"{stem}.{ext}.index.json"
        weight_map = {k: file for file, part in zip(files, parts, strict=True) for k in part}
        with open(os.path.join(path, index), "w") as f:
            json.dump({"metadata": {}, "weight_map": weight_map}, f)


def _torch(x: np.ndarray):
    if x.dtype == np.dtype(ml_dtypes.bfloat16):
        return torch.from_numpy(x.view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.ascontiguousarray(x))


# text_config.model_type -> the original LLaVA class, its model_type and the decoder's own config attributes
ORIGINAL_CLASSES = {
    "llama": ("LlavaLlamaForCausalLM", "llava_llama", ()),
    "mistral": ("LlavaMistralForCausalLM", "llava_mistral", ("sliding_window",)),
    "qwen2": ("LlavaQwenForCausalLM", "llava_qwen", ("use_sliding_window", "sliding_window", "max_window_layers")),
}


def save_original(model, path, clip_path, tower="stale", clip_model=None, unfreeze=False, pickle=False, shards=1,
                  dtype=None, clip_pickle=False, preprocessor=True):
    """The original LLaVA layout (model.layers.*, model.mm_projector.*) plus a CLIP checkpoint.

    tower: what the LLaVA checkpoint stores under model.vision_tower.vision_tower.vision_model.*: "stale" (one
    lone post_layernorm tensor), "stored" (the twin's whole tower, as LLaVA saves it), "none".
    clip_model: whose tower the separate CLIP checkpoint holds (default: the twin's own; another twin plays the
    CLIP a tuned tower started from). unfreeze: config.json says the tower was trained (LLaVA-1.6 style).
    pickle / clip_pickle: pytorch_model*.bin instead of safetensors; shards, dtype: see save_tensors.
    preprocessor: write the CLIP checkpoint's preprocessor_config.json (CLIPImageProcessor at the twin's size).
    """
    os.makedirs(path, exist_ok=True)
    os.makedirs(clip_path, exist_ok=True)
    cfg = model.config
    text, vision = cfg.text_config.to_dict(), cfg.vision_config.to_dict()
    llava, stored, clip = original_tensors(model)
    if clip_model is not None:
        clip = original_tensors(clip_model)[2]
    if tower == "stored":
        llava.update(stored)
    elif tower == "stale":
        llava[STORED_TOWER + "post_layernorm.weight"] = np.ones(vision["hidden_size"], np.float32)
    save_tensors(llava, path, pickle=pickle, shards=shards, dtype=dtype)
    save_tensors(clip, clip_path, pickle=clip_pickle)
    next_ = cfg.model_type == "llava_next"
    decoder = ORIGINAL_CLASSES[text["model_type"]]
    original = {
        "architectures": [decoder[0]], "model_type": decoder[1],
        **{k: text[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "hidden_act",
                                "max_position_embeddings", "tie_word_embeddings") + decoder[2]},
        "rope_theta": text["rope_parameters"]["rope_theta"],
        "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": vision["hidden_size"],
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": cfg.vision_feature_layer,
        "mm_vision_select_feature": "patch" if cfg.vision_feature_select_strategy == "default" else "cls_patch",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "image_aspect_ratio": "anyres" if next_ else "pad",
        "mm_patch_merge_type": "spatial_unpad" if next_ else "flat",
    }
    if unfreeze:
        original.update(unfreeze_mm_vision_tower=True, mm_vision_tower_lr=2e-06)
    if next_:  # LLaVA reads (width, height) pairs; the twin's are transformers' (height, width)
        original["image_grid_pinpoints"] = [[w, h] for h, w in cfg.image_grid_pinpoints]
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(original, f)
    with open(os.path.join(clip_path, "config.json"), "w") as f:
        json.dump({**vision, "model_type": "clip_vision_model"}, f)
    if preprocessor:
        size = vision["image_size"]
        with open(os.path.join(clip_path, "preprocessor_config.json"), "w") as f:
            json.dump({"crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_convert_rgb": True,
                       "do_normalize": True, "do_rescale": True, "do_resize": True, "image_mean": CLIP_MEAN,
                       "image_processor_type": "CLIPImageProcessor", "image_std": CLIP_STD, "resample": 3,
                       "rescale_factor": 1 / 255, "size": {"shortest_edge": size}}, f)
    return path, clip_path


# ---- original LLaVA tokenizer: SentencePiece tokenizer.model + Llama tokenizer_config.json -----------------------


def sentencepiece_lines(n=400, seed=0) -> list[str]:
    """Generated LLaVA-like prompt text (system sentence, questions, instructions, digits) to train on."""
    import random

    rng = random.Random(seed)
    words = ("a the of is are what which color shape jar full empty floor brown white cat dog bird left right red "
             "blue green round square circle table chair user assistant image answer question single word phrase "
             "chat between curious and artificial intelligence gives helpful detailed polite answers using").split()
    lines = []
    for i in range(n):
        s = " ".join(rng.choice(words) for _ in range(rng.randint(3, 12)))
        if i % 3 == 0:
            s = f"USER: {s.capitalize()}? {rng.randint(0, 999)} \nAnswer the question. ASSISTANT:"
        lines.append(s)
    return lines


def save_sentencepiece_tokenizer(path, vocab=320, legacy=False) -> int:
    """`jaxflow.testing.save_sentencepiece_tokenizer` trained on `sentencepiece_lines()`. Returns the vocabulary
    size."""
    from jaxflow.testing import save_sentencepiece_tokenizer as save

    return save(path, sentencepiece_lines(), vocab, legacy)


def task_subset(root, n: int, task: str = "ChooseAttr", seed: int = 0, edit=None, missing_images: int = 0):
    """The first n rows of a packaged GQA task file written to root/<task>.csv (after `edit(rows)`, if given),
    with random images of each row's size in root/images (the last `missing_images` rows get none).
    Returns (csv path, image folder) as strings."""
    import csv
    import os

    from PIL import Image

    from jaxflow.inputs import gqa

    with open(os.path.join(str(gqa.TASK_DIR), f"{task}.csv"), newline="") as f:
        rows = list(csv.DictReader(f))[:n]
    if edit is not None:
        edit(rows)
    data = os.path.join(str(root), f"{task}.csv")
    with open(data, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    images = os.path.join(str(root), "images")
    os.makedirs(images, exist_ok=True)
    rng = np.random.default_rng(seed)
    for r in rows[: len(rows) - missing_images]:
        pixels = rng.integers(0, 255, (int(r["image_h"]), int(r["image_w"]), 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(images, f"{r['img_id']}.jpg"))
    return data, images


def knockout_case(model):
    """A tiny LLaVA-1.5 batch with two knockouts (image -> question in layers 0-1; question -> last everywhere):
    (ids, pixel_values, image_sizes, knockouts)."""
    from jaxflow import Knockout

    ids, pv, isz, _ = make_inputs(model.config, num_text=6)
    t = ids.shape[1]
    image = np.flatnonzero(ids[0] == IMAGE_TOKEN).tolist()
    question, last = list(range(image[-1] + 1, t - 1)), [t - 1]
    kos = [Knockout(source=image, target=question, layers=[0, 1]), Knockout(source=question, target=last)]
    return ids, pv, isz, kos


def run_case(model, ids, pv, isz, kos):
    """The case through the model: (logits [K, B, T, V], attentions [K, L, B, H, T, T], and the answer's probability
    under each knockout by incremental and by full recomputation [K, B])."""
    from jaxflow.sweep import engine

    inputs = model.prepare(ids, pv, isz)
    knock = model.knockout_masks(kos, *ids.shape)
    last = np.full(len(ids), ids.shape[1] - 1)
    out = model.forward(ids, pv, isz, knockouts=kos, return_attentions=True)
    base = engine.base_run(model.module, inputs, last)
    token = np.asarray(base.probs).argmax(-1)
    inc = engine.knockout_probs(model.module, inputs, knock, last, token, base=base)[0]
    full = engine.knockout_probs(model.module, inputs, knock, last, token, method="full")[0]
    return np.asarray(out.logits), np.asarray(out.attentions), inc, full


def check_case(hf, model, ids, pv, isz, kos, logits, attn):
    """Asserts the case's logits and attention weights are transformers' under each knockout, zero on cut edges."""
    from jaxflow.reference import dense_cut, embeddings, run_layers

    cfg = model.config.text
    embeds = embeddings(hf, ids, pv, isz)
    for k, ko in enumerate(kos):
        cut = dense_cut(ko.source, ko.target, ko.layers, ko.heads, *ids.shape, cfg.num_layers, cfg.num_heads)
        ref_logits, ref_attn = run_layers(hf, embeds, cut)
        assert np.abs(logits[k] - ref_logits).max() < 1e-4
        assert np.abs(attn[k] - ref_attn).max() < 1e-5
        assert (attn[k][cut] == 0).all()
