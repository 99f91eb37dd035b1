"""run_scripts/glue_bitfit.sh end to end on the embedded MiniLM: on GLUE folders the tests write
(synthetic_glue: every clone runs these), and on the real GLUE files where they exist (an extra layer)."""
import json
import os
import re
import shutil
import socket
import subprocess

import pytest

import tiny
from fairseq_ext.experiments import glue_run
from fairseq_ext.experiments.glue_run import base_identity, plan, settings
from fairseq_ext.core.glue_tasks import TASK_NAMES, TASKS
from fairseq_ext.experiments.glue_run.results import MEASURED_FIELDS, results_markdown
from synthetic_glue import make_glue_dir

SCRIPT = tiny.REPO / "run_scripts" / "glue_bitfit.sh"
needs_real_glue = pytest.mark.skipif(not tiny.REAL_GLUE.is_dir(),
                                     reason="no real GLUE files (FAIRSEQ_EXT_TEST_GLUE, default ../shared/glue)")
TRAIN_ROWS, ROWS = 400, 40  # a synthetic task's training rows, and its dev and test rows
STS_B_SUBSET = 300  # glue_output trains STS-B on a sample of its rows (TRAIN_SUBSET=STS-B=300), CoLA on all


def glue_script(env, *args, check=True):
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    result = subprocess.run(["bash", str(SCRIPT), *args], env=full_env, capture_output=True, text=True, cwd=tiny.REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture
def runner_in_process(monkeypatch, capsys):
    """The runner without a new process: the main() the script execs, given the script's environment;
    returns (exit status, stdout, stderr). The script's own boundary (exec, exit status, one line) and
    training are tested through bash; what the runner decides and says without training (a check's
    line, a run done earlier or by another job) is tested here, at no interpreter start."""
    def run(env, *args):
        for setting in settings.SETTINGS:
            monkeypatch.delenv(setting.env, raising=False)
        monkeypatch.setenv("GLUE_BITFIT_SCRIPT", str(SCRIPT))
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        return tiny.run_main(glue_run.main, capsys, "--from-env", "--", *args)

    return run  # the logging main() sets up for its process: conftest's root_logger_as_it_was


@pytest.fixture(scope="module")
def glue(tmp_path_factory):
    """CoLA, SST-2, STS-B, MRPC and RTE in GLUE's layout, written here."""
    return make_glue_dir(tmp_path_factory.mktemp("glue"), rows_per_split=ROWS, train_rows=TRAIN_ROWS)


@pytest.fixture(scope="module")
def glue_output(glue, tmp_path_factory):
    out = tmp_path_factory.mktemp("glue_out")
    env = {"GLUE_DIR": str(glue), "OUTPUT_DIR": str(out)}
    first = glue_script(dict(env, TASKS="CoLA STS-B", TRAIN_SUBSET=f"STS-B={STS_B_SUBSET}"), "--max-update", "4")
    full = glue_script(dict(env, TASKS="CoLA", MODE="full"), "--max-update", "4")
    return out, first, full


def test_results_have_the_official_metrics_for_every_mode(glue_output):
    out, first, *_ = glue_output
    runs = json.loads((out / "results.json").read_text())["runs"]
    by_key = {(r["task"], r["mode"]): r for r in runs}
    assert set(by_key) == {("CoLA", "bitfit-ofa"), ("STS-B", "bitfit-ofa"), ("CoLA", "full")}
    assert set(by_key["CoLA", "bitfit-ofa"]["dev"]) >= {"mcc", "accuracy"}
    assert set(by_key["STS-B", "bitfit-ofa"]["dev"]) >= {"pearson", "spearman"}
    # Every training row is accounted for; TRAIN_SUBSET=STS-B=N samples STS-B's rows only.
    assert by_key["CoLA", "bitfit-ofa"]["train_rows"] == TRAIN_ROWS and by_key["CoLA", "bitfit-ofa"]["train_subset"] is None
    assert by_key["STS-B", "bitfit-ofa"]["train_rows"] == by_key["STS-B", "bitfit-ofa"]["train_subset"] == STS_B_SUBSET
    manifest = json.loads((out / "data" / "CoLA" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows_read"] == manifest["splits"]["train"]["rows_written"] == TRAIN_ROWS
    bitfit, full = by_key["CoLA", "bitfit-ofa"], by_key["CoLA", "full"]
    assert bitfit["trainable"] < 0.01 * bitfit["total"] and full["trainable"] == full["total"]
    # Each epoch's training and dev loss, as the run's record has them.
    record = json.loads((out / "runs" / "CoLA" / "bitfit-ofa" / "lr0.003-seed1" / "run_record.json").read_text())
    losses = {tag: [entry["values"]["loss"] for entry in record["stats"] if entry["tag"] == tag]
              for tag in ("train", "valid")}
    assert bitfit["loss_curve"] == {"1": {"train": losses["train"][-1], "dev": losses["valid"][-1]}}
    assert bitfit["updates"] == full["updates"] == 4
    assert "CoLA bitfit-ofa lr 0.003 seed 1: training" in first.stdout
    # Live progress comes from each run's record: its parameter counts and dev metrics.
    assert "trainable params: 164,738 || all params: 22,862,594" in first.stdout
    assert "epoch 1 valid: loss " in first.stdout and " mcc " in first.stdout
    assert "CoLA bitfit-ofa lr 0.003 seed 1: done: mcc " in first.stdout and ", 4 updates, " in first.stdout
    assert first.stdout.strip().splitlines()[-1].endswith(f"{out / 'predictions'}")


def test_markdown_table_compares_modes_and_plot_is_a_png(glue_output):
    out, *_ = glue_output
    table = (out / "results.md").read_text()
    assert "| full |" in table and "| bitfit-ofa |" in table
    assert "CoLA (mcc)" in table and "STS-B (pearson/spearman)" in table
    for figure in ("curves.png", "loss_curves.png"):
        assert (out / figure).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # results.tex holds the same numbers, mode by mode, for a paper.
    latex = (out / "results.tex").read_text()
    modes = [line.split(" | ")[0][2:] for line in table.splitlines() if line.startswith("| bitfit") or
             line.startswith("| full")]
    for mode in modes:
        markdown_line = next(line for line in table.splitlines() if line.startswith(f"| {mode} |"))
        latex_line = next(line.strip() for line in latex.splitlines() if line.strip().startswith(f"{mode} &"))
        numbers = [re.findall(r"\d+\.\d+", line.split(mode, 1)[1]) for line in (markdown_line, latex_line)]
        assert numbers[0] == numbers[1] and numbers[0]


def test_leaderboard_predictions_cover_the_test_set(glue_output):
    out, *_ = glue_output
    lines = (out / "predictions" / "bitfit-ofa" / "CoLA.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 1 + ROWS
    assert {line.split("\t")[1] for line in lines[1:]} <= {"0", "1"}
    sts = (out / "predictions" / "bitfit-ofa" / "STS-B.tsv").read_text().splitlines()
    assert len(sts) == 1 + ROWS and all(0.0 <= float(line.split("\t")[1]) <= 5.0 for line in sts[1:])


def test_finished_runs_are_not_repeated(glue, glue_output, runner_in_process):
    status, stdout, _ = runner_in_process({"GLUE_DIR": str(glue), "OUTPUT_DIR": str(glue_output[0]), "TASKS": "CoLA"},
                                          "--max-update", "4")
    assert status == 0 and "done earlier" in stdout and ": training (" not in stdout
    assert "nothing left to train" in stdout


@needs_real_glue
def test_the_real_glue_files_end_to_end(tmp_path):
    """The extra layer: the real CoLA and STS-B, every row accounted for, leaderboard files of the real test sets."""
    out = tmp_path / "out"
    glue_script({"GLUE_DIR": str(tiny.REAL_GLUE), "OUTPUT_DIR": str(out), "TASKS": "CoLA STS-B"}, "--max-update", "2")
    runs = {r["task"]: r for r in json.loads((out / "results.json").read_text())["runs"]}
    assert runs["CoLA"]["train_rows"] == 8551 and runs["STS-B"]["train_rows"] == 5749
    assert set(runs["CoLA"]["dev"]) >= {"mcc", "accuracy"} and set(runs["STS-B"]["dev"]) >= {"pearson", "spearman"}
    manifest = json.loads((out / "data" / "CoLA" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows_read"] == manifest["splits"]["train"]["rows_written"] == 8551
    assert len((out / "predictions" / "bitfit-ofa" / "CoLA.tsv").read_text().splitlines()) == 1 + 1063
    assert len((out / "predictions" / "bitfit-ofa" / "STS-B.tsv").read_text().splitlines()) == 1 + 1379


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"GLUE_DIR": "/nonexistent/glue_data"}, "GLUE_DIR /nonexistent/glue_data: no such directory"),
        ({}, "GLUE_DIR is not set and its default, glue_data, is not a directory"),
        ({"GLUE_DIR": "{glue}/CoLA/train.tsv"}, "is a file"),
        ({"GLUE_DIR": "{glue}", "TASKS": "CoLB"}, "CoLB"),
        ({"GLUE_DIR": "{glue}", "TASKS": "QNLI"}, "download_glue_data.py"),
        ({"GLUE_DIR": "{glue}", "MODE": "full rand_gauss"}, "modes: full, head, bitfit (with BITFIT_TERMS"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(glue, tmp_path, monkeypatch, runner_in_process, env, needle):
    out = tmp_path / "out"
    env = {name: value.format(glue=glue) for name, value in env.items()}
    monkeypatch.chdir(tmp_path)  # where no glue_data folder is
    status, _, stderr = runner_in_process(dict(env, OUTPUT_DIR=str(out)))
    assert status == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("glue_bitfit: error: ") and needle in lines[0], stderr
    assert not out.exists()  # a failed start leaves no empty OUTPUT_DIR behind


def test_the_script_s_bad_input_is_one_line_and_exit_2(glue, tmp_path):
    """Through bash and a fresh interpreter, as a user meets it: no traceback, nothing else on stderr."""
    taken = tmp_path / "results"
    taken.write_text("not a folder")
    result = glue_script({"GLUE_DIR": str(glue), "TASKS": "CoLA", "OUTPUT_DIR": str(taken)}, check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines == [f"glue_bitfit: error: OUTPUT_DIR {taken}: is a file, not a folder"], result.stderr


def test_ctrl_c_stops_with_one_line_and_the_same_command_resumes_mid_epoch(glue, tmp_path):
    """SIGINT to the runner: train.py gets it, leaves whole checkpoints; the job ends with exit 130 and one
    line naming the run and the command that resumes it; that command finishes the run from its last save."""
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", GLUE_DIR=str(glue), TASKS="CoLA", OUTPUT_DIR=str(out),
               TRAIN_SUBSET="400", SAVE_MINUTES="0.01", PROGRESS_SECONDS="1")
    args = ["--batch-size", "8", "--max-update", "40"]  # 50 updates an epoch
    job = subprocess.Popen(["bash", str(SCRIPT), *args], env=env, cwd=tiny.REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    record = out / "runs" / "CoLA" / "bitfit-ofa" / "lr0.003-seed1" / "run_record.json"
    # mid-epoch, after a few progress lines
    stdout, stderr = tiny.interrupt_when(job, lambda: (tiny.last_saved_updates(record) or 0) >= 25)
    assert " updates (" in stdout and "ETA" in stdout and "log: " in stdout  # live progress, and where the log is
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("glue_bitfit: SIGINT: stopped during CoLA bitfit-ofa lr 0.003 seed 1"), stderr
    resume = last.split("run the same command: ", 1)[1]
    assert "TASKS=CoLA" in resume and "bash" in resume and "--max-update 40" in resume
    run_dir = record.parent
    assert not [p.name for p in run_dir.iterdir() if p.is_dir() or ".tmp" in p.name]
    assert read_last_launch(record)["status"] == "interrupted"

    again = subprocess.run(["bash", "-c", resume], env=dict(env, TASKS="", SAVE_MINUTES=""), cwd=tiny.REPO,
                           capture_output=True, text=True)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "resuming the interrupted run" in again.stdout
    assert json.loads((run_dir / "run.json").read_text())["result"]["updates"] == 40


def test_a_stopped_job_keeps_the_rows_of_the_runs_it_finished(glue, tmp_path):
    """results.json is written as each run finishes, not only when the job ends: stopped during its second
    run, a job's ledger holds its first run's row, as that run's folder recorded it."""
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", GLUE_DIR=str(glue), TASKS="CoLA", OUTPUT_DIR=str(out),
               TRAIN_SUBSET="48", SEEDS="1 2")
    job = subprocess.Popen(["bash", str(SCRIPT), "--batch-size", "8", "--max-update", "12"], env=env, cwd=tiny.REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    runs = out / "runs" / "CoLA" / "bitfit-ofa"
    tiny.interrupt_when(job, lambda: (runs / "lr0.003-seed2" / "run_record.json").exists())
    first = json.loads((runs / "lr0.003-seed1" / "run.json").read_text())["result"]
    assert json.loads((out / "results.json").read_text())["runs"] == [first]
    # A run found finished in its folder goes into the ledger too, before the job trains anything else.
    (out / "results.json").unlink()
    job = subprocess.Popen(["bash", str(SCRIPT), "--batch-size", "8", "--max-update", "12"], env=env, cwd=tiny.REPO,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    tiny.interrupt_when(job, lambda: (out / "results.json").exists())
    assert json.loads((out / "results.json").read_text())["runs"] == [first]
    assert (out / "results.md").read_text() == results_markdown([first], {name: TASKS[name] for name in TASK_NAMES})


def read_last_launch(record):
    return json.loads(record.read_text())["launches"][-1]


def small_glue_dir(root, rows=40, edit=None):
    """CoLA and STS-B of ``rows`` rows a file, written as GLUE's; ``edit(task, split, lines)`` may spoil one of
    them (lines are bytes, the header first where the file has one)."""
    make_glue_dir(root, ("CoLA", "STS-B"), rows_per_split=rows)
    for task in ("CoLA", "STS-B"):
        for split in ("train", "dev", "test"):
            path = root / task / f"{split}.tsv"
            lines = path.read_bytes().rstrip(b"\n").split(b"\n")
            if edit:
                edit(task, split, lines)
            path.write_bytes(b"\n".join(lines) + b"\n")
    return root


def _bad_score(task, split, lines):
    if (task, split) == ("STS-B", "train"):
        lines[4] = lines[4].rsplit(b"\t", 1)[0] + b"\tabc"


def _latin1(task, split, lines):
    if (task, split) == ("STS-B", "train"):
        lines[2] = lines[2].replace(b"\t", "\t\u00e9 ".encode("latin-1"), 1)


@pytest.mark.parametrize("edit, needle", [(_bad_score, "STS-B/train.tsv:5:"),
                                          (_latin1, "STS-B/train.tsv:3: not UTF-8")])
def test_a_bad_file_in_a_later_task_stops_before_any_training(tmp_path, runner_in_process, edit, needle):
    glue = small_glue_dir(tmp_path / "glue", edit=edit)
    out = tmp_path / "out"
    status, _, stderr = runner_in_process({"GLUE_DIR": str(glue), "TASKS": "CoLA STS-B", "OUTPUT_DIR": str(out)})
    assert status == 2, stderr
    errors = [line for line in stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and needle in errors[0], stderr  # CoLA's preparation logs before it
    assert not (out / "runs").exists()


@pytest.mark.parametrize("env, args, needle", [
    ({"TRAIN_SUBSETS": "200 9000"}, [], f"TRAIN_SUBSETS 9000: CoLA has {TRAIN_ROWS} training rows"),
    ({"TRAIN_SUBSETS": "200 many"}, [], "TRAIN_SUBSETS '200 many'"),
    ({"MODE": "full rand_gauss"}, [], "MODE rand_gauss"),
    ({"BITFIT_TERMS": "foo"}, [], "BITFIT_TERMS foo: unknown term 'foo'"),
    ({"NPROC": "0"}, [], "NPROC '0'"),
    ({"EPOCHS": "0"}, [], "EPOCHS '0'"),
    ({"MAX_SEQ_LEN": "0"}, [], "MAX_SEQ_LEN '0'"),
    ({"LRS": "abc"}, [], "LRS 'abc'"),
    ({"BF16_BASE": "fast"}, [], "BF16_BASE 'fast': expected auto, on or off"),
    ({"TRAIN_SUBSET": "SST-2=many"}, [], "TRAIN_SUBSET 'SST-2=many': expected a positive integer (every task), or"),
    ({"TRAIN_SUBSET": "XNLI=50"}, [], "TRAIN_SUBSET 'XNLI=50'"),
    ({"TRAIN_SUBSET": "100 SST-2=50"}, [], "TRAIN_SUBSET '100 SST-2=50'"),
    ({"TRAIN_SUBSET": "RTE=50"}, [], "TRAIN_SUBSET names RTE, which this job does not train (TASKS: CoLA"),
    ({}, ["--max-update", "abc"], "argument --max-update: invalid int value: 'abc'"),
    ({}, ["--update-freq", "0"], "--update-freq '0'"),
])
def test_bad_settings_are_one_line_before_anything_is_written(glue, tmp_path, runner_in_process, env, args, needle):
    out = tmp_path / "out"
    status, _, stderr = runner_in_process(dict(env, GLUE_DIR=str(glue), TASKS="CoLA", OUTPUT_DIR=str(out)), *args)
    assert status == 2, stderr
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], stderr
    assert not out.exists()


def test_schedule_follows_the_batch_size_update_freq_epochs_and_workers_train_py_will_use():
    """The schedule is computed from the options as train.py's own parser reads them: the last of a flag
    given twice wins, whatever its spelling."""
    from fairseq_ext.plugin import patches
    from fairseq_ext.training.glue_recipe import schedule_updates
    from fairseq_ext.training.options import parse_options

    patches.install()
    rows = 8551  # CoLA's training rows

    def schedule(*args, epochs=2, world_size=1):
        options = parse_options(["DATA", "--task", "glue", "--glue-task", "CoLA", "--arch", "roberta",
                                 "--batch-size", "32", "--max-epoch", str(epochs), *args])
        return schedule_updates(options, rows, world_size)

    assert schedule() == 2 * 268
    assert schedule("--batch-size", "8") == 2 * 1069
    assert schedule("--batch-size", "16", "--max-sentences=8") == 2 * 1069  # the last wins
    assert schedule("--batch-size", "8", "--update-freq", "4") == 2 * 268
    assert schedule("--batch-size", "8", "--update-freq", "2,4", epochs=3) == 535 + 268 + 268
    assert schedule("--batch-size", "8", "--max-epoch", "1", world_size=2) == 535
    assert schedule("--batch-size", "8", "--max-update", "7") == 7


SUBSET_ENV = {"TASKS": "CoLA", "TRAIN_SUBSET": "48", "EPOCHS": "1"}
SUBSET_ARGS = ("--batch-size", "8", "--log-interval", "1")


@pytest.fixture(scope="module")
def cola_subset_run(glue, tmp_path_factory):
    """One epoch of 48 CoLA rows at batch 8 given after the script: 6 updates."""
    out = tmp_path_factory.mktemp("cola_subset")
    run_dir = out / "runs" / "CoLA" / "bitfit-ofa" / "lr0.003-seed1"
    run_dir.mkdir(parents=True)
    (run_dir / "elapsed.json").write_text('{"seconds": 1000.0}')  # as an interrupted launch before run.json left it
    glue_script(dict(SUBSET_ENV, GLUE_DIR=str(glue), OUTPUT_DIR=str(out)), *SUBSET_ARGS)
    return out


def test_learning_rate_decays_over_the_updates_actually_run(cola_subset_run):
    """With --batch-size after the script, the polynomial schedule ends at the run's last update
    (it used to assume the default batch size and reach lr 0 a quarter of the way in)."""
    out = cola_subset_run
    run = json.loads((out / "results.json").read_text())["runs"][0]
    assert run["updates"] == 6
    assert 1000 < run["wall_time_s"] < 2000  # every launch of the run counts
    run_dir = out / "runs" / "CoLA" / "bitfit-ofa" / "lr0.003-seed1"
    assert not (run_dir / "elapsed.json").exists()  # migrated into run.json
    assert json.loads((run_dir / "run.json").read_text())["seconds"] == run["wall_time_s"]
    log = (out / "runs" / "CoLA" / "bitfit-ofa" / "lr0.003-seed1" / "train.log").read_text()
    assert re.findall(r"'total_num_update': (\d+)", log)[0] == "6"
    lrs = [float(json.loads(line.split("| train_inner | ", 1)[1])["lr"]) for line in log.splitlines()
           if "| train_inner | " in line]
    assert len(lrs) == 6 and all(lr > 0 for lr in lrs[:-1])


def test_a_run_folder_is_reused_only_with_the_same_settings(glue, cola_subset_run, runner_in_process):
    env = dict(SUBSET_ENV, GLUE_DIR=str(glue), OUTPUT_DIR=str(cola_subset_run))
    for changed_env, args, needle in (({"TRAIN_SUBSET": "40"}, SUBSET_ARGS, "the training data"),
                                      ({}, ("--batch-size", "4", "--log-interval", "1"), "--batch-size 8 -> 4")):
        status, stdout, stderr = runner_in_process(dict(env, **changed_env), *args)
        assert status == 2, stdout + stderr
        errors = [line for line in stderr.splitlines() if "error" in line.lower()]
        assert len(errors) == 1 and "trained with other settings" in errors[0] and needle in errors[0], stderr
    status, stdout, _ = runner_in_process(env, *SUBSET_ARGS)
    assert status == 0 and "done earlier" in stdout


def test_a_run_whose_folder_was_deleted_is_done_by_its_row_in_results_json(glue, cola_subset_run, tmp_path,
                                                                           runner_in_process):
    """results.json keeps the settings each run was trained with: with the run folders deleted (their
    checkpoints are what takes the disk) the same command trains nothing and writes the same results,
    and a row trained with other settings is refused in one line."""
    out = tmp_path / "out"
    shutil.copytree(cola_subset_run / "data", out / "data")
    shutil.copy(cola_subset_run / "results.json", out / "results.json")
    env = dict(SUBSET_ENV, GLUE_DIR=str(glue), OUTPUT_DIR=str(out))
    status, stdout, _ = runner_in_process(env, *SUBSET_ARGS)
    assert status == 0 and "done earlier (its row in results.json)" in stdout and ": training (" not in stdout
    assert not (out / "runs").exists()
    assert (out / "results.json").read_text() == (cola_subset_run / "results.json").read_text()
    assert (out / "results.md").read_text() == (cola_subset_run / "results.md").read_text()

    results = json.loads((out / "results.json").read_text())
    recorded = results["runs"][0]["settings"]["train_args"]
    last_batch_size = len(recorded) - 1 - recorded[::-1].index("--batch-size")  # the one after the script
    recorded[last_batch_size + 1] = "16"
    (out / "results.json").write_text(json.dumps(results))
    status, stdout, stderr = runner_in_process(env, *SUBSET_ARGS)
    assert status == 2, stdout + stderr
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "results.json holds a row" in errors[0] and "--batch-size 16 -> 8" in errors[0]


def test_a_ledger_is_reused_where_the_base_model_lives_elsewhere(glue, cola_subset_run, tmp_path, runner_in_process):
    """A row names its base checkpoint by its bytes, not its path: results.json copied to a machine whose
    model cache is another folder is reused as it is, and a row of another base is refused in one line."""
    out = tmp_path / "out"
    shutil.copytree(cola_subset_run / "data", out / "data")
    shutil.copy(cola_subset_run / "results.json", out / "results.json")
    results = json.loads((out / "results.json").read_text())
    settings_recorded = results["runs"][0]["settings"]
    assert "BASE" in settings_recorded["train_args"] and settings_recorded["base"].startswith("sha256:")
    elsewhere = dict(SUBSET_ENV, GLUE_DIR=str(glue), OUTPUT_DIR=str(out), FAIRSEQ_EXT_CACHE=str(tmp_path / "cache"))
    again = glue_script(elsewhere, *SUBSET_ARGS)
    assert str(tmp_path / "cache") in again.stdout  # the model was converted into the other cache, and used
    assert "done earlier (its row in results.json)" in again.stdout and ": training (" not in again.stdout

    settings_recorded["base"] = "sha256:" + "0" * 64
    (out / "results.json").write_text(json.dumps(results))
    status, _, stderr = runner_in_process(elsewhere, *SUBSET_ARGS)
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert status == 2 and len(errors) == 1, stderr
    assert "results.json holds a row" in errors[0] and "the base model (its checkpoint: sha256:000" in errors[0]


def test_a_row_recorded_with_the_base_s_path_is_compared_by_the_file_s_digest(tmp_path):
    """Rows from before digests hold --restore-file's path: where that file is, they compare by its bytes
    (a copy elsewhere is the same base); where it is not, the change names the missing file."""
    base, copy = tmp_path / "model.pt", tmp_path / "elsewhere" / "model.pt"
    base.write_bytes(b"weights")
    copy.parent.mkdir()
    copy.write_bytes(b"weights")
    manifest = {"cache_key": "rows"}
    now = {"train_args": ["DATA", "--restore-file", "BASE", "--lr", "0.001"], "data": "rows",
           "base": base_identity.base_digest(copy)}
    legacy = {"train_args": ["DATA", "--restore-file", str(base), "--lr", "0.001"], "data": "rows"}
    assert base_identity.comparable_settings(legacy) == now
    assert plan.settings_change(legacy, now, manifest) is None
    base.write_bytes(b"other weights")
    assert plan.settings_change(legacy, now, manifest).startswith("the base model (its checkpoint: sha256:")
    base.unlink()
    assert plan.settings_change(legacy, now, manifest) == \
        f"the base model (its checkpoint: {base}, a file this machine lacks; now {now['base']})"


def test_runs_of_another_job_with_the_same_settings_are_taken_from_its_results(glue, cola_subset_run, tmp_path,
                                                                               runner_in_process):
    """REUSE_RESULTS: a run another job trained with the same settings is copied into this job's ledger,
    stating this job's recipe (not the rule that chose the settings there), not trained; one with other
    settings is trained (not refused); a missing file is one line."""
    out = tmp_path / "out"
    shutil.copytree(cola_subset_run / "data", out / "data")
    ours = json.loads((cola_subset_run / "results.json").read_text())
    theirs = json.loads(json.dumps(ours))
    theirs["runs"][0]["recipe"] = {"rule": "another job's rule, LRS=0.003 overriding it"}
    other = tmp_path / "other" / "results.json"
    other.parent.mkdir()
    other.write_text(json.dumps(theirs))
    env = dict(SUBSET_ENV, GLUE_DIR=str(glue), OUTPUT_DIR=str(out), REUSE_RESULTS=str(other))
    status, stdout, _ = runner_in_process(env, *SUBSET_ARGS)
    assert status == 0 and f"done by another job (its row in {other}, with the same settings)" in stdout
    assert ": training (" not in stdout and not (out / "runs").exists()
    assert json.loads((out / "results.json").read_text()) == ours

    shutil.rmtree(out)
    changed = glue_script(dict(env, OUTPUT_DIR=str(out)), "--batch-size", "16", "--log-interval", "1")
    assert "done by another job" not in changed.stdout and ": training (" in changed.stdout
    assert json.loads((out / "results.json").read_text())["runs"][0]["updates"] == 3

    status, _, stderr = runner_in_process(dict(env, REUSE_RESULTS=str(tmp_path / "none.json")), *SUBSET_ARGS)
    assert status == 2 and stderr.strip() == f"glue_bitfit: error: REUSE_RESULTS {tmp_path / 'none.json'}: no such file"


def test_delta_only_runs_still_write_the_leaderboard_files(glue, cola_subset_run, tmp_path):
    """With --bitfit-delta-only there is no checkpoint_best.pt: the best delta merged into the
    base in memory predicts exactly what the full best checkpoint of the same run predicts."""
    out = tmp_path / "delta"
    glue_script(dict(SUBSET_ENV, GLUE_DIR=str(glue), OUTPUT_DIR=str(out)), *SUBSET_ARGS, "--bitfit-delta-only")
    run = out / "runs" / "CoLA" / "bitfit-ofa" / "lr0.003-seed1"
    assert not (run / "checkpoint_best.pt").exists() and (run / "checkpoint_best.delta.safetensors").exists()
    assert [p for p in run.iterdir() if p.is_dir()] == []  # merged in memory: nothing written for it
    predictions = [(folder / "predictions" / "bitfit-ofa" / "CoLA.tsv").read_text()
                   for folder in (cola_subset_run, out)]
    assert predictions[0] == predictions[1] and len(predictions[0].splitlines()) == 1 + ROWS


def test_bad_input_under_torchrun_is_still_one_line_and_exit_2(glue, tmp_path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    # A selection only train.py can judge (it trains nothing once the heads are frozen), in each worker.
    result = glue_script({"GLUE_DIR": str(glue), "TASKS": "CoLA", "TRAIN_SUBSET": "16", "NPROC": "2",
                          "MASTER_PORT": port, "OUTPUT_DIR": str(tmp_path / "out")},
                         "--max-update", "1", "--bitfit-terms", "none", "--bitfit-freeze-heads", check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and "train.py" in errors[0] and "trains no parameter" in errors[0], result.stderr


def test_size_curves_and_controls_in_one_job(glue, tmp_path):
    """TRAIN_SUBSETS trains every mode at every size; a random-subset control is a mode like the others."""
    out = tmp_path / "out"
    result = glue_script({"GLUE_DIR": str(glue), "TASKS": "CoLA", "OUTPUT_DIR": str(out),
                          "MODE": "bitfit-all rand_uniform", "TRAIN_SUBSETS": "16 24"},
                         "--batch-size", "8", "--max-update", "2")
    runs = json.loads((out / "results.json").read_text())["runs"]
    assert sorted((r["mode"], r["train_rows"]) for r in runs) == [
        ("bitfit-all", 16), ("bitfit-all", 24), ("rand_uniform", 16), ("rand_uniform", 24)]
    assert all(r["size_curve"] and r["recipe"]["rule"] for r in runs)
    control = next(r for r in runs if r["mode"] == "rand_uniform")
    bitfit_all = next(r for r in runs if r["mode"] == "bitfit-all")
    assert control["trainable"] == bitfit_all["trainable"]  # as many entries as 'all' has bias parameters
    table = (out / "results.md").read_text()
    assert "## Training-size curves" in table and "| CoLA | rand_uniform |" in table and "24 rows" in table
    assert (out / "size_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "CoLA 16 rows rand_uniform lr 0.003 seed 1: training" in result.stdout


# Early stopping that decides a run: maximizing the dev loss, every validation after the first fails to
# improve while training lowers it, so --patience 2 ends each run after epoch 3 of 6.
PATIENCE_ENV = {"TASKS": "CoLA", "TRAIN_SUBSET": "96", "EPOCHS": "6", "SAVE_MINUTES": "0.01", "PROGRESS_SECONDS": "1"}
PATIENCE_ARGS = ("--batch-size", "16", "--patience", "2", "--best-checkpoint-metric", "loss",
                 "--maximize-best-checkpoint-metric")


def comparable_rows(out):
    """results.json's rows without the machine's measurements, paths relative to the job's folder."""
    rows = json.loads((out / "results.json").read_text().replace(str(out), "OUTPUT_DIR"))["runs"]
    return [{key: value for key, value in row.items() if key not in MEASURED_FIELDS} for row in rows]


def test_a_job_stopped_after_a_validation_that_did_not_improve_resumes_to_the_same_results(glue, tmp_path):
    """Ctrl-C once epoch 2's validation (no better than epoch 1's) is in the run record and saved, then the same
    command: the run stops early after epoch 3 as an uninterrupted job's does, and results.json and
    results.md say the same (wall times aside). The console shows the early stop, each finished run's
    line, where the stopped run continues and, on resuming, the plan's partly trained run."""
    straight = tmp_path / "straight"
    uninterrupted = glue_script(dict(PATIENCE_ENV, GLUE_DIR=str(glue), OUTPUT_DIR=str(straight)), *PATIENCE_ARGS)
    assert "early stop after epoch 3 (18 updates): loss has not improved" in uninterrupted.stdout
    assert "stopped early by --patience 2" in uninterrupted.stdout

    out = tmp_path / "stopped"
    env = dict(os.environ, OMP_NUM_THREADS="1", GLUE_DIR=str(glue), OUTPUT_DIR=str(out), **PATIENCE_ENV)
    job = subprocess.Popen(["bash", str(SCRIPT), *PATIENCE_ARGS], env=env, cwd=tiny.REPO, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
    record = out / "runs" / "CoLA" / "bitfit-ofa" / "lr0.003-seed1" / "run_record.json"

    def epoch_2_validated_and_saved():
        stats = json.loads(record.read_text())["stats"] if record.exists() else []
        validated = any(entry["tag"] == "valid" and entry["epoch"] == 2 for entry in stats)
        return validated and (tiny.last_saved_updates(record) or 0) >= 12

    _, stderr = tiny.interrupt_when(job, epoch_2_validated_and_saved)
    stop = stderr.strip().splitlines()[-1]
    assert "continues from update " in stop, stderr
    resumed_at = int(re.search(r"continues from update (\d+)", stop).group(1))
    assert 12 <= resumed_at < 18  # epoch 2's end or a timed save after it, before the early stop

    again = glue_script(dict(PATIENCE_ENV, GLUE_DIR=str(glue), OUTPUT_DIR=str(out)), *PATIENCE_ARGS)
    assert f"{resumed_at} of 36 updates done, {36 - resumed_at} left" in again.stdout
    assert f"resuming the interrupted run at update {resumed_at}" in again.stdout
    assert "early stop after epoch 3 (18 updates)" in again.stdout
    assert comparable_rows(out) == comparable_rows(straight)
    tables = [re.sub(r"## Cost\n.*?(?=## |\Z)", "", (folder / "results.md").read_text().split("## Every run")[0],
                     flags=re.S) for folder in (straight, out)]
    assert tables[0] == tables[1]


def test_line_endings_are_not_a_change_of_data_but_an_edited_row_is(glue, tmp_path, runner_in_process):
    """The same rows with CRLF line ends and a byte-order mark: the finished run is done, the prepared data
    is kept. A row edited: the job stops with the 'trained with other settings' line."""
    copy = tmp_path / "glue"
    shutil.copytree(glue / "CoLA", copy / "CoLA")
    out = tmp_path / "out"
    env = {"GLUE_DIR": str(copy), "OUTPUT_DIR": str(out), "TASKS": "CoLA", "TRAIN_SUBSET": "16"}
    glue_script(env, "--batch-size", "8", "--max-update", "1")
    manifest = (out / "data" / "CoLA" / "manifest.json").read_text()
    for split in ("train", "dev", "test"):
        path = copy / "CoLA" / f"{split}.tsv"
        path.write_bytes(b"\xef\xbb\xbf" + path.read_bytes().replace(b"\n", b"\r\n"))
    status, stdout, _ = runner_in_process(env, "--batch-size", "8", "--max-update", "1")
    assert status == 0 and "done earlier" in stdout and ": training (" not in stdout
    assert (out / "data" / "CoLA" / "manifest.json").read_text() == manifest  # not prepared again

    train = copy / "CoLA" / "train.tsv"
    train.write_bytes(train.read_bytes().replace(b"\t1\t\t", b"\t0\t*\t", 1))  # one row's label
    status, stdout, stderr = runner_in_process(env, "--batch-size", "8", "--max-update", "1")
    assert status == 2, stdout + stderr
    errors = [line for line in stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and "trained with other settings: the training data" in errors[0], stderr


def test_comparison_modes_run_beside_bitfit_with_their_cost(glue, glue_output, tmp_path):
    """MODE with LoRA and adapters added to a finished BitFit job, as a comparison table grows from an existing
    one: each trains from its sourced recipe, predicts the test set (adapters unmerged, in memory), and the
    table gets each mode's delta size, epoch time and peak memory beside BitFit's reused row."""
    out = tmp_path / "compare"
    shutil.copytree(glue_output[0], out)
    result = glue_script({"GLUE_DIR": str(glue), "OUTPUT_DIR": str(out), "TASKS": "STS-B",
                          "TRAIN_SUBSET": f"STS-B={STS_B_SUBSET}", "MODE": "bitfit-ofa lora adapter"}, "--max-update", "4")
    assert "STS-B bitfit-ofa lr 0.003 seed 1: done earlier" in result.stdout
    runs = {row["mode"]: row for row in json.loads((out / "results.json").read_text())["runs"] if row["task"] == "STS-B"}
    assert set(runs) == {"bitfit-ofa", "lora", "adapter"}
    for mode, row in runs.items():
        assert row["delta_bytes"] > 0 and row["peak_memory_bytes"] > 0 and row["epoch_train_s"] is not None, mode
        assert set(row["dev"]) >= {"pearson", "spearman"}
        assert len((out / "predictions" / mode / "STS-B.tsv").read_text().splitlines()) == 1 + ROWS
    assert "Hu et al. 2022" in runs["lora"]["recipe"]["rule"] and runs["lora"]["lr"] == 4e-4
    assert "Houlsby et al. 2019" in runs["adapter"]["recipe"]["rule"]
    # r 8 on q and v of 6 layers, against two 64-wide adapters per layer: both far above BitFit's biases.
    assert runs["bitfit-ofa"]["trainable"] < runs["lora"]["trainable"] < runs["adapter"]["trainable"]
    table = (out / "results.md").read_text()
    cost = table.split("## Cost", 1)[1]
    assert "| lora |" in cost and "| adapter |" in cost and "STS-B s / epoch" in cost
