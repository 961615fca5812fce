"""The `jaxflow` command."""

from __future__ import annotations

import argparse
import sys


def _convert(args) -> int:
    from convert import ConversionError, convert

    try:
        out = convert(args.src, args.out, clip=args.clip, dtype=args.dtype)
    except ConversionError as e:
        print(f"jaxflow convert: error: {e}", file=sys.stderr)
        return 2
    print(f"converted {args.src} -> {out}")
    return 0


def _demo(args) -> int:
    from jaxflow import demo

    demo.run(args.out)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="jaxflow", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("convert", help="convert a LLaVA safetensors checkpoint into a jaxflow model directory")
    p.add_argument("src", help="checkpoint directory (config.json + *.safetensors) or one .safetensors file")
    p.add_argument("out", help="output directory (must not exist; written atomically)")
    p.add_argument("--clip", help="CLIP checkpoint directory, for the original LLaVA layout")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    p.set_defaults(func=_convert)
    p = sub.add_parser("demo", help="smoke run: random tiny LLaVA -> convert -> knockouts -> generate")
    p.add_argument("--out", default="jaxflow-demo", help="output directory (default: ./jaxflow-demo)")
    p.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
