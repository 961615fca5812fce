#!/usr/bin/env bash
# The LLaVA oracle's own virtual environment: the original LLaVA code (llava-torch 1.2.2.post1, installed
# --no-deps) with the library versions it runs on, on CPU. tests/test_llava_oracle.py runs
# tests/oracle/llava_side.py with this environment's python.
#
#   bash scripts/setup_llava_oracle.sh [VENV_DIR]     # default: .venv-llava at the repository root
#
# Idempotent: a marker file records the pinned versions; when it matches and llava imports, nothing is done.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${1:-$ROOT/.venv-llava}"
PYTHON="${PYTHON:-python3}"  # jaxflow's python: the venv is made from it and takes its Pillow version

# Both sides decode the test images and resize them with Pillow: the same version on both.
if ! PILLOW="$("$PYTHON" -c 'import PIL; print(PIL.__version__)' 2>/dev/null)"; then
  echo "setup_llava_oracle.sh: $PYTHON has no Pillow; install jaxflow first (pip install -e '.[test]')" >&2
  exit 1
fi
# torch 2.13.0 only (never another torch, never torchvision); llava's code does not run on transformers 5.
PINS=(
  "torch==2.13.0"
  "transformers==4.36.2"
  "tokenizers==0.15.0"
  "accelerate==0.21.0"
  "huggingface-hub==0.36.2"
  "sentencepiece==0.2.0"
  "protobuf==4.25.3"
  "einops==0.6.1"
  "numpy==1.26.4"
  "safetensors==0.4.5"
  "pillow==$PILLOW"
)
LLAVA="llava-torch==1.2.2.post1"
MARKER="$VENV/.jaxflow-llava-oracle"
WANT="$(printf '%s\n' "${PINS[@]}" "$LLAVA")"

check() {
  "$VENV/bin/python" -c "import llava; from llava.mm_utils import process_images, tokenizer_image_token; \
from llava.model.builder import load_pretrained_model; from llava.conversation import conv_templates" 2>/dev/null
}

if [[ -f "$MARKER" && "$(cat "$MARKER")" == "$WANT" ]] && check; then
  echo "LLaVA oracle environment ready: $VENV"
  exit 0
fi

echo "Creating the LLaVA oracle environment in $VENV"
rm -rf "$VENV"
"$PYTHON" -m venv "$VENV"
"$VENV/bin/python" -m pip install -q --upgrade pip
"$VENV/bin/python" -m pip install -q "${PINS[@]}"
"$VENV/bin/python" -m pip install -q --no-deps "$LLAVA"
if ! check; then
  echo "setup_llava_oracle.sh: llava does not import in $VENV:" >&2
  "$VENV/bin/python" -c "import llava; from llava.mm_utils import process_images" >&2 || true
  exit 1
fi
printf '%s\n' "$WANT" > "$MARKER"
echo "LLaVA oracle environment ready: $VENV"
