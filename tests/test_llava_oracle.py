"""The LLaVA oracle tier: jaxflow against LLaVA's own code on tiny original-layout checkpoints.

`tests/oracle/llava_side.py` runs in the virtual environment of `scripts/setup_llava_oracle.sh` (llava-torch
1.2.2.post1, transformers 4.36.2, torch 2.13.0 CPU; `JAXFLOW_LLAVA_PYTHON` names another python). With LLaVA's own
classes it builds a SentencePiece tokenizer, a tiny CLIP and four `LlavaLlamaForCausalLM` checkpoints (LLaVA-1.5
pad; NeXT anyres + spatial_unpad + image_newline; NeXT with its tuned tower stored inside; NeXT with a grouped-query
decoder and RoPE theta 5e5) and a NeXT `LlavaMistralForCausalLM` (LLaVA-1.6-Mistral's class: GQA, RoPE theta 1e6, a
sliding window shorter than every sequence, which LLaVA's cut mask keeps), loads them with LLaVA's loader and
records what LLaVA computes on two rows of each of the study's six task kinds (packaged rows, images rescaled to
small synthetic ones). Here each checkpoint goes through `jaxflow convert --clip` and the two are compared: pixels
(`process_images`), prompt ids (`conv_templates["vicuna_v1"]` + `tokenizer_image_token`), the number and order of
the image features and the input embeddings (`prepare_inputs_labels_for_multimodal`), the study's regions (related
image patches by the red-mask rule), greedy decoding (LLaVA's `generate`) and the base and knocked-out first-token
probabilities of `jaxflow sweep` (LLaVA cut by an additive mask in the window's layers).

llava-torch 1.2.2.post1 has no `llava_llama_3` template (it came with LLaVA-NeXT's code), so only vicuna_v1 is
compared on the checkpoints; the prompt texts of vicuna_v1, mistral_instruct, chatml_direct and plain are compared
with LLaVA's `conv_templates` on their own. The tiny pinpoints are LLaVA-1.6's scaled to the 42 px tower, and
most image sizes are the ones where LLaVA's (width, height) reading of the pinpoints picks another grid than a
(height, width) reading.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parent.parent
LLAVA_SIDE = REPO / "tests" / "oracle" / "llava_side.py"
SETUP = "scripts/setup_llava_oracle.sh"

S = 42  # tower image size: 3 x 3 patches of 14 px per crop
REAL_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]  # LLaVA-1.6's, (W, H) for LLaVA
PINPOINTS = [[a * S // 336, b * S // 336] for a, b in REAL_PINPOINTS]
TIE_SIZES = [(320, 240), (240, 320), (240, 166), (176, 144), (256, 256)]  # W x H
# the tie sizes scaled like the pinpoints, then two GQA-like sizes (500 x 375 scaled) where both readings agree
SIZES = [(round(w * S / 336), round(h * S / 336)) for w, h in TIE_SIZES] + [(62, 47), (47, 62)]
WINDOW = 3
TOL_PIXELS, TOL_EMBEDS, TOL_PROBS = 1e-6, 1e-5, 1e-4
CLIP = {"image_size": S, "patch": 14, "hidden": 32, "layers": 3, "heads": 4, "seed": 11,
        # not OpenAI's values: proves the processor settings come from the CLIP's preprocessor_config.json
        "image_mean": [0.44, 0.47, 0.41], "image_std": [0.28, 0.25, 0.29]}
_NEXT = {"image_aspect_ratio": "anyres", "mm_patch_merge_type": "spatial_unpad", "image_grid_pinpoints": PINPOINTS}
_SMALL = {"hidden": 32, "layers": 3, "heads": 4, "kv_heads": 4, "rope_theta": 10000.0}
VARIANTS = {
    "v15-pad": {"image_aspect_ratio": "pad", "mm_patch_merge_type": "flat", **_SMALL, "seed": 1},
    "next": {**_NEXT, **_SMALL, "seed": 2},
    "next-tuned": {**_NEXT, **_SMALL, "seed": 3, "tuned_tower": True},
    "next-gqa": {**_NEXT, "hidden": 64, "layers": 4, "heads": 4, "kv_heads": 2, "rope_theta": 500000.0, "seed": 4},
    # LLaVA's loader picks LlavaMistralForCausalLM (and a fast tokenizer) because the name holds "mistral". The rows
    # are 156-189 tokens, 49-63 of them after the image: a 96-token window hides the prompt's start from the last
    # position but not the image
    "next-mistral": {**_NEXT, **_SMALL, "decoder": "mistral", "kv_heads": 2, "rope_theta": 1e6, "sliding_window": 96,
                     "seed": 5},
}
NEXT_VARIANTS = [v for v, spec in VARIANTS.items() if spec["image_aspect_ratio"] == "anyres"]


def llava_python() -> str:
    python = os.environ.get("JAXFLOW_LLAVA_PYTHON") or str(REPO / ".venv-llava" / "bin" / "python")
    if not os.path.isfile(python):
        pytest.fail(f"the LLaVA oracle's python {python} does not exist: run `bash {SETUP}` first "
                    "(or point JAXFLOW_LLAVA_PYTHON at a python with llava-torch 1.2.2.post1)", pytrace=False)
    return python


# ---- the data: packaged task rows on small synthetic images -----------------------------------------------------


def _scaled_box(columns: dict, prefix: str, sx: float, sy: float, w: int, h: int) -> None:
    if columns.get(f"{prefix} x", "").strip() in ("", "-"):
        return
    x, y, bw, bh = (float(columns[f"{prefix} {k}"]) for k in "xywh")
    x, y = min(round(x * sx), w - 1), min(round(y * sy), h - 1)
    bw, bh = max(1, min(round(bw * sx), w - x)), max(1, min(round(bh * sy), h - y))
    columns.update({f"{prefix} x": str(x), f"{prefix} y": str(y), f"{prefix} w": str(bw), f"{prefix} h": str(bh)})


def write_tasks(root: Path) -> tuple[dict[str, Path], Path]:
    """Two packaged rows per task kind (LogicalObj: one with a second object, one without), each on its own
    seeded noise image of the next size in SIZES, boxes rescaled with it. Returns the task CSVs and images dir."""
    from jaxflow.inputs import gqa

    images = root / "images"
    images.mkdir(parents=True)
    rng = np.random.default_rng(0)
    csvs, n = {}, 0
    for task in gqa.TASKS:
        path = gqa.task_file(task)
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header, rows = reader.fieldnames, list(reader)
        if task == "LogicalObj":
            picked = [next(r for r in rows if r["object2 x"] == "-"), next(r for r in rows if r["object2 x"] != "-")]
        else:
            picked = rows[:2]
        out = []
        for row in picked:
            w, h = SIZES[n % len(SIZES)]
            sx, sy = w / float(row["image_w"]), h / float(row["image_h"])
            row = dict(row, img_id=f"oracle{n:02d}", image_w=str(w), image_h=str(h))
            for prefix in ("central object", "object1", "object2"):
                _scaled_box(row, prefix, sx, sy, w, h)
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(images / f"oracle{n:02d}.jpg",
                                                                                  quality=95)
            out.append(row)
            n += 1
        csvs[task] = root / f"{task}.csv"
        with open(csvs[task], "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=header)
            writer.writeheader()
            writer.writerows(out)
    return csvs, images


# ---- both sides, once per module ------------------------------------------------------------------------------


class Oracle:
    """LLaVA's results and the converted jaxflow models (loaded on first use)."""

    def __init__(self, root: Path, csvs: dict, images: Path, samples: list, results: dict):
        self.root, self.csvs, self.images, self.samples, self.results = root, csvs, images, samples, results
        self._memo: dict[tuple, object] = {}

    def _once(self, key: tuple, compute):
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    def model(self, variant: str):
        """The checkpoint through `jaxflow convert SRC OUT --clip CLIP`, loaded."""
        import jaxflow
        from jaxflow.convert import convert

        res = self.results[variant]
        return self._once(("model", variant), lambda: jaxflow.load(convert(
            res["checkpoint"], str(self.root / f"jaxflow-{variant}"), clip=res["clip"], progress=False)))

    def llava_rows(self, variant: str) -> list[tuple[object, dict, dict]]:
        """(GQASample, LLaVA's row result, LLaVA's arrays) per row."""
        res = self.results[variant]
        return [(s, r, {k: res["arrays"][f"{i}.{k}"] for k in ("pixels", "embeds", "provenance")})
                for i, (s, r) in enumerate(zip(self.samples, res["rows"], strict=True))]

    def jaxflow_row(self, variant: str, index: int):
        """jaxflow's SampleInputs of row `index` (the model directory's processor settings)."""
        from jaxflow.inputs import images, regions

        def compute():
            model, s = self.model(variant), self.samples[index]
            settings = images.ProcessorSettings.from_dir(model.path)
            with Image.open(s.image_path) as im:
                image = im.convert("RGB")
            return regions.build_sample(model.config, model.tokenizer, image, s.question, mode=model.prompt_mode,
                                        template="vicuna_v1", boxes=s.boxes,
                                        option_spans=(s.true_option_span, s.false_option_span), settings=settings)

        return self._once(("row", variant, index), compute)

    def jaxflow_batch(self, variant: str):
        """All rows' jaxflow inputs as one right-padded batch: (ModelInputs, lengths [B])."""
        return self._once(("batch", variant), lambda: self._batch(variant))

    def _batch(self, variant: str):
        model = self.model(variant)
        rows = [self.jaxflow_row(variant, i) for i in range(len(self.samples))]
        t = max(len(x) for x in rows)
        ids = np.full((len(rows), t), model.tokenizer.pad_token_id or 0, np.int64)
        mask = np.zeros((len(rows), t), np.int64)
        for i, x in enumerate(rows):
            ids[i, : len(x)], mask[i, : len(x)] = x.input_ids, 1
        pixels = [x.pixel_values[0] for x in rows]
        sizes = None
        if model.config.image.anyres:  # crops padded to the most any row has; each row uses its own count
            crops = max(len(p) for p in pixels)
            pixels = [np.concatenate([p, np.zeros((crops - len(p),) + p.shape[1:], p.dtype)]) for p in pixels]
            sizes = np.asarray([x.image_size for x in rows])
        return model.prepare(ids, np.stack(pixels), sizes, mask), mask.sum(1)

    def sweep_rows(self, variant: str) -> dict[str, list[dict]]:
        """`jaxflow sweep` (the study's six flows, window WINDOW, every sample kept) on every task: result rows
        per question_id."""
        return self._once(("sweep", variant), lambda: self._sweep(variant))

    def _sweep(self, variant: str) -> dict[str, list[dict]]:
        from jaxflow.sweep import run

        model = self.model(variant)
        flows = [run.parse_flow(f) for f in run.STUDY_FLOWS]
        rows: dict[str, list[dict]] = {}
        for task, path in self.csvs.items():
            out = self.root / f"sweep-{variant}" / task
            run.sweep(model, str(path), str(out), flows=flows, window_size=WINDOW, images=str(self.images),
                      template="vicuna_v1", filter_correct=False, progress=False)  # the oracle side's template
            with open(out / "results.csv", newline="") as f:
                for r in csv.DictReader(f):
                    rows.setdefault(r["question_id"], []).append(r)
        return rows


