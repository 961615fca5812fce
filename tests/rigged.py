"""A tiny LLaVA whose greedy answer is known in advance: attention and MLP outputs are zero (or small), so the
last hidden state is (nearly) the last token's embedding, and lm_head is pointed so that each token of a chain is
followed by the next (a bigram machine). Every prompt ends in the same token, where the chain starts; it then spells
PHRASE (8 distinct tokens with the toy Llama-2 tokenizer) and </s>."""

from __future__ import annotations

import csv
import os

import numpy as np
import toy_tokenizers
from PIL import Image
from safetensors.numpy import load_file, save_file

import jaxflow
from jaxflow.convert import convert
from jaxflow.inputs import gqa
from jaxflow.sweep.batching import prepare
from jaxflow.testing import tiny_hf_config, write_random_checkpoint

PHRASE = "white and black striped shirt"


def _rig_bigram(path, chain, leak: float):
    file = os.path.join(path, "model.safetensors")
    w = load_file(file)
    for name in w:
        if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
            w[name] = leak * w[name]
    emb, norm = w["language_model.model.embed_tokens.weight"], w["language_model.model.norm.weight"]
    head = 0.1 * w["language_model.lm_head.weight"]  # [V, D]
    for prev, nxt in zip(chain[:-1], chain[1:], strict=True):
        h = emb[prev] / np.sqrt(np.mean(emb[prev] ** 2) + 1e-6) * norm  # the final RMSNorm of the embedding
        head[nxt] = h / np.linalg.norm(h)
    w["language_model.lm_head.weight"] = head
    save_file(w, file)


def build(root, kind: str = "llava", rows: int = 8, wrong=(2,), name: str = "src", leak: float = 0.0):
    """(converted model dir, task file of `rows` ChooseAttr rows with gold PHRASE except the rows in `wrong`,
    image folder). The source checkpoint is written to root/`name`. leak: attention and MLP outputs are
    scaled by it (0: none, the answer's probability is then the same under every knockout)."""
    tok = toy_tokenizers.llama2_tokenizer()
    cfg = tiny_hf_config(kind, vocab=len(tok), image_token_index=tok.convert_tokens_to_ids("<image>"))
    src = os.path.join(root, name)
    write_random_checkpoint(src, cfg, scale=0.2)
    toy_tokenizers.save(tok, src)
    with open(os.path.join(gqa.TASK_DIR, "ChooseAttr.csv"), newline="") as f:
        table = list(csv.DictReader(f))[:rows]
    for i, r in enumerate(table):
        r["answer"] = "a different answer" if i in wrong else PHRASE
    data = os.path.join(root, "ChooseAttr.csv")
    with open(data, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(table[0]))
        w.writeheader()
        w.writerows(table)
    images = os.path.join(root, "images")
    os.makedirs(images)
    rng = np.random.default_rng(0)
    for r in table:
        h, w_ = int(r["image_h"]), int(r["image_w"])
        pixels = rng.integers(0, 255, (h, w_, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(os.path.join(images, f"{r['img_id']}.jpg"))
    plain = jaxflow.load(convert(src, os.path.join(root, "plain"), progress=False))
    sample = gqa.load_tasks(data, images)[0][0]
    last = int(next(prepare(plain, [sample], None)).inputs.input_ids[-1])
    chain = [last] + tok.encode(PHRASE, add_special_tokens=False) + [tok.eos_token_id]
    assert len(set(chain)) == len(chain) == 10
    _rig_bigram(src, chain, leak)
    return convert(src, os.path.join(root, "model"), progress=False), data, images
