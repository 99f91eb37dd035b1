#!/usr/bin/env bash
# BitFit on this machine's GPUs: fp16/bf16/memory-efficient/amp keep frozen weights
# bit-identical, and BitFit trains as one job over NCCL on every GPU. One PASS/FAIL
# line per check; exit status 1 if any fails. About a minute on one GPU.
#   bash run_scripts/gpu_check.sh [--device cpu] [--model roberta_large] [--steps 5]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${here}${PYTHONPATH:+:${PYTHONPATH}}"
exec python -m fairseq_ext.experiments.gpu_check "$@"
