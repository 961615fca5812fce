#!/usr/bin/env python
"""Peak memory (RSS) of `jaxflow convert`, and the conversion memory figure: how much more a checkpoint of a given
size needs than a tiny one, against the bound 2 x largest tensor + 64 MiB.

    python scripts/bench_convert_rss.py [--sizes 0.5 2] [--layout original|llava-hf] [--dtype float32]
                                        [--out FILE.json] [--workdir DIR]

For each size (GiB of float32 safetensors) it builds, without torch, a random LLaVA checkpoint of that size whose
largest tensor is 16 MiB (Llama text 1024 wide, MLP 4096, vocab 4096, as many layers as the size takes; CLIP 512
wide x 6 layers at 336 px), sharded with a model.safetensors.index.json, plus a tiny checkpoint of the same
structure. Every conversion runs with all its checks on: digests of every group (always), the stored-tower
comparison (original layout: the checkpoint stores a frozen copy of the --clip tower, which the converter compares
tensor by tensor) and the tokenizer build (a SentencePiece tokenizer.model, no tokenizer.json). Then, each in a fresh
subprocess:
  - a baseline that only imports jaxflow, convert, jax, orbax, transformers and starts jax's CPU backend;
  - `python -m jaxflow.cli convert` of the tiny checkpoint (the fixed cost of a conversion);
  - `python -m jaxflow.cli convert` of each sized checkpoint;
and reports each one's peak RSS (ru_maxrss of that child, from os.wait4). The conversion memory figure of a size is
its peak minus the tiny conversion's peak; it passes when at most 2 x largest tensor + 64 MiB.

Other scripts: `conversion_memory(sizes)` (below) runs this script in a subprocess and returns its --out JSON.

Measurement note: on Linux a child started by fork/vfork + exec inherits its parent's RSS high-water
mark into its own ru_maxrss (exec_mmap -> setmax_mm_hiwater_rss). So this process imports only the
standard library and builds the checkpoints in separate subprocesses; every measured child then starts
from a parent of ~10 MiB, and its ru_maxrss is its own. (conversion_memory runs this script as a subprocess for the
same reason: its caller may be large.)
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
import zlib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MiB = 2**20
BOUND_SLACK_MIB = 64  # the bound: 2 x largest tensor + this

# text: Llama; vision: CLIP ViT; image_size / patch as LLaVA-1.5 (577 positions). "twin": layers set by the size
SIZES = {
    "twin": dict(vocab=4096, hidden=1024, intermediate=4096, layers=None, heads=16, kv_heads=16,
                 v_hidden=512, v_intermediate=2048, v_layers=6, v_heads=8, image_size=336, patch=14),
    "tiny": dict(vocab=256, hidden=64, intermediate=128, layers=2, heads=4, kv_heads=4,
                 v_hidden=32, v_intermediate=64, v_layers=3, v_heads=4, image_size=336, patch=14),
}
LAYOUTS = ("original", "llava-hf")

BASELINE = (
    "import jax, jax.numpy as jnp, orbax.checkpoint, jaxflow, jaxflow.cli, jaxflow.convert, jaxflow.convert.converter\n"
    "from transformers import AutoConfig\n"
    "jnp.zeros(8).block_until_ready()\n"
)


# ---- the checkpoints (run in the builder subprocess) ----------------------------------------------


def tower_specs(d: dict) -> list[tuple[str, tuple[int, ...]]]:
    """(name under vision_model., shape) of a CLIP vision tower."""
    v, vi = d["v_hidden"], d["v_intermediate"]
    positions = (d["image_size"] // d["patch"]) ** 2 + 1
    specs = [
        ("embeddings.class_embedding", (v,)),
        ("embeddings.patch_embedding.weight", (v, 3, d["patch"], d["patch"])),
        ("embeddings.position_embedding.weight", (positions, v)),
        ("pre_layrnorm.weight", (v,)), ("pre_layrnorm.bias", (v,)),
    ]
    for n in range(d["v_layers"]):
        p = f"encoder.layers.{n}."
        for norm in ("layer_norm1", "layer_norm2"):
            specs += [(p + f"{norm}.weight", (v,)), (p + f"{norm}.bias", (v,))]
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs += [(p + f"self_attn.{proj}.weight", (v, v)), (p + f"self_attn.{proj}.bias", (v,))]
        specs += [(p + "mlp.fc1.weight", (vi, v)), (p + "mlp.fc1.bias", (vi,)),
                  (p + "mlp.fc2.weight", (v, vi)), (p + "mlp.fc2.bias", (v,))]
    return specs + [("post_layernorm.weight", (v,)), ("post_layernorm.bias", (v,))]


def tensor_specs(d: dict, layout: str) -> list[tuple[str, tuple[int, ...]]]:
    """(on-disk name, shape) of every tensor of the LLaVA checkpoint: transformers' llava-hf save, or original
    LLaVA's (model.layers.*, model.mm_projector.*, the CLIP tower stored under model.vision_tower.vision_tower.)."""
    h, i, v = d["hidden"], d["intermediate"], d["v_hidden"]
    kv = d["kv_heads"] * (h // d["heads"])
    text, top, tower, proj = {
        "llava-hf": ("language_model.model.", "language_model.", "vision_tower.",
                     ("multi_modal_projector.linear_1.", "multi_modal_projector.linear_2.")),
        "original": ("model.", "", "model.vision_tower.vision_tower.vision_model.",
                     ("model.mm_projector.0.", "model.mm_projector.2.")),
    }[layout]
    specs = [(text + "embed_tokens.weight", (d["vocab"], h))]
    for n in range(d["layers"]):
        p = f"{text}layers.{n}."
        specs += [
            (p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
            (p + "input_layernorm.weight", (h,)), (p + "post_attention_layernorm.weight", (h,)),
        ]
    specs += [(text + "norm.weight", (h,)), (top + "lm_head.weight", (d["vocab"], h))]
    specs += [(tower + name, shape) for name, shape in tower_specs(d)]
    specs += [(proj[0] + "weight", (h, v)), (proj[0] + "bias", (h,)), (proj[1] + "weight", (h, h)),
              (proj[1] + "bias", (h,))]
    return specs


def group_of(name: str) -> str:
    """The converter's parameter group of an on-disk tensor: a whole layer, or the tensor itself."""
    m = re.match(r"(.*\.layers\.\d+)\.", name)
    return m[1] if m else name


def layers_for(gib: float) -> int:
    """Text layers that bring the twin's LLaVA checkpoint closest to `gib` GiB."""
    d = dict(SIZES["twin"], layers=0)
    fixed = sum(4 * _numel(s) for _, s in tensor_specs(d, "original"))
    per_layer = sum(4 * _numel(s) for _, s in tensor_specs(dict(d, layers=1), "original")) - fixed
    return max(1, round((gib * 2**30 - fixed) / per_layer))


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _vision_config(d: dict) -> dict:
    from transformers import CLIPVisionConfig

    return CLIPVisionConfig(hidden_size=d["v_hidden"], intermediate_size=d["v_intermediate"],
                            num_hidden_layers=d["v_layers"], num_attention_heads=d["v_heads"],
                            image_size=d["image_size"], patch_size=d["patch"], hidden_act="quick_gelu").to_dict()


def write_config(path: str, d: dict, layout: str) -> None:
    from transformers import LlamaConfig, LlavaConfig

    text = LlamaConfig(vocab_size=d["vocab"], hidden_size=d["hidden"], intermediate_size=d["intermediate"],
                       num_hidden_layers=d["layers"], num_attention_heads=d["heads"],
                       num_key_value_heads=d["kv_heads"], rms_norm_eps=1e-5)
    if layout == "llava-hf":
        LlavaConfig(vision_config=_vision_config(d), text_config=text.to_dict(), image_token_index=d["vocab"] - 1,
                    vision_feature_layer=-2, vision_feature_select_strategy="default").save_pretrained(path)
        return
    t = text.to_dict()
    original = {  # LLaVA-1.5's config.json; the tower is not flagged as trained, so the converter compares it
        "architectures": ["LlavaLlamaForCausalLM"], "model_type": "llava_llama",
        **{k: t[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                             "num_attention_heads", "num_key_value_heads", "rms_norm_eps", "hidden_act",
                             "max_position_embeddings", "tie_word_embeddings")},
        "rope_theta": 10000.0, "mm_vision_tower": "openai/clip-vit-large-patch14-336",
        "mm_hidden_size": d["v_hidden"], "mm_projector_type": "mlp2x_gelu", "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "image_aspect_ratio": "pad", "mm_patch_merge_type": "flat",
    }
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(original, f, indent=1)


def write_clip(path: str, d: dict) -> None:
    """The --clip checkpoint: the same tower values as the one the LLaVA checkpoint stores."""
    os.makedirs(path)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump({**_vision_config(d), "model_type": "clip_vision_model"}, f, indent=1)
    size = d["image_size"]
    with open(os.path.join(path, "preprocessor_config.json"), "w") as f:
        json.dump({"crop_size": {"height": size, "width": size}, "do_center_crop": True, "do_convert_rgb": True,
                   "do_normalize": True, "do_rescale": True, "do_resize": True,
                   "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_processor_type": "CLIPImageProcessor",
                   "image_std": [0.26862954, 0.26130258, 0.27577711], "resample": 3, "rescale_factor": 1 / 255,
                   "size": {"shortest_edge": size}}, f)
    _write_safetensors(os.path.join(path, "model.safetensors"),
                       [("vision_model." + name, shape) for name, shape in tower_specs(d)])


def write_tokenizer(path: str) -> None:
    """A SentencePiece tokenizer.model (Llama-2 style BPE, trained here on a few generated prompts) with LLaVA-1.5's
    tokenizer_config.json and no tokenizer.json, so the converter builds one."""
    import random

    from jaxflow.testing import save_sentencepiece_tokenizer

    rng = random.Random(0)
    words = ("a the of is what which color shape jar full empty left right red blue round table user assistant "
             "image answer question single word phrase chat between curious artificial intelligence").split()
    lines = [f"USER: {' '.join(rng.choice(words) for _ in range(rng.randint(3, 12)))}? {rng.randint(0, 999)} "
             "ASSISTANT:" for _ in range(300)]
    save_sentencepiece_tokenizer(path, lines)


def _values(name: str, shape, scale: float = 0.02):
    """A tensor's random values, seeded by its name without the tower prefix (the stored tower equals --clip)."""
    import numpy as np

    key = name.split("vision_model.", 1)[-1]
    x = np.random.default_rng(zlib.crc32(key.encode())).standard_normal(shape, dtype=np.float32)
    x *= scale
    if re.search(r"(norm|layrnorm|layer_norm\d)\.weight$", name):
        x += 1.0
    return x


def _write_safetensors(file: str, specs) -> None:
    """Streams one safetensors file: the header first (shapes are known), then each tensor as it is
    generated, so at most one tensor is in memory (safetensors' save_file needs the whole dict)."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape in specs:
        size = 4 * _numel(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(file, "wb") as f:
        f.write(len(blob).to_bytes(8, "little"))
        f.write(blob)
        for name, shape in specs:
            f.write(_values(name, shape).tobytes(order="C"))


def build(path: str, d: dict, layout: str, max_shard_mib: float) -> dict:
    """Writes the checkpoint (and, original layout, its --clip checkpoint at path + '-clip'); what it holds."""
    from safetensors import safe_open

    os.makedirs(path)
    write_config(path, d, layout)
    write_tokenizer(path)
    clip = None
    if layout == "original":
        clip = path + "-clip"
        write_clip(clip, d)
    specs = tensor_specs(d, layout)
    nbytes = {name: 4 * _numel(shape) for name, shape in specs}
    shards, current, size = [], [], 0
    for name, shape in specs:
        if current and size + nbytes[name] > max_shard_mib * MiB:
            shards.append(current)
            current, size = [], 0
        current.append((name, shape))
        size += nbytes[name]
    shards.append(current)
    weight_map = {}
    for k, shard in enumerate(shards):
        fname = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        _write_safetensors(os.path.join(path, fname), shard)
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
    return {
        "layout": layout, "clip": clip, "text_layers": d["layers"],
        "checkpoint_mib": sum(nbytes.values()) / MiB, "files": len(shards), "tensors": len(specs),
        "largest_tensor": largest_tensor, "largest_tensor_mib": nbytes[largest_tensor] / MiB,
        "largest_group": largest_group, "largest_group_mib": groups[largest_group] / MiB,
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


def _build(name: str, layers: int, layout: str, workdir: str, shard_mib: float) -> dict:
    src = os.path.join(workdir, f"{name}-src")
    shutil.rmtree(src, ignore_errors=True)
    shutil.rmtree(src + "-clip", ignore_errors=True)
    t0 = time.perf_counter()
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--_build", name, str(layers), layout, src,
                          str(shard_mib)], cwd=REPO, check=True, stdout=subprocess.PIPE, text=True).stdout
    info = json.loads(out.strip().splitlines()[-1])
    print(f"built {name}: {info['checkpoint_mib']:.1f} MiB in {info['files']} file(s), "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    return dict(info, src=src)


def _convert(name: str, info: dict, workdir: str, dtype: str) -> dict:
    dst = os.path.join(workdir, f"{name}-out-{dtype}")
    shutil.rmtree(dst, ignore_errors=True)
    cmd = [sys.executable, "-m", "jaxflow.cli", "convert", info["src"], dst, "--dtype", dtype]
    run = measure(cmd + (["--clip", info["clip"]] if info["clip"] else []), f"convert {name}")
    with open(os.path.join(dst, "jaxflow.json")) as f:
        meta = json.load(f)
    run.update(output_mib=sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(dst) for f in fs) / MiB,
               digested_groups=len(meta["integrity"]["groups"]), tokenizer_json=meta.get("tokenizer_json"),
               vision_tower=meta.get("vision_tower"), vision_tower_reason=meta.get("vision_tower_reason"))
    shutil.rmtree(dst)
    return run


def run_bench(sizes=(0.5, 2.0), layout: str = "original", dtype: str = "float32", workdir: str | None = None,
              shard_mib: float = 300.0) -> dict:
    """Builds and converts the tiny checkpoint and one of each size (GiB); the figures (see the module docstring).
    Call this only from a small, standard-library process (the measurement note); others use conversion_memory."""
    own = workdir is None
    workdir = workdir or tempfile.mkdtemp(prefix="jaxflow-bench-rss-")
    os.makedirs(workdir, exist_ok=True)
    try:
        tiny = _build("tiny", SIZES["tiny"]["layers"], layout, workdir, shard_mib)
        baseline = measure([sys.executable, "-c", BASELINE], "baseline")
        tiny.update(_convert("tiny", tiny, workdir, dtype))
        shutil.rmtree(tiny.pop("src"), ignore_errors=True)
        results = []
        for gib in sizes:
            name = f"{gib:g}GiB"
            info = _build(name, layers_for(gib), layout, workdir, shard_mib)
            info.update(_convert(name, info, workdir, dtype))
            for path in (info.pop("src"), info["clip"]):  # a 2 GiB twin is not kept while the next is built
                if path:
                    shutil.rmtree(path, ignore_errors=True)
            extra = info["peak_rss_mib"] - tiny["peak_rss_mib"]
            bound = 2 * info["largest_tensor_mib"] + BOUND_SLACK_MIB
            results.append(dict(info, size_gib=gib, extra_over_tiny_mib=extra, bound_mib=bound,
                                passes=extra <= bound))
    finally:
        if own:
            shutil.rmtree(workdir, ignore_errors=True)
    return {"layout": layout, "dtype": dtype, "baseline_import_rss_mib": baseline["peak_rss_mib"],
            "baseline_import_wall_s": baseline["wall_s"], "tiny": tiny, "sizes": results,
            "passes": all(r["passes"] for r in results), "python": sys.version.split()[0], "cpus": os.cpu_count()}


def conversion_memory(sizes=(0.5, 2.0), layout: str = "original", dtype: str = "float32",
                      workdir: str | None = None, timeout: float | None = None) -> dict:
    """The conversion memory figures, measured by this script in a subprocess (so the caller's own RSS does not
    leak into them): its --out JSON. Per size in result["sizes"]: peak_rss_mib, extra_over_tiny_mib,
    largest_tensor_mib, bound_mib (2 x largest tensor + 64 MiB), passes; result["tiny"]["peak_rss_mib"]."""
    with tempfile.TemporaryDirectory(prefix="jaxflow-convmem-") as tmp:
        out = os.path.join(tmp, "figures.json")
        cmd = [sys.executable, os.path.abspath(__file__), "--sizes", *map(str, sizes), "--layout", layout,
               "--dtype", dtype, "--out", out] + (["--workdir", workdir] if workdir else [])
        done = subprocess.run(cmd, cwd=REPO, timeout=timeout, stdout=subprocess.DEVNULL)
        if done.returncode not in (0, 1) or not os.path.isfile(out):  # 1: measured, a bound not met
            raise RuntimeError(f"{' '.join(cmd)} failed (exit {done.returncode})")
        with open(out) as f:
            return json.load(f)


def report(figures: dict) -> None:
    tiny = figures["tiny"]
    print(f"layout {figures['layout']}, --dtype {figures['dtype']}: digests of {tiny['digested_groups']} groups, "
          f"tokenizer.json {tiny['tokenizer_json']}, vision tower {tiny['vision_tower']} "
          f"({tiny['vision_tower_reason'] or 'llava-hf: its own'})")
    print(f"baseline import peak RSS {figures['baseline_import_rss_mib']:.1f} MiB; tiny conversion peak RSS "
          f"{tiny['peak_rss_mib']:.1f} MiB ({tiny['wall_s']:.1f} s)")
    for r in figures["sizes"]:
        print(f"{r['size_gib']:g} GiB twin: {r['checkpoint_mib']:.0f} MiB in {r['files']} shards, {r['text_layers']} "
              f"text layers; largest tensor {r['largest_tensor_mib']:.0f} MiB ({r['largest_tensor']}), largest "
              f"group {r['largest_group_mib']:.0f} MiB; conversion peak RSS {r['peak_rss_mib']:.1f} MiB "
              f"({r['wall_s']:.1f} s)")
        print(f"  the conversion memory figure: {r['extra_over_tiny_mib']:.1f} MiB over the tiny conversion, bound "
              f"2 x {r['largest_tensor_mib']:.0f} + {BOUND_SLACK_MIB} = {r['bound_mib']:.0f} MiB: "
              f"{'pass' if r['passes'] else 'FAIL'}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=float, nargs="+", default=[0.5, 2.0], help="checkpoint sizes, GiB")
    parser.add_argument("--layout", default="original", choices=LAYOUTS)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--out", help="write the figures to this JSON file")
    parser.add_argument("--workdir", help="where to build and convert (default: a temp dir, deleted afterwards)")
    parser.add_argument("--shard-mib", type=float, default=300.0, help="maximum safetensors shard size")
    parser.add_argument("--_build", nargs=5, metavar=("NAME", "LAYERS", "LAYOUT", "PATH", "SHARD_MIB"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args._build:  # the builder subprocess
        name, layers, layout, path, shard_mib = args._build
        d = dict(SIZES["tiny" if name == "tiny" else "twin"], layers=int(layers))
        print(json.dumps(build(path, d, layout, float(shard_mib))))
        return 0
    if sys.platform != "linux":
        print("warning: ru_maxrss is in KiB on Linux only; figures elsewhere are off", file=sys.stderr)
    figures = run_bench(args.sizes, args.layout, args.dtype, args.workdir, args.shard_mib)
    report(figures)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=1)
    return 0 if figures["passes"] else 1


if __name__ == "__main__":
    sys.exit(main())
