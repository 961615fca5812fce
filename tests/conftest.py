import os
import sys

# The test runner (not the library) gives JAX 8 host devices for the sharding tests; it must be set
# before JAX initialises its backends.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import pytest

sys.path.insert(0, os.path.dirname(__file__))

import tiny  # noqa: E402


@pytest.fixture(scope="session")
def twins(tmp_path_factory):
    """twins(kind, layout, **config) -> (hf_model, jaxflow_model): a tiny random transformers model
    saved in `layout`, converted and loaded. Cached per session."""
    import jaxflow
    from convert import convert

    cache = {}

    def make(kind="llava", layout="llava-hf", shard=False, **kw):
        key = repr((kind, layout, shard, sorted(kw.items())))
        if key not in cache:
            hf = tiny.hf_model(kind, **kw)
            root = tmp_path_factory.mktemp(f"{kind}-{layout}")
            clip = None
            if layout == "original":
                src, clip = tiny.save_original(hf, str(root / "src"), str(root / "clip"))
            else:
                src = tiny.save_llava_hf(hf, str(root / "src"), layout=layout, shard=shard)
            out = convert(src, str(root / "out"), clip=clip, progress=False)
            cache[key] = (hf, jaxflow.load(out))
        return cache[key]

    return make
