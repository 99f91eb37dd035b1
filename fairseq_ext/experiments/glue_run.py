"""GLUE end to end: prepare, fine-tune with train.py, collect results, predict test sets.

``run_scripts/glue_bitfit.sh`` maps its environment variables onto this CLI::

    python -m fairseq_ext.experiments.glue_run --glue-dir glue_data --tasks "CoLA STS-B" --mode bitfit \\
        --output-dir outputs/glue -- --max-update 30      # after --: passed to train.py

For every task, mode, learning rate and seed, one train.py run is made in
``OUTPUT_DIR/runs/<TASK>/<mode>/lr<LR>-seed<SEED>/``; a run that finished is
not run again, and an interrupted one resumes from its last checkpoint.  What a
run gave is read from the run record train.py writes (``run_record.json``), not
from its log.  The results of all runs in OUTPUT_DIR (this call's and earlier
ones', other modes included) are written to results.json, results.md and curves.png.
"""
import argparse
import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

from ..core.bitfit import format_trainable
from ..core.errors import UserError, exit_on_user_error, user_error_in
from ..core.files import write_atomically, write_text_atomically
from ..core.glue_files import check_glue_dir, write_leaderboard_tsv
from ..core.glue_tasks import GLUE_SOURCE_HINT, TASK_NAMES, TASKS, get_task_spec
from ..core.run_record import RECORD_NAME, epoch_stats, read_run_record
from ..plugin.data.glue_prepare import prepare_task, read_test_indices
from ..plugin.deltas import apply_delta
from ..plugin.models import hf_import
from ..plugin.models.model_dir import load_model_dir
from ..plugin.models.pretrained import default_model_dir
from ..plugin.predictor import predict_prepared_split
from ..training.options import TRAIN_COMMAND, TRAIN_MODULE, TRAIN_PROG, mode_flags, mode_label

logger = logging.getLogger("fairseq_ext.experiments.glue_run")  # also when run as __main__


MODES = ("bitfit", "full", "head")

# fairseq's RoBERTa GLUE recipe (examples/roberta/README.glue.md): lr and batch size per task.
FULL_FT_LR = {"MNLI": 1e-5, "QNLI": 1e-5, "QQP": 1e-5, "RTE": 2e-5, "SST-2": 1e-5,
              "MRPC": 1e-5, "CoLA": 1e-5, "STS-B": 2e-5, "WNLI": 1e-5}
FULL_FT_BATCH = {"MNLI": 32, "QNLI": 32, "QQP": 32, "RTE": 16, "SST-2": 32,
                 "MRPC": 16, "CoLA": 16, "STS-B": 16, "WNLI": 16}
BITFIT_LR = 1e-3  # the official BitFit code's default
BITFIT_BATCH = 32
SMALL_TASK_ROWS = 10_000  # BitFit trains these longer: its updates are small


# -- settings -------------------------------------------------------------------


def default_epochs(mode: str, train_rows: int) -> int:
    if mode == "full":
        return 10  # fairseq's RoBERTa GLUE recipe
    return 20 if train_rows < SMALL_TASK_ROWS else 10


def default_lrs(mode: str, task: str) -> List[float]:
    return [FULL_FT_LR[task]] if mode == "full" else [BITFIT_LR]


def _passthrough_value(passthrough: List[str], *flags: str) -> Optional[str]:
    """The value train.py will see for one of ``flags`` among the extra arguments (the last given)."""
    found = None
    for i, arg in enumerate(passthrough):
        for flag in flags:
            if arg == flag and i + 1 < len(passthrough):
                found = passthrough[i + 1]
            elif arg.startswith(flag + "="):
                found = arg.split("=", 1)[1]
    return found


def _passthrough_ints(passthrough: List[str], *flags: str) -> Optional[List[int]]:
    """A positive integer (or fairseq's comma list of them, as --update-freq takes) given after the script."""
    value = _passthrough_value(passthrough, *flags)
    if value is None:
        return None
    try:
        numbers = [int(v) for v in value.split(",")]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 1:
        raise UserError(f"{flags[0]} {value!r} (after the script): expected a positive integer")
    return numbers


