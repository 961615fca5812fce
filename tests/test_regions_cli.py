"""`jaxflow regions`: JSON output and the picture."""

import json

import numpy as np
from PIL import Image

from jaxflow import cli


def test_regions_json_and_png(toy_model_dir, tmp_path, capsys):
    image = tmp_path / "img.jpg"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (375, 500, 3), dtype=np.uint8)).save(image)
    args = ["regions", "--model", toy_model_dir, "--image", str(image), "--question", "Is the jar full or empty?",
            "--box", "253,291,60,105", "--substring", "jar", "--region-box", "0,0,250,375"]
    assert cli.main(args + ["--json", "--png", str(tmp_path / "r.png")]) == 0
    out = json.loads(capsys.readouterr().out)
    regions, tokens = out["regions"], out["tokens"]
    assert {"image", "question", "last", "related_image_patches", "other_image_patches"} <= set(regions)
    assert len(out["input_ids"]) == len(tokens) and regions["last"] == [len(tokens) - 1]
    assert "".join(tokens[i] for i in regions["question"]).replace("▁", " ").strip() == "Is the jar full or empty?"
    assert "jar" in "".join(tokens[i] for i in regions["substring:jar"])
    related, other = set(regions["related_image_patches"]), set(regions["other_image_patches"])
    assert related and not related & other and related | other <= set(regions["image"])
    assert set(regions["box:0"]) < set(regions["image"]) and regions["box:0"]  # the left half of the image
    assert (tmp_path / "r.png").stat().st_size > 5000
    assert out["related_patches"] == "study"
    assert cli.main(args[:-6]) == 0  # the human-readable table
    table = capsys.readouterr().out
    assert "question" in table and "related patches: study rule" in table
    assert cli.main(args[:7] + ["--box", "10,10,1,1", "--related-patches", "overlap", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["related_patches"] == "overlap" and out["regions"]["related_image_patches"]
    assert cli.main(args[:7] + ["--box", "10,10,1,1"]) == 0  # too small to stay pure red in 56 px crops
    assert "no related image patch" in capsys.readouterr().out
    assert cli.main(["regions", "--model", toy_model_dir, "--image", str(tmp_path / "missing.jpg"),
                     "--question", "Is it?"]) == 2
    assert "missing.jpg" in capsys.readouterr().err
