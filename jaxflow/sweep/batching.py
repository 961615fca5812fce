"""From task rows to device batches: build each sample's inputs (prompt, pixels, regions), sort by
length, and pad to a few bucket lengths with a fixed batch size, so a task file compiles a handful
of times."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image

from jaxflow.inputs import gqa
from jaxflow.inputs.regions import SampleInputs, build_sample
from jaxflow.model import Model
from jaxflow.sample import pad_rows


@dataclasses.dataclass
class Prepared:
    sample: gqa.GQASample
    inputs: SampleInputs


def prepare(model: Model, samples: Sequence[gqa.GQASample], template: str | None, image_loader=None,
            related_patches: str = "study", required: Sequence[str] = ()):
    """Yields Prepared, or (sample, reason) for a sample that cannot be used (e.g. lacks a `required` region).
    template: None for the checkpoint's (`Model.default_template`)."""
    template = template or model.default_template
    for s in samples:
        try:
            if image_loader is not None:
                image = image_loader(s)
            else:
                with Image.open(s.image_path) as im:
                    image = im.convert("RGB")
            yield Prepared(s, build_sample(model.config, model.tokenizer, image, s.question, mode=model.prompt_mode,
                                           template=template, boxes=s.boxes,
                                           option_spans=(s.true_option_span, s.false_option_span),
                                           object_names=s.box_names, related_patches=related_patches,
                                           settings=model.processor, required=required))
        except Exception as e:  # a bad sample is recorded with its reason; the run goes on
            yield s, f"{type(e).__name__}: {e}"


def _bucket(n: int, step: int = 32) -> int:
    return -(-n // step) * step


def batches(items: list[Prepared], batch: int, step: int = 32):
    """Length-sorted batches of exactly `batch` rows (the last padded by repeating its first row), each
    padded to a multiple of `step` tokens."""
    items = sorted(items, key=lambda p: len(p.inputs))
    for i in range(0, len(items), batch):
        group = items[i:i + batch]
        yield group, _bucket(max(len(p.inputs) for p in group), step)


def stack_inputs(model: Model, group: list[Prepared], batch: int, t: int):
    """Pads a group to [batch, t]; returns (ModelInputs, lengths [batch])."""
    rows = group + [group[0]] * (batch - len(group))
    ids, mask, pixels = pad_rows([p.inputs.input_ids for p in rows], [p.inputs.pixel_values[0] for p in rows], t,
                                 model.tokenizer.pad_token_id or 0)
    sizes = np.asarray([p.inputs.image_size for p in rows]) if model.config.image.anyres else None
    return model.prepare(ids, pixels, sizes, mask), mask.sum(1)
