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
Runs are trained one after another, up to ``--parallel`` at once, or each as a
submitit job (``--launcher``; see ``Dispatch``): the results are the same.
"""
import argparse
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import math
import os
import queue
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..core import interrupts
from ..core.bitfit import SelectionError, format_trainable, parse_terms
from ..core.errors import UserError, exit_on_user_error, one_line, user_error_in
from ..core.files import write_atomically, write_text_atomically
from ..core.glue_files import check_glue_dir, read_split, write_leaderboard_tsv
from ..core.glue_tasks import GLUE_SOURCE_HINT, TASK_NAMES, TASKS, get_task_spec
from ..core.progress import DEFAULT_INTERVAL_S, ConsoleProgress, format_duration
from ..core.run_record import RECORD_NAME, epoch_stats, read_run_record
from ..plugin.analysis import delta_bias_change, write_bias_change
from ..plugin.checkpoints import checkpoint_parameter_count, load_checkpoint_file
from ..plugin.data.glue_prepare import prepare_task, read_test_indices
from ..plugin.deltas import apply_delta
from ..plugin.models import hf_import
from ..plugin.models.model_dir import load_model_dir
from ..plugin.models.pretrained import default_model_dir
from ..plugin.predictor import predict_prepared_split
from ..training.glue_recipe import (Recipe, check_passthrough, default_recipe, schedule_updates, train_command,
                                    without_bookkeeping)
from ..training.options import BITFIT_PREFIX, TRAIN_COMMAND, TRAIN_MODULE, TRAIN_PROG, mode_flags, mode_label

logger = logging.getLogger("fairseq_ext.experiments.glue_run")  # also when run as __main__


DEFAULT_SAVE_MINUTES = 5.0


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
    """What tells runs apart: a training-size curve's runs (TRAIN_SUBSETS) are keyed by their size too."""
    curve_size = row.get("train_subset") if row.get("size_curve") else None
    return (row["task"], row["mode"], curve_size or 0, row["lr"], row["seed"])


def main_rows(rows: List[dict]) -> List[dict]:
    return [row for row in rows if not row.get("size_curve")]


def curve_rows(rows: List[dict]) -> List[dict]:
    return [row for row in rows if row.get("size_curve")]


def load_results(path: Path) -> List[dict]:
    if not path.exists():
        return []
    try:
        return json.loads(path.read_text())["runs"]
    except (ValueError, KeyError) as error:
        raise UserError(f"{path}: not a results file of this tool ({error})") from None


def best_rows(rows: List[dict], by_size: bool = False) -> Dict[tuple, List[dict]]:
    """Per (task, mode), or (task, mode, training rows): the runs of the learning rate with the best mean dev score."""
    by_config: Dict[tuple, Dict[float, List[dict]]] = {}
    for row in rows:
        key = (row["task"], row["mode"], row["train_rows"]) if by_size else (row["task"], row["mode"])
        by_config.setdefault(key, {}).setdefault(row["lr"], []).append(row)
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


