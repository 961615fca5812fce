"""Parameter storage: orbax checkpoints, one per parameter group, so conversion streams.

A converted model directory holds:
  config.json          transformers config (llava-hf form)
  jaxflow.json         format version, dtype, parameter groups, and where everything came from: source
                       (path), layout, source_format (safetensors | pickle), vision_tower (checkpoint | clip),
                       vision_tower_path, vision_tower_reason (original layout), preprocessor_config (the file
                       copied, or null), tokenizer_json (source | built | null)
  params/<group>/      one orbax checkpoint per group (a decoder/vision layer, or one tensor)
  tokenizer files, preprocessor_config.json

Groups keep peak memory at about one layer while converting and let a restore target any
sharding, parameter by parameter.
"""

from __future__ import annotations

import ctypes
import json
import os
from collections.abc import Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp

FORMAT_VERSION = 1
METADATA_FILE = "jaxflow.json"


def path_str(path: tuple) -> str:
    return ".".join(str(p) for p in path)


def group_of(path: str) -> str:
    """A layer's parameters form one group; every other parameter is a group of its own."""
    parts = path.split(".")
    if "layers" in parts:
        i = parts.index("layers")
        return ".".join(parts[: i + 2])
    return path


def _nest(flat: Mapping[str, object]) -> dict:
    tree: dict = {}
    for key, value in flat.items():
        node = tree
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return tree


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(_flatten(value, name + "."))
        else:
            out[name] = value
    return out


def _release_freed_memory() -> None:
    """Hands freed heap memory back to the OS (glibc): otherwise the writer threads' malloc arenas
    keep the last groups' buffers resident and the next large tensor comes on top of them."""
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


class GroupWriter:
    """Writes parameter groups one at a time into `directory/params`."""

    def __init__(self, directory: str):
        self.directory = directory
        self.groups: dict[str, dict[str, list[int]]] = {}  # group -> name -> shape
        # Synchronous, and without orbax's defensive deep copy of numpy arrays (it guards async saves
        # against later mutation; here every save completes before its arrays are released, so the
        # copy would only double the memory of the group being written). StandardCheckpointer
        # restores the result like its own.
        registry = ocp.type_handlers.create_type_handler_registry(
            (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
            (jax.Array, ocp.type_handlers.ArrayHandler()),
        )
        self._ckpt = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))

    def write(self, group: str, params: Mapping[str, np.ndarray]) -> None:
        self._ckpt.save(os.path.join(self.directory, "params", group), args=ocp.args.PyTreeSave(_nest(params)))
        _release_freed_memory()
        self.groups[group] = {name: list(np.shape(v)) for name, v in sorted(params.items())}

    def finish(self, **metadata) -> None:
        self._ckpt.close()
        meta = {"format_version": FORMAT_VERSION, **metadata, "groups": self.groups}
        with open(os.path.join(self.directory, METADATA_FILE), "w") as f:
            json.dump(meta, f, indent=1)


def read_metadata(directory: str) -> dict:
    path = os.path.join(directory, METADATA_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: not a converted jaxflow model (run `jaxflow convert` first)")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path}: format_version {meta.get('format_version')} is not {FORMAT_VERSION}")
    return meta


def restore_params(directory: str, targets: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, object]:
    """Restores every parameter named in `targets` (flat name -> ShapeDtypeStruct, optionally with
    a sharding and a dtype to cast to). Missing or unexpected parameters raise, naming them."""
    directory = os.path.abspath(directory)  # orbax refuses relative paths
    meta = read_metadata(directory)
    shapes = {name: tuple(shape) for names in meta["groups"].values() for name, shape in names.items()}
    missing = sorted(set(targets) - set(shapes))
    unexpected = sorted(set(shapes) - set(targets))
    misshaped = [f"{n} {shapes[n]} != {tuple(t.shape)}" for n, t in targets.items()
                 if n in shapes and shapes[n] != tuple(t.shape)]
    if missing or unexpected or misshaped:
        raise ValueError(f"{directory}: checkpoint does not match the model config; missing {missing}, "
                         f"unexpected {unexpected}, mis-shaped {misshaped}")
    out: dict[str, object] = {}
    with ocp.StandardCheckpointer() as ckpt:
        for group, names in meta["groups"].items():
            target = _nest({n: targets[n] for n in names})
            restored = ckpt.restore(os.path.join(directory, "params", group), target)
            out.update(_flatten(restored))
    return out
