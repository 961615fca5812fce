"""jaxflow: attention-knockout information-flow analysis of LLaVA models in JAX/Flax.

From an image and a question: `model = jaxflow.load(dir)`, `sample = model.sample(image, question, boxes)`, then
`model.logits(sample, knockouts=[jaxflow.Knockout("image", "last", layers=...)])`, `jaxflow.answer_prob`,
`model.run_with_cache`, `jaxflow.logit_lens`, `jaxflow.patch_sweep`, and `jaxflow.plot.on_image` to draw values on
the image. Activation patching: `model.logits(sample, patches=[jaxflow.Patch("resid_pre", layers, "question")],
source=other_sample)` (or `source=jaxflow.Noise("image")`) and `model.attribution(sample, source=..., token=...)`.
"""

from jaxflow import plot
from jaxflow.analysis import (
    Lens,
    PatchSweep,
    answer_prob,
    attention_on_image,
    greedy_token,
    logit_lens,
    patch_groups,
    patch_sweep,
    relative_change,
)
from jaxflow.config import ModelConfig, TextConfig, UnsupportedConfigError, VisionConfig
from jaxflow.knockout import DenseKnockout, Knockout, KnockoutMasks
from jaxflow.model import ForwardOutput, GenerateOutput, Model, load
from jaxflow.patching import Noise, Patch, PatchMasks
from jaxflow.sample import Batch, Sample, batch
from jaxflow.sweep.flows import window
from jaxflow.toy import toy_model

__all__ = [
    "Batch", "DenseKnockout", "ForwardOutput", "GenerateOutput", "Knockout", "KnockoutMasks", "Lens", "ModelConfig",
    "Model", "Noise", "Patch", "PatchMasks", "PatchSweep", "Sample", "TextConfig", "UnsupportedConfigError",
    "VisionConfig", "answer_prob", "attention_on_image", "batch", "greedy_token", "load", "logit_lens", "patch_groups",
    "patch_sweep", "plot", "relative_change", "toy_model", "window",
]
