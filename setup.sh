#!/usr/bin/env bash
# Create .venv (once) and install nanoschnack with its test extras into it.
# torch is installed first, pinned to the tested version; an installed torch 2.13.0 (e.g. the CPU wheel from
# https://download.pytorch.org/whl/cpu, for a machine without a GPU: PyPI's Linux torch is the CUDA build,
# gigabytes) is kept.
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
echo "setup.sh: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
