#!/usr/bin/env bash
# Create .venv and install neuromerge with its test and benchmark extras.
# torch is pinned here (a CPU wheel that lies on this machine's disk); the package itself
# declares a range so users can bring their own CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-python3}"
if [ ! -x .venv/bin/python ]; then
    "$PYTHON" -m venv .venv
fi
export PIP_DISABLE_PIP_VERSION_CHECK=1
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test,bench]"
echo "neuromerge set up in .venv ($(.venv/bin/neuromerge --version))"
