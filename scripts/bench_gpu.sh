#!/usr/bin/env bash
# The sweep benchmark on an accelerator (issue 17, item 6): a random LLaVA-1.5-7B-shaped model in bfloat16
# (Vicuna-7B decoder: hidden 4096, intermediate 11008, 32 layers, 32 heads, vocabulary 32064; CLIP ViT-L/14 at
# 336 px: 24 layers, hidden 1024, 16 heads), the study's procedure, batched PyTorch and `jaxflow sweep` on 4-8
# toy-world samples: samples/s, peak device memory, achieved FLOP/s against the device's bf16 peak.
#
#   bash scripts/bench_gpu.sh [--python PYTHON] [--timeout SECONDS] [--allow-cpu] [bench_sweep.py flags...]
#   bash scripts/bench_gpu.sh --out bench_gpu.json
#   bash scripts/bench_gpu.sh --allow-cpu --preset tiny --dtype bfloat16    # the wrapper's logic, on a CPU
#   bash scripts/bench_gpu.sh --plain [bench_plain.py flags...]   # the plain paths instead (issue 26): decoding per
#                                            token and the prompt forward vs transformers, --preset gpu-7b
#
# Runs from this checkout with an installed environment (jax with its CUDA plugin, torch with CUDA,
# transformers): it downloads nothing. The random checkpoint (~14 GB in bfloat16) and its conversion go to a
# temporary folder (or --workdir) and are removed afterwards. Every flag after the script's own goes to
# scripts/bench_sweep.py (e.g. --small 2 --large 4, --study-samples 2).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
LIMIT=600
ALLOW_CPU=0
SCRIPT=(scripts/bench_sweep.py --preset gpu)
ARGS=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    --python) PYTHON="$2"; shift 2 ;;
    --timeout) LIMIT="$2"; shift 2 ;;
    --allow-cpu) ALLOW_CPU=1; shift ;;
    --plain) SCRIPT=(scripts/bench_plain.py --preset gpu-7b); shift ;;
    *) ARGS+=("$1"); shift ;;
  esac
done

# torch and jax share one device: jax must not take 75% of its memory at start-up.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"

if ! ALLOW_CPU="$ALLOW_CPU" "$PYTHON" - <<'EOF'
import os
import sys

import jax
import torch

problems = []
if not torch.cuda.is_available():
    problems.append(f"torch {torch.__version__} sees no CUDA device")
if jax.default_backend() == "cpu":
    problems.append(f"jax {jax.__version__} has no accelerator backend (install jax[cuda12])")
if problems and os.environ["ALLOW_CPU"] != "1":
    sys.exit("bench_gpu.sh: " + "; ".join(problems))
gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "no CUDA"
print(f"torch: {gpu}; jax: {jax.devices()}", flush=True)
EOF
then
  exit 1
fi

cd "$ROOT"
exec timeout "$LIMIT" "$PYTHON" "${SCRIPT[@]}" ${ARGS[@]+"${ARGS[@]}"}
