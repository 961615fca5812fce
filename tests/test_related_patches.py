"""The study's related-patch rule against an independent construction (transformers' own image processors run on
the mask, transformers' unpadding), the extra regions of the study, and the model's own processor settings in
every command."""

import csv
import json

import numpy as np
import PIL.Image
import pytest
import torch
import toy_tokenizers
from test_images import CFG15, CFGNEXT, PINPOINTS, G, P, S
from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil
from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape, unpad_image

from jaxflow import cli
from jaxflow.config import ModelConfig
from jaxflow.geometry import image_layout
from jaxflow.inputs import gqa, images
from jaxflow.inputs.images import ProcessorSettings, overlap_features, related_features, study_mask
from jaxflow.inputs.regions import NEXT_REGIONS, RegionError, check_region_names, locate, require
from jaxflow.testing import tiny_hf_config

MASK_ONLY = dict(do_rescale=False, do_normalize=False)  # what the study switches off for its mask


def _processors(side=S, pinpoints=PINPOINTS, mean=images.OPENAI_CLIP_MEAN, std=images.OPENAI_CLIP_STD, **kw):
    common = dict(size={"shortest_edge": side}, crop_size={"height": side, "width": side}, image_mean=list(mean),
                  image_std=list(std), **kw)
    return LlavaImageProcessorPil(do_pad=True, **common), LlavaNextImageProcessorPil(image_grid_pinpoints=pinpoints,
                                                                                     **common)


HF15, HFNEXT = _processors(**MASK_ONLY)


def _mask(h, w, boxes):
    """The mask built without PIL drawing: green, and each integer-truncated box red, both corners inclusive."""
    m = np.zeros((h, w, 3), np.uint8)
    m[..., 1] = 255
    for box in boxes:
        x, y, bw, bh = (int(v) for v in box)
        m[max(y, 0):max(y + bh + 1, 0), max(x, 0):max(x + bw + 1, 0)] = (255, 0, 0)
    return PIL.Image.fromarray(m)


def _red_patches(crop):
    """[3, S, S] uint8-valued -> [G, G]: does the patch hold a pure red pixel?"""
    red = (crop[0] == 255) & (crop[1] == 0) & (crop[2] == 0)
    return red.reshape(G, P, G, P).any(axis=(1, 3))


def _transformers_related(kind, size, boxes):
    """Related flags in feature order from transformers alone: its processor on the mask, then the base patches
    and the grid reassembled, unpadded by transformers' `unpad_image`, with a newline slot closing each row."""
    h, w = size
    mask = _mask(h, w, boxes)
    if kind == "llava":
        return _red_patches(np.asarray(HF15(mask)["pixel_values"][0])).ravel()
    pv = np.asarray(HFNEXT(mask)["pixel_values"][0])  # [crops, 3, S, S]
    assert pv.dtype == np.uint8
    nh, nw = get_anyres_image_grid_shape((h, w), PINPOINTS, S)
    grid = np.stack([_red_patches(c) for c in pv[1:1 + nh * nw]]).reshape(nh, nw, G, G).transpose(0, 2, 1, 3)
    grid = unpad_image(torch.from_numpy(grid.reshape(1, nh * G, nw * G)), (h, w))[0].numpy()
    grid = np.concatenate([grid, np.zeros((len(grid), 1), bool)], axis=1)
    return np.concatenate([_red_patches(pv[0]).ravel(), grid.ravel()])


