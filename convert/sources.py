"""Checkpoint sources: read tensors one at a time from safetensors or (on request) PyTorch pickle checkpoints.

`open_source(path, allow_pickle)` is the one entry point. Safetensors is preferred wherever a directory holds both.
Pickle checkpoints (.bin, .pt, .pth, .ckpt, .pkl) are refused unless `allow_pickle`: unpickling can run arbitrary
code. With `allow_pickle` they are read through PyTorch's restricted unpickler (`weights_only=True`), which refuses
anything but tensors and plain containers, memory-mapped, one shard at a time.
"""

from __future__ import annotations

import glob
import json
import mmap
import os
import re
import warnings
import zipfile

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"


class CheckpointError(ValueError):
    """A checkpoint file is missing, corrupt, truncated, or in a format jaxflow refuses."""


class Source:
    """All tensors of one checkpoint (a directory of shards or one file): name -> shard file."""

    path: str
    files: list[str]
    where: dict[str, str]

    def keys(self) -> list[str]:
        return list(self.where)

    def shape(self, name: str) -> tuple[int, ...]:
        raise NotImplementedError

    def get(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def _add(self, file: str, names) -> None:
        for name in names:
            if name in self.where:
                raise CheckpointError(f"{file}: tensor {name} also in {self.where[name]}")
            self.where[name] = file

    def _check_index(self, index: str | None) -> None:
        """Every tensor an index lists must be in the shard it names."""
        if index is None:
            return
        weight_map = _read_index(index)
        folder = os.path.dirname(index)
        absent = sorted(k for k, v in weight_map.items() if self.where.get(k) != os.path.join(folder, v))
        if absent:
            raise CheckpointError(f"{index}: tensors listed but not found in their shard: {absent[:10]}")


# safetensors dtype -> numpy (little-endian, as safetensors stores them)
SAFETENSORS_DTYPES = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": ml_dtypes.bfloat16, "I64": "<i8", "I32": "<i4", "I16": "<i2",
    "I8": "i1", "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
    "F8_E4M3": ml_dtypes.float8_e4m3fn, "F8_E5M2": ml_dtypes.float8_e5m2,
}


def mapped_empty(shape, dtype) -> np.ndarray:
    """An uninitialised array in an anonymous memory map of its own, unmapped when the array is freed.

    Tensor-sized buffers (MiBs) then never come from malloc: glibc raises its mmap threshold to the largest block
    freed, so later blocks of that size come from its arenas, which keep them resident after they are freed
    (measured: peak RSS grew ~10 MiB per converted layer)."""
    dtype = np.dtype(dtype)
    count = int(np.prod(shape, dtype=np.int64))
    return np.frombuffer(mmap.mmap(-1, max(1, count * dtype.itemsize)), dtype, count).reshape(shape)


class SafetensorsSource(Source):
    """Reads each tensor straight from its file into a `mapped_empty` array (one read, no intermediate copy)."""

    def __init__(self, path: str, files: list[str], index: str | None = None):
        self.path, self.files, self.where = path, files, {}
        self._entries: dict[str, tuple[str, list[int], int, int]] = {}  # name -> dtype, shape, file offsets
        for file in files:
            try:
                with safe_open(file, framework="numpy") as f:  # validates the header against the file
                    names = list(f.keys())
                header, start = _safetensors_header(file)
            except (SafetensorError, OSError, ValueError) as e:
                raise CheckpointError(f"{file}: corrupt or truncated safetensors file ({e})") from e
            self._add(file, names)
            for name in names:
                entry = header[name]
                begin, end = entry["data_offsets"]
                self._entries[name] = (entry["dtype"], entry["shape"], start + begin, start + end)
        self._check_index(index)

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._entries[name][1])

    def get(self, name: str) -> np.ndarray:
        file = self.where[name]
        dtype, shape, begin, end = self._entries[name]
        if dtype not in SAFETENSORS_DTYPES:
            raise CheckpointError(f"{file}: tensor {name} has dtype {dtype}, which jaxflow does not read")
        out = mapped_empty(shape, SAFETENSORS_DTYPES[dtype])
        if out.nbytes != end - begin:
            raise CheckpointError(f"{file}: cannot read tensor {name} ({end - begin} bytes for {dtype}{shape})")
        try:
            with open(file, "rb", buffering=0) as f:
                f.seek(begin)
                view, done = memoryview(out.reshape(-1).view(np.uint8)), 0
                while done < len(view):
                    n = f.readinto(view[done:])
                    if not n:
                        raise OSError(f"file ends {len(view) - done} bytes early (truncated)")
                    done += n
        except OSError as e:
            raise CheckpointError(f"{file}: cannot read tensor {name} ({e})") from e
        return out


