"""Llama decoder (also Mistral, Qwen2: jaxflow.config.TextConfig): where a knockout is applied.

Every attention call takes explicit boolean masks: causal & key-valid over the queries' own keys,
key-valid over a prefix of earlier keys (both within the sliding window, if the config has one),
minus the edges a `KnockoutMasks` cuts in that layer. Queries and keys carry explicit positions,
so one code path serves the full forward, KV-cache decoding and partial recomputation.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from jaxflow.config import TextConfig
from jaxflow.knockout import KnockoutMasks
from jaxflow.nn import cpu_attention
from jaxflow.nn.layers import Embed, Linear, RMSNorm
from jaxflow.patching import SiteEdit

NEG = jnp.finfo(jnp.float32).min


def rope_tables(positions, head_dim: int, theta: float):
    """positions [B, T] -> cos, sin [B, T, head_dim] in float32 (transformers' 'default' RoPE)."""
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, hd/2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb), jnp.sin(emb)


def apply_rope(x, cos, sin):
    """x [B, T, N, hd]; rotate-half convention."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None].astype(x.dtype), sin[:, :, None].astype(x.dtype)
    return x * cos + rotated * sin


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KVCache:
    """Keys and values of every layer at positions `pos`: k, v indexable by layer (an [L, B, K, S, hd] array or
    L x [B, K, S, hd]; heads-major); pos, valid [B, S]. Each valid slot must be earlier than every query that
    attends to it (no causal mask applies)."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    valid: jax.Array


class Attention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.qkv_bias
        self.q_proj = Linear(d, h * hd, bias=bias, dtype=dtype, rngs=rngs, axes=("embed", "heads"))
        self.k_proj = Linear(d, kv * hd, bias=bias, dtype=dtype, rngs=rngs, axes=("embed", "kv_heads"))
        self.v_proj = Linear(d, kv * hd, bias=bias, dtype=dtype, rngs=rngs, axes=("embed", "kv_heads"))
        self.o_proj = Linear(h * hd, d, bias=False, dtype=dtype, rngs=rngs, axes=("heads", "embed"))
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd

    def keys(self, x, cos, sin):
        """x [B, T, D] (normed), RoPE tables [B, T, hd] -> k, v [B, K, T, hd]."""
        b, t, _ = x.shape
        kvh, hd = self.num_kv_heads, self.head_dim
        k = apply_rope(self.k_proj(x).reshape(b, t, kvh, hd), cos, sin).transpose(0, 2, 1, 3)
        return k, self.v_proj(x).reshape(b, t, kvh, hd).transpose(0, 2, 1, 3)

    def __call__(self, x, cos, sin, mask, prefix=(), write_at=None, z_edit: SiteEdit | None = None):
        """x [B, Tq, D]; mask [B, 1|H, Tq, Tq] True = may attend, over this call's own keys.

        prefix: blocks (k, v, mask) of earlier positions (a KV cache, an uncut run's keys): k, v
        [B, K, Sp, hd] and mask [B, 1|H, Tq, Sp]. One softmax spans the prefix keys, then the own keys
        (S = sum Sp + Tq), computed block by block so that neither scores nor keys are concatenated.
        write_at: the one query's (Tq = 1) key and value are first written into the last prefix block (a KV
        cache) at that slot, which its mask must allow; no own block is added then.
        z_edit: an edit of the per-head outputs before o_proj (a patch of "z").
        Returns out [B, Tq, D], weights [B, H, Tq, S], this call's own (k, v) [B, K, Tq, hd] (with
        write_at, the updated last block's (k, v)) and the per-head outputs z [B, Tq, H, hd] (edited).
        """
        b, t, _ = x.shape
        h, hd = self.num_heads, self.head_dim
        q = apply_rope(self.q_proj(x).reshape(b, t, h, hd), cos, sin)  # [B, Tq, H, hd]
        k, v = self.keys(x, cos, sin)  # [B, K, Tq, hd]
        if write_at is None:
            out, weights = attention(q, [*prefix, (k, v, mask)])  # [B, Tq, H, hd], [B, H, Tq, S]
        else:  # written before it is read: XLA then updates a loop-carried cache in place
            *earlier, (kc, vc, mc) = prefix
            k, v = (jax.lax.dynamic_update_slice_in_dim(c, n.astype(c.dtype), write_at, axis=2)
                    for c, n in ((kc, k), (vc, v)))
            out, weights = attention(q, [*earlier, (k, v, mc)], own=False)
        if z_edit is not None:
            out = z_edit(out)  # [B, Tq, H, hd]
        return self.o_proj(out.reshape(b, t, h * hd).astype(x.dtype)), weights.astype(x.dtype), (k, v), out


