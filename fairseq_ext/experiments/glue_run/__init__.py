"""GLUE end to end: prepare, fine-tune with train.py, collect results, predict test sets.

``run_scripts/glue_bitfit.sh`` maps its environment variables onto this CLI::

    python -m fairseq_ext.experiments.glue_run --glue-dir glue_data --tasks "CoLA STS-B" --mode bitfit \\
        --output-dir outputs/glue -- --max-update 30      # after --: passed to train.py

For every task, mode, learning rate and seed, one train.py run is made in
``OUTPUT_DIR/runs/<TASK>/<mode>/lr<LR>-seed<SEED>/``; a run that finished is
not run again, and an interrupted one resumes from its last checkpoint.  What a
run gave is read from the run record train.py writes (``run_record.json``), not
from its log.  The results of all runs in OUTPUT_DIR (this call's and earlier
ones', other modes included) are written to results.json, results.md (results.tex: its
table in LaTeX) and curves.png.
Runs are trained one after another, up to ``--parallel`` at once, or each as a
submitit job (``--launcher``; see ``Dispatch``): the results are the same.  A run
whose folder was deleted is still done while its row in results.json (which keeps
the settings it was trained with) matches.

This module plans and drives the job; ``runs`` launches one train.py run and shows
its progress; ``results`` turns the runs' rows into results.json, results.md, results.tex and plots.
"""
import contextlib
import dataclasses
import functools
import hashlib
import importlib.util
import json
import logging
import os
import queue
import signal
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ...core import interrupts
from ...core.bitfit import SelectionError, parse_terms
from ...core.errors import UserError, exit_on_user_error
from ...core.files import write_text_atomically
from ...core.glue_files import check_glue_dir, read_split, write_leaderboard_tsv
from ...core.glue_tasks import GLUE_SOURCE_HINT, TASK_NAMES, TASKS, get_task_spec
from ...core.progress import DEFAULT_INTERVAL_S, ConsoleProgress
from ...core.run_record import RECORD_NAME, epoch_stats, read_run_record
from ...plugin.checkpoints import checkpoint_parameter_count
from ...plugin.data.glue_prepare import prepare_task, read_test_indices, same_data
from ...plugin.deltas import apply_delta
from ...plugin.models import hf_import
from ...plugin.models.model_dir import load_model_dir
from ...plugin.models.pretrained import default_model_dir
from ...plugin.glue_split_predictions import predict_prepared_split
from ...training.glue_recipe import (Recipe, check_passthrough, default_recipe, schedule_updates, train_command,
                                    without_bookkeeping)
from ...training.options import BITFIT_PREFIX, TRAIN_COMMAND, TRAIN_MODULE, mode_flags, mode_label
from . import settings
from .results import Ledger, collect_predictions, summary_markdown, write_bias_change_of_best_runs, write_results
from .runs import (JobProgress, JobStage, LocalTraining, StartTraining, SubmititTraining, finished_line, saved_updates,
                   say, train_timed)

logger = logging.getLogger("fairseq_ext.experiments.glue_run")  # also when run as __main__


DEFAULT_GLUE_DIR = "glue_data"
PROG = "glue_bitfit"  # run_scripts/glue_bitfit.sh: what its one-line errors and its stop line are headed with


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
            "total": parameters.get("total"), "updates": updates, "early_stop": record.get("early_stop")}


def best_epoch(epochs: Dict[int, dict], primary: str) -> Optional[int]:
    scored = [(values[primary], -epoch, epoch) for epoch, values in epochs.items() if primary in values]
    return max(scored)[2] if scored else None


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


def settings_change(before: dict, settings: dict, manifest: dict) -> Optional[str]:
    """What differs between the settings a run was trained with and ``settings`` (of data prepared as
    ``manifest`` says); None if nothing."""
    before = dict(before, train_args=without_bookkeeping(before["train_args"]))  # written before they were left out
    if same_data(before["data"], manifest):  # the same rows, perhaps recorded under the data's file key
        before["data"] = settings["data"]
    if before == settings:
        return None
    if before["data"] != settings["data"]:
        return "the training data (GLUE files, TRAIN_SUBSET or the model's tokenizer)"
    old, new = _options(before["train_args"]), _options(settings["train_args"])
    changed = [f"{flag} {old.get(flag, '(unset)')} -> {new.get(flag, '(unset)')}"
               for flag in list(new) + [f for f in old if f not in new] if old.get(flag) != new.get(flag)]
    return "train.py arguments (" + (", ".join(changed[:4]) or "their order") + ")"


