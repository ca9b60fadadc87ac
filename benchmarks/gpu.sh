#!/usr/bin/env bash
# The GPU benchmark (`make bench-gpu`, issue 11 part 3): ResNet-50 v1.5 images/s and BERT phase-1
# sequences/s in bfloat16 with their model FLOP utilisation, the optimizer update times, vmap lanes
# against K and the host's ImageNet preprocessing rate, written to <out>/gpu-<device kind>.{md,json}.
#
# On a CUDA machine (nvidia-smi answers) it first installs the JAX CUDA plugin into the virtual
# environment from the hashed lock (requirements/trainer-cuda12.lock, written by
# scripts/lock_accelerators.sh through `make lock`), then runs the full benchmark (budget 540 s).
# Elsewhere it runs a reduced version on the CPU (toy sizes, budget 170 s).
#
# Usage: benchmarks/gpu.sh [--out DIR] [--mode full|reduced|smoke] [--budget-s S] [--no-install]
#                          [--device auto|cuda|cpu]
#   --device cpu   the CPU path even where nvidia-smi answers (the test uses it)
#   --no-install   use the interpreter as it is (e.g. one whose CUDA JAX is already installed)
#   BATCHLAB_PYTHON=/path/to/python   the interpreter (default .venv/bin/python, made by `make setup`)
set -euo pipefail

out=""
mode=""
budget=""
install=1
device=auto
while [ $# -gt 0 ]; do
  case "$1" in
    --out) out="${2:?--out needs a folder}"; shift 2 ;;
    --mode) mode="${2:?--mode needs full, reduced or smoke}"; shift 2 ;;
    --budget-s) budget="${2:?--budget-s needs seconds}"; shift 2 ;;
    --no-install) install=0; shift ;;
    --device) device="${2:?--device needs auto, cuda or cpu}"; shift 2 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "gpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done

# --out is relative to where the script was called from; the default to the repository.
case "$out" in "" | /*) ;; *) out="$PWD/$out" ;; esac
cd "$(dirname "$0")/.."
out="${out:-benchmarks/results}"

py="${BATCHLAB_PYTHON:-.venv/bin/python}"
lock=requirements/trainer-cuda12.lock
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE=disabled RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

case "$device" in auto|cuda|cpu) ;; *) echo "gpu.sh: --device must be auto, cuda or cpu, got $device" >&2; exit 2 ;; esac
if [ "$device" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then device=cuda; else device=cpu; fi
fi

if [ "$device" = cuda ]; then
  echo "gpu.sh: $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)" >&2
  if [ "$install" = 1 ]; then
    if [ ! -x "$py" ] && [ -z "${BATCHLAB_PYTHON:-}" ]; then
      make setup
    fi
    echo "gpu.sh: installing the JAX CUDA plugin from $lock" >&2
    "$py" -m pip install --quiet --disable-pip-version-check --require-hashes -r "$lock" || {
      echo "gpu.sh: pip could not install $lock (no registry here?); install it by other means," \
        "or rerun with --no-install and BATCHLAB_PYTHON set to an interpreter with CUDA JAX" >&2
      exit 1
    }
  fi
  # The Makefile exports JAX_PLATFORMS=cpu: name CUDA, so a broken plugin fails instead of
  # quietly measuring the host.
  export JAX_PLATFORMS=cuda
  mode="${mode:-full}"
else
  echo "gpu.sh: the CPU path (no CUDA device, or --device cpu)" >&2
  export JAX_PLATFORMS=cpu
  mode="${mode:-reduced}"
fi

args=(--mode "$mode" --out "$out")
[ -n "$budget" ] && args+=(--budget-s "$budget")
exec "$py" -m benchmarks.gpu "${args[@]}"