@pytest.fixture(scope="module")
def oracle(tmp_path_factory) -> Oracle:
    from jaxflow.inputs import gqa
    from jaxflow.sweep import run

    python = llava_python()
    root = tmp_path_factory.mktemp("llava-oracle")
    csvs, images = write_tasks(root)
    samples = []
    for path in csvs.values():
        loaded, errors = gqa.load_tasks(path, images)
        assert not errors, f"{path}: {errors}"
        samples += loaded
    job = {
        "out": str(root / "llava"), "vocab_size": 400, "clip": CLIP, "window": WINDOW, "max_new_tokens": 128,
        "flows": list(run.STUDY_FLOWS),
        "variants": [{"name": name, **spec} for name, spec in VARIANTS.items()],
        "rows": [{"id": s.question_id, "question": s.question, "answer": s.answer, "image": s.image_path,
                  "boxes": [list(b) for b in s.boxes]} for s in samples],
    }
    job_path = root / "job.json"
    job_path.write_text(json.dumps(job, indent=1))
    proc = subprocess.run([python, "-W", "ignore", str(LLAVA_SIDE), str(job_path)], capture_output=True, text=True,
                          timeout=1200, env={**os.environ, "PYTHONPATH": ""})
    if proc.returncode:
        pytest.fail(f"{LLAVA_SIDE.name} failed (exit {proc.returncode}):\n{proc.stderr[-6000:]}", pytrace=False)
    results = {}
    for name in VARIANTS:
        base = root / "llava" / f"llava-{name}"
        results[name] = json.loads(Path(f"{base}.result.json").read_text())
        results[name]["arrays"] = dict(np.load(f"{base}.result.npz"))
    return Oracle(root, csvs, images, samples, results)


