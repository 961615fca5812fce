"""jaxflow.host: on CPU with glibc, a warm call's large buffers no longer page-fault in afresh every call."""

import ctypes
import resource

import jax
import jax.numpy as jnp
import numpy as np

from jaxflow import host


def faults(f, x) -> int:
    """Minor page faults of one warm call of f."""
    jax.block_until_ready(f(x))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    jax.block_until_ready(f(x))
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def test_freed_buffers_are_reused_not_faulted_in_again(monkeypatch):
    @jax.jit
    def f(x):  # [1024, 1024] f32: 4 MiB intermediates (above glibc's default mmap threshold) that XLA cannot fuse
        for _ in range(6):
            x = jnp.tanh(x @ x) * 0.5
        return x.sum()

    x = jnp.asarray(np.random.RandomState(0).randn(1024, 1024).astype(np.float32))
    mallopt = ctypes.CDLL(None).mallopt
    assert mallopt(host.M_MMAP_THRESHOLD, 128 << 10) and mallopt(host.M_TRIM_THRESHOLD, 128 << 10)  # glibc's defaults
    fresh = faults(f, x)
    assert fresh > 2 * 1024  # at least two 4 MiB buffers' pages, faulted in again by a warm call
    monkeypatch.setenv("JAXFLOW_KEEP_HOST_BUFFERS", "0")
    assert host.keep_freed_buffers.__wrapped__() is False  # the opt-out leaves malloc alone
    monkeypatch.delenv("JAXFLOW_KEEP_HOST_BUFFERS")
    assert host.keep_freed_buffers.__wrapped__() is True
    kept = faults(f, x)
    assert kept * 4 < fresh, (fresh, kept)
