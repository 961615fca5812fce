"""The plain paths every analysis walks (issue 26), jaxflow against transformers on one random model and the
same inputs: greedy decoding per new token and the prompt forward (vision tower + decoder, what
`Model.prefill` runs once per batch), each framework's memory, and the conversion's peak memory.

Shapes (`--shapes`): `llava`, LLaVA-1.5 (one 336 px crop, 576 image tokens, toy-world ChooseAttr prompts in the
vicuna_v1 template, T ~ 631); `next`, LLaVA-NeXT anyres (a 480 x 640 image: base crop + a 2 x 2 grid, unpadded,
one newline per row, T ~ 2,350). The model is bench_sweep.py's (Llama decoder, CLIP tower, random weights), in
the preset's dtype; transformers runs with sdpa attention.

Per round, in turn: jaxflow's and transformers' greedy generation of 1 and of N new tokens (no eos: every row
decodes N tokens; transformers with min_new_tokens). Prompt forward = the 1-token run; per-token time = (N-run -
1-run) / (N - 1). Ratios are transformers' time over jaxflow's (above 1: jaxflow is faster), per round, and
their medians are reported (a shared VM drifts within minutes). Greedy tokens must be identical in float32.

    python scripts/bench_plain.py                          # CPU preset, float32 (~10 min on 2 cores)
    python scripts/bench_plain.py --preset gpu-7b          # 7B shape, bfloat16, on an accelerator
    python scripts/bench_plain.py --preset tiny --no-convert   # seconds: checks the logic
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_sweep  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PRESETS = {"cpu": ("cpu", 4, 65, 3), "gpu-7b": ("gpu", 4, 65, 3), "tiny": ("tiny", 2, 5, 2)}  # shape, batch, N, rounds
NEXT_IMAGE = (480, 640)  # (H, W): 4:3 -> the 672 x 672 pinpoint, 36 of 48 grid rows kept
NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # (H, W), llava-v1.6's
TARGET = 1.0  # issue 26: at or above transformers' speed


@dataclasses.dataclass(frozen=True)
class Batch:
    input_ids: np.ndarray  # [B, T]
    pixel_values: np.ndarray  # [B, C, S, S] or NeXT [B, crops, C, S, S]
    image_sizes: np.ndarray | None  # [B, 2] (H, W), NeXT only


def build(preset: bench_sweep.Preset, kind: str, root: str, device: str):
    """(transformers model, jaxflow Model) of one random checkpoint: bench_sweep's LLaVA-1.5, or the same decoder
    and tower as LLaVA-NeXT."""
    if kind == "llava":
        return bench_sweep.build(preset, root, device)
    import torch
    from transformers import AutoConfig, LlavaNextConfig, LlavaNextForConditionalGeneration

    import jaxflow
    from jaxflow.convert import convert

    base = os.path.join(root, "base")
    bench_sweep.build(dataclasses.replace(preset, layers=1, vision_layers=1), base, "cpu")  # configs + tokenizer
    cfg = AutoConfig.from_pretrained(os.path.join(base, "src"))
    cfg.text_config.num_hidden_layers, cfg.vision_config.num_hidden_layers = preset.layers, preset.vision_layers
    config = LlavaNextConfig(vision_config=cfg.vision_config.to_dict(), text_config=cfg.text_config.to_dict(),
                             image_token_index=cfg.image_token_index, image_grid_pinpoints=NEXT_PINPOINTS)
    src = os.path.join(root, "src")
    torch.manual_seed(0)
    with torch.device(device):
        hf = LlavaNextForConditionalGeneration._from_config(config, attn_implementation="sdpa",
                                                            dtype=getattr(torch, preset.dtype))
    hf = hf.to(device).eval()
    with torch.no_grad():
        hf.model.image_newline.normal_(0, 1.0)
    hf.save_pretrained(src)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        with open(os.path.join(base, "src", name)) as f, open(os.path.join(src, name), "w") as g:
            g.write(f.read())
    model = jaxflow.load(convert(src, os.path.join(root, "model"), progress=False), dtype=preset.dtype)
    return hf, model


def make_batch(kind: str, model, root: str, batch: int, seed: int = 0) -> Batch:
    """`batch` prompts: toy-world ChooseAttr questions as the sweep builds them (llava), or one prompt around a
    NEXT_IMAGE-sized random image repeated (next)."""
    if kind == "llava":
        data, images = bench_sweep.toy_data(root, batch, seed)
        samples = bench_sweep.load_samples(model, data, images, batch)
        if len({len(s.input_ids) for s in samples}) != 1:
            raise ValueError("toy prompts of different lengths: pick another --seed")
        return Batch(np.stack([s.input_ids for s in samples]), np.concatenate([s.pixel_values for s in samples]),
                     None)
    from jaxflow.geometry import image_layout

    cfg = model.config
    layout = image_layout(cfg, NEXT_IMAGE)
    n_image = len(layout)  # image-token slots: features and newlines
    tok = model.tokenizer
    head = tok("A chat between a curious user and an artificial intelligence assistant. USER:").input_ids
    tail = tok("Is the cube red or blue? Answer the question using a single word or phrase. ASSISTANT:",
               add_special_tokens=False).input_ids
    ids = np.asarray(head + [cfg.image_token_id] * n_image + tail)
    rng = np.random.default_rng(seed)
    s = cfg.vision.image_size
    pixels = rng.standard_normal((batch, layout.num_crops, 3, s, s)).astype(np.float32)
    return Batch(np.tile(ids, (batch, 1)), pixels, np.tile(np.asarray(NEXT_IMAGE), (batch, 1)))


def jaxflow_generate(model, b: Batch, new: int):
    """Seconds and tokens [B, new] of jaxflow's greedy generation (no eos)."""
    import jax

    start = time.perf_counter()
    out = model.generate(b.input_ids, b.pixel_values, b.image_sizes, max_new_tokens=new, eos_token_id=[])
    jax.block_until_ready(out.tokens)
    return time.perf_counter() - start, out.tokens