def _where(s, r) -> str:
    return f"{s.task} question {s.question_id} ({r['image_size_wh'][0]}x{r['image_size_wh'][1]})"


def _collapse(ids, image_id) -> list[int]:
    """The ids with each run of image tokens as one placeholder (tokenizer_image_token's form)."""
    out = []
    for t in np.asarray(ids).tolist():
        if not (t == image_id and out and out[-1] == image_id):
            out.append(t)
    return out


# ---- the LLaVA side itself -------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_llava_side_is_llava(oracle, variant):
    """The checkpoints are what the tier claims: LLaVA's slow SentencePiece tokenizer, float32 weights, a tower
    stored inside exactly for the tuned variant (and run by LLaVA instead of the separate CLIP), the cut really
    cuts (zero attention on the cut edges, attention there without it) and changes the answer's probability."""
    facts = oracle.results[variant]["facts"]
    mistral = VARIANTS[variant].get("decoder") == "mistral"
    assert facts["model_class"] == ("LlavaMistralForCausalLM" if mistral else "LlavaLlamaForCausalLM")
    assert facts["tokenizer_class"] == ("LlamaTokenizerFast" if mistral else "LlamaTokenizer")
    if mistral:  # the window is shorter than every sequence: it changes what LLaVA computes
        assert facts["saved_config"]["model_type"] == "llava_mistral"
        window = facts["saved_config"]["sliding_window"]
        assert all(r["num_features"] + len(r["input_ids"]) - 1 > window for r in oracle.results[variant]["rows"])
    assert facts["dtypes"] == ["torch.float32"]
    assert facts["vocab_size"] == facts["saved_config"]["vocab_size"]
    tuned = VARIANTS[variant].get("tuned_tower", False)
    assert (facts["tower_keys"] > 0) == tuned
    if tuned:  # LLaVA runs the tower stored inside, which differs from the separate CLIP
        assert facts["saved_config"]["unfreeze_mm_vision_tower"] is True
        assert facts["running_tower_vs_stored"] == 0.0
        assert facts["running_tower_vs_clip"] > 0.1
    else:
        assert facts["running_tower_vs_clip"] == 0.0
    assert facts["cut_check"]["cut_max"] == 0.0
    assert facts["cut_check"]["uncut_mass"] > 1e-6
    rows = oracle.results[variant]["rows"]
    for r in rows:
        assert abs(r["p_base"] - r["p_base_generate"]) < 1e-6, "the forward without cuts differs from generate"
    changes = np.abs(np.array([r["p_block"] for r in rows]) - np.array([r["p_base"] for r in rows])[:, None, None])
    assert (changes > 1e-2).mean() > 0.2, "knockouts barely change the answer probability: the test would be vacuous"


