"""Parameter storage: orbax checkpoints, one per parameter group, so conversion streams.

A converted model directory holds:
  config.json          transformers config (llava-hf form)
  jaxflow.json         format version, dtype, parameter groups, and where everything came from: source
                       (path), layout, source_format (safetensors | pickle), vision_tower (checkpoint | clip),
                       vision_tower_path, vision_tower_reason (original layout), preprocessor_config (the file
                       copied, or null), tokenizer_json (source | built | null); `integrity` (below)
  params/<group>/      one orbax checkpoint per group (a decoder/vision layer, or one tensor)
  tokenizer files, preprocessor_config.json

Groups let a restore target any sharding, parameter by parameter; `GroupWriter` writes a group's parameters
one at a time (`LazyArray`s are read only then), so converting holds about one tensor, not a layer.

Integrity: jaxflow.json's `integrity.groups[<group>]` holds `sha256`, a digest of what the group's arrays hold
(`group_digest`: per parameter, in name order, its name, dtype, shape and the SHA-256 of its raw bytes), and
`files`, the [size, SHA-256] of every file orbax wrote for it. The content digest is the same for every
conversion of the same checkpoint (orbax's files are not: it names and packs them differently run to run);
the file records belong to this directory. Before orbax opens anything, `restore_params` checks that every
recorded file is there with its size, and the small ones (orbax's metadata and indexes) with their digest: a
cheap check on every load, so a damaged file is named instead of failing inside the storage library. `verify`
re-hashes every array and, where a group fails, names the files that changed.
"""

from __future__ import annotations

import asyncio
import ctypes
import hashlib
import json
import os
import re
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor

import jax
import numpy as np
import orbax.checkpoint as ocp

FORMAT_VERSION = 1
METADATA_FILE = "jaxflow.json"
HASH = "sha256"
_READ_CHUNK = 1 << 22
SMALL_FILE = 1 << 16  # files up to this size (orbax's metadata and indexes, small arrays) are digested on every load


class CheckpointIntegrityError(ValueError):
    """A stored parameter group is missing, truncated or holds other values than at conversion; the message
    names the group and the file."""


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


class LazyArray:
    """A parameter that `GroupWriter.write` reads only when its turn to be written comes: its shape and dtype,
    and `load()`, which returns it as that numpy array."""

    def __init__(self, shape, dtype, load):
        self.shape, self.dtype, self._load = tuple(shape), np.dtype(dtype), load

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize

    def load(self) -> np.ndarray:
        array = np.asarray(self._load())
        if array.shape != self.shape or array.dtype != self.dtype:
            raise ValueError(f"loaded {array.dtype}{list(array.shape)}, expected {self.dtype}{list(self.shape)}")
        return array


class _Leaf:
    """One parameter of the group being written: a numpy array or a LazyArray, and its digest once written."""

    def __init__(self, value):
        self.value, self.digest = value, None
        self.shape, self.dtype = tuple(np.shape(value)), np.dtype(value.dtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * self.dtype.itemsize


class _OneAtATime(ocp.type_handlers.NumpyHandler):
    """Writes a group's parameters one after the other, each loaded just before its write, hashed while it is
    written and released after. (orbax's NumpyHandler starts every write of a tree at once, so a group's arrays
    and their encoded chunks are in memory together.) Stored as orbax stores numpy arrays ('np.ndarray'), so
    StandardCheckpointer restores them as its own."""

    async def serialize(self, values, infos, args=None):
        args = args or [ocp.SaveArgs()] * len(values)
        loop = asyncio.get_running_loop()
        for leaf, info, arg in zip(values, infos, args, strict=True):
            array = leaf.value.load() if isinstance(leaf.value, LazyArray) else np.asarray(leaf.value)
            digest = loop.run_in_executor(None, _array_digest, array)  # hashlib releases the GIL
            await self._background_serialize([array], [info], [arg])
            leaf.digest = await digest
            del array
            _release_freed_memory()  # the write's encoded copy, before the next tensor comes on top of it
        return []  # every write has completed


class GroupWriter:
    """Writes parameter groups one at a time into `directory/params`, one parameter at a time."""

    def __init__(self, directory: str):
        self.directory = directory
        self.groups: dict[str, dict[str, list[int]]] = {}  # group -> name -> shape
        self.integrity: dict[str, dict] = {}  # group -> {"sha256": content digest, "files": {path: [size, sha256]}}
        # Synchronous, one parameter at a time (_OneAtATime), and without orbax's defensive deep copy of numpy
        # arrays (each write completes before its array is released). StandardCheckpointer restores the result.
        handler = _OneAtATime(deepcopy_host_arrays=False)
        registry = ocp.type_handlers.create_type_handler_registry(
            (_Leaf, handler), (jax.Array, ocp.type_handlers.ArrayHandler()),
        )
        self._ckpt = ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry))

    def write(self, group: str, params: Mapping[str, np.ndarray | LazyArray]) -> None:
        """Writes one group. A LazyArray is loaded only when its write comes, so with LazyArrays peak memory is
        about the largest parameter (and its encoded copy), not the group."""
        leaves = {name: _Leaf(value) for name, value in params.items()}
        group_dir = os.path.join(self.directory, "params", group)
        self._ckpt.save(group_dir, args=ocp.args.PyTreeSave(_nest(leaves)))
        _release_freed_memory()
        self.groups[group] = {name: list(leaf.shape) for name, leaf in sorted(leaves.items())}
        digest = _combine_digests((name, leaf.dtype, leaf.shape, leaf.digest) for name, leaf in leaves.items())
        self.integrity[group] = {HASH: digest, "files": _file_records(group_dir)}

    def finish(self, **metadata) -> None:
        self._ckpt.close()
        meta = {"format_version": FORMAT_VERSION, **metadata, "groups": self.groups,
                "integrity": {"algorithm": HASH, "groups": self.integrity}}
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


