"""The notebook face (issue 27) against what the engine and transformers already compute: `Model.sample`, `batch`,
Model calls on a Sample, knockouts by region name, `run_with_cache` (TransformerLens names) against transformers with
PyTorch hooks, `answer_prob` against the sweep's p_base, `logit_lens` against the engine's lens, the patch sweep
against explicit knockouts, and `plot.on_image`."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np  # noqa: E402
import PIL.Image  # noqa: E402
import pytest  # noqa: E402
import tiny  # noqa: E402
from test_parity import hf_forward  # noqa: E402

import jaxflow  # noqa: E402
from jaxflow import names  # noqa: E402
from jaxflow.inputs.regions import build_sample  # noqa: E402
from jaxflow.sweep import engine  # noqa: E402
from jaxflow.world import scene as sc  # noqa: E402

QUESTION = "Is the circle red or blue?"


@pytest.fixture(scope="module")
def toy(toy_llava_dir):
    """The trained toy LLaVA-1.5 and a scene: a large red circle and a small blue square."""
    model = jaxflow.load(toy_llava_dir)
    objs = sc.place(np.random.default_rng(0), [sc.Obj("o0", "circle", "red", "solid", "large"),
                                               sc.Obj("o1", "square", "blue", "solid", "small")])
    image = sc.render(sc.Scene("s", sc.IMAGE_SIZE, sc.IMAGE_SIZE, (200, 200, 200), tuple(objs)))
    return model, image, {"circle": objs[0].box}


@pytest.fixture(scope="module")
def next_toy(toy_model_dir):
    """A tiny random LLaVA-NeXT with a tokenizer, and a wide image."""
    rng = np.random.default_rng(1)
    image = PIL.Image.fromarray(rng.integers(0, 256, (40, 90, 3), dtype=np.uint8))
    return jaxflow.load(toy_model_dir), image


def test_sample_is_what_the_sweep_builds(toy):
    model, image, boxes = toy
    s = model.sample(image, QUESTION, boxes, options=("red", "blue"))
    ref = build_sample(model.config, model.tokenizer, image, QUESTION, mode=model.prompt_mode,
                       template=model.default_template, boxes=list(boxes.values()),
                       option_spans=((QUESTION.index("red"), QUESTION.index("red") + 3),
                                     (QUESTION.index("blue"), QUESTION.index("blue") + 4)),
                       object_names=["circle"], settings=model.processor)
    np.testing.assert_array_equal(s.input_ids[0], ref.input_ids)
    np.testing.assert_array_equal(s.pixel_values, ref.pixel_values)
    assert sorted(s.regions) == sorted(ref.regions)
    for name in ref.regions:
        np.testing.assert_array_equal(s.regions[name], ref.regions[name])
    assert {"central_object", "true_option", "false_option", "related_image_patches"} <= set(s.regions)
    assert len(s.image_rects) == len(s.image_positions) == len(s.layout)
    # a path and an array give the same sample as the PIL image
    arr = model.sample(np.asarray(image), QUESTION, list(boxes.values()))
    np.testing.assert_array_equal(arr.pixel_values, s.pixel_values)
    assert "central_object" not in arr.regions  # a list of boxes names no object
    with pytest.raises(ValueError, match="options: the false option 'green'"):
        model.sample(image, QUESTION, boxes, options=("red", "green"))
    with pytest.raises(FileNotFoundError, match="image: no such file"):
        model.sample("/nonexistent.png", QUESTION)


def test_model_calls_take_a_sample_or_a_batch(next_toy):
    model, image = next_toy
    a = model.sample(image, "Is the jar full or empty?")
    b = model.sample(image.resize((60, 60)), "What is on the table?")
    both = jaxflow.batch([a, b])
    assert both.input_ids.shape == (2, max(len(a), len(b)))
    logits = np.asarray(model.logits(both))
    for row, s in enumerate((a, b)):
        alone = np.asarray(model.logits(s))
        ref = np.asarray(model.logits(s.input_ids, s.pixel_values, s.image_sizes))
        np.testing.assert_array_equal(alone, ref)
        np.testing.assert_allclose(logits[row, : len(s)], alone[0], atol=1e-4)  # padded: other tiles
    gen = model.generate(both, max_new_tokens=4, eos_token_id=-5)
    ref = model.generate(both.input_ids, both.pixel_values, both.image_sizes, both.attention_mask,
                         max_new_tokens=4, eos_token_id=-5)
    np.testing.assert_array_equal(gen.tokens, ref.tokens)
    with pytest.raises(ValueError, match="carries its own"):
        model.logits(a, a.pixel_values)


def test_knockouts_by_region_name(next_toy):
    model, image = next_toy
    a, b = model.sample(image, "Is the jar full or empty?"), model.sample(image.resize((90, 90)), "Is it?")
    both = jaxflow.batch([a, b])
    named = model.logits(both, knockouts=[jaxflow.Knockout("image", "last", layers=[0, 1])])
    for row, s in enumerate((a, b)):
        explicit = model.logits(s, knockouts=[jaxflow.Knockout(s.regions["image"], s.last, layers=[0, 1])])
        np.testing.assert_allclose(np.asarray(named)[0, row, : len(s)], np.asarray(explicit)[0, 0], atol=1e-4)
    masks = model.knockout_masks([jaxflow.Knockout("image", "last")], *both.input_ids.shape, regions=both.regions)
    for row, s in enumerate((a, b)):
        assert np.flatnonzero(masks.source[0, row]).tolist() == s.regions["image"].tolist()
        assert np.flatnonzero(masks.target[0, row]).tolist() == [len(s) - 1]
    uncut = np.asarray(model.logits(both))
    assert np.abs(np.asarray(named)[0] - uncut).max() > 1e-4  # the cut changes something
    with pytest.raises(ValueError, match="row 0 has no region 'image_grid_nope'"):
        model.logits(both, knockouts=[jaxflow.Knockout("image_grid_nope", "last")])
    with pytest.raises(ValueError, match="needs the model called with a Sample"):
        model.logits(a.input_ids, a.pixel_values, a.image_sizes, knockouts=[jaxflow.Knockout("image", "last")])


def test_run_with_cache_matches_transformers_hooks(twins):
    hf, model = twins("llava_next", "llava-hf", kv_heads=2)
    ids, pv, isz, _ = tiny.make_inputs(model.config, image_sizes=((100, 30),))
    lm = hf.model.language_model
    seen = {}
    hooks = [hf.model.multi_modal_projector.register_forward_hook(lambda m, i, o: seen.__setitem__("image", o))]
    for i, layer in enumerate(lm.layers):
        hooks.append(layer.self_attn.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("attn", i), o[0])))
        hooks.append(layer.mlp.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(("mlp", i), o)))
    try:
        ref = hf_forward(hf, ids, pv, isz, output_hidden_states=True, output_attentions=True)
    finally:
        for h in hooks:
            h.remove()
    n = model.config.text.num_layers
    logits, cache = model.run_with_cache(ids, pixel_values=pv, image_sizes=isz)
    assert set(cache) == set(names.all_names(n))
    scale = max(float(np.abs(h.numpy()).max()) for h in ref.hidden_states)
    close = lambda ours, theirs: np.abs(np.asarray(ours) - theirs.numpy()).max() < 1e-5 * max(scale, 1)  # noqa: E731
    assert np.abs(np.asarray(logits) - ref.logits.numpy()).max() < 1e-4
    for i in range(n):
        assert close(cache[f"blocks.{i}.hook_resid_pre"], ref.hidden_states[i]), i
        assert close(cache[f"blocks.{i}.hook_attn_out"], seen[("attn", i)]), i
        assert close(cache[f"blocks.{i}.hook_mlp_out"], seen[("mlp", i)]), i
        assert close(cache[f"blocks.{i}.hook_resid_mid"], ref.hidden_states[i] + seen[("attn", i)]), i
        assert np.abs(np.asarray(cache[f"blocks.{i}.attn.hook_pattern"]) - ref.attentions[i].numpy()).max() < 1e-5
    for i in range(n - 1):
        np.testing.assert_array_equal(cache[f"blocks.{i}.hook_resid_post"], cache[f"blocks.{i + 1}.hook_resid_pre"])
    assert close(cache["ln_final.hook_normalized"], ref.hidden_states[-1])  # transformers' last state is normed
    assert close(cache["hook_image_embeds"], seen["image"][: cache["hook_image_embeds"].shape[0]])
    # only what is asked for, and the same under knockouts as forward gives
    knock = [jaxflow.Knockout([3, 4, 5], [9, 10], layers=[1]), jaxflow.Knockout([2], [8])]
    logits_k, few = model.run_with_cache(ids, ["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"], knock,
                                         pixel_values=pv, image_sizes=isz)
    out = model.forward(ids, pv, isz, knockouts=knock, return_hidden_states=True, return_attentions=True)
    assert list(few) == ["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"]
    # two compiled programs (different outputs, different fusions): float32 rounding apart
    np.testing.assert_allclose(few["blocks.1.hook_resid_post"], out.hidden_states[:, 2], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(few["blocks.0.attn.hook_pattern"], out.attentions[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(logits_k, out.logits, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="layer 9 out of range"):
        model.run_with_cache(ids, ["blocks.9.hook_resid_pre"], pixel_values=pv, image_sizes=isz)
    with pytest.raises(ValueError, match="unknown activation 'blocks.0.hook_q'"):
        model.run_with_cache(ids, ["blocks.0.hook_q"], pixel_values=pv, image_sizes=isz)


def test_answer_prob_is_the_sweeps_p_base(toy):
    model, image, boxes = toy
    s = model.sample(image, QUESTION, boxes)
    base = engine.base_run(model.module, model.prepare(s), s.last)  # what the sweep records as p_base
    token = int(np.argmax(np.asarray(base.probs[0])))
    assert token == jaxflow.greedy_token(model, s)[0]
    p = jaxflow.answer_prob(model.logits(s), s, token)
    np.testing.assert_allclose(p, np.asarray(base.probs)[:, token], rtol=1e-6)
    cut = model.logits(s, knockouts=[jaxflow.Knockout("image", "last")])
    change = jaxflow.relative_change(jaxflow.answer_prob(cut, s, token), p)
    assert change.shape == (1, 1) and change[0, 0] < -1  # the answer needs the image
    np.testing.assert_allclose(change, (jaxflow.answer_prob(cut, s, token) - p) / p * 100)


def test_logit_lens_is_the_engines(toy):
    model, image, boxes = toy
    s = model.sample(image, QUESTION, boxes)
    tokens = np.asarray([[5, 17, 300]])
    pre = model.prefill(s, collect_hidden=True)
    ref = np.asarray(engine.logit_lens(model.module, pre.hidden, s.last, tokens))  # [2, L + 1, B, N]
    for normed in (False, True):
        lens = jaxflow.logit_lens(model, s, tokens[0], normed=normed)
        np.testing.assert_allclose(lens.probs[:, :, 0], ref[int(normed)], rtol=1e-5, atol=1e-8)
    image_lens = jaxflow.logit_lens(model, s, positions="image", top=3)
    n = model.config.text.num_layers
    assert image_lens.top_tokens.shape == (n + 1, 1, len(s.image_positions), 3)
    _, cache = model.run_with_cache(s, ["blocks.2.hook_resid_pre"])
    h = cache["blocks.2.hook_resid_pre"][:, s.image_positions]  # layer index 2 = after decoder layer 1
    lm = model.module.language_model
    probs = np.asarray(jax_softmax(lm.unembed(lm.norm(h))))
    np.testing.assert_array_equal(image_lens.top_tokens[2, 0, :, 0], probs[0].argmax(-1))
    np.testing.assert_allclose(image_lens.top_probs[2, 0, :, 0], probs[0].max(-1), rtol=1e-5)
    assert len(image_lens.top_words(model.tokenizer, 2)) == len(s.image_positions)


def jax_softmax(x):
    import jax

    return jax.nn.softmax(x.astype("float32"), axis=-1)


@pytest.mark.parametrize("groups", ["patch", "row", (2, 2)])
def test_patch_sweep_equals_explicit_knockouts(toy, groups):
    model, image, boxes = toy
    s = model.sample(image, QUESTION, boxes)
    layers = [1, 2, 3]
    sweep = jaxflow.patch_sweep(model, s, layers=layers, groups=groups)
    members = jaxflow.patch_groups(s, groups)
    assert np.array_equal(np.sort(np.concatenate(members)), np.sort(s.image_positions[~np.isnan(s.image_rects[:, 0])]))
    explicit = model.logits(s, knockouts=[jaxflow.Knockout(g, "last", layers=layers) for g in members])
    p = jaxflow.answer_prob(explicit, s, sweep.token)[:, 0]
    np.testing.assert_allclose(sweep.p, p, rtol=1e-4, atol=1e-7)
    change = jaxflow.relative_change(p, sweep.p_base)
    for g, pos in enumerate(members):
        np.testing.assert_allclose(sweep.values[np.isin(s.image_positions, pos)], change[g], rtol=1e-3, atol=1e-4)
    assert np.nanmax(np.abs(sweep.values)) > 0.1  # the cuts change the answer probability


def test_patch_groups_on_anyres(next_toy):
    model, image = next_toy
    s = model.sample(image, "Is the jar full or empty?")
    seen = s.image_positions[~np.isnan(s.image_rects[:, 0])]
    for groups in ("patch", "row", (3, 4)):
        members = jaxflow.patch_groups(s, groups)
        flat = np.concatenate(members)
        assert len(flat) == len(np.unique(flat)) and set(flat) == set(seen), groups  # a partition of what is seen
    newline = s.regions["image_newline"]
    assert not np.isin(newline, np.concatenate(jaxflow.patch_groups(s))).any()
    with pytest.raises(ValueError, match="groups: expected"):
        jaxflow.patch_groups(s, "column")


def test_on_image_draws_each_position_in_its_rectangle(next_toy):
    model, image = next_toy
    s = model.sample(image, "Is the jar full or empty?", boxes={"jar": (10, 5, 30, 20)})
    values = np.arange(len(s.image_positions), dtype=float)
    ax = jaxflow.plot.on_image(s, values)
    cells = ax.collections[0]
    grid = (s.layout.crop > 0) & ~np.isnan(s.image_rects[:, 0])  # "auto" on anyres: the grid's patches
    np.testing.assert_array_equal(cells.get_array(), values[grid])
    first = cells.get_paths()[0].vertices  # the first drawn rectangle, in image pixels
    x0, y0, x1, y1 = s.image_rects[grid][0]
    assert np.allclose(first.min(0), (x0, y0)) and np.allclose(first.max(0), (x1, y1))
    base = jaxflow.plot.on_image(s, np.zeros(len(s)), view="base", colorbar=False)  # [T] values are accepted
    assert len(base.collections[0].get_array()) == int(((s.layout.crop == 0) & ~np.isnan(s.image_rects[:, 0])).sum())
    with pytest.raises(ValueError, match="values: expected"):
        jaxflow.plot.on_image(s, values[:-1])
    fig = jaxflow.plot.layers_on_image(s, np.stack([values, -values]), title="t")
    assert [a.get_title() for a in fig.axes if a.get_title()] == ["layer 0", "layer 1"]

