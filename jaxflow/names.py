"""Activation names, as TransformerLens spells them (`Model.run_with_cache`).

Per decoder layer l (shapes for a batch [B, T]; with K knockouts a leading K):

- `blocks.{l}.hook_resid_pre` [B, T, D]: the residual stream entering layer l (transformers' hidden_states[l]);
- `blocks.{l}.hook_resid_mid` [B, T, D]: after layer l's attention was added;
- `blocks.{l}.hook_resid_post` [B, T, D]: leaving layer l (hidden_states[l + 1], no final norm);
- `blocks.{l}.attn.hook_pattern` [B, H, T, T]: attention weights (query, key), rows sum to 1;
- `blocks.{l}.hook_attn_out` [B, T, D]: the attention's output after o_proj, before the residual add;
- `blocks.{l}.hook_mlp_out` [B, T, D]: the MLP's output, before the residual add;

and once: `ln_final.hook_normalized` [B, T, D] (the final norm's output, what the unembedding reads) and
`hook_image_embeds` [N, F, D] (the projector's output per crop, before image features are placed in the sequence;
never changed by a knockout).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

PER_LAYER = {  # name pattern -> (what the forward collects, layer offset into it)
    "blocks.{l}.hook_resid_pre": ("hidden", 0),
    "blocks.{l}.hook_resid_mid": ("mid", 0),
    "blocks.{l}.hook_resid_post": ("hidden", 1),
    "blocks.{l}.attn.hook_pattern": ("pattern", 0),
    "blocks.{l}.hook_attn_out": ("attn_out", 0),
    "blocks.{l}.hook_mlp_out": ("mlp_out", 0),
}
ONCE = {"ln_final.hook_normalized": "normalized", "hook_image_embeds": "image_embeds"}
_PATTERNS = [(re.compile(re.escape(p).replace(r"\{l\}", r"(\d+)") + "$"), kind) for p, kind in PER_LAYER.items()]


def all_names(num_layers: int) -> list[str]:
    """Every name of a model with `num_layers` decoder layers, layer by layer."""
    return [p.format(l=i) for i in range(num_layers) for p in PER_LAYER] + list(ONCE)


def collect_plan(names: Sequence[str], num_layers: int) -> tuple[tuple[str, int], ...]:
    """names -> the (kind, layer) pairs the forward collects, in the same order; ValueError naming a bad name."""
    plan = []
    for name in names:
        if name in ONCE:
            plan.append((ONCE[name], 0))
            continue
        for pattern, (kind, offset) in _PATTERNS:
            m = pattern.match(name)
            if m:
                layer = int(m.group(1))
                if layer >= num_layers:
                    raise ValueError(f"names: {name!r}: layer {layer} out of range [0, {num_layers})")
                plan.append((kind, layer + offset))
                break
        else:
            raise ValueError(f"names: unknown activation {name!r}; known: {', '.join(PER_LAYER)}, {', '.join(ONCE)}")
    return tuple(plan)
