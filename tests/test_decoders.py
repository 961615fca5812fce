"""Mistral, Qwen2 and Yi decoders (llava-hf layouts) vs transformers (PyTorch, eager, float32) on tiny random
twins: logits, knockouts (additive float masks layer by layer), greedy generation, sweeps, and what is refused."""

import csv
import json
import os
import shutil

import numpy as np
import pytest
import tiny
from test_generate import EOS
from test_knockout import cut_tensor, specs
from test_parity import hf_forward, hf_greedy

import jaxflow
from jaxflow.config import ModelConfig, UnsupportedConfigError
from jaxflow.convert import ConversionError, convert
from jaxflow.reference import embeddings, run_layers

TOL = 1e-4
YI = {"vocab": 64064, "image_token": 64000}  # llava-v1.6-34b-hf: image token inside a 64064 vocabulary
MEMBERS = [
    # (id, kind, config)
    ("mistral-1.5", "llava", {"text_type": "mistral", "kv_heads": 2}),
    ("mistral-1.5-window", "llava", {"text_type": "mistral", "kv_heads": 2, "sliding_window": 5}),
    ("mistral-next", "llava_next", {"text_type": "mistral", "kv_heads": 2}),
    ("mistral-next-window", "llava_next", {"text_type": "mistral", "kv_heads": 2, "sliding_window": 7}),
    ("qwen2-1.5-untied", "llava", {"text_type": "qwen2", "kv_heads": 2}),
    ("qwen2-next-tied", "llava_next", {"text_type": "qwen2", "tie": True}),
    ("qwen2-next-window", "llava_next", {"text_type": "qwen2", "kv_heads": 2, "sliding_window": 6}),
    ("yi-next", "llava_next", {"kv_heads": 2, **YI}),
]
IDS = [m[0] for m in MEMBERS]
SIZES = {"llava": ((42, 42), (42, 42)), "llava_next": ((42, 42), (100, 30), (30, 100), (500, 77))}


def inputs(model, kind, **kw):
    return tiny.make_inputs(model.config, image_sizes=SIZES[kind], image_token=model.config.image_token_id, **kw)


@pytest.mark.parametrize("member", MEMBERS, ids=IDS)
def test_logits_match_transformers(twins, member):
    name, kind, kw = member
    hf, model = twins(kind, "llava-hf", **kw)
    text = model.config.text
    assert text.qkv_bias == (kw.get("text_type") == "qwen2")
    assert text.sliding_window == kw.get("sliding_window")
    ids, pv, isz, mask = inputs(model, kind, num_text=5)
    ids[1, -4:] = np.where(mask[1, -4:] == 1, 3, ids[1, -4:])  # rows differ in text too
    ours = np.asarray(model.logits(ids, pv, isz, attention_mask=mask))
    ref = hf_forward(hf, ids, pv, isz, mask).logits.numpy()
    err = np.abs(ours - ref).max()
    print(f"{name}: max |logits diff| = {err:.2e} (logit scale {np.abs(ref).max():.2f})")
    assert ours.shape == ref.shape and err < TOL
    if text.sliding_window is not None:  # the same weights without the window compute something else
        _, free = twins(kind, "llava-hf", **{**kw, "sliding_window": None})
        np.testing.assert_array_equal(free.module.language_model.embed_tokens.embedding[...],
                                      model.module.language_model.embed_tokens.embedding[...])
        assert ids.shape[1] > text.sliding_window
        assert np.abs(np.asarray(free.logits(ids, pv, isz, attention_mask=mask)) - ours).max() > 1e-3


@pytest.mark.parametrize("text_type", ["mistral", "qwen2"])
def test_window_as_long_as_the_sequence_changes_nothing(twins, text_type):
    """q attends k only if q - k < window: a window of T tokens is no window; T - 1 cuts (T - 1, 0) only."""
    _, free = twins("llava", "llava-hf", text_type=text_type, kv_heads=2)
    ids, pv, _, _ = inputs(free, "llava")
    t = ids.shape[1]
    base = np.asarray(free.logits(ids, pv))
    for window in (t, t - 1):
        hf, model = twins("llava", "llava-hf", text_type=text_type, kv_heads=2, sliding_window=window)
        ours = np.asarray(model.logits(ids, pv))
        assert np.abs(ours - hf_forward(hf, ids, pv, None).logits.numpy()).max() < TOL
        if window == t:
            np.testing.assert_array_equal(ours, base)
        else:
            np.testing.assert_array_equal(ours[:, :-1], base[:, :-1])
            assert np.abs(ours[:, -1] - base[:, -1]).max() > 1e-4


