"""jaxflow: attention-knockout information-flow analysis of LLaVA models in JAX/Flax."""

from jaxflow.config import LlavaConfig, TextConfig, UnsupportedConfigError, VisionConfig
from jaxflow.knockout import DenseKnockout, Knockout, KnockoutMasks
from jaxflow.model import ForwardOutput, GenerateOutput, Model, load

__all__ = [
    "DenseKnockout", "ForwardOutput", "GenerateOutput", "Knockout", "KnockoutMasks", "LlavaConfig", "Model",
    "TextConfig", "UnsupportedConfigError", "VisionConfig", "load",
]
