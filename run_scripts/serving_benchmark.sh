#!/usr/bin/env bash
# Many BitFit tasks on one base: throughput of mixed-task batches against one task per batch
# (switching in place) and one task alone, MiniLM on CPU.
#   bash run_scripts/serving_benchmark.sh [--tasks 8] [--examples 512] [--batch-size 32] [--rounds 3] [--output-dir outputs/serving]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${here}${PYTHONPATH:+:${PYTHONPATH}}"
exec python -m fairseq_ext.experiments.serving_benchmark "$@"
