#!/usr/bin/env python
"""Compare jaxflow's image geometry with LLaVA's own code (llava-torch 1.2.2) for original-layout models.

    python scripts/compare_llava_geometry.py --llava-python VENV/bin/python [--json OUT]

Runs in the jaxflow environment; the LLaVA half runs in a separate virtual environment that has
llava-torch 1.2.2.post1 (transformers 4.36.2), as `VENV/bin/python this_file --llava-side DIR`.

1. Image features, for every distinct image size of the six packaged GQA task files: LLaVA's own
   `prepare_inputs_labels_for_multimodal` (anyres, spatial_unpad, LLaVA-1.6's pinpoints, CLIP 336/14) runs
   on stand-in features that encode their origin (crop, patch row, patch column; image_newline = -1), so its
   output lists, position by position, where each image feature comes from. jaxflow's `geometry.image_layout` for the
   config converted from the same original config must list the same origins in the same order.
2. Pixels: LLaVA's `process_images` (anyres, pad, square) against `jaxflow.inputs.images.preprocess` on noise
   images of awkward sizes, with the OpenAI CLIP processor settings, at a small tower size and at 336.
   LLaVA's "square" (no padding: resize the shortest edge, centre crop) is compared with jaxflow's LLaVA-1.5
   preprocessing, which always pads; LLaVA's processor misreads images with a side of 3 pixels or less.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile

import numpy as np

# LLaVA-1.6's image_grid_pinpoints as liuhaotian/llava-v1.6-* config.json stores them: (width, height)
PINPOINTS_WH = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TEXT_EMBED = -7.0  # value of every stand-in text embedding
# pixel cases: (tower image size, (W, H)); pinpoints are LLaVA-1.6's scaled to the tower size
PIXEL_SIZES = {
    28: [(1, 1), (3, 2), (2, 3), (27, 20), (20, 27), (28, 28), (29, 13), (84, 28), (56, 56), (57, 113),
         (300, 7), (7, 300), (100, 99), (55, 176)],
    336: [(320, 240), (55, 176), (88, 99), (500, 37), (640, 427)],
}


def scaled_pinpoints(side: int) -> list[list[int]]:
    return [[w * side // 336, h * side // 336] for w, h in PINPOINTS_WH]


# ---- LLaVA side (runs under the llava-torch environment) -----------------------------------------------------


def llava_side(work: str) -> None:
    from types import SimpleNamespace

    import PIL.Image
    import torch
    from llava.mm_utils import get_anyres_image_grid_shape, process_images, select_best_resolution
    from llava.model.llava_arch import LlavaMetaForCausalLM, unpad_image
    from transformers import CLIPImageProcessor

    with open(os.path.join(work, "request.json")) as f:
        req = json.load(f)
    side, patch = req["image_size"], req["patch_size"]
    g = side // patch

    class Stub(LlavaMetaForCausalLM):
        """Just enough of LlavaLlamaForCausalLM for prepare_inputs_labels_for_multimodal."""

        def __init__(self):
            tower = SimpleNamespace(num_patches_per_side=g, config=SimpleNamespace(image_size=side))
            self.config = SimpleNamespace(mm_patch_merge_type="spatial_unpad", image_aspect_ratio="anyres",
                                          image_grid_pinpoints=req["pinpoints_wh"])
            self.model = SimpleNamespace(image_newline=torch.full((3,), -1.0),
                                         get_vision_tower=lambda: tower,
                                         embed_tokens=lambda ids: torch.full((len(ids), 3), TEXT_EMBED))
            self.device = torch.device("cpu")

        def get_model(self):
            return self.model

        def encode_images(self, images):  # [crops, ...] -> [crops, g*g, 3]: (crop, patch row, patch column)
            k, p = torch.meshgrid(torch.arange(len(images)), torch.arange(g * g), indexing="ij")
            return torch.stack([k, p // g, p % g], -1).float()

    stub = Stub()
    ids = torch.tensor([[1, -200, 2]])  # BOS, LLaVA's image placeholder, one text token
    origins = {}
    for w, h in req["order_sizes_wh"]:
        bw, bh = select_best_resolution((w, h), req["pinpoints_wh"])
        crops = 1 + (bw // side) * (bh // side)  # process_anyres_image: base image + divide_to_patches
        images = torch.zeros(1, crops, 1, 1, 1)
        embeds = stub.prepare_inputs_labels_for_multimodal(ids, None, None, None, None, images, [(w, h)])[4][0]
        image = embeds[embeds[:, 0] != TEXT_EMBED]
        origins[f"{w}x{h}"] = image.numpy().astype(np.int32)
    # counts only, for every size up to the sweep bound: the unpadding of prepare_inputs_labels_for_multimodal on
    # a [C, rows * g, cols * g] stand-in, then one newline per kept row, after the g * g base features
    n = req["sweep"]
    counts = np.zeros((n + 1, n + 1), np.int32)  # [W, H]
    for w in range(1, n + 1):
        for h in range(1, n + 1):
            cols, rows = get_anyres_image_grid_shape((w, h), req["pinpoints_wh"], side)
            kept = unpad_image(torch.empty(1, rows * g, cols * g), (w, h))
            counts[w, h] = g * g + kept.shape[1] * (kept.shape[2] + 1)
    np.savez(os.path.join(work, "layouts.npz"), counts=counts, **origins)

    pixels, errors = {}, {}
    for case in req["pixels"]:
        s = case["image_size"]
        proc = CLIPImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s},
                                  image_mean=CLIP_MEAN, image_std=CLIP_STD, resample=3)
        cfg = SimpleNamespace(image_aspect_ratio=case["mode"], image_grid_pinpoints=case["pinpoints_wh"])
        image = PIL.Image.open(case["png"]).convert("RGB")
        try:
            pixels[case["name"]] = process_images([image], proc, cfg).numpy()
        except ValueError as e:  # transformers 4.36 guesses the channel axis from the shape: tiny images fail
            errors[case["name"]] = str(e)
    np.savez(os.path.join(work, "pixels.npz"), **pixels)
    with open(os.path.join(work, "pixel_errors.json"), "w") as f:
        json.dump(errors, f)


# ---- jaxflow side ------------------------------------------------------------------------------------------


def converted_config(next_: bool, side: int, work: str):
    """The ModelConfig jaxflow builds for an original LLaVA-1.6 (or 1.5) config, through the converter's
    config translation and transformers' parser."""
    from jaxflow.config import ModelConfig
    from jaxflow.convert.converter import original_to_hf_config

    original = {
        "model_type": "llava_llama", "vocab_size": 32000, "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 4, "rms_norm_eps": 1e-5,
        "hidden_act": "silu", "mm_vision_tower": "openai/clip-vit-large-patch14-336", "mm_hidden_size": 32,
        "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2, "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "image_aspect_ratio": "anyres" if next_ else "pad",
        "mm_patch_merge_type": "spatial_unpad" if next_ else "flat",
    }
    if next_:
        original["image_grid_pinpoints"] = scaled_pinpoints(side)
    clip = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "image_size": side, "patch_size": 14, "hidden_act": "quick_gelu"}
    out = os.path.join(work, f"config-{'next' if next_ else 'llava'}-{side}")
    os.makedirs(out)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(original_to_hf_config(original, clip, "config.json"), f)
    return ModelConfig.from_pretrained(out)


