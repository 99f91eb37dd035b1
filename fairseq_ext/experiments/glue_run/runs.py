"""Launching train.py for one run of the GLUE job: as a child process or a submitit job, its log copied
into the run folder, its progress shown (``console``), and a stop passed on so that train.py saves
before it ends."""
import contextlib
import os
import signal
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Dict, List, Optional

from ...core import interrupts
from ...core.errors import ERROR_FILE_VARIABLE, UserError, one_line, read_error_file
from ...core.progress import ConsoleProgress, format_duration
from ...core.run_record import RECORD_NAME
from ...training.options import TRAIN_PROG

from .console import JobProgress, RecordEcho, saved_updates
from .run_file import RunFile, finished_result

if TYPE_CHECKING:
    from .plan import PlannedRun


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

    def wait(self, timeout_s: float) -> bool:
        """Whether train.py has ended, waiting up to ``timeout_s`` for it (and no longer than it takes)."""
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            return False
        return True

    def stop(self, signum: int) -> None:
        _stop_child(self.process, signum)

    def outcome(self) -> TrainingOutcome:
        code = self.process.wait()
        self.log.join()
        user_error = read_error_file(self.error_file)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.error_file)
        return TrainingOutcome(code, user_error, self.log.last_lines, time.monotonic() - self.start)


def launch_train_py_in_job(command: List[str], log_path: str, env: Dict[str, str]) -> TrainingOutcome:
    """What a submitit job runs: train.py as on this machine; a stop the job gets (scancel, SLURM's time
    limit, submitit's local cancel) is passed on to train.py, which saves and ends."""
    training = LocalTraining(command, Path(log_path), env)
    with interrupts.handled():
        try:
            while not training.wait(POLL_S):
                pass
        except interrupts.Interrupted as stop:
            training.stop(stop.signum)
    return training.outcome()


class SubmititTraining:
    """train.py in a job submitted through submitit (SLURM, or submitit's local executor)."""

    _submitting = threading.Lock()  # one submission at a time: runs are submitted from several threads

    def __init__(self, executor, command: List[str], log_path: Path, env: Optional[Dict[str, str]] = None):
        with self._submitting:
            self.job = executor.submit(launch_train_py_in_job, command, str(log_path), dict(env or {}))
        self.log_path = log_path

    def wait(self, timeout_s: float) -> bool:
        if not self.job.done():
            time.sleep(timeout_s)
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


def _watch_launch(command: List[str], run: "PlannedRun", job: JobProgress, stage: "JobStage",
                 start: StartTraining = LocalTraining) -> float:
    """Run train.py (``start`` launches it); keep its whole log in the run folder's train.log; show its
    progress, the job's ETA and each validation's dev metrics; pass a stop signal on and wait for it to
    save and end.  The seconds train.py ran."""
    echo = RecordEcho(run.run_dir / RECORD_NAME)
    log_path = run.run_dir / "train.log"
    training = start(command, log_path)
    display = ConsoleProgress(run.label, run.planned_updates, interval_s=job.interval_s, bar=job.bar)
    start_time, updates_at_start = time.monotonic(), None
    finished = False
    try:
        while True:
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
            finished = training.wait(POLL_S)
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


def launch_train_py(command: List[str], run: "PlannedRun", job: JobProgress, stage: "JobStage",
                start: StartTraining = LocalTraining) -> float:
    """Launch train.py once (``start``) for ``run`` and watch it to its end (``_watch_launch``); the seconds
    this run has trained over all its launches (resumes included)."""
    earlier = RunFile.read(run.run_dir).seconds
    start_time, trained = time.time(), None
    try:
        trained = _watch_launch(command, run, job, stage, start)
    finally:  # an interrupted launch counts too; a queued SLURM job's wait does not, once its time is known
        run_file = RunFile.read(run.run_dir)
        run_file.seconds = round(earlier + (trained if trained is not None else time.time() - start_time), 1)
        run_file.write(run.run_dir)
    return run_file.seconds


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
        """Raise the job's stop in a run's thread (_watch_launch then stops its train.py)."""
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
    if finished_result(run.run_dir) is not None:
        return "finished"
    updates = saved_updates(run.run_dir)
    return f"continues from update {updates:,}" if updates else "starts over: it saved no checkpoint yet"

