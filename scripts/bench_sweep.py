"""Knockout-sweep throughput: (a) the PyTorch reference procedure (transformers, one forward per
knockout configuration with additive float masks, layer by layer), (b) jaxflow with full
recomputation, (c) jaxflow incremental. Checks that all three give the same probabilities, then
prints samples/s and the ratios, and saves them as JSON.

CPU preset: LLaVA-1.5 proportions scaled down (576 image tokens + ~40 text tokens, 8 layers).
    python scripts/bench_sweep.py --out bench_sweep.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time

import numpy as np

PRESETS = {
    # text: hidden, intermediate, layers, heads, kv heads; vision: hidden, layers; image 336 px -> 576 tokens
    "cpu": dict(hidden=256, intermediate=688, layers=8, heads=8, kv_heads=8, vision_hidden=64, vision_layers=2),
}


def build(preset: dict, root: str, seed: int = 0):
    import torch
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaForConditionalGeneration

    import jaxflow
    from convert import convert

    vision = CLIPVisionConfig(hidden_size=preset["vision_hidden"], intermediate_size=4 * preset["vision_hidden"],
                              num_hidden_layers=preset["vision_layers"], num_attention_heads=4, image_size=336,
                              patch_size=14, hidden_act="quick_gelu")
    text = LlamaConfig(vocab_size=1000, hidden_size=preset["hidden"], intermediate_size=preset["intermediate"],
                       num_hidden_layers=preset["layers"], num_attention_heads=preset["heads"],
                       num_key_value_heads=preset["kv_heads"], initializer_range=0.05)
    torch.manual_seed(seed)
    hf = LlavaForConditionalGeneration._from_config(
        LlavaConfig(vision_config=vision.to_dict(), text_config=text.to_dict(), image_token_index=999),
        attn_implementation="eager").eval()
    hf.save_pretrained(os.path.join(root, "src"))
    model = jaxflow.load(convert(os.path.join(root, "src"), os.path.join(root, "model"), progress=False))
    return hf, model


def make_samples(model, n: int, seed: int = 0):
    """n samples: [BOS] + 576 image tokens + ~38 question/instruction tokens, with regions."""
    from jaxflow.geometry import image_layout

    rng = np.random.default_rng(seed)
    n_image = len(image_layout(model.config))
    samples = []
    for _ in range(n):
        n_text = int(rng.integers(34, 42))
        ids = np.concatenate([[1], np.full(n_image, model.config.image_token_id), rng.integers(3, 990, n_text)])
        image = np.arange(1, 1 + n_image)
        t = len(ids)
        q0 = 1 + n_image + 1
        question = np.arange(q0, q0 + 12)
        grid = np.zeros((24, 24), bool)
        r, c = rng.integers(0, 16, 2)
        grid[r:r + 8, c:c + 6] = True
        regions = {"image": image, "question": question, "last": np.array([t - 1]),
                   "related_image_patches": image[grid.ravel()], "other_image_patches": image[~grid.ravel()]}
        pixels = rng.standard_normal((1, 3, 336, 336)).astype(np.float32)
        samples.append((ids, pixels, regions))
    return samples


FLOWS = [("image", "question"), ("image", "last"), ("question", "last"), ("last", "last"),
         ("related_image_patches", "question"), ("other_image_patches", "question")]


def configs(regions, num_layers: int, k: int):
    from jaxflow.sweep.flows import window

    return [(regions[s], regions[d], window(layer, k, num_layers)) for s, d in FLOWS for layer in range(num_layers)]


def run_torch(hf, model, samples, k: int):
    """(a): per sample, one layer-by-layer forward per configuration. Returns p [S, K], seconds."""
    from jaxflow.reference import embeddings, run_layers

    num_layers = model.config.text.num_layers
    out = []
    start = time.perf_counter()
    for ids, pixels, regions in samples:
        embeds = embeddings(hf, ids[None], pixels)
        base_logits, _ = run_layers(hf, embeds, np.zeros((num_layers, 1, 1, 1, 1), bool), return_weights=False)
        base = np.exp(base_logits[0, -1] - base_logits[0, -1].max())
        token = int(np.argmax(base))
        ps = []
        t = len(ids)
        for source, target, layers in configs(regions, num_layers, k):
            cut = np.zeros((num_layers, 1, 1, t, t), bool)
            cut[np.ix_(layers, [0], [0], target, source)] = True
            logits, _ = run_layers(hf, embeds, cut, return_weights=False)
            z = logits[0, -1] - logits[0, -1].max()
            ps.append(float(np.exp(z[token]) / np.exp(z).sum()))
        out.append(ps)
    return np.asarray(out), time.perf_counter() - start


def run_jax(model, samples, k: int, method: str, batch: int, chunk: int):
    """(b) / (c): all configurations of a batch in one call (split over the model's mesh, if any).
    Returns p [S, K], seconds (compiled)."""
    import jax

    from jaxflow.knockout import KnockoutMasks
    from jaxflow.sweep import engine

    cfg = model.config.text
    t = max(len(s[0]) for s in samples)
    t = -(-t // 32) * 32

    def batch_inputs(group):
        ids = np.zeros((batch, t), np.int64)
        mask = np.zeros((batch, t), bool)
        rows = group + [group[0]] * (batch - len(group))
        for i, (x, _, _) in enumerate(rows):
            ids[i, : len(x)], mask[i, : len(x)] = x, True
        inputs = model.prepare(ids, np.concatenate([r[1] for r in rows]), attention_mask=mask)
        n = len(configs(rows[0][2], cfg.num_layers, k))
        src, tgt = np.zeros((n, batch, t), bool), np.zeros((n, batch, t), bool)
        layers = np.zeros((n, cfg.num_layers), bool)
        for j, (_, _, regions) in enumerate(rows):
            for c, (s, d, lay) in enumerate(configs(regions, cfg.num_layers, k)):
                src[c, j, s], tgt[c, j, d], layers[c, lay] = True, True, True
        knock = KnockoutMasks(src, tgt, layers, np.ones((n, cfg.num_heads), bool))
        return inputs, knock, mask.sum(1) - 1

    def go(group):
        inputs, knock, last = batch_inputs(group)
        base = engine.base_run(model.module, inputs, last)
        token = np.asarray(jax.numpy.argmax(base.probs, -1))
        p, _ = engine.knockout_probs(model.module, inputs, knock, last, token, method=method, chunk=chunk, base=base,
                                     mesh=model.mesh)
        return p[:, : len(group)].T

    go(samples[:batch])  # compile
    start = time.perf_counter()
    out = [go(samples[i:i + batch]) for i in range(0, len(samples), batch)]
    return np.concatenate(out), time.perf_counter() - start


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="cpu", choices=sorted(PRESETS))
    parser.add_argument("--samples", type=int, default=8, help="samples for jaxflow (b, c)")
    parser.add_argument("--torch-samples", type=int, default=2, help="samples for the PyTorch reference (a)")
    parser.add_argument("--window", type=int, default=9)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--chunk", type=int, default=48)
    parser.add_argument("--out", help="save the table as JSON")
    args = parser.parse_args(argv)

    import jax
    import torch

    with tempfile.TemporaryDirectory() as root:
        hf, model = build(PRESETS[args.preset], root)
        samples = make_samples(model, max(args.samples, args.torch_samples))
        p_a, s_a = run_torch(hf, model, samples[: args.torch_samples], args.window)
        p_b, s_b = run_jax(model, samples[: args.samples], args.window, "full", args.batch, args.chunk)
        p_c, s_c = run_jax(model, samples[: args.samples], args.window, "incremental", args.batch, args.chunk)
    n = args.torch_samples
    agree = {"max_abs_diff_a_b": float(np.abs(p_a - p_b[:n]).max()),
             "max_abs_diff_a_c": float(np.abs(p_a - p_c[:n]).max()),
             "max_abs_diff_b_c": float(np.abs(p_b - p_c).max())}
    if max(agree.values()) > 1e-4:
        raise SystemExit(f"methods disagree: {agree}")
    rate = {"a_torch_reference": args.torch_samples / s_a, "b_jaxflow_full": args.samples / s_b,
            "c_jaxflow_incremental": args.samples / s_c}
    result = {
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
                   f"jax device {jax.devices()[0]}, torch {torch.__version__} threads {torch.get_num_threads()}",
        "preset": args.preset, "configurations_per_sample": len(FLOWS) * model.config.text.num_layers,
        "sequence_length": int(np.mean([len(s[0]) for s in samples])), "window": args.window,
        "samples_per_s": rate, "ratio_b_over_a": rate["b_jaxflow_full"] / rate["a_torch_reference"],
        "ratio_c_over_a": rate["c_jaxflow_incremental"] / rate["a_torch_reference"],
        "ratio_c_over_b": rate["c_jaxflow_incremental"] / rate["b_jaxflow_full"], "agreement": agree,
    }
    print(f"{'method':<26}{'samples/s':>12}{'x (a)':>10}")
    for name, r in rate.items():
        print(f"{name:<26}{r:>12.3f}{r / rate['a_torch_reference']:>10.1f}")
    print(f"configurations/sample {result['configurations_per_sample']}, T ~ {result['sequence_length']}, "
          f"max |p| differences {agree}")
    print(result["machine"])
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
