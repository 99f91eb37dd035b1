"""The GLUE runner's PARALLEL and LAUNCHER: runs trained at once, or as submitit jobs, give the
results a sequential job gives; a stop reaches every run; bad settings are one line and exit 2."""
import argparse
import json
import os
import re
import subprocess
import sys

import pytest

import tiny
from test_glue_run import SCRIPT, glue_script, small_glue_dir

from fairseq_ext.experiments import glue_run
from fairseq_ext.experiments.glue_run import dispatch, settings
from fairseq_ext.experiments.glue_run.results import MEASURED_FIELDS


# Three runs of two updates each: with PARALLEL=2 the third waits for a free slot.
GRID = {"TASKS": "CoLA", "SEEDS": "1 2 3"}
GRID_ARGS = ("--batch-size", "8", "--max-update", "2")
PATHS = ("run_dir", "predictions")  # each job's own folder


@pytest.fixture(scope="module")
def small_glue(tmp_path_factory):
    return small_glue_dir(tmp_path_factory.mktemp("glue"))


@pytest.fixture(scope="module")
def sequential(small_glue, tmp_path_factory):
    out = tmp_path_factory.mktemp("sequential")
    glue_script(dict(GRID, GLUE_DIR=str(small_glue), OUTPUT_DIR=str(out)), *GRID_ARGS)
    return out


def comparable(out):
    """results.json's rows without the machine's measurements and folder names; the tables above the
    per-run list, the cost table aside (both have the machine's measurements); the leaderboard files."""
    rows = [{key: value for key, value in row.items() if key not in MEASURED_FIELDS + PATHS}
            for row in json.loads((out / "results.json").read_text())["runs"]]
    table = re.sub(r"## Cost\n.*?(?=## |\Z)", "", (out / "results.md").read_text().split("## Every run")[0], flags=re.S)
    predictions = {str(path.relative_to(out)): path.read_text() for path in sorted((out / "predictions").rglob("*.tsv"))}
    return rows, table, predictions


def test_parallel_runs_give_the_sequential_results_bit_for_bit(small_glue, sequential, tmp_path):
    out = tmp_path / "parallel"
    result = glue_script(dict(GRID, GLUE_DIR=str(small_glue), OUTPUT_DIR=str(out), PARALLEL="2"), *GRID_ARGS)
    rows, table, predictions = comparable(out)
    assert len(rows) == 3 and predictions
    assert (rows, table, predictions) == comparable(sequential)  # floats compared exactly
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # With runs at once every progress line and echoed dev line names its run.
    lines = result.stdout.splitlines()
    assert sum(" updates (" in line for line in lines) >= 3
    assert all(line.startswith("  CoLA bitfit-ofa lr 0.003 seed ") for line in lines
               if " updates (" in line or "valid: loss" in line or "trainable params" in line)


def test_submitit_local_jobs_give_the_sequential_results(small_glue, sequential, tmp_path):
    """Two of the grid's three runs, each a job of submitit's local executor: the same rows."""
    pytest.importorskip("submitit")
    out = tmp_path / "submitit"
    glue_script(dict(GRID, SEEDS="1 2", GLUE_DIR=str(small_glue), OUTPUT_DIR=str(out), LAUNCHER="submitit_local"),
                *GRID_ARGS)
    rows, _, predictions = comparable(out)
    assert rows == [row for row in comparable(sequential)[0] if row["seed"] in (1, 2)] and predictions
    assert len(list((out / "submitit").glob("*_result.pkl"))) == 2  # one job per run


