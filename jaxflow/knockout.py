"""Attention knockouts as data.

A `Knockout` cuts the attention edges target -> source (target positions may not attend to
source positions) in some layers and heads. Positions index the full, image-expanded sequence.
`KnockoutMasks` is the compact array form the model consumes: per spec a source mask [B, T], a
target mask [B, T], a layer mask [L] and a head mask [H]; with a leading spec axis K it is what
`jax.vmap` maps over. The cut [H, T, T] for one layer is formed inside attention, next to the
scores, so [K, L, T, T] is never materialised. `DenseKnockout` is the escape hatch for
arbitrary per-layer patterns.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Knockout:
    """Cut attention from `target` positions to `source` positions.

    source, target: positions in the image-expanded sequence, or a region name ("image", "last", ...: see
    `jaxflow.inputs.regions.REGIONS`) looked up in each row's regions when the model is called with a `Sample`
    or `Batch`. layers: the decoder layers where the cut applies (None: all). heads: query heads (None: all).
    """

    source: Sequence[int] | str
    target: Sequence[int] | str
    layers: Sequence[int] | None = None
    heads: Sequence[int] | None = None


@dataclasses.dataclass(frozen=True)
class DenseKnockout:
    """Arbitrary cuts: `mask` [L, T, T] or [L, B, T, T] bool, True where query t may not see key s."""

    mask: np.ndarray


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class KnockoutMasks:
    """Compact knockout arrays (leading spec axis optional). True marks what is cut."""

    source: jax.Array  # [B, T] bool
    target: jax.Array  # [B, T] bool
    layers: jax.Array  # [L] bool
    heads: jax.Array  # [H] bool
    dense: jax.Array | None = None  # [L, B, T, T] bool

    def cut(self, layer: int, q_pos: jax.Array, kv_pos: jax.Array) -> jax.Array:
        """Edges cut in `layer`: [B, H, Tq, S] bool for queries at q_pos [B, Tq], keys at kv_pos [B, S]."""
        target = jnp.take_along_axis(self.target, q_pos, axis=1)  # [B, Tq]
        source = jnp.take_along_axis(self.source, kv_pos, axis=1)  # [B, S]
        cut = (self.layers[layer] & self.heads[None, :, None, None]
               & target[:, None, :, None] & source[:, None, None, :])
        if self.dense is not None:
            dense = jnp.take_along_axis(self.dense[layer], q_pos[:, :, None], axis=1)  # [B, Tq, T]
            dense = jnp.take_along_axis(dense, kv_pos[:, None, :], axis=2)  # [B, Tq, S]
            cut = cut | dense[:, None]
        return cut


def index_mask(label: str, values, size: int, what: str) -> np.ndarray:
    """[size] bool, True at `values`; `label` (e.g. "knockouts[0].source") names the argument in errors."""
    values = np.asarray(list(values), dtype=np.int64)
    bad = values[(values < 0) | (values >= size)]
    if bad.size:
        raise ValueError(f"{label}: {what} {bad.tolist()} out of range [0, {size})")
    mask = np.zeros(size, bool)
    mask[values] = True
    return mask


def position_rows(label: str, values, batch: int, seq_len: int, regions) -> np.ndarray:
    """[batch, seq_len] bool: positions, or a region name resolved in each row's regions (one `Regions` per
    row, or None)."""
    if not isinstance(values, str):
        return np.broadcast_to(index_mask(label, values, seq_len, "positions"), (batch, seq_len))
    if regions is None:
        raise ValueError(f"{label}: region {values!r} needs the model called with a Sample or Batch")
    out = np.zeros((batch, seq_len), bool)
    for b, row in enumerate(regions):
        if values not in row:
            why = row.undefined.get(values, f"not a region (known: {', '.join(sorted(row))})")
            raise ValueError(f"{label}: row {b} has no region {values!r}: {why}")
        out[b] = index_mask(label, row[values], seq_len, f"region {values!r} positions")
    return out


def stack_knockouts(knockouts: Sequence[Knockout | DenseKnockout], batch: int, seq_len: int,
                    num_layers: int, num_heads: int, regions=None) -> KnockoutMasks:
    """Stacks K specs into KnockoutMasks with a leading axis K (numpy, host side). `regions`: one
    `jaxflow.inputs.regions.Regions` per row, for knockouts that name regions."""
    if not knockouts:
        raise ValueError("knockouts: an empty list; pass None for no knockout")
    any_dense = any(isinstance(k, DenseKnockout) for k in knockouts)
    rows = []
    for i, ko in enumerate(knockouts):
        empty_t = np.zeros((batch, seq_len), bool)
        if isinstance(ko, DenseKnockout):
            mask = np.asarray(ko.mask, bool)
            if mask.ndim == 3:
                mask = np.broadcast_to(mask[:, None], (mask.shape[0], batch) + mask.shape[1:])
            if mask.shape != (num_layers, batch, seq_len, seq_len):
                raise ValueError(f"knockouts[{i}].mask: shape {np.shape(ko.mask)}, expected [{num_layers}, "
                                 f"{seq_len}, {seq_len}] or [{num_layers}, {batch}, {seq_len}, {seq_len}]")
            rows.append((empty_t, empty_t, np.zeros(num_layers, bool), np.zeros(num_heads, bool), mask))
            continue
        if not isinstance(ko, Knockout):
            raise TypeError(f"knockouts[{i}]: expected Knockout or DenseKnockout, got {type(ko).__name__}")
        source = position_rows(f"knockouts[{i}].source", ko.source, batch, seq_len, regions)
        target = position_rows(f"knockouts[{i}].target", ko.target, batch, seq_len, regions)
        layers = (np.ones(num_layers, bool) if ko.layers is None
                  else index_mask(f"knockouts[{i}].layers", ko.layers, num_layers, "layers"))
        heads = (np.ones(num_heads, bool) if ko.heads is None
                 else index_mask(f"knockouts[{i}].heads", ko.heads, num_heads, "heads"))
        dense = np.zeros((num_layers, batch, seq_len, seq_len), bool) if any_dense else None
        rows.append((source, target, layers, heads, dense))
    cols = list(zip(*rows, strict=True))
    return KnockoutMasks(*(np.stack(c) for c in cols[:4]), dense=np.stack(cols[4]) if any_dense else None)
