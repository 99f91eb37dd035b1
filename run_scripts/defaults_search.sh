#!/usr/bin/env bash
# The defaults search declared in docs/defaults_search.md: BitFit all/ofa and full fine-tuning over their
# grids on CoLA, SST-2 (8k) and STS-B, seed 1, resumable (rerun after a stop), the winners summarised.
#   GLUE_DIR=glue_data bash run_scripts/defaults_search.sh [--output-dir outputs/defaults_search] [--cells NAME ...] [--parallel N] [--summarize]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${here}${PYTHONPATH:+:${PYTHONPATH}}"
exec python -m fairseq_ext.experiments.defaults_search --glue-dir "${GLUE_DIR:-glue_data}" "$@"