def _spread(values) -> Tuple[Optional[float], Optional[float]]:
    """(mean, sample standard deviation) of the values present; the deviation needs two."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _fmt(value, digits=1):
    return "–" if value is None else f"{value:.{digits}f}"


def _fmt_spread(mean, std, digits=1):
    return _fmt(mean, digits) if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


MODE_ORDER = ("full", "bitfit-ofa", "bitfit-all", "bitfit-q,m2", "rand_uniform", "rand_row_col")


def _mode_order(mode: str):
    return (MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER), mode == "head", mode)


HOW_CHOSEN = ("For each task and mode, every learning rate in the mode's defaults (or LRS) is trained with every "
              "seed; the learning rate with the best mean dev score (the task's primary metric) over the seeds is "
              "reported. A run's score is its best epoch's, the epoch whose checkpoint_best.pt it keeps. Cells are "
              "the mean ± sample standard deviation over seeds; nothing is tuned per seed.")


def results_markdown(rows: List[dict], specs: dict) -> str:
    best = best_rows(main_rows(rows))
    tasks = [t for t in specs if any(k[0] == t for k in best)]
    modes = sorted({k[1] for k in best}, key=_mode_order)
    header_metrics = {t: specs[t].metrics + (("accuracy_mm",) if t == "MNLI" else ()) for t in tasks}
    seeds = sorted({r["seed"] for r in rows})
    lines = [
        "# GLUE dev results",
        "",
        f"{HOW_CHOSEN} Metrics in %; seeds: {', '.join(map(str, seeds))}. `mean` averages each task's GLUE "
        "score (the mean of its official metrics), per seed, over the tasks.",
    ]
    if tasks:  # a job of training-size curves alone has no full-data table
        lines += ["", "| mode | trainable % | " + " | ".join(f"{t} ({'/'.join(header_metrics[t])})" for t in tasks)
                  + " | mean |", "|---|---|" + "---|" * len(tasks) + "---|"]
    for mode in modes:
        cells, fractions, scores_by_seed = [], [], {}
        for task in tasks:
            runs = best.get((task, mode))
            if not runs:
                cells.append("–")
                continue
            cells.append("/".join(_fmt_spread(*_spread([r["dev"].get(m) for r in runs])) for m in header_metrics[task]))
            for r in runs:
                scores_by_seed.setdefault(r["seed"], {})[task] = r["dev"].get("glue_score")
            fractions += [100.0 * r["trainable"] / r["total"] for r in runs if r.get("trainable") and r.get("total")]
        complete = [_mean(by_task.values()) for by_task in scores_by_seed.values() if len(by_task) == len(tasks)]
        mean = _fmt_spread(*_spread(complete)) if complete and len(cells) == len(tasks) and "–" not in cells else "–"
        lines.append(f"| {mode} | {_fmt(_mean(fractions), 3)} | " + " | ".join(cells) + f" | {mean} |")
    recipes = {}
    chosen = {**{key[:2]: runs for key, runs in best_rows(curve_rows(rows), by_size=True).items()}, **best}
    for (task, mode), runs in sorted(chosen.items(), key=lambda item: (_mode_order(item[0][1]), item[0][0])):
        rule = (runs[0].get("recipe") or {}).get("rule")
        if rule:
            recipes.setdefault(mode, {}).setdefault(rule, []).append(task)
    if recipes:
        lines += ["", "## Defaults", ""]
        for mode, rules in recipes.items():
            for rule, rule_tasks in rules.items():
                lines.append(f"- {mode} ({', '.join(rule_tasks)}): {rule}")
    curves = best_rows(curve_rows(rows), by_size=True)
    if curves:
        lines += ["", "## Training-size curves", "",
                  "Dev score (the task's primary metric, mean ± std over seeds, best learning rate per size) by "
                  "the number of training rows (TRAIN_SUBSETS); size_curves.png plots it.", "",
                  "| task | mode | " + " | ".join(f"{n:,} rows" for n in sorted({k[2] for k in curves})) + " |",
                  "|---|---|" + "---:|" * len({k[2] for k in curves})]
        sizes = sorted({k[2] for k in curves})
        for task, mode in sorted({k[:2] for k in curves}, key=lambda tm: (tm[0], _mode_order(tm[1]))):
            cells = []
            for size in sizes:
                runs = curves.get((task, mode, size))
                cells.append(_fmt_spread(*_spread([r["dev"].get(r["primary_metric"]) for r in runs])) if runs else "–")
            lines.append(f"| {task} | {mode} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "## Every run",
        "",
        "| task | mode | training rows | lr | seed | dev metrics | best epoch | updates | trainable / total | wall (s) |",
        "|---|---|---:|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (r["task"], _mode_order(r["mode"]), r["train_rows"], r["lr"], r["seed"])):
        dev = ", ".join(f"{k} {_fmt(v)}" for k, v in row["dev"].items())
        params = (f"{row['trainable']:,} / {row['total']:,}" if row.get("trainable") else "–")
        lines.append(f"| {row['task']} | {row['mode']} | {row['train_rows']:,} | {row['lr']:g} | {row['seed']} | "
                     f"{dev} | {row['best_epoch']} | {row['updates']} | {params} | {row['wall_time_s']:.0f} |")
    return "\n".join(lines) + "\n"


def plot_curves(rows: List[dict], specs: dict, path: Path) -> None:
    """Dev metric per epoch, one panel per task, one line per mode (its best lr): the mean over
    seeds, with a band of one standard deviation where there are several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    best = best_rows(main_rows(rows))
    tasks = [t for t in specs if any(k[0] == t for k in best)]
    if not tasks:
        return
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        primary = specs[task].primary_metric
        for (t, mode), runs in sorted(best.items(), key=lambda item: _mode_order(item[0][1])):
            if t != task:
                continue
            epochs = sorted({int(e) for run in runs for e in run["curve"]})
            spreads = [_spread([run["curve"].get(str(e), {}).get(primary) for run in runs]) for e in epochs]
            means = [m for m, _ in spreads]
            line, = ax.plot(epochs, means, marker="o", markersize=3,
                            label=f"{mode} (lr {runs[0]['lr']:g}, {len(runs)} seed{'s' if len(runs) > 1 else ''})")
            if len(runs) > 1:
                low = [m - (sd or 0.0) for m, sd in spreads]
                high = [m + (sd or 0.0) for m, sd in spreads]
                ax.fill_between(epochs, low, high, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_title(task)
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_xlabel("epoch")
        ax.set_ylabel(f"dev {primary} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def plot_size_curves(rows: List[dict], specs: dict, path: Path) -> None:
    """Dev metric against training rows (log scale), one panel per task, one line per mode: the
    mean over seeds with a one-std band."""
    best = best_rows(curve_rows(rows), by_size=True)
    tasks = [t for t in specs if any(k[0] == t for k in best)]
    if not tasks:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        primary = specs[task].primary_metric
        for mode in sorted({k[1] for k in best if k[0] == task}, key=_mode_order):
            sizes = sorted(k[2] for k in best if k[:2] == (task, mode))
            spreads = [_spread([r["dev"].get(primary) for r in best[(task, mode, size)]]) for size in sizes]
            line, = ax.plot(sizes, [m for m, _ in spreads], marker="o", markersize=3, label=mode)
            if any(sd is not None for _, sd in spreads):
                ax.fill_between(sizes, [m - (sd or 0.0) for m, sd in spreads], [m + (sd or 0.0) for m, sd in spreads],
                                color=line.get_color(), alpha=0.2, linewidth=0)
        ax.set_xscale("log")
        ax.set_title(task)
        ax.set_xlabel("training rows")
        ax.set_ylabel(f"dev {primary} (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def write_results(output_dir: Path, new_rows: List[dict]) -> List[dict]:
    path = output_dir / "results.json"
    rows = {run_key(r): r for r in load_results(path)}
    rows.update({run_key(r): r for r in new_rows})
    rows = sorted(rows.values(), key=run_key)
    specs = {name: TASKS[name] for name in TASK_NAMES}
    write_text_atomically(path, json.dumps({"how_chosen": HOW_CHOSEN, "runs": rows}, indent=1) + "\n")
    write_text_atomically(output_dir / "results.md", results_markdown(rows, specs))
    plot_curves(rows, specs, output_dir / "curves.png")
    plot_size_curves(rows, specs, output_dir / "size_curves.png")
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
    and the dev metrics of each validation; ``progress`` is the record's latest live progress."""

    SKIPPED = ("wps", "wpb", "bsz", "nll_loss")  # throughput and a duplicate of the loss

    def __init__(self, path: Path):
        self.path = path
        record = read_run_record(path) if path.exists() else {"launches": [], "stats": []}
        self.launches, self.stats = len(record["launches"]), len(record["stats"])  # what earlier launches left
        self.version = None
        self.progress: Optional[dict] = None

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
        if len(record["launches"]) == self.launches:
            self.progress = record.get("progress")  # this launch's, once it has begun
        for entry in record["stats"][self.stats:]:
            if entry["tag"] != "train":
                shown = ", ".join(f"{key} {value}" for key, value in entry["values"].items()
                                  if not key.endswith(self.SKIPPED))
                lines.append(f"epoch {entry['epoch']} {entry['tag']}: {shown}")
        self.stats = len(record["stats"])
        return lines


class JobProgress:
    """The job's plan, and an ETA for what is left of it from the speed its runs show.

    A task's speed is the wall time per update of its runs in this job (validation,
    start-up and test prediction included); a task not run yet is assumed as fast as
    the one running.  With runs trained at once (``concurrency`` > 1) every running run
    reports its own progress, and the work left is shared by as many runs as may train at once.
    """

    FIRST_ESTIMATE_AFTER_S = 20.0

    def __init__(self, runs: List["PlannedRun"], interval_s: float, concurrency: int = 1):
        self.runs, self.interval_s, self.concurrency = runs, interval_s, concurrency
        self.updates_left = {run.run_dir: 0 if run.finished else run.planned_updates for run in runs}
        self.seconds_per_update: Dict[str, float] = {}
        self.estimated = False
        self._lock = threading.Lock()  # runs trained at once report from their own threads

    @property
    def bar(self) -> Optional[bool]:
        """ConsoleProgress's ``bar``: a terminal bar for one run at a time; plain lines for several."""
        return None if self.concurrency == 1 else False

    def echo_line(self, run: "PlannedRun", line: str) -> str:
        """A line from a run's record as shown: indented under its run, or, with runs at once, labelled."""
        return "    " + line if self.concurrency == 1 else f"  {run.label}: {line}"

    def plan_lines(self) -> List[str]:
        todo = [run for run in self.runs if not run.finished]
        lines = [f"plan: {len(self.runs)} run{'s' if len(self.runs) != 1 else ''} "
                 f"({len(self.runs) - len(todo)} done earlier), "
                 f"{sum(self.updates_left.values()):,} updates to train (runs with --patience may stop sooner)"]
        for run in self.runs:
            rows = f"{run.train_rows:,} rows"
            what = "done earlier" if run.finished else f"{run.planned_updates:,} updates"
            lines.append(f"  {run.label:<40} {rows:>12}  {what}")
        return lines

    def observe(self, run: "PlannedRun", progress: dict, seconds: float, updates_at_start: int) -> Optional[float]:
        """Take the running ``run``'s latest progress; the job's ETA in seconds (None: not known yet)."""
        done = int(progress.get("updates") or 0)
        total = progress.get("total_updates") or run.planned_updates
        trained = done - updates_at_start
        with self._lock:
            self.updates_left[run.run_dir] = max(0, total - done)
            if trained <= 0 or seconds <= 0:
                return None
            self.seconds_per_update[run.spec.name] = seconds / trained
            eta = self.eta(run.spec.name)
            first_estimate = not self.estimated and seconds >= self.FIRST_ESTIMATE_AFTER_S
            self.estimated = self.estimated or first_estimate
        if first_estimate:
            say(f"  estimate: {format_duration(eta)} for the whole job ({trained / seconds:.2f} updates/s on "
                f"{run.spec.name} so far; other tasks' speed is measured when they run)")
        return eta

    def finished(self, run: "PlannedRun", updates: int, seconds: float) -> None:
        with self._lock:
            self.updates_left[run.run_dir] = 0
            if updates > 0 and seconds > 0:
                self.seconds_per_update[run.spec.name] = seconds / updates

    def eta(self, running_task: str) -> Optional[float]:
        fallback = self.seconds_per_update.get(running_task)
        if fallback is None:
            return None
        left = [(run, self.updates_left[run.run_dir]) for run in self.runs if self.updates_left[run.run_dir]]
        seconds = sum(updates * self.seconds_per_update.get(run.spec.name, fallback) for run, updates in left)
        return seconds / max(1, min(self.concurrency, len(left)))


def say(line: str) -> None:
    """One line on stdout in one write: runs trained at once print from several threads."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class TrainLog:
    """Copies a train.py process's output into its train.log as it comes, keeping the last lines
    and its first one-line error (a thread: the runner polls the run record meanwhile)."""

    def __init__(self, stream, log_path: Path):
        self.last_lines: List[str] = []
        self.user_error: Optional[str] = None
        self._thread = threading.Thread(target=self._copy, args=(stream, log_path), daemon=True)
        self._thread.start()

    def _copy(self, stream, log_path: Path) -> None:
        with open(log_path, "a") as log:
            for line in stream:
                log.write(line)
                log.flush()
                self.last_lines = (self.last_lines + [line])[-20:]
                if self.user_error is None:
                    self.user_error = user_error_in(line, TRAIN_PROG)  # under torchrun a worker's exit 2 becomes 1

    def join(self, timeout_s: float = 30.0) -> None:
        self._thread.join(timeout_s)


POLL_S = 0.5
CHILD_STOP_TIMEOUT_S = 120.0


@dataclass
class TrainingOutcome:
    """How a train.py launch ended: its exit status, its first one-line error, its last lines, its seconds."""
    code: int
    user_error: Optional[str]
    last_lines: List[str]
    seconds: float


class LocalTraining:
    """train.py as a child process, its output copied into the run's train.log; ``env`` adds to this
    process's environment (a GPU, a thread count)."""

    def __init__(self, command: List[str], log_path: Path, env: Optional[Dict[str, str]] = None):
        # Unbuffered: the log is whole if the run dies.
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        bufsize=1, env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
        self.log = TrainLog(self.process.stdout, log_path)
        self.start = time.monotonic()

    def done(self) -> bool:
        return self.process.poll() is not None

    def stop(self, signum: int) -> None:
        _stop_child(self.process, signum)

    def outcome(self) -> TrainingOutcome:
        code = self.process.wait()
        self.log.join()
        return TrainingOutcome(code, self.log.user_error, self.log.last_lines, time.monotonic() - self.start)


def train_in_job(command: List[str], log_path: str, env: Dict[str, str]) -> TrainingOutcome:
    """What a submitit job runs: train.py as on this machine; a stop the job gets (scancel, SLURM's time
    limit, submitit's local cancel) is passed on to train.py, which saves and ends."""
    training = LocalTraining(command, Path(log_path), env)
    with interrupts.handled():
        try:
            while not training.done():
                time.sleep(POLL_S)
        except interrupts.Interrupted as stop:
            training.stop(stop.signum)
    return training.outcome()


class SubmititTraining:
    """train.py in a job submitted through submitit (SLURM, or submitit's local executor)."""

    _submitting = threading.Lock()  # one submission at a time: runs are submitted from several threads

    def __init__(self, executor, command: List[str], log_path: Path, env: Optional[Dict[str, str]] = None):
        with self._submitting:
            self.job = executor.submit(train_in_job, command, str(log_path), dict(env or {}))
        self.log_path = log_path

    def done(self) -> bool:
        return self.job.done()

    def stop(self, signum: int) -> None:
        self.job.cancel(check=False)
        deadline = time.monotonic() + CHILD_STOP_TIMEOUT_S
        while not self.job.done() and time.monotonic() < deadline:
            time.sleep(POLL_S)

    def outcome(self) -> TrainingOutcome:
        try:
            return self.job.result()
        except Exception as error:  # the job itself failed: killed, out of memory, out of time
            raise RuntimeError(f"submitit job {self.job.job_id} ended without a result ({one_line(error)}); "
                               f"its logs: {self.job.paths.stdout}, {self.job.paths.stderr}; train.py's: "
                               f"{self.log_path}") from None


StartTraining = Callable[[List[str], Path], "LocalTraining | SubmititTraining"]


def run_training(command: List[str], run: "PlannedRun", job: JobProgress, stage: "JobStage",
                 start: StartTraining = LocalTraining) -> float:
    """Run train.py (``start`` launches it); keep its whole log in the run folder's train.log; show its
    progress, the job's ETA and each validation's dev metrics; pass a stop signal on and wait for it to
    save and end.  The seconds train.py ran."""
    echo = RecordEcho(run.run_dir / RECORD_NAME)
    log_path = run.run_dir / "train.log"
    training = start(command, log_path)
    display = ConsoleProgress(run.label, run.planned_updates, interval_s=job.interval_s, bar=job.bar)
    start_time, updates_at_start = time.monotonic(), None
    try:
        while True:
            finished = training.done()
            for line in echo.poll():
                display.write(job.echo_line(run, line))
            progress = echo.progress
            if progress and progress.get("updates") is not None:
                if updates_at_start is None:
                    updates_at_start = int(progress["updates"])
                    display.total = progress.get("total_updates") or run.planned_updates
                job_eta = job.observe(run, progress, time.monotonic() - start_time, updates_at_start)
                display.update(int(progress["updates"]), rate=progress.get("updates_per_s"),
                               detail=_progress_detail(progress, job_eta))
            if finished:
                break
            stage.check_stop()
            time.sleep(POLL_S)
    except interrupts.Interrupted as stop:
        display.close(final_line=False)
        training.stop(stop.signum)
        raise
    finally:
        display.close()
    outcome = training.outcome()
    code = outcome.code
    if code in (128 + signal.SIGINT, 128 + signal.SIGTERM, -signal.SIGINT, -signal.SIGTERM):
        raise interrupts.Interrupted(abs(code) - 128 if code > 0 else -code)  # train.py alone was stopped
    if code != 0 and outcome.user_error is not None:
        raise UserError(f"{TRAIN_PROG}: {outcome.user_error}")
    if code == 2:
        raise UserError(outcome.last_lines[-1].strip() if outcome.last_lines else f"train.py failed; see {log_path}")
    if code != 0:
        raise RuntimeError(f"train.py exited {code}; the end of {log_path}:\n{''.join(outcome.last_lines)}")
    return outcome.seconds


def _progress_detail(progress: dict, job_eta: Optional[float]) -> str:
    parts = []
    if progress.get("epoch") is not None:
        parts.append(f"epoch {progress['epoch']}" + (f"/{progress['max_epoch']}" if progress.get("max_epoch") else ""))
    if progress.get("loss") is not None:
        parts.append(f"loss {progress['loss']:.3f}")
    parts.append(f"job ETA {format_duration(job_eta)}")
    return ", ".join(parts)


def _stop_child(process: subprocess.Popen, signum: int) -> None:
    """Pass the stop on to train.py (it may have had it from the terminal too: it ignores a repeat) and wait
    while it finishes writing its checkpoint and its record; kill it only if it does not end."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            process.send_signal(signum)
        try:
            process.wait(CHILD_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def train_timed(command: List[str], run: "PlannedRun", job: JobProgress, stage: "JobStage",
                start: StartTraining = LocalTraining) -> float:
    """run_training, and the seconds this run has trained over all its launches (resumes included)."""
    elapsed = run.run_dir / "elapsed.json"
    earlier = json.loads(elapsed.read_text())["seconds"] if elapsed.exists() else 0.0
    start_time, trained = time.time(), None
    try:
        trained = run_training(command, run, job, stage, start)
    finally:  # an interrupted launch counts too; a queued SLURM job's wait does not, once its time is known
        total = earlier + (trained if trained is not None else time.time() - start_time)
        write_text_atomically(elapsed, json.dumps({"seconds": round(total, 1)}) + "\n")
    return total


def run_settings(train_args: List[str], prepared: Path, run_dir: Path, manifest: dict) -> dict:
    """What a run's result depends on: train.py's arguments (folders and bookkeeping aside) and the prepared data."""
    folders = {str(prepared): "DATA", str(run_dir): "RUN_DIR"}
    return {"train_args": [folders.get(arg, arg) for arg in without_bookkeeping(train_args)],
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
    before["train_args"] = without_bookkeeping(before["train_args"])  # folders written before they were left out
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
    mode: str  # full, head or bitfit-<terms>
    lr: float
    seed: int
    prepared: Path
    run_dir: Path
    train_args: List[str]
    settings: dict
    train_rows: int
    planned_updates: int
    base_checkpoint: str
    recipe: Recipe
    train_subset: Optional[int] = None  # TRAIN_SUBSET or the TRAIN_SUBSETS size; None: every row
    curve: bool = False  # one size of a TRAIN_SUBSETS training-size curve

    @property
    def label(self) -> str:
        rows = f" {self.train_rows:,} rows" if self.curve else ""
        return f"{self.spec.name}{rows} {self.mode} lr {self.lr:g} seed {self.seed}"

    @property
    def result_file(self) -> Path:
        return self.run_dir / "result.json"

    @property
    def finished(self) -> bool:
        return self.result_file.exists()


def plan_run(spec, model, prepared: Path, manifest: dict, run_dir: Path, args, mode: str, recipe: Recipe, lr: float,
             seed: int, passthrough: List[str], bookkeeping: Sequence[str], train_subset: Optional[int] = None,
             curve: bool = False) -> PlannedRun:
    """One run's train.py arguments, checked against what its folder was trained with before."""
    train_rows = manifest["splits"]["train"]["rows_written"]
    world_size = args.nproc * args.nnodes
    train_args = train_command(spec, model, prepared, run_dir, mode, recipe, lr, seed, train_rows, world_size,
                               passthrough, args.max_seq_len, bookkeeping)
    planned = schedule_updates(passthrough, recipe.batch, recipe.epochs, train_rows, world_size)
    settings = run_settings(train_args, prepared, run_dir, manifest)
    check_same_settings(run_dir, settings)
    return PlannedRun(spec, mode, lr, seed, prepared, run_dir, train_args, settings, train_rows, planned,
                      str(model.checkpoint), recipe, train_subset, curve)


def one_run(run: PlannedRun, args, job: JobProgress, stage: "JobStage", start: StartTraining = LocalTraining) -> dict:
    if run.finished:
        say(f"  {run.label}: done earlier ({run.result_file})")
        return json.loads(run.result_file.read_text())
    with stage.running(run):
        return _train_and_read(run, args, job, stage, start)


def _train_and_read(run: PlannedRun, args, job: JobProgress, stage: "JobStage", start: StartTraining) -> dict:
    spec, run_dir = run.spec, run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.node_rank == 0:
        write_text_atomically(run_dir / "settings.json", json.dumps(run.settings, indent=1) + "\n")
    command = launcher(args.nproc, args.nnodes, args.node_rank, args.master_addr, args.master_port) + run.train_args
    say(f"  {run.label}: training ({run_dir}; log: {run_dir / 'train.log'})")
    wall = train_timed(command, run, job, stage, start)
    row = {"task": spec.name, "mode": run.mode, "lr": run.lr, "seed": run.seed,
           "primary_metric": spec.primary_metric, "wall_time_s": round(wall, 1), "train_rows": run.train_rows,
           "run_dir": str(run_dir), "recipe": run.recipe.describe(), "train_subset": run.train_subset,
           "size_curve": run.curve}
    if args.node_rank != 0:
        job.finished(run, run.planned_updates, wall)
        return row  # the job's first worker, on node 0, keeps the run record and the results
    parsed = run_summary(read_run_record(run_dir / RECORD_NAME), spec)
    best = best_epoch(parsed["epochs"], spec.primary_metric)
    row.update(dev=parsed["epochs"].get(best, {}), best_epoch=best,
               curve={str(e): v for e, v in sorted(parsed["epochs"].items())},
               trainable=parsed["trainable"], total=parsed["total"], updates=parsed["updates"],
               predictions=predict_test_sets(spec, run.prepared, run_dir, run.base_checkpoint, run.label,
                                             job.interval_s, job.bar, stage.check_stop))
    write_text_atomically(run.result_file, json.dumps(row, indent=1) + "\n")
    job.finished(run, parsed["updates"], wall)
    return row


def predict_test_sets(spec, prepared: Path, run_dir: Path, base_checkpoint: str, label: str = "",
                      interval_s: float = DEFAULT_INTERVAL_S, bar: Optional[bool] = None,
                      check_stop: Callable[[], None] = lambda: None) -> Dict[str, str]:
    """GLUE leaderboard files for the task's test splits, from the best checkpoint (or, with
    --bitfit-delta-only, from the best delta merged into the base model for the time it takes);
    ``check_stop`` is called after each batch (a run's thread ends there when the job stops)."""
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
            display = ConsoleProgress(f"{label}: predicting {split.name}", len(indices), unit="examples",
                                      interval_s=interval_s, bar=bar)

            def progress(done, total):
                display.update(done)
                check_stop()

            try:
                predictions = predict_prepared_split(checkpoint, prepared, split.name, progress=progress)
            finally:
                display.close()
            path = write_leaderboard_tsv(spec, indices, predictions, run_dir / split.leaderboard_file)
            written[split.name] = str(path)
    return written


def write_bias_change_of_best_runs(output_dir: Path, rows: List[dict], base_checkpoint: str) -> Optional[Path]:
    """OUTPUT_DIR/bias_change/: how far each bias term moved in each task's best BitFit run (a panel per task)."""
    best: Dict[str, dict] = {}
    for (task, mode), runs in best_rows(main_rows(rows)).items():
        if not mode.startswith(BITFIT_PREFIX):
            continue
        run = max(runs, key=lambda r: r["dev"].get(r["primary_metric"], float("-inf")))
        if task not in best or run["dev"].get(run["primary_metric"], float("-inf")) > \
                best[task]["dev"].get(best[task]["primary_metric"], float("-inf")):
            best[task] = run
    base = load_checkpoint_file(base_checkpoint)
    tables = {}
    for task, run in sorted(best.items()):
        delta = Path(run["run_dir"]) / "checkpoint_best.delta.safetensors"
        if not delta.exists():
            continue
        try:
            tables[f"{task} {run['mode']}"] = delta_bias_change(base, delta, str(delta), str(base_checkpoint))
        except UserError as error:  # a run of another model in the same OUTPUT_DIR: no panel, not a failed job
            logger.warning(f"bias change of {delta} left out: {error}")
    return write_bias_change(tables, output_dir / "bias_change") if tables else None


def collect_predictions(output_dir: Path, rows: List[dict]) -> None:
    """OUTPUT_DIR/predictions/<mode>/: each task's leaderboard files from its best run."""
    for (task, mode), runs in best_rows(main_rows(rows)).items():
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
    parser.add_argument("--mode", default="bitfit",
                        help="space-separated run modes: full, head, bitfit (with --bitfit-terms) or "
                             "bitfit-<terms>, e.g. 'full bitfit-all head'")
    parser.add_argument("--bitfit-terms", default="ofa", help="--bitfit-terms of train.py for the mode 'bitfit'")
    parser.add_argument("--model", default="", help="model folder (default: the embedded all-MiniLM-L6-v2)")
    parser.add_argument("--output-dir", default="outputs/glue")
    parser.add_argument("--seeds", default="1")
    parser.add_argument("--lrs", default="", help="space-separated learning rates: each is trained, the best on dev reported")
    parser.add_argument("--epochs", type=int, default=None, help="max epochs (default: by mode, model and task size)")
    parser.add_argument("--max-seq-len", type=int, default=128)
    parser.add_argument("--train-subset", type=int, default=None, help="train on a seeded random sample of N training rows")
    parser.add_argument("--train-subsets", default="",
                        help="space-separated training sizes: train every mode at every size (a seeded sample of "
                             "N rows each) and plot size_curves.png")
    parser.add_argument("--nproc", type=int, default=1, help="processes per node (torchrun when > 1)")
    parser.add_argument("--nnodes", type=int, default=1)
    parser.add_argument("--node-rank", type=int, default=0)
    parser.add_argument("--master-addr", default="127.0.0.1")
    parser.add_argument("--master-port", type=int, default=29500)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes")
    parser.add_argument("--save-minutes", type=float, default=DEFAULT_SAVE_MINUTES,
                        help="train.py --save-interval-minutes: checkpoint_last.pt at least this often (0: epoch ends only)")
    parser.add_argument("--progress-interval", type=float, default=DEFAULT_INTERVAL_S,
                        help="seconds between progress lines when the output is not a terminal")
    parser.add_argument("--parallel", default="1",
                        help="runs trained at once on this machine (joblib threads, one train.py each; "
                             "one GPU each where there are GPUs, else a share of the cores)")
    parser.add_argument("--launcher", default="local",
                        help="local: on this machine; submitit: each run a SLURM job; submitit_local: "
                             "submitit's local executor (the SLURM path without SLURM)")
    parser.add_argument("--slurm-partition", default="", help="with --launcher submitit (default: the cluster's)")
    parser.add_argument("--slurm-time-min", default="720", help="a run's SLURM time limit in minutes")
    parser.add_argument("--slurm-gpus-per-run", default="1")
    parser.add_argument("--slurm-cpus-per-run", default="8")
    parser.add_argument("--slurm-mem-gb", default="32")
    return parser


def _numbers(text: str, kind, flag: str) -> list:
    try:
        return [kind(v) for v in text.split()]
    except ValueError:
        raise UserError(f"{flag} {text!r}: expected space-separated numbers") from None


def _integer(text: str, name: str, minimum: int) -> int:
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        expected = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"
        raise UserError(f"{name} {text!r}: expected {expected}")
    return value


def _check_settings(args, passthrough: List[str]) -> None:
    """Numbers the run script's users set, checked before anything runs."""
    args.parallel = _integer(args.parallel, "PARALLEL", 1)
    if args.launcher not in LAUNCHERS:
        raise UserError(f"LAUNCHER {args.launcher!r}: expected local, submitit or submitit_local")
    for name, minimum in (("slurm_time_min", 1), ("slurm_gpus_per_run", 0), ("slurm_cpus_per_run", 1),
                          ("slurm_mem_gb", 1)):
        setattr(args, name, _integer(getattr(args, name), name.upper(), minimum))
    if (args.parallel > 1 or args.launcher != "local") and (args.nproc > 1 or args.nnodes > 1):
        # Runs at once would share torchrun's master port, and a node's runs must follow the plan's order.
        raise UserError(f"NPROC {args.nproc}, NNODES {args.nnodes}: torchrun runs are trained one at a time; "
                        "use PARALLEL=1 and LAUNCHER=local with NPROC or NNODES above 1")
    for value, name in ((args.nproc, "NPROC"), (args.nnodes, "NNODES"), (args.epochs, "EPOCHS"),
                        (args.max_seq_len, "MAX_SEQ_LEN"), (args.train_subset, "TRAIN_SUBSET")):
        if value is not None and value < 1:
            raise UserError(f"{name} {value}: expected a positive integer")
    for value, name in ((args.save_minutes, "SAVE_MINUTES"), (args.progress_interval, "PROGRESS_SECONDS")):
        if not value >= 0:
            raise UserError(f"{name} {value:g}: expected a number of at least 0")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"OUTPUT_DIR {output_dir}: is a file, not a folder")
    check_passthrough(passthrough)


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
    modes = run_modes(args.mode, args.bitfit_terms)
    seeds = _numbers(args.seeds, int, "SEEDS")
    args.train_subsets = sorted(set(_numbers(args.train_subsets, int, "TRAIN_SUBSETS")))
    if any(size < 1 for size in args.train_subsets):
        raise UserError(f"TRAIN_SUBSETS {' '.join(map(str, args.train_subsets))}: sizes must be positive integers")
    lrs = _numbers(args.lrs, float, "LRS")
    _check_settings(args, passthrough)
    dispatch = Dispatch(args, passthrough)
    output_dir = Path(args.output_dir)
    stage = JobStage()
    try:
        with interrupts.handled(), _removed_if_left_empty(output_dir):
            run_job(args, specs, modes, seeds, lrs, passthrough, glue_dir, output_dir, stage, dispatch)
    except interrupts.Interrupted as stop:
        resume = os.environ.get(RESUME_COMMAND_VARIABLE) or shlex.join(
            [sys.executable, "-m", "fairseq_ext.experiments.glue_run", *argv])
        print(f"\nglue_bitfit: {stop.signal_name}: stopped {stage.describe()}. Finished runs and each run's last "
              f"checkpoint are kept; to resume, run the same command: {resume}", file=sys.stderr, flush=True)
        sys.exit(stop.exit_status)


# run_scripts/glue_bitfit.sh puts the command it was started with here, for the line that says how to resume.
RESUME_COMMAND_VARIABLE = "GLUE_BITFIT_COMMAND"


class JobStage:
    """Which runs are training, for the line an interruption prints; and, with runs trained at once,
    the stop that every run's thread passes on to its train.py."""

    def __init__(self):
        self._started: List[PlannedRun] = []
        self._running: Dict[Path, PlannedRun] = {}
        self._stopped: Dict[Path, PlannedRun] = {}
        self._stop_signum: Optional[int] = None
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def running(self, run: PlannedRun):
        with self._changed:
            self.check_stop()  # no run starts once the job is stopping
            self._started.append(run)
            self._running[run.run_dir] = run
        try:
            yield
        except interrupts.Interrupted:
            self._stopped[run.run_dir] = run
            raise
        finally:
            with self._changed:
                del self._running[run.run_dir]
                self._changed.notify_all()

    def check_stop(self) -> None:
        """Raise the job's stop in a run's thread (run_training then stops its train.py)."""
        if self._stop_signum is not None:
            raise interrupts.Interrupted(self._stop_signum)

    def stop_all(self, signum: int) -> None:
        """Stop every running run and wait until each has stopped its train.py."""
        with self._changed:
            self._stop_signum = signum
            self._stopped.update(self._running)
            self._changed.wait_for(lambda: not self._running)

    def describe(self) -> str:
        runs = [run for run in self._started if run.run_dir in self._stopped or run.run_dir in self._running]
        if not runs:
            return "while preparing the job"
        return "during " + ", ".join(f"{run.label} ({run.run_dir})" for run in runs)


@contextlib.contextmanager
def _removed_if_left_empty(folder: Path):
    """Make ``folder``; if this call made it and the job fails before writing into it, remove it again."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if created:
            for directory in sorted((d for d in folder.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
                with contextlib.suppress(OSError):
                    directory.rmdir()  # only empty ones
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


LAUNCHERS = ("local", "submitit", "submitit_local")
SUBMITIT_HINT = "pip install submitit (or the project's extra: pip install -e .[sweep])"


def visible_gpus() -> List[str]:
    """The CUDA devices this machine lets runs use: those in CUDA_VISIBLE_DEVICES, else every one torch sees."""
    import torch

    count = torch.cuda.device_count()
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return (listed or [str(i) for i in range(count)])[:count]


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def import_submitit():
    try:
        import submitit  # only LAUNCHER=submitit needs it
    except ImportError:
        raise UserError(f"LAUNCHER submitit: the submitit package is not installed; {SUBMITIT_HINT}") from None
    return submitit


class Dispatch:
    """How the planned runs are trained: one after another (PARALLEL=1), up to PARALLEL at once on this
    machine (joblib threads, each driving one train.py), or each as a job through submitit (SLURM, or
    submitit's local executor).  Rows come back in the plan's order either way."""

    def __init__(self, args, passthrough: List[str]):
        self.launcher, self.parallel = args.launcher, args.parallel
        self.slot_envs: List[Dict[str, str]] = [{}]
        if self.launcher != "local":
            import_submitit()
            self.slurm = {"partition": args.slurm_partition, "timeout_min": args.slurm_time_min,
                          "gpus": args.slurm_gpus_per_run, "cpus": args.slurm_cpus_per_run, "mem_gb": args.slurm_mem_gb}
        elif self.parallel > 1:
            self.slot_envs = self._slot_environments("--cpu" in passthrough)

    def _slot_environments(self, cpu_only: bool) -> List[Dict[str, str]]:
        """Each concurrent run's environment: its own GPU where there are GPUs, else a share of the cores."""
        gpus = [] if cpu_only else visible_gpus()
        if gpus:
            if self.parallel > len(gpus):
                raise UserError(f"PARALLEL {self.parallel}: this machine has {len(gpus)} CUDA GPU"
                                f"{'s' if len(gpus) > 1 else ''} and each run at once takes one; "
                                f"use PARALLEL {len(gpus)} or less")
            return [{"CUDA_VISIBLE_DEVICES": gpu} for gpu in gpus[:self.parallel]]
        if "OMP_NUM_THREADS" in os.environ:  # the user's choice wins
            return [{} for _ in range(self.parallel)]
        return [{"OMP_NUM_THREADS": str(max(1, available_cores() // self.parallel))} for _ in range(self.parallel)]

    def concurrency(self, runs: List[PlannedRun]) -> int:
        """How many runs may train at once (for the job's ETA): every submitted job, or PARALLEL."""
        return max(1, sum(not run.finished for run in runs)) if self.launcher != "local" else self.parallel

    def train(self, runs: List[PlannedRun], args, job: JobProgress, stage: JobStage) -> List[dict]:
        if self.launcher == "local" and self.parallel == 1:
            return [one_run(run, args, job, stage) for run in runs]
        if self.launcher == "local":
            slots: "queue.Queue[Dict[str, str]]" = queue.Queue()
            for env in self.slot_envs:
                slots.put(env)

            def train_one(run):
                env = slots.get()  # joblib runs at most PARALLEL of these at once: a slot is always free
                try:
                    return one_run(run, args, job, stage, functools.partial(LocalTraining, env=env))
                finally:
                    slots.put(env)
        else:
            start = functools.partial(SubmititTraining, self._executor(Path(args.output_dir)), env=self._job_env())

            def train_one(run):
                return one_run(run, args, job, stage, start)
        return self._in_threads(train_one, runs, self.concurrency(runs), stage)

    @staticmethod
    def _in_threads(train_one, runs: List[PlannedRun], n_jobs: int, stage: JobStage) -> List[dict]:
        import joblib

        try:
            return joblib.Parallel(n_jobs=n_jobs, backend="threading")(joblib.delayed(train_one)(run) for run in runs)
        except BaseException as error:
            # joblib stops starting runs but leaves running ones be: stop each (its train.py saves, so the
            # same command resumes it) and wait, so that no train.py outlives the job.
            stage.stop_all(error.signum if isinstance(error, interrupts.Interrupted) else signal.SIGTERM)
            raise

    def _executor(self, output_dir: Path):
        submitit = import_submitit()
        cluster = "local" if self.launcher == "submitit_local" else "slurm"
        executor = submitit.AutoExecutor(folder=output_dir / "submitit", cluster=cluster)
        settings = {"name": "glue_bitfit", "timeout_min": self.slurm["timeout_min"]}
        if cluster == "slurm":
            settings.update(gpus_per_node=self.slurm["gpus"], cpus_per_task=self.slurm["cpus"],
                            mem_gb=self.slurm["mem_gb"], slurm_partition=self.slurm["partition"] or None)
        executor.update_parameters(**settings)
        return executor

    def _job_env(self) -> Dict[str, str]:
        """A job's train.py uses the cores its job was given, unless the user set OMP_NUM_THREADS."""
        if "OMP_NUM_THREADS" in os.environ or self.launcher == "submitit_local":
            return {}
        return {"OMP_NUM_THREADS": str(self.slurm["cpus"])}


def run_modes(text: str, bitfit_terms: str) -> List[str]:
    """MODE's run modes as labels (full, head, bitfit-<terms>), each checked."""
    given = text.split()
    if not given:
        raise UserError("MODE is empty; modes: full, head, bitfit, bitfit-<terms>, rand_uniform or rand_row_col")
    modes = []
    for mode in given:
        label = mode_label(mode, bitfit_terms) if mode == "bitfit" else mode
        setting = f"BITFIT_TERMS {bitfit_terms}" if mode == "bitfit" else f"MODE {mode}"
        try:
            mode_flags(label)
            if label.startswith(BITFIT_PREFIX):
                parse_terms(label[len(BITFIT_PREFIX):])
        except (UserError, SelectionError) as error:
            raise UserError(f"{setting}: {error}") from None
        modes.append(label)
    return list(dict.fromkeys(modes))


def run_job(args, specs, modes, seeds, lrs, passthrough, glue_dir: Path, output_dir: Path, stage: JobStage,
            dispatch: "Dispatch") -> None:
    model = resolve_model(args.model, output_dir)
    model_params = checkpoint_parameter_count(model.checkpoint)
    print(f"GLUE {' '.join(modes)}: tasks {' '.join(s.name for s in specs)}; model {model.path} ({model.arch}, "
          f"{model_params / 1e6:.1f}M parameters)", flush=True)

    # Every task's files are read and checked before the first run trains.
    curve = bool(args.train_subsets)
    sizes = args.train_subsets if curve else [args.train_subset]
    if curve:
        for spec in specs:
            available = len(read_split(spec.name, glue_dir, "train").texts)
            too_many = [size for size in sizes if size > available]
            if too_many:
                raise UserError(f"TRAIN_SUBSETS {too_many[0]}: {spec.name} has {available:,} training rows")
    runs = []
    for spec in specs:
        for size in sizes:
            folder = f"{spec.name}-{size}rows" if curve else spec.name  # TRAIN_SUBSET keeps the task's folder
            data_dir = output_dir / "data" / folder
            manifest = prepare_task(spec, glue_dir, model, model.dictionary, data_dir, args.workers, train_subset=size)
            train_rows = manifest["splits"]["train"]["rows_written"]
            for mode in modes:
                recipe = default_recipe(mode, spec.name, train_rows, model_params)
                if args.epochs:
                    recipe = dataclasses.replace(recipe, epochs=args.epochs, rule=f"{recipe.rule}; EPOCHS={args.epochs}")
                if lrs:
                    recipe = dataclasses.replace(recipe, lrs=tuple(lrs),
                                                 rule=f"{recipe.rule}; LRS={' '.join(map(str, lrs))}")
                for lr in recipe.lrs:
                    for seed in seeds:
                        run_name = f"{folder}/{mode}/lr{lr:g}-seed{seed}"
                        runs.append(plan_run(spec, model, data_dir, manifest, output_dir / "runs" / run_name, args,
                                             mode, recipe, lr, seed, passthrough,
                                             bookkeeping_args(args, output_dir / "tensorboard" / run_name), size, curve))
    job = JobProgress(runs, args.progress_interval, dispatch.concurrency(runs))
    print("\n".join(job.plan_lines()), flush=True)
    rows = dispatch.train(runs, args, job, stage)
    if args.node_rank != 0:
        return
    all_rows = write_results(output_dir, rows)
    collect_predictions(output_dir, all_rows)
    write_bias_change_of_best_runs(output_dir, all_rows, model.checkpoint)
    print(f"\n{(output_dir / 'results.md').read_text().split('## Every run')[0].strip()}\n", flush=True)
    written = [output_dir / name for name in ("results.json", "results.md", "curves.png", "size_curves.png",
                                               "bias_change/bias_change.png")]
    print("results: " + ", ".join(str(path) for path in written if path.exists()))


def bookkeeping_args(args, tensorboard_dir: Path) -> List[str]:
    """train.py flags for saving and logging: --save-interval-minutes, and tensorboard logs where it is installed."""
    flags = ["--save-interval-minutes", f"{args.save_minutes:g}"]
    if importlib.util.find_spec("tensorboardX") is not None or importlib.util.find_spec("tensorboard") is not None:
        flags += ["--tensorboard-logdir", str(tensorboard_dir)]
    return flags


if __name__ == "__main__":
    main()
