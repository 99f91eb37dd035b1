#!/usr/bin/env bash
# BitFit deltas measured: size against the full checkpoint (MiniLM on CoLA and STS-B,
# RoBERTa-base sizes), task switch time and prediction throughput of the predictor.
#   GLUE_DIR=glue_data bash run_scripts/measure_deltas.sh [--out-dir outputs/deltas] [--skip-roberta-base]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${here}${PYTHONPATH:+:${PYTHONPATH}}"
exec python -m fairseq_ext.experiments.measure_deltas "$@"
