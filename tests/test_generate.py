"""Greedy generation with the KV cache returns transformers' tokens and first-token distribution."""

import numpy as np
import pytest
import tiny
import torch

EOS = 2


@pytest.mark.parametrize("kind,kv", [("llava", 2), ("llava_next", 4)])
def test_greedy_generation_matches_transformers(twins, kind, kv):
    hf, model = twins(kind, "llava-hf", kv_heads=kv)
    sizes = ((42, 42), (100, 30), (30, 100)) if kind == "llava_next" else ((42, 42),) * 3
    ids, pv, isz, mask = tiny.make_inputs(model.config, image_sizes=sizes, num_text=[5, 3, 8], seed=3)
    steps = 6
    out = model.generate(ids, pv, isz, attention_mask=mask, max_new_tokens=steps, eos_token_id=EOS)
    assert out.tokens.shape[0] == len(ids) and out.tokens.shape[1] <= steps
    for row in range(len(ids)):
        n = int(mask[row].sum())
        args = {"input_ids": torch.tensor(ids[row: row + 1, :n]),
                "pixel_values": torch.tensor(pv[row: row + 1])}
        if isz is not None:
            args["image_sizes"] = torch.tensor(isz[row: row + 1])
        with torch.no_grad():
            ref = hf.generate(**args, max_new_tokens=steps, do_sample=False, eos_token_id=EOS,
                              pad_token_id=tiny.PAD_TOKEN, output_scores=True, return_dict_in_generate=True)
        ref_tokens = ref.sequences[0, n:].numpy()
        ours = out.tokens[row, : len(ref_tokens)]
        np.testing.assert_array_equal(ours, ref_tokens)
        if len(ref_tokens) < out.tokens.shape[1]:  # finished rows are filled with eos
            assert (out.tokens[row, len(ref_tokens):] == EOS).all()
        ref_probs = torch.softmax(ref.scores[0][0].float(), -1).numpy()
        assert np.abs(out.first_token_probs[row] - ref_probs).max() < 1e-5


def test_generate_rejects_left_padding(twins):
    _, model = twins("llava", "llava-hf", kv_heads=2)
    ids, pv, _, mask = tiny.make_inputs(model.config)
    mask[0, 0] = 0
    with pytest.raises(ValueError, match="right-padded"):
        model.generate(ids, pv, attention_mask=mask)