def schedule_updates(passthrough: List[str], batch: int, epochs: int, train_rows: int, world_size: int) -> int:
    """The updates the polynomial schedule decays over: --max-update if given, else what
    --max-epoch epochs take at the batch size, update frequency and world size train.py will use."""
    max_update = _passthrough_ints(passthrough, "--max-update")
    if max_update:
        return max_update[0]
    batch = (_passthrough_ints(passthrough, "--batch-size", "--max-sentences") or [batch])[0]
    epochs = (_passthrough_ints(passthrough, "--max-epoch") or [epochs])[0]
    update_freq = _passthrough_ints(passthrough, "--update-freq") or [1]
    batches_per_epoch = max(1, math.ceil(train_rows / (batch * world_size)))
    return sum(math.ceil(batches_per_epoch / update_freq[min(epoch, len(update_freq) - 1)])
               for epoch in range(epochs))


def train_command(spec, model, data_dir: Path, save_dir: Path, mode: str, bitfit_terms: str,
                  lr: float, seed: int, train_rows: int, world_size: int, passthrough: List[str],
                  epochs: Optional[int], max_seq_len: int) -> List[str]:
    """The train.py arguments of one run: the RoBERTa GLUE recipe with this project's defaults."""
    batch = FULL_FT_BATCH[spec.name] if mode == "full" else BITFIT_BATCH
    epochs = epochs or default_epochs(mode, train_rows)
    total_updates = schedule_updates(passthrough, batch, epochs, train_rows, world_size)
    args = [
        str(data_dir), "--task", "glue", "--glue-task", spec.name, "--criterion", "glue_prediction",
        *model.arch_args(), "--restore-file", model.checkpoint,
        "--reset-optimizer", "--reset-dataloader", "--reset-meters",
        "--max-seq-len", str(max_seq_len), "--batch-size", str(batch), "--max-epoch", str(epochs),
        "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--adam-eps", "1e-06",
        "--weight-decay", "0.1" if mode == "full" else "0.0", "--clip-norm", "0.0",
        "--lr", str(lr), "--lr-scheduler", "polynomial_decay", "--total-num-update", str(total_updates),
        "--warmup-updates", str(int(round(0.06 * total_updates))),
        "--seed", str(seed), "--save-dir", str(save_dir), "--no-epoch-checkpoints",
        "--best-checkpoint-metric", spec.primary_metric, "--maximize-best-checkpoint-metric",
        "--valid-subset", ",".join(spec.valid_subsets),
        "--log-format", "json", "--log-interval", "50", "--num-workers", "0",
        "--find-unused-parameters" if (mode == "full" and world_size > 1) else "--no-progress-bar",
    ]
    if model.pair_separator:
        args += ["--separator-token", "2"]  # RoBERTa pairs: <s> a </s> </s> b </s>
    return args + mode_flags(mode_label(mode, bitfit_terms)) + passthrough


def launcher(nproc: int, nnodes: int, node_rank: int, master_addr: str, master_port: int) -> List[str]:
    if nproc <= 1 and nnodes <= 1:
        return list(TRAIN_COMMAND)
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={master_addr}",
            f"--master_port={master_port}", "-m", TRAIN_MODULE]


# -- reading a run's record ---------------------------------------------------------


def run_summary(record: dict, spec) -> dict:
    """Per-epoch dev metrics, parameter counts and updates from a train.py run record."""
    epochs: Dict[int, dict] = {}
    for subset in spec.valid_subsets:
        suffix = "" if subset == "valid" else "_mm" if spec.name == "MNLI" else f"_{subset}"
        for epoch, values in epoch_stats(record, subset).items():
            metrics = epochs.setdefault(epoch, {})
            metrics.update({name + suffix: float(values[name]) for name in spec.logged_metrics if name in values})
    parameters = record.get("parameters") or {}
    updates = max([int(entry["values"].get("num_updates", 0)) for entry in record["stats"]] + [0])
    return {"epochs": dict(sorted(epochs.items())), "trainable": parameters.get("trainable"),
            "total": parameters.get("total"), "updates": updates}