def check_same_settings(run_dir: Path, settings: dict, manifest: dict, recorded_row: Optional[dict],
                        results_file: Path) -> None:
    """Refuse to reuse or resume a run that was trained with other settings: its folder's settings.json,
    or its row in results.json (rows from before settings were kept in them are not checked)."""
    recorded = run_dir / "settings.json"
    if recorded.exists():
        change = settings_change(json.loads(recorded.read_text()), settings, manifest)
        if change:
            raise UserError(f"{run_dir} was trained with other settings: {change} changed; "
                            "use another OUTPUT_DIR, or delete that run folder to train it again")
    if recorded_row is not None and recorded_row.get("settings") is not None:
        change = settings_change(recorded_row["settings"], settings, manifest)
        if change:
            raise UserError(f"{results_file} holds a row for {run_dir} trained with other settings: {change} "
                            "changed; use another OUTPUT_DIR, or delete that run folder and its row in "
                            "results.json to train it again")


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
    recorded: Optional[dict] = None  # its row in results.json, trained with these settings
    updates_done: int = 0  # an interrupted run: the updates in the checkpoint it resumes from

    @property
    def label(self) -> str:
        rows = f" {self.train_rows:,} rows" if self.curve else ""
        return f"{self.spec.name}{rows} {self.mode} lr {self.lr:g} seed {self.seed}"

    @property
    def result_file(self) -> Path:
        return self.run_dir / "result.json"

    @property
    def finished(self) -> bool:
        return self.result_file.exists() or self.recorded is not None


def plan_run(spec, model, prepared: Path, manifest: dict, run_dir: Path, args, mode: str, recipe: Recipe, lr: float,
             seed: int, passthrough: List[str], bookkeeping: Sequence[str], ledger: Ledger,
             train_subset: Optional[int] = None, curve: bool = False) -> PlannedRun:
    """One run's train.py arguments, checked against what its folder, or its row in results.json, was
    trained with before."""
    train_rows = manifest["splits"]["train"]["rows_written"]
    world_size = args.nproc * args.nnodes
    train_args = train_command(spec, model, prepared, run_dir, mode, recipe, lr, seed, train_rows, world_size,
                               passthrough, args.max_seq_len, bookkeeping)
    planned = schedule_updates(passthrough, recipe.batch, recipe.epochs, train_rows, world_size)
    settings = run_settings(train_args, prepared, run_dir, manifest)
    row = ledger.row(spec.name, mode, lr, seed, train_subset if curve else None)
    check_same_settings(run_dir, settings, manifest, row, ledger.path)
    recorded = row if row is not None and row.get("settings") is not None and \
        settings_change(row["settings"], settings, manifest) is None else None
    return PlannedRun(spec, mode, lr, seed, prepared, run_dir, train_args, settings, train_rows, planned,
                      str(model.checkpoint), recipe, train_subset, curve, recorded, saved_updates(run_dir))


def one_run(run: PlannedRun, args, job: JobProgress, stage: "JobStage", start: StartTraining = LocalTraining) -> dict:
    if run.result_file.exists():
        say(f"  {run.label}: done earlier ({run.result_file})")
        return json.loads(run.result_file.read_text())
    if run.recorded is not None:  # its folder is gone, its row is kept
        say(f"  {run.label}: done earlier (its row in results.json)")
        return run.recorded
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
           "size_curve": run.curve, "settings": run.settings}
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
    say(f"  {run.label}: {finished_line(row, parsed['early_stop'])}")
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


def _check_settings(args, passthrough: List[str]) -> None:
    """What no single setting's own check can tell, checked before anything runs."""
    if (args.parallel > 1 or args.launcher != "local") and (args.nproc > 1 or args.nnodes > 1):
        # Runs at once would share torchrun's master port, and a node's runs must follow the plan's order.
        raise UserError(f"NPROC {args.nproc}, NNODES {args.nnodes}: torchrun runs are trained one at a time; "
                        "use PARALLEL=1 and LAUNCHER=local with NPROC or NNODES above 1")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"OUTPUT_DIR {output_dir}: is a file, not a folder")
    check_passthrough(passthrough)


