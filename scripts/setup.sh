#!/usr/bin/env bash
# Set up collapse-lab in ./.venv (idempotent; needs only Python >= 3.10).
# CPU machines get the CPU build of torch (torch==2.13.0), never a multi-GB CUDA build;
# a machine with an NVIDIA GPU gets pip's default (CUDA) build; an existing torch is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
PIP=(.venv/bin/python -m pip -q --disable-pip-version-check)
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    "${PIP[@]}" install torch
  else
    "${PIP[@]}" install torch==2.13.0
  fi
fi
"${PIP[@]}" install -e ".[test]"