def best_epoch(epochs: Dict[int, dict], primary: str) -> Optional[int]:
    scored = [(values[primary], -epoch, epoch) for epoch, values in epochs.items() if primary in values]
    return max(scored)[2] if scored else None


# -- results ------------------------------------------------------------------------


def run_key(row: dict) -> tuple:
    return (row["task"], row["mode"], row["lr"], row["seed"])


def load_results(path: Path) -> List[dict]:
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text())["runs"]
    except (ValueError, KeyError) as error:
        raise UserError(f"{path}: not a results file of this tool ({error})") from None


def best_rows(rows: List[dict]) -> Dict[tuple, List[dict]]:
    """Per (task, mode): the runs of the learning rate with the best mean dev score."""
    by_config: Dict[tuple, Dict[float, List[dict]]] = {}
    for row in rows:
        by_config.setdefault((row["task"], row["mode"]), {}).setdefault(row["lr"], []).append(row)
    best = {}
    for key, by_lr in by_config.items():
        def mean_primary(lr):
            scores = [r["dev"].get(r["primary_metric"], float("-inf")) for r in by_lr[lr]]
            return sum(scores) / len(scores)
        best[key] = by_lr[max(by_lr, key=mean_primary)]
    return best


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _fmt(value, digits=1):
    return "–" if value is None else f"{value:.{digits}f}"