@pytest.mark.parametrize("variant", NEXT_VARIANTS)
def test_sizes_include_pinpoint_ties(oracle, variant):
    """The data covers both cases: sizes where LLaVA's (W, H) reading of the pinpoints picks another grid than a
    (H, W) reading, and sizes where both agree."""
    from jaxflow.geometry import select_best_resolution

    differ = []
    for _, r, _ in oracle.llava_rows(variant):
        w, h = r["image_size_wh"]
        ph, pw = select_best_resolution((h, w), PINPOINTS)  # the list read as (H, W)
        differ.append([pw, ph] != r["best_resolution_wh"])
    assert any(differ) and not all(differ), differ


# ---- inputs ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_pixel_values(oracle, variant):
    """jaxflow.inputs.images.preprocess (with the converted model's processor settings) == process_images."""
    from jaxflow.inputs import images

    model = oracle.model(variant)
    settings = images.ProcessorSettings.from_dir(model.path)
    for s, r, arr in oracle.llava_rows(variant):
        with Image.open(s.image_path) as im:
            image = im.convert("RGB")
        assert hashlib.sha256(np.asarray(image).tobytes()).hexdigest() == r["image_sha256"], \
            f"{_where(s, r)}: the two environments decode the image differently (Pillow versions?)"
        pixels, size = images.preprocess(image, model.config, settings)
        assert size == (r["image_size_wh"][1], r["image_size_wh"][0])
        assert pixels.shape == arr["pixels"].shape, f"{_where(s, r)}: crops {pixels.shape} vs LLaVA's"
        np.testing.assert_allclose(pixels, arr["pixels"], rtol=0, atol=TOL_PIXELS, err_msg=_where(s, r))


