"""Sweep scaling over 1/2/4/8 devices: the sweep benchmark's model and inputs, jaxflow full and
incremental, with the knockout configurations split over a `data` mesh axis (and a mixed
data x model mesh). On a CPU host the devices are XLA host devices sharing the same cores, so
the table measures correctness and overhead, not speed-up; on a GPU/TPU host it is real scaling.

    python scripts/bench_scaling.py --host-devices 8 --out bench_scaling.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--host-devices", type=int, help="split the CPU into this many XLA devices (CPU only)")
    parser.add_argument("--meshes", nargs="+", default=["data=1", "data=2", "data=4", "data=8", "data=4,model=2"])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--window", type=int, default=9)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    if args.host_devices:  # a launcher setting, before JAX starts
        os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.host_devices}"
    import jax
    import numpy as np

    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import bench_sweep

    import jaxflow
    from jaxflow.sharding import make_mesh

    rows, reference = [], None
    with tempfile.TemporaryDirectory() as root:
        _, base_model = bench_sweep.build(bench_sweep.PRESETS["cpu"], root)
        samples = bench_sweep.make_samples(base_model, args.samples)
        for spec in args.meshes:
            sizes = dict(part.split("=") for part in spec.split(","))
            n = int(sizes.get("data", 1)) * int(sizes.get("model", 1))
            if n > len(jax.local_devices()):
                continue
            mesh = make_mesh(spec, jax.local_devices()[:n])
            model = jaxflow.load(base_model.path, mesh=mesh)
            row = {"mesh": spec, "devices": n}
            for method in ("full", "incremental"):
                p, seconds = bench_sweep.run_jax(model, samples, args.window, method, args.batch, chunk=48)
                reference = p if reference is None else reference
                row[f"{method}_samples_per_s"] = args.samples / seconds
                row[f"{method}_max_abs_diff"] = float(np.abs(p - reference).max())
            rows.append(row)
    print(f"{'mesh':<18}{'devices':>8}{'full s/s':>12}{'incr. s/s':>12}{'max |dp|':>12}")
    for r in rows:
        diff = max(r["full_max_abs_diff"], r["incremental_max_abs_diff"])
        print(f"{r['mesh']:<18}{r['devices']:>8}{r['full_samples_per_s']:>12.3f}{r['incremental_samples_per_s']:>12.3f}"
              f"{diff:>12.1e}")
    result = {"device": str(jax.local_devices()[0]), "host_devices": args.host_devices, "rows": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
