"""The defaults search: the declared grid, its winner rule, and a cell run through the GLUE runner."""
import json

from synthetic_glue import make_glue_dir

import tiny
from fairseq_ext.experiments import defaults_search as search


def test_the_grid_is_the_one_docs_declare():
    names = [cell.name for cell in search.GRID]
    assert len(names) == len(set(names)) == 10
    assert sum(len(cell.lrs) for cell in search.GRID) == 30  # docs/defaults_search.md: 30 settings
    declared = (tiny.REPO / "docs" / "defaults_search.md").read_text()
    assert "30 settings, 90 runs" in declared and f"within {search.TIE_POINTS} points" in declared


def setting(family, epochs, lr, scores, updates, early_stop=False):
    cell = search.Cell(family, epochs, early_stop, (lr,))
    return search.Setting(cell, lr, dict(zip(search.TASKS, scores)), updates)


def test_the_best_mean_wins_and_ties_go_to_fewer_updates():
    best = setting("bitfit-all", 20, 3e-3, (25.0, 86.0, 85.0), 9000)
    near = setting("bitfit-all", 10, 3e-3, (24.5, 85.8, 84.9), 4000, early_stop=True)  # 0.27 below: a tie
    far = setting("bitfit-all", 10, 1e-3, (18.0, 84.0, 84.0), 2000)
    partial = search.Setting(search.Cell("bitfit-all", 10, True, (1e-2,)), 1e-2, {"CoLA": 40.0}, 100)
    full = setting("full", 4, 5e-5, (29.6, 86.4, 85.6), 3000)
    chosen = search.winners([best, near, far, partial, full])
    assert chosen == {"bitfit-all": near, "full": full}  # `partial` has no mean: not a candidate


def test_a_cell_trains_each_lr_on_the_three_tasks_and_resumes(tmp_path, monkeypatch, capfd):
    """The search CLI over one cell, narrowed to two of its learning rates (the grid's own are checked above;
    each run is a MiniLM process): every setting on every task, the summary and winner, and a second
    invocation that trains nothing and writes the same summary."""
    narrowed = search.Cell("full", 4, False, search.FULL_LRS[:2])
    monkeypatch.setattr(search, "GRID", (narrowed,))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as tiny.run gives every training process beside the other worker
    glue = make_glue_dir(tmp_path / "glue", rows_per_split=24, train_rows=64)
    out = tmp_path / "search"
    argv = ["--glue-dir", str(glue), "--output-dir", str(out), "--cells", "full-e4", "--", "--max-update", "2"]
    search.main(argv)
    first = capfd.readouterr().out
    assert "defaults search: cell 1 of 1: full-e4 (lr 2e-05, 5e-05; 4 epochs, early stopping off)" in first
    summary = json.loads((out / "defaults_search.json").read_text())
    assert summary["finished"] == summary["planned"] == 2
    assert {s["lr"] for s in summary["settings"]} == set(search.FULL_LRS[:2])
    assert all(set(s["scores"]) == set(search.TASKS) and s["mean"] is not None for s in summary["settings"])
    assert summary["winners"]["full"]["cell"] == "full-e4"
    runs = json.loads((out / "full-e4" / "results.json").read_text())["runs"]
    assert len(runs) == 2 * len(search.TASKS) and all("--patience" in r["settings"]["train_args"] for r in runs)
    search.main(argv)
    again = capfd.readouterr().out  # the runner jobs' output too: they inherit the file descriptors
    assert "training (" not in again and "done earlier" in again
    assert json.loads((out / "defaults_search.json").read_text()) == summary
