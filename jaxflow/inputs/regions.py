"""From an image and a question to model inputs and named token regions.

Regions are sorted position lists in the full, image-expanded sequence: `image`, `question`,
`last`, `true_option`, `false_option`, `question_without_options`, `related_image_patches`,
`other_image_patches`; users add regions by prompt substring or by box.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from PIL import Image

from jaxflow.config import LlavaConfig
from jaxflow.image_layout import image_layout
from jaxflow.inputs import images, prompts

Box = tuple[float, float, float, float]  # x, y, w, h in original image pixels


@dataclasses.dataclass(frozen=True)
class SampleInputs:
    """One prompt + image, ready for the model, with its regions."""

    input_ids: np.ndarray  # [T] int64
    pixel_values: np.ndarray  # [1, 3, S, S] (1.5) or [1, crops, 3, S, S] (NeXT)
    image_size: tuple[int, int]  # (height, width)
    regions: dict[str, np.ndarray]  # name -> sorted positions
    prompt: prompts.Prompt
    encoded: prompts.Encoded

    def __len__(self) -> int:
        return len(self.input_ids)


class RegionError(ValueError):
    """A region cannot be located (e.g. the question is not covered by whole tokens)."""


def default_template(tokenizer) -> str:
    """llava_llama_3 for Llama-3 tokenizers (chat header tokens), else vicuna_v1."""
    vocab = tokenizer.get_vocab() if tokenizer is not None else {}
    return "llava_llama_3" if "<|start_header_id|>" in vocab else "vicuna_v1"


def _span(encoded, start: int, end: int, what: str) -> np.ndarray:
    problem = prompts.span_problem(encoded, start, end)
    if problem:
        raise RegionError(f"{what}: {problem}")
    return np.asarray(prompts.token_span(encoded, start, end), np.int64)


def box_region(cfg: LlavaConfig, size: tuple[int, int], encoded, boxes: Sequence[Box]) -> np.ndarray:
    """Image positions whose patch overlaps any of `boxes` (after the image's own geometry)."""
    return np.asarray(encoded.image_positions, np.int64)[images.related_features(cfg, size, list(boxes))]


def substring_region(prompt: prompts.Prompt, encoded, substring: str, occurrence: int = 0) -> np.ndarray:
    """Positions of the tokens covering the `occurrence`-th match of `substring` in the prompt text."""
    start = -1
    for _ in range(occurrence + 1):
        start = prompt.text.find(substring, start + 1)
        if start < 0:
            raise RegionError(f"substring {substring!r} not found in the prompt")
    return _span(encoded, start, start + len(substring), f"substring {substring!r}")


def locate(cfg: LlavaConfig, tokenizer, size: tuple[int, int], question: str, *, mode: str = "llava-hf",
           template: str | None = None, boxes: Sequence[Box] = (), option_spans=(None, None)):
    """Renders the prompt, tokenizes it for an image of `size` (height, width) and locates every
    region (no pixels needed). Returns (prompt, encoded, regions).

    option_spans: character spans of the true and false options inside `question` (or None).
    """
    prompt = prompts.build_prompt(question, template or default_template(tokenizer))
    lay = image_layout(cfg, size)
    encoded = prompts.encode(prompt, tokenizer, cfg.image_token_id, len(lay), mode)
    image_pos = np.asarray(encoded.image_positions, np.int64)
    regions = {
        "image": image_pos,
        "question": _span(encoded, *prompt.question_span, "question"),
        "last": np.asarray([encoded.last_position], np.int64),
    }
    options = []
    for name, span in zip(("true_option", "false_option"), option_spans, strict=True):
        if span is not None:
            regions[name] = _span(encoded, *prompt.question_substring_span(*span), name)
            options.append(regions[name])
    if options:
        regions["question_without_options"] = np.setdiff1d(regions["question"], np.concatenate(options))
    related = np.isin(image_pos, box_region(cfg, size, encoded, boxes))
    regions["related_image_patches"] = image_pos[related]
    regions["other_image_patches"] = image_pos[~related & ~lay.is_newline]
    return prompt, encoded, {k: np.sort(v) for k, v in regions.items()}


def build_sample(cfg: LlavaConfig, tokenizer, image: Image.Image, question: str, *, mode: str = "llava-hf",
                 template: str | None = None, boxes: Sequence[Box] = (), option_spans=(None, None),
                 settings: images.ProcessorSettings | None = None) -> SampleInputs:
    """Preprocesses the image, then `locate`s the regions: model inputs for one sample."""
    pixel_values, size = images.preprocess(image, cfg, settings)
    prompt, encoded, regions = locate(cfg, tokenizer, size, question, mode=mode, template=template, boxes=boxes,
                                      option_spans=option_spans)
    return SampleInputs(np.asarray(encoded.input_ids, np.int64), pixel_values, size, regions, prompt, encoded)


def render(sample: SampleInputs, cfg: LlavaConfig, boxes: Sequence[Box], path: str,
           settings: images.ProcessorSettings | None = None) -> str:
    """Draws what the vision tower sees (the base crop; for LLaVA-NeXT also the anyres grid) with the
    related image patches shaded and the transformed boxes outlined. Saves a PNG at `path`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.patches import Rectangle

    settings = settings or images.ProcessorSettings()
    mean, std = np.asarray(settings.image_mean)[:, None, None], np.asarray(settings.image_std)[:, None, None]
    crops = sample.pixel_values[0] if cfg.is_next else sample.pixel_values  # [crops, 3, S, S]
    pictures = np.clip((crops * std + mean).transpose(0, 2, 3, 1), 0, 1)  # [crops, S, S, 3]
    lay = image_layout(cfg, sample.image_size)
    related = images.related_features(cfg, sample.image_size, list(boxes))
    p, s = cfg.vision.patch_size, cfg.vision.image_size
    panels = [("base image (crop 0)", pictures[0], lay.crop == 0, [images.box_in_base(b, sample.image_size, cfg)
                                                                   for b in boxes])]
    if cfg.is_next:
        nh, nw = lay.grid
        grid = pictures[1:1 + nh * nw].reshape(nh, nw, s, s, 3).transpose(0, 2, 1, 3, 4).reshape(nh * s, nw * s, 3)
        panels.append((f"anyres grid {nh}x{nw} crops", grid, lay.crop > 0,
                       [images.box_in_grid(b, sample.image_size, cfg) for b in boxes]))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 5), squeeze=False)
    for ax, (title, picture, select, rects) in zip(axes[0], panels, strict=True):
        ax.imshow(picture)
        for r, c in zip(lay.row[select & related], lay.col[select & related], strict=True):
            ax.add_patch(Rectangle((c * p, r * p), p, p, color="red", alpha=0.35, linewidth=0))
        for r, c in zip(lay.row[select & ~related & ~lay.is_newline], lay.col[select & ~related & ~lay.is_newline],
                        strict=True):
            ax.add_patch(Rectangle((c * p, r * p), p, p, fill=False, edgecolor="white", alpha=0.25, linewidth=0.4))
        for x0, y0, x1, y1 in rects:
            ax.add_patch(Rectangle((x0, y0), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=1.5))
        n = int((select & related).sum())
        ax.set_title(f"{title}: {n} related patches", fontsize=9)
        ax.axis("off")
    fig.suptitle(sample.prompt.question, fontsize=10)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path
