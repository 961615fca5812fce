"""Llama decoder (also Mistral, Qwen2: jaxflow.config.TextConfig): where a knockout is applied.

Every attention call takes explicit boolean masks: causal & key-valid over the queries' own keys,
key-valid over a prefix of earlier keys (both within the sliding window, if the config has one),
minus the edges a `KnockoutMasks` cuts in that layer. Queries and keys carry explicit positions,
so one code path serves the full forward, KV-cache decoding and partial recomputation.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxflow.config import TextConfig
from jaxflow.knockout import KnockoutMasks
from jaxflow.nn.layers import Embed, Linear, RMSNorm

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
    """Keys and values of every layer at positions `pos`: k, v [L, B, K, S, hd] (heads-major); pos, valid [B, S].
    Each valid slot must be earlier than every query that attends to it (no causal mask applies)."""

    k: jax.Array
    v: jax.Array
    pos: jax.Array
    valid: jax.Array


class LlamaAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs):
        d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        bias = cfg.qkv_bias
        self.q_proj = Linear(d, h * hd, bias=bias, dtype=dtype, rngs=rngs, axes=("embed", "heads"))
        self.k_proj = Linear(d, kv * hd, bias=bias, dtype=dtype, rngs=rngs, axes=("embed", "kv_heads"))
        self.v_proj = Linear(d, kv * hd, bias=bias, dtype=dtype, rngs=rngs, axes=("embed", "kv_heads"))
        self.o_proj = Linear(h * hd, d, bias=False, dtype=dtype, rngs=rngs, axes=("heads", "embed"))
        self.num_heads, self.num_kv_heads, self.head_dim = h, kv, hd

    def __call__(self, x, cos, sin, mask, prefix=None, groups: int = 1):
        """x [B, Tq, D]; mask [B, 1|H, Tq, Tq / groups] True = may attend, over this call's own keys: the
        queries form `groups` groups of positions that see only their own group's keys (see `attention`).

        prefix: optional (k, v, mask) of earlier positions (a KV cache, or an uncut run's keys), shared by
        every group: k, v [B, K, Sp, hd] and mask [B, 1|H, Tq, Sp]. One softmax spans the prefix keys, then
        the own keys (S = Sp + Tq / groups), computed block by block so that neither scores nor keys are
        concatenated.
        Returns out [B, Tq, D], weights [B, H, Tq, S] and this call's own (k, v) [B, K, Tq, hd].
        """
        b, t, _ = x.shape
        h, kvh, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q = apply_rope(self.q_proj(x).reshape(b, t, h, hd), cos, sin)  # [B, Tq, H, hd]
        k = apply_rope(self.k_proj(x).reshape(b, t, kvh, hd), cos, sin).transpose(0, 2, 1, 3)  # [B, K, Tq, hd]
        v = self.v_proj(x).reshape(b, t, kvh, hd).transpose(0, 2, 1, 3)  # [B, K, Tq, hd]
        blocks = [(k, v, mask)] if prefix is None else [prefix, (k, v, mask)]
        out, weights = attention(q, blocks, groups=groups)  # [B, Tq, H, hd], [B, H, Tq, S]
        return self.o_proj(out.reshape(b, t, h * hd).astype(x.dtype)), weights.astype(x.dtype), (k, v)


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


def _group_dot(spec: str, x, y):
    """A per-group matmul "BKc..,BKc..->BKc.." of [B, K, c, ...] operands -> [B, K, c * rows, cols] f32, as one
    4-D matmul for a single group and with (B, K, c) merged into one batch axis otherwise: XLA's CPU matmuls
    run these layouts fastest."""
    b, kvh, nc = x.shape[:3]
    if nc == 1:
        out = jnp.einsum(spec.replace("c", ""), x[:, :, 0], y[:, :, 0], preferred_element_type=jnp.float32)
    else:
        out = jnp.einsum(spec.replace("BKc", "N"), x.reshape(-1, *x.shape[3:]), y.reshape(-1, *y.shape[3:]),
                         preferred_element_type=jnp.float32)
    return out.reshape(b, kvh, -1, out.shape[-1])


def attention(q, blocks, tile: int | None = None, groups: int = 1):
    """Exact softmax attention of q [B, Tq, H, hd] over key blocks [(k, v, mask)]. The queries form `groups`
    independent groups of S = Tq / groups positions (e.g. knockout configurations, group-major). Every block
    but the last is shared by all groups: k, v [B, K, Sb, hd], mask [B, 1|H, Tq, Sb] True = may attend. The
    last block holds each group's own keys: k, v [B, K, Tq, hd], mask [B, 1|H, Tq, S], seen only by its own
    group; its mask is causal (own key j is masked for query i < j), so tiles above its diagonal are skipped.

    The scores are computed in tiles of at most `tile` elements (default `score_tile()`) with an online
    softmax (running max and sum per query), so no [B, H, Tq, S] score buffer is materialised for the
    output. Returns out [B, Tq, H, hd] in q's dtype and the weights [B, H, Tq, Sp + S] (f32), recomputed tile
    by tile from the final max and sum: XLA drops them when the caller does not use them."""
    b, t, h, hd = q.shape
    n, s = groups, t // groups
    kvh = blocks[0][0].shape[1]
    g = h // kvh
    tile = score_tile() if tile is None else tile
    # heads-major, the groups and the G query heads of a key head folded into the rows (group, head, position):
    # XLA's batched matmuls want (B, K) leading and 2-D operands, and the score layout stays the matmuls' own
    q = q.reshape(b, n, s, kvh, g, hd).transpose(0, 3, 1, 4, 2, 5)  # [B, K, n, G, S, hd]; head = k * G + g
    kv = [(kb.astype(q.dtype), vb.astype(q.dtype), mb) for kb, vb, mb in blocks]
    own_k, own_v, own_m = kv[-1]
    own_k, own_v = own_k.reshape(b, kvh, n, s, hd), own_v.reshape(b, kvh, n, s, hd)
    keys = sum(kb.shape[2] for kb, _, _ in kv[:-1]) + s
    rows = t if tile is None else max(1, math.isqrt(tile // (b * h)))  # square tiles when S is long
    # query tiles: spans of positions (of every group) when S is long, else spans of whole groups
    long = s >= rows
    tiles = ([(0, n, i0, i1) for i0, i1 in _tiles(s, rows)] if long else
             [(c0, c1, 0, s) for c0, c1 in _tiles(n, rows // s)])

    def rows_of(m, c0, c1, i0, i1, j0, j1):  # mask [B, 1|H, Tq, Sb] -> its tile [B, 1|K, nc * G * tq, tk]
        m = m.reshape(b, m.shape[1], n, s, m.shape[-1])[:, :, c0:c1, i0:i1, j0:j1]
        if m.shape[1] == 1:
            return m.reshape(b, 1, -1, j1 - j0) if g == 1 else jnp.broadcast_to(
                m[:, :, :, None], (b, 1, c1 - c0, g, i1 - i0, j1 - j0)).reshape(b, 1, -1, j1 - j0)
        return m.reshape(b, kvh, g, c1 - c0, i1 - i0, j1 - j0).transpose(0, 1, 3, 2, 4, 5).reshape(b, kvh, -1, j1 - j0)

    outs, weights = [], []
    for c0, c1, i0, i1 in tiles:
        nc, tq = c1 - c0, i1 - i0
        k_size = keys if tile is None else max(1, tile // (b * h * nc * tq))
        qi = q[:, :, c0:c1, :, i0:i1]  # [B, K, nc, G, tq, hd]
        scores = []  # (block, j0, j1, masked scores [B, K, nc * G * tq, tk] f32)
        for blk, (kb, _, mb) in enumerate(kv[:-1]):  # shared keys: one matmul for every group of the tile
            for j0, j1 in _tiles(kb.shape[2], k_size):
                sc = jnp.einsum("BKQd,BKSd->BKQS", qi.reshape(b, kvh, -1, hd), kb[:, :, j0:j1],
                                preferred_element_type=jnp.float32)
                scores.append((blk, j0, j1, jnp.where(rows_of(mb, c0, c1, i0, i1, j0, j1), sc * hd**-0.5, NEG)))
        for j0, j1 in _tiles(i1, k_size):  # own keys, up to the tile's diagonal: batched over the groups
            sc = _group_dot("BKcQd,BKcSd->BKcQS", qi.reshape(b, kvh, nc, g * tq, hd), own_k[:, :, c0:c1, j0:j1])
            scores.append((len(kv) - 1, j0, j1, jnp.where(rows_of(own_m, c0, c1, i0, i1, j0, j1), sc * hd**-0.5, NEG)))
        top = total = acc = None
        for blk, j0, j1, sc in scores:  # online softmax: rescale the running sum and output by exp(old - new max)
            new_top = sc.max(-1, keepdims=True) if top is None else jnp.maximum(top, sc.max(-1, keepdims=True))
            p = jnp.exp(sc - new_top)
            if blk < len(kv) - 1:
                pv = jnp.einsum("BKQS,BKSd->BKQd", p.astype(q.dtype), kv[blk][1][:, :, j0:j1],
                                preferred_element_type=jnp.float32)
            else:
                pv = _group_dot("BKcQS,BKcSd->BKcQd", p.astype(q.dtype).reshape(b, kvh, nc, g * tq, j1 - j0),
                                own_v[:, :, c0:c1, j0:j1])
            if top is None:
                total, acc = p.sum(-1, keepdims=True), pv
            else:
                scale = jnp.exp(top - new_top)
                total, acc = total * scale + p.sum(-1, keepdims=True), acc * scale + pv
            top = new_top
        outs.append((acc / total).reshape(b, kvh, nc, g, tq, hd))
        row = [jnp.exp(sc - top) / total for _, _, _, sc in scores]
        row.append(jnp.zeros((b, kvh, nc * g * tq, s - i1), jnp.float32))  # own keys past the tile: causal zeros
        weights.append(jnp.concatenate(row, axis=-1).reshape(b, kvh, nc, g, tq, keys))
    axis = 4 if long else 2  # tiles of positions, or of groups
    out = jnp.concatenate(outs, axis=axis).transpose(0, 2, 4, 1, 3, 5).reshape(b, t, h, hd).astype(q.dtype)
    weights = jnp.concatenate(weights, axis=axis).transpose(0, 1, 3, 2, 4, 5)  # [B, K, G, n, S, keys]
    return out, weights.reshape(b, h, t, keys)


class LlamaLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = LlamaAttention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype)
        self.gate_proj = Linear(d, f, bias=False, dtype=dtype, rngs=rngs, axes=("embed", "mlp"))
        self.up_proj = Linear(d, f, bias=False, dtype=dtype, rngs=rngs, axes=("embed", "mlp"))
        self.down_proj = Linear(f, d, bias=False, dtype=dtype, rngs=rngs, axes=("mlp", "embed"))

    def __call__(self, x, cos, sin, mask, prefix=None, groups: int = 1):
        attn, weights, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, prefix, groups)
        x = x + attn
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h)), weights, kv


@dataclasses.dataclass
class DecoderOutput:
    hidden: jax.Array  # [B, Tq, D] after the final norm
    hidden_states: jax.Array | None = None  # [L + 1, B, Tq, D] residual stream, no final norm
    attentions: jax.Array | None = None  # [L, B, H, Tq, S]
    kv: tuple[jax.Array, jax.Array] | None = None  # this call's keys and values [L, B, K, Tq, hd]


class LlamaModel(nnx.Module):
    def __init__(self, cfg: TextConfig, *, tie_word_embeddings: bool, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        self.embed_tokens = Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, rngs=rngs)
        self.layers = nnx.List([LlamaLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(cfg.num_layers)])
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, dtype=dtype)
        self.lm_head = (None if tie_word_embeddings
                        else Linear(cfg.hidden_size, cfg.vocab_size, bias=False, dtype=dtype, rngs=rngs,
                               axes=("embed", "vocab")))

    def unembed(self, x):
        """[..., D] -> logits [..., V] (no norm: callers pick normed or raw states)."""
        return self.embed_tokens.attend(x) if self.lm_head is None else self.lm_head(x)

    def masks(self, q_pos, valid, prefix: KVCache | None = None):
        """RoPE tables for q_pos [B, Tq]; the causal & valid mask [B, 1, Tq, Tq] over the queries' own keys
        (causal in call order, like transformers' cache positions: query i sees own key j only if j <= i);
        and over the prefix keys (if any) the mask [B, 1, Tq, Sp]: validity only, as every prefix key is
        earlier than every query. With a sliding window both also keep only keys with q - k < window."""
        window = self.cfg.sliding_window
        idx = jnp.arange(q_pos.shape[1])
        back = (idx[:, None] - idx[None, :])[None]  # [1, Tq, Tq] how far back each own key lies (call order)
        own = (back >= 0) & valid[:, None, :]
        if window is not None:
            own = own & (back < window)
        pre = None
        if prefix is not None:
            pre = jnp.broadcast_to(prefix.valid[:, None, :], (q_pos.shape[0], q_pos.shape[1], prefix.valid.shape[1]))
            if window is not None:
                pre = pre & (q_pos[:, :, None] - prefix.pos[:, None, :] < window)
            pre = pre[:, None]
        return rope_tables(q_pos, self.cfg.head_dim, self.cfg.rope_theta), own[:, None], pre

    def __call__(self, x, q_pos, valid, *, prefix: KVCache | None = None, knock: KnockoutMasks | None = None,
                 collect_hidden=False, collect_attn=False, collect_kv=False) -> DecoderOutput:
        """x [B, Tq, D] input embeddings at positions q_pos [B, Tq]; valid [B, Tq] False for padding.

        Queries attend to `prefix` (keys of earlier positions, e.g. a KV cache) and to their own keys,
        under causality and validity; a knockout additionally cuts edges per layer.
        """
        (cos, sin), own, pre = self.masks(q_pos, valid, prefix)
        states, attns, ks, vs = [x], [], [], []
        for i, layer in enumerate(self.layers):
            mask = own if knock is None else own & ~knock.cut(i, q_pos, q_pos)
            block = None
            if prefix is not None:
                block = (prefix.k[i], prefix.v[i], pre if knock is None else pre & ~knock.cut(i, q_pos, prefix.pos))
            x, weights, (k, v) = layer(x, cos, sin, mask, block)
            states.append(x)
            if collect_attn:
                attns.append(weights)
            if collect_kv:
                ks.append(k)
                vs.append(v)
        return DecoderOutput(
            hidden=self.norm(x),
            hidden_states=jnp.stack(states) if collect_hidden else None,
            attentions=jnp.stack(attns) if collect_attn else None,
            kv=(jnp.stack(ks), jnp.stack(vs)) if collect_kv else None,
        )
