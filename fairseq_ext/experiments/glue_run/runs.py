"""One train.py run of the GLUE runner: launched as a child process or a submitit job, its log
copied into the run folder, its progress and dev metrics shown from its run record, the job's
ETA, and a stop passed on so that train.py saves before it ends."""
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

from ...core import interrupts
from ...core.bitfit import format_trainable
from ...core.errors import ERROR_FILE_VARIABLE, UserError, one_line, read_error_file
from ...core.files import write_text_atomically
from ...core.progress import ConsoleProgress, format_duration
from ...core.run_record import RECORD_NAME, read_run_record
from ...training.options import TRAIN_PROG

if TYPE_CHECKING:
    from . import PlannedRun


class RecordEcho:
    """Echoes what a running train.py adds to its run record: its parameter counts, resumes,
    and the dev metrics of each validation; ``progress`` is the record's latest live progress."""

    SKIPPED = ("wps", "wpb", "bsz", "nll_loss")  # throughput and a duplicate of the loss

    def __init__(self, path: Path):
        self.path = path
        record = read_run_record(path) if path.exists() else {"launches": [], "stats": []}
        self.launches, self.stats = len(record["launches"]), len(record["stats"])  # what earlier launches left
        self.launches_before = self.launches
        self.early_stop = record.get("early_stop")
        self.version = None
        self.progress: Optional[dict] = None  # the launch this echo watches, once it has begun training

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
                saved = (record.get("progress") or {}).get("last_saved_updates")
                at = f" at update {saved:,}" if saved is not None else ""
                lines.append(f"resuming the interrupted run{at} from {resumed}")
            lines.append(format_trainable(record["parameters"]["trainable"], record["parameters"]["total"]))
            self.launches = len(record["launches"])
            self.progress = None  # an earlier launch's progress is not this one's
        elif len(record["launches"]) == self.launches and self.launches > self.launches_before:
            self.progress = record.get("progress")  # the launch this echo started with, once it has begun
        for entry in record["stats"][self.stats:]:
            if entry["tag"] != "train":
                shown = ", ".join(f"{key} {value}" for key, value in entry["values"].items()
                                  if not key.endswith(self.SKIPPED))
                lines.append(f"epoch {entry['epoch']} {entry['tag']}: {shown}")
        self.stats = len(record["stats"])
        stop = record.get("early_stop")
        if stop and stop != self.early_stop:
            lines.append(early_stop_line(stop))
        self.early_stop = stop
        return lines


def early_stop_line(stop: dict) -> str:
    """The console's line for a run that --patience ended (the run record's ``early_stop``)."""
    best = f" on {stop['best']:g}" if stop.get("best") is not None else ""
    return (f"early stop after epoch {stop['epoch']} ({stop['updates']:,} updates): {stop['metric']} has not "
            f"improved{best} for {stop['patience']} validation{'s' if stop['patience'] != 1 else ''} (--patience)")