@pytest.mark.parametrize("member", [m for m in MEMBERS if m[1] == "llava_next" or "window" in m[0]],
                         ids=[m[0] for m in MEMBERS if m[1] == "llava_next" or "window" in m[0]])
def test_knockouts_match_transformers_with_float_masks(twins, member):
    name, kind, kw = member
    hf, model = twins(kind, "llava-hf", **kw)
    cfg = model.config.text
    ids, pv, isz, _ = tiny.make_inputs(model.config, image_sizes=((100, 30),), num_text=6,
                                       image_token=model.config.image_token_id)
    t = ids.shape[1]
    image = np.flatnonzero(ids[0] == model.config.image_token_id).tolist()
    question, last = list(range(image[-1] + 1, t - 1)), [t - 1]
    kos = specs(image, question, last)
    out = model.forward(ids, pv, isz, knockouts=kos, return_attentions=True)
    logits, attn = np.asarray(out.logits), np.asarray(out.attentions)
    embeds = embeddings(hf, ids, pv, isz)
    base = np.asarray(model.logits(ids, pv, isz))
    back = np.arange(t)[:, None] - np.arange(t)[None]  # [T, T] query minus key position
    attended = (back >= 0) & (back < (cfg.sliding_window or t))
    errs, effective = [], 0
    for k, ko in enumerate(kos):
        cut = cut_tensor(ko, *ids.shape, cfg.num_layers, cfg.num_heads)
        ref_logits, ref_attn = run_layers(hf, embeds, cut)
        errs.append(np.abs(logits[k] - ref_logits).max())
        assert errs[-1] < TOL, (k, errs[-1])
        assert np.abs(attn[k] - ref_attn).max() < 1e-5
        assert (attn[k][cut] == 0).all()
        change = np.abs(logits[k] - base).max()
        if (cut & attended).any():  # the knockout cuts edges the model attends: it has an effect
            assert change > 1e-3, (k, change)
            effective += 1
        else:  # every cut edge lies outside the sliding window: nothing changes
            assert change < 1e-5, (k, change)
    assert effective >= 3
    assert (attn[..., ~attended] == 0).all()  # causality, and no attention beyond the window
    print(f"{name} knockout parity: max |logits diff| = {max(errs):.2e}")


@pytest.mark.parametrize("member", [MEMBERS[i] for i in (1, 3, 5, 6, 7)], ids=[IDS[i] for i in (1, 3, 5, 6, 7)])
def test_greedy_generation_matches_transformers(twins, member):
    """The KV cache keeps every key; the window is the mask (transformers' sliding cache drops old keys)."""
    _, kind, kw = member
    hf, model = twins(kind, "llava-hf", **kw)
    ids, pv, isz, mask = tiny.make_inputs(model.config, image_sizes=SIZES[kind][:3] if kind == "llava_next"
                                          else ((42, 42),) * 3, num_text=[5, 3, 8], seed=3,
                                          image_token=model.config.image_token_id)
    steps = 8
    out = model.generate(ids, pv, isz, attention_mask=mask, max_new_tokens=steps, eos_token_id=EOS)
    for row in range(len(ids)):
        ref_tokens, ref_probs = hf_greedy(hf, ids, pv, isz, mask, row, steps, EOS)
        np.testing.assert_array_equal(out.tokens[row, : len(ref_tokens)], ref_tokens)
        assert np.abs(out.first_token_probs[row] - ref_probs).max() < 1e-5


def test_qwen2_biases_are_sharded_on_heads(twins):
    """On a data=2,model=4 mesh (8 host devices from conftest.py) the q/k/v biases split like their kernels'
    columns, o_proj has none, and the logits equal the single-device ones."""
    from jax.sharding import PartitionSpec as P

    from jaxflow.sharding import make_mesh

    _, model = twins("llava", "llava-hf", text_type="qwen2", kv_heads=2)
    sharded = jaxflow.load(model.path, mesh=make_mesh("data=2,model=4"))
    attn = sharded.module.language_model.layers[0].self_attn
    for proj in (attn.q_proj, attn.k_proj, attn.v_proj):
        assert proj.kernel[...].sharding.spec == P(None, "model")
        assert proj.bias[...].sharding.spec == P("model")
        assert np.abs(np.asarray(proj.bias[...])).max() > 0.1  # the twin's biases are not zero
    assert attn.o_proj.bias is None
    ids, pv, _, mask = inputs(model, "llava")
    np.testing.assert_allclose(np.asarray(sharded.logits(ids, pv, attention_mask=mask)),
                               np.asarray(model.logits(ids, pv, attention_mask=mask)), rtol=0, atol=1e-5)


