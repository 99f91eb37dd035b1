"""What the GLUE job shows while it runs: the plan, what each train.py adds to its run record (parameter
counts, resumes, dev metrics, early stops), each finished run's line, and the job's ETA."""
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional

from ...core.bitfit import format_trainable
from ...core.progress import format_duration
from ...core.run_record import RECORD_NAME, read_run_record

if TYPE_CHECKING:
    from .plan import PlannedRun


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
