"""From an image and a question to model inputs and named token regions.

Regions are sorted position lists in the full, image-expanded sequence (`REGIONS`; the study's names in
parentheses):

- `image` (Image): every image feature; `question` (Question); `last` (Last);
- `true_option`, `false_option` (True / False Option), `question_without_options`: Choose* rows;
- `central_object` (Central Object): the tokens of the question-related objects' names in the question (the
  central object's, or object1's and object2's in the two-object tasks), each found as a word
  (`gqa.find_name`);
- `related_image_patches` (Image Central Object): the image features that hold a question-related object, by
  the study's red-mask rule or by geometric overlap (`related_patches`, see `jaxflow.inputs.images`); empty when
  the boxes are too small for any patch to stay pure red; `other_image_patches` (Image Without Central Object):
  the other image features, `image_newline` slots excluded;
- anyres models only (LLaVA-NeXT and OneVision, `NEXT_REGIONS`): `image_base` (Image Original Patch): the base
  image's features; `image_grid` (Image HD Patch): every image feature after them, the grid's patches (OneVision:
  the downsampled cells, when the grid is downsampled) and its newline slots;
  `image_newline`: the newline slots (what the study's anyres mask calls "Image Pad");
  `related_image_patches_grid` (Image Central Object in HD Patch): the related features in the grid;
  `image_grid_without_related` (Image HD Patch Without Central Object): `image_grid` minus those, newline slots
  included as in the study.

A region a sample lacks (no answer options, an object name missing from the question, a NeXT region on
LLaVA-1.5) is absent, and `regions.undefined[name]` says why. Users add regions by prompt substring or by box.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Collection, Sequence

import numpy as np
from PIL import Image

from jaxflow import geometry
from jaxflow.config import ModelConfig
from jaxflow.geometry import image_layout
from jaxflow.inputs import gqa, images, prompts

Box = tuple[float, float, float, float]  # x, y, w, h in original image pixels
NEXT_REGIONS = ("image_base", "image_grid", "image_newline", "related_image_patches_grid",
                "image_grid_without_related")
REGIONS = ("image", "question", "last", "true_option", "false_option", "question_without_options", "central_object",
           "related_image_patches", "other_image_patches") + NEXT_REGIONS


class Regions(dict):
    """Region name -> sorted positions [n] int64; `undefined`: region name -> why this sample lacks it."""

    def __init__(self, regions: dict[str, np.ndarray], undefined: dict[str, str] | None = None):
        super().__init__(regions)
        self.undefined = dict(undefined or {})


@dataclasses.dataclass(frozen=True)
class SampleInputs:
    """One prompt + image, ready for the model, with its regions."""

    input_ids: np.ndarray  # [T] int64
    pixel_values: np.ndarray  # [1, 3, S, S] (1.5) or [1, crops, 3, S, S] (NeXT)
    image_size: tuple[int, int]  # (height, width)
    regions: Regions  # name -> sorted positions
    prompt: prompts.Prompt
    encoded: prompts.Encoded
    related_patches: str = "study"  # the rule behind related_image_patches

    def __len__(self) -> int:
        return len(self.input_ids)


class RegionError(ValueError):
    """A region cannot be located (e.g. the question is not covered by whole tokens)."""


default_template = prompts.default_template  # re-exported: callers import it from here


def check_region_names(names: Collection[str], cfg: ModelConfig) -> None:
    """ValueError for a name that is not a region (`REGIONS`), or a LLaVA-NeXT region with a LLaVA-1.5 config."""
    unknown = sorted(set(names) - set(REGIONS))
    if unknown:
        raise ValueError(f"unknown region(s) {', '.join(unknown)}; known: {', '.join(REGIONS)}")
    next_only = sorted(set(names) & set(NEXT_REGIONS))
    if next_only and not cfg.image.anyres:
        raise ValueError(f"region(s) {', '.join(next_only)} exist only for LLaVA-NeXT (anyres) models")


def require(regions: Regions, names: Collection[str]) -> None:
    """RegionError naming the first of `names` this sample lacks, and why."""
    for name in sorted(names):
        if name not in regions:
            why = regions.undefined.get(name, f"not a region (known: {', '.join(sorted(regions))})")
            raise RegionError(f"region {name!r}: {why}")


def _span(encoded, start: int, end: int, what: str) -> np.ndarray:
    problem = prompts.span_problem(encoded, start, end)
    if problem:
        raise RegionError(f"{what}: {problem}")
    return np.asarray(prompts.token_span(encoded, start, end), np.int64)


def box_region(cfg: ModelConfig, size: tuple[int, int], encoded, boxes: Sequence[Box], related_patches: str = "study",
               settings: images.ProcessorSettings | None = None) -> np.ndarray:
    """Image positions of the patches related to `boxes` (after the image's own geometry), by `related_patches`."""
    related = images.related_features(cfg, size, list(boxes), related_patches, settings)
    return np.asarray(encoded.image_positions, np.int64)[related]


def substring_region(prompt: prompts.Prompt, encoded, substring: str, occurrence: int = 0) -> np.ndarray:
    """Positions of the tokens covering the `occurrence`-th match of `substring` in the prompt text."""
    start = -1
    for _ in range(occurrence + 1):
        start = prompt.text.find(substring, start + 1)
        if start < 0:
            raise RegionError(f"substring {substring!r} not found in the prompt")
    return _span(encoded, start, start + len(substring), f"substring {substring!r}")


def _names_region(prompt: prompts.Prompt, encoded, names: Sequence[str]) -> tuple[np.ndarray | None, str | None]:
    """The tokens of every object name in the question, or (None, why not)."""
    if not names:
        return None, "no object names given (the task row names no question-related object)"
    spans = []
    for name in names:
        found = gqa.find_name(prompt.question, name) if name.strip() else None
        if found is None:
            return None, f"object name {name!r} does not occur in the question as a word"
        start, end = prompt.question_substring_span(*found)
        problem = prompts.span_problem(encoded, start, end)
        if problem:
            return None, f"object name {name!r}: {problem}"
        spans.append(prompts.token_span(encoded, start, end))
    return np.unique(np.concatenate(spans)).astype(np.int64), None


def locate(cfg: ModelConfig, tokenizer, size: tuple[int, int], question: str, *, mode: str = "llava-hf",
           template: str | None = None, boxes: Sequence[Box] = (), option_spans=(None, None),
           object_names: Sequence[str] = (), related_patches: str = "study",
           settings: images.ProcessorSettings | None = None):
    """Renders the prompt, tokenizes it for an image of `size` (height, width) and locates every
    region (no pixels needed). Returns (prompt, encoded, regions).

    option_spans: character spans of the true and false options inside `question` (or None).
    object_names: names of the question-related objects (one per box in the GQA task files), for `central_object`.
    related_patches: "study" or "overlap"; settings: the model's processor settings (the study rule's mask goes
    through the same preprocessing as the image).
    """
    prompt = prompts.build_prompt(question, template or default_template(tokenizer), mode=mode)
    lay = image_layout(cfg, size)
    encoded = prompts.encode(prompt, tokenizer, cfg.image_token_id, len(lay), mode)
    image_pos = np.asarray(encoded.image_positions, np.int64)
    regions = {
        "image": image_pos,
        "question": _span(encoded, *prompt.question_span, "question"),
        "last": np.asarray([encoded.last_position], np.int64),
    }
    undefined = {}
    options = []
    for name, span in zip(("true_option", "false_option"), option_spans, strict=True):
        if span is not None:
            regions[name] = _span(encoded, *prompt.question_substring_span(*span), name)
            options.append(regions[name])
        else:
            undefined[name] = "the row has no such answer option (only Choose* questions have options)"
    if options:
        regions["question_without_options"] = np.setdiff1d(regions["question"], np.concatenate(options))
    else:
        undefined["question_without_options"] = "the row has no answer options"
    central, why = _names_region(prompt, encoded, object_names)
    if central is None:
        undefined["central_object"] = why
    else:
        regions["central_object"] = central
    related = images.related_features(cfg, size, list(boxes), related_patches, settings)
    regions["related_image_patches"] = image_pos[related]
    regions["other_image_patches"] = image_pos[~related & ~lay.is_newline]
    if cfg.image.anyres:
        grid = lay.crop != 0  # everything after the base image: grid patches and newline slots
        regions["image_base"] = image_pos[~grid]
        regions["image_grid"] = image_pos[grid]
        regions["image_newline"] = image_pos[lay.is_newline]
        regions["related_image_patches_grid"] = image_pos[related & grid]
        regions["image_grid_without_related"] = image_pos[grid & ~related]
    else:
        undefined.update({name: "LLaVA-NeXT (anyres) only: this model has no anyres grid" for name in NEXT_REGIONS})
    return prompt, encoded, Regions({k: np.sort(v) for k, v in regions.items()}, undefined)


def build_sample(cfg: ModelConfig, tokenizer, image: Image.Image, question: str, *, mode: str = "llava-hf",
                 template: str | None = None, boxes: Sequence[Box] = (), option_spans=(None, None),
                 object_names: Sequence[str] = (), related_patches: str = "study",
                 settings: images.ProcessorSettings | None = None, required: Collection[str] = ()) -> SampleInputs:
    """Preprocesses the image, then `locate`s the regions: model inputs for one sample. `settings`: the model's
    processor settings (`Model.processor`; OpenAI CLIP's when None). RegionError when a region named in
    `required` is not defined for this sample."""
    pixel_values, size = images.preprocess(image, cfg, settings)
    prompt, encoded, regions = locate(cfg, tokenizer, size, question, mode=mode, template=template, boxes=boxes,
                                      option_spans=option_spans, object_names=object_names,
                                      related_patches=related_patches, settings=settings)
    require(regions, required)
    return SampleInputs(np.asarray(encoded.input_ids, np.int64), pixel_values, size, regions, prompt, encoded,
                        related_patches)


def render(sample: SampleInputs, cfg: ModelConfig, boxes: Sequence[Box], path: str,
           settings: images.ProcessorSettings | None = None) -> str:
    """Draws what the vision tower sees (the base crop; for LLaVA-NeXT also the anyres grid) with the
    related image patches shaded and the transformed boxes outlined. Saves a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    settings = settings or images.ProcessorSettings()
    mean, std = np.asarray(settings.image_mean)[:, None, None], np.asarray(settings.image_std)[:, None, None]
    crops = sample.pixel_values[0] if cfg.image.anyres else sample.pixel_values  # [crops, 3, S, S]
    pictures = np.clip((crops * std + mean).transpose(0, 2, 3, 1), 0, 1)  # [crops, S, S, 3]
    lay = image_layout(cfg, sample.image_size)
    related = np.isin(sample.encoded.image_positions, sample.regions["related_image_patches"])
    s = cfg.vision.image_size
    rects_px = lay.rects(cfg)  # [F, 4] each feature's patch (or OneVision cell) in its panel's pixels
    panels = [("base image (crop 0)", pictures[0], lay.crop == 0,
               [geometry.box_in_base(b, sample.image_size, cfg, settings.resize) for b in boxes])]
    if cfg.image.anyres:
        nh, nw = lay.grid
        grid = pictures[1:1 + nh * nw].reshape(nh, nw, s, s, 3).transpose(0, 2, 1, 3, 4).reshape(nh * s, nw * s, 3)
        panels.append((f"anyres grid {nh}x{nw} crops", grid, lay.crop != 0,
                       [geometry.box_in_grid(b, sample.image_size, cfg) for b in boxes]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False)
    for ax, (title, picture, select, rects) in zip(axes[0], panels, strict=True):
        ax.imshow(picture)
        for x0, y0, x1, y1 in rects_px[select & related]:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, color="red", alpha=0.35, linewidth=0))
        for x0, y0, x1, y1 in rects_px[select & ~related & ~lay.is_newline & (lay.row >= 0)]:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="white", alpha=0.25,
                                   linewidth=0.4))
        for x0, y0, x1, y1 in rects:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=1.5))
        n = int((select & related).sum())
        ax.set_title(f"{title}: {n} related patches ({sample.related_patches} rule)", fontsize=9)
        ax.axis("off")
    fig.suptitle(sample.prompt.question, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
