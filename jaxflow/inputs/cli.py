"""`jaxflow regions`: print (and draw) the token regions of one image + question. Errors (a missing image, a
bad box, a region that cannot be located) reach `jaxflow.cli.main`, which prints them on one line."""

from __future__ import annotations

import json

from PIL import Image

from jaxflow.inputs.images import RELATED_PATCH_RULES
from jaxflow.inputs.prompts import TEMPLATES
from jaxflow.inputs.regions import NEXT_REGIONS


def parse_box(text: str, flag: str = "--box") -> tuple[float, float, float, float]:
    try:
        box = tuple(float(v) for v in text.split(","))
    except ValueError:
        box = ()
    if len(box) != 4:
        raise ValueError(f"{flag} {text!r}: expected x,y,w,h (four numbers)")
    return box


def regions_command(args) -> int:
    import jaxflow
    from jaxflow.inputs.regions import box_region, build_sample, render, substring_region

    rule = args.related_patches
    boxes = [parse_box(b) for b in args.box or []]
    region_boxes = [parse_box(b, "--region-box") for b in args.region_box or []]
    with Image.open(args.image) as im:
        image = im.convert("RGB")
    model = jaxflow.load(args.model)
    sample = build_sample(model.config, model.tokenizer, image, args.question, mode=model.prompt_mode,
                          template=args.template or model.default_template, boxes=boxes,
                          object_names=args.object_name or (), related_patches=rule, settings=model.processor)
    regions = dict(sample.regions)
    for sub in args.substring or []:
        regions[f"substring:{sub}"] = substring_region(sample.prompt, sample.encoded, sub)
    for i, box in enumerate(region_boxes):
        regions[f"box:{i}"] = box_region(model.config, sample.image_size, sample.encoded, [box], rule,
                                         model.processor)
    tokens = model.tokenizer.convert_ids_to_tokens([int(i) if i >= 0 else 0 for i in sample.input_ids])
    tokens = ["<image>" if i == model.config.image_token_id else t for i, t in zip(sample.input_ids, tokens,
                                                                                   strict=True)]
    if args.png:
        render(sample, model.config, boxes, args.png, model.processor)
    if args.json:
        print(json.dumps({"regions": {k: [int(i) for i in v] for k, v in regions.items()}, "related_patches": rule,
                          "undefined": sample.regions.undefined, "input_ids": [int(i) for i in sample.input_ids],
                          "tokens": tokens}))
        return 0
    print(f"{len(sample)} positions; image size (H, W) = {sample.image_size}; related patches: {rule} rule")
    if boxes and not len(sample.regions["related_image_patches"]):
        print("no related image patch: no patch keeps a pure red pixel of the boxes (too small for the study rule)"
              if rule == "study" else "no related image patch")
    image_regions = {"image", "related_image_patches", "other_image_patches", *NEXT_REGIONS}
    for name, pos in regions.items():
        shown = [int(i) for i in pos]
        text = "" if name in image_regions or name.startswith("box:") else \
            " " + repr("".join(tokens[i] for i in shown))
        compact = shown if len(shown) <= 16 else f"{shown[:6]} ... {shown[-4:]}"
        print(f"{name:<26} {len(shown):>5}  {compact}{text}")
    if args.object_name and "central_object" not in regions:
        print(f"{'central_object':<26} undefined: {sample.regions.undefined['central_object']}")
    if args.png:
        print(f"picture: {args.png}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("regions", help="show the token regions of an image + question")
    p.add_argument("--model", required=True, help="converted model directory (its tokenizer, image processing and "
                   "prompt format decide the regions)")
    p.add_argument("--image", required=True, help="image file (any format PIL reads)")
    p.add_argument("--question", required=True, help="question text, as a task file's question column holds it")
    p.add_argument("--box", action="append", help="x,y,w,h of a question-related object (repeatable)")
    p.add_argument("--object-name", action="append",
                   help="name of a question-related object, for the central_object region (repeatable)")
    p.add_argument("--related-patches", choices=RELATED_PATCH_RULES, default="study",
                   help="which patches a box relates: 'study' (a patch of the preprocessed red-box mask stays pure "
                        "red, the study's rule) or 'overlap' (the patch overlaps the transformed box); default study")
    p.add_argument("--substring", action="append", help="also locate this prompt substring (repeatable)")
    p.add_argument("--region-box", action="append", help="also locate the image patches of x,y,w,h (repeatable)")
    p.add_argument("--template", choices=TEMPLATES, help="prompt template (default: the checkpoint's, from its "
                   "chat template, vocabulary or name)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--png", help="draw the image with the related patches highlighted")
    p.set_defaults(func=regions_command)
