"""Training the planned runs: one after another, up to PARALLEL at once, or as submitit jobs; each run
reused when it finished before, else trained and its row collected (dev results from its run record,
leaderboard files from its best checkpoint)."""
import functools
import os
import queue
import signal
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional

from ...core import interrupts
from ...core.cpu_threads import available_cores
from ...core.errors import UserError
from ...core.glue_files import write_leaderboard_tsv
from ...core.progress import DEFAULT_INTERVAL_S, ConsoleProgress
from ...core.run_record import RECORD_NAME, epoch_stats, read_run_record
from ...plugin.data.glue_prepare import read_test_indices
from ...plugin.glue_split_predictions import load_base_and_delta, load_checkpoint, predict_prepared_split
from ...training.options import TRAIN_COMMAND, TRAIN_MODULE
from .plan import PlannedRun
from .results import write_results
from .run_file import RUN_FILE, RunFile
from .console import JobProgress, finished_line, say
from .runs import JobStage, LocalTraining, StartTraining, SubmititTraining, launch_train_py


def launch_command(nproc: int, nnodes: int, node_rank: int, master_addr: str, master_port: int) -> List[str]:
    if nproc <= 1 and nnodes <= 1:
        return list(TRAIN_COMMAND)
    return [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
            f"--nnodes={nnodes}", f"--node_rank={node_rank}", f"--master_addr={master_addr}",
            f"--master_port={master_port}", "-m", TRAIN_MODULE]


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
    # fairseq's train_wall: the seconds an epoch spent in training steps (not validating, not saving).
    train_walls = [float(values["train_wall"]) for values in epoch_stats(record, "train").values()
                   if "train_wall" in values]
    peaks = [launch["peak_memory_bytes"] for launch in record.get("launches", []) if "peak_memory_bytes" in launch]
    return {"epochs": dict(sorted(epochs.items())), "losses": loss_curve(record, spec),
            "trainable": parameters.get("trainable"),
            "total": parameters.get("total"), "updates": updates, "early_stop": record.get("early_stop"),
            "epoch_train_s": round(sum(train_walls) / len(train_walls), 1) if train_walls else None,
            "peak_memory_bytes": max(peaks) if peaks else None}


def loss_curve(record: dict, spec) -> Dict[str, dict]:
    """Each epoch's training loss (the epoch's mean) and dev loss, as fairseq logs them (bits per sentence for
    classification, squared error for regression): what says whether a run was still learning."""
    curve: Dict[str, dict] = {}
    for key, tag in (("train", "train"), ("dev", spec.valid_subsets[0])):
        for epoch, values in epoch_stats(record, tag).items():
            if "loss" in values:
                curve.setdefault(str(epoch), {})[key] = float(values["loss"])
    return dict(sorted(curve.items(), key=lambda item: int(item[0])))


def with_loss_curve(row: dict, run_dir: Path, spec) -> dict:
    """A row finished before rows kept their loss curve, given it from its run record where that is kept."""
    record = run_dir / RECORD_NAME
    if "loss_curve" in row or not record.exists():
        return row
    return {**row, "loss_curve": loss_curve(read_run_record(record), spec)}


def _best_delta_bytes(run_dir: Path) -> Optional[int]:
    """The size of the best checkpoint's delta: what storing this run's task costs (None: full fine-tuning)."""
    delta = run_dir / "checkpoint_best.delta.safetensors"
    return delta.stat().st_size if delta.exists() else None


def best_epoch(epochs: Dict[int, dict], primary: str) -> Optional[int]:
    scored = [(values[primary], -epoch, epoch) for epoch, values in epochs.items() if primary in values]
    return max(scored)[2] if scored else None


def train_or_reuse(run: PlannedRun, args, job: JobProgress, stage: "JobStage", start: StartTraining = LocalTraining) -> dict:
    if run.result is None and run.recorded is None:
        with stage.running(run):
            return _train_and_collect(run, args, job, stage, start)
    if run.reused_from is None and run.result is None:  # its folder is gone, its row is kept
        say(f"  {run.label}: done earlier (its row in results.json)")
        row = run.recorded
    elif run.result is not None:
        say(f"  {run.label}: done earlier ({run.run_dir / RUN_FILE})")
        row = with_loss_curve(run.result, run.run_dir, run.spec)
    else:
        say(f"  {run.label}: done by another job (its row in {run.reused_from}, with the same settings)")
        row = run.recorded
    # Trained with the same settings, the row is this job's run: it states this job's recipe, not the rule
    # (or the LRS and EPOCHS overrides) that chose those settings in the job that trained it.
    row = dict(row, recipe=run.recipe.describe())
    # The ledger holds every finished run the job knows of, whatever stops it later; a row it holds already
    # (planned as recorded) is not written again, so a resumed job does not rewrite it once per finished run.
    if args.node_rank == 0 and (run.reused_from is not None or row != run.recorded):
        write_results(Path(args.output_dir), [row])
    return row