class JobProgress:
    """The job's plan, and an ETA for what is left of it from the speed its runs show.

    A task's speed is the wall time per update of its finished runs in this job (validation,
    start-up and test prediction included); until one has finished, it is the running run's time
    per update since this launch began training (a resumed run's earlier updates are not this
    launch's), plus its start-up time for every run not launched yet.  A task not run yet is
    assumed as fast as the one running.  With runs trained at once (``concurrency`` > 1) every
    running run reports its own progress, and the work left is shared by as many runs as may train
    at once.
    """

    def __init__(self, runs: List["PlannedRun"], interval_s: float, concurrency: int = 1):
        self.runs, self.interval_s, self.concurrency = runs, interval_s, concurrency
        self.updates_left = {run.run_dir: 0 if run.finished else max(0, run.planned_updates - run.updates_done)
                             for run in runs}
        self.seconds_per_update: Dict[str, float] = {}  # by task: finished runs', all in
        self.live_seconds_per_update: Dict[str, float] = {}  # by task: a running run's, training alone
        self.startup_s: Dict[str, float] = {}  # by task: a run's seconds from launch to its first update
        self.launched: set = set()  # run folders launched by this job
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
        left = sum(self.updates_left.values())
        to_train = f"{left:,} updates to train (runs with --patience may stop sooner)" if left else "nothing left to train"
        lines = [f"plan: {len(self.runs)} run{'s' if len(self.runs) != 1 else ''} "
                 f"({len(self.runs) - len(todo)} done earlier), {to_train}"]
        for run in self.runs:
            rows = f"{run.train_rows:,} rows"
            if run.finished:
                what = "done earlier"
            elif run.updates_done:
                what = (f"{run.updates_done:,} of {run.planned_updates:,} updates done, "
                        f"{self.updates_left[run.run_dir]:,} left")
            else:
                what = f"{run.planned_updates:,} updates"
            lines.append(f"  {run.label:<40} {rows:>12}  {what}")
        return lines

    def observe(self, run: "PlannedRun", progress: dict, seconds: float, updates_at_start: int,
                started_s: float = 0.0) -> Optional[float]:
        """Take the running ``run``'s latest progress, ``seconds`` after its launch (its training
        began ``started_s`` after it, at ``updates_at_start``); the job's ETA in seconds (None: not known yet)."""
        done = int(progress.get("updates") or 0)
        total = progress.get("total_updates") or run.planned_updates
        trained, training_s = done - updates_at_start, seconds - started_s
        with self._lock:
            self.launched.add(run.run_dir)
            self.updates_left[run.run_dir] = max(0, total - done)
            if trained <= 0 or training_s <= 0:
                return None
            self.live_seconds_per_update[run.spec.name] = training_s / trained
            self.startup_s[run.spec.name] = started_s
            return self.eta(run.spec.name)

    def finished(self, run: "PlannedRun", updates: int, seconds: float) -> None:
        with self._lock:
            self.launched.add(run.run_dir)
            self.updates_left[run.run_dir] = 0
            if updates > 0 and seconds > 0:
                self.seconds_per_update[run.spec.name] = seconds / updates

    def eta(self, running_task: str) -> Optional[float]:
        if running_task not in self.seconds_per_update and running_task not in self.live_seconds_per_update:
            return None
        left = [(run, self.updates_left[run.run_dir]) for run in self.runs if self.updates_left[run.run_dir]]
        seconds = sum(self._seconds_for(run, updates, running_task) for run, updates in left)
        return seconds / max(1, min(self.concurrency, len(left)))

    def _seconds_for(self, run: "PlannedRun", updates_left: int, running_task: str) -> float:
        """The seconds ``run``'s ``updates_left`` will take: at its task's speed, or the running task's
        while its own is not measured yet."""
        for task in (run.spec.name, running_task):
            if task in self.seconds_per_update:
                return updates_left * self.seconds_per_update[task]
            if task in self.live_seconds_per_update:
                startup = 0.0 if run.run_dir in self.launched else self.startup_s[task]
                return updates_left * self.live_seconds_per_update[task] + startup
        raise KeyError(running_task)  # eta() checks that the running task is measured


def saved_updates(run_dir: Path) -> int:
    """The updates in the checkpoint_last.pt an interrupted run resumes from (0: none to resume)."""
    record = run_dir / RECORD_NAME
    if not (run_dir / "checkpoint_last.pt").is_file() or not record.is_file():
        return 0
    return int((read_run_record(record).get("progress") or {}).get("last_saved_updates") or 0)


def finished_line(row: dict, early_stop: Optional[dict]) -> str:
    """A finished run's line: its best dev score and epoch, updates, wall time, and why it ended."""
    metric = row["primary_metric"]
    value = row.get("dev", {}).get(metric)
    epochs = len(row.get("curve") or {})
    best = (f"{metric} {value:.4g} at epoch {row['best_epoch']} of {epochs}" if value is not None
            else f"no {metric} on dev")
    ended = f", stopped early by --patience {early_stop['patience']}" if early_stop else ""
    return f"done: {best}, {row.get('updates', 0):,} updates, {format_duration(row['wall_time_s'])}{ended}"


