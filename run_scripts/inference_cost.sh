#!/usr/bin/env bash
# What each method costs at inference (MiniLM): base, BitFit, LoRA and IA3 merged and unmerged, adapters,
# at batch 1 and batch 32; and serving several tasks from one base, BitFit's mixed batches against LoRA's.
#   bash run_scripts/inference_cost.sh [--rounds 10] [--tasks 4] [--length 128] [--device cpu|cuda] [--output-dir outputs/inference_cost]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${here}${PYTHONPATH:+:${PYTHONPATH}}"
exec python -m fairseq_ext.experiments.inference_cost "$@"
