"""ViT vision towers (CLIP, SigLIP): where an image becomes patch features.

pixel_values [N, C, S, S] -> patch embeddings (a strided conv written as a matmul over flattened
patches) -> ([CLS] +) patches + learned position embeddings (-> pre-layernorm) -> encoder layers.
The tower returns the stack of hidden states that LLaVA selects from (index 0 is the embedding
output, index i the output of layer i, as transformers' `hidden_states`). The two towers differ only
as `VisionConfig.kind` says: CLIP has a CLS token, a pre-layernorm, quick_gelu and a conv without
bias; SigLIP none of the first two, the tanh-approximated gelu and a conv bias. LLaVA never applies
either tower's post-layernorm (transformers' `hidden_states[-1]` is the last layer's raw output), nor
SigLIP's attention-pooling head.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from jaxflow.config import VisionConfig
from jaxflow.nn.layers import LayerNorm, Linear, param, quick_gelu

ATTN_IN = ("vision_embed", "vision_heads")
ATTN_OUT = ("vision_heads", "vision_embed")
ACTIVATIONS = {"clip": quick_gelu, "siglip": lambda x: jax.nn.gelu(x, approximate=True)}


class VisionAttention(nnx.Module):
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


class VisionLayer(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, dtype, rngs):
        self.layer_norm1 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.self_attn = VisionAttention(cfg, dtype=dtype, rngs=rngs)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, cfg.layer_norm_eps, dtype=dtype)
        self.fc1 = Linear(cfg.hidden_size, cfg.intermediate_size, bias=True, dtype=dtype, rngs=rngs,
                          axes=("vision_embed", "vision_mlp"))
        self.fc2 = Linear(cfg.intermediate_size, cfg.hidden_size, bias=True, dtype=dtype, rngs=rngs,
                          axes=("vision_mlp", "vision_embed"))
        self.kind = cfg.kind

    def __call__(self, x):
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.fc2(ACTIVATIONS[self.kind](self.fc1(self.layer_norm2(x))))


class VisionTower(nnx.Module):
    """Only the layers LLaVA reads are built (`num_layers`)."""

    def __init__(self, cfg: VisionConfig, num_layers: int, *, dtype, rngs: nnx.Rngs):
        self.cfg = cfg
        c, p, d = 3, cfg.patch_size, cfg.hidden_size
        clip = cfg.kind == "clip"
        self.patch_embed = Linear(c * p * p, d, bias=not clip, dtype=dtype, rngs=rngs,
                                  axes=(None, "vision_embed"))  # conv kernel [C*p*p, D]
        self.class_embed = param(jnp.zeros((d,), dtype), ("vision_embed",)) if cfg.has_cls else None
        self.pos_embed = param(jnp.zeros((cfg.grid**2 + cfg.has_cls, d), dtype), (None, "vision_embed"))
        self.pre_norm = LayerNorm(d, cfg.layer_norm_eps, dtype=dtype) if clip else None
        self.layers = nnx.List([VisionLayer(cfg, dtype=dtype, rngs=rngs) for _ in range(num_layers)])

    def __call__(self, pixel_values):
        """pixel_values [N, C, S, S] -> hidden states [num_layers + 1, N, T, D], T = g*g (+ 1 CLS)."""
        n, c, s, _ = pixel_values.shape
        p, g = self.cfg.patch_size, self.cfg.grid
        if s != self.cfg.image_size:
            raise ValueError(f"pixel_values: crops of {s} px, the vision tower expects {self.cfg.image_size}")
        # a valid stride-p conv drops the last S - g*p pixel rows and columns (6 of SigLIP's 384 = 27 * 14 + 6)
        x = pixel_values[:, :, :g * p, :g * p].astype(self.patch_embed.kernel.dtype)
        # [N, C, g, p, g, p] -> [N, g, g, C, p, p] -> [N, g*g, C*p*p]
        patches = x.reshape(n, c, g, p, g, p).transpose(0, 2, 4, 1, 3, 5).reshape(n, g * g, c * p * p)
        x = self.patch_embed(patches)  # [N, g*g, D]
        if self.class_embed is not None:
            cls = jnp.broadcast_to(self.class_embed[...], (n, 1, x.shape[-1]))
            x = jnp.concatenate([cls, x], axis=1)  # [N, 1 + g*g, D]
        x = x + self.pos_embed[...]
        if self.pre_norm is not None:
            x = self.pre_norm(x)
        states = [x]
        for layer in self.layers:
            x = layer(x)
            states.append(x)
        return jnp.stack(states)