def _glue_dir(given: str) -> Path:
    """GLUE_DIR, or ./glue_data when it is not set; errors name the variable the run script's users set."""
    if not given and not Path(DEFAULT_GLUE_DIR).is_dir():
        raise UserError(f"GLUE_DIR is not set and its default, {DEFAULT_GLUE_DIR}, is not a directory in "
                        f"{Path.cwd()}: set GLUE_DIR to GLUE's glue_data folder. {GLUE_SOURCE_HINT}")
    try:
        return check_glue_dir(given or DEFAULT_GLUE_DIR)
    except UserError as error:
        raise UserError(str(error).replace("--glue-dir", "GLUE_DIR")) from None


@exit_on_user_error(prog=PROG)
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    if passthrough in (["--help"], ["-h"]):
        print(settings.help_text())
        return
    args = settings.parse(argv[: argv.index("--")] if "--" in argv else argv, PROG)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", force=True)
    for noisy in ("fairseq", "matplotlib"):  # train.py keeps fairseq's full log in each run's train.log
        logging.getLogger(noisy).setLevel(logging.WARNING)

    glue_dir = _glue_dir(args.glue_dir)
    tasks = args.tasks.split() or present_tasks(glue_dir)
    if not tasks:
        raise UserError(f"GLUE_DIR {glue_dir}: no task folder with a train.tsv; expected "
                        f"{glue_dir}/<TASK>/{{train,dev,test}}.tsv. {GLUE_SOURCE_HINT}")
    specs = [get_task_spec(task) for task in tasks]
    modes = run_modes(args.mode, args.bitfit_terms)
    args.train_subsets = sorted(set(args.train_subsets))
    _check_settings(args, passthrough)
    dispatch = Dispatch(args, passthrough)
    output_dir = Path(args.output_dir)
    stage = JobStage()
    try:
        with interrupts.handled(), _removed_if_left_empty(output_dir):
            run_job(args, specs, modes, args.seeds, args.lrs, passthrough, glue_dir, output_dir, stage, dispatch)
    except interrupts.Interrupted as stop:
        print(f"\n{PROG}: {stop.signal_name}: stopped {stage.describe()}. Finished runs and each run's last "
              f"checkpoint are kept; to resume, run the same command: "
              f"{settings.resume_command(argv, args.from_env)}", file=sys.stderr, flush=True)
        sys.exit(stop.exit_status)


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
    runs, ledger = [], Ledger(output_dir / "results.json")
    for spec in specs:
        for size in sizes:
            folder = f"{spec.name}-{size}rows" if curve else spec.name  # TRAIN_SUBSET keeps the task's folder
            data_dir = output_dir / "data" / folder
            manifest = prepare_task(spec, glue_dir, model, model.dictionary, data_dir, args.workers or os.cpu_count() or 1,
                                    train_subset=size)
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
                                             bookkeeping_args(args, output_dir / "tensorboard" / run_name), ledger,
                                             size, curve))
    job = JobProgress(runs, args.progress_interval, dispatch.concurrency(runs))
    print("\n".join(job.plan_lines()), flush=True)
    rows = dispatch.train(runs, args, job, stage)
    if args.node_rank != 0:
        return
    all_rows = write_results(output_dir, rows)
    collect_predictions(output_dir, all_rows)
    write_bias_change_of_best_runs(output_dir, all_rows, model.checkpoint)
    print(f"\n{summary_markdown(all_rows, TASKS).strip()}\n", flush=True)
    written = [output_dir / name for name in ("results.json", "results.md", "results.tex", "curves.png",
                                               "size_curves.png", "bias_change/bias_change.png", "predictions")]
    print("results: " + ", ".join(str(path) for path in written if path.exists()))


def bookkeeping_args(args, tensorboard_dir: Path) -> List[str]:
    """train.py flags for saving and logging: --save-interval-minutes, and tensorboard logs where it is installed."""
    flags = ["--save-interval-minutes", f"{args.save_minutes:g}"]
    if importlib.util.find_spec("tensorboardX") is not None or importlib.util.find_spec("tensorboard") is not None:
        flags += ["--tensorboard-logdir", str(tensorboard_dir)]
    return flags

