#!/usr/bin/env bash
# BitFit on GLUE, end to end: prepare the data with the model's tokenizer, fine-tune
# with train.py, and write results.json, results.md, curves.png and GLUE leaderboard
# predictions to OUTPUT_DIR.  Arguments after the script name go to train.py:
#
#   GLUE_DIR=glue_data TASKS="CoLA STS-B" bash run_scripts/glue_bitfit.sh --max-update 30
#
# Environment (defaults in brackets):
#   GLUE_DIR      GLUE's glue_data folder, <TASK>/{train,dev,test}.tsv     [./glue_data]
#   TASKS         space-separated GLUE tasks                               [every task present]
#   MODE          space-separated: full, head (head-only baseline), bitfit (with BITFIT_TERMS),
#                 bitfit-<terms> (bitfit-all, bitfit-q,m2, ...), rand_uniform, rand_row_col  [bitfit]
#   BITFIT_TERMS  train.py --bitfit-terms for MODE=bitfit                  [ofa]
#   MODEL         converted model folder or Hugging Face folder            [embedded all-MiniLM-L6-v2]
#   OUTPUT_DIR    where data, runs and results go                          [outputs/glue]
#   SEEDS         space-separated seeds                                    [1]
#   LRS           space-separated learning rates, best on dev reported     [by mode and model size]
#   EPOCHS        max epochs                           [by mode, model size and task size: docs/glue.md]
#   MAX_SEQ_LEN   tokens per example                                       [128]
#   TRAIN_SUBSET  train on a seeded sample of N training rows              [all]
#   TRAIN_SUBSETS training-size curves: every mode at each size, e.g. "200 500 1000" (size_curves.png)
#   NPROC         processes per node; torchrun when > 1                    [1]
#   NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT  multi-node torchrun       [1, 0, 127.0.0.1, 29500]
#   SAVE_MINUTES  checkpoint_last.pt at least every M minutes, mid-epoch too [5]
#   PROGRESS_SECONDS  seconds between progress lines when not on a terminal [60]
#   PARALLEL      runs trained at once on this machine: one GPU each where there are GPUs (PARALLEL
#                 above the GPU count is an error), else OMP_NUM_THREADS = cores / PARALLEL each
#                 (unless OMP_NUM_THREADS is set); progress lines are labelled by run      [1]
#   LAUNCHER      local (this machine), submitit (each run a SLURM job through submitit; needs
#                 pip install submitit, or pip install -e .[sweep]), submitit_local (submitit's
#                 local executor: the SLURM path without SLURM); all runs are submitted at once,
#                 PARALLEL does not apply                                  [local]
#   SLURM_PARTITION     LAUNCHER=submitit: the partition                     [the cluster's default]
#   SLURM_TIME_MIN      a run's time limit in minutes (a run that reaches it saves and stops the job;
#                       the same command resumes)                          [720]
#   SLURM_GPUS_PER_RUN, SLURM_CPUS_PER_RUN, SLURM_MEM_GB  each run's job     [1, 8, 32]
#                 (submitit's files: OUTPUT_DIR/submitit; the job runs the same train.py command)
#
# Ctrl-C (or SIGTERM) stops the job with one line that says how to resume: the same command.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${here}${PYTHONPATH:+:${PYTHONPATH}}"
# The command as it was given (the variables set for it included), for the line that says how to resume.
command=""
for name in GLUE_DIR TASKS MODE BITFIT_TERMS MODEL OUTPUT_DIR SEEDS LRS EPOCHS MAX_SEQ_LEN TRAIN_SUBSET TRAIN_SUBSETS NPROC \
            NNODES NODE_RANK MASTER_ADDR MASTER_PORT SAVE_MINUTES PROGRESS_SECONDS PARALLEL LAUNCHER SLURM_PARTITION \
            SLURM_TIME_MIN SLURM_GPUS_PER_RUN SLURM_CPUS_PER_RUN SLURM_MEM_GB; do
  if [[ -n "${!name+set}" ]]; then command+="${name}=$(printf '%q' "${!name}") "; fi
done
command+="bash $(printf '%q' "$0")"
for arg in "$@"; do command+=" $(printf '%q' "$arg")"; done
export GLUE_BITFIT_COMMAND="${GLUE_BITFIT_COMMAND:-${command}}"  # a script that calls this one may name itself
args=(
  --glue-dir "${GLUE_DIR:-}" --tasks "${TASKS:-}" --mode "${MODE:-bitfit}"
  --bitfit-terms "${BITFIT_TERMS:-ofa}" --model "${MODEL:-}" --output-dir "${OUTPUT_DIR:-outputs/glue}"
  --seeds "${SEEDS:-1}" --lrs "${LRS:-}" --max-seq-len "${MAX_SEQ_LEN:-128}"
  --nproc "${NPROC:-1}" --nnodes "${NNODES:-1}" --node-rank "${NODE_RANK:-0}"
  --master-addr "${MASTER_ADDR:-127.0.0.1}" --master-port "${MASTER_PORT:-29500}"
  --save-minutes "${SAVE_MINUTES:-5}" --progress-interval "${PROGRESS_SECONDS:-60}"
  --parallel "${PARALLEL:-1}" --launcher "${LAUNCHER:-local}" --slurm-partition "${SLURM_PARTITION:-}"
  --slurm-time-min "${SLURM_TIME_MIN:-720}" --slurm-gpus-per-run "${SLURM_GPUS_PER_RUN:-1}"
  --slurm-cpus-per-run "${SLURM_CPUS_PER_RUN:-8}" --slurm-mem-gb "${SLURM_MEM_GB:-32}"
)
if [[ -n "${EPOCHS:-}" ]]; then args+=(--epochs "${EPOCHS}"); fi
if [[ -n "${TRAIN_SUBSET:-}" ]]; then args+=(--train-subset "${TRAIN_SUBSET}"); fi
if [[ -n "${TRAIN_SUBSETS:-}" ]]; then args+=(--train-subsets "${TRAIN_SUBSETS}"); fi
exec python -m fairseq_ext.experiments.glue_run "${args[@]}" -- "$@"
