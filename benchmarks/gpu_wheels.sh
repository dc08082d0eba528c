#!/usr/bin/env bash
# The Python packages the lab needs that a bare CUDA image with PyTorch, transformers, accelerate, peft and
# tokenizers lacks (this workplace's GPU machines: Python 3.12, x86-64, no internet), as wheels to carry there.
#   here:   bash benchmarks/gpu_wheels.sh [DIR]            (default DIR: .whl; keep it out of git)
#   there:  python3 -m pip install -q --no-index --no-deps --target /tmp/site DIR/*.whl && export PYTHONPATH=/tmp/site:$PWD
# then:     python3 benchmarks/gpu_check.py
set -euo pipefail
dir=${1:-.whl}
py=${PYTHON:-python3}
mkdir -p "$dir"
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
for pkg in trl==1.16.0 datasets==5.2.0 hydra-core==1.3.2 omegaconf==2.3.0 dill==0.4.1 multiprocess==0.70.19; do
  "$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dir" "$pkg"
done
# antlr4-python3-runtime 4.9.3 (omegaconf's parser) is published as source only: build its pure-Python wheel
"$py" -m pip wheel -q --no-deps -w "$dir" antlr4-python3-runtime==4.9.3
ls "$dir"
