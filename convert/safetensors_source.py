"""Read tensors one at a time from single-file or sharded safetensors checkpoints.

Pickle checkpoints (.bin, .pt, .pth, .ckpt) are refused: unpickling runs arbitrary code.
"""

from __future__ import annotations

import glob
import json
import os

import numpy as np
from safetensors import SafetensorError, safe_open

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, truncated, or in a format jaxflow refuses."""


class SafetensorsSource:
    """All tensors of one checkpoint directory (or one .safetensors file): name -> file."""

    def __init__(self, path: str):
        self.path = path
        self.files = self._find_files(path)
        self.where: dict[str, str] = {}
        for file in self.files:
            try:
                with safe_open(file, framework="numpy") as f:
                    names = list(f.keys())
            except (SafetensorError, OSError) as e:
                raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from e
            for name in names:
                if name in self.where:
                    raise CheckpointError(f"{file}: tensor {name} also in {self.where[name]}")
                self.where[name] = file
        index = os.path.join(path, "model.safetensors.index.json") if os.path.isdir(path) else None
        if index and os.path.exists(index):
            with open(index) as f:
                weight_map = json.load(f)["weight_map"]
            absent = sorted(k for k, v in weight_map.items() if self.where.get(k) != os.path.join(path, v))
            if absent:
                raise CheckpointError(f"{index}: tensors listed but not found in their shard: {absent[:10]}")

    @staticmethod
    def _find_files(path: str) -> list[str]:
        if os.path.isfile(path):
            if path.endswith(PICKLE_SUFFIXES):
                raise CheckpointError(_pickle_message(path))
            return [path]
        if not os.path.isdir(path):
            raise CheckpointError(f"{path}: no such checkpoint file or directory")
        index = os.path.join(path, "model.safetensors.index.json")
        if os.path.exists(index):
            try:
                with open(index) as f:
                    shards = sorted(set(json.load(f)["weight_map"].values()))
            except (json.JSONDecodeError, KeyError) as e:
                raise CheckpointError(f"{index}: not a valid safetensors index ({e})") from e
            files = [os.path.join(path, s) for s in shards]
            missing = [f for f in files if not os.path.exists(f)]
            if missing:
                raise CheckpointError(f"{index}: shard files missing: {missing}")
            return files
        files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
        if files:
            return files
        pickles = sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES))
        if pickles:
            raise CheckpointError(_pickle_message(os.path.join(path, pickles[0])))
        raise CheckpointError(f"{path}: no .safetensors files found")

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        with safe_open(self.where[name], framework="numpy") as f:
            return tuple(f.get_slice(name).get_shape())

    def get(self, name: str) -> np.ndarray:
        file = self.where[name]
        try:
            with safe_open(file, framework="numpy") as f:
                return f.get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{file}: cannot read tensor {name} ({e})") from e


def _pickle_message(path: str) -> str:
    return (f"{path}: pickle checkpoints are refused: loading one runs arbitrary code. Re-save the weights "
            "as safetensors (e.g. transformers' save_pretrained(..., safe_serialization=True)) and convert that.")