@pytest.mark.parametrize("kind", ["llava", "llava_next"])
def test_study_rule_equals_transformers_on_the_mask(kind):
    cfg = CFG15 if kind == "llava" else CFGNEXT
    rng = np.random.default_rng(0)
    cases = [((1500, 900), [(100, 100, 1, 1)]),  # tiny: bicubic blends it away
             ((336, 336), [(14, 14, 14, 14)]),  # inclusive corner: pixel 28 reaches the next patch
             ((336, 336), [(14.9, 14.9, 13.9, 13.9)]),  # truncated to (14, 14, 13, 13): one patch
             ((375, 500), [(253, 291, 60, 80)]), ((500, 333), [(90, 269, 50, 83), (54, 264, 39, 236)]),
             ((375, 500), [(-1, -2, 40, 30), (480, 360, 22, 17)])]  # overshooting boxes, clipped by the drawing
    for size in [(375, 500), (500, 375), (37, 53), (600, 300), (1000, 3), (99, 1001), (1200, 1200)]:
        h, w = size
        for _ in range(3):
            bw, bh = int(rng.integers(0, w)), int(rng.integers(0, h))
            cases.append((size, [(int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1)), bw, bh)]))
    for size, boxes in cases:
        assert (np.asarray(study_mask(size, boxes)) == np.asarray(_mask(*size, boxes))).all()
        got = related_features(cfg, size, boxes, "study")
        assert got.dtype == bool and len(got) == len(image_layout(cfg, size))
        np.testing.assert_array_equal(got, _transformers_related(kind, size, boxes), err_msg=f"{size} {boxes}")
    print(f"{kind}: the study rule equals transformers' processor on the mask in {len(cases)} cases")

    # a tiny box: no related patch under the study rule, some under overlap
    assert not related_features(cfg, (1500, 900), [(100, 100, 1, 1)], "study").any()
    assert overlap_features(cfg, (1500, 900), [(100, 100, 1, 1)]).any()
    # the inclusive corner: (14, 14, 14, 14) covers pixels 14..28, so patches (1..2, 1..2); overlap only (1, 1)
    lay = image_layout(cfg, (336, 336))

    def patches(flags):  # (crop, row, col) of the flagged features
        return {(int(lay.crop[i]), int(lay.row[i]), int(lay.col[i])) for i in np.flatnonzero(flags)}

    base = {(0, r, c) for r in (1, 2) for c in (1, 2)}
    grid = {(1, r, c) for r in (1, 2) for c in (13, 14)}  # the 336 x 336 image sits at x = 168 of a 336 x 672 canvas
    assert patches(related_features(cfg, (336, 336), [(14, 14, 14, 14)], "study")) == \
        (base | grid if cfg.image.anyres else base)
    assert patches(related_features(cfg, (336, 336), [(14, 14, 14, 14)], "overlap")) == \
        ({(0, 1, 1), (1, 1, 13)} if cfg.image.anyres else {(0, 1, 1)})
    truncated = related_features(cfg, (336, 336), [(14.9, 14.9, 13.9, 13.9)], "study")
    assert truncated.sum() == (2 if cfg.image.anyres else 1)


def test_pad_and_canvas_are_never_red():
    """LLaVA-1.5 pads with the mean colour, the anyres canvas is black: a whole-image box relates no pad patch."""
    mean_pad = np.asarray(HF15(_mask(300, 600, [(0, 0, 599, 299)]))["pixel_values"][0])[:, 0, 0]
    assert tuple(mean_pad) == tuple(int(v * 255) for v in images.OPENAI_CLIP_MEAN)  # (122, 116, 104)
    wide = related_features(CFG15, (300, 600), [(0, 0, 600, 300)], "study").reshape(G, G)
    assert wide[6:18].all() and not wide[:6].any() and not wide[18:].any()
    with pytest.raises(ValueError, match="related_patches"):
        related_features(CFG15, (30, 30), [(0, 0, 3, 3)], "red")


def _tokenizer_and_configs():
    tok = toy_tokenizers.llama2_tokenizer()
    image = tok.convert_tokens_to_ids("<image>")
    return tok, {kind: ModelConfig.from_hf(tiny_hf_config(kind, vocab=len(tok), image_token_index=image))
                 for kind in ("llava", "llava_next")}


