"""Moved to `jaxflow.geometry`; these names stay importable from here."""

from jaxflow.geometry import KEPT_SIDE, ImageLayout, grid_shape, image_layout, select_best_resolution, unpad_box

__all__ = ["KEPT_SIDE", "ImageLayout", "grid_shape", "image_layout", "select_best_resolution", "unpad_box"]
