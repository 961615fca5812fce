"""The shipped toy LLaVA-1.5 (`jaxflow/assets/toy-llava`, trained on `jaxflow.world` scenes), ready to use:

    model = jaxflow.toy_model()   # converted once into the cache directory, then loaded
"""

from __future__ import annotations

import hashlib
import os

from jaxflow.demo import ASSET
from jaxflow.model import Model, load


def cache_dir() -> str:
    """$JAXFLOW_CACHE, else $XDG_CACHE_HOME/jaxflow, else ~/.cache/jaxflow."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.environ.get("JAXFLOW_CACHE") or os.path.join(base, "jaxflow")


def toy_model(cache: str | None = None) -> Model:
    """The shipped toy LLaVA-1.5, converted into `cache` (default `cache_dir()`) the first time and loaded. The
    directory is named by the weights' digest, so a changed asset converts again."""
    from jaxflow.convert import convert

    with open(os.path.join(ASSET, "model.safetensors"), "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:12]
    path = os.path.join(cache or cache_dir(), f"toy-llava-{digest}")
    if not os.path.isdir(path):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        try:
            convert(ASSET, path, progress=False)  # atomic: a directory appears only when complete
        except Exception:
            if not os.path.isdir(path):  # another process may have converted it meanwhile
                raise
    return load(path)
