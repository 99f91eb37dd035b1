"""The defaults search: the declared grid, its winner rule, and a cell run through the GLUE runner."""
import json
import subprocess
import sys

import pytest
from synthetic_glue import make_glue_dir

import tiny
from fairseq_ext.core.errors import UserError
from fairseq_ext.experiments import defaults_search as search


def test_the_grid_is_the_one_docs_declare():
    names = [cell.name for cell in search.GRID]
    assert len(names) == len(set(names)) == 10
    assert sum(len(cell.lrs) for cell in search.GRID) == 30  # docs/defaults_search.md: 30 settings
    declared = (tiny.REPO / "docs" / "defaults_search.md").read_text()
    trainings = sum(len(cell.lrs) for cell in {cell.trained_as for cell in search.GRID}) * len(search.TASKS)
    assert trainings == 54 and all(cell.trained_as in search.GRID for cell in search.GRID)
    assert "30 settings, 90 runs' results, from 54 trainings" in declared
    assert f"within {search.TIE_POINTS} points" in declared and f"`--patience {search.PATIENCE}`" in declared
    # Edge checks: declared beside the grid, each one step past a grid edge, trained and ranked with it.
    assert search.CELLS == search.GRID + search.EDGE_CHECKS
    for cell in search.EDGE_CHECKS:
        assert f"`{cell.name}`" in declared and cell.name not in names and not cell.early_stop
        assert cell.lr_edge == (cell.epochs in {c.epochs for c in search.GRID if c.family == cell.family})
        assert cell.epochs > max(c.epochs for c in search.GRID if c.family == cell.family) or \
            max(cell.lrs) > max(lr for c in search.GRID if c.family == cell.family for lr in c.lrs)


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


def test_the_edge_rule_derives_the_declared_edge_checks_from_the_committed_results():
    """docs/defaults_search.md's edge rule, as code, on the search's committed results: every edge check
    declared in EDGE_CHECKS is one the rule calls for, and the summary names any it calls for that is not
    declared yet."""
    results = tiny.REPO / "docs" / "defaults_search_results"
    due = search.edge_checks(search.read_settings(results))
    assert set(search.EDGE_CHECKS) <= set(due)
    _, markdown = search.summary(search.read_settings(results), search.CELLS)
    for cell in due:
        assert f"`{cell.name}` at lr {cell.lrs[0]:g}" in markdown
        assert ("not declared in EDGE_CHECKS yet" in markdown) or cell in search.EDGE_CHECKS


def test_the_edge_rule_steps_past_each_edge_the_winner_sits_on_once_its_family_has_finished():
    full_grid = [(cell, lr) for cell in search.GRID if cell.family == "full" for lr in cell.lrs]  # 4 and 8 epochs

    def full(best):
        return [search.Setting(cell, lr, dict(zip(search.TASKS, (30.0, 86.0, 86.0) if (cell.epochs, lr) == best
                                                   else (20.0, 85.0, 85.0))), 697 * cell.epochs)
                for cell, lr in full_grid]

    assert search.edge_checks(full((8, 1e-4))) == [search.Cell("full", 12, False, (1e-4,)),
                                                   search.Cell("full", 8, False, (2e-4,), lr_edge=True)]
    assert search.edge_checks(full((4, 5e-5))) == []  # inside the grid on both axes
    assert search.edge_checks(full((8, 1e-4))[1:]) == []  # a setting still to finish could win


def test_after_its_grid_a_family_s_edge_checks_are_trained_and_ranked(tmp_path, monkeypatch, capsys):
    """run() trains the given cells, then each edge check the rule calls for in those cells' families
    (here full fine-tuning's one-cell grid, won at its largest epochs and lr: both edges), not another
    family's; the summary ranks them with the grid."""
    grid_cell = search.Cell("full", 4, False, (1e-4,))
    monkeypatch.setattr(search, "GRID", (grid_cell,))
    finished = [search.Setting(grid_cell, 1e-4, dict(zip(search.TASKS, (30.0, 86.0, 86.0))), 2788)]
    monkeypatch.setattr(search, "read_settings", lambda root, cells=(): finished)
    trained = []
    monkeypatch.setattr(search, "_train_cell", lambda cell, *args: trained.append(cell))
    ranked = search.run(tmp_path / "glue", tmp_path / "search", [grid_cell], [], "RESUME")
    edges = [search.Cell("full", 6, False, (1e-4,)), search.Cell("full", 4, False, (2e-4,), lr_edge=True)]
    assert trained == [grid_cell, *edges] and ranked == [grid_cell, *edges]
    out = capsys.readouterr().out
    assert "defaults search: edge check full-e6 (lr 0.0001; 6 epochs, early stopping off): full's winner" in out
    assert "defaults search: edge check full-e4-lr0.0002 (lr 0.0002; 4 epochs" in out
    trained.clear()
    other = search.Cell("bitfit-all", 10, False, (1e-3,))
    assert search.run(tmp_path / "glue", tmp_path / "search", [other], [], "RESUME") == [other]
    assert trained == [other]  # full's edges belong to a run of full's cells


def test_bad_flags_are_one_line(capsys):
    tiny.assert_one_line_error(tiny.run_main(search.main, capsys, "--parallel", "0"), "--parallel 0")
    tiny.assert_one_line_error(tiny.run_main(search.main, capsys, "--cells", "bitfit-all-e40"),
                               "--cells bitfit-all-e40: no such cell")
    tiny.assert_one_line_error(tiny.run_main(search.main, capsys, "--reuse-results", "/nonexistent/results.json"),
                               "--reuse-results /nonexistent/results.json: no such file")


