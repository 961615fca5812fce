"""CLIP ViT vision tower: where an image becomes patch features.

pixel_values [N, C, S, S] -> patch embeddings (a strided conv written as a matmul over
flattened patches) -> [CLS] + patches + position embeddings -> pre-layernorm -> encoder layers.
The tower returns the stack of hidden states that LLaVA selects from (index 0 is the
pre-layernorm output, index i the output of layer i, as in transformers).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxflow.config import VisionConfig
from jaxflow.nn.layers import LayerNorm, Linear, param, quick_gelu

ATTN_IN = ("vision_embed", "vision_heads")
ATTN_OUT = ("vision_heads", "vision_embed")


class ClipAttention(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs):
        d = cfg.hidden_size
        self.q_proj = Linear(d, d, bias=True, dtype=dtype, rngs=rngs, axes=ATTN_IN)
        self.k_proj = Linear(d, d, bias=True, dtype=dtype, rngs=rngs, axes=ATTN_IN)
        self.v_proj = Linear(d, d, bias=True, dtype=dtype, rngs=rngs, axes=ATTN_IN)
        self.out_proj = Linear(d, d, bias=True, dtype=dtype, rngs=rngs, axes=ATTN_OUT)
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim

    def __call__(self, x):
        n, p, _ = x.shape
        # [N, P, H, hd]
        q, k, v = (proj(x).reshape(n, p, self.num_heads, self.head_dim)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        scores = jnp.einsum("NQHd,NKHd->NHQK", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(scores * self.head_dim**-0.5, axis=-1).astype(x.dtype)
        out = jnp.einsum("NHQK,NKHd->NQHd", weights, v).reshape(n, p, -1)
        return self.out_proj(out)


class ClipLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs):
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.self_attn = ClipAttention(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype, rngs=rngs,
                          axes=("vision_embed", "vision_mlp"))
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs,
                          axes=("vision_mlp", "vision_embed"))

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.fc2(quick_gelu(self.fc1(self.layer_norm2(x))))


class ClipVisionTower(nnx.Module):
    """Only the layers LLaVA reads are built (`num_layers`); the post-layernorm is never used."""

    def __init__(self, cfg: VisionConfig, num_layers: int, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        c, p, d = 3, cfg.patch_size, cfg.hidden_size
        self.patch_embed = Linear(c * p * p, d, bias=False, dtype=dtype, rngs=rngs,
                                  axes=(None, "vision_embed"))  # conv kernel [C*p*p, D]
        self.class_embed = param(jnp.zeros((d,), dtype), ("vision_embed",))
        self.pos_embed = param(jnp.zeros((cfg.grid**2 + 1, d), dtype), (None, "vision_embed"))
        self.pre_norm = LayerNorm(d, cfg.layer_norm_eps, dtype=dtype)
        self.layers = nnx.List([ClipLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(num_layers)])

    def __call__(self, pixel_values):
        """pixel_values [N, C, S, S] -> hidden states [num_layers + 1, N, 1 + g*g, D]."""
        n, c, s, _ = pixel_values.shape
        p, g = self.cfg.patch_size, self.cfg.grid
        if s != self.cfg.image_size:
            raise ValueError(f"pixel_values: crops of {s} px, the vision tower expects {self.cfg.image_size}")
        x = pixel_values.astype(self.patch_embed.kernel.dtype)
        # [N, C, g, p, g, p] -> [N, g, g, C, p, p] -> [N, g*g, C*p*p]
        patches = x.reshape(n, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, c * p * p)
        x = self.patch_embed(patches)  # [N, g*g, D]
        cls = jnp.broadcast_to(self.class_embed[...], (n, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...]  # [N, 1 + g*g, D]
        x = self.pre_norm(x)
        states = [x]
        for layer in self.layers:
            x = layer(x)
            states.append(x)
        return jnp.stack(states)
