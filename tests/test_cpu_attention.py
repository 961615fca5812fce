"""The fused CPU attention kernel (jaxflow/nn/cpu_attention.cc) against a dense numpy softmax and XLA's tiled
attention: masks of every kind, GQA, head dims, extra key blocks, vmap, jit, weights and gradients. The kernel
must be built and used here: a silent fallback to XLA's path fails these tests."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_attention import dense

from jaxflow.nn import cpu_attention, decoder


def inputs(seed, b=2, t=45, h=4, kvh=2, hd=32, prefix=0, per_head=False):
    """q [B, Tq, H, hd] and blocks (prefix, own): a causal own mask with random cuts, a left-padded first sample
    (its first rows may attend to nothing), one row cut entirely and one key chunk cut for every row."""
    r = np.random.RandomState(seed)
    q = r.randn(b, t, h, hd).astype(np.float32)
    kv = lambda n: (r.randn(b, kvh, n, hd).astype(np.float32), r.randn(b, kvh, n, hd).astype(np.float32))  # noqa: E731
    heads = h if per_head else 1
    own = np.tril(np.ones((t, t), bool))[None, None] & (r.rand(b, heads, t, t) > 0.3)
    own[..., np.arange(t), np.arange(t)] = True
    own[0, :, :, :5] = False  # left padding: keys 0-4 of sample 0 are invalid
    own[:, :, t // 2] = False  # a row that may attend to no own key
    own[:, :, :, 8:40] = False  # a whole chunk of keys cut
    blocks = [(*kv(t), own)]
    if prefix:
        pre = r.rand(b, heads, t, prefix) > 0.4
        pre[0, :, :3] = False  # rows that attend to nothing at all with the padding above
        blocks.insert(0, (*kv(prefix), pre))
    return jnp.asarray(q), [tuple(jnp.asarray(a) for a in blk) for blk in blocks]


def no_key(blocks, h):
    """[B, H, Tq] True where a row may attend to no key."""
    b = blocks[0][0].shape[0]
    masks = [np.asarray(m) for _, _, m in blocks]
    return ~np.concatenate([np.broadcast_to(m, (b, h, *m.shape[2:])) for m in masks], axis=-1).any(-1)


def uses_kernel(fn, *args) -> bool:
    """Whether fn's lowering (traced afresh: the switch is read at tracing) calls the kernel."""
    return cpu_attention.TARGET in jax.jit(lambda *a: fn(*a)).lower(*args).as_text()


def test_kernel_is_built_and_used(monkeypatch):
    """No g++ or a failed build must fail here, not skip: the other tests would compare XLA with itself."""
    assert cpu_attention.enabled()
    q, blocks = inputs(0)
    assert uses_kernel(decoder.attention, q, blocks)
    assert not uses_kernel(lambda q, blocks: decoder.attention(q, blocks, own=False), q, blocks)  # decoding
    one = [(k[:, :, :1], v[:, :, :1], m[:, :, :1, :1]) for k, v, m in blocks]
    assert not uses_kernel(decoder.attention, q[:, :1], one)  # one query
    assert not uses_kernel(decoder.attention, q.astype(jnp.bfloat16), blocks)
    monkeypatch.setenv("JAXFLOW_CPU_ATTENTION", "0")
    assert not uses_kernel(decoder.attention, q, blocks)


@pytest.mark.parametrize("hd", [8, 32, 40, 64])
@pytest.mark.parametrize("kvh", [4, 2, 1])
@pytest.mark.parametrize("per_head", [False, True])
@pytest.mark.parametrize("prefix", [0, 9])
def test_kernel_equals_dense_softmax_and_xla(hd, kvh, per_head, prefix):
    q, blocks = inputs(hd + kvh, hd=hd, kvh=kvh, per_head=per_head, prefix=prefix)
    ref_out, ref_w = dense(q, blocks)
    out, w = jax.jit(decoder.attention)(q, blocks)
    np.testing.assert_allclose(np.asarray(out), ref_out, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(w), ref_w, atol=1e-5, rtol=1e-5)
    # XLA's tiles agree except on rows that may attend to nothing (it averages the values of its tiles' keys)
    xla_out, xla_w = decoder.tiled_attention(q, blocks)
    some = ~no_key(blocks, q.shape[2])  # [B, H, Tq]
    np.testing.assert_allclose(np.asarray(out).transpose(0, 2, 1, 3)[some],
                               np.asarray(xla_out).transpose(0, 2, 1, 3)[some], atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(w)[some], np.asarray(xla_w)[some], atol=1e-5, rtol=1e-5)
    assert (~some).any()


