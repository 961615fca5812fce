"""Activation patching, noise corruption and attribution patching (issue 28) against transformers with PyTorch hooks
written here (LLaVA-1.5 with GQA heads, LLaVA-NeXT, LLaVA-Interleave: a Qwen2 decoder with q/k/v biases and a SigLIP
tower, every feature kept), the mechanism's own identities (a patch with the target's own
activations changes nothing; resid_pre everywhere at layer 0 is the source run), and the incremental engine
against full recomputation."""

from __future__ import annotations

import jax
import numpy as np
import pytest
import tiny
import torch

import jaxflow
from jaxflow.inputs.regions import Regions
from jaxflow.patching import stack_patches
from jaxflow.sweep import engine

# name -> (transformers class kind, twin settings, image sizes)
KINDS = {"llava": ("llava", {}, ((42, 42),)), "llava_next": ("llava_next", {}, ((100, 30),)),
         "interleave": ("llava", {"text_type": "qwen2", "vision_type": "siglip", "strategy": "full",
                                  "feature_layer": -1}, ((42, 42),))}


def setup(twins, name):
    """(hf, model, target inputs, counterfactual source inputs): the source has another image and another
    question of the same token count."""
    kind, settings, sizes = KINDS[name]
    hf, model = twins(kind, "llava-hf", kv_heads=2, **settings)
    ids, pv, isz, mask = tiny.make_inputs(model.config, image_sizes=sizes, num_text=6, seed=0)
    src_ids, src_pv, _, _ = tiny.make_inputs(model.config, image_sizes=sizes, num_text=6, seed=1)
    target = {"input_ids": ids, "pixel_values": pv, "image_sizes": isz, "attention_mask": mask}
    return hf, model, target, {**target, "input_ids": src_ids, "pixel_values": src_pv}


def hf_run(hf, inputs, replace=None, offset=None, grads=False):
    """transformers' forward with PyTorch hooks: (logits [B, T, V], site -> L x [B, T, D] ("z": [B, T, H, hd])
    activations as the run saw them, and with `grads` the zero tensors added at every site and layer).

    replace: (site, layer) -> (mask [B, T] or [B, T, H] bool, value): the activation becomes value where mask is
    True. offset [B, T, D]: added to the input embeddings (a Noise)."""
    lm = hf.model.language_model
    cfg = hf.config.text_config
    heads, hd = cfg.num_attention_heads, cfg.hidden_size // cfg.num_attention_heads
    replace, seen, zeros = replace or {}, {}, {}

    def edit(site, layer, a):  # a [B, T, D] or [B, T, H, hd]
        if (site, layer) in replace:
            mask, value = replace[(site, layer)]
            mask = torch.as_tensor(np.asarray(mask))
            a = torch.where(mask.reshape(mask.shape + (1,) * (a.ndim - mask.ndim)), torch.as_tensor(value), a)
        if grads:
            zeros[(site, layer)] = torch.zeros_like(a, requires_grad=True)
            a = a + zeros[(site, layer)]
        seen[(site, layer)] = a
        return a

    def resid_pre(i):
        def hook(module, args):
            x = args[0]
            if i == 0 and offset is not None:
                x = x + torch.tensor(np.asarray(offset))
            return (edit("resid_pre", i, x), *args[1:])
        return hook

    def z(i):
        def hook(module, args):
            b, t, _ = args[0].shape
            return (edit("z", i, args[0].reshape(b, t, heads, hd)).reshape(b, t, heads * hd), *args[1:])
        return hook

    hooks = []
    for i, layer in enumerate(lm.layers):
        hooks += [layer.register_forward_pre_hook(resid_pre(i)),
                  layer.self_attn.o_proj.register_forward_pre_hook(z(i)),
                  layer.self_attn.register_forward_hook(lambda m, a, o, i=i: (edit("attn_out", i, o[0]), *o[1:])),
                  layer.mlp.register_forward_hook(lambda m, a, o, i=i: edit("mlp_out", i, o))]
    args = {"input_ids": torch.tensor(inputs["input_ids"]), "pixel_values": torch.tensor(inputs["pixel_values"]),
            "attention_mask": torch.tensor(inputs["attention_mask"])}
    if inputs["image_sizes"] is not None:
        args["image_sizes"] = torch.tensor(inputs["image_sizes"])
    try:
        with torch.set_grad_enabled(grads):
            logits = hf(**args).logits
    finally:
        for h in hooks:
            h.remove()
    sites = {s: [seen[(s, i)] for i in range(len(lm.layers))] for s in ("resid_pre", "attn_out", "mlp_out", "z")}
    return logits, sites, zeros