def test_image_token_outside_the_vocabulary(twins, tmp_path):
    """Nothing assumes image_token < vocab_size: the Yi twin with its image token moved to vocab_size (no
    embedding row) gives the same logits."""
    hf, model = twins("llava_next", "llava-hf", kv_heads=2, **YI)
    src = tiny.save_llava_hf(hf, str(tmp_path / "src"))
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["image_token_index"] = config["text_config"]["vocab_size"]
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(config, f)
    moved = jaxflow.load(convert(src, str(tmp_path / "out"), progress=False))
    assert moved.config.image_token_id == moved.config.text.vocab_size == 64064
    ids, pv, isz, mask = inputs(model, "llava_next")
    moved_ids = np.where(ids == YI["image_token"], moved.config.image_token_id, ids)
    np.testing.assert_allclose(np.asarray(moved.logits(moved_ids, pv, isz, attention_mask=mask)),
                               np.asarray(model.logits(ids, pv, isz, attention_mask=mask)), rtol=0, atol=1e-6)


# ---- sweeps -------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [{"text_type": "mistral", "sliding_window": 24}, {"text_type": "qwen2"}],
                         ids=["mistral-window", "qwen2"])
def test_sweep_incremental_equals_full(tmp_path, kw):
    """A study sweep through the toy GQA rows: the incremental recomputation (KV prefix + the window's mask)
    equals full forwards."""
    import toy_tokenizers

    from jaxflow.sweep import run
    from jaxflow.sweep.flows import STUDY_FLOWS, parse_flow

    tok = toy_tokenizers.llama2_tokenizer()
    hf = tiny.hf_model("llava_next", vocab=len(tok), image_token=tok.convert_tokens_to_ids("<image>"), kv_heads=2,
                       **kw)
    src = tiny.save_llava_hf(hf, str(tmp_path / "src"))
    toy_tokenizers.save(tok, src)
    model = jaxflow.load(convert(src, str(tmp_path / "model"), progress=False))
    data, images = tiny.task_subset(tmp_path, 3)
    flows = [parse_flow(f) for f in STUDY_FLOWS]
    opts = dict(flows=flows, window_size=2, batch=2, images=str(images), filter_correct=False, progress=False)
    results = {}
    for method in ("incremental", "full"):
        summary = run.sweep(model, str(data), str(tmp_path / method), method=method, **opts)
        assert summary["kept"] == 3
        with open(tmp_path / method / "results.csv", newline="") as f:
            results[method] = {(r["question_id"], r["block_desc"], r["layer"]): float(r["new_score_first"])
                               for r in csv.DictReader(f)}
    inc, full = results["incremental"], results["full"]
    assert inc.keys() == full.keys() and len(inc) == 3 * len(flows) * model.config.text.num_layers
    err = max(abs(inc[k] - full[k]) for k in inc)
    print(f"incremental vs full: max |p diff| = {err:.2e} over {len(inc)} rows")
    assert err < 1e-6
    assert max(abs(v - next(iter(inc.values()))) for v in inc.values()) > 1e-4  # knockouts did something


# ---- refusals -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, match", [
    ({"model_type": "gemma"}, r"text_config\.model_type='gemma' is not supported \(jaxflow implements 'llama', "
                              r"'mistral', 'qwen2'\)"),
    ({"model_type": "llama", "sliding_window": 8}, r"text_config\.sliding_window=8 is not known"),
    ({"model_type": "mistral", "sliding_window": 0}, r"text_config\.sliding_window=0 is not supported"),
    ({"model_type": "mistral", "attention_bias": True}, r"text_config\.attention_bias=True is not supported"),
    ({"model_type": "qwen2", "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1,
      "layer_types": None}, r"text_config\.use_sliding_window=true with max_window_layers=1"),
    ({"model_type": "qwen2", "layer_types": ["full_attention", "chunked_attention", "full_attention"]},
     r"text_config\.layer_types=.*'chunked_attention'"),
])
def test_unsupported_text_configs_are_named(text, match):
    family = text["model_type"] if text["model_type"] in tiny.TEXT_CONFIGS else "llama"
    base = tiny.hf_config("llava", text_type=family).to_dict()
    base["text_config"] = {**base["text_config"], **text}
    with pytest.raises(UnsupportedConfigError, match=match):
        ModelConfig.from_hf(base)


