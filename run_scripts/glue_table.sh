#!/usr/bin/env bash
# The README's GLUE table from scratch, at the project's defaults: the embedded MiniLM on CoLA,
# SST-2 (a seeded 8,000-row training subset) and STS-B; full fine-tuning, BitFit ofa, all and
# q,m2, head-only, and the comparison methods LoRA, IA3 and adapters; SEEDS seeds each. Interrupted, it resumes where it stopped (rerun it);
# finished runs are kept. results.md, results.json and curves.png land in OUTPUT_DIR.
#   GLUE_DIR=glue_data bash run_scripts/glue_table.sh
# Environment (defaults in brackets):
#   GLUE_DIR    GLUE's glue_data folder                                    [./glue_data]
#   OUTPUT_DIR  where data, runs and results go                            [outputs/glue_table]
#   SEEDS       space-separated seeds                                      [1 2 3]
#   MODE        the table's rows   [full bitfit-ofa bitfit-all bitfit-q,m2 head lora ia3 adapter]
#   REUSE_RESULTS  other jobs' results.json files: runs there with the same settings are taken, not trained
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export GLUE_DIR="${GLUE_DIR:-glue_data}" OUTPUT_DIR="${OUTPUT_DIR:-outputs/glue_table}" SEEDS="${SEEDS:-1 2 3}"
export MODE="${MODE:-full bitfit-ofa bitfit-all bitfit-q,m2 head lora ia3 adapter}"
export GLUE_BITFIT_COMMAND="GLUE_DIR=$(printf '%q' "${GLUE_DIR}") OUTPUT_DIR=$(printf '%q' "${OUTPUT_DIR}") SEEDS=$(printf '%q' "${SEEDS}") MODE=$(printf '%q' "${MODE}")${REUSE_RESULTS:+ REUSE_RESULTS=$(printf '%q' "${REUSE_RESULTS}")} bash $(printf '%q' "$0")"
TASKS="CoLA SST-2 STS-B" TRAIN_SUBSET="SST-2=8000" exec bash "${here}/glue_bitfit.sh"