def hf_patched(hf, model, target, source_acts, patch, offset=None):
    """transformers' logits [B, T, V] of the target run with `patch` (a jaxflow.Patch with explicit positions)
    replaced from `source_acts` (hf_run's activations)."""
    b, t = target["input_ids"].shape
    text = model.config.text
    masks = stack_patches([patch], b, t, text.num_layers, text.num_heads)
    where = np.asarray(masks.positions[0])  # [B, T]
    if patch.site == "z":
        where = where[..., None] & np.asarray(masks.heads[0])  # [B, T, H]
    layers = [patch.layers] if np.isscalar(patch.layers) else patch.layers
    replace = {(patch.site, i): (where, source_acts[patch.site][i].detach()) for i in layers}
    return hf_run(hf, target, replace, offset)[0].detach().numpy()


def close(ours, ref, tol=1e-4):
    err = np.abs(np.asarray(ours) - ref).max()
    assert err < tol * max(1.0, np.abs(ref).max()), err


@pytest.mark.parametrize("kind", list(KINDS))
def test_patches_match_transformers_hooks(twins, kind):
    hf, model, target, source = setup(twins, kind)
    t = target["input_ids"].shape[1]
    text = np.arange(t - 6, t)  # the question: the source's differs there
    image = np.flatnonzero(target["input_ids"][0] == tiny.IMAGE_TOKEN)
    patches = [jaxflow.Patch("resid_pre", 1, image[::3]),
               jaxflow.Patch("resid_pre", [0, 2], text[:3]),
               jaxflow.Patch("attn_out", [0, 1], np.concatenate([image[:4], text[2:]])),
               jaxflow.Patch("mlp_out", [1, 2], text),
               jaxflow.Patch("z", [0, 2], text[1:], heads=[1, 3])]
    ours = np.asarray(model.logits(**target, patches=patches, source=source))
    assert ours.shape == (len(patches), 1, t, model.config.text.vocab_size)
    clean = hf_run(hf, target)[0].detach().numpy()
    _, acts, _ = hf_run(hf, source)
    for k, patch in enumerate(patches):
        ref = hf_patched(hf, model, target, acts, patch)
        close(ours[k], ref)
        assert np.abs(ref - clean).max() > 1e-3, patch  # the patch matters
    # the source's z of heads 0 and 2 is not used: heads outside the patch keep the target's
    only = model.logits(**target, patches=[jaxflow.Patch("z", [0, 2], text[1:], heads=[0, 2])], source=source)
    assert np.abs(np.asarray(only)[0] - ours[4]).max() > 1e-3


@pytest.mark.parametrize("kind", ["llava", "interleave"])
def test_noise_as_source_and_as_target(twins, kind):
    hf, model, target, clean_src = setup(twins, kind)
    image = np.flatnonzero(target["input_ids"][0] == tiny.IMAGE_TOKEN)
    noise = jaxflow.Noise(image, scale=3.0, seed=4)
    offset = np.asarray(model.noise_offset(noise, model.prepare(**target)))  # [B, T, D]
    # the noise: zero off its positions, the image features' std times 3 on them, the same for the same seed
    std = model.embedding_std
    assert abs(std["text"] - float(hf.model.language_model.embed_tokens.weight.detach().std())) < 1e-3 * std["text"]
    assert not offset[:, np.setdiff1d(np.arange(offset.shape[1]), image)].any()
    assert abs(offset[:, image].std() / (3 * std["image"]) - 1) < 0.15
    np.testing.assert_array_equal(offset, np.asarray(model.noise_offset(noise, model.prepare(**target))))
    assert np.abs(offset - np.asarray(model.noise_offset(jaxflow.Noise(image, seed=5), model.prepare(**target)))).max()
    last = target["input_ids"].shape[1] - 1
    # the source is the target with noised image embeddings
    patch = jaxflow.Patch("resid_pre", [1, 2], [last - 2, last])
    ours = np.asarray(model.logits(**target, patches=[patch], source=noise))[0]
    _, noised, _ = hf_run(hf, target, offset=offset)
    close(ours, hf_patched(hf, model, target, noised, patch))
    # ROME's restoration: the corrupted target with the clean run's mlp_out restored
    patch = jaxflow.Patch("mlp_out", [0, 1], image[:5])
    ours = np.asarray(model.logits(**target, noise=noise, patches=[patch], source=target))[0]
    _, clean, _ = hf_run(hf, target)
    ref = hf_patched(hf, model, target, clean, patch, offset=offset)
    close(ours, ref)
    corrupt = hf_run(hf, target, offset=offset)[0].detach().numpy()
    close(model.logits(**target, noise=noise)[0], corrupt[0])
    assert np.abs(ref - corrupt).max() > 1e-3  # the restoration changes the corrupted run