def test_next_regions_partition_the_image():
    tok, cfgs = _tokenizer_and_configs()
    cfg = cfgs["llava_next"]  # 56 px crops of 4 x 4 patches
    question = "Is the jar to the left or to the right of the tables?"
    for size, boxes in [((100, 220), [(30, 20, 60, 50)]), ((300, 120), [(0, 0, 60, 150), (70, 200, 40, 90)]),
                        ((56, 56), [(10, 10, 20, 20)])]:
        _, enc, regions = locate(cfg, tok, size, question, boxes=boxes, object_names=("jar", "table"))
        lay = image_layout(cfg, size)
        image, base, grid = (set(regions[k].tolist()) for k in ("image", "image_base", "image_grid"))
        newline, related = set(regions["image_newline"].tolist()), set(regions["related_image_patches"].tolist())
        rel_grid, rest_grid = (set(regions[k].tolist()) for k in ("related_image_patches_grid",
                                                                   "image_grid_without_related"))
        assert base | grid == image and not base & grid and len(base) == cfg.features_per_crop
        assert len(newline) == len(set(lay.row[lay.crop > 0])) and newline <= grid  # one slot per grid row
        assert rel_grid | rest_grid == grid and not rel_grid & rest_grid and newline <= rest_grid
        assert rel_grid == related & grid and related & base and rel_grid  # both frames see the objects
        assert set(regions["other_image_patches"].tolist()) == image - related - newline
        positions = enc.image_positions
        np.testing.assert_array_equal(regions["image_base"], positions[:cfg.features_per_crop])  # the base comes first
        decoded = tok.decode(enc.input_ids[regions["central_object"]])
        assert "jar" in decoded and "tables" in decoded and set(regions["central_object"]) <= set(regions["question"])
    # a name that is not a word of the question: central_object is undefined, with the reason
    _, _, regions = locate(cfg, tok, (56, 56), "Is the man on the left?", boxes=[(0, 0, 9, 9)],
                           object_names=("he",))  # "he" only inside "the"
    assert "central_object" not in regions and "'he'" in regions.undefined["central_object"]
    with pytest.raises(RegionError, match="central_object.*'he'"):
        require(regions, ["central_object", "image"])
    # LLaVA-1.5 has no grid
    _, _, regions = locate(cfgs["llava"], tok, (56, 56), "Is it red?", boxes=[(0, 0, 9, 9)])
    assert not set(NEXT_REGIONS) & set(regions) and set(NEXT_REGIONS) <= set(regions.undefined)
    with pytest.raises(ValueError, match="LLaVA-NeXT"):
        check_region_names(["image_grid", "question"], cfgs["llava"])
    with pytest.raises(ValueError, match="unknown region"):
        check_region_names(["imag"], cfg)
    check_region_names(["image_grid", "central_object"], cfg)


# ---------------------------------------------------------------- one processor setting for every command

MEAN, STD = (0.5, 0.25, 0.75), (0.2, 0.3, 0.4)


@pytest.fixture(scope="module")
def custom_model(tmp_path_factory):
    """A tiny LLaVA-NeXT whose preprocessor_config.json has non-default mean/std, converted and loaded."""
    import jaxflow
    from jaxflow.convert import convert
    from jaxflow.testing import write_random_checkpoint

    root = tmp_path_factory.mktemp("custom-processor")
    tok = toy_tokenizers.llama2_tokenizer()
    cfg = tiny_hf_config("llava_next", vocab=len(tok), image_token_index=tok.convert_tokens_to_ids("<image>"))
    write_random_checkpoint(str(root / "src"), cfg, scale=0.2)
    toy_tokenizers.save(tok, str(root / "src"))
    s = cfg["vision_config"]["image_size"]
    (root / "src" / "preprocessor_config.json").write_text(json.dumps(
        {"image_mean": list(MEAN), "image_std": list(STD), "size": {"shortest_edge": s},
         "crop_size": {"height": s, "width": s}, "resample": 3}))
    model = jaxflow.load(convert(str(root / "src"), str(root / "model"), progress=False))
    return model, cfg, root


def _task_file(root, rows):
    """A ChooseAttr-schema task file with the given (question_id, question, name, (w, h), box) rows, and images."""
    with open(gqa.task_file("ChooseAttr"), newline="") as f:
        template = next(csv.DictReader(f))
    (root / "images").mkdir(exist_ok=True)
    path = root / "tasks.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(template))
        w.writeheader()
        rng = np.random.default_rng(0)
        for qid, question, name, (iw, ih), (x, y, bw, bh) in rows:
            w.writerow({**template, "question_id": qid, "img_id": qid, "question": question, "true option": "empty",
                        "false option": "full", "central object name": name, "image_w": iw, "image_h": ih,
                        "central object x": x, "central object y": y, "central object w": bw,
                        "central object h": bh})
            PIL.Image.fromarray(rng.integers(0, 255, (ih, iw, 3), dtype=np.uint8)).save(root / "images" / f"{qid}.jpg")
    return str(path)


