"""The GLUE job's BF16_BASE end to end: which runs get a frozen base in bf16, and what guards their folders."""
import json

from synthetic_glue import make_glue_dir
from test_glue_run import ROWS, TRAIN_ROWS, glue_script


def test_bf16_base_gives_frozen_base_runs_bf16_says_so_and_guards_their_folders(tmp_path):
    """BF16_BASE=on: the BitFit run trains with --bf16 (its frozen base in bf16, fp32 masters: train.py's own
    test), full fine-tuning stays fp32, the plan says so; the same OUTPUT_DIR with BF16_BASE=off is refused."""
    glue = make_glue_dir(tmp_path / "glue", ("STS-B",), rows_per_split=ROWS, train_rows=TRAIN_ROWS)
    out = tmp_path / "out"
    env = {"GLUE_DIR": str(glue), "TASKS": "STS-B", "MODE": "bitfit full", "OUTPUT_DIR": str(out)}
    first = glue_script(dict(env, BF16_BASE="on"), "--max-update", "2")
    assert "precision: bitfit-ofa: frozen base in bf16, trained tensors and Adam's state in fp32" in first.stdout
    settings = {mode: json.loads((out / "runs" / "STS-B" / mode / "lr0.003-seed1" / "run.json").read_text())
                for mode in ("bitfit-ofa",)}
    full = json.loads(next((out / "runs" / "STS-B" / "full").glob("*/run.json")).read_text())
    assert "--bf16" in settings["bitfit-ofa"]["settings"]["train_args"]
    assert "--bf16" not in full["settings"]["train_args"]
    rows = json.loads((out / "results.json").read_text())["runs"]
    assert {row["mode"]: row["updates"] for row in rows} == {"bitfit-ofa": 2, "full": 2}
    refused = glue_script(dict(env, BF16_BASE="off"), "--max-update", "2", check=False)
    assert refused.returncode == 2 and "--bf16 True -> False" in refused.stderr, refused.stdout + refused.stderr
