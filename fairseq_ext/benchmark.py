"""Speed and memory of BitFit against full fine-tuning, inside train.py's own Trainer.

Each (model, mode) runs in a fresh process: it builds the model the way train.py
does (fairseq task, model, criterion, BitFitTrainer), then times warm
``trainer.train_step`` calls on one fixed batch (forward, backward, gradient
norm, optimizer step: everything a train.py update does but data loading), and
reports the median step time, tokens per second and the process's peak memory
(CUDA max allocated on GPU, peak RSS on CPU).

    python -m fairseq_ext.benchmark --models minilm roberta_base --device cpu --output-dir outputs/benchmark
"""
import argparse
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
from fairseq.data import FairseqDataset

from fairseq_ext.atomic_write import write_text_atomically
from fairseq_ext.errors import UserError, exit_on_user_error

MODES = ("full", "bitfit-ofa", "bitfit-all", "bitfit-q,m2", "head")
RANDOM_INIT_VOCAB = {"roberta": 50261, "bert": 30518}  # symbols besides fairseq's 4 specials


def mode_flags(mode: str) -> List[str]:
    if mode == "full":
        return []
    if mode == "head":
        return ["--bitfit", "--bitfit-terms", "none"]
    if mode.startswith("bitfit-"):
        return ["--bitfit", "--bitfit-terms", mode[len("bitfit-"):]]
    raise UserError(f"unknown mode {mode!r}; modes: {', '.join(MODES)} or bitfit-<terms>")


def model_setup(model: str, workdir: Path):
    """(train.py model args, dict.txt path, restore checkpoint or None) for a benchmark model name.

    ``minilm`` is the embedded pretrained model; any other name is a registered
    fairseq arch (``roberta_base``, ``roberta_large``, ``bert_tiny``...) with random init.
    """
    if model == "minilm":
        from fairseq_ext import model_dir, pretrained

        folder = model_dir.load_model_dir(pretrained.default_model_dir())
        return folder.arch_args(), Path(folder.dictionary), folder.checkpoint
    from fairseq.models import ARCH_MODEL_REGISTRY

    if model not in ARCH_MODEL_REGISTRY:
        raise UserError(f"--models {model}: neither 'minilm' nor a fairseq arch")
    family = "bert" if model.startswith("bert") else "roberta"
    size = 996 if model == "bert_tiny" else RANDOM_INIT_VOCAB[family]
    dictionary = workdir / "dict.txt"
    dictionary.write_text("".join(f"tok{i} 1\n" for i in range(size)))
    return ["--arch", model], dictionary, None


class FixedBatch(FairseqDataset):
    """Batch x seq_len random tokens with labels: the probe sample of BitFitTrainer."""

    def __init__(self, batch: int, seq_len: int, vocab: int, bos: int, eos: int, seed: int = 1):
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(4, vocab, (batch, seq_len), generator=generator)
        tokens[:, 0], tokens[:, -1] = bos, eos
        self.sample = {
            "id": torch.arange(batch),
            "net_input": {"src_tokens": tokens, "src_lengths": torch.full((batch,), seq_len)},
            "target": torch.randint(0, 2, (batch,), generator=generator),
            "ntokens": batch * seq_len,
            "nsentences": batch,
        }

    def __len__(self):
        return int(self.sample["nsentences"])

    def __getitem__(self, index):
        return index

    def collater(self, indices):
        return self.sample


def build_trainer(model: str, mode: str, device: str, batch: int, seq_len: int, precision: str,
                  extra_args=(), distributed: bool = False):
    """train.py's model, criterion and BitFitTrainer for one (model, mode), with a fixed batch.

    Returns (trainer, fixed batch). ``extra_args`` are more train.py options;
    ``distributed`` joins the process group they describe first, as train.py does.
    """
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    import fairseq_ext  # noqa: F401
    from fairseq_ext.launch import configure_precision
    from fairseq_ext.trainer import BitFitTrainer, add_bitfit_args, attach_bitfit_config

    workdir = Path(tempfile.mkdtemp(prefix="bitfit-bench-"))
    model_args, dictionary, checkpoint = model_setup(model, workdir)
    for sub in ("input0", "label"):
        (workdir / sub).mkdir()
    (workdir / "input0" / "dict.txt").write_text(dictionary.read_text())
    (workdir / "label" / "dict.txt").write_text("0 1\n1 1\n")
    argv = [str(workdir), "--task", "sentence_prediction", "--criterion", "sentence_prediction",
            "--num-classes", "2", *model_args, "--batch-size", str(batch), "--optimizer", "adam",
            "--lr", "1e-4", "--max-positions", "512", "--seed", "1", "--num-workers", "0",
            *(["--cpu"] if device == "cpu" else []),
            *({"fp16": ["--fp16"], "bf16": ["--bf16"], "fp32": []}[precision]), *mode_flags(mode), *extra_args]
    parser = options.get_training_parser()
    add_bitfit_args(parser)
    args = options.parse_args_and_arch(parser, input_args=argv)
    configure_precision(args, argv)
    cfg = convert_namespace_to_omegaconf(args)
    attach_bitfit_config(cfg, args)
    if distributed:
        from fairseq.distributed import utils as distributed_utils

        if device == "cuda":
            torch.cuda.set_device(cfg.distributed_training.device_id)
        cfg.distributed_training.distributed_rank = distributed_utils.distributed_init(cfg)
    task = tasks.setup_task(cfg.task)
    fairseq_model = task.build_model(cfg.model)
    if checkpoint is not None:  # the pretrained weights, as --restore-file loads them
        from fairseq import checkpoint_utils

        state = checkpoint_utils.load_checkpoint_to_cpu(checkpoint)
        fairseq_model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    data = FixedBatch(batch, seq_len, len(task.source_dictionary), task.source_dictionary.bos(),
                      task.source_dictionary.eos())
    task.datasets["valid"] = data  # what BitFitTrainer probes for unused biases
    return BitFitTrainer(cfg, task, fairseq_model, criterion), data


