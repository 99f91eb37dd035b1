#!/usr/bin/env bash
# Domain adaptation of a small decoder-only LM (fairseq transformer_lm) pretrained here on CPU: full
# fine-tuning, BitFit all, BitFit ofa and frozen, measured on a second text domain (docs/language_models.md).
#   GLUE_DIR=glue_data bash run_scripts/lm_adaptation.sh                 # SST-2 sentences, then STS-B's
#   bash run_scripts/lm_adaptation.sh --pretrain-train A.train --pretrain-valid A.valid \
#       --adapt-train B.train --adapt-valid B.valid                      # any two plain-text corpora
# Arguments go to python -m fairseq_ext.experiments.lm_adaptation (--help lists them).
# Environment: GLUE_DIR (take the corpora from GLUE files), OUTPUT_DIR [outputs/lm_adaptation]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${here}${PYTHONPATH:+:${PYTHONPATH}}"
if [ -n "${GLUE_DIR:-}" ]; then
  set -- --glue-dir "$GLUE_DIR" "$@"
fi
exec python -m fairseq_ext.experiments.lm_adaptation --output-dir "${OUTPUT_DIR:-outputs/lm_adaptation}" "$@"
