"""Llama decoder (also Mistral, Qwen2: jaxflow.config.TextConfig): where a knockout is applied.

Every attention call takes an explicit boolean mask: causal & key-valid (& within the sliding
window, if the config has one), minus the edges a `KnockoutMasks` cuts in that layer. Queries
and keys carry explicit positions (q_pos, kv_pos), so one code path
serves the full forward, KV-cache decoding and partial recomputation.
"""

from __future__ import annotations

import dataclasses

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
    """Keys and values of every layer at positions `pos`: k, v [L, B, S, K, hd]; pos, valid [B, S]."""

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

    def __call__(self, x, cos, sin, mask, prefix_kv=None):
        """x [B, Tq, D]; mask [B, 1|H, Tq, S] True = may attend.

        prefix_kv: optional (k, v) [B, Sp, K, hd] of earlier positions (a KV cache, or an uncut
        run's keys) attended before this call's own keys, so S = Sp + Tq.
        Returns out [B, Tq, D], weights [B, H, Tq, S] and this call's own (k, v) [B, Tq, K, hd].
        """
        b, t, _ = x.shape
        h, kvh, hd = self.num_heads, self.num_kv_heads, self.head_dim
        q = apply_rope(self.q_proj(x).reshape(b, t, h, hd), cos, sin)  # [B, Tq, H, hd]
        k = apply_rope(self.k_proj(x).reshape(b, t, kvh, hd), cos, sin)  # [B, Tq, K, hd]
        v = self.v_proj(x).reshape(b, t, kvh, hd)  # [B, Tq, K, hd]
        q = q.reshape(b, t, kvh, h // kvh, hd)  # [B, Tq, K, G, hd]; query head = k * G + g
        scores = jnp.einsum("BTKGd,BSKd->BKGTS", q, k, preferred_element_type=jnp.float32)
        if prefix_kv is not None:  # separate einsum: a prefix shared under vmap is never copied
            pre = jnp.einsum("BTKGd,BSKd->BKGTS", q, prefix_kv[0].astype(q.dtype), preferred_element_type=jnp.float32)
            scores = jnp.concatenate([pre, scores], axis=-1)
        scores = scores.reshape(b, h, t, -1) * hd**-0.5  # [B, H, Tq, S]
        weights = jax.nn.softmax(jnp.where(mask, scores, NEG), axis=-1).astype(x.dtype)
        w = weights.reshape(b, kvh, h // kvh, t, -1)
        out = jnp.einsum("BKGTS,BSKd->BTKGd", w[..., -t:], v)  # [B, Tq, K, G, hd]
        if prefix_kv is not None:
            out = out + jnp.einsum("BKGTS,BSKd->BTKGd", w[..., :-t], prefix_kv[1].astype(v.dtype))
        return self.o_proj(out.reshape(b, t, h * hd)), weights, (k, v)


class LlamaLayer(nnx.Module):
    def __init__(self, cfg: TextConfig, *, dtype, rngs):
        d, f = cfg.hidden_size, cfg.intermediate_size
        self.input_layernorm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype)
        self.self_attn = LlamaAttention(cfg, dtype=dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(d, cfg.rms_norm_eps, dtype=dtype)
        self.gate_proj = Linear(d, f, bias=False, dtype=dtype, rngs=rngs, axes=("embed", "mlp"))
        self.up_proj = Linear(d, f, bias=False, dtype=dtype, rngs=rngs, axes=("embed", "mlp"))
        self.down_proj = Linear(f, d, bias=False, dtype=dtype, rngs=rngs, axes=("mlp", "embed"))

    def __call__(self, x, cos, sin, mask, prefix_kv=None):
        attn, weights, kv = self.self_attn(self.input_layernorm(x), cos, sin, mask, prefix_kv)
        x = x + attn
        h = self.post_attention_layernorm(x)
        return x + self.down_proj(jax.nn.silu(self.gate_proj(h)) * self.up_proj(h)), weights, kv


@dataclasses.dataclass
class DecoderOutput:
    hidden: jax.Array  # [B, Tq, D] after the final norm
    hidden_states: jax.Array | None = None  # [L + 1, B, Tq, D] residual stream, no final norm
    attentions: jax.Array | None = None  # [L, B, H, Tq, S]
    kv: tuple[jax.Array, jax.Array] | None = None  # this call's keys and values [L, B, Tq, K, hd]


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
        """RoPE tables for q_pos [B, Tq], and the key positions [B, S] and causal & valid (& sliding
        window) mask [B, 1, Tq, S] over the prefix keys (if any) followed by the queries' own keys."""
        kv_pos, kv_valid = q_pos, valid
        if prefix is not None:
            kv_pos = jnp.concatenate([prefix.pos, q_pos], axis=1)
            kv_valid = jnp.concatenate([prefix.valid, valid], axis=1)
        back = q_pos[:, :, None] - kv_pos[:, None, :]  # [B, Tq, S] how far back each key lies
        base = (back >= 0) & kv_valid[:, None, :]
        if self.cfg.sliding_window is not None:
            base = base & (back < self.cfg.sliding_window)
        return rope_tables(q_pos, self.cfg.head_dim, self.cfg.rope_theta), kv_pos, base[:, None]

    def __call__(self, x, q_pos, valid, *, prefix: KVCache | None = None, knock: KnockoutMasks | None = None,
                 collect_hidden=False, collect_attn=False, collect_kv=False) -> DecoderOutput:
        """x [B, Tq, D] input embeddings at positions q_pos [B, Tq]; valid [B, Tq] False for padding.

        Queries attend to `prefix` (earlier keys, e.g. a KV cache) and to their own keys, under
        causality and validity; a knockout additionally cuts edges per layer.
        """
        (cos, sin), kv_pos, base = self.masks(q_pos, valid, prefix)
        states, attns, ks, vs = [x], [], [], []
        for i, layer in enumerate(self.layers):
            mask = base if knock is None else base & ~knock.cut(i, q_pos, kv_pos)
            prefix_kv = None if prefix is None else (prefix.k[i], prefix.v[i])
            x, weights, (k, v) = layer(x, cos, sin, mask, prefix_kv)
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
