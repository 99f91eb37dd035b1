"""Speed and memory of BitFit against full fine-tuning, measured in train.py itself.

Each (model, mode) is one train.py run on a synthetic binarized dataset (random
tokens, every batch exactly batch x seq_len: sentence prediction, or for an
encoder-decoder arch such as ``transformer_wmt_en_de`` translation, source and
target seq_len tokens each; tokens/s counts source tokens; for a decoder-only
``transformer_lm`` arch such as ``transformer_lm_gpt2_small`` language modeling on
blocks of seq_len tokens) for warmup + steps updates, through
fairseq's own loop and a BitFitTrainer that times each update.  It reports the
median update time (one loop iteration: data loading, train_step, logging), the
median ``train_step`` time alone, tokens per second and peak memory: CUDA max
allocated during the run on GPU, the process's peak RSS on CPU.  On CPU every run
has a fresh process, since RSS cannot be told apart within one; on CUDA one process
per round runs them in turn, so start-up (imports, CUDA context) is paid once.

    python -m fairseq_ext.experiments.benchmark --models minilm roberta_base --device cpu --output-dir outputs/benchmark
    python -m fairseq_ext.experiments.benchmark --models transformer_wmt_en_de --modes full bitfit-all bitfit-none
    python -m fairseq_ext.experiments.benchmark --models transformer_lm_gpt2_small --modes full bitfit-all bitfit-ofa
"""
import argparse
import contextlib
import gc
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import List

import torch

from ..core.errors import UserError, exit_on_user_error
from ..core.files import write_report
from ..plugin.patches import cuda_peak_memory
from ..training import options
from ..training.main import cli_main
from ..training.synthetic import (is_language_model_workload, is_translation_workload, model_setup, train_args,
                                  workload_args, write_synthetic_data)
from ..training.trainer import BitFitTrainer

MODES = (options.FULL, "bitfit-ofa", "bitfit-all", "bitfit-q,m2", options.HEAD_ONLY)


def measure_one(model: str, mode: str, device: str, batch: int, seq_len: int, steps: int, warmup: int,
                precision: str) -> dict:
    """Run train.py on synthetic data for warmup + steps updates in this process; the benchmark.json row.

    Two times per update: ``update`` is from one update's start to the next's, the
    whole loop iteration of train.py (data loading, train_step, logging); ``step`` is
    ``Trainer.train_step`` alone (forward, backward, gradient norm, optimizer step).
    """
    with tempfile.TemporaryDirectory(prefix="bitfit-bench-") as tmp:
        return _measure_in(Path(tmp), model, mode, device, batch, seq_len, steps, warmup, precision)