def score_tile() -> int | None:
    """Score elements per attention tile: on CPU about 1M (a tile of f32 scores stays in cache); on an
    accelerator None (one tile: its memory bandwidth prefers large batched matmuls)."""
    return 1 << 20 if jax.default_backend() == "cpu" else None


MAX_TILES = 8  # per axis and key block: bounds the unrolled tiles (and compile time) of long sequences


def _tiles(n: int, size: int):
    """[start, stop) ranges of about `size` (at most MAX_TILES of them) covering range(n) in equal parts."""
    parts = min(MAX_TILES, -(-n // max(1, size)))
    step = -(-n // parts)
    return [(i, min(i + step, n)) for i in range(0, n, step)]


def attention(q, blocks, own: bool = True):
    """Exact softmax attention of q [B, Tq, H, hd] over key blocks [(k, v, mask)]: k, v [B, K, Sb, hd], mask
    [B, 1|H, Tq, Sb] True = may attend. With `own`, the last block holds the queries' own keys and its mask
    is causal (own key j is masked for query i < j). Returns out [B, Tq, H, hd] in q's dtype and the weights
    [B, H, Tq, S] (f32), which XLA drops when the caller does not use them.

    On CPU in float32, a call over its own keys (own, Tq > 1) whose prefix is no longer than Tq (the blocks are
    concatenated) runs the fused kernel (`cpu_attention`); everything else, decoding included, runs
    `tiled_attention`. Both give the same up to float32 rounding, except a row that may attend to no key: the
    kernel averages all values, as a softmax over equal scores does, `tiled_attention` the keys of its tiles."""
    prefix = sum(kb.shape[2] for kb, _, _ in blocks[:-1])
    arrays = [q, *(a for kb, vb, _ in blocks for a in (kb, vb))]
    if (own and q.shape[1] > 1 and prefix <= q.shape[1] and all(a.dtype == jnp.float32 for a in arrays)
            and cpu_attention.enabled()):
        return _fused_attention(q, tuple(tuple(block) for block in blocks))
    return tiled_attention(q, blocks, own=own)


@jax.custom_vjp
def _fused_attention(q, blocks):
    """`attention` by the fused CPU kernel over the concatenated blocks; the gradient is tiled_attention's."""
    b, t, h, _ = q.shape
    masks = [mb for _, _, mb in blocks]
    if len({mb.shape[1] for mb in masks}) > 1:  # per-head and shared masks: all per head
        masks = [jnp.broadcast_to(mb, (b, h, *mb.shape[2:])) for mb in masks]
    cat = lambda xs, axis: xs[0] if len(xs) == 1 else jnp.concatenate(xs, axis)  # noqa: E731
    k, v = (cat([block[n] for block in blocks], 2) for n in (0, 1))  # [B, K, S, hd]
    out, top, total = cpu_attention.attention(q, k, v, cat(masks, 3))  # [B, Tq, H, hd], [B, H, Tq] x 2
    return out.astype(q.dtype), _weights(q, blocks, top, total)


def _weights(q, blocks, top, total):
    """The weights [B, H, Tq, S] f32 from each row's max score and sum (top, total [B, H, Tq]), like
    tiled_attention's: exp(score - top) / total, masked scores at NEG."""
    b, t, h, hd = q.shape
    kvh = blocks[0][0].shape[1]
    q = q.reshape(b, t, kvh, h // kvh, hd).transpose(0, 2, 3, 1, 4).reshape(b, kvh, -1, hd)  # [B, K, G * Tq, hd]
    scores = [jnp.where(mb, jnp.einsum("BKQd,BKSd->BKQS", q, kb, preferred_element_type=jnp.float32)
                        .reshape(b, h, t, -1) * hd**-0.5, NEG) for kb, _, mb in blocks]
    return jnp.exp(jnp.concatenate(scores, axis=-1) - top[..., None]) / total[..., None]


def _fused_attention_fwd(q, blocks):
    return _fused_attention(q, blocks), (q, blocks)


def _fused_attention_bwd(res, cotangents):
    q, blocks = res
    kv = [(kb, vb) for kb, vb, _ in blocks]
    _, vjp = jax.vjp(lambda q, kv: tiled_attention(q, [(*x, mb) for x, (_, _, mb) in zip(kv, blocks, strict=True)]),
                     q, kv)
    dq, dkv = vjp(cotangents)
    return dq, tuple((dk, dv, None) for dk, dv in dkv)  # masks: no cotangent


_fused_attention.defvjp(_fused_attention_fwd, _fused_attention_bwd)


def tiled_attention(q, blocks, tile: int | None = None, own: bool = True):
    """`attention` in XLA. With `own`, tiles above the own block's diagonal are skipped.

    The scores are computed in tiles of at most `tile` elements (default `score_tile()`) with an online
    softmax (running max and sum per query), so no [B, H, Tq, S] score buffer is materialised for the
    output. The weights are recomputed tile by tile from the final max and sum."""
    b, t, h, hd = q.shape
    kvh = blocks[0][0].shape[1]
    g = h // kvh
    tile = score_tile() if tile is None else tile
    # heads-major, the G query heads of a key head folded into the rows: XLA's batched matmuls want (B, K)
    # leading and 2-D operands
    q = q.reshape(b, t, kvh, g, hd).transpose(0, 2, 3, 1, 4)  # [B, K, G, Tq, hd]; query head = k * G + g
    kv = [(kb.astype(q.dtype), vb.astype(q.dtype), mb) for kb, vb, mb in blocks]
    keys = sum(kb.shape[2] for kb, _, _ in kv)
    q_size = t if tile is None else max(1, math.isqrt(tile // (b * h)))  # square tiles when Tq is long
    outs, weights = [], []
    for i0, i1 in _tiles(t, q_size):
        tq = i1 - i0
        k_size = keys if tile is None else max(1, tile // (b * h * tq))
        qi = q[:, :, :, i0:i1].reshape(b, kvh, g * tq, hd)
        scores = []  # (block, j0, j1, masked scores [B, K, G * tq, tk] f32)
        for n, (kb, _, mb) in enumerate(kv):
            causal = own and n == len(kv) - 1
            for j0, j1 in _tiles(i1 if causal else kb.shape[2], k_size):
                s = jnp.einsum("BKQd,BKSd->BKQS", qi, kb[:, :, j0:j1], preferred_element_type=jnp.float32) * hd**-0.5
                m = mb[:, :, i0:i1, j0:j1]  # [B, 1|H, tq, tk]
                m = (jnp.broadcast_to(m[:, :, None], (b, 1, g, tq, j1 - j0)) if m.shape[1] == 1
                     else m.reshape(b, kvh, g, tq, j1 - j0))
                scores.append((n, j0, j1, jnp.where(m.reshape(b, -1, g * tq, j1 - j0), s, NEG)))
        top = total = acc = None
        for n, j0, j1, s in scores:  # online softmax: rescale the running sum and output by exp(old - new max)
            new_top = s.max(-1, keepdims=True) if top is None else jnp.maximum(top, s.max(-1, keepdims=True))
            p = jnp.exp(s - new_top)
            pv = jnp.einsum("BKQS,BKSd->BKQd", p.astype(q.dtype), kv[n][1][:, :, j0:j1],
                            preferred_element_type=jnp.float32)
            if top is None:
                total, acc = p.sum(-1, keepdims=True), pv
            else:
                scale = jnp.exp(top - new_top)
                total, acc = total * scale + p.sum(-1, keepdims=True), acc * scale + pv
            top = new_top
        outs.append((acc / total).reshape(b, kvh, g, tq, hd))
        row = [jnp.exp(s - top) / total for _, _, _, s in scores]
        if own:
            row.append(jnp.zeros((b, kvh, g * tq, t - i1), jnp.float32))  # own keys past the tile: causal zeros
        weights.append(jnp.concatenate(row, axis=-1).reshape(b, kvh, g, tq, keys))
    out = jnp.concatenate(outs, axis=3).transpose(0, 3, 1, 2, 4).reshape(b, t, h, hd).astype(q.dtype)
    return out, jnp.concatenate(weights, axis=3).reshape(b, h, t, keys)


class DecoderLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = Attention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype)
        self.gate_proj = Linear(d, f, bias=False, dtype=dtype, rngs=rngs, axes=("embed", "mlp"))
        self.up_proj = Linear(d, f, bias=False, dtype=dtype, rngs=rngs, axes=("embed", "mlp"))
        self.down_proj = Linear(f, d, bias=False, dtype=dtype, rngs=rngs, axes=("mlp", "embed"))

    def __call__(self, x, cos, sin, mask, prefix=(), write_at=None, edits: dict[str, SiteEdit] | None = None):
        """x [B, Tq, D] -> (x out, attention weights, (k, v), attn_out, mlp_out, z): attn_out and mlp_out [B, Tq, D]
        are what the attention (after o_proj) and the MLP add to the residual stream, z [B, Tq, H, hd] the per-head
        attention outputs. edits: site ("attn_out", "mlp_out", "z") -> SiteEdit, applied where the site is
        computed ("resid_pre" is x: the caller edits it)."""
        edits = edits or {}
        attn, weights, kv, z = self.self_attn(self.input_layernorm(x), cos, sin, mask, prefix, write_at, edits.get("z"))
        if "attn_out" in edits:
            attn = edits["attn_out"](attn)
        x = x + attn
        h = self.post_attention_layernorm(x)
        mlp = self.down_proj(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h))
        if "mlp_out" in edits:
            mlp = edits["mlp_out"](mlp)
        return x + mlp, weights, kv, attn, mlp, z


@dataclasses.dataclass
class DecoderOutput:
    """Per-layer results come as tuples (like transformers'), one array per layer: no stacked copy is made
    unless a caller stacks them."""

    hidden: jax.Array  # [B, Tq, D] after the final norm
    hidden_states: tuple[jax.Array, ...] | None = None  # L + 1 x [B, Tq, D] residual stream, no final norm
    attentions: tuple[jax.Array, ...] | None = None  # L x [B, H, Tq, S]
    kv: tuple[tuple[jax.Array, ...], ...] | None = None  # this call's (keys, values): L x [B, K, Tq, hd] (write_at:
    # the updated cache blocks, L x [B, K, S, hd])
    attn_out: tuple[jax.Array, ...] | None = None  # L x [B, Tq, D]: each attention's output after o_proj
    mlp_out: tuple[jax.Array, ...] | None = None  # L x [B, Tq, D]: each MLP's output
    z: tuple[jax.Array, ...] | None = None  # L x [B, Tq, H, hd]: each attention's per-head output before o_proj


class Decoder(nnx.Module):
    def __init__(self, cfg: TextConfig, *, tie_word_embeddings: bool, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([DecoderLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = (None if tie_word_embeddings
                        else Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs,
                               axes=("embed", "vocab")))

    def unembed(self, x):
        """[..., D] -> logits [..., V] (no norm: callers pick normed or raw states)."""
        return self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)

    def masks(self, q_pos, valid, prefix: Sequence[KVCache] = ()):
        """RoPE tables for q_pos [B, Tq]; the causal & valid mask [B, 1, Tq, Tq] over the queries' own keys
        (causal in call order, like transformers' cache positions: query i sees own key j only if j <= i);
        and one mask [B, 1, Tq, Sp] per prefix block: validity only, as every prefix key is earlier than every
        query. With a sliding window all of them also keep only keys with q - k < window."""
        window = self.cfg.sliding_window
        idx = jnp.arange(q_pos.shape[1])
        back = (idx[:, None] - idx[None, :])[None]  # [1, Tq, Tq] how far back each own key lies (call order)
        own = (back >= 0) & valid[:, None, :]
        if window is not None:
            own = own & (back < window)
        pre = []
        for block in prefix:
            m = jnp.broadcast_to(block.valid[:, None, :], (q_pos.shape[0], q_pos.shape[1], block.valid.shape[1]))
            if window is not None:
                m = m & (q_pos[:, :, None] - block.pos[:, None, :] < window)
            pre.append(m[:, None])
        return rope_tables(q_pos, self.cfg.head_dim, self.cfg.rope_theta), own[:, None], pre

    def __call__(self, x, q_pos, valid, *, prefix: Sequence[KVCache] = (), knock: KnockoutMasks | None = None,
                 write_at=None, edits: Sequence[dict[str, SiteEdit]] | None = None, collect_hidden=False,
                 collect_attn=False, collect_kv=False, collect_outputs=False, collect_z=False) -> DecoderOutput:
        """x [B, Tq, D] input embeddings at positions q_pos [B, Tq]; valid [B, Tq] False for padding.

        Queries attend to the `prefix` blocks (keys of earlier positions: a prompt's keys, a KV cache) and to
        their own keys, under causality and validity; a knockout additionally cuts edges per layer.
        write_at (KV-cache decoding, Tq = 1): each layer first writes the query's key and value into the last
        prefix block at that slot (its `valid` must include it), then attends; `kv` returns the updated blocks.
        edits: per layer, site -> SiteEdit (patches, attribution offsets); "resid_pre" edits the layer's input, so
        the collected hidden state is the edited one.
        """
        if write_at is not None and x.shape[1] != 1:
            raise ValueError(f"write_at: one query position per call, got {x.shape[1]}")
        (cos, sin), own, pre = self.masks(q_pos, valid, prefix)
        states, attns, ks, vs, attn_outs, mlp_outs, zs = [], [], [], [], [], [], []
        for i, layer in enumerate(self.layers):
            mask = own if knock is None else own & ~knock.cut(i, q_pos, q_pos)
            blocks = [(c.k[i], c.v[i], m if knock is None else m & ~knock.cut(i, q_pos, c.pos))
                      for c, m in zip(prefix, pre, strict=True)]
            edit = {} if edits is None else dict(edits[i])
            if "resid_pre" in edit:
                x = edit.pop("resid_pre")(x)
            states.append(x)
            x, weights, (k, v), attn_out, mlp_out, z = layer(x, cos, sin, mask, blocks, write_at, edit)
            if collect_outputs:
                attn_outs.append(attn_out)
                mlp_outs.append(mlp_out)
            if collect_attn:
                attns.append(weights)
            if collect_kv:
                ks.append(k)
                vs.append(v)
            if collect_z:
                zs.append(z)
        states.append(x)
        return DecoderOutput(
            hidden=self.norm(x),
            hidden_states=tuple(states) if collect_hidden else None,
            attentions=tuple(attns) if collect_attn else None,
            kv=(tuple(ks), tuple(vs)) if collect_kv else None,
            attn_out=tuple(attn_outs) if collect_outputs else None,
            mlp_out=tuple(mlp_outs) if collect_outputs else None,
            z=tuple(zs) if collect_z else None,
        )
