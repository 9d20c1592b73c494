#!/usr/bin/env bash
# One command for a machine with one CUDA GPU (<= 8 minutes): training step (fp32 / bf16 / bf16+channels-last
# (+compile)) images/s, peak memory, TFLOP/s and MFU, against the official fp32 step; ms+flip evaluation images/s;
# a one-process torchrun NCCL + SyncBatchNorm run with checkpoint and resume. Writes one JSON file
# (default bench/results/gpu.json; see bench/gpu.py --help). Without CUDA it runs its CPU fallback at toy sizes.
#   PYTHON=.venv/bin/python bench/gpu.sh [--out FILE] [--budget SECONDS]
# The official side needs sssegmentation importable, e.g. SSSEG_SRC=/path/to/sssegmentation-1.7.0 (see README).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="$root${SSSEG_SRC:+:$SSSEG_SRC}${PYTHONPATH:+:$PYTHONPATH}"
exec "${PYTHON:-python}" "$root/bench/gpu.py" "$@"