def results_markdown(rows: List[dict], specs: dict) -> str:
    best = best_rows(rows)
    tasks = [t for t in specs if any(k[0] == t for k in best)]
    modes = sorted({k[1] for k in best}, key=lambda m: (m != "full", m))
    header_metrics = {t: specs[t].metrics + (("accuracy_mm",) if t == "MNLI" else ()) for t in tasks}
    lines = [
        "# GLUE dev results",
        "",
        "Best learning rate per task and mode (by the task's primary dev metric, mean over seeds); "
        "each cell is the mean over seeds at each run's best epoch. Metrics in %. "
        "`mean` averages each task's GLUE score (the mean of its official metrics).",
        "",
        "| mode | trainable % | " + " | ".join(f"{t} ({'/'.join(header_metrics[t])})" for t in tasks) + " | mean |",
        "|---|---|" + "---|" * len(tasks) + "---|",
    ]
    for mode in modes:
        cells, scores, fractions = [], [], []
        for task in tasks:
            runs = best.get((task, mode))
            if not runs:
                cells.append("–")
                continue
            values = [_mean([r["dev"].get(m) for r in runs]) for m in header_metrics[task]]
            cells.append("/".join(_fmt(v) for v in values))
            scores.append(_mean([r["dev"].get("glue_score") for r in runs]))
            fractions += [100.0 * r["trainable"] / r["total"] for r in runs if r.get("trainable") and r.get("total")]
        lines.append(f"| {mode} | {_fmt(_mean(fractions), 3)} | " + " | ".join(cells) + f" | {_fmt(_mean(scores))} |")
    lines += [
        "",
        "## Every run",
        "",
        "| task | mode | lr | seed | dev metrics | best epoch | updates | trainable / total | wall (s) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (r["task"], r["mode"], r["lr"], r["seed"])):
        dev = ", ".join(f"{k} {_fmt(v)}" for k, v in row["dev"].items())
        params = (f"{row['trainable']:,} / {row['total']:,}" if row.get("trainable") else "–")
        lines.append(f"| {row['task']} | {row['mode']} | {row['lr']:g} | {row['seed']} | {dev} | "
                     f"{row['best_epoch']} | {row['updates']} | {params} | {row['wall_time_s']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_curves(rows: List[dict], specs: dict, path: Path) -> None:
    """Dev metric per epoch, one panel per task, one line per mode (its best lr, first seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    best = best_rows(rows)
    tasks = [t for t in specs if any(k[0] == t for k in best)]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        primary = specs[task].primary_metric
        for (t, mode), runs in sorted(best.items()):
            if t != task:
                continue
            run = min(runs, key=lambda r: r["seed"])
            epochs = sorted(int(e) for e in run["curve"])
            ax.plot(epochs, [run["curve"][str(e)].get(primary) for e in epochs], marker="o", label=f"{mode} (lr {run['lr']:g})")
        ax.set_title(task)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"dev {primary} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_results(output_dir: Path, new_rows: List[dict]) -> List[dict]:
    path = output_dir / "results.json"
    rows = {run_key(r): r for r in load_results(path)}
    rows.update({run_key(r): r for r in new_rows})
    rows = sorted(rows.values(), key=run_key)
    specs = {name: TASKS[name] for name in TASK_NAMES}
    write_text_atomically(path, json.dumps({"runs": rows}, indent=1) + "\n")
    write_text_atomically(output_dir / "results.md", results_markdown(rows, specs))
    plot_curves(rows, specs, output_dir / "curves.png")
    return rows


# -- the pipeline --------------------------------------------------------------------


def _folder_fingerprint(folder: Path) -> str:
    """Tells folders apart by where they are and what they hold (file names, sizes, times)."""
    listing = [str(folder.resolve())] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                                         for f in sorted(folder.iterdir()) if f.is_file()]
    return hashlib.sha256("\n".join(listing).encode()).hexdigest()[:12]


def resolve_model(model: Optional[str], output_dir: Path):
    """The model folder: the embedded default, a converted folder, or a Hugging Face folder to import."""
    if not model:
        return load_model_dir(default_model_dir())
    path = Path(model)
    if not path.is_dir():
        raise UserError(f"MODEL {model}: not a directory (a converted model folder or a Hugging Face folder)")
    if (path / "model.pt").exists():
        return load_model_dir(path)
    if (path / "config.json").exists():
        target = output_dir / "models" / f"{path.resolve().name}-{_folder_fingerprint(path)}"
        if not (target / "model.pt").exists():
            logger.info(f"importing the Hugging Face folder {path} into {target}")
            hf_import.convert(path, target)
        return load_model_dir(target)
    raise UserError(f"MODEL {model}: holds neither model.pt (fairseq) nor config.json (Hugging Face)")


def present_tasks(glue_dir: Path) -> List[str]:
    return [name for name in TASK_NAMES if (glue_dir / name / "train.tsv").is_file()]


class RecordEcho:
    """Echoes what a running train.py adds to its run record: its parameter counts, resumes,
    and the dev metrics of each validation."""

    SKIPPED = ("wps", "wpb", "bsz", "nll_loss")  # throughput and a duplicate of the loss

    def __init__(self, path: Path):
        self.path = path
        record = read_run_record(path) if path.exists() else {"launches": [], "stats": []}
        self.launches, self.stats = len(record["launches"]), len(record["stats"])  # what earlier launches left
        self.version = None

    def poll(self) -> List[str]:
        """The lines to show for what was added since the last poll."""
        try:
            stat = self.path.stat()
        except FileNotFoundError:
            return []
        version = (stat.st_ino, stat.st_mtime_ns, stat.st_size)  # every write replaces the file
        if version == self.version:
            return []
        self.version = version
        record = read_run_record(self.path)
        lines = []
        if len(record["launches"]) > self.launches and record.get("parameters"):
            resumed = record["launches"][-1]["resumed_from"]
            if resumed:
                lines.append(f"resuming the interrupted run from {resumed}")
            lines.append(format_trainable(record["parameters"]["trainable"], record["parameters"]["total"]))
            self.launches = len(record["launches"])
        for entry in record["stats"][self.stats:]:
            if entry["tag"] != "train":
                shown = ", ".join(f"{key} {value}" for key, value in entry["values"].items()
                                  if not key.endswith(self.SKIPPED))
                lines.append(f"epoch {entry['epoch']} {entry['tag']}: {shown}")
        self.stats = len(record["stats"])
        return lines


def run_training(command: List[str], run_dir: Path) -> None:
    """Run train.py, keep its whole log in the run folder's train.log, and echo epoch-level progress."""
    echo = RecordEcho(run_dir / RECORD_NAME)
    log_path = run_dir / "train.log"
    with open(log_path, "a") as log:
        # Unbuffered: progress shows as it happens, and the log is whole if the run dies.
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   bufsize=1, env=env)
        last_lines, user_error = [], None
        for line in process.stdout:
            log.write(line)
            log.flush()
            last_lines = (last_lines + [line])[-20:]
            if user_error is None:
                user_error = user_error_in(line, TRAIN_PROG)  # under torchrun a worker's exit 2 becomes exit 1
            for progress in echo.poll():
                print("    " + progress, flush=True)
        code = process.wait()
    for progress in echo.poll():
        print("    " + progress, flush=True)
    if code != 0 and user_error is not None:
        raise UserError(f"{TRAIN_PROG}: {user_error}")
    if code == 2:
        raise UserError(last_lines[-1].strip() if last_lines else f"train.py failed; see {log_path}")
    if code != 0:
        raise RuntimeError(f"train.py exited {code}; the end of {log_path}:\n{''.join(last_lines)}")


def train_timed(command: List[str], run_dir: Path) -> float:
    """run_training, and the seconds this run has trained over all its launches (resumes included)."""
    elapsed = run_dir / "elapsed.json"
    earlier = json.loads(elapsed.read_text())["seconds"] if elapsed.exists() else 0.0
    start = time.time()
    try:
        run_training(command, run_dir)
    finally:  # an interrupted launch counts too
        total = earlier + time.time() - start
        write_text_atomically(elapsed, json.dumps({"seconds": round(total, 1)}) + "\n")
    return total


def run_settings(train_args: List[str], prepared: Path, run_dir: Path, manifest: dict) -> dict:
    """What a run's result depends on: train.py's arguments (folders aside) and the prepared data."""
    folders = {str(prepared): "DATA", str(run_dir): "RUN_DIR"}
    return {"train_args": [folders.get(arg, arg) for arg in train_args],
            "data": manifest.get("cache_key") or manifest["splits"]}


def _options(train_args: List[str]) -> Dict[str, str]:
    """{--flag: its value(s), '' for a switch} of a train.py argument list (the last given wins)."""
    options, flag = {}, "DATA"
    for arg in train_args:
        if arg.startswith("--"):
            flag = arg.split("=", 1)[0]
            options[flag] = arg.split("=", 1)[1] if "=" in arg else ""
        else:
            options[flag] = f"{options.get(flag, '')} {arg}".strip()
    return options


def check_same_settings(run_dir: Path, settings: dict) -> None:
    """Refuse to reuse or resume a run folder that was trained with other settings."""
    recorded = run_dir / "settings.json"
    if not recorded.exists():
        return  # a new run, or one from before settings were recorded
    before = json.loads(recorded.read_text())
    if before == settings:
        return
    if before["data"] != settings["data"]:
        change = "the training data (GLUE files, TRAIN_SUBSET or the model's tokenizer)"
    else:
        old, new = _options(before["train_args"]), _options(settings["train_args"])
        changed = [f"{flag} {old.get(flag, '(unset)')} -> {new.get(flag, '(unset)')}"
                   for flag in list(new) + [f for f in old if f not in new] if old.get(flag) != new.get(flag)]
        change = "train.py arguments (" + ", ".join(changed[:4]) + ")"
    raise UserError(f"{run_dir} was trained with other settings: {change} changed; "
                    "use another OUTPUT_DIR, or delete that run folder to train it again")


@dataclass
class PlannedRun:
    spec: object
    lr: float
    seed: int
    prepared: Path
    run_dir: Path
    train_args: List[str]
    settings: dict
    train_rows: int
    base_checkpoint: str


def plan_run(spec, model, prepared: Path, manifest: dict, run_dir: Path, args, lr: float, seed: int,
             passthrough: List[str]) -> PlannedRun:
    """One run's train.py arguments, checked against what its folder was trained with before."""
    train_rows = manifest["splits"]["train"]["rows_written"]
    train_args = train_command(spec, model, prepared, run_dir, args.mode, args.bitfit_terms, lr, seed, train_rows,
                               args.nproc * args.nnodes, passthrough, args.epochs, args.max_seq_len)
    settings = run_settings(train_args, prepared, run_dir, manifest)
    check_same_settings(run_dir, settings)
    return PlannedRun(spec, lr, seed, prepared, run_dir, train_args, settings, train_rows, str(model.checkpoint))


def one_run(run: PlannedRun, args) -> dict:
    spec, run_dir = run.spec, run.run_dir
    label = f"{spec.name} {args.mode} lr {run.lr:g} seed {run.seed}"
    done = run_dir / "result.json"
    if done.exists():
        print(f"  {label}: done earlier ({done})", flush=True)
        return json.loads(done.read_text())
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.node_rank == 0:
        write_text_atomically(run_dir / "settings.json", json.dumps(run.settings, indent=1) + "\n")
    command = launcher(args.nproc, args.nnodes, args.node_rank, args.master_addr, args.master_port) + run.train_args
    print(f"  {label}: training ({run_dir})", flush=True)
    wall = train_timed(command, run_dir)
    row = {"task": spec.name, "mode": mode_label(args.mode, args.bitfit_terms), "lr": run.lr, "seed": run.seed,
           "primary_metric": spec.primary_metric, "wall_time_s": round(wall, 1), "train_rows": run.train_rows,
           "run_dir": str(run_dir)}
    if args.node_rank != 0:
        return row  # the job's first worker, on node 0, keeps the run record and the results
    parsed = run_summary(read_run_record(run_dir / RECORD_NAME), spec)
    best = best_epoch(parsed["epochs"], spec.primary_metric)
    row.update(dev=parsed["epochs"].get(best, {}), best_epoch=best,
               curve={str(e): v for e, v in sorted(parsed["epochs"].items())},
               trainable=parsed["trainable"], total=parsed["total"], updates=parsed["updates"],
               predictions=predict_test_sets(spec, run.prepared, run_dir, run.base_checkpoint))
    write_text_atomically(done, json.dumps(row, indent=1) + "\n")
    return row


def predict_test_sets(spec, prepared: Path, run_dir: Path, base_checkpoint: str) -> Dict[str, str]:
    """GLUE leaderboard files for the task's test splits, from the best checkpoint (or, with
    --bitfit-delta-only, from the best delta merged into the base model for the time it takes)."""
    splits = [s for s in spec.test_splits if (prepared / "input0" / f"{s.name}.idx").exists()]
    checkpoint, best_delta = run_dir / "checkpoint_best.pt", run_dir / "checkpoint_best.delta.safetensors"
    if not splits or not (checkpoint.exists() or best_delta.exists()):
        return {}
    with tempfile.TemporaryDirectory(dir=run_dir) as scratch:
        if not checkpoint.exists():
            checkpoint = apply_delta(base_checkpoint, best_delta, Path(scratch) / "checkpoint_best.pt")
        written = {}
        for split in splits:
            indices = read_test_indices(prepared, split.name)
            predictions = predict_prepared_split(checkpoint, prepared, split.name)
            path = write_leaderboard_tsv(spec, indices, predictions, run_dir / split.leaderboard_file)
            written[split.name] = str(path)
    return written


def collect_predictions(output_dir: Path, rows: List[dict]) -> None:
    """OUTPUT_DIR/predictions/<mode>/: each task's leaderboard files from its best run."""
    for (task, mode), runs in best_rows(rows).items():
        best = max(runs, key=lambda r: r["dev"].get(r["primary_metric"], float("-inf")))
        for path in (best.get("predictions") or {}).values():
            if Path(path).exists():
                target = output_dir / "predictions" / mode / Path(path).name
                target.parent.mkdir(parents=True, exist_ok=True)
                write_atomically(target, lambda tmp, source=path: shutil.copyfile(source, tmp))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="glue_bitfit", description="Fine-tune on GLUE with BitFit, full fine-tuning or head-only.")
    parser.add_argument("--glue-dir", default="glue_data", help="GLUE's glue_data folder (default: ./glue_data)")
    parser.add_argument("--tasks", default="", help="space-separated tasks (default: every task present)")
    parser.add_argument("--mode", default="bitfit", choices=MODES)
    parser.add_argument("--bitfit-terms", default="ofa", help="--bitfit-terms of train.py (MODE=bitfit)")
    parser.add_argument("--model", default="", help="model folder (default: the embedded all-MiniLM-L6-v2)")
    parser.add_argument("--output-dir", default="outputs/glue")
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--lrs", default="", help="space-separated learning rates: each is trained, the best on dev reported")
    parser.add_argument("--epochs", type=int, default=None, help="max epochs (default: by mode and task size)")
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--train-subset", type=int, default=None, help="train on a seeded random sample of N training rows")
    parser.add_argument("--nproc", type=int, default=1, help="processes per node (torchrun when > 1)")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--master-addr", default="127.0.0.1")
    parser.add_argument("--master-port", type=int, default=29500)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    return parser


