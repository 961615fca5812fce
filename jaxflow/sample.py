"""A sample: one image and one question as model inputs, with its named regions and its image geometry.

`Model.sample(image, question, boxes)` builds one; `batch(samples)` right-pads several into one `Batch`. Every
`Model` call takes a `Sample` or a `Batch` in place of its arrays, and a `Knockout` may then name regions
(`Knockout("image", "last")`) instead of positions: they are looked up in each row's own regions.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping, Sequence

import numpy as np
import PIL.Image

from jaxflow.geometry import Box, ImageLayout
from jaxflow.inputs.prompts import Prompt
from jaxflow.inputs.regions import Regions

ImageLike = str | os.PathLike | PIL.Image.Image | np.ndarray


@dataclasses.dataclass(frozen=True, eq=False)
class Sample:
    """One image and question, ready for the model (arrays batched, B = 1).

    `regions`: every region the sweep knows (`jaxflow.inputs.regions.REGIONS`), name -> sorted positions in the
    image-expanded sequence; `regions.undefined` says why one is absent. Image positions are `regions["image"]`;
    `layout` and `image_rects` describe them in that order: the crop, patch row and column each one comes from,
    and the rectangle of the original image it sees."""

    input_ids: np.ndarray  # [1, T] int64, the image token repeated once per image feature
    pixel_values: np.ndarray  # [1, 3, S, S] (LLaVA-1.5) or [1, crops, 3, S, S] (anyres)
    image_sizes: np.ndarray | None  # [1, 2] (height, width); anyres models only
    regions: Regions
    prompt: Prompt  # the rendered prompt: .text, .question, .template
    image: PIL.Image.Image  # the original image, RGB
    boxes: dict[str, Box]  # name -> (x, y, w, h) in original pixels
    layout: ImageLayout  # per image position: crop (0 base, k grid crop, -1 newline, -2 OneVision cell), row, col
    image_rects: np.ndarray  # [F, 4] (x0, y0, x1, y1) in original pixels; NaN: newline, CLS, padding only
    related_patches: str = "study"  # the rule behind regions["related_image_patches"]

    def __len__(self) -> int:
        return self.input_ids.shape[1]

    @property
    def rows(self) -> tuple[Sample, ...]:
        return (self,)

    @property
    def attention_mask(self) -> np.ndarray:
        return np.ones(self.input_ids.shape, np.int64)  # [1, T]

    @property
    def last(self) -> np.ndarray:
        """[1]: the last prompt position, where the answer's first token is predicted."""
        return np.asarray([len(self) - 1])

    @property
    def image_positions(self) -> np.ndarray:
        return self.regions["image"]  # [F]

    def inputs(self) -> dict[str, np.ndarray | None]:
        """The model's keyword arguments (input_ids, pixel_values, image_sizes, attention_mask)."""
        return {"input_ids": self.input_ids, "pixel_values": self.pixel_values, "image_sizes": self.image_sizes,
                "attention_mask": self.attention_mask}


@dataclasses.dataclass(frozen=True, eq=False)
class Batch:
    """Several samples right-padded to one length (`batch`)."""

    rows: tuple[Sample, ...]
    input_ids: np.ndarray  # [B, T] int64, padded with pad_id
    pixel_values: np.ndarray  # [B, 3, S, S] or [B, crops, 3, S, S] (missing crops zero)
    image_sizes: np.ndarray | None  # [B, 2] (height, width); anyres models only
    attention_mask: np.ndarray  # [B, T] int64: 1 on each row's prompt, 0 on padding

    def __len__(self) -> int:
        return self.input_ids.shape[1]

    @property
    def last(self) -> np.ndarray:
        """[B]: each row's last prompt position."""
        return self.attention_mask.sum(axis=1) - 1

    @property
    def regions(self) -> list[Regions]:
        return [s.regions for s in self.rows]

    def inputs(self) -> dict[str, np.ndarray | None]:
        return {"input_ids": self.input_ids, "pixel_values": self.pixel_values, "image_sizes": self.image_sizes,
                "attention_mask": self.attention_mask}


def pad_rows(input_ids: Sequence[np.ndarray], pixel_values: Sequence[np.ndarray], t: int | None = None,
             pad_id: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Right-pads 1-D token rows to [B, t] (default: the longest) and stacks per-row pixels ([3, S, S], or
    [crops, 3, S, S] with missing crops zero). Returns input_ids [B, t], attention_mask [B, t], pixel_values."""
    t = max(len(r) for r in input_ids) if t is None else t
    ids = np.full((len(input_ids), t), pad_id, np.int64)
    mask = np.zeros((len(input_ids), t), np.int64)
    for i, row in enumerate(input_ids):
        ids[i, : len(row)] = row
        mask[i, : len(row)] = 1
    if pixel_values[0].ndim == 4:  # anyres: crops differ per image
        n = max(len(x) for x in pixel_values)
        pixel_values = [np.concatenate([x, np.zeros((n - len(x),) + x.shape[1:], x.dtype)]) for x in pixel_values]
    return ids, mask, np.stack(pixel_values)


def batch(samples: Sequence[Sample], pad_id: int = 0) -> Batch:
    """Right-pads samples of one model into a Batch (padding is masked out, so `pad_id` changes nothing)."""
    samples = tuple(samples)
    if not samples or not all(isinstance(s, Sample) for s in samples):
        raise TypeError("batch: expected a non-empty sequence of Sample (from Model.sample)")
    ids, mask, pixels = pad_rows([s.input_ids[0] for s in samples], [s.pixel_values[0] for s in samples],
                                 pad_id=pad_id)
    sizes = None if samples[0].image_sizes is None else np.concatenate([s.image_sizes for s in samples])
    return Batch(samples, ids, pixels, sizes, mask)


def open_image(image: ImageLike) -> PIL.Image.Image:
    """An RGB PIL image from a path, a PIL image, or an array [H, W, 3] (uint8, or float in [0, 1])."""
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    if isinstance(image, np.ndarray):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image: an array must be [height, width, 3], got shape {image.shape}")
        if image.dtype != np.uint8:
            image = np.clip(np.round(np.asarray(image, np.float64) * 255), 0, 255).astype(np.uint8)
        return PIL.Image.fromarray(image, "RGB")
    path = os.fspath(image)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"image: no such file {path}")
    with PIL.Image.open(path) as im:
        return im.convert("RGB")


def named_boxes(boxes: Sequence[Box] | Mapping[str, Box] | None) -> dict[str, Box]:
    """boxes as name -> (x, y, w, h): a dict as given (the names are the objects' names in the question), a list
    named box0, box1, ..."""
    if boxes is None:
        return {}
    items = boxes.items() if isinstance(boxes, Mapping) else ((f"box{i}", b) for i, b in enumerate(boxes))
    out = {}
    for name, box in items:
        box = tuple(float(v) for v in box)
        if len(box) != 4:
            raise ValueError(f"boxes[{name!r}]: expected (x, y, w, h), got {box}")
        out[name] = box
    return out


def option_spans(question: str, options: Sequence[str] | None) -> tuple:
    """Character spans of the (true, false) answer options in the question, or (None, None)."""
    if options is None:
        return None, None
    if len(options) != 2:
        raise ValueError(f"options: expected (true option, false option), got {options!r}")
    spans = []
    for name, word in zip(("true", "false"), options, strict=True):
        start = question.find(word)
        if start < 0:
            raise ValueError(f"options: the {name} option {word!r} does not occur in the question {question!r}")
        spans.append((start, start + len(word)))
    return tuple(spans)