def jaxflow_origins(cfg, size_hw) -> np.ndarray:
    """[F, 3] (crop, patch row, patch column within the crop) per feature of image_layout; newline -1."""
    from jaxflow.geometry import image_layout

    lay = image_layout(cfg, size_hw)
    g = cfg.vision.grid
    row = np.where(lay.crop > 0, lay.row % g, lay.row)
    col = np.where(lay.crop > 0, lay.col % g, lay.col)
    return np.stack([lay.crop, row, col], -1)


def compare(cfg, llava: dict, sizes: dict, rule_diff: list, counts: np.ndarray) -> dict:
    """How jaxflow's image_layout under `cfg` differs from LLaVA's features."""
    from jaxflow.geometry import image_layout

    def differs(w, h):
        ref, ours = llava[f"{w}x{h}"], jaxflow_origins(cfg, (h, w))
        return "count" if len(ref) != len(ours) else "order" if not np.array_equal(ref, ours) else None

    task = {(w, h): differs(w, h) for h, w in sizes}
    n = counts.shape[0] - 1
    ours = np.array([[len(image_layout(cfg, (h, w))) if w and h else 0 for h in range(n + 1)] for w in range(n + 1)])
    sweep = np.argwhere(ours[1:, 1:] != counts[1:, 1:]) + 1
    return {
        "task_sizes_count_differs": sum(v == "count" for v in task.values()),
        "task_sizes_order_differs": sum(v == "order" for v in task.values()),
        "task_rows_differ": sum(sizes[(h, w)] for (w, h), v in task.items() if v),
        f"sweep_sizes_count_differs (of {n * n})": len(sweep),
        "sweep_count_differences (WxH: LLaVA jaxflow)": [f"{w}x{h}: {counts[w, h]} {ours[w, h]}" for w, h in sweep],
        "rule_differing_sizes_order_differs": sum(differs(w, h) is not None for w, h in rule_diff),
    }