def _numbers(text: str, kind, flag: str) -> list:
    try:
        return [kind(v) for v in text.split()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected space-separated numbers") from None


def _check_settings(args, passthrough: List[str]) -> None:
    """Numbers the run script's users set, checked before anything runs."""
    for value, name in ((args.nproc, "NPROC"), (args.nnodes, "NNODES"), (args.epochs, "EPOCHS"),
                        (args.max_seq_len, "MAX_SEQ_LEN"), (args.train_subset, "TRAIN_SUBSET")):
        if value is not None and value < 1:
            raise UserError(f"{name} {value}: expected a positive integer")
    for flags in (("--max-update",), ("--max-epoch",), ("--batch-size", "--max-sentences"), ("--update-freq",)):
        _passthrough_ints(passthrough, *flags)


@exit_on_user_error
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    args = build_parser().parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", force=True)
    for noisy in ("fairseq", "matplotlib"):  # train.py keeps fairseq's full log in each run's train.log
        logging.getLogger(noisy).setLevel(logging.WARNING)

    try:
        glue_dir = check_glue_dir(args.glue_dir)
    except UserError as error:  # name the variable the run script's users set
        raise UserError(str(error).replace("--glue-dir", "GLUE_DIR")) from None
    tasks = args.tasks.split() or present_tasks(glue_dir)
    if not tasks:
        raise UserError(f"GLUE_DIR {glue_dir}: no task folder with a train.tsv; expected "
                        f"{glue_dir}/<TASK>/{{train,dev,test}}.tsv. {GLUE_SOURCE_HINT}")
    specs = [get_task_spec(task) for task in tasks]
    seeds = _numbers(args.seeds, int, "SEEDS")
    lrs = _numbers(args.lrs, float, "LRS")
    _check_settings(args, passthrough)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    model = resolve_model(args.model, output_dir)
    print(f"GLUE {args.mode}: tasks {' '.join(s.name for s in specs)}; model {model.path} ({model.arch})", flush=True)

    # Every task's files are read and checked before the first run trains.
    data_dirs = {spec.name: output_dir / "data" / spec.name for spec in specs}
    manifests = {spec.name: prepare_task(spec, glue_dir, model, model.dictionary, data_dirs[spec.name],
                                                   args.workers, train_subset=args.train_subset)
                 for spec in specs}
    runs = [plan_run(spec, model, data_dirs[spec.name], manifests[spec.name],
                     output_dir / "runs" / spec.name / mode_label(args.mode, args.bitfit_terms) / f"lr{lr:g}-seed{seed}",
                     args, lr, seed, passthrough)
            for spec in specs for lr in lrs or default_lrs(args.mode, spec.name) for seed in seeds]
    rows = [one_run(run, args) for run in runs]
    if args.node_rank != 0:
        return
    all_rows = write_results(output_dir, rows)
    collect_predictions(output_dir, all_rows)
    print(f"\n{(output_dir / 'results.md').read_text().split('## Every run')[0].strip()}\n", flush=True)
    print(f"results: {output_dir / 'results.json'}, {output_dir / 'results.md'}, {output_dir / 'curves.png'}")


if __name__ == "__main__":
    main()
