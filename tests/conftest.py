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
    from jaxflow.convert import convert

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


def convert_toy(root, kind: str) -> str:
    """A tiny random `kind` model (GQA) with the Vicuna-style toy tokenizer, written under root and converted."""
    import toy_tokenizers

    from jaxflow.convert import convert
    from jaxflow.testing import tiny_hf_config, write_random_checkpoint

    tok = toy_tokenizers.llama2_tokenizer()
    cfg = tiny_hf_config(kind, vocab=len(tok), image_token_index=tok.convert_tokens_to_ids("<image>"), kv_heads=2)
    write_random_checkpoint(str(root / "src"), cfg, scale=0.2)
    toy_tokenizers.save(tok, str(root / "src"))
    return convert(str(root / "src"), str(root / "model"), progress=False)


@pytest.fixture(scope="session")
def toy_model_dir(tmp_path_factory):
    """A tiny random LLaVA-NeXT (GQA) with the Vicuna-style toy tokenizer, converted: for sweeps."""
    return convert_toy(tmp_path_factory.mktemp("toy-next"), "llava_next")


@pytest.fixture(scope="session")
def toy_llava_dir(tmp_path_factory):
    """The shipped toy LLaVA-1.5 (trained, with its tokenizer), converted."""
    from jaxflow.convert import convert
    from jaxflow.demo import ASSET

    return convert(ASSET, str(tmp_path_factory.mktemp("toy-llava") / "model"), progress=False)