def say(line: str) -> None:
    """One line on stdout in one write: runs trained at once print from several threads."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


class TrainLog:
    """Copies a train.py process's output into its train.log as it comes, keeping the last lines
    (a thread: the runner polls the run record meanwhile)."""

    def __init__(self, stream, log_path: Path):
        self.last_lines: List[str] = []
        self._thread = threading.Thread(target=self._copy, args=(stream, log_path), daemon=True)
        self._thread.start()

    def _copy(self, stream, log_path: Path) -> None:
        with open(log_path, "a") as log:
            for line in stream:
                log.write(line)
                log.flush()
                self.last_lines = (self.last_lines + [line])[-20:]

    def join(self, timeout_s: float = 30.0) -> None:
        self._thread.join(timeout_s)


POLL_S = 0.5
CHILD_STOP_TIMEOUT_S = 120.0


@dataclass
class TrainingOutcome:
    """How a train.py launch ended: its exit status, its one-line error (bad input), its last lines, its seconds."""
    code: int
    user_error: Optional[str]
    last_lines: List[str]
    seconds: float


class LocalTraining:
    """train.py as a child process, its output copied into the run's train.log; ``env`` adds to this
    process's environment (a GPU, a thread count)."""

    def __init__(self, command: List[str], log_path: Path, env: Optional[Dict[str, str]] = None):
        # train.py writes its one-line error here (under torchrun every worker does; a worker's exit 2
        # becomes torchrun's 1, so the file, not the exit status, says it was bad input).
        handle, self.error_file = tempfile.mkstemp(prefix="train_error-", suffix=".json")
        os.close(handle)
        os.unlink(self.error_file)
        # Unbuffered: the log is whole if the run dies.
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                        bufsize=1, env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}),
                                                            **{ERROR_FILE_VARIABLE: self.error_file}))
        self.log = TrainLog(self.process.stdout, log_path)
        self.start = time.monotonic()

    def done(self) -> bool:
        return self.process.poll() is not None

    def stop(self, signum: int) -> None:
        _stop_child(self.process, signum)

    def outcome(self) -> TrainingOutcome:
        code = self.process.wait()
        self.log.join()
        user_error = read_error_file(self.error_file)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.error_file)
        return TrainingOutcome(code, user_error, self.log.last_lines, time.monotonic() - self.start)


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
                    updates_at_start, started_s = int(progress["updates"]), time.monotonic() - start_time
                display.total = progress.get("total_updates") or run.planned_updates  # an early stop ends it sooner
                job_eta = job.observe(run, progress, time.monotonic() - start_time, updates_at_start, started_s)
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



class JobStage:
    """Which runs are training, for the line an interruption prints; and, with runs trained at once,
    the stop that every run's thread passes on to its train.py."""

    def __init__(self):
        self._started: List["PlannedRun"] = []
        self._running: Dict[Path, "PlannedRun"] = {}
        self._stopped: Dict[Path, "PlannedRun"] = {}
        self._stop_signum: Optional[int] = None
        self._changed = threading.Condition()

    @contextlib.contextmanager
    def running(self, run: "PlannedRun"):
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
        """Which runs the stop interrupted, and where each continues (call it once they have stopped)."""
        runs = [run for run in self._started if run.run_dir in self._stopped or run.run_dir in self._running]
        if not runs:
            return "while preparing the job"
        return "during " + ", ".join(f"{run.label} ({run.run_dir}; {_continues(run)})" for run in runs)


def _continues(run: "PlannedRun") -> str:
    if (run.run_dir / "result.json").exists():
        return "finished"
    updates = saved_updates(run.run_dir)
    return f"continues from update {updates:,}" if updates else "starts over: it saved no checkpoint yet"

