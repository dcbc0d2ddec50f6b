#!/usr/bin/env bash
# Create .venv (once) and install nanoschnack with its test extras into it.
# torch is installed first and pinned: an unpinned torch would pull the CUDA
# build (gigabytes); on a machine with a local CPU wheel, pip takes that one.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
echo "setup.sh: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
