"""Knockouts: jaxflow's compact masks vs transformers given additive float masks for the same cut
edges, zero attention on cut edges, and outputs changing only where causality allows."""

import numpy as np
import pytest
import tiny
import torch

import jaxflow
from jaxflow import DenseKnockout, Knockout
from jaxflow.reference import dense_cut, embeddings, run_layers

TOL = 1e-4


def cut_tensor(ko: Knockout, b, t, num_layers, num_heads):
    return dense_cut(ko.source, ko.target, ko.layers, ko.heads, b, t, num_layers, num_heads)


@pytest.fixture(scope="module", params=[("llava", 4), ("llava", 2), ("llava_next", 2)],
                ids=["1.5-mha", "1.5-gqa", "next-gqa"])
def setup(request, twins):
    kind, kv = request.param
    hf, model = twins(kind, "llava-hf", kv_heads=kv)
    ids, pv, isz, _ = tiny.make_inputs(model.config, image_sizes=((100, 30),), num_text=6)
    t = ids.shape[1]
    image = np.flatnonzero(ids[0] == tiny.IMAGE_TOKEN).tolist()
    question = list(range(image[-1] + 1, t - 1))
    last = [t - 1]
    return hf, model, ids, pv, isz, image, question, last


def specs(image, question, last):
    return [
        Knockout(source=image, target=question, layers=[0, 1]),  # image -> question, window
        Knockout(source=question, target=last),  # question -> last, all layers
        Knockout(source=image, target=last, layers=[1], heads=[0, 3]),  # head subset
        Knockout(source=last, target=last, layers=[2]),  # last -> last
        Knockout(source=image[:3], target=question[:2] + last, layers=[0, 2]),
    ]


def test_knockouts_match_transformers_with_float_masks(setup):
    hf, model, ids, pv, isz, image, question, last = setup
    cfg = model.config.text
    kos = specs(image, question, last)
    out = model.forward(ids, pv, isz, knockouts=kos, return_attentions=True)
    logits, attn = np.asarray(out.logits), np.asarray(out.attentions)
    assert logits.shape == (len(kos),) + ids.shape + (cfg.vocab_size,)
    embeds = embeddings(hf, ids, pv, isz)
    base = np.asarray(model.logits(ids, pv, isz))
    errs = []
    for k, ko in enumerate(kos):
        cut = cut_tensor(ko, *ids.shape, cfg.num_layers, cfg.num_heads)
        ref_logits, ref_attn = run_layers(hf, embeds, cut)
        errs.append(np.abs(logits[k] - ref_logits).max())
        assert errs[-1] < TOL, (k, errs[-1])
        assert np.abs(attn[k] - ref_attn).max() < 1e-5
        # cut edges carry exactly zero attention, in both implementations
        assert (attn[k][cut] == 0).all() and (ref_attn[cut] == 0).all()
        # the knockout had an effect (so the comparison is not vacuous)
        assert np.abs(logits[k] - base).max() > 1e-3
    print(f"knockout parity: max |logits diff| = {max(errs):.2e}")


def test_all_layer_cut_equals_transformers_forward_with_4d_float_mask(setup):
    """With the cut in every layer, transformers' own forward takes the 4D float mask directly."""
    hf, model, ids, pv, isz, image, question, last = setup
    cfg = model.config.text
    ko = Knockout(source=image, target=question + last)
    cut = cut_tensor(ko, *ids.shape, cfg.num_layers, cfg.num_heads)[0][:, :1]  # [B, 1, T, T]
    blocked = torch.triu(torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool), 1) | torch.as_tensor(cut)
    float_mask = torch.zeros(blocked.shape).masked_fill(blocked, torch.finfo(torch.float32).min)
    args = {"input_ids": torch.tensor(ids), "pixel_values": torch.tensor(pv)}
    if isz is not None:
        args["image_sizes"] = torch.tensor(isz)
    with torch.no_grad():
        ref = hf(**args, attention_mask=float_mask).logits.numpy()
        # REFERENCE.md pitfall: under eager a boolean 4D mask is *added* (True -> +1.0), blocking nothing
        allowed = ~blocked
        ref_bool = hf(**args, attention_mask=allowed).logits.numpy()
    ours = np.asarray(model.logits(ids, pv, isz, knockouts=[ko]))[0]
    assert np.abs(ours - ref).max() < TOL
    assert np.abs(ours - ref_bool).max() > 1e-3


def test_outputs_change_only_where_causality_allows(setup):
    _, model, ids, pv, isz, image, question, last = setup
    first_layer = 1
    ko = Knockout(source=image, target=question, layers=[first_layer, 2])
    base = model.forward(ids, pv, isz, return_hidden_states=True)
    cut = model.forward(ids, pv, isz, knockouts=[ko], return_hidden_states=True)
    hb, hc = np.asarray(base.hidden_states), np.asarray(cut.hidden_states)[0]
    lb, lc = np.asarray(base.logits), np.asarray(cut.logits)[0]
    t0 = min(question)
    # before the first target position nothing may change, in any layer
    assert np.array_equal(hb[:, :, :t0], hc[:, :, :t0])
    assert np.array_equal(lb[:, :t0], lc[:, :t0])
    # up to the first cut layer's input nothing changes anywhere
    assert np.array_equal(hb[: first_layer + 1], hc[: first_layer + 1])
    # the targets and what follows them do change
    assert np.abs(hb[first_layer + 1, :, t0] - hc[first_layer + 1, :, t0]).max() > 1e-4
    assert np.abs(lb[:, t0:] - lc[:, t0:]).max() > 1e-3


def test_vmapped_specs_equal_one_at_a_time_and_dense_escape_hatch(setup):
    _, model, ids, pv, isz, image, question, last = setup
    kos = specs(image, question, last)
    batched = np.asarray(model.logits(ids, pv, isz, knockouts=kos))
    for k, ko in enumerate(kos):
        single = np.asarray(model.logits(ids, pv, isz, knockouts=[ko]))[0]
        assert np.abs(batched[k] - single).max() < 1e-5
    # the dense escape hatch (per-layer [T, T] masks) computes the same cut as the compact form
    cfg = model.config.text
    mask = cut_tensor(kos[0], *ids.shape, cfg.num_layers, cfg.num_heads)[:, 0, 0]  # [L, T, T]
    mixed = np.asarray(model.logits(ids, pv, isz, knockouts=[DenseKnockout(mask), kos[1]]))
    assert np.abs(mixed[0] - batched[0]).max() < 1e-5
    assert np.abs(mixed[1] - batched[1]).max() < 1e-5


def test_bad_knockout_arguments_are_named(setup):
    _, model, ids, pv, isz, *_ = setup
    t = ids.shape[1]
    with pytest.raises(ValueError, match=r"knockouts\[0\]\.target"):
        model.logits(ids, pv, isz, knockouts=[Knockout(source=[0], target=[t])])
    with pytest.raises(ValueError, match=r"knockouts\[1\]\.layers"):
        model.logits(ids, pv, isz, knockouts=[Knockout([0], [1]), Knockout([0], [1], layers=[99])])
    with pytest.raises(ValueError, match=r"knockouts\[0\]\.heads"):
        model.logits(ids, pv, isz, knockouts=[Knockout([0], [1], heads=[-1])])
    with pytest.raises(ValueError, match=r"knockouts\[0\]\.mask"):
        model.logits(ids, pv, isz, knockouts=[DenseKnockout(np.zeros((1, t, t), bool))])
    assert isinstance(model, jaxflow.Model)
