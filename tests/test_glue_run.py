"""run_scripts/glue_bitfit.sh end to end on the real GLUE files and the embedded MiniLM."""
import json
import os
import subprocess

import pytest

import tiny

pytestmark = pytest.mark.skipif(not tiny.SHARED_GLUE.is_dir(), reason="../shared/glue not present")

SCRIPT = tiny.REPO / "run_scripts" / "glue_bitfit.sh"


def glue_script(env, *args, check=True):
    full_env = dict(os.environ, OMP_NUM_THREADS="1", **env)
    result = subprocess.run(["bash", str(SCRIPT), *args], env=full_env, capture_output=True, text=True, cwd=tiny.REPO)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return result


@pytest.fixture(scope="module")
def glue_output(tmp_path_factory):
    out = tmp_path_factory.mktemp("glue_out")
    env = {"GLUE_DIR": str(tiny.SHARED_GLUE), "OUTPUT_DIR": str(out)}
    first = glue_script(dict(env, TASKS="CoLA STS-B"), "--max-update", "4")
    full = glue_script(dict(env, TASKS="CoLA", MODE="full"), "--max-update", "4")
    again = glue_script(dict(env, TASKS="CoLA"), "--max-update", "4")
    return out, first, full, again


def test_results_have_the_official_metrics_for_every_mode(glue_output):
    out, first, *_ = glue_output
    runs = json.loads((out / "results.json").read_text())["runs"]
    by_key = {(r["task"], r["mode"]): r for r in runs}
    assert set(by_key) == {("CoLA", "bitfit-ofa"), ("STS-B", "bitfit-ofa"), ("CoLA", "full")}
    assert set(by_key["CoLA", "bitfit-ofa"]["dev"]) >= {"mcc", "accuracy"}
    assert set(by_key["STS-B", "bitfit-ofa"]["dev"]) >= {"pearson", "spearman"}
    # Every training row is accounted for.
    assert by_key["CoLA", "bitfit-ofa"]["train_rows"] == 8551
    assert by_key["STS-B", "bitfit-ofa"]["train_rows"] == 5749
    manifest = json.loads((out / "data" / "CoLA" / "manifest.json").read_text())
    assert manifest["splits"]["train"]["rows_read"] == manifest["splits"]["train"]["rows_written"] == 8551
    bitfit, full = by_key["CoLA", "bitfit-ofa"], by_key["CoLA", "full"]
    assert bitfit["trainable"] < 0.01 * bitfit["total"] and full["trainable"] == full["total"]
    assert bitfit["updates"] == full["updates"] == 4
    assert "CoLA bitfit lr 0.001 seed 1: training" in first.stdout


def test_markdown_table_compares_modes_and_plot_is_a_png(glue_output):
    out, *_ = glue_output
    table = (out / "results.md").read_text()
    assert "| full |" in table and "| bitfit-ofa |" in table
    assert "CoLA (mcc)" in table and "STS-B (pearson/spearman)" in table
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_leaderboard_predictions_cover_the_test_set(glue_output):
    out, *_ = glue_output
    lines = (out / "predictions" / "bitfit-ofa" / "CoLA.tsv").read_text().splitlines()
    assert lines[0] == "index\tprediction" and len(lines) == 1 + 1063
    assert {line.split("\t")[1] for line in lines[1:]} <= {"0", "1"}
    sts = (out / "predictions" / "bitfit-ofa" / "STS-B.tsv").read_text().splitlines()
    assert len(sts) == 1 + 1379 and all(0.0 <= float(line.split("\t")[1]) <= 5.0 for line in sts[1:])


def test_finished_runs_are_not_repeated(glue_output):
    *_, again = glue_output
    assert "done earlier" in again.stdout and "training" not in again.stdout


@pytest.mark.parametrize(
    "env, needle",
    [
        ({"GLUE_DIR": "/nonexistent/glue_data"}, "no such directory"),
        ({"GLUE_DIR": str(tiny.SHARED_GLUE / "SOURCES.md")}, "is a file"),
        ({"GLUE_DIR": str(tiny.SHARED_GLUE), "TASKS": "CoLB"}, "CoLB"),
        ({"GLUE_DIR": str(tiny.SHARED_GLUE), "TASKS": "MRPC"}, "download_glue_data.py"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(tmp_path, env, needle):
    result = glue_script(dict(env, OUTPUT_DIR=str(tmp_path / "out")), check=False)
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], result.stderr