@pytest.mark.parametrize("variant", VARIANTS)
def test_prompt_ids(oracle, variant):
    """jaxflow's original-mode prompt == conv_templates['vicuna_v1'] + tokenizer_image_token, id for id."""
    model = oracle.model(variant)
    assert model.prompt_mode == "original"
    for i, (s, r, _) in enumerate(oracle.llava_rows(variant)):
        sample = oracle.jaxflow_row(variant, i)
        assert sample.prompt.text == r["prompt"], _where(s, r)
        assert _collapse(sample.input_ids, model.config.image_token_id) == r["input_ids"], _where(s, r)


@pytest.mark.parametrize("variant", VARIANTS)
def test_image_feature_order(oracle, variant):
    """Number and order of the image features: for each image position, the crop and patch (or image_newline)
    jaxflow places there == where prepare_inputs_labels_for_multimodal puts it."""
    from jaxflow.geometry import image_layout

    model = oracle.model(variant)
    cfg, g = model.config, model.config.vision.grid
    for i, (s, r, arr) in enumerate(oracle.llava_rows(variant)):
        lay = image_layout(cfg, oracle.jaxflow_row(variant, i).image_size)
        patch = np.where(lay.crop > 0, (lay.row % g) * g + lay.col % g, lay.row * g + lay.col)
        ours = np.stack([lay.crop, np.where(lay.is_newline, -1, patch)], axis=1)
        prov = arr["provenance"]
        theirs = prov[prov[:, 0] > -2]
        assert len(ours) == len(theirs) == r["num_features"], \
            f"{_where(s, r)}: {len(ours)} image features, LLaVA has {r['num_features']}"
        np.testing.assert_array_equal(ours, theirs, err_msg=_where(s, r))


@pytest.mark.parametrize("variant", VARIANTS)
def test_input_embeddings(oracle, variant):
    """VisionLanguageModel.embed on jaxflow's own inputs == prepare_inputs_labels_for_multimodal's inputs_embeds."""
    model = oracle.model(variant)
    inputs, lengths = oracle.jaxflow_batch(variant)
    embeds = np.asarray(model.module.embed(inputs.input_ids, inputs.crops, inputs.feature_index))  # [B, T, D]
    for i, (s, r, arr) in enumerate(oracle.llava_rows(variant)):
        ours = embeds[i, : lengths[i]]
        assert ours.shape == arr["embeds"].shape, f"{_where(s, r)}: {ours.shape} vs LLaVA's {arr['embeds'].shape}"
        np.testing.assert_allclose(ours, arr["embeds"], rtol=TOL_EMBEDS, atol=TOL_EMBEDS, err_msg=_where(s, r))


@pytest.mark.parametrize("variant", VARIANTS)
def test_text_regions(oracle, variant):
    """Image, question and last positions == the study's (question located in LLaVA's token strings)."""
    for i, (s, r, _) in enumerate(oracle.llava_rows(variant)):
        ours = oracle.jaxflow_row(variant, i).regions
        for name in ("image", "question", "last"):
            assert ours[name].tolist() == r["regions"][name], f"{_where(s, r)}: {name}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_related_image_patches(oracle, variant):
    """Related and other image patches (jaxflow's default rule) == the study's red-mask rule through LLaVA's
    process_images, in LLaVA's feature order."""
    related = []
    for i, (s, r, _) in enumerate(oracle.llava_rows(variant)):
        ours = oracle.jaxflow_row(variant, i).regions
        for name in ("related_image_patches", "other_image_patches"):
            assert ours[name].tolist() == r["regions"][name], f"{_where(s, r)}: {name}"
        related.append(len(r["regions"]["related_image_patches"]))
    assert sum(n > 0 for n in related) >= len(related) // 2, f"too few rows with related patches: {related}"


# ---- the model and the sweep -----------------------------------------------------------------------------------