def torch_generate(hf, b: Batch, new: int, device: str):
    """Seconds and tokens [B, new] of transformers' greedy generation (min_new_tokens = new: no early stop)."""
    import torch

    args = {"input_ids": torch.as_tensor(b.input_ids, device=device),
            "pixel_values": torch.as_tensor(b.pixel_values, device=device, dtype=hf.dtype)}
    if b.image_sizes is not None:
        args["image_sizes"] = torch.as_tensor(b.image_sizes, device=device)
    bench_sweep._sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = hf.generate(**args, max_new_tokens=new, min_new_tokens=new, do_sample=False, num_beams=1)
    bench_sweep._sync(device)
    return time.perf_counter() - start, out[:, b.input_ids.shape[1]:].cpu().numpy()


def compiled_memory(model, b: Batch, new: int) -> dict:
    """What XLA allocates (buffer assignment) for the prefill and for the decoding phase of the largest cache."""
    import jax.numpy as jnp

    from jaxflow.model import decode_phase, decode_phases, prefill_forward

    inputs = model.prepare(b.input_ids, b.pixel_values, b.image_sizes)
    batch, t = b.input_ids.shape
    last = jnp.full((batch,), t - 1, jnp.int32)
    pre = model.prefill(inputs)
    kvh, hd = pre.k[0].shape[1], pre.k[0].shape[3]
    empty = (jnp.zeros((batch, kvh, 0, hd), pre.k[0].dtype),) * len(pre.k)
    size = decode_phases(new - 1)[-1]
    calls = {"prefill": prefill_forward.lower(model.module, inputs, last),
             f"decoding phase ({size} cache slots)": decode_phase.lower(
                 model.module, pre.k, pre.v, jnp.full((batch,), t, jnp.int32), jnp.asarray([-1], jnp.int32),
                 jnp.int32(0), jnp.zeros((batch, new), jnp.int32), jnp.zeros(batch, bool), empty, empty, size=size)}
    out = {}
    for name, lowered in calls.items():
        m = lowered.compile().memory_analysis()
        out[name] = {"temp": m.temp_size_in_bytes, "arguments": m.argument_size_in_bytes,
                     "outputs": m.output_size_in_bytes}
    return out


def prompt_flops(cfg, t: int, crops: int) -> int:
    """The prompt forward of one row: the tower on each crop (and projector), the decoder over T positions
    (dense attention), the last position's unembedding."""
    return crops * bench_sweep.tower_flops(cfg) + bench_sweep.decoder_flops(cfg.text, t) + \
        bench_sweep.unembed_flops(cfg.text)


def decode_bytes(model, t: int, batch: int, new: int) -> int:
    """Bytes one decoding step must read at least: every decoder and unembedding weight once, and the keys and
    values of the prompt and of the mean number of generated tokens."""
    import jax

    text = model.config.text
    lm = model.module.language_model
    from flax import nnx

    weights = sum(x.nbytes for x in jax.tree.leaves(nnx.state(lm.layers)))
    weights += lm.embed_tokens.embedding.nbytes if lm.lm_head is None else lm.lm_head.kernel.nbytes
    itemsize = lm.embed_tokens.embedding.dtype.itemsize
    kv = 2 * text.num_layers * batch * text.num_kv_heads * text.head_dim * (t + new / 2) * itemsize
    return int(weights + kv)


