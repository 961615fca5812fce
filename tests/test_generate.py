"""Greedy generation with the KV cache returns transformers' tokens and first-token distribution."""

import numpy as np
import pytest
import tiny
from test_parity import hf_greedy

EOS = 2


@pytest.mark.parametrize("kind,kv", [("llava", 2), ("llava_next", 4)])
def test_greedy_generation_matches_transformers(twins, kind, kv):
    hf, model = twins(kind, "llava-hf", kv_heads=kv)
    sizes = ((42, 42), (100, 30), (30, 100)) if kind == "llava_next" else ((42, 42),) * 3
    ids, pv, isz, mask = tiny.make_inputs(model.config, image_sizes=sizes, num_text=[5, 3, 8], seed=3)
    steps = 6
    out = model.generate(ids, pv, isz, attention_mask=mask, max_new_tokens=steps, eos_token_id=EOS)
    assert out.tokens.shape[0] == len(ids) and out.tokens.shape[1] <= steps
    for row in range(len(ids)):
        ref_tokens, ref_probs = hf_greedy(hf, ids, pv, isz, mask, row, steps, EOS)
        ours = out.tokens[row, : len(ref_tokens)]
        np.testing.assert_array_equal(ours, ref_tokens)
        assert out.finished[row] == (EOS in ref_tokens)
        if len(ref_tokens) < out.tokens.shape[1]:  # finished rows are filled with eos
            assert (out.tokens[row, len(ref_tokens):] == EOS).all()
        assert np.abs(out.first_token_probs[row] - ref_probs).max() < 1e-5


def test_generate_rejects_left_padding(twins):
    _, model = twins("llava", "llava-hf", kv_heads=2)
    ids, pv, _, mask = tiny.make_inputs(model.config)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="right-padded"):
        model.generate(ids, pv, attention_mask=mask)


def test_generate_stops_on_any_eos_id(twins):
    _, model = twins("llava", "llava-hf", kv_heads=2)
    ids, pv, _, mask = tiny.make_inputs(model.config, image_sizes=((42, 42),) * 3, num_text=[5, 3, 8], seed=3)
    free = model.generate(ids, pv, attention_mask=mask, max_new_tokens=4, eos_token_id=EOS)
    stop = int(free.tokens[0, 0])  # row 0's first token ends its answer when it is an eos id
    assert stop != EOS and not free.finished.any()
    out = model.generate(ids, pv, attention_mask=mask, max_new_tokens=4, eos_token_id=[EOS, stop])
    assert out.finished[0] and out.tokens[0, 0] == stop and (out.tokens[0, 1:] == EOS).all()  # filled: first id
    for row in range(len(ids)):  # every row is the free decoding up to its first eos id
        end = next((i for i, t in enumerate(free.tokens[row]) if t in (EOS, stop)), None)
        assert out.finished[row] == (end is not None)
        n = 4 if end is None else end + 1
        np.testing.assert_array_equal(out.tokens[row, :n], free.tokens[row, :n])


def test_generate_continues_a_shared_prefill(twins):
    """The sweep's one prefill per batch: decoding from the base run gives generate's own tokens, and the
    base run's hidden states, keys and values are those of a plain forward of the prompt."""
    from jaxflow.sweep import engine

    _, model = twins("llava", "llava-hf", kv_heads=2)
    ids, pv, _, mask = tiny.make_inputs(model.config, image_sizes=((42, 42),) * 3, num_text=[5, 3, 8], seed=3)
    inputs = model.prepare(ids, pv, attention_mask=mask)
    own = model.generate(inputs, max_new_tokens=5, eos_token_id=EOS)
    base = engine.base_run(model.module, inputs, mask.sum(1) - 1)
    shared = model.generate(inputs, max_new_tokens=5, eos_token_id=EOS, prefill=base)
    np.testing.assert_array_equal(shared.tokens, own.tokens)
    np.testing.assert_array_equal(shared.finished, own.finished)
    np.testing.assert_array_equal(shared.first_token_probs, np.asarray(base.probs))
    assert np.abs(shared.first_token_probs - own.first_token_probs).max() < 1e-6
    plain = model.forward(ids, pv, attention_mask=mask, return_hidden_states=True)
    np.testing.assert_allclose(np.asarray(base.hidden), np.asarray(plain.hidden_states), atol=1e-5)
    last = np.asarray(plain.logits)[np.arange(len(ids)), mask.sum(1) - 1]
    np.testing.assert_allclose(np.asarray(base.logits), last, atol=1e-5)
    assert len(base.k) == len(base.v) == model.config.text.num_layers  # one array per layer
    assert {a.shape for a in base.k + base.v} == {(ids.shape[0], 2, ids.shape[1], model.config.text.head_dim)}
    no_hidden = model.prefill(inputs)
    assert no_hidden.hidden is None
    np.testing.assert_allclose(np.asarray(no_hidden.k), np.asarray(base.k), atol=1e-6)
    with pytest.raises(ValueError, match="prefill: keys of shape"):
        model.generate(inputs.input_ids[:2], pv[:2], attention_mask=mask[:2], prefill=base)


def test_decoding_across_phases_matches_transformers(twins):
    """40 new tokens without eos run three phases of growing cache (16, then 39 slots; the tokens that cross a
    phase's end continue from the grown cache), the rows of different lengths included; every token is
    transformers' greedy token."""
    from jaxflow.model import decode_phases

    hf, model = twins("llava", "llava-hf", kv_heads=2)
    ids, pv, isz, mask = tiny.make_inputs(model.config, image_sizes=((42, 42),) * 3, num_text=[5, 3, 8], seed=3)
    steps = 40
    assert len(decode_phases(steps - 1)) == 2
    out = model.generate(ids, pv, isz, attention_mask=mask, max_new_tokens=steps, eos_token_id=[])
    assert out.tokens.shape == (len(ids), steps) and not out.finished.any()
    for row in range(len(ids)):
        ref_tokens, _ = hf_greedy(hf, ids, pv, isz, mask, row, steps, None)
        assert len(ref_tokens) == steps
        np.testing.assert_array_equal(out.tokens[row], ref_tokens)


def test_decoding_step_updates_the_cache_in_place(twins):
    """What XLA allocates for a decoding phase: the grown caches are its outputs, and its temporaries stay below
    one layer's cache (a step that copied the cache, as a step that reads it before writing it does, needs the
    whole cache again as temporaries)."""
    import jax.numpy as jnp

    from jaxflow.model import decode_phase

    _, model = twins("llava", "llava-hf", kv_heads=2)
    ids, pv, _, mask = tiny.make_inputs(model.config, image_sizes=((42, 42),) * 3, num_text=[5, 3, 8], seed=3)
    pre = model.prefill(ids, pv, attention_mask=mask)
    b, kvh, t, hd = pre.k[0].shape
    size = 512
    empty = (jnp.zeros((b, kvh, 0, hd), jnp.float32),) * len(pre.k)
    lowered = decode_phase.lower(model.module, pre.k, pre.v, jnp.asarray(mask.sum(1), jnp.int32),
                                 jnp.asarray([-1], jnp.int32), jnp.int32(0), jnp.zeros((b, size + 1), jnp.int32),
                                 jnp.zeros(b, bool), empty, empty, size=size)
    memory = lowered.compile().memory_analysis()
    layer_cache = b * kvh * size * hd * 4  # bytes of one layer's keys
    assert memory.output_size_in_bytes >= 2 * len(pre.k) * layer_cache
    assert memory.temp_size_in_bytes < layer_cache, memory.temp_size_in_bytes
