"""`jaxflow.load(..., no_anyres=True)`: a LLaVA-NeXT checkpoint run as LLaVA runs it with
image_aspect_ratio="pad" and mm_patch_merge_type="spatial" (the study's --noHD_noPad).

LLaVA's process_images pads the image to a square of the mean colour and CLIP-preprocesses it (one crop);
prepare_inputs_labels_for_multimodal, for a single-crop feature under "spatial" (no "unpad"), takes the crop's
features as they are and appends no image_newline. That is LLaVA-1.5's computation on the NeXT weights, so the
oracle is transformers' LLaVA-1.5 holding the same weights without the newline."""

import numpy as np
import PIL.Image
import pytest
import tiny
import torch
from transformers import LlavaForConditionalGeneration
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

import jaxflow
from jaxflow.geometry import image_layout
from jaxflow.inputs import images
from jaxflow.inputs.regions import build_sample


def test_no_anyres_is_llava_1_5_on_the_next_weights(twins):
    hf_next, next_model = twins("llava_next", "llava-hf")
    model = jaxflow.load(next_model.path, no_anyres=True)
    cfg = model.config
    assert model.no_anyres and cfg.model_type == "llava_next" and not cfg.image.anyres
    size = (30, 100)  # (H, W): anyres would give a base crop, a grid and newline rows
    assert len(image_layout(cfg, size)) == cfg.vision.grid ** 2 == 9 < len(image_layout(next_model.config, size))

    rng = np.random.default_rng(0)
    image = PIL.Image.fromarray(rng.integers(0, 255, (*size, 3), dtype=np.uint8))
    pv, _ = images.preprocess(image, cfg)
    s = cfg.vision.image_size
    pad = LlavaImageProcessorPil(do_pad=True, size={"shortest_edge": s}, crop_size={"height": s, "width": s})
    np.testing.assert_allclose(pv, pad(image, return_tensors="np")["pixel_values"], atol=1e-6)  # expand2square + CLIP
    assert pv.shape == (1, 3, s, s)

    hf15 = LlavaForConditionalGeneration._from_config(tiny.hf_config("llava"), attn_implementation="eager").eval()
    state = {k: v for k, v in hf_next.state_dict().items() if "image_newline" not in k}
    hf15.load_state_dict(state, strict=True)
    ids, _, _, mask = tiny.make_inputs(cfg, num_text=[6, 4], image_sizes=(size, size), seed=1)
    pixels = np.concatenate([pv, pv])
    ours = np.asarray(model.logits(ids, pixels, attention_mask=mask))
    with torch.no_grad():
        ref = hf15(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                   attention_mask=torch.tensor(mask)).logits.numpy()
    valid = mask.astype(bool)
    err = np.abs(ours - ref)[valid].max()
    print(f"no_anyres NeXT vs transformers LLaVA-1.5 on the same weights: max |logit diff| {err:.2e}")
    assert err < 1e-4


def test_no_anyres_sample_geometry(toy_model_dir):
    model = jaxflow.load(toy_model_dir, no_anyres=True)
    rng = np.random.default_rng(1)
    image = PIL.Image.fromarray(rng.integers(0, 255, (120, 200, 3), dtype=np.uint8))
    box = (20, 30, 50, 40)
    sample = build_sample(model.config, model.tokenizer, image, "Is the jar full or empty?", boxes=[box],
                          mode=model.prompt_mode)
    n = model.config.vision.grid ** 2
    image_pos = sample.regions["image"]
    assert len(image_pos) == n and (np.diff(image_pos) == 1).all()  # one crop, in order, no newline slot
    assert (sample.input_ids[image_pos] == model.config.image_token_id).sum() == n
    related, other = sample.regions["related_image_patches"], sample.regions["other_image_patches"]
    assert len(related) and np.array_equal(np.sort(np.concatenate([related, other])), image_pos)
    pv, _ = images.preprocess(image, model.config)
    np.testing.assert_array_equal(sample.pixel_values, pv)


def test_no_anyres_needs_a_next_checkpoint(twins):
    _, model = twins("llava", "llava-hf", kv_heads=2)
    with pytest.raises(ValueError, match="no_anyres applies to LLaVA-NeXT"):
        jaxflow.load(model.path, no_anyres=True)


def test_sweep_and_lens_take_no_anyres_and_the_decoding_limit():
    from jaxflow.cli import build_parser

    for command in ("sweep", "lens"):
        args = build_parser().parse_args([command, "--model", "m", "--data", "ChooseAttr", "--out", "o"])
        assert (args.no_anyres, args.max_new_tokens) == (False, 128)
        args = build_parser().parse_args([command, "--model", "m", "--data", "ChooseAttr", "--out", "o",
                                          "--no-anyres", "--max-new-tokens", "7"])
        assert (args.no_anyres, args.max_new_tokens) == (True, 7)
