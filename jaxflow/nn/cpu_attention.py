"""Fused softmax attention on CPU: cpu_attention.cc, an XLA FFI custom call, compiled with g++ at first use.

XLA's attention writes every score tile to memory and reads it back for the mask, max, exp, sum and values; the
kernel keeps a tile in registers and cache. The library is cached per user under $XDG_CACHE_HOME/jaxflow (or
~/.cache/jaxflow), keyed by the source, jaxlib's version, the flags and what -march=native means on this machine.
Without g++, or when the build fails, `enabled()` is False (logged once at debug level) and callers use XLA's
path; JAXFLOW_CPU_ATTENTION=0 turns the kernel off.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import importlib.resources
import logging
import os
import subprocess
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

TARGET = "jaxflow_cpu_attention"
LANES = 16  # head dims are zero-padded to a multiple of this (every vector width the kernel compiles to divides it)
CXX = "g++"
FLAGS = ["-O3", "-march=native", "-std=c++17", "-ffp-contract=fast", "-fPIC", "-shared", "-pthread"]

log = logging.getLogger(__name__)


def _build() -> Path:
    """The compiled library, built into the cache (to a temporary name, then renamed) unless already there."""
    source = importlib.resources.files("jaxflow.nn").joinpath("cpu_attention.cc").read_bytes()
    native = subprocess.run([CXX, "-march=native", "-E", "-dM", "-x", "c++", os.devnull],  # the target's macros
                            capture_output=True, check=True).stdout
    key = hashlib.sha256(b"\0".join([source, jaxlib.__version__.encode(), " ".join(FLAGS).encode(), native]))
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "jaxflow"
    lib = cache / f"cpu_attention-{key.hexdigest()[:16]}.so"
    if not lib.exists():
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=cache) as tmp:
            src, out = Path(tmp) / "cpu_attention.cc", Path(tmp) / "cpu_attention.so"
            src.write_bytes(source)
            subprocess.run([CXX, *FLAGS, "-isystem", jax.ffi.include_dir(), str(src), "-o", str(out)],
                           capture_output=True, check=True)
            os.replace(out, lib)
    return lib


@functools.cache
def _chunk() -> int:
    """Registers the kernel; the keys per chunk of its key layout (0: it could not be built)."""
    try:
        lib = ctypes.CDLL(str(_build()))
    except (OSError, subprocess.CalledProcessError) as e:
        log.debug("fused CPU attention unavailable (%s), XLA's attention instead", getattr(e, "stderr", None) or e)
        return 0
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(lib.JaxflowCpuAttention), platform="cpu")
    return lib.JaxflowCpuAttentionChunk()


def enabled() -> bool:
    """Whether `attention` may be called: the default backend is the CPU, the kernel is built and not turned off."""
    return os.environ.get("JAXFLOW_CPU_ATTENTION", "1") != "0" and jax.default_backend() == "cpu" and _chunk() > 0


def attention(q, k, v, mask):
    """Softmax attention, float32: q [..., Tq, H, hd], k, v [..., K, S, hd], mask [..., 1|H, Tq, S] True = may
    attend -> out [..., Tq, H, hd] and each row's max score and sum of exp(score - max), top and total
    [..., H, Tq]. A row that may attend to no key gets the mean of all values (top = float32 minimum, total = S).
    """
    chunk = _chunk()
    if not chunk:
        raise RuntimeError("the fused CPU attention could not be built: see `enabled()`")
    *lead, t, h, hd = q.shape
    kh, keys = k.shape[-3:-1]
    pad = [(0, 0)] * (q.ndim - 1) + [(0, -hd % LANES)]  # zero dims add nothing to q . k
    q, k, v = (jnp.pad(a.astype(jnp.float32), pad) for a in (q, k, v))
    k = jnp.pad(k, [(0, 0)] * (k.ndim - 2) + [(0, -keys % chunk), (0, 0)])
    kt = k.reshape(*lead, kh, -1, chunk, k.shape[-1]).swapaxes(-1, -2)  # [..., K, S / chunk, hd, chunk]
    stats = jax.ShapeDtypeStruct((*lead, h, t), jnp.float32)
    out, top, total = jax.ffi.ffi_call(TARGET, (jax.ShapeDtypeStruct(q.shape, jnp.float32), stats, stats),
                                       vmap_method="broadcast_all")(q, kt, v, mask.astype(bool),
                                                                    scale=np.float32(hd**-0.5))
    return out[..., :hd], top, total