def _measure_in(workdir: Path, model: str, mode: str, device: str, batch: int, seq_len: int, steps: int,
                warmup: int, precision: str) -> dict:
    model_args, dictionary, checkpoint = model_setup(model, workdir)
    updates = warmup + steps
    data = write_synthetic_data(workdir, dictionary, batch, seq_len, updates, translation=is_translation_workload(model),
                                language_model=is_language_model_workload(model))
    restore = ["--restore-file", str(checkpoint), "--reset-optimizer", "--reset-dataloader", "--reset-meters"] \
        if checkpoint is not None else []
    argv = [*train_args(data, model_args, batch, device, precision, mode, workload_args(model, seq_len)), *restore,
            "--required-batch-size-multiple", "1", "--max-update", str(updates),
            "--no-save", "--save-dir", str(workdir / "checkpoints"),
            "--log-format", "simple", "--log-interval", str(max(1, updates // 2))]
    starts, step_times, counts = [], [], {}

    class TimedTrainer(BitFitTrainer):
        def train_step(self, samples, raise_oom=False):
            start = time.perf_counter()
            output = super().train_step(samples, raise_oom)
            if self.cuda:
                torch.cuda.synchronize()  # the update's device work belongs to it
            starts.append(start)
            step_times.append(time.perf_counter() - start)
            if not counts:
                parameters = list(self.get_model().parameters())
                counts.update(trainable=sum(p.numel() for p in parameters if p.requires_grad),
                              total=sum(p.numel() for p in parameters))
            return output

    with cuda_peak_memory() if device == "cuda" else contextlib.nullcontext() as cuda_peak:
        cli_main(argv, trainer_class=TimedTrainer)
    if len(starts) < updates:
        raise RuntimeError(f"train.py ran {len(starts)} updates, expected {updates}")
    update_times = [b - a for a, b in zip(starts[warmup:], starts[warmup + 1:])]
    update = statistics.median(update_times)
    step = statistics.median(step_times[warmup:-1])  # the same updates as update_times
    if device == "cuda":
        peak = cuda_peak.peak
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {
        "model": model, "mode": mode, "device": device, "precision": precision, "batch": batch,
        "seq_len": seq_len, "steps": steps, "update_ms_median": round(1000 * update, 2),
        "step_ms_median": round(1000 * step, 2), "tokens_per_s": round(batch * seq_len / update, 1),
        "peak_mem_bytes": int(peak), **counts, "threads": torch.get_num_threads(),
    }


def measure_in_process(pairs, device: str, batch: int, seq_len: int, steps: int, warmup: int,
                       precision: str):
    """Rows for (model, mode) pairs, one train.py run after another in this process.

    Each run builds its own model, trainer and optimizer; they are freed before the
    next starts, so each run's CUDA peak memory is its own.
    """
    for model, mode in pairs:
        row = measure_one(model, mode, device, batch, seq_len, steps, warmup, precision)
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        yield row


def run_in_child(pairs, args, precision: str):
    """Rows for (model, mode) pairs measured in one fresh process, yielded as each finishes."""
    command = [sys.executable, "-m", "fairseq_ext.experiments.benchmark", "--in-process", "--pairs",
               *(f"{model}:{mode}" for model, mode in pairs),
               "--device", args.device, "--precision", precision, "--batch", str(args.batch),
               "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup)]
    with tempfile.TemporaryFile("w+") as stderr:
        child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=stderr, text=True)
        received = 0
        for line in child.stdout:
            if line.startswith("BENCHMARK_ROW "):
                received += 1
                yield json.loads(line[len("BENCHMARK_ROW "):])
        child.wait()
        if child.returncode != 0 or received < len(pairs):
            stderr.seek(0)
            failed, *skipped = [f"{model} {mode}" for model, mode in pairs[received:]] or ["?"]
            not_run = f"; not run: {', '.join(skipped)}" if skipped else ""
            raise RuntimeError(f"{failed} failed (exit {child.returncode}){not_run}:\n{stderr.read()[-3000:]}")


def combine_rounds(rounds: List[dict]) -> dict:
    """One row from a (model, mode)'s rounds: median times, the largest peak, every round's update time."""
    row = dict(rounds[0])
    for key in ("update_ms_median", "step_ms_median"):
        row[key] = round(statistics.median(r[key] for r in rounds), 2)
    row["tokens_per_s"] = round(row["batch"] * row["seq_len"] / (row["update_ms_median"] / 1000), 1)
    row["peak_mem_bytes"] = max(r["peak_mem_bytes"] for r in rounds)
    if len(rounds) > 1:
        row["rounds"] = len(rounds)
        row["update_ms_per_round"] = [r["update_ms_median"] for r in rounds]
        row["step_ms_per_round"] = [r["step_ms_median"] for r in rounds]
    return row


def add_ratios(rows: List[dict]) -> None:
    """Ratios to full fine-tuning of the same model and device: ratio_to_full (update time
    over full's; below 1 is faster), step_ratio_to_full, mem_ratio_to_full, speedup.

    With rounds, time ratios are the median of each round's ratio: a mode is compared
    with the full fine-tuning run of its own round, minutes apart rather than many.
    """
    full = {(r["model"], r["device"]): r for r in rows if r["mode"] == "full"}
    for row in rows:
        reference = full.get((row["model"], row["device"]))
        if reference is None:
            row.update(ratio_to_full=None, step_ratio_to_full=None, mem_ratio_to_full=None, speedup=None)
            continue

        def time_ratio(key):
            per_round = f"{key[:-len('_median')]}_per_round"
            if per_round in row and per_round in reference:
                return statistics.median(a / b for a, b in zip(row[per_round], reference[per_round]))
            return row[key] / reference[key]

        ratio = time_ratio("update_ms_median")
        row["ratio_to_full"] = round(ratio, 3)
        row["step_ratio_to_full"] = round(time_ratio("step_ms_median"), 3)
        row["mem_ratio_to_full"] = round(row["peak_mem_bytes"] / reference["peak_mem_bytes"], 3)
        row["speedup"] = round(1 / ratio, 2)


def markdown(rows: List[dict]) -> str:
    lines = [
        "| model | mode | device | precision | batch × len | update (ms) | step (ms) | tokens/s "
        "| peak memory (MiB) | trainable / total | update / full | step / full | memory / full | speedup |",
        "|---|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def fmt(value, spec):
        return "–" if value is None else format(value, spec)

    for r in rows:
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['device']} | {r['precision']} | {r['batch']} × {r['seq_len']} "
            f"| {r['update_ms_median']:.1f} | {r['step_ms_median']:.1f} | {r['tokens_per_s']:,.0f} "
            f"| {r['peak_mem_bytes'] / 2**20:,.0f} "
            f"| {r['trainable']:,} / {r['total']:,} ({100 * r['trainable'] / r['total']:.3f}%) "
            f"| {fmt(r['ratio_to_full'], '.2f')} | {fmt(r['step_ratio_to_full'], '.2f')} "
            f"| {fmt(r['mem_ratio_to_full'], '.2f')} | {fmt(r['speedup'], '.2f')}× |")
    return "\n".join(lines) + "\n"


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["minilm"])
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None,
                        help="default: fp16 on cuda, fp32 on cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10, help="timed updates")
    parser.add_argument("--warmup", type=int, default=3, help="untimed updates first")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every model x mode this many times, interleaved; rows report the median")
    parser.add_argument("--process-per", choices=("row", "round"), default=None,
                        help="a fresh process for every model x mode (row), or one per round running "
                        "them in turn (round: start-up paid once; CUDA only, as peak RSS covers a whole "
                        "process). Default: round on cuda, row on cpu")
    parser.add_argument("--output-dir", default="outputs/benchmark")
    # internal: measure these MODEL:MODE pairs in this process and print one BENCHMARK_ROW each
    parser.add_argument("--in-process", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pairs", nargs="+", default=[], help=argparse.SUPPRESS)
    return parser


@exit_on_user_error
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    precision = args.precision or ("fp16" if args.device == "cuda" else "fp32")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here")
    for mode in args.modes:
        options.mode_flags(mode)
    if args.steps < 2 or args.warmup < 1:
        raise UserError("--steps must be at least 2 and --warmup at least 1 (the first update is never timed)")
    if args.rounds < 1:
        raise UserError("--rounds must be at least 1")
    process_per = args.process_per or ("round" if args.device == "cuda" else "row")
    if process_per == "round" and args.device == "cpu":
        raise UserError("--process-per round needs --device cuda: on CPU, peak RSS covers the whole process")
    if args.in_process:
        pairs = [tuple(pair.split(":", 1)) for pair in args.pairs]
        for row in measure_in_process(pairs, args.device, args.batch, args.seq_len, args.steps,
                                      args.warmup, precision):
            print("BENCHMARK_ROW " + json.dumps(row), flush=True)
        return
    pairs = [(model, mode) for model in args.models for mode in args.modes]
    groups = [pairs] if process_per == "round" else [[pair] for pair in pairs]
    runs = {}  # (model, mode) -> one row per round
    for round_index in range(args.rounds):
        # Rounds run every mode in turn, so a machine that slows down over minutes
        # (shared hosts do) shifts all modes alike instead of the last ones.
        for group in groups:
            for row in run_in_child(group, args, precision):
                runs.setdefault((row["model"], row["mode"]), []).append(row)
                print(f"{row['model']:>14} {row['mode']:<12} {row['update_ms_median']:>9.1f} ms/update "
                      f"{row['step_ms_median']:>9.1f} ms/step "
                      f"{row['tokens_per_s']:>10,.0f} tok/s  peak {row['peak_mem_bytes'] / 2**20:,.0f} MiB"
                      + (f"  (round {round_index + 1}/{args.rounds})" if args.rounds > 1 else ""), flush=True)
    rows = [combine_rounds(rounds) for rounds in runs.values()]
    add_ratios(rows)
    written = write_report(args.output_dir, "benchmark", rows, markdown(rows))
    print(markdown(rows))
    print(written)


if __name__ == "__main__":
    main()