def test_rows_do_not_depend_on_the_other_rows():
    """Rows [a:] recomputed alone, with keys [0, a) as a prefix block, give the full call's results (the knockout
    engine's partial recomputation relies on it)."""
    q, [(k, v, m)] = inputs(1, t=70, h=8, kvh=2, per_head=True)
    full_out, full_w = decoder.attention(q, [(k, v, m)])
    for a in (1, 8, 13, 33):
        blocks = [(k[:, :, :a], v[:, :, :a], m[:, :, a:, :a]), (k[:, :, a:], v[:, :, a:], m[:, :, a:, a:])]
        assert uses_kernel(decoder.attention, q[:, a:], blocks)
        out, w = decoder.attention(q[:, a:], blocks)
        np.testing.assert_allclose(np.asarray(out), np.asarray(full_out)[:, a:], atol=1e-6, rtol=0)
        np.testing.assert_allclose(np.asarray(w), np.asarray(full_w)[:, :, a:], atol=1e-6, rtol=0)


def test_rows_that_attend_to_nothing_average_all_values():
    q, blocks = inputs(2, prefix=9)
    out, w = decoder.attention(q, blocks)
    b, h, t = np.nonzero(no_key(blocks, q.shape[2]))
    v = np.concatenate([np.asarray(vb) for _, vb, _ in blocks], axis=2)  # [B, K, S, hd]
    g = q.shape[2] // v.shape[1]
    np.testing.assert_allclose(np.asarray(out)[b, t, h], v.mean(2)[b, h // g], atol=1e-6)
    np.testing.assert_allclose(np.asarray(w)[b, h, t], 1 / v.shape[2], rtol=1e-6)


def test_vmap_over_masks_and_leading_dims():
    """The knockout engine vmaps a layer over configurations whose masks differ (and nests vmaps)."""
    q, [(k, v, m)] = inputs(3, per_head=True)
    r = np.random.RandomState(3)
    masks = jnp.asarray(np.asarray(m)[None, None] & (r.rand(2, 3, *m.shape) > 0.2))  # [2, 3, B, H, Tq, S]
    fn = jax.jit(jax.vmap(jax.vmap(lambda m: decoder.attention(q, [(k, v, m)]))))
    assert cpu_attention.TARGET in fn.lower(masks).as_text()
    out, w = fn(masks)
    for i in range(2):
        for j in range(3):
            ref_out, ref_w = dense(q, [(k, v, masks[i, j])])
            np.testing.assert_allclose(np.asarray(out[i, j]), ref_out, atol=1e-5, rtol=1e-5)
            np.testing.assert_allclose(np.asarray(w[i, j]), ref_w, atol=1e-5, rtol=1e-5)


def test_gradient_is_xla_attentions(monkeypatch):
    q, blocks = inputs(4, prefix=9, per_head=True)
    r = np.random.RandomState(4)
    out_w = jnp.asarray(r.randn(*q.shape).astype(np.float32))

    def loss(q, kv):
        out, w = decoder.attention(q, [(*x, m) for x, (_, _, m) in zip(kv, blocks, strict=True)])
        return (out * out_w).sum() + (w**2).sum()

    kv = [(k, v) for k, v, _ in blocks]
    assert uses_kernel(jax.grad(loss, argnums=(0, 1)), q, kv)
    fused = jax.grad(loss, argnums=(0, 1))(q, kv)
    monkeypatch.setenv("JAXFLOW_CPU_ATTENTION", "0")
    xla = jax.grad(loss, argnums=(0, 1))(q, kv)
    for a, b in zip(jax.tree.leaves(fused), jax.tree.leaves(xla), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-5)


def test_model_with_the_kernel_equals_transformers_with_knockouts(twins, monkeypatch):
    """The tiny model (GQA, knockouts, a sweep's incremental and full recomputation) runs the kernel and gives
    transformers' logits and attention weights; incremental and full recomputation agree to 1e-6."""
    import tiny

    hf, model = twins("llava", "llava-hf", kv_heads=2)
    ids, pv, isz, kos = tiny.knockout_case(model)
    calls = []
    kernel = cpu_attention.attention
    monkeypatch.setattr(cpu_attention, "attention", lambda *a: calls.append(1) or kernel(*a))
    jax.clear_caches()
    logits, attn, inc, full = tiny.run_case(model, ids, pv, isz, kos)
    assert len(calls) >= 3 * model.config.text.num_layers  # traced by the forward, base run and recomputations
    np.testing.assert_allclose(inc, full, atol=1e-6)
    tiny.check_case(hf, model, ids, pv, isz, kos, logits, attn)
