#!/usr/bin/env bash
# BLEU of BitFit against full fine-tuning on synthetic translation tasks (a tiny transformer
# pretrained and fine-tuned here, on CPU; about 8 minutes on 2 cores).
#   bash run_scripts/seq2seq_bleu.sh
#   bash run_scripts/seq2seq_bleu.sh --settings task-selection --modes full bitfit-all bitfit-q,m2
# Arguments go to python -m fairseq_ext.experiments.seq2seq_bleu (--help lists them).
# Environment: OUTPUT_DIR (seq2seq_bleu.json and .md, and the runs) [outputs/seq2seq_bleu]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${here}${PYTHONPATH:+:${PYTHONPATH}}"
exec python -m fairseq_ext.experiments.seq2seq_bleu --output-dir "${OUTPUT_DIR:-outputs/seq2seq_bleu}" "$@"
