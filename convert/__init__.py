"""Checkpoint conversion: LLaVA safetensors (llava-hf or original layout) -> jaxflow orbax groups."""

from convert.convert import ConversionError, convert

__all__ = ["ConversionError", "convert"]
