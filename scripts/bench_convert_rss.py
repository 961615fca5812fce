#!/usr/bin/env python
"""Peak memory (RSS) of `jaxflow convert` on a synthetic llava-hf checkpoint of several hundred MB.

    python scripts/bench_convert_rss.py [--dtype float32|bfloat16] [--out FILE.json] [--workdir DIR]

Builds, without torch, a random float32 LLaVA checkpoint in the transformers llava-hf on-disk layout
(Llama text 1024 wide x 8 layers, vocab 32064; CLIP 512 wide x 6 layers at 336 px), sharded with a
model.safetensors.index.json. Then it runs, each in a fresh subprocess:
  - a baseline that only imports jaxflow, convert, jax, orbax, transformers and starts jax's CPU
    backend (the fixed cost every conversion pays);
  - `python -m jaxflow.cli convert` of a tiny checkpoint of the same structure (fixed cost, measured);
  - `python -m jaxflow.cli convert SRC OUT` of the big checkpoint.
and reports each one's peak RSS (ru_maxrss of that child, from os.wait4).

Measurement note: on Linux a child started by fork/vfork + exec inherits its parent's RSS high-water
mark into its own ru_maxrss (exec_mmap -> setmax_mm_hiwater_rss). So this process imports only the
standard library and builds the checkpoint in a separate subprocess; every measured child then starts
from a parent of ~10 MiB, and its ru_maxrss is its own.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2**20

# text: Llama; vision: CLIP ViT; image_size / patch as LLaVA-1.5 (577 positions)
SIZES = {
    "bench": dict(vocab=32064, hidden=1024, intermediate=2816, layers=8, heads=16, kv_heads=16,
                  v_hidden=512, v_intermediate=2048, v_layers=6, v_heads=8, image_size=336, patch=14),
    "tiny": dict(vocab=256, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=4,
                 v_hidden=32, v_intermediate=64, v_layers=3, v_heads=4, image_size=336, patch=14),
}

BASELINE = (
    "import jax, jax.numpy as jnp, orbax.checkpoint, jaxflow, jaxflow.cli, convert, convert.converter\n"
    "from transformers import AutoConfig\n"
    "jnp.zeros(8).block_until_ready()\n"
)


# ---- the checkpoint (runs in the builder subprocess) ----------------------------------------------


def tensor_specs(d: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(on-disk name, shape) of every tensor transformers' LlavaForConditionalGeneration saves."""
    h, i, v, vi = d["hidden"], d["intermediate"], d["v_hidden"], d["v_intermediate"]
    head_dim = h // d["heads"]
    kv = d["kv_heads"] * head_dim
    specs = [("language_model.model.embed_tokens.weight", (d["vocab"], h))]
    for n in range(d["layers"]):
        p = f"language_model.model.layers.{n}."
        specs += [
            (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
        ]
    specs += [("language_model.model.norm.weight", (h,)), ("language_model.lm_head.weight", (d["vocab"], h))]
    positions = (d["image_size"] // d["patch"]) ** 2 + 1
    specs += [
        ("vision_tower.embeddings.class_embedding", (v,)),
        ("vision_tower.embeddings.patch_embedding.weight", (v, 3, d["patch"], d["patch"])),
        ("vision_tower.embeddings.position_embedding.weight", (positions, v)),
        ("vision_tower.pre_layrnorm.weight", (v,)), ("vision_tower.pre_layrnorm.bias", (v,)),
    ]
    for n in range(d["v_layers"]):
        p = f"vision_tower.encoder.layers.{n}."
        for norm in ("layer_norm1", "layer_norm2"):
            specs += [(p + f"{norm}.weight", (v,)), (p + f"{norm}.bias", (v,))]
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs += [(p + f"self_attn.{proj}.weight", (v, v)), (p + f"self_attn.{proj}.bias", (v,))]
        specs += [(p + "mlp.fc1.weight", (vi, v)), (p + "mlp.fc1.bias", (vi,)),
                  (p + "mlp.fc2.weight", (v, vi)), (p + "mlp.fc2.bias", (v,))]
    specs += [
        ("vision_tower.post_layernorm.weight", (v,)), ("vision_tower.post_layernorm.bias", (v,)),
        ("multi_modal_projector.linear_1.weight", (h, v)), ("multi_modal_projector.linear_1.bias", (h,)),
        ("multi_modal_projector.linear_2.weight", (h, h)), ("multi_modal_projector.linear_2.bias", (h,)),
    ]
    return specs


def group_of(name: str) -> str:
    """The converter's parameter group of an on-disk tensor: a whole layer, or the tensor itself."""
    m = re.match(r"(language_model\.model\.layers\.\d+|vision_tower\.encoder\.layers\.\d+)\.", name)
    return m[1] if m else name


def write_config(path: str, d: dict) -> None:
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    vision = CLIPVisionConfig(hidden_size=d["v_hidden"], intermediate_size=d["v_intermediate"],
                              num_hidden_layers=d["v_layers"], num_attention_heads=d["v_heads"],
                              image_size=d["image_size"], patch_size=d["patch"], hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=d["vocab"], hidden_size=d["hidden"], intermediate_size=d["intermediate"],
                       num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
                       num_key_value_heads=d["kv_heads"], rms_norm_eps=1e-5)
    LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=d["vocab"] - 1,
                vision_feature_layer=-2, vision_feature_select_strategy="default").save_pretrained(path)


def _write_safetensors(file: str, specs, rng, scale: float = 0.02) -> None:
    """Streams one safetensors file: the header first (shapes are known), then each tensor as it is
    generated, so at most one tensor is in memory (safetensors' save_file needs the whole dict)."""
    import numpy as np

    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in specs:
        size = 4 * int(np.prod(shape))
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(file, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape in specs:
            x = rng.standard_normal(shape, dtype=np.float32)
            x *= scale
            if name.endswith("norm.weight") or re.search(r"layer_?norm\d?\.weight$", name):
                x += 1.0
            f.write(x.tobytes(order="C"))
            del x


def build(path: str, d: dict, max_shard_mib: float, seed: int = 0) -> dict:
    import numpy as np
    from safetensors import safe_open

    os.makedirs(path)
    write_config(path, d)
    specs = tensor_specs(d)
    nbytes = {name: 4 * int(np.prod(shape)) for name, shape in specs}
    shards, current, size = [], [], 0
    for name, shape in specs:
        if current and size + nbytes[name] > max_shard_mib * MiB:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes[name]
    shards.append(current)
    rng = np.random.default_rng(seed)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(os.path.join(path, fname), shard, rng)
        weight_map.update(dict.fromkeys((n for n, _ in shard), fname))
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": sum(nbytes.values())}, "weight_map": weight_map}, f, indent=1)
    for fname in sorted(set(weight_map.values())):  # the files read back as safetensors
        with safe_open(os.path.join(path, fname), framework="numpy") as f:
            for name in f.keys():
                assert weight_map[name] == fname and tuple(f.get_slice(name).get_shape()) == dict(specs)[name]
    groups: dict[str, int] = {}
    for name, size in nbytes.items():
        groups[group_of(name)] = groups.get(group_of(name), 0) + size
    largest_tensor = max(nbytes, key=nbytes.get)
    largest_group = max(groups, key=groups.get)
    largest_layer = max((g for g in groups if ".layers." in g), key=groups.get)
    return {
        "checkpoint_mib": sum(nbytes.values()) / MiB, "files": len(shards), "tensors": len(specs),
        "largest_tensor": largest_tensor, "largest_tensor_mib": nbytes[largest_tensor] / MiB,
        "largest_group": largest_group, "largest_group_mib": groups[largest_group] / MiB,
        "largest_layer_group": largest_layer, "largest_layer_group_mib": groups[largest_layer] / MiB,
    }


# ---- measuring (this process: standard library only) --------------------------------------------------


def measure(cmd: list[str], what: str) -> dict:
    """Runs cmd in a fresh process; its own peak RSS and wall time."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    output = proc.stdout.read()  # drained before waiting, so a full pipe never blocks the child
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - start
    if proc.returncode:
        tail = output.decode(errors="replace")[-3000:]
        raise SystemExit(f"{what} failed (exit {proc.returncode}): {' '.join(cmd)}\n{tail}")
    return {"peak_rss_mib": usage.ru_maxrss / 1024, "wall_s": wall}  # ru_maxrss: KiB on Linux


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", help="write the figures to this JSON file")
    parser.add_argument("--workdir", help="where to build and convert (default: a temp dir, deleted afterwards)")
    parser.add_argument("--shard-mib", type=float, default=300.0, help="maximum safetensors shard size")
    parser.add_argument("--_build", nargs=3, metavar=("SIZE", "PATH", "SHARD_MIB"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._build:  # the builder subprocess
        size, path, shard_mib = args._build
        print(json.dumps(build(path, SIZES[size], float(shard_mib))))
        return 0
    if sys.platform != "linux":
        print("warning: ru_maxrss is in KiB on Linux only; figures elsewhere are off", file=sys.stderr)

    workdir = args.workdir or tempfile.mkdtemp(prefix="jaxflow-bench-rss-")
    os.makedirs(workdir, exist_ok=True)
    try:
        info = {}
        for size, shard_mib in (("tiny", 300.0), ("bench", args.shard_mib)):
            src = os.path.join(workdir, f"{size}-src")
            shutil.rmtree(src, ignore_errors=True)
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_build", size, src, str(shard_mib)],
                                 cwd=REPO, check=True, stdout=subprocess.PIPE, text=True).stdout
            info[size] = json.loads(out.strip().splitlines()[-1])
            print(f"built {size} checkpoint: {info[size]['checkpoint_mib']:.1f} MiB in {info[size]['files']} "
                  f"file(s), {time.perf_counter() - t0:.1f} s", file=sys.stderr)

        baseline = measure([sys.executable, "-c", BASELINE], "baseline")
        runs = {}
        for size in ("tiny", "bench"):
            src, dst = os.path.join(workdir, f"{size}-src"), os.path.join(workdir, f"{size}-out-{args.dtype}")
            shutil.rmtree(dst, ignore_errors=True)
            runs[size] = measure([sys.executable, "-m", "jaxflow.cli", "convert", src, dst, "--dtype", args.dtype],
                                 f"convert {size}")
            runs[size]["output_mib"] = sum(os.path.getsize(os.path.join(r, f))
                                           for r, _, fs in os.walk(dst) for f in fs) / MiB
            shutil.rmtree(dst)
    finally:
        if not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)

    big = info["bench"]
    peak, base, tiny = runs["bench"]["peak_rss_mib"], baseline["peak_rss_mib"], runs["tiny"]["peak_rss_mib"]
    figures = {
        "dtype": args.dtype,
        "checkpoint_mib": big["checkpoint_mib"], "checkpoint_files": big["files"],
        "largest_tensor": big["largest_tensor"], "largest_tensor_mib": big["largest_tensor_mib"],
        "largest_group": big["largest_group"], "largest_group_mib": big["largest_group_mib"],
        "largest_layer_group": big["largest_layer_group"], "largest_layer_group_mib": big["largest_layer_group_mib"],
        "convert_peak_rss_mib": peak, "baseline_import_rss_mib": base, "tiny_convert_peak_rss_mib": tiny,
        "peak_minus_baseline_mib": peak - base, "peak_minus_tiny_convert_mib": peak - tiny,
        "peak_minus_baseline_over_largest_group": (peak - base) / big["largest_group_mib"],
        "convert_wall_s": runs["bench"]["wall_s"], "baseline_import_wall_s": baseline["wall_s"],
        "tiny_convert_wall_s": runs["tiny"]["wall_s"], "output_mib": runs["bench"]["output_mib"],
        "python": sys.version.split()[0], "cpus": os.cpu_count(),
    }
    rows = [
        ("checkpoint (float32 safetensors)", f"{big['checkpoint_mib']:.1f} MiB in {big['files']} shards"),
        ("largest tensor", f"{big['largest_tensor_mib']:.1f} MiB ({big['largest_tensor']})"),
        ("largest group", f"{big['largest_group_mib']:.1f} MiB ({big['largest_group']})"),
        ("largest layer group", f"{big['largest_layer_group_mib']:.1f} MiB ({big['largest_layer_group']})"),
        (f"conversion peak RSS (--dtype {args.dtype})", f"{peak:.1f} MiB"),
        ("baseline import RSS", f"{base:.1f} MiB"),
        ("tiny-checkpoint conversion peak RSS", f"{tiny:.1f} MiB"),
        ("peak - baseline", f"{peak - base:.1f} MiB = {(peak - base) / big['largest_group_mib']:.2f} x largest group"),
        ("peak - tiny conversion", f"{peak - tiny:.1f} MiB"),
        ("conversion wall time", f"{runs['bench']['wall_s']:.1f} s (baseline import {baseline['wall_s']:.1f} s)"),
        ("output size", f"{runs['bench']['output_mib']:.1f} MiB"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
