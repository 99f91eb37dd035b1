#!/usr/bin/env bash
# BitFit on GLUE, end to end: prepare the data with the model's tokenizer, fine-tune with train.py,
# and write results.json, results.md, results.tex, curves.png and GLUE leaderboard predictions to
# OUTPUT_DIR.  Settings are environment variables; arguments after the script name go to train.py:
#
#   GLUE_DIR=glue_data TASKS="CoLA STS-B" bash run_scripts/glue_bitfit.sh --max-update 30
#
# `bash run_scripts/glue_bitfit.sh --help` lists every variable with its default (each is declared
# once, in fairseq_ext/experiments/glue_run/settings.py; docs/glue.md explains them).
# Ctrl-C (or SIGTERM) stops the job with one line that says where each run continues and how to
# resume: the same command.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${here}${PYTHONPATH:+:${PYTHONPATH}}"
GLUE_BITFIT_SCRIPT="$0" exec python -m fairseq_ext.experiments.glue_run --from-env -- "$@"