@pytest.mark.parametrize("variant", VARIANTS)
def test_greedy_decoding(oracle, variant):
    """jaxflow's greedy generate (128 new tokens at most, stopping at EOS) == LLaVA's generate, token for token."""
    model = oracle.model(variant)
    eos = model.tokenizer.eos_token_id
    inputs, _ = oracle.jaxflow_batch(variant)
    generated = model.generate(inputs, max_new_tokens=128).tokens
    for i, (s, r, _) in enumerate(oracle.llava_rows(variant)):
        tokens = generated[i].tolist()
        if eos in tokens:
            tokens = tokens[: tokens.index(eos) + 1]
        assert tokens == r["generated"], _where(s, r)


@pytest.mark.parametrize("variant", VARIANTS)
def test_sweep_probabilities(oracle, variant):
    """`jaxflow sweep`: the first answer token, its base probability and its probability with each of the six
    flows cut in the window around each layer == LLaVA's (additive mask in the window's layers)."""
    from jaxflow.sweep import run

    flows = list(run.STUDY_FLOWS)
    swept = oracle.sweep_rows(variant)
    num_layers = VARIANTS[variant]["layers"]
    for s, r, _ in oracle.llava_rows(variant):
        rows = swept.get(s.question_id)
        assert rows, f"{_where(s, r)}: no sweep rows"
        assert len(rows) == len(flows) * num_layers
        for row in rows:
            where = f"{_where(s, r)} {row['block_desc']} layer {row['layer']}"
            assert int(row["answer_token"]) == r["first_token"], where
            assert abs(float(row["base_score_first"]) - r["p_base"]) <= TOL_PROBS, where
            expected = r["p_block"][flows.index(row["block_desc"])][int(row["layer"])]
            assert abs(float(row["new_score_first"]) - expected) <= TOL_PROBS, \
                f"{where}: {float(row['new_score_first'])} vs LLaVA {expected}"


@pytest.mark.parametrize("variant", VARIANTS)
def test_sweep_answers(oracle, variant):
    """The answer `jaxflow sweep` decodes (what its correct-answer filter compares) == LLaVA's decoded answer."""
    swept = oracle.sweep_rows(variant)
    for s, r, _ in oracle.llava_rows(variant):
        predicted = {row["predicted_answer"] for row in swept[s.question_id]}
        assert predicted == {r["answer"]}, _where(s, r)


def test_original_text_is_what_llava_conversation_renders():
    """Original mode: LLaVA's own `conv_templates[...]`.get_prompt() (llava-torch 1.2.2.post1, run in the oracle's
    environment) for the study's user turn, and LLaVA-NeXT's CHATML style (qwen_1_5, not in llava-torch) restated."""
    from jaxflow.inputs.prompts import INSTRUCTION, build_prompt

    q = "Is the jar full or empty?"
    user = "<image>\n" + q + " \n" + INSTRUCTION
    script = (
        "import importlib.util, json, os, sys\n"
        "spec = importlib.util.find_spec('llava')\n"  # llava/__init__ imports torch; conversation.py needs nothing
        "path = os.path.join(spec.submodule_search_locations[0], 'conversation.py')\n"
        "module_spec = importlib.util.spec_from_file_location('llava_conversation', path)\n"
        "conv = importlib.util.module_from_spec(module_spec); module_spec.loader.exec_module(conv)\n"
        "out = {}\n"
        "for name in ('vicuna_v1', 'mistral_instruct', 'chatml_direct', 'plain'):\n"
        "    c = conv.conv_templates[name].copy()\n"
        "    c.append_message(c.roles[0], sys.argv[1]); c.append_message(c.roles[1], None)\n"
        "    out[name] = c.get_prompt()\n"
        "print(json.dumps(out))\n")
    run = subprocess.run([llava_python(), "-c", script, user], capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    for name, text in json.loads(run.stdout).items():
        assert build_prompt(q, name, mode="original").text == text, name
    system, sep = "<|im_start|>system\nYou are a helpful assistant.", "<|im_end|>"
    roles = ("<|im_start|>user", "<|im_start|>assistant")
    chatml = system + sep + "\n" + roles[0] + "\n" + user + sep + "\n" + roles[1] + "\n"  # CHATML get_prompt
    assert build_prompt(q, "qwen_1_5", mode="original").text == chatml

