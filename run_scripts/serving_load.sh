#!/usr/bin/env bash
# The HTTP server under load, on 127.0.0.1 only, bounded in time: throughput, p50/p99 latency, errors,
# the server's memory before and after, and one-sentence latency while the largest request runs.
#   bash run_scripts/serving_load.sh [--clients 16] [--seconds 30] [--delta cola=D1 --delta stsb=D2] [--output-dir outputs/serving]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${here}${PYTHONPATH:+:${PYTHONPATH}}"
exec python -m fairseq_ext.experiments.serving_benchmark --load "$@"
