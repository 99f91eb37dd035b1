#!/usr/bin/env bash
# Epochs of real GLUE data, side by side in one process: a plain Hugging Face transformers
# loop (random batches), the same loop at its best (transformers' LengthGroupedSampler, what
# Trainer's group_by_length=True uses, with 50-batch megabatches, and fused AdamW: the peer),
# train.py with fairseq's random batches, and train.py with length-grouped batches (the GLUE
# runner's default). Same model, data, batch, schedule and trained parameters.
#   GLUE_DIR=glue_data TASK=MRPC bash run_scripts/speed_vs_hf.sh
# Environment (defaults in brackets):
#   GLUE_DIR    GLUE's glue_data folder                                    [./glue_data]
#   TASK        one GLUE task                                              [STS-B]
#   MODES       full and/or bitfit-<terms>                                 [full bitfit-all]
#   EPOCHS      epochs each system trains; the median epoch is compared    [3]
#   BF16_BASE   auto|on|off: BitFit also with a bf16 frozen base (--bf16); auto: on a CPU with native bf16 [auto]
#   MODEL       a Hugging Face BERT/RoBERTa folder                         [embedded MiniLM]
#   FP16        1: on a GPU, train.py --fp16 and the transformers loop with fp16 AMP   [unset]
#   OUTPUT_DIR  speed_vs_hf.json and speed_vs_hf.md go here                [outputs/speed_vs_hf]
#   RECIPE      flags (EPOCHS, batch 32, lr 5e-5 / 1e-3) or defaults (the GLUE runner's recipe)   [flags]
#   TRAIN_SUBSET  train on the runner's seeded sample of N training rows (SST-2 8k: 8000)        [every row]
#   SYSTEMS     comma-separated systems to train, e.g. "transformers,train.py grouped"          [all]
#   SEED        every system's seed (head initialisation, batch order)                          [1]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${here}${PYTHONPATH:+:${PYTHONPATH}}"
args=(--glue-dir "${GLUE_DIR:-glue_data}" --task "${TASK:-STS-B}" --modes ${MODES:-full bitfit-all}
      --bf16-base "${BF16_BASE:-auto}" --output-dir "${OUTPUT_DIR:-outputs/speed_vs_hf}" --recipe "${RECIPE:-flags}")
[[ "${RECIPE:-flags}" == defaults ]] || args+=(--epochs "${EPOCHS:-3}")
[[ -z "${TRAIN_SUBSET:-}" ]] || args+=(--train-subset "${TRAIN_SUBSET}")
[[ -z "${MODEL:-}" ]] || args+=(--model "${MODEL}")
[[ -z "${SEED:-}" ]] || args+=(--seed "${SEED}")
[[ -z "${FP16:-}" ]] || args+=(--fp16)
if [[ -n "${SYSTEMS:-}" ]]; then
  IFS=, read -r -a systems <<< "${SYSTEMS}"
  args+=(--systems "${systems[@]}")
fi
exec python -m fairseq_ext.experiments.speed_vs_hf "${args[@]}"