def _safetensors_header(file: str) -> tuple[dict, int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) and where its data starts."""
    with open(file, "rb") as f:
        size = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(size))
    return header, 8 + size


class PickleSource(Source):
    """PyTorch `torch.save` state dicts, read with `torch.load(weights_only=True, mmap=True)`.

    Opening reads each shard once for names and shapes; `get` then keeps only the shard of the last tensor read
    (memory-mapped), so at most one shard is held at a time.
    """

    def __init__(self, path: str, files: list[str], index: str | None = None):
        self.path, self.files, self.where = path, files, {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._open: tuple[str | None, dict] = (None, {})
        for file in files:
            state = self._load(file)
            self._add(file, state)
            self._shapes.update({name: tuple(t.shape) for name, t in state.items()})
            del state
        self._check_index(index)

    def _load(self, file: str) -> dict:
        try:
            import torch
        except ImportError as e:
            raise CheckpointError(f"{file}: reading pickle checkpoints (--allow-pickle) needs PyTorch; "
                                  "install it (pip install torch) or convert a safetensors copy") from e
        # torch.load memory-maps only the zip format (torch >= 1.6); older files are read whole (one shard).
        mmap = zipfile.is_zipfile(file)
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=mmap)
        except Exception as e:  # UnpicklingError for refused objects; RuntimeError/EOFError/... for damaged files
            raise CheckpointError(f"{file}: refused: not a plain tensor checkpoint ({_unpickle_reason(e)}); "
                                  "pickle checkpoints are read with PyTorch's weights-only loader, which loads "
                                  "tensors and nothing that could run code") from e
        if not isinstance(state, dict):
            raise CheckpointError(f"{file}: holds a {type(state).__name__}, not a state dict of tensors")
        for name, value in state.items():
            if not isinstance(value, torch.Tensor):
                raise CheckpointError(f"{file}: entry {name!r} is a {type(value).__name__}, not a tensor")
        return state

    def shape(self, name: str) -> tuple[int, ...]:
        return self._shapes[name]

    def get(self, name: str) -> np.ndarray:
        file = self.where[name]
        if self._open[0] != file:
            self._open = (None, {})  # release the previous shard before mapping the next
            self._open = (file, self._load(file))
        return _to_numpy(self._open[1][name], name, file)


def _to_numpy(tensor, name: str, file: str) -> np.ndarray:
    import torch

    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: reinterpret the bits as ml_dtypes.bfloat16
        return tensor.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    try:
        return tensor.numpy()
    except TypeError as e:
        raise CheckpointError(f"{file}: tensor {name} has dtype {tensor.dtype}, which jaxflow does not read") from e


def _unpickle_reason(error: Exception) -> str:
    text = str(error)
    found = re.search(r"(Unsupported global: GLOBAL [\w.]+|unsupported GLOBAL [\w.]+|Unsupported operand \d+)", text)
    if found:
        return found[1]
    return text.splitlines()[0][:200] if text else type(error).__name__


def _read_index(index: str) -> dict[str, str]:
    try:
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointError(f"{index}: not a valid checkpoint index ({e})") from e
    return weight_map


def _sharded(index: str) -> list[str]:
    folder = os.path.dirname(index)
    files = [os.path.join(folder, s) for s in sorted(set(_read_index(index).values()))]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise CheckpointError(f"{index}: shard files missing: {missing}")
    return files


def open_source(path: str, allow_pickle: bool = False) -> Source:
    """The checkpoint at `path`: a .safetensors file, a pickle file, or a directory (safetensors index, *.safetensors,
    then pytorch_model.bin.index.json or pytorch_model.bin). Pickle is refused unless `allow_pickle`."""
    if os.path.isfile(path):
        if path.endswith(PICKLE_SUFFIXES):
            return _pickle(path, [path], None, allow_pickle)
        return SafetensorsSource(path, [path])
    if not os.path.isdir(path):
        raise CheckpointError(f"{path}: no such checkpoint file or directory")
    index = os.path.join(path, SAFETENSORS_INDEX)
    if os.path.exists(index):
        return SafetensorsSource(path, _sharded(index), index)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if files:
        return SafetensorsSource(path, files)
    index = os.path.join(path, PICKLE_INDEX)
    if os.path.exists(index):
        return _pickle(path, _sharded(index), index, allow_pickle)
    if os.path.exists(os.path.join(path, PICKLE_SINGLE)):
        return _pickle(path, [os.path.join(path, PICKLE_SINGLE)], None, allow_pickle)
    pickles = sorted(f for f in os.listdir(path) if f.endswith(PICKLE_SUFFIXES))
    if pickles:
        if not allow_pickle:
            raise CheckpointError(_pickle_message(os.path.join(path, pickles[0])))
        raise CheckpointError(f"{path}: no {PICKLE_SINGLE} or {PICKLE_INDEX} among the pickle files {pickles}; "
                              "pass the checkpoint file itself")
    raise CheckpointError(f"{path}: no .safetensors files found")


def _pickle(path: str, files: list[str], index: str | None, allow_pickle: bool) -> PickleSource:
    if not allow_pickle:
        raise CheckpointError(_pickle_message(files[0]))
    return PickleSource(path, files, index)


def _pickle_message(path: str) -> str:
    return (f"{path}: pickle checkpoints are refused by default: unpickling can run arbitrary code. Pass "
            "--allow-pickle (convert(..., allow_pickle=True)) to read its tensors with PyTorch's weights-only "
            "loader, or re-save the weights as safetensors and convert that.")