def _train_py_processes(out):
    """train.py processes still training into ``out`` (their command lines name its folders)."""
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            command = open(f"/proc/{pid}/cmdline", "rb").read().decode(errors="replace")
        except OSError:
            continue
        if "fairseq_ext.training.main" in command and str(out) in command:
            found.append(pid)
    return found


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_a_stop_reaches_every_run_at_once_and_prints_one_resume_line(small_glue, tmp_path):
    """SIGINT to the runner alone (not to its process group): each running train.py gets it, saves and ends;
    one line names both runs and the command, PARALLEL included."""
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", GLUE_DIR=str(small_glue), TASKS="CoLA STS-B", OUTPUT_DIR=str(out),
               PARALLEL="2", SAVE_MINUTES="0.01", PROGRESS_SECONDS="1")
    job = subprocess.Popen(["bash", str(SCRIPT), "--batch-size", "4", "--max-update", "200"], env=env,
                                cwd=tiny.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    records = [out / "runs" / task / "bitfit-ofa" / "lr0.003-seed1" / "run_record.json" for task in ("CoLA", "STS-B")]

    stdout, stderr = tiny.interrupt_when(job, lambda: all(tiny.last_saved_updates(record) for record in records))
    stops = [line for line in stderr.splitlines() if "glue_bitfit: SIGINT: stopped during" in line]
    assert len(stops) == 1 and "CoLA bitfit-ofa" in stops[0] and "STS-B bitfit-ofa" in stops[0], stderr
    assert "PARALLEL=2" in stops[0].split("run the same command: ", 1)[1]
    for record in records:
        assert json.loads(record.read_text())["launches"][-1]["status"] == "interrupted"
    assert not _train_py_processes(out)


def parsed(*argv):
    return settings.parse(list(argv), glue_run.PROG)


@pytest.mark.parametrize("argv, needle", [
    (["--parallel", "0"], "PARALLEL '0': expected a positive integer"),
    (["--parallel", "two"], "PARALLEL 'two': expected a positive integer"),
    (["--launcher", "slurm"], "LAUNCHER 'slurm': expected local, submitit or submitit_local"),
    (["--launcher", "submitit", "--slurm-mem-gb", "lots"], "SLURM_MEM_GB 'lots'"),
    (["--parallel", "2", "--nproc", "2"], "NPROC 2, NNODES 1: torchrun runs are trained one at a time"),
])
def test_bad_parallel_and_launcher_settings_are_one_line_and_exit_2(tmp_path, capsys, argv, needle):
    out = tmp_path / "out"
    glue = tmp_path / "glue" / "CoLA"
    glue.mkdir(parents=True)
    (glue / "train.tsv").write_text("")
    result = tiny.run_main(glue_run.main, capsys, "--glue-dir", glue.parent, "--output-dir", out, *argv)
    tiny.assert_one_line_error(result, needle)
    assert not out.exists()


def test_submitit_missing_names_the_package_to_install(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "submitit", None)  # import submitit now fails as if not installed
    glue = tmp_path / "glue" / "CoLA"
    glue.mkdir(parents=True)
    (glue / "train.tsv").write_text("")
    result = tiny.run_main(glue_run.main, capsys, "--glue-dir", glue.parent, "--output-dir", tmp_path / "out",
                           "--launcher", "submitit")
    tiny.assert_one_line_error(result, "LAUNCHER submitit", "pip install submitit", "pip install -e .[sweep]")


def _dispatch(monkeypatch, gpus, parallel, passthrough=()):
    monkeypatch.setattr(dispatch, "visible_gpus", lambda: list(gpus))
    args = parsed("--parallel", str(parallel))
    glue_run._check_settings(args, list(passthrough))
    return glue_run.Dispatch(args, list(passthrough))


def test_each_run_at_once_gets_its_own_gpu_and_no_more_runs_than_gpus(monkeypatch):
    assert _dispatch(monkeypatch, ["3", "5"], 2).slot_envs == [{"CUDA_VISIBLE_DEVICES": "3"},
                                                               {"CUDA_VISIBLE_DEVICES": "5"}]
    with pytest.raises(glue_run.UserError, match="PARALLEL 3: this machine has 2 CUDA GPUs"):
        _dispatch(monkeypatch, ["0", "1"], 3)


def test_on_cpu_runs_at_once_share_the_cores_unless_omp_num_threads_is_set(monkeypatch):
    monkeypatch.setattr(dispatch, "available_cores", lambda: 8)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    assert _dispatch(monkeypatch, [], 3).slot_envs == [{"OMP_NUM_THREADS": "2"}] * 3
    assert _dispatch(monkeypatch, ["0"], 16, ["--cpu"]).slot_envs == [{"OMP_NUM_THREADS": "1"}] * 16
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert _dispatch(monkeypatch, [], 2).slot_envs == [{}, {}]


def test_the_job_eta_shares_the_work_left_among_the_runs_at_once():
    spec = argparse.Namespace(name="CoLA")
    runs = [argparse.Namespace(run_dir=f"r{i}", spec=spec, planned_updates=100, finished=False,
                                 updates_done=0) for i in range(4)]
    for concurrency in (1, 2, 8):
        job = glue_run.JobProgress(runs, 60.0, concurrency)
        eta = job.observe(runs[0], {"updates": 10, "total_updates": 100}, 10.0, 0)  # 1 s an update
        assert eta == pytest.approx((90 + 3 * 100) / min(concurrency, 4))  # no more runs at once than runs left


def test_the_job_eta_counts_start_up_once_a_run_not_against_its_first_updates():
    spec = argparse.Namespace(name="CoLA")
    runs = [argparse.Namespace(run_dir=f"r{i}", spec=spec, planned_updates=100, finished=False,
                                 updates_done=0) for i in range(3)]
    job = glue_run.JobProgress(runs, 60.0, 1)
    # 30 s of start-up, then 10 updates in 10 s: 1 s an update, and 30 s for each run not begun
    assert job.observe(runs[0], {"updates": 10, "total_updates": 100}, 40.0, 0, 30.0) == pytest.approx(90 + 2 * 130)
    job.finished(runs[0], 100, 300.0)  # a finished run's all-in time per update (3 s) is used from then on
    assert job.observe(runs[1], {"updates": 10, "total_updates": 100}, 40.0, 0, 30.0) == pytest.approx(3 * (90 + 100))


def test_after_a_resume_the_plan_and_eta_count_only_what_is_left():
    """A run stopped at update 60 of 100 plans 40 updates; its speed is this launch's own (from update 60 on),
    and it is charged no start-up once launched, while a run not begun is."""
    spec = argparse.Namespace(name="CoLA")
    runs = [argparse.Namespace(run_dir=f"r{i}", spec=spec, planned_updates=100, finished=False, updates_done=done,
                               label=f"CoLA run {i}", train_rows=800) for i, done in enumerate((60, 0))]
    job = glue_run.JobProgress(runs, 60.0, 1)
    assert job.plan_lines()[0].startswith("plan: 2 runs (0 done earlier), 140 updates to train")
    assert "60 of 100 updates done, 40 left" in job.plan_lines()[1]
    # 20 s of start-up, then updates 60 -> 70 in 10 s: 1 s an update; the run not begun adds its start-up.
    assert job.observe(runs[0], {"updates": 70, "total_updates": 100}, 30.0, 60, 20.0) == pytest.approx(30 + 100 + 20)


@pytest.mark.parametrize("parallel", [1, 2])
def test_a_restarted_job_resumes_its_interrupted_runs_first_and_gives_rows_in_the_plan_s_order(monkeypatch, parallel):
    runs = [argparse.Namespace(label=f"run {i}", updates_done=done) for i, done in enumerate((0, 30, 0, 12))]
    trained = []

    def train_or_reuse(run, *_, **__):
        trained.append(run.label)
        return {"run": run.label}
    monkeypatch.setattr(dispatch, "train_or_reuse", train_or_reuse)
    rows = _dispatch(monkeypatch, [], parallel).train(runs, parsed("--parallel", str(parallel)), None, None)
    assert rows == [{"run": run.label} for run in runs]
    if parallel == 1:  # the interrupted runs, in the plan's order among them, then the new ones
        assert trained == ["run 1", "run 3", "run 0", "run 2"]
    # Across nodes every node's runner keeps the plan's order.
    assert dispatch.training_order(runs, nnodes=2) == [0, 1, 2, 3]
    assert dispatch.training_order(runs, nnodes=1) == [1, 3, 0, 2]
