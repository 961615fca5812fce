"""`jaxflow demo`: until the embedded trained model ships, a conversion-and-knockout smoke run on a
freshly built random model (llava-hf layout -> convert -> load -> knockout sweep -> generate)."""

from __future__ import annotations

import os
import time

import numpy as np

from jaxflow.knockout import Knockout


def run(out: str, seed: int = 0) -> dict:
    import jax

    import jaxflow
    from convert import convert
    from jaxflow.image_layout import image_layout
    from jaxflow.sweep.run import window
    from jaxflow.testing import tiny_hf_config, write_random_checkpoint

    start = time.time()
    os.makedirs(out, exist_ok=True)
    src, model_dir = os.path.join(out, "random-llava-hf"), os.path.join(out, "model")
    if not os.path.exists(model_dir):
        write_random_checkpoint(src, tiny_hf_config("llava"), seed=seed, scale=0.2)
        convert(src, model_dir)
    model = jaxflow.load(model_dir)
    cfg = model.config
    rng = np.random.default_rng(seed)
    n_image = len(image_layout(cfg))
    question = rng.integers(3, cfg.text.vocab_size - 2, 10)
    ids = np.concatenate([[1], np.full(n_image, cfg.image_token_id), question, [5]])[None]
    pixels = rng.standard_normal((1, 3, cfg.vision.image_size, cfg.vision.image_size)).astype(np.float32)
    t = ids.shape[1]
    regions = {"image": list(range(1, 1 + n_image)), "question": list(range(1 + n_image, t - 1)), "last": [t - 1]}
    flows = [("image", "question"), ("image", "last"), ("question", "last"), ("last", "last")]
    num_layers, k = cfg.text.num_layers, 3
    specs = [Knockout(source=regions[s], target=regions[d], layers=window(layer, k, num_layers))
             for s, d in flows for layer in range(num_layers)]
    base = jax.nn.softmax(model.logits(ids, pixels)[0, -1])
    token = int(np.argmax(base))
    cut = jax.nn.softmax(model.logits(ids, pixels, knockouts=specs)[:, 0, -1], axis=-1)[:, token]
    change = (np.asarray(cut) - float(base[token])) / float(base[token]) * 100
    print(f"\nrelative change (%) of p(token {token}) at the last position, window k={k}")
    print("flow               " + " ".join(f"L{layer:<6d}" for layer in range(num_layers)))
    for i, (s, d) in enumerate(flows):
        row = change[i * num_layers:(i + 1) * num_layers]
        print(f"{s + '->' + d:<18} " + " ".join(f"{v:+7.2f}" for v in row))
    generated = model.generate(ids, pixels, max_new_tokens=4).tokens[0].tolist()
    print(f"\ngreedy tokens: {generated}")
    print(f"converted model: {model_dir}\nrandom source checkpoint: {src}\ntook {time.time() - start:.1f} s")
    return {"change": change, "tokens": generated}
