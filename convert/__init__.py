"""Checkpoint conversion: LLaVA safetensors (llava-hf or original layout) -> jaxflow orbax groups."""

from jaxflow.convert.converter import ConversionError, convert

__all__ = ["ConversionError", "convert"]
