#!/usr/bin/env bash
# Create .venv with everything pinned (CPU torch from the local wheel cache / PyPI) and install
# the project in editable mode with its test extras. Safe to rerun.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: anything that pulls an unpinned torch would fetch a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
# Hugging Face's `kernels` distribution (pulled by transformers >= 5.25, kept by a venv made before the pin) is
# imported by transformers as `kernels` -- the name of our top-level package -- and breaks diffusers' imports.
if .venv/bin/python -m pip show -q kernels >/dev/null 2>&1; then
  .venv/bin/python -m pip uninstall -q -y kernels
fi
.venv/bin/python -c "import torch, longlive; from diffusers import AutoencoderKLWan; print('longlive ready, torch', torch.__version__)"
