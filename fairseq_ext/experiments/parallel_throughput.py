"""How many train.py runs at once give a CPU the most updates a second (the GLUE runner's PARALLEL)?

For each mode and round: one run with every core's thread, then ``--runs`` runs side by side with
cores / runs threads each (as ``PARALLEL`` gives them), each a train.py process on the same real GLUE
task as the runner starts it.  Runs started together wait for each other before their first
update.  Every update's start and end is recorded on the machine's one monotonic clock, so the
side-by-side rate is counted only while every run is past its warm-up and none has finished: the
machine's updates a second with all runs training, against one run's.

    python -m fairseq_ext.experiments.parallel_throughput --glue-dir glue_data --task STS-B \\
        --modes bitfit-all full --runs 2 --rounds 2 --output-dir outputs/parallel_throughput

A job of many runs finishes sooner at the higher rate; a single run finishes sooner alone.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Sequence, Tuple

from ..core.cpu_threads import available_cores
from ..core.errors import UserError, exit_on_user_error
from ..core.files import write_report, write_text_atomically
from ..core.timing_cli import glue_task, timing_parser
from ..training.glue_recipe import default_recipe, train_command
from ..training.options import FULL
from ..training.timed_updates import UpdateTime, check_train_py_modes, prepared_timing_task, train_timed

PROG = "parallel_throughput"


def ready_file(times_file: str) -> str:
    """Beside a run's times file: the run is ready for its first update."""
    return times_file + ".ready"


@dataclass(frozen=True)
class WorkerJob:
    """One train.py run a worker process trains and times."""

    argv: List[str]
    updates: int
    times_file: str  # where the worker writes each update's [start, end]
    ready_files: List[str]  # one per run started together: each run's first update waits for all of them

    @property
    def ready_file(self) -> str:
        return ready_file(self.times_file)


def machine_rate(timelines: Sequence[Sequence[UpdateTime]], warmup: int) -> Tuple[float, List[float]]:
    """Updates a second of runs trained side by side (and of each), counted from when the last one is past
    its ``warmup`` updates to when the first one finishes."""
    start = max(timeline[warmup - 1].end for timeline in timelines)
    end = min(timeline[-1].end for timeline in timelines)
    if end <= start:
        raise UserError(f"--updates: the runs did not train side by side after their {warmup} warm-up updates; "
                        "give more updates")
    counts = [sum(1 for update in timeline if start < update.end <= end) for timeline in timelines]
    if 0 in counts:
        raise UserError(f"--updates: a run trained no update while all trained after their {warmup} warm-up "
                        "updates; give more updates")
    per_run = [count / (end - start) for count in counts]
    return sum(per_run), per_run


def wait_for_every_run(job: WorkerJob, timeout_s: float = 600.0) -> None:
    """Say this run is ready for its first update, and wait until every run started with it is: interpreter
    starts and model loading differ by seconds, and the timed updates should overlap from the first."""
    Path(job.ready_file).touch()
    deadline = time.monotonic() + timeout_s
    while not all(Path(name).exists() for name in job.ready_files):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the runs started with {job.times_file} were not all ready within {timeout_s:.0f} s")
        time.sleep(0.01)


def worker_jobs(task, spec, mode: str, label: str, count: int, args) -> List[WorkerJob]:
    """``count`` runs of ``mode`` at its default recipe, started together (``label`` names their files)."""
    recipe = default_recipe(mode, spec.name, task.train_rows, task.model_params)
    times = [str(task.workdir / f"{mode}-{label}-{i}.times.json") for i in range(count)]
    return [WorkerJob(train_command(spec, task.model, task.data_dir, task.workdir / f"{mode}-{label}-{i}", mode, recipe,
                                    recipe.lrs[0], 1, task.train_rows, 1, args.train_py_args.split(), 128).args,
                      args.updates, times[i], [ready_file(t) for t in times]) for i in range(count)]