def test_patching_identities(twins):
    _, model, target, source = setup(twins, "llava")
    t = target["input_ids"].shape[1]
    base = np.asarray(model.logits(**target))
    own = [jaxflow.Patch(site, [0, 1, 2], np.arange(t)) for site in ("resid_pre", "attn_out", "mlp_out", "z")]
    # a patch with the target's own activations changes nothing
    np.testing.assert_allclose(model.logits(**target, patches=own, source=target), np.stack([base] * 4), atol=1e-5)
    # resid_pre at layer 0 everywhere is the source run
    everywhere = model.logits(**target, patches=[jaxflow.Patch("resid_pre", 0, np.arange(t))], source=source)
    np.testing.assert_allclose(everywhere[0], model.logits(**source), atol=1e-5)
    assert np.abs(np.asarray(everywhere[0]) - base).max() > 1e-2


def test_patches_with_knockouts_regions_and_errors(twins):
    _, model, target, source = setup(twins, "llava_next")
    t = target["input_ids"].shape[1]
    cut = jaxflow.Knockout([1, 2, 3], [t - 1], layers=[1, 2])
    patches = [jaxflow.Patch("attn_out", [1], [t - 2]), jaxflow.Patch("mlp_out", [0, 1], [t - 3, t - 1])]
    both = np.asarray(model.logits(**target, knockouts=[cut], patches=patches, source=source))
    for k, p in enumerate(patches):  # one knockout applies alongside each patch
        one = np.asarray(model.logits(**target, knockouts=[cut], patches=[p], source=source))[0]
        np.testing.assert_allclose(both[k], one, atol=1e-5)  # K = 2 vs 1: other vectorized arithmetic
        assert np.abs(both[k] - np.asarray(model.logits(**target, patches=[p], source=source))[0]).max() > 1e-4
    paired = model.logits(**target, knockouts=[cut, jaxflow.Knockout([1], [t - 2])], patches=patches, source=source)
    np.testing.assert_allclose(np.asarray(paired)[0], both[0], atol=1e-6)
    # region names resolve per row, as a Knockout's do
    regions = [Regions({"question": np.arange(t - 6, t)})]
    named = stack_patches([jaxflow.Patch("z", 1, "question", heads=[2])], 1, t, 3, 4, regions)
    explicit = stack_patches([jaxflow.Patch("z", 1, np.arange(t - 6, t), heads=[2])], 1, t, 3, 4)
    for a, b in zip(jax.tree.leaves(named), jax.tree.leaves(explicit), strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="2 and 3 configurations"):
        model.logits(**target, knockouts=[cut] * 2, patches=patches + patches[:1], source=source)
    with pytest.raises(ValueError, match=r"source: shape \(1, \d+\) \[batch, seq\] differs"):
        model.logits(**target, patches=patches, source={**source, "input_ids": source["input_ids"][:, 1:],
                                                        "attention_mask": source["attention_mask"][:, 1:]})
    with pytest.raises(ValueError, match="patching needs both"):
        model.logits(**target, patches=patches)
    with pytest.raises(ValueError, match="patches\\[0\\].site: 'resid_post' is not one of"):
        model.logits(**target, patches=[jaxflow.Patch("resid_post", 0, [1])], source=source)
    with pytest.raises(ValueError, match="patches\\[0\\].heads: heads select per-head outputs"):
        model.logits(**target, patches=[jaxflow.Patch("mlp_out", 0, [1], heads=[0])], source=source)
    with pytest.raises(ValueError, match="patches\\[0\\].layers: layers \\[7\\] out of range"):
        model.logits(**target, patches=[jaxflow.Patch("mlp_out", 7, [1])], source=source)
    with pytest.raises(ValueError, match="patches\\[0\\].positions: region 'image' needs the model called with"):
        model.logits(**target, patches=[jaxflow.Patch("mlp_out", 0, "image")], source=source)