def measure_one(model: str, mode: str, device: str, batch: int, seq_len: int, steps: int, warmup: int,
                precision: str) -> dict:
    """Time one (model, mode) in this process; returns the benchmark.json row."""
    trainer, data = build_trainer(model, mode, device, batch, seq_len, precision)
    parameters = list(trainer.get_model().parameters())
    trainable = sum(p.numel() for p in parameters if p.requires_grad)
    total = sum(p.numel() for p in parameters)

    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(warmup + steps):
        start = time.perf_counter()
        trainer.train_step([data.sample])
        if device == "cuda":
            torch.cuda.synchronize()
        if step >= warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    if device == "cuda":
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB
    return {
        "model": model, "mode": mode, "device": device, "precision": precision, "batch": batch,
        "seq_len": seq_len, "steps": steps, "step_ms_median": round(1000 * median, 2),
        "tokens_per_s": round(batch * seq_len / median, 1), "peak_mem_bytes": int(peak),
        "trainable": trainable, "total": total, "threads": torch.get_num_threads(),
    }


def add_ratios(rows: List[dict]) -> None:
    full = {(r["model"], r["device"]): r for r in rows if r["mode"] == "full"}
    for row in rows:
        reference = full.get((row["model"], row["device"]))
        row["ratio_to_full"] = round(row["step_ms_median"] / reference["step_ms_median"], 3) if reference else None
        row["mem_ratio_to_full"] = round(row["peak_mem_bytes"] / reference["peak_mem_bytes"], 3) if reference else None


def markdown(rows: List[dict]) -> str:
    lines = [
        "| model | mode | device | precision | batch × len | step (ms, median) | tokens/s | peak memory (MiB) "
        "| trainable / total | step ratio to full | memory ratio to full |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        ratio = "–" if r["ratio_to_full"] is None else f"{r['ratio_to_full']:.2f}"
        mem_ratio = "–" if r["mem_ratio_to_full"] is None else f"{r['mem_ratio_to_full']:.2f}"
        lines.append(
            f"| {r['model']} | {r['mode']} | {r['device']} | {r['precision']} | {r['batch']} × {r['seq_len']} "
            f"| {r['step_ms_median']:.1f} | {r['tokens_per_s']:,.0f} | {r['peak_mem_bytes'] / 2**20:,.0f} "
            f"| {r['trainable']:,} / {r['total']:,} ({100 * r['trainable'] / r['total']:.3f}%) | {ratio} | {mem_ratio} |")
    return "\n".join(lines) + "\n"


def build_parser():
    parser = argparse.ArgumentParser(prog="benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=["minilm"])
    parser.add_argument("--modes", nargs="+", default=list(MODES))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--precision", choices=("fp32", "fp16", "bf16"), default=None,
                        help="default: fp16 on cuda, fp32 on cpu")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--output-dir", default="outputs/benchmark")
    parser.add_argument("--one", action="store_true", help=argparse.SUPPRESS)  # internal: one row, in this process
    return parser


@exit_on_user_error
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    precision = args.precision or ("fp16" if args.device == "cuda" else "fp32")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device here")
    for mode in args.modes:
        mode_flags(mode)
    if args.one:
        row = measure_one(args.models[0], args.modes[0], args.device, args.batch, args.seq_len,
                          args.steps, args.warmup, precision)
        print("BENCHMARK_ROW " + json.dumps(row), flush=True)
        return
    rows = []
    for model in args.models:
        for mode in args.modes:
            command = [sys.executable, "-m", "fairseq_ext.benchmark", "--one", "--models", model, "--modes", mode,
                       "--device", args.device, "--precision", precision, "--batch", str(args.batch),
                       "--seq-len", str(args.seq_len), "--steps", str(args.steps), "--warmup", str(args.warmup)]
            result = subprocess.run(command, capture_output=True, text=True)
            found = [line for line in result.stdout.splitlines() if line.startswith("BENCHMARK_ROW ")]
            if result.returncode != 0 or not found:
                raise RuntimeError(f"{model} {mode} failed (exit {result.returncode}):\n{result.stderr[-3000:]}")
            row = json.loads(found[-1][len("BENCHMARK_ROW "):])
            rows.append(row)
            print(f"{model:>14} {mode:<12} {row['step_ms_median']:>9.1f} ms/step "
                  f"{row['tokens_per_s']:>10,.0f} tok/s  peak {row['peak_mem_bytes'] / 2**20:,.0f} MiB", flush=True)
    add_ratios(rows)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / "benchmark.json", json.dumps(rows, indent=1) + "\n")
    write_text_atomically(out / "benchmark.md", markdown(rows))
    print(markdown(rows))
    print(f"written: {out / 'benchmark.json'}, {out / 'benchmark.md'}")


if __name__ == "__main__":
    main()