def train_side_by_side(jobs: Sequence[WorkerJob], threads: int) -> List[List[UpdateTime]]:
    """Start a worker process for each job at once, ``threads`` threads each; every update's times."""
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    workers = []
    for job in jobs:
        spec, log = Path(job.times_file).with_suffix(".job.json"), Path(job.times_file).with_suffix(".log")
        spec.write_text(json.dumps(asdict(job)))
        with open(log, "w") as output:  # a file, not a pipe: a full pipe would stall a run while it is timed
            workers.append((subprocess.Popen([sys.executable, "-m", f"fairseq_ext.experiments.{PROG}", "--worker",
                                              str(spec)], env=env, stdout=output, stderr=subprocess.STDOUT), log))
    for worker, log in workers:
        if worker.wait() != 0:
            raise RuntimeError(f"a timed train.py run failed (exit {worker.returncode}):\n{log.read_text()[-3000:]}")
    return [[UpdateTime(*pair) for pair in json.loads(Path(job.times_file).read_text())] for job in jobs]


def markdown(rows: List[dict], summary: List[dict]) -> str:
    lines = ["| task | mode | round | one run: threads | updates/s | side by side: runs × threads | updates/s "
             "(each run) | side by side / one run |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for row in rows:
        each = " + ".join(f"{rate:.3f}" for rate in row["side_by_side_each"])
        lines.append(f"| {row['task']} | {row['mode']} | {row['round']} | {row['threads']} | {row['one_run']:.3f} | "
                     f"{row['runs']} × {row['threads_each']} | {row['side_by_side']:.3f} ({each}) | "
                     f"{row['ratio']:.2f} |")
    lines += ["", "| mode | side by side / one run (median over rounds) |", "|---|---:|"]
    lines += [f"| {entry['mode']} | **{entry['ratio']:.2f}** |" for entry in summary]
    return "\n".join(lines) + "\n"


def build_parser():
    parser = timing_parser(PROG, __doc__, ["bitfit-all", FULL])
    parser.add_argument("--runs", type=int, default=available_cores(), help="runs side by side (default: the cores)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--updates", type=int, default=120, help="updates each run trains")
    parser.add_argument("--warmup", type=int, default=20, help="updates of each run not counted")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a run this measurement started: its job file
    return parser


@exit_on_user_error
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.worker:  # a process the measurement started: train, and write the times
        job = WorkerJob(**json.loads(Path(args.worker).read_text()))
        times = train_timed(job.argv, job.updates, lambda trainer: wait_for_every_run(job))
        write_text_atomically(job.times_file, json.dumps([[update.start, update.end] for update in times]))
        return
    glue_dir, spec = glue_task(args)
    check_train_py_modes(args.modes)
    cores = available_cores()
    if not 2 <= args.runs <= cores:
        raise UserError(f"--runs {args.runs}: expected 2 to {cores} (this machine's cores)")
    if args.rounds < 1 or args.warmup < 1 or args.updates < args.warmup + 2:
        raise UserError("--rounds and --warmup: expected positive integers, and --updates at least --warmup + 2")
    rows = []
    with prepared_timing_task(glue_dir, spec, "parallel-throughput-") as task:
        for round_number in range(1, args.rounds + 1):
            for mode in args.modes:
                threads_each = max(1, cores // args.runs)
                print(f"{spec.name} {mode}, round {round_number}: one run, {cores} threads ...", file=sys.stderr, flush=True)
                alone = worker_jobs(task, spec, mode, f"{round_number}-alone", 1, args)
                one, _ = machine_rate(train_side_by_side(alone, cores), args.warmup)
                print(f"{spec.name} {mode}, round {round_number}: {args.runs} runs × {threads_each} threads ...",
                      file=sys.stderr, flush=True)
                side_by_side = worker_jobs(task, spec, mode, f"{round_number}-together", args.runs, args)
                together, each = machine_rate(train_side_by_side(side_by_side, threads_each), args.warmup)
                rows.append({"task": spec.name, "mode": mode, "round": round_number, "threads": cores,
                             "one_run": round(one, 4), "runs": args.runs, "threads_each": threads_each,
                             "side_by_side": round(together, 4), "side_by_side_each": [round(r, 4) for r in each],
                             "ratio": round(together / one, 4), "updates": args.updates, "warmup": args.warmup,
                             "train_py_args": args.train_py_args})
    summary = [{"mode": mode, "ratio": round(statistics.median(r["ratio"] for r in rows if r["mode"] == mode), 4)}
               for mode in args.modes]
    report = markdown(rows, summary)
    written = write_report(args.output_dir, PROG, {"rows": rows, "summary": summary}, report)
    print(report)
    print(written)


if __name__ == "__main__":
    main()
