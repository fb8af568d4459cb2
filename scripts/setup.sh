#!/usr/bin/env bash
# Create .venv for a CPU machine: CPU torch 2.13.0 (local wheel cache / CI's CPU index), the project in
# editable mode with the pipeline, test and hf extras, and the Triton whose interpreter runs the kernel tests.
# Safe to rerun. (GPU machines: install your torch, then `pip install -e ".[pipeline,test]"`; CUDA torch
# brings its own triton.)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: the project asks only for torch>=2.11, and pip would satisfy that from PyPI's Linux
# wheel, a multi-GB CUDA build. With 2.13.0 installed, the install below keeps it.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[pipeline,test,hf,cpu-triton]" "torch==2.13.0"
.venv/bin/python -c "import torch, triton, longlive, longlive_kernels; from diffusers import AutoencoderKLWan; print('longlive ready, torch', torch.__version__, 'triton', triton.__version__)"
