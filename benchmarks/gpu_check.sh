#!/usr/bin/env bash
# One command for the GPU check (see benchmarks/gpu_check.py): every CUDA test and headline benchmark, bf16,
# real-size shapes with random weights, one JSON line per check, a summary table, exit 1 on any failure.
#   bash benchmarks/gpu_check.sh                        # one H100/H200-class GPU, < 8 minutes
#   bash benchmarks/gpu_check.sh --device cpu --smoke   # tiny shapes on CPU: what CI runs
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
exec python benchmarks/gpu_check.py "$@"
