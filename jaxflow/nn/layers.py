"""Small building blocks shared by the CLIP tower and the Llama decoder.

Kernels are stored as [in, out] (PyTorch `Linear.weight` transposed); the converter does the
transpose. Norms compute in float32 and cast back, like transformers. Every parameter carries
logical axis names (`out_sharding` metadata, e.g. ("embed", "mlp")); `jaxflow.sharding` maps them
to mesh axes with one rules table.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

_init = nnx.initializers.normal(0.02)


def param(value, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter annotated with logical axis names (applied only when a mesh is given)."""
    return nnx.Param(value, out_sharding=axes, eager_sharding=False)


class Linear(nnx.Module):
    def __init__(self, d_in: int, d_out: int, *, bias: bool, dtype, rngs: nnx.Rngs, axes=(None, None)):
        self.kernel = param(_init(rngs.params(), (d_in, d_out), dtype), axes)  # [in, out]
        self.bias = param(jnp.zeros((d_out,), dtype), axes[1:]) if bias else None  # [out]

    def __call__(self, x):
        y = x @ self.kernel[...]
        return y + self.bias[...] if self.bias is not None else y


class Embed(nnx.Module):
    def __init__(self, vocab: int, dim: int, *, dtype, rngs: nnx.Rngs):
        self.embedding = param(_init(rngs.params(), (vocab, dim), dtype), ("vocab", "embed"))  # [V, D]

    def __call__(self, ids):
        return jnp.take(self.embedding[...], ids, axis=0)

    def attend(self, x):
        """Tied unembedding: [..., D] -> [..., V]."""
        return x @ self.embedding[...].T


class RMSNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, axis: str = "embed"):
        self.scale = param(jnp.ones((dim,), dtype), (axis,))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.scale[...] * x32.astype(x.dtype)


class LayerNorm(nnx.Module):
    def __init__(self, dim: int, eps: float, *, dtype, axis: str = "vision_embed"):
        self.scale = param(jnp.ones((dim,), dtype), (axis,))
        self.bias = param(jnp.zeros((dim,), dtype), (axis,))
        self.eps = eps

    def __call__(self, x):
        x32 = x.astype(jnp.float32)
        mean = jnp.mean(x32, axis=-1, keepdims=True)
        var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
        y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
        return (y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)).astype(x.dtype)


def quick_gelu(x):
    return x * jax.nn.sigmoid(1.702 * x)
