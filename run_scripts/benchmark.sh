#!/usr/bin/env bash
# Speed and memory of BitFit against full fine-tuning, measured in train.py's own loop.
#   bash run_scripts/benchmark.sh                                   # MiniLM on CPU, all modes
#   MODELS="roberta_base roberta_large" DEVICE=cuda bash run_scripts/benchmark.sh
# Environment (defaults in brackets):
#   MODELS      space-separated: minilm (embedded, pretrained) or fairseq archs with random
#               init (roberta_base, roberta_large, bert_base, ...; encoder-decoder archs such as
#               transformer_wmt_en_de or bart_base train on synthetic translation)   [minilm]
#   MODES       full bitfit-ofa bitfit-all bitfit-q,m2 head (bitfit-<any --bitfit-terms>;
#               head on a seq2seq model, which has no heads, trains nothing), and the
#               comparison methods lora ia3 adapter                                  [the first five]
#   STEPS       timed updates after WARMUP warm-up updates; the median is reported [10, 3]
#   ROUNDS      run every model x mode this many times, interleaved; median of rounds [1]
#   DEVICE      cpu or cuda                                                          [cuda if present]
#   PRECISION   fp32, fp16 or bf16                                                   [fp16 on cuda, fp32 on cpu]
#   BATCH, SEQ_LEN                                                                   [32, 128]
#   PROCESS_PER row: a fresh process per model x mode; round: one per round, runs in
#               turn (start-up paid once; CUDA only)                                [round on cuda, row on cpu]
#   OUTPUT_DIR  benchmark.json and benchmark.md go here                              [outputs/benchmark]
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
export PYTHONPATH="${here}${PYTHONPATH:+:${PYTHONPATH}}"
args=(--models ${MODELS:-minilm} --modes ${MODES:-full bitfit-ofa bitfit-all bitfit-q,m2 head}
      --batch "${BATCH:-32}" --seq-len "${SEQ_LEN:-128}" --rounds "${ROUNDS:-1}"
      --output-dir "${OUTPUT_DIR:-outputs/benchmark}")
if [[ -n "${STEPS:-}" ]]; then args+=(--steps "${STEPS}"); fi
if [[ -n "${WARMUP:-}" ]]; then args+=(--warmup "${WARMUP}"); fi
if [[ -n "${DEVICE:-}" ]]; then args+=(--device "${DEVICE}"); fi
if [[ -n "${PRECISION:-}" ]]; then args+=(--precision "${PRECISION}"); fi
if [[ -n "${PROCESS_PER:-}" ]]; then args+=(--process-per "${PROCESS_PER}"); fi
exec python -m fairseq_ext.experiments.benchmark "${args[@]}"