@pytest.mark.parametrize("kind", ["llava", "interleave"])
def test_attribution_matches_torch_autograd(twins, kind):
    hf, model, target, source = setup(twins, kind)
    token = 17
    sites = ("resid_pre", "attn_out", "mlp_out", "z")
    ours = model.attribution(**target, source=source, token=token, sites=sites)
    logits, acts, zeros = hf_run(hf, target, grads=True)
    _, src, _ = hf_run(hf, source)
    p = torch.softmax(logits[0, -1], -1)[token]
    n = model.config.text.num_layers
    keys = [(s, i) for s in sites for i in range(n)]
    grads = dict(zip(keys, torch.autograd.grad(p, [zeros[k] for k in keys]), strict=True))
    for site in sites:
        ref = np.stack([((src[site][i] - acts[site][i]) * grads[(site, i)]).sum(-1).detach().numpy()
                        for i in range(n)], axis=1)  # [B, L, T] ("z": [B, L, T, H])
        assert ours[site].shape == ref.shape and ours[site].dtype == np.float32
        close(ours[site], ref, tol=1e-5)
        assert np.abs(ref).max() > 1e-6, site  # something to compare


def test_incremental_equals_full(twins):
    _, model, target, _ = setup(twins, "llava_next")
    inputs = model.prepare(**target)
    t = target["input_ids"].shape[1]
    image = np.flatnonzero(target["input_ids"][0] == tiny.IMAGE_TOKEN)
    last, token = np.asarray([t - 1]), np.asarray([17])
    # two suffix buckets: from the image on, and the last 4 positions (windows from layers 0, 1 and 2)
    patches = [jaxflow.Patch("resid_pre", [1], image[1:4]), jaxflow.Patch("resid_pre", [1, 2], image[:3]),
               jaxflow.Patch("mlp_out", [0], image[:2]), jaxflow.Patch("attn_out", [0, 1], [t - 4, t - 1]),
               jaxflow.Patch("mlp_out", [2], [t - 3, t - 1]), jaxflow.Patch("z", [1, 2], [t - 4, t - 2], heads=[0, 3]),
               jaxflow.Patch("z", [2], [t - 3, t - 1], heads=[2])]
    cuts = [jaxflow.Knockout(image[:4], [t - 1], layers=[1, 2])] + [jaxflow.Knockout([], [])] * (len(patches) - 1)
    noise = jaxflow.Noise(image[: len(image) // 2], seed=3)
    # ROME's restoration under a knockout: the noised target, the clean run's activations patched in
    knock, patch, acts, offset = model.interventions(inputs, None, cuts, patches, target, noise)
    full = engine.knockout_probs(model.module, inputs, knock, last, token, method="full", patch=patch, source=acts,
                                 offset=offset)
    inc = engine.knockout_probs(model.module, inputs, knock, last, token, method="incremental", patch=patch,
                                source=acts, offset=offset)
    np.testing.assert_allclose(inc[0], full[0], atol=1e-6, rtol=0)
    np.testing.assert_array_equal(inc[1], full[1])
    assert np.ptp(full[0]) > 1e-4  # the configurations differ
    # the engine's full recomputation is the model's forward
    logits = model.logits(**target, knockouts=cuts, patches=patches, source=target, noise=noise)
    p = jax.nn.softmax(np.asarray(logits)[:, 0, t - 1], axis=-1)[:, 17]
    np.testing.assert_allclose(full[0][:, 0], p, atol=1e-6)
