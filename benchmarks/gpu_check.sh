#!/usr/bin/env bash
# Every check only a GPU can do, as one table (issue 19): see benchmarks/gpu_check.py and
# docs/benchmarks.md ("GPU check"). Under 8 minutes on one GPU; with --device cpu (or on a
# machine without CUDA) the CPU rows run for real and the GPU-only rows say "skip: needs CUDA".
#
#     bash benchmarks/gpu_check.sh                 # auto: CUDA when there is one
#     bash benchmarks/gpu_check.sh --device cpu    # the CI run
#
# Exit status: 0 when no row that ran failed, 1 otherwise (2: bad options).
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
exec "${PYTHON:-python}" "$here/gpu_check.py" "$@"