def _array_digest(value) -> str:
    a = np.ascontiguousarray(value)
    return hashlib.sha256(a.reshape(-1).view(np.uint8)).hexdigest()


def group_digest(params: Mapping[str, object]) -> str:
    """SHA-256 over a group's parameters in name order: each one's name, dtype, shape and the SHA-256 of its raw
    (C-order) bytes. It depends on the values only, not on how they are stored. Parameters are hashed in parallel
    threads (hashlib releases the GIL)."""
    names = sorted(params)
    arrays = [np.asarray(params[n]) for n in names]
    with ThreadPoolExecutor(max_workers=max(1, min(len(arrays), os.cpu_count() or 1))) as pool:
        digests = list(pool.map(_array_digest, arrays))
    return _combine_digests((n, a.dtype, a.shape, d) for n, a, d in zip(names, arrays, digests, strict=True))


def _combine_digests(entries) -> str:
    """group_digest from (name, dtype, shape, SHA-256 of the raw bytes) per parameter, in any order."""
    h = hashlib.sha256()
    for name, dtype, shape, digest in sorted(entries, key=lambda e: e[0]):
        h.update((json.dumps([name, np.dtype(dtype).name, list(shape), digest]) + "\n").encode())
    return h.hexdigest()


def _file_digest(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_READ_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _file_records(group_dir: str) -> dict[str, list]:
    """Every file under `group_dir` (path relative to it, '/'-separated) -> [size, SHA-256]."""
    paths = sorted(os.path.join(root, name) for root, _, files in os.walk(group_dir) for name in files)
    with ThreadPoolExecutor(max_workers=max(1, min(len(paths), os.cpu_count() or 1))) as pool:
        digests = list(pool.map(_file_digest, paths))
    return {os.path.relpath(p, group_dir).replace(os.sep, "/"): [os.path.getsize(p), d]
            for p, d in zip(paths, digests, strict=True)}


_RECONVERT = "convert the checkpoint again"


def check_files(directory: str, meta: dict) -> None:
    """Before orbax opens anything: every group directory is there and, where jaxflow.json records them, every
    file of it with its recorded size, and those up to SMALL_FILE bytes with their digest. Raises
    CheckpointIntegrityError naming the group and the file."""
    for group in meta["groups"]:
        _check_group_files(directory, meta, group)


def _check_group_files(directory: str, meta: dict, group: str) -> None:
    group_dir = os.path.join(directory, "params", group)
    if not os.path.isdir(group_dir):
        raise CheckpointIntegrityError(f"{group_dir}: missing: parameter group {group} is not stored ({_RECONVERT})")
    for rel, (size, digest) in meta.get("integrity", {}).get("groups", {}).get(group, {}).get("files", {}).items():
        path = os.path.join(group_dir, rel)
        if not os.path.isfile(path):
            raise CheckpointIntegrityError(f"{path}: missing: a file of parameter group {group} ({_RECONVERT})")
        actual = os.path.getsize(path)
        if actual != size:
            raise CheckpointIntegrityError(f"{path}: {actual} bytes, {size} when converted: parameter group "
                                           f"{group} is truncated or damaged ({_RECONVERT})")
        if size <= SMALL_FILE and _file_digest(path) != digest:
            raise CheckpointIntegrityError(f"{path}: differs from the file written at conversion: parameter group "
                                           f"{group} is damaged ({_RECONVERT})")


def _changed_files(group_dir: str, record: dict) -> str:
    """Which of a group's files differ from their record, as the end of an error message."""
    changed = []
    for rel, (size, digest) in record.get("files", {}).items():
        path = os.path.join(group_dir, rel)
        if not os.path.isfile(path) or os.path.getsize(path) != size or _file_digest(path) != digest:
            changed.append(path)
    if changed:
        return f"; changed since conversion: {', '.join(changed)} ({_RECONVERT})"
    return f"; its files are unchanged since conversion ({_RECONVERT})" if record.get("files") else f" ({_RECONVERT})"


def _restore_group(ckpt, directory: str, meta: dict, group: str, target=None) -> dict[str, object]:
    """One group's parameters (flat names), as `target` or, without one, as stored (numpy). A storage error
    becomes a CheckpointIntegrityError naming the group and its changed files."""
    group_dir = os.path.join(directory, "params", group)
    try:
        return _flatten(ckpt.restore(group_dir, target))
    except Exception as e:  # tensorstore and orbax raise many kinds for damaged files
        text = " ".join(str(e).split())
        reason = re.sub(r"\s*\[(tensorstore_spec|source locations)=.*", "", text) or type(e).__name__
        reason = reason if len(reason) <= 300 else "..." + reason[-300:]  # the cause comes last
        record = meta.get("integrity", {}).get("groups", {}).get(group, {})
        raise CheckpointIntegrityError(f"{group_dir}: parameter group {group} cannot be read ({reason})"
                                       f"{_changed_files(group_dir, record)}") from e


def restore_params(directory: str, targets: Mapping[str, jax.ShapeDtypeStruct]) -> dict[str, object]:
    """Restores every parameter named in `targets` (flat name -> ShapeDtypeStruct, optionally with
    a sharding and a dtype to cast to). Missing or unexpected parameters raise, naming them; so do missing or
    truncated files (`check_files`, before orbax reads)."""
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
    check_files(directory, meta)
    out: dict[str, object] = {}
    with ocp.StandardCheckpointer() as ckpt:
        for group, names in meta["groups"].items():
            out.update(_restore_group(ckpt, directory, meta, group, _nest({n: targets[n] for n in names})))
    return out


def verify(directory: str) -> dict[str, int]:
    """Re-reads every parameter group as stored and compares the digest of what its arrays hold with the one
    recorded at conversion. Raises CheckpointIntegrityError naming the first bad group and its changed files
    (and how many other groups are bad); returns {"groups": n, "bytes": parameter bytes hashed}."""
    directory = os.path.abspath(directory)
    meta = read_metadata(directory)
    records = meta.get("integrity", {}).get("groups")
    where = os.path.join(directory, METADATA_FILE)
    if not records:
        raise CheckpointIntegrityError(f"{where}: records no parameter digests (converted before jaxflow recorded "
                                       f"them); {_RECONVERT} to verify it")
    unrecorded = sorted(set(meta["groups"]) - set(records))
    if unrecorded:
        raise CheckpointIntegrityError(f"{where}: no digest recorded for parameter groups {unrecorded}")
    bad, nbytes = [], 0
    with ocp.StandardCheckpointer() as ckpt:
        for group, names in meta["groups"].items():
            group_dir = os.path.join(directory, "params", group)
            try:
                _check_group_files(directory, meta, group)
                flat = _restore_group(ckpt, directory, meta, group)
            except CheckpointIntegrityError as e:
                bad.append((group, str(e)))
                continue
            shapes = {n: list(np.shape(v)) for n, v in sorted(flat.items())}
            digest = group_digest(flat)
            if shapes != names:
                bad.append((group, f"{group_dir}: parameter group {group} holds {shapes}, jaxflow.json records "
                                   f"{names}{_changed_files(group_dir, records[group])}"))
            elif digest != records[group][HASH]:
                bad.append((group, f"{group_dir}: parameter group {group} holds other values than when converted "
                                   f"({HASH} {digest[:16]}..., recorded {records[group][HASH][:16]}...)"
                                   f"{_changed_files(group_dir, records[group])}"))
            nbytes += sum(np.asarray(v).nbytes for v in flat.values())
    if bad:
        more = f"; {len(bad) - 1} more bad group(s): {', '.join(g for g, _ in bad[1:])}" if len(bad) > 1 else ""
        raise CheckpointIntegrityError(bad[0][1] + more)
    return {"groups": len(meta["groups"]), "bytes": nbytes}
