"""Host memory for XLA on CPU: freed buffers stay in the heap for the next call instead of going back to the
system (and page-faulting in again)."""

from __future__ import annotations

import ctypes
import functools
import os

import jax

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest: blocks up to 32 MiB come from the heap; larger ones are still mapped
TRIM_THRESHOLD = (1 << 31) - 1  # free memory at the top of the heap kept before any is given back


@functools.cache
def keep_freed_buffers() -> bool:
    """XLA's CPU backend allocates each call's buffers afresh. glibc serves blocks above its mmap threshold
    with freshly mapped pages and unmaps them on free, so every call page-faults its working set in again:
    on the CPU benchmark's model a knockout call faulted 1.8 GB (480k faults) and a prefill 1.2 GB, every
    time. With the threshold at glibc's maximum and trimming deferred, the next call reuses the freed blocks
    (44k faults). Applies once per process, on the CPU backend with glibc; JAXFLOW_KEEP_HOST_BUFFERS=0 leaves
    malloc as it is. Returns whether the setting applied."""
    if os.environ.get("JAXFLOW_KEEP_HOST_BUFFERS") == "0" or jax.default_backend() != "cpu":
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt  # the process's C library
    except (OSError, AttributeError):  # no mallopt (not glibc)
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)) & bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
