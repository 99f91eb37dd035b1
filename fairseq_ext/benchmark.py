"""Speed and memory of BitFit against full fine-tuning, measured in train.py itself.

Each (model, mode) is one train.py run on a synthetic binarized dataset (random
tokens, every batch exactly batch x seq_len) for warmup + steps updates, through
fairseq's own loop and a BitFitTrainer that times each update.  It reports the
median update time (one loop iteration: data loading, train_step, logging), the
median ``train_step`` time alone, tokens per second and peak memory: CUDA max
allocated during the run on GPU, the process's peak RSS on CPU.  On CPU every run
has a fresh process, since RSS cannot be told apart within one; on CUDA one process
per round runs them in turn, so start-up (imports, CUDA context) is paid once.

    python -m fairseq_ext.benchmark --models minilm roberta_base --device cpu --output-dir outputs/benchmark
"""
import argparse
import contextlib
import gc
import importlib.util
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
from fairseq_ext.glue_run import REPO_TRAIN_PY

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


def write_dictionaries(data: Path, dictionary: Path) -> None:
    """The input0/ and label/ dictionaries of a two-class sentence_prediction data folder."""
    for sub, dict_text in (("input0", dictionary.read_text()), ("label", "0 1\n1 1\n")):
        (data / sub).mkdir(parents=True)
        (data / sub / "dict.txt").write_text(dict_text)


def train_args(data: Path, model_args: List[str], batch: int, device: str, precision: str, mode: str) -> List[str]:
    """The train.py options every benchmarked run shares: two-class sentence prediction, Adam."""
    return [str(data), "--task", "sentence_prediction", "--criterion", "sentence_prediction",
            "--num-classes", "2", *model_args, "--max-positions", "512", "--batch-size", str(batch),
            "--optimizer", "adam", "--lr", "1e-4", "--seed", "1", *(["--cpu"] if device == "cpu" else []),
            *({"fp16": ["--fp16"], "bf16": ["--bf16"], "fp32": []}[precision]), *mode_flags(mode)]


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

    with tempfile.TemporaryDirectory(prefix="bitfit-bench-") as tmp:  # the task reads its dictionaries at setup
        workdir = Path(tmp)
        model_args, dictionary, checkpoint = model_setup(model, workdir)
        write_dictionaries(workdir, dictionary)
        argv = [*train_args(workdir, model_args, batch, device, precision, mode), "--num-workers", "0", *extra_args]
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


def write_synthetic_data(workdir: Path, dictionary: Path, batch: int, seq_len: int, updates: int) -> Path:
    """A binarized sentence_prediction dataset of random tokens (what fairseq-preprocess writes).

    Every sequence is ``seq_len`` tokens ending in </s>, so every batch is batch x seq_len;
    there are enough for ``updates`` updates in one epoch, plus a one-batch valid split:
    BitFitTrainer probes it for unused biases, as in a user's run, and train.py
    validates on it once, after the last (untimed) update.
    """
    from fairseq.data import Dictionary, indexed_dataset

    data = workdir / "data"
    source = Dictionary.load(str(dictionary))
    generator = torch.Generator().manual_seed(1)
    write_dictionaries(data, dictionary)
    labels = Dictionary.load(str(data / "label" / "dict.txt"))
    for split, rows in (("train", batch * (updates + 1)), ("valid", batch)):
        tokens = indexed_dataset.make_builder(str(data / "input0" / f"{split}.bin"), "mmap", len(source))
        targets = indexed_dataset.make_builder(str(data / "label" / f"{split}.bin"), "mmap", len(labels))
        for _ in range(rows):
            sequence = torch.randint(source.nspecial, len(source), (seq_len,), generator=generator)
            sequence[-1] = source.eos()
            tokens.add_item(sequence)
            label = int(torch.randint(0, 2, (1,), generator=generator))
            targets.add_item(torch.tensor([labels.index(str(label)), labels.eos()]))
        tokens.finalize(str(data / "input0" / f"{split}.idx"))
        targets.finalize(str(data / "label" / f"{split}.idx"))
    return data


def _load_train_py():
    spec = importlib.util.spec_from_file_location("bitfit_train", REPO_TRAIN_PY)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


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
    from fairseq_ext.trainer import BitFitTrainer

    model_args, dictionary, checkpoint = model_setup(model, workdir)
    updates = warmup + steps
    data = write_synthetic_data(workdir, dictionary, batch, seq_len, updates)
    restore = ["--restore-file", str(checkpoint), "--reset-optimizer", "--reset-dataloader", "--reset-meters"] \
        if checkpoint is not None else []
    argv = [*train_args(data, model_args, batch, device, precision, mode), *restore,
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

    with CudaPeakMemory() if device == "cuda" else contextlib.nullcontext() as cuda_peak:
        _load_train_py().cli_main(argv, trainer_class=TimedTrainer)
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


class CudaPeakMemory:
    """The most CUDA memory allocated at any moment inside the block.

    fairseq's train_step reads and resets the CUDA peak after every update (its
    gb_free stat): each peak is recorded just before it is reset.  What an earlier
    run in the same process left allocated for good (cuBLAS's workspace) counts in
    every run alike, as it does in a fresh process once the first matmul has run.
    """

    def __enter__(self):
        self._peaks = []
        self._reset = torch.cuda.reset_peak_memory_stats
        self._reset()

        def record_then_reset(*args, **kwargs):
            self._peaks.append(torch.cuda.max_memory_allocated())
            self._reset(*args, **kwargs)

        torch.cuda.reset_peak_memory_stats = record_then_reset
        return self

    def __exit__(self, *exc):
        torch.cuda.reset_peak_memory_stats = self._reset
        self.peak = max(self._peaks + [torch.cuda.max_memory_allocated()])
        return False


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
    command = [sys.executable, "-m", "fairseq_ext.benchmark", "--in-process", "--pairs",
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
    parser = argparse.ArgumentParser(prog="benchmark", description=__doc__.split("\n\n")[0])
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
        mode_flags(mode)
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
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out / "benchmark.json", json.dumps(rows, indent=1) + "\n")
    write_text_atomically(out / "benchmark.md", markdown(rows))
    print(markdown(rows))
    print(f"written: {out / 'benchmark.json'}, {out / 'benchmark.md'}")


if __name__ == "__main__":
    main()