def test_qwen2_sliding_window_in_every_layer_is_read():
    d = tiny.hf_config("llava", text_type="qwen2", sliding_window=8).to_dict()
    assert d["text_config"]["layer_types"] == ["sliding_attention"] * 3
    assert ModelConfig.from_hf(d).text.sliding_window == 8
    d["text_config"].update(use_sliding_window=False, sliding_window=8, layer_types=None)  # no window at all
    assert ModelConfig.from_hf(d).text.sliding_window is None


def test_missing_and_unexpected_biases_are_named(twins, tmp_path):
    from safetensors.numpy import load_file, save_file

    hf, _ = twins("llava", "llava-hf", text_type="qwen2", kv_heads=2)
    src = tiny.save_llava_hf(hf, str(tmp_path / "qwen"))
    path = os.path.join(src, "model.safetensors")
    tensors = load_file(path)
    bias = next(k for k in tensors if k.endswith("layers.1.self_attn.k_proj.bias"))
    save_file({k: v for k, v in tensors.items() if k != bias}, path)
    with pytest.raises(ConversionError, match=r"missing tensors \(1\): \['text\.layers\.1\.self_attn\.k_proj\.bias'"):
        convert(src, str(tmp_path / "out"), progress=False)
    assert not os.path.exists(tmp_path / "out")
    # the same tensors under a Llama config: the biases are not part of a Llama decoder
    shutil.copy(os.path.join(src, "config.json"), tmp_path / "qwen.json")
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config["text_config"] = tiny.hf_config("llava", kv_heads=2).to_dict()["text_config"]
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(config, f)
    save_file(tensors, path)
    with pytest.raises(ConversionError, match=r"unexpected tensors \(9\): .*self_attn\.q_proj\.bias"):
        convert(src, str(tmp_path / "out"), progress=False)


# ---- original layouts (LLaVA's LlavaMistralForCausalLM, lmms-lab's LlavaQwenForCausalLM) -----------------------

ORIGINAL = [
    ("mistral-next-window-original", "llava_next", {"text_type": "mistral", "kv_heads": 2, "sliding_window": 7}),
    ("mistral-1.5-original", "llava", {"text_type": "mistral", "kv_heads": 2}),
    ("qwen2-next-original", "llava_next", {"text_type": "qwen2", "kv_heads": 2}),
    ("qwen2-1.5-tied-original", "llava", {"text_type": "qwen2", "tie": True}),
]


@pytest.mark.parametrize("member", ORIGINAL, ids=[m[0] for m in ORIGINAL])
def test_original_layout_logits_match_transformers(twins, member, tmp_path):
    """The twin's tensors renamed to the original layout (model.layers.*, model.mm_projector.*, lm_head) with
    the config.json LLaVA's class writes (architectures, llava_mistral / llava_qwen, the decoder's attributes)."""
    name, kind, kw = member
    hf, model = twins(kind, "original", **kw)
    assert model.metadata["layout"] == "original"
    text = model.config.text
    assert (text.qkv_bias, text.sliding_window) == (kw["text_type"] == "qwen2", kw.get("sliding_window"))
    ids, pv, isz, mask = tiny.make_inputs(model.config, image_sizes=SIZES[kind][:3], num_text=5)
    ours = np.asarray(model.logits(np.where(ids == tiny.IMAGE_TOKEN, model.config.image_token_id, ids), pv, isz,
                                   attention_mask=mask))
    ref = hf_forward(hf, ids, pv, isz, mask).logits.numpy()
    err = np.abs(ours - ref).max()
    print(f"{name}: max |logits diff| = {err:.2e}")
    assert ours.shape == ref.shape and err < TOL


def _original_config(tmp_path, **change) -> str:
    hf = tiny.hf_model("llava", text_type="qwen2", kv_heads=2)
    src, clip = tiny.save_original(hf, str(tmp_path / "src"), str(tmp_path / "clip"))
    with open(os.path.join(src, "config.json")) as f:
        config = json.load(f)
    config.update(change)
    with open(os.path.join(src, "config.json"), "w") as f:
        json.dump(config, f)
    return src, clip


