"""Compile time of a sweep's jitted calls against decoder depth: the prefill (base run) and the
incremental knockout call, on a random LLaVA-1.5-shaped model of small width (hidden 64), one batch
of 631 positions (576 image + 55 text), the study's six flows x L layers, window 9.

Prints, per depth, the XLA compilations each call needed, their backend compile seconds and the
first call's wall time (trace + lower + compile + one run), and a warm call's time.

    python scripts/bench_compile.py --layers 16 32 40 --out bench_compile.json
"""

from __future__ import annotations

import argparse
import json
import time


def build(layers: int, hidden: int, heads: int, t: int, batch: int, seed: int = 0):
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from jaxflow.config import ModelConfig
    from jaxflow.knockout import KnockoutMasks
    from jaxflow.model import ModelInputs
    from jaxflow.nn.vlm import VisionLanguageModel
    from jaxflow.sweep.flows import window
    from jaxflow.testing import tiny_hf_config

    cfg = ModelConfig.from_hf(tiny_hf_config(layers=layers, hidden=hidden, heads=heads, kv_heads=heads,
                                             vocab=32064, image_size=336))
    module = VisionLanguageModel(cfg, dtype=jnp.float32, rngs=nnx.Rngs(seed))
    rng = np.random.default_rng(seed)
    ids = jnp.asarray(rng.integers(3, 30000, (batch, t)), jnp.int32)  # text only: the tower is not timed
    inputs = ModelInputs(ids, None, jnp.full((batch, t), -1, jnp.int32), jnp.ones((batch, t), bool),
                         jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (batch, t)))
    image, question, last = np.arange(1, 577), np.arange(t - 30, t - 18), np.array([t - 1])
    related = image[::7]
    flows = [(image, question), (image, last), (question, last), (last, last), (related, question),
             (np.setdiff1d(image, related), question)]
    k = len(flows) * layers
    source, target = np.zeros((k, batch, t), bool), np.zeros((k, batch, t), bool)
    cut_layers = np.zeros((k, layers), bool)
    for f, (src, dst) in enumerate(flows):
        source[f * layers:(f + 1) * layers, :, src] = True
        target[f * layers:(f + 1) * layers, :, dst] = True
        for layer in range(layers):
            cut_layers[f * layers + layer, window(layer, 9, layers)] = True
    knock = KnockoutMasks(source, target, cut_layers, np.ones((k, heads), bool))
    return module, inputs, knock, np.full(batch, t - 1), rng.integers(0, 32000, batch)


def measure(layers: int, hidden: int, heads: int, t: int, batch: int) -> dict:
    import jax

    from jaxflow.sweep import engine

    module, inputs, knock, last, token = build(layers, hidden, heads, t, batch)
    row = {"layers": layers, "configurations": int(knock.layers.shape[0])}
    calls = {"prefill": ("jit(prefill_forward)", lambda: engine.base_run(module, inputs, last))}
    base = calls["prefill"][1]()  # also warms the eager helpers both calls share
    calls["knockouts"] = ("jit(knockout_incremental)",
                          lambda: engine.knockout_probs(module, inputs, knock, last, token, base=base))
    jax.clear_caches()
    for name, (fun, call) in calls.items():
        with engine.count_compiles() as (counts, seconds):
            start = time.perf_counter()
            jax.block_until_ready(call())
            first = time.perf_counter() - start
        start = time.perf_counter()
        jax.block_until_ready(call())
        row[name] = {"compiles": counts[fun], "compile_s": round(seconds[fun], 2), "first_call_s": round(first, 2),
                     "warm_s": round(time.perf_counter() - start, 2)}
    return row


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, nargs="+", default=[16, 32, 40])
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--seq", type=int, default=631)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    rows = []
    print("| layers | configurations | call | compilations | compile s | first call s | warm s |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for layers in args.layers:
        row = measure(layers, args.hidden, args.heads, args.seq, args.batch)
        rows.append(row)
        for name in ("prefill", "knockouts"):
            r = row[name]
            print(f"| {layers} | {row['configurations']} | {name} | {r['compiles']} | {r['compile_s']} | "
                  f"{r['first_call_s']} | {r['warm_s']} |", flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