def _train_and_collect(run: PlannedRun, args, job: JobProgress, stage: "JobStage", start: StartTraining) -> dict:
    spec, run_dir = run.spec, run.run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    if args.node_rank == 0:
        run_file = RunFile.read(run_dir)
        run_file.settings = run.settings
        run_file.write(run_dir)
    command = launch_command(args.nproc, args.nnodes, args.node_rank, args.master_addr, args.master_port) + run.train_args
    say(f"  {run.label}: training ({run_dir}; log: {run_dir / 'train.log'})")
    wall = launch_train_py(command, run, job, stage, start)
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
               curve={str(e): v for e, v in sorted(parsed["epochs"].items())}, loss_curve=parsed["losses"],
               trainable=parsed["trainable"], total=parsed["total"], updates=parsed["updates"],
               epoch_train_s=parsed["epoch_train_s"], peak_memory_bytes=parsed["peak_memory_bytes"],
               delta_bytes=_best_delta_bytes(run_dir),
               predictions=predict_test_sets(spec, run.prepared, run_dir, run.base_checkpoint, run.label,
                                             job.interval_s, job.bar, stage.check_stop))
    run_file = RunFile.read(run_dir)
    run_file.result = row
    run_file.write(run_dir)
    write_results(Path(args.output_dir), [row])
    job.finished(run, parsed["updates"], wall)
    say(f"  {run.label}: {finished_line(row, parsed['early_stop'])}")
    return row


def predict_test_sets(spec, prepared: Path, run_dir: Path, base_checkpoint: str, label: str = "",
                      interval_s: float = DEFAULT_INTERVAL_S, bar: Optional[bool] = None,
                      check_stop: Callable[[], None] = lambda: None) -> Dict[str, str]:
    """GLUE leaderboard files for the task's test splits, from the best delta merged into the base model in
    memory (full fine-tuning: from the best checkpoint);
    ``check_stop`` is called after each batch (a run's thread ends there when the job stops)."""
    splits = [s for s in spec.test_splits if (prepared / "input0" / f"{s.name}.idx").exists()]
    checkpoint, best_delta = run_dir / "checkpoint_best.pt", run_dir / "checkpoint_best.delta.safetensors"
    if not splits or not (checkpoint.exists() or best_delta.exists()):
        return {}
    # The delta on its base wherever there is one: the same predictions as the full checkpoint for BitFit, and
    # the one way for a tuner's run (fairseq's loader knows no LoRA or adapter tensors).
    if best_delta.exists():
        classifier = load_base_and_delta(base_checkpoint, best_delta, prepared)
    else:
        classifier = load_checkpoint(checkpoint, prepared)
    written = {}
    for split in splits:
        indices = read_test_indices(prepared, split.name)
        display = ConsoleProgress(f"{label}: predicting {split.name}", len(indices), unit="examples",
                                  interval_s=interval_s, bar=bar)

        def progress(done, total):
            display.update(done)
            check_stop()

        try:
            predictions = predict_prepared_split(classifier, split.name, progress=progress)
        finally:
            display.close()
        path = write_leaderboard_tsv(spec, indices, predictions, run_dir / split.leaderboard_file)
        written[split.name] = str(path)
    return written


SUBMITIT_HINT = "pip install submitit (or the project's extra: pip install -e .[sweep])"


def visible_gpus() -> List[str]:
    """The CUDA devices this machine lets runs use: those in CUDA_VISIBLE_DEVICES, else every one torch sees."""
    import torch

    count = torch.cuda.device_count()
    listed = [d.strip() for d in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if d.strip()]
    return (listed or [str(i) for i in range(count)])[:count]


def import_submitit():
    try:
        import submitit  # only LAUNCHER=submitit needs it
    except ImportError:
        raise UserError(f"LAUNCHER submitit: the submitit package is not installed; {SUBMITIT_HINT}") from None
    return submitit


def training_order(runs: List[PlannedRun], nnodes: int) -> List[int]:
    """The plan's indices in the order to train: on one node, interrupted runs resume before new ones start,
    so a restarted job first completes what it had half done.  Across nodes, the plan's order: each node's
    runner starts the same run at once, and a node need not see the checkpoints another one saved."""
    indices = list(range(len(runs)))
    return indices if nnodes > 1 else sorted(indices, key=lambda index: runs[index].updates_done == 0)


class Dispatch:
    """How the planned runs are trained: one after another (PARALLEL=1), up to PARALLEL at once on this
    machine (joblib threads, each driving one train.py), or each as a job through submitit (SLURM, or
    submitit's local executor).  Interrupted runs resume first (``training_order``); rows come back in the
    plan's order either way."""

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
        order = training_order(runs, args.nnodes)
        rows = self._train([runs[index] for index in order], args, job, stage)
        return [row for _, row in sorted(zip(order, rows), key=lambda pair: pair[0])]

    def _train(self, runs: List[PlannedRun], args, job: JobProgress, stage: JobStage) -> List[dict]:
        if self.launcher == "local" and self.parallel == 1:
            return [train_or_reuse(run, args, job, stage) for run in runs]
        if self.launcher != "local":
            start = functools.partial(SubmititTraining, self._executor(Path(args.output_dir)), env=self._job_env())
            return self._in_threads(lambda run: train_or_reuse(run, args, job, stage, start), runs,
                                    self.concurrency(runs), stage)
        slots: "queue.Queue[Dict[str, str]]" = queue.Queue()
        for env in self.slot_envs:
            slots.put(env)

        def train_in_a_slot(run):
            env = slots.get()  # joblib runs at most PARALLEL of these at once: a slot is always free
            try:
                return train_or_reuse(run, args, job, stage, functools.partial(LocalTraining, env=env))
            finally:
                slots.put(env)
        return self._in_threads(train_in_a_slot, runs, self.parallel, stage)

    @staticmethod
    def _in_threads(train, runs: List[PlannedRun], n_jobs: int, stage: JobStage) -> List[dict]:
        import joblib

        try:
            return joblib.Parallel(n_jobs=n_jobs, backend="threading")(joblib.delayed(train)(run) for run in runs)
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