@pytest.mark.parametrize("change, match", [
    ({"architectures": ["LlavaMixtralForCausalLM"]},
     r"architectures=\['LlavaMixtralForCausalLM'\] is not supported \(jaxflow implements LlavaLlamaForCausalLM, "
     r"LlavaMistralForCausalLM, LlavaQwenForCausalLM\)"),
    ({"model_type": "llava_mistral"}, r"architectures=\['LlavaQwenForCausalLM'\] and model_type='llava_mistral' "
                                      r"name different decoders"),
    ({"use_sliding_window": True, "sliding_window": 8, "max_window_layers": 2},
     r"text_config\.use_sliding_window=true with max_window_layers=2"),
    ({"model_type": "llava_gemma"}, r"model_type='llava_gemma' is not supported: not a LLaVA-style model"),
])
def test_original_config_refusals_are_named(tmp_path, change, match):
    src, clip = _original_config(tmp_path, **change)
    with pytest.raises(ConversionError, match=match) as info:
        convert(src, str(tmp_path / "out"), clip=clip, progress=False)
    assert str(info.value).startswith(os.path.join(src, "config.json"))
    assert not os.path.exists(tmp_path / "out")


def test_original_without_architectures_is_llama(tmp_path):
    """model_type 'llava' and no architectures (as LLaVA-1.5 saves): the Llama decoder; Qwen2's biases then are
    unexpected tensors, named."""
    src, clip = _original_config(tmp_path, model_type="llava", architectures=None)
    with pytest.raises(ConversionError, match=r"unexpected tensors \(9\): \['model\.layers\.0\.self_attn\.k_proj"):
        convert(src, str(tmp_path / "out"), clip=clip, progress=False)


# ---- refusals: models that are not LLaVA-style -------------------------------------------------------------------

REFUSED = [
    ({"model_type": "qwen2_vl"}, "model_type='qwen2_vl' is not supported: M-RoPE"),
    ({"model_type": "qwen2_5_vl"}, "model_type='qwen2_5_vl' is not supported: M-RoPE"),
    ({"model_type": "mllama"}, "model_type='mllama' is not supported: cross-attention layers"),
    ({"model_type": "pixtral"}, "model_type='pixtral' is not supported: the Pixtral vision encoder"),
    ({"model_type": "llava", "vision_config": {"model_type": "pixtral"}},
     "vision_config.model_type='pixtral' is not supported: the Pixtral vision encoder"),
    ({"model_type": "idefics"}, "model_type='idefics' is not supported: gated cross-attention layers"),
    ({"model_type": "idefics2"}, "model_type='idefics2' is not supported: a perceiver-resampler connector"),
    ({"model_type": "idefics3"}, "model_type='idefics3' is not supported: a pixel-shuffle connector"),
    ({"model_type": "gemma3"}, "model_type='gemma3' is not supported: not a LLaVA-style model jaxflow knows"),
    ({}, "model_type=None is not supported: not a LLaVA-style model jaxflow knows"),
]


@pytest.fixture(scope="module")
def llava_hf_src(tmp_path_factory):
    hf = tiny.hf_model("llava", kv_heads=2)
    return tiny.save_llava_hf(hf, str(tmp_path_factory.mktemp("refused") / "src"))


@pytest.mark.parametrize("config, message", REFUSED, ids=[m.split(" ")[0] for _, m in REFUSED])
def test_jaxflow_convert_refuses_non_llava_models(capsys, tmp_path, llava_hf_src, config, message):
    """One line naming the model type and what it has that jaxflow does not implement, before any tensor is read
    (the tensors here are a valid llava-hf checkpoint's, and Qwen2-VL's model.layers.* are not taken for LLaVA's
    original layout)."""
    from test_cli_errors import fails

    src = tmp_path / "src"
    shutil.copytree(llava_hf_src, src)
    (src / "config.json").write_text(json.dumps(config))
    line = fails(capsys, ["convert", str(src), str(tmp_path / "out")], f"{src / 'config.json'}: {message}",
                 "jaxflow supports llava, llava_next, llava_onevision (llava-hf layout) and llava, llava_llama, "
                 "llava_mistral, llava_qwen (original LLaVA layout)")
    assert ".tmp-" not in line and not os.path.exists(tmp_path / "out")
    assert not [p for p in os.listdir(tmp_path) if p.startswith(".out")]