def test_every_command_uses_the_model_processor(custom_model, monkeypatch, capsys):
    import jaxflow
    from jaxflow.inputs import regions as regions_module
    from jaxflow.sweep import run

    model, hf_cfg, root = custom_model
    assert model.processor == ProcessorSettings(MEAN, STD, model.config.vision.image_size,
                                                model.config.vision.image_size, 3)
    assert jaxflow.Model(model.module, model.config).processor == ProcessorSettings()  # no directory: defaults
    data = _task_file(root, [("0001", "Is the jar full or empty?", "jar", (120, 90), (30, 20, 40, 30))])
    sample = gqa.load_tasks(data, str(root / "images"))[0][0]
    prepared = next(run.prepare(model, [sample], None))
    ours = prepared.inputs.pixel_values[0]
    s = model.config.vision.image_size
    _, hf = _processors(s, hf_cfg["image_grid_pinpoints"], MEAN, STD)
    with PIL.Image.open(sample.image_path) as im:
        theirs = np.asarray(hf(im.convert("RGB"))["pixel_values"][0])
        default, _ = images.preprocess(im.convert("RGB"), model.config)
    assert ours.shape == theirs.shape and float(np.abs(ours - theirs).max()) <= 1e-5
    assert float(np.abs(ours - default[0]).max()) > 0.5  # the OpenAI CLIP defaults would give other pixels

    built = []
    real = regions_module.build_sample
    monkeypatch.setattr(regions_module, "build_sample", lambda *a, **k: built.append(real(*a, **k)) or built[-1])
    assert cli.main(["regions", "--model", model.path, "--image", sample.image_path, "--question", sample.question,
                     "--box", "30,20,40,30", "--object-name", "jar", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    np.testing.assert_array_equal(built[0].pixel_values, prepared.inputs.pixel_values)
    assert out["related_patches"] == "study"
    assert out["regions"]["related_image_patches"] == prepared.inputs.regions["related_image_patches"].tolist()
    assert out["regions"]["central_object"] == prepared.inputs.regions["central_object"].tolist()


def test_sweep_rows_record_the_rule_and_empty_cuts(custom_model):
    """A tiny box has no related patch under the study rule: its Related rows are written with n_source 0 and no
    change; overlap marks a patch. A row whose object name is not in the question is skipped, with the reason."""
    from jaxflow.sweep import run

    model, _, root = custom_model
    data = _task_file(root, [("0001", "Is the jar full or empty?", "jar", (120, 90), (30, 20, 60, 50)),
                             ("0002", "Is the jar full or empty?", "jar", (600, 400), (300, 200, 1, 1)),
                             ("0003", "Is the pot full or empty?", "he", (120, 90), (30, 20, 60, 50))])
    flows = ["Related image patches->Question", "central_object->last", "image_grid->question"]
    kw = dict(window_size=1, batch=2, images=str(root / "images"), filter_correct=False, progress=False)
    runs = {}
    for rule in ("study", "overlap"):
        out = root / f"run-{rule}"
        if rule == "study":
            run.sweep(model, data, str(out), flows=[run.parse_flow(f) for f in flows], **kw)
        else:  # the command line, as a user runs it
            assert cli.main(["sweep", "--model", model.path, "--data", data, "--images", str(root / "images"),
                             "--out", str(out), "--flows", *flows, "--window", "1", "--batch", "2",
                             "--keep-incorrect", "--related-patches", "overlap"]) == 0
        assert json.loads((out / "run.json").read_text())["related_patches"] == rule
        with open(out / "results.csv", newline="") as f:
            runs[rule] = list(csv.DictReader(f))
        with open(out / "skipped.csv", newline="") as f:
            skipped = list(csv.DictReader(f))
        assert [r["question_id"] for r in skipped] == ["0003"] and "central_object" in skipped[0]["reason"]
        assert {r["related_patches"] for r in runs[rule]} == {rule}
    layers = model.config.text.num_layers
    for rule, rows in runs.items():
        related = {r["question_id"]: r for r in rows if r["block_desc"] == flows[0]}
        assert len(rows) == 2 * len(flows) * layers and int(related["0001"]["n_source"]) > 0
        tiny = [r for r in rows if r["question_id"] == "0002" and r["block_desc"] == flows[0]]
        if rule == "study":
            assert all(int(r["n_source"]) == 0 for r in tiny)  # the flow cuts nothing ...
            assert max(abs(float(r["relative_diff_first"])) for r in tiny) < 1e-3  # ... and changes nothing
        else:
            assert all(int(r["n_source"]) > 0 for r in tiny)
        for r in rows:
            if r["block_desc"] == flows[1]:
                assert int(r["n_source"]) >= 1 and int(r["n_target"]) == 1