def curve_row(scores, updates_per_epoch=10, metric="mcc", maximize=True):
    """A runner row trained without early stopping, with these dev scores epoch by epoch."""
    args = ["DATA", "--best-checkpoint-metric", metric] + (["--maximize-best-checkpoint-metric"] if maximize else [])
    return {"run_dir": "runs/CoLA", "primary_metric": "mcc", "settings": {"train_args": args},
            "updates": updates_per_epoch * len(scores),
            "curve": {str(epoch): {"mcc": score, "glue_score": score} for epoch, score in enumerate(scores, 1)}}


def test_early_stopping_cuts_a_run_where_fairseq_s_patience_stops():
    # Epoch 4 ties the best (12.0): not better, so 3, 4 and 5 are three validations without improvement.
    cut = search.with_early_stopping(curve_row([10.0, 12.0, 11.0, 12.0, 11.0, 30.0]), patience=3)
    assert cut["updates"] == 50 and sorted(cut["curve"]) == ["1", "2", "3", "4", "5"]
    assert cut["best_epoch"] == 2 and cut["dev"]["mcc"] == 12.0
    kept = search.with_early_stopping(curve_row([10.0, 9.0, 9.5, 11.0, 10.0, 10.5]), patience=3)
    assert kept["updates"] == 60 and kept["best_epoch"] == 4  # never three in a row: the whole run
    lower_is_better = search.with_early_stopping(curve_row([5.0, 4.0, 6.0], metric="mcc", maximize=False), 2)
    assert lower_is_better["updates"] == 30 and lower_is_better["best_epoch"] == 3  # the runner's best: by mcc
    with pytest.raises(UserError, match="runs/CoLA: its epochs' loss scores"):
        search.with_early_stopping(curve_row([1.0, 2.0], metric="loss"), 3)  # no loss in the curve


def test_a_cell_trains_on_the_three_tasks_resumes_and_its_early_stopping_twin_is_cut_not_trained(
        tmp_path, monkeypatch, capfd):
    """The search CLI over a narrowed grid: a BitFit cell of 6 epochs at a learning rate too small to move
    any score (1e-9: every validation ties the first) and its early-stopping twin. Every task is trained
    once; the twin's settings are those runs cut at epoch 4 (--patience 3), and a run trained with early
    stopping on gives the same row; with equal scores the twin wins on fewer updates. A second invocation
    trains nothing and writes the same summary."""
    without, twin = search.Cell("bitfit-all", 6, False, (1e-9,)), search.Cell("bitfit-all", 6, True, (1e-9,))
    monkeypatch.setattr(search, "CELLS", (twin, without))
    monkeypatch.setattr(search, "GRID", (twin, without))
    monkeypatch.setattr(search, "edge_checks", lambda settings: [])  # the edge path: the test below
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # as tiny.run gives every training process beside the other worker
    glue = make_glue_dir(tmp_path / "glue", rows_per_split=24, train_rows=64)  # 2 updates an epoch
    out = tmp_path / "search"
    argv = ["--glue-dir", str(glue), "--output-dir", str(out), "--parallel", "2"]  # CoLA and STS-B side by side
    search.main(argv)
    first = capfd.readouterr().out
    assert "defaults search: 1 cell to train, 3 runs (0 done earlier, 3 to go;" in first
    assert ("defaults search: cell 1 of 1: bitfit-all-e6 (lr 1e-09; 6 epochs, early stopping off; bitfit-all-e6-es: "
            "these runs cut where --patience 3 stops; 0 of 3 runs done earlier)") in first
    assert not (out / twin.name).exists()
    summary = json.loads((out / "defaults_search.json").read_text())
    assert summary["finished"] == summary["planned"] == 2
    by_cell = {s["cell"]: s for s in summary["settings"]}
    assert by_cell[without.name]["updates"] == 3 * 12 and by_cell[twin.name]["updates"] == 3 * 8
    assert by_cell[twin.name]["scores"] == by_cell[without.name]["scores"] and set(by_cell[twin.name]["scores"]) == set(search.TASKS)
    assert summary["winners"]["bitfit-all"]["cell"] == twin.name

    # The twin's CoLA run trained for real, with --patience 3, is the cut run.
    command = [sys.executable, "-m", "fairseq_ext.experiments.glue_run", *twin.runner_args(glue, out, [], tasks=("CoLA",))]
    assert subprocess.call(command, cwd=tiny.REPO) == 0
    trained = json.loads((out / twin.name / "results.json").read_text())["runs"][0]
    straight = next(r for r in json.loads((out / without.name / "results.json").read_text())["runs"]
                    if r["task"] == "CoLA")
    cut = search.with_early_stopping(straight, search.PATIENCE)
    assert trained["updates"] == cut["updates"] == 8
    assert (trained["best_epoch"], trained["dev"], trained["curve"]) == (cut["best_epoch"], cut["dev"], cut["curve"])
    assert trained["loss_curve"] == cut["loss_curve"] and sorted(cut["loss_curve"], key=int) == ["1", "2", "3", "4"]
    capfd.readouterr()

    search.main(argv)
    again = capfd.readouterr().out  # the runner jobs' output too: they inherit the file descriptors
    assert "training (" not in again and "(3 done earlier, 0 to go;" in again
    assert json.loads((out / "defaults_search.json").read_text()) == summary

    # Another search folder taking this one's runs (--reuse-results) trains nothing and sums up the same.
    elsewhere = tmp_path / "elsewhere"
    search.main(["--glue-dir", str(glue), "--output-dir", str(elsewhere), "--cells", without.name,
                 "--reuse-results", str(out / without.name / "results.json")])
    taken = capfd.readouterr().out
    assert "training (" not in taken and taken.count("done by another job") == 3
    assert json.loads((elsewhere / "defaults_search.json").read_text())["settings"] == [
        s for s in summary["settings"] if s["cell"] == without.name]
