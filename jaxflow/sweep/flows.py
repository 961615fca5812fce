"""What a sweep cuts: flows (source region -> target region, optionally a head subset), the study's
layer window, and the knockout masks of every (flow, layer) configuration of a batch."""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Sequence

import numpy as np

from jaxflow.knockout import KnockoutMasks

STUDY_FLOWS = {
    "Image->Question": ("image", "question"),
    "Image->Last": ("image", "last"),
    "Question->Last": ("question", "last"),
    "Last->Last": ("last", "last"),
    "Related image patches->Question": ("related_image_patches", "question"),
    "Other image patches->Question": ("other_image_patches", "question"),
}


@dataclasses.dataclass(frozen=True)
class Flow:
    """source -> target: target positions may not attend to source positions (in `heads`, all if None)."""

    name: str
    source: str
    target: str
    heads: tuple[int, ...] | None = None


def parse_flow(text: str) -> Flow:
    """'Image->Question', 'related_image_patches->last', 'image->last@0,1' (a head subset)."""
    spec, _, heads = text.partition("@")
    if spec in STUDY_FLOWS:
        source, target = STUDY_FLOWS[spec]
    else:
        source, sep, target = spec.partition("->")
        if not sep or not source.strip() or not target.strip():
            raise ValueError(f"--flows: {text!r} is not SOURCE->TARGET (region names, e.g. image->question)")
        source, target = (s.strip().lower().replace(" ", "_") for s in (source, target))
    head_list = tuple(int(h) for h in heads.split(",")) if heads else None
    return Flow(text, source, target, head_list)


def window(layer: int, k: int, num_layers: int) -> list[int]:
    """The study's window: layers max(0, l - k//2) .. min(L, l + ceil(k/2)) - 1."""
    return list(range(max(0, layer - k // 2), min(num_layers, layer + math.ceil(k / 2))))


class WindowWarning(UserWarning):
    """A knockout window as wide as the model: the curves over layers say little."""


def check_window(k: int, num_layers: int) -> None:
    """Warns (WindowWarning) when a window of k layers is at least the model's num_layers: the window around the
    middle layer then cuts every layer, and the curves over layers are (nearly) flat."""
    if k >= num_layers:
        warnings.warn(f"window {k} is at least the model's {num_layers} layers: the window around layer "
                      f"{num_layers // 2} cuts every layer (0-{num_layers - 1}), so the curves over layers are "
                      f"(nearly) flat; choose a window below {num_layers}", WindowWarning, stacklevel=3)


def knockout_masks(flows: Sequence[Flow], rows, t: int, num_layers: int, num_heads: int, k: int) -> KnockoutMasks:
    """KnockoutMasks [F * L, B, T] for the Prepared `rows` of a batch: configuration f * L + l cuts flow f in
    the window around layer l."""
    n = len(flows) * num_layers
    b = len(rows)
    source, target = np.zeros((n, b, t), bool), np.zeros((n, b, t), bool)
    layers, heads = np.zeros((n, num_layers), bool), np.ones((n, num_heads), bool)
    for f, flow in enumerate(flows):
        for j, p in enumerate(rows):
            regions = p.inputs.regions
            for name in (flow.source, flow.target):
                if name not in regions:
                    raise KeyError(f"region {name!r} is not defined for question {p.sample.question_id} "
                                   f"(known: {', '.join(sorted(regions))})")
            source[f * num_layers:(f + 1) * num_layers, j, regions[flow.source]] = True
            target[f * num_layers:(f + 1) * num_layers, j, regions[flow.target]] = True
        for layer in range(num_layers):
            layers[f * num_layers + layer, window(layer, k, num_layers)] = True
            if flow.heads is not None:
                heads[f * num_layers + layer] = False
                heads[f * num_layers + layer, list(flow.heads)] = True
    return KnockoutMasks(source, target, layers, heads)