def measure_shape(kind: str, preset, batch: int, new: int, rounds: int, device: str, root: str) -> dict:
    import jax
    import torch

    hf, model = build(preset, kind, os.path.join(root, kind), device)
    b = make_batch(kind, model, os.path.join(root, kind), batch)
    t = b.input_ids.shape[1]
    log(f"{kind}: batch {batch} x {t} tokens; warming up (compiles)")
    for n in (1, new):
        jaxflow_generate(model, b, n)
        torch_generate(hf, b, n, device)
    cuda = device.startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    per_round = []
    for i in range(rounds):  # each round times both frameworks within the same minutes
        j1, jt = jaxflow_generate(model, b, 1)
        jn, j_tokens = jaxflow_generate(model, b, new)
        p1, _ = torch_generate(hf, b, 1, device)
        pn, p_tokens = torch_generate(hf, b, new, device)
        r = {"jaxflow_prompt_s": j1, "torch_prompt_s": p1, "jaxflow_token_ms": (jn - j1) / (new - 1) * 1e3,
             "torch_token_ms": (pn - p1) / (new - 1) * 1e3}
        r["prompt_ratio"] = r["torch_prompt_s"] / r["jaxflow_prompt_s"]
        r["token_ratio"] = r["torch_token_ms"] / r["jaxflow_token_ms"]
        per_round.append(r)
        log(f"{kind} round {i + 1}: prompt forward {j1:.3f} s vs {p1:.3f} s ({r['prompt_ratio']:.2f}x); per token "
            f"{r['jaxflow_token_ms']:.1f} vs {r['torch_token_ms']:.1f} ms ({r['token_ratio']:.2f}x)")
    same = bool((j_tokens == p_tokens).all())
    if preset.dtype == "float32" and not same:
        raise SystemExit(f"{kind}: greedy tokens differ between jaxflow and transformers")
    median = {key: float(np.median([r[key] for r in per_round])) for key in per_round[0]}
    crops = 1 if b.pixel_values.ndim == 4 else b.pixel_values.shape[1]
    flops = batch * prompt_flops(model.config, t, crops)
    out = {"T": t, "batch": batch, "new_tokens": new, "rounds": per_round, "median": median,
           "identical_tokens": same, "first_token_agrees": bool((j_tokens[:, 0] == p_tokens[:, 0]).all()),
           "prompt_flops": flops, "prompt_flop_per_s": {"jaxflow": flops / median["jaxflow_prompt_s"],
                                                         "torch": flops / median["torch_prompt_s"]},
           "decode_bytes_per_token": decode_bytes(model, t, batch, new),
           "compiled_memory": compiled_memory(model, b, new)}
    out["decode_bytes_per_s"] = {"jaxflow": out["decode_bytes_per_token"] / median["jaxflow_token_ms"] * 1e3,
                                 "torch": out["decode_bytes_per_token"] / median["torch_token_ms"] * 1e3}
    if cuda:
        out["peak_device_bytes"] = {"torch": torch.cuda.max_memory_allocated(),
                                    "jaxflow": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")}
    del hf, model
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--shapes", nargs="+", default=["llava", "next"], choices=["llava", "next"])
    parser.add_argument("--rounds", type=int, help="rounds per shape (default: the preset's)")
    parser.add_argument("--new-tokens", type=int, help="N, the long generation (default: the preset's)")
    parser.add_argument("--batch", type=int, help="prompts per batch (default: the preset's)")
    parser.add_argument("--device", help="torch device (default: cuda when available, else cpu)")
    parser.add_argument("--torch-threads", type=int, help="torch CPU threads (default: torch's own)")
    parser.add_argument("--no-convert", action="store_true", help="skip the conversion-memory measurement")
    parser.add_argument("--convert-sizes", type=float, nargs="+", default=[0.5, 2.0],
                        help="checkpoint sizes (GiB) of the conversion-memory measurement (bench_convert_rss.py)")
    parser.add_argument("--workdir", help="keep the models here (default: a temporary folder)")
    parser.add_argument("--out", help="save the results as JSON")
    args = parser.parse_args(argv)

    import torch

    shape, batch, new, rounds = PRESETS[args.preset]
    batch, new, rounds = args.batch or batch, args.new_tokens or new, args.rounds or rounds
    if new < 2 or rounds < 1:
        raise SystemExit("--new-tokens must be at least 2 and --rounds at least 1")
    preset = bench_sweep.PRESETS[shape]
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    result = {"preset": args.preset, "shape": dataclasses.asdict(preset), "machine": bench_sweep.machine(device),
              "shapes": {}}
    with contextlib.ExitStack() as stack:
        root = args.workdir or stack.enter_context(tempfile.TemporaryDirectory())
        for kind in args.shapes:
            result["shapes"][kind] = measure_shape(kind, preset, batch, new, rounds, device, root)
            if not args.workdir:  # a 7B checkpoint and its conversion take 28 GB of disk
                shutil.rmtree(os.path.join(root, kind), ignore_errors=True)
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
        result["peak_rss_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
        if not args.no_convert:  # in a subprocess: this process's own peak would leak into its figures
            from bench_convert_rss import conversion_memory

            result["conversion"] = conversion_memory(sizes=tuple(args.convert_sizes))
    report(result)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return result


def log(text: str) -> None:
    print(f"[bench_plain {time.strftime('%H:%M:%S')}] {text}", flush=True)


def report(r: dict) -> None:
    m, s, si = r["machine"], r["shape"], bench_sweep._si
    print(f"\nmachine: {m['cpu']}, {m['cores']} cores; jax {m['jax']} on {m['jax_device']}; torch {m['torch']} on "
          f"{m['torch_device']}{' (' + m['gpu'] + ')' if 'gpu' in m else ''}, {m['torch_threads']} threads")
    print(f"model ({r['preset']}): decoder {s['layers']} layers, hidden {s['hidden']}, intermediate "
          f"{s['intermediate']}, {s['heads']} heads, vocab {s['vocab']}; CLIP {s['vision_layers']} layers, hidden "
          f"{s['vision_hidden']}, {s['image_size']} px; {s['dtype']}; transformers with sdpa\n")
    print("| shape | path | jaxflow | transformers | ratio (median of rounds) | per round | target |")
    print(f"|{' --- |' * 7}")
    for kind, x in r["shapes"].items():
        md, rounds = x["median"], x["rounds"]
        label = f"{kind}, {x['batch']} x {x['T']}"
        per = ", ".join(f"{q['token_ratio']:.2f}" for q in rounds)
        ok = "PASS" if md["token_ratio"] >= TARGET else "MISS"
        print(f"| {label} | greedy decoding, per new token ({x['new_tokens']} vs 1 new tokens) | "
              f"{md['jaxflow_token_ms']:.1f} ms | {md['torch_token_ms']:.1f} ms | {md['token_ratio']:.2f}x | {per} | "
              f">= {TARGET:g}x {ok} |")
        per = ", ".join(f"{q['prompt_ratio']:.2f}" for q in rounds)
        ok = "PASS" if md["prompt_ratio"] >= TARGET else "MISS"
        print(f"| {label} | prompt forward incl. the vision tower (1 new token) | {md['jaxflow_prompt_s']:.3f} s | "
              f"{md['torch_prompt_s']:.3f} s | {md['prompt_ratio']:.2f}x | {per} | >= {TARGET:g}x {ok} |")
    print()
    for kind, x in r["shapes"].items():
        f, bps = x["prompt_flop_per_s"], x["decode_bytes_per_s"]
        print(f"{kind}: prompt forward {si(x['prompt_flops'], 'FLOP')}: jaxflow {si(f['jaxflow'], 'FLOP/s')}, "
              f"transformers {si(f['torch'], 'FLOP/s')}; decoding reads at least "
              f"{si(x['decode_bytes_per_token'], 'B')} per step: jaxflow {si(bps['jaxflow'], 'B/s')}, transformers "
              f"{si(bps['torch'], 'B/s')}; greedy tokens identical: {x['identical_tokens']} (first token: "
              f"{x['first_token_agrees']})")
        print(f"{kind}: XLA's allocation: " + "; ".join(
            f"{name}: temp {si(c['temp'], 'B')}, arguments {si(c['arguments'], 'B')}, outputs {si(c['outputs'], 'B')}"
            for name, c in x["compiled_memory"].items()))
        if "peak_device_bytes" in x:
            print(f"{kind}: peak device memory: " + ", ".join(f"{k} {si(v, 'B')}"
                                                              for k, v in x["peak_device_bytes"].items()))
    print(f"process peak RSS (both frameworks, all shapes): {si(r['peak_rss_bytes'], 'B')}")
    conv = r.get("conversion")
    if conv:
        print(f"conversion (scripts/bench_convert_rss.py, layout {conv['layout']}, {conv['dtype']}; digests, tower "
              f"check, tokenizer build on): tiny conversion peak RSS {conv['tiny']['peak_rss_mib']:.0f} MiB")
        for c in conv["sizes"]:
            print(f"  {c['size_gib']:g} GiB checkpoint ({c['checkpoint_mib']:.0f} MiB, largest tensor "
                  f"{c['largest_tensor_mib']:.0f} MiB): peak RSS {c['peak_rss_mib']:.0f} MiB, "
                  f"{c['extra_over_tiny_mib']:.0f} MiB over the tiny conversion; bound 2 x largest tensor + 64 MiB = "
                  f"{c['bound_mib']:.0f} MiB: {'PASS' if c['passes'] else 'MISS'}")


if __name__ == "__main__":
    main()