def task_sizes() -> dict[tuple[int, int], int]:
    """(height, width) -> number of rows, over the valid rows of the six packaged task files."""
    from jaxflow.inputs import gqa

    sizes: dict[tuple[int, int], int] = {}
    for task in gqa.TASKS:
        samples, _ = gqa.load_tasks(task)
        for s in samples:
            sizes[s.image_size] = sizes.get(s.image_size, 0) + 1
    return sizes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llava-python", help="python of the environment with llava-torch 1.2.2.post1")
    ap.add_argument("--llava-side", metavar="DIR", help=argparse.SUPPRESS)
    ap.add_argument("--sweep", type=int, default=640, help="also compare feature counts for every W, H up to this")
    ap.add_argument("--json", help="also write the summary to this file")
    args = ap.parse_args()
    if args.llava_side:
        return llava_side(args.llava_side)
    if not args.llava_python:
        ap.error("--llava-python is required")

    import PIL.Image

    from jaxflow.config import IMAGE_GEOMETRIES
    from jaxflow.geometry import grid_shape, unpad_box
    from jaxflow.inputs.images import preprocess

    sizes = task_sizes()
    with tempfile.TemporaryDirectory() as work:
        cfg = converted_config(True, 336, work)
        assert cfg.image.geometry == "llava", cfg.image.geometry

        def grid_of(h, w):
            nh, nw = grid_shape(cfg, (h, w))
            return nh * cfg.vision.grid, nw * cfg.vision.grid

        anyres = {28: converted_config(True, 28, work), 336: cfg}
        pad = {s: converted_config(False, s, work) for s in PIXEL_SIZES}
        rng = np.random.default_rng(0)
        cases = []
        for s, whs in PIXEL_SIZES.items():
            for w, h in whs:
                png = os.path.join(work, f"{s}-{w}x{h}.png")
                PIL.Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(png)
                for mode in ("anyres", "pad", "square"):
                    cases.append({"name": f"{mode}-{s}-{w}x{h}", "png": png, "mode": mode, "image_size": s,
                                  "pinpoints_wh": scaled_pinpoints(s), "min_side": min(w, h)})
        # sizes (W, H) up to the sweep bound where the two rules give different features, for the order check
        rules = {rule: dataclasses.replace(cfg, image=dataclasses.replace(cfg.image, geometry=rule))
                 for rule in IMAGE_GEOMETRIES}
        rule_diff = [(w, h) for w in range(1, args.sweep + 1) for h in range(1, args.sweep + 1)
                     if unpad_box((h, w), grid_of(h, w), "llava") != unpad_box((h, w), grid_of(h, w), "transformers")]
        order = sorted({(w, h) for h, w in sizes} | set(rule_diff))
        request = {"image_size": 336, "patch_size": 14, "pinpoints_wh": PINPOINTS_WH, "sweep": args.sweep,
                   "order_sizes_wh": order, "pixels": cases}
        with open(os.path.join(work, "request.json"), "w") as f:
            json.dump(request, f)
        subprocess.run([args.llava_python, os.path.abspath(__file__), "--llava-side", work], check=True)
        llava = dict(np.load(os.path.join(work, "layouts.npz")))
        llava_pixels = dict(np.load(os.path.join(work, "pixels.npz")))
        with open(os.path.join(work, "pixel_errors.json")) as f:
            llava_errors = json.load(f)

        summary = {"sizes": len(sizes), "rows": sum(sizes.values()), "rule_differing_sizes": len(rule_diff),
                   "llava_vs_jaxflow": {rule: compare(c, llava, sizes, rule_diff, llava["counts"])
                                        for rule, c in rules.items()},
                   "pixels": {}}
        for case in cases:
            image = PIL.Image.open(case["png"])
            model = anyres[case["image_size"]] if case["mode"] == "anyres" else pad[case["image_size"]]
            ours = preprocess(image, model)[0][0]  # one image
            if case["name"] in llava_errors:
                summary["pixels"][case["name"]] = "LLaVA fails: " + llava_errors[case["name"]]
                continue
            ref = llava_pixels[case["name"]][0]  # one image
            if ref.shape != ours.shape:
                summary["pixels"][case["name"]] = f"shape LLaVA {ref.shape} jaxflow {ours.shape}"
            else:
                summary["pixels"][case["name"]] = float(np.abs(ref - ours).max())
        for mode in ("anyres", "pad", "square"):
            diffs = [summary["pixels"][c["name"]] for c in cases if c["mode"] == mode and c["min_side"] > 3]
            summary[f"pixels_{mode}_max_abs_diff (sides > 3 px)"] = max(diffs)
    print(json.dumps(summary, indent=1, default=str))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(summary, f, indent=1, default=str)


if __name__ == "__main__":
    sys.exit(main())
