#!/usr/bin/env python
"""What verifying a converted model costs, per GiB of parameters.

    python scripts/bench_verify.py [--workdir DIR] [--repeat 3] [--out FILE.json]

Builds a random float32 llava-hf checkpoint (`jaxflow.testing.write_random_checkpoint`: Llama 1024 wide x 8
layers, vocab 16000; CLIP 1024 wide x 3 layers; about 550 MiB), converts it (timing the share of the
conversion spent on digests), then times, with the files in the page cache (one untimed read first; the best
of --repeat runs):
  - hash: `checkpoint.group_digest` of every group, arrays already in memory;
  - read: restoring every group as stored (orbax), no hashing;
  - verify: `checkpoint.verify` (read + hash, what `jaxflow verify` does);
  - load: `jaxflow.load`; load_verify: `jaxflow.load(..., verify=True)`.
Reading from a cold disk adds the disk's own time per GiB to read, verify and both loads.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

GiB = 2**30


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workdir", help="where the checkpoint and model go (default: a temporary directory)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", help="also write the figures as JSON")
    args = parser.parse_args()

    import orbax.checkpoint as ocp

    import jaxflow
    from jaxflow import checkpoint
    from jaxflow.convert import convert
    from jaxflow.testing import tiny_hf_config, write_random_checkpoint

    work = args.workdir or tempfile.mkdtemp(prefix="bench-verify-")
    src, model = os.path.join(work, "src"), os.path.join(work, "model")
    shutil.rmtree(model, ignore_errors=True)
    if not os.path.exists(src):
        write_random_checkpoint(src, tiny_hf_config(hidden=1024, layers=8, vocab=16000), max_shard_bytes=256 << 20)

    spent = {"group_digest": 0.0, "_file_records": 0.0}
    originals = {name: getattr(checkpoint, name) for name in spent}

    def timed(name):  # the digest work inside the conversion
        def wrapper(*a, **kw):
            start = time.perf_counter()
            try:
                return originals[name](*a, **kw)
            finally:
                spent[name] += time.perf_counter() - start
        return wrapper

    for name in spent:
        setattr(checkpoint, name, timed(name))
    start = time.perf_counter()
    convert(src, model, progress=False)
    convert_s = time.perf_counter() - start
    for name, fn in originals.items():
        setattr(checkpoint, name, fn)

    meta = checkpoint.read_metadata(model)
    directory = os.path.abspath(model)

    def read_all() -> dict:
        with ocp.StandardCheckpointer() as ckpt:
            return {g: checkpoint._flatten(ckpt.restore(os.path.join(directory, "params", g))) for g in meta["groups"]}

    groups = read_all()  # warms the page cache
    nbytes = sum(a.nbytes for g in groups.values() for a in g.values())
    figures = {
        "hash": best(lambda: [checkpoint.group_digest(g) for g in groups.values()], args.repeat),
        "read": best(read_all, args.repeat),
        "verify": best(lambda: checkpoint.verify(model), args.repeat),
        "load": best(lambda: jaxflow.load(model), args.repeat),
        "load_verify": best(lambda: jaxflow.load(model, verify=True), args.repeat),
    }
    report = {"parameters_GiB": round(nbytes / GiB, 3), "cpus": os.cpu_count(), "groups": len(groups),
              "convert_s": round(convert_s, 2), "convert_digest_s": round(spent["group_digest"], 2),
              "convert_file_digest_s": round(spent["_file_records"], 2),
              **{f"{k}_s_per_GiB": round(v * GiB / nbytes, 2) for k, v in figures.items()}}
    print(json.dumps(report, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    if not args.workdir:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
