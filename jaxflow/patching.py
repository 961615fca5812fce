"""Activation patching and corruptions as data.

A `Patch` replaces the activation at one site (TransformerLens' names without `hook_`: "resid_pre", "attn_out",
"mlp_out", "z") in some layers, at some positions (and, for "z", some query heads) by a source run's activation
there. `PatchMasks` is its compact array form, with a leading configuration axis K for `jax.vmap`, like
`KnockoutMasks`. Inside the decoder an edit is a `SiteEdit` per site and layer: a replacement (a patch) and/or an
addition (the zero offsets that attribution patching differentiates). A `Noise` corrupts input embeddings.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxflow.knockout import index_mask, position_rows

SITES = ("resid_pre", "attn_out", "mlp_out", "z")


@dataclasses.dataclass(frozen=True)
class Patch:
    """Replace the activation at `site` in `layers` at `positions` (and `heads`) by the source run's.

    site: "resid_pre" (the residual stream entering layer l, transformers' hidden_states[l]), "attn_out" (the
    attention's output after o_proj, before the residual add), "mlp_out" (the MLP's output, before the residual
    add) or "z" (the per-head attention output before o_proj). layers: decoder layers (an int or a list).
    positions: positions in the image-expanded sequence, or a region name resolved per row when the model is called
    with a `Sample` or `Batch`. heads: query heads, for "z" only (None: all).
    """

    site: str
    layers: int | Sequence[int]
    positions: Sequence[int] | str
    heads: Sequence[int] | None = None


@dataclasses.dataclass(frozen=True)
class Noise:
    """Gaussian noise added to the input embeddings at `positions` (positions or a region name, as `Patch`).

    Its standard deviation at a position is `scale` times the model's embedding std of that position's modality
    (`Model.embedding_std`: image features or text token embeddings; ROME's 3x). The noise is drawn from
    `jax.random.key(seed)` with shape [B, T, D]: the same seed gives the same noise."""

    positions: Sequence[int] | str
    scale: float = 3.0
    seed: int = 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SiteEdit:
    """An edit of one site's activation a [B, Tq, D] ("z": [B, Tq, H, hd]) in one layer: where `mask` is True, a
    becomes `value`; then `add` is added. Absent parts are None."""

    mask: jax.Array | None = None  # [B, Tq, 1] bool ("z": [B, Tq, H, 1])
    value: jax.Array | None = None  # like a
    add: jax.Array | None = None  # like a

    def __call__(self, a):
        if self.mask is not None:
            a = jnp.where(self.mask, self.value.astype(a.dtype), a)
        return a if self.add is None else a + self.add.astype(a.dtype)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class PatchMasks:
    """Compact patch arrays (leading configuration axis K optional). True marks what is patched."""

    site: jax.Array  # [] int32: index into SITES
    layers: jax.Array  # [L] bool
    positions: jax.Array  # [B, T] bool
    heads: jax.Array  # [H] bool (all True for sites other than "z")

    def edits(self, layer: int, q_pos: jax.Array, source: Mapping[str, jax.Array]) -> dict[str, SiteEdit]:
        """The replacements in `layer` for queries at q_pos [B, Tq]: one SiteEdit per site in `source` (site ->
        the source run's activations [L, B, T, D], "z" [L, B, T, H, hd])."""
        rows = jnp.arange(q_pos.shape[0])[:, None]
        at = jnp.take_along_axis(self.positions, q_pos, axis=1) & self.layers[layer]  # [B, Tq]
        out = {}
        for name, acts in source.items():
            on = at & (self.site == SITES.index(name))
            mask = on[..., None, None] & self.heads[:, None] if name == "z" else on[..., None]
            out[name] = SiteEdit(mask, acts[layer][rows, q_pos])
        return out


def stack_patches(patches: Sequence[Patch], batch: int, seq_len: int, num_layers: int, num_heads: int,
                  regions=None) -> PatchMasks:
    """Stacks K patches into PatchMasks with a leading axis K (numpy, host side). `regions`: one
    `jaxflow.inputs.regions.Regions` per row, for patches that name regions."""
    if not patches:
        raise ValueError("patches: an empty list; pass None for no patch")
    rows = []
    for i, p in enumerate(patches):
        if not isinstance(p, Patch):
            raise TypeError(f"patches[{i}]: expected Patch, got {type(p).__name__}")
        if p.site not in SITES:
            raise ValueError(f"patches[{i}].site: {p.site!r} is not one of {', '.join(SITES)}")
        if p.heads is not None and p.site != "z":
            raise ValueError(f"patches[{i}].heads: heads select per-head outputs, site 'z' only (got {p.site!r})")
        layers = [p.layers] if np.isscalar(p.layers) else p.layers
        rows.append((np.int32(SITES.index(p.site)),
                     index_mask(f"patches[{i}].layers", layers, num_layers, "layers"),
                     position_rows(f"patches[{i}].positions", p.positions, batch, seq_len, regions),
                     np.ones(num_heads, bool) if p.heads is None
                     else index_mask(f"patches[{i}].heads", p.heads, num_heads, "heads")))
    return PatchMasks(*(np.stack(c) for c in zip(*rows, strict=True)))


def sites_used(patch: PatchMasks) -> tuple[str, ...]:
    """The sites any configuration of `patch` [K, ...] patches, in SITES order."""
    return tuple(SITES[i] for i in sorted(set(np.asarray(patch.site).tolist())))


def noise_offset(noise: Noise, feature_index, std: Mapping[str, float], hidden: int, regions=None) -> jax.Array:
    """The noise [B, T, D] float32 that `noise` adds to the input embeddings: feature_index [B, T] (>= 0 at image
    positions) picks each position's modality, std its embedding std ("image", "text")."""
    b, t = feature_index.shape
    where = position_rows("noise.positions", noise.positions, b, t, regions)  # [B, T]
    sigma = np.where(np.asarray(feature_index) >= 0, std["image"], std["text"]) * noise.scale * where  # [B, T]
    return jax.random.normal(jax.random.key(noise.seed), (b, t, hidden), jnp.float32) * sigma[..., None]
