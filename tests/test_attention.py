"""The tiled attention (online softmax over score tiles, causal tiles skipped) against a dense softmax
over the concatenated keys, and the whole model tiled against untiled and against transformers."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxflow.nn import decoder


def dense(q, blocks):
    """Reference: one softmax over all keys (prefix, then own), masked scores at the float32 minimum."""
    b, t, h, hd = q.shape
    k = np.concatenate([np.asarray(kb) for kb, _, _ in blocks], axis=2)  # [B, K, S, hd]
    v = np.concatenate([np.asarray(vb) for _, vb, _ in blocks], axis=2)
    mask = np.concatenate([np.broadcast_to(np.asarray(m), (b, h, t, m.shape[-1])) for _, _, m in blocks], axis=-1)
    g = h // k.shape[1]
    k, v = np.repeat(k, g, axis=1), np.repeat(v, g, axis=1)  # [B, H, S, hd]
    s = np.einsum("bthd,bhsd->bhts", np.asarray(q), k) * hd**-0.5
    s = np.where(mask, s, np.finfo(np.float32).min)
    w = np.exp(s - s.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    return np.einsum("bhts,bhsd->bthd", w, v), w


def inputs(seed, b=2, t=13, h=4, kvh=2, hd=8, prefix=0, per_head=False):
    r = np.random.RandomState(seed)
    q = r.randn(b, t, h, hd).astype(np.float32)
    kv = lambda n: (r.randn(b, kvh, n, hd).astype(np.float32), r.randn(b, kvh, n, hd).astype(np.float32))  # noqa: E731
    heads = h if per_head else 1
    own = np.tril(np.ones((t, t), bool))[None, None] & (r.rand(b, heads, t, t) > 0.3)  # causal, with random cuts
    own[..., np.arange(t), np.arange(t)] = True  # every query keeps a key
    blocks = [(*kv(t), own)]
    if prefix:
        blocks.insert(0, (*kv(prefix), r.rand(b, heads, t, prefix) > 0.4))
    return jnp.asarray(q), [tuple(jnp.asarray(a) for a in blk) for blk in blocks]


def dots(tile, q, blocks):
    jaxpr = jax.make_jaxpr(lambda q, blocks: decoder.tiled_attention(q, blocks, tile))(q, blocks)
    return sum(e.primitive.name == "dot_general" for e in jaxpr.eqns)


@pytest.mark.parametrize("prefix", [0, 9])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("kvh", [4, 2, 1])
def test_tiles_equal_dense_softmax(prefix, per_head, kvh):
    q, blocks = inputs(prefix + kvh, kvh=kvh, prefix=prefix, per_head=per_head)
    ref_out, ref_w = dense(q, blocks)
    for tile in (None, 2 * 4 * 16, 2 * 4 * 30):  # one tile; tiles of 4 x 4 scores; 5 or 6 queries
        out, w = decoder.tiled_attention(q, blocks, tile)
        np.testing.assert_allclose(np.asarray(out), ref_out, atol=2e-6)
        np.testing.assert_allclose(np.asarray(w), ref_w, atol=2e-6)
    # the small tiles do tile: more score and value matmuls than one tile per block
    assert dots(2 * 4 * 16, q, blocks) > dots(None, q, blocks) == 2 * len(blocks)


def test_tiles_skip_the_causal_upper_triangle():
    """Own keys after a query tile are never scored: with 4 query tiles of 4, the own block has 1+2+3+4 tiles."""
    q, blocks = inputs(0, t=16)
    assert dots(2 * 4 * 16, q, blocks) == 2 * (1 + 2 + 3 + 4)
    out, w = decoder.tiled_attention(q, blocks, 2 * 4 * 16)
    assert (np.asarray(w)[..., np.triu_indices(16, 1)[0], np.triu_indices(16, 1)[1]] == 0).all()


def test_tiled_model_equals_untiled_and_transformers_with_knockouts(twins, monkeypatch):
    """The whole tiny model (GQA, knockouts, a sweep's incremental recomputation) with tiles of 4 x 4
    scores per (batch, head) gives transformers' logits and attention weights, zero on cut edges."""
    import tiny

    hf, model = twins("llava", "llava-hf", kv_heads=2)
    ids, pv, isz, kos = tiny.knockout_case(model)
    monkeypatch.setenv("JAXFLOW_CPU_ATTENTION", "0")
    jax.clear_caches()
    untiled = tiny.run_case(model, ids, pv, isz, kos)
    monkeypatch.setattr(decoder, "score_tile", lambda: len(ids) * model.config.text.num_heads * 16)
    jax.clear_caches()
    try:
        assert len(decoder._tiles(ids.shape[1], 4)) > 2  # the tiny sequence really is cut into tiles
        tiled = tiny.run_case(model, ids, pv, isz, kos)
    finally:
        monkeypatch.undo()
        jax.clear_caches()
    for a, b in zip(untiled, tiled, strict=True):
        np.testing.assert_allclose(a, b, atol=2e-5)
    logits, attn, inc, full = tiled
    np.testing.assert_allclose(inc, full, atol=1e-6)
    tiny.check_case(hf, model, ids, pv, isz, kos, logits, attn)
