"""The defaults search declared in docs/defaults_search.md: a grid of learning rates, epochs and early
stopping per mode family, each setting a GLUE runner job on CoLA, SST-2 (a seeded 8,000-row subset)
and STS-B with seed 1, and the rule that picks each family's winner.

    python -m fairseq_ext.experiments.defaults_search --glue-dir glue_data [--output-dir outputs/defaults_search]
        [--cells bitfit-all-e10-es ...] [--parallel N] [--summarize] [-- train.py arguments]

Every cell (a family, its epochs, early stopping on or off) is one OUTPUT_DIR of the runner, which
trains each of the cell's learning rates; a stopped search resumes where it stopped (finished runs
are the runner's ledger), so it may span sessions.  After each cell, and with ``--summarize`` alone,
``defaults_search.md`` and ``.json`` hold every setting tried and the winners so far.

A cell with early stopping on is not trained: its runs are the same setting's runs without it, cut
where fairseq's ``--patience`` would have stopped them (``with_early_stopping``).  Up to that stop
the two trainings are one computation (the seed, the data order and the learning-rate schedule do
not depend on patience, and CPU training is deterministic), so the cut run's best epoch, dev scores
and updates are what the early-stopped run gives; tests/test_defaults_search.py trains both and
compares them.
"""
import argparse
import json
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ..core.errors import UserError, exit_on_user_error
from ..core.files import write_report

SEED = 1
PATIENCE = 3  # early stopping on: fairseq's --patience 3, as the small-model bias rule had it
TIE_POINTS = 0.5  # settings within this of the best mean GLUE score tie; the cheapest wins
# One runner job per cell, as run_scripts/glue_table.sh runs the README's table: the cell's nine runs share
# one pool of --parallel slots, so no slot idles while another task's job waits its turn.
TRAIN_SUBSET = "SST-2=8000"  # the table's SST-2: a seeded 8,000-row sample; CoLA and STS-B every row
TASKS = ("CoLA", "SST-2", "STS-B")
BIAS_LRS = (1e-3, 3e-3, 1e-2)
FULL_LRS = (2e-5, 5e-5, 1e-4)


@dataclass(frozen=True)
class Cell:
    """One grid cell: a mode family's epochs and early stopping, over its learning rates."""

    family: str  # the runner's MODE
    epochs: int
    early_stop: bool
    lrs: Tuple[float, ...]
    # An edge check past the grid's largest lr at a grid cell's epochs: its own name and runner job, so its
    # runs never mix into the grid cell's ledger.
    lr_edge: bool = False

    @property
    def name(self) -> str:
        name = f"{self.family}-e{self.epochs}{'-es' if self.early_stop else ''}"
        return name + "".join(f"-lr{lr:g}" for lr in self.lrs) if self.lr_edge else name

    @property
    def trained_as(self) -> "Cell":
        """The cell whose runs are trained for this one: itself, or with early stopping on, the same
        setting without it (see the module's docstring)."""
        return replace(self, early_stop=False) if self.early_stop else self

    def runner_args(self, glue_dir: Path, output_dir: Path, passthrough: Sequence[str], parallel: int = 1,
                    tasks: Sequence[str] = TASKS, reuse: Sequence[Path] = ()) -> List[str]:
        """The runner's command line for the cell's job: every run of it, ``parallel`` at a time; a run whose
        row in a ``reuse`` results.json has the same settings is taken from there (the runner's REUSE_RESULTS)."""
        subsets = " ".join(item for item in TRAIN_SUBSET.split() if item.split("=")[0] in tasks)
        args = ["--glue-dir", str(glue_dir), "--output-dir", str(output_dir / self.name), "--tasks", " ".join(tasks),
                "--mode", self.family, "--seeds", str(SEED), "--lrs", " ".join(f"{lr:g}" for lr in self.lrs),
                "--epochs", str(self.epochs), "--parallel", str(parallel)]
        if subsets:
            args += ["--train-subset", subsets]
        if reuse:
            args += ["--reuse-results", " ".join(str(path) for path in reuse)]
        return args + ["--", "--patience", str(PATIENCE) if self.early_stop else "-1", *passthrough]


GRID: Tuple[Cell, ...] = (
    *(Cell(family, epochs, early_stop, BIAS_LRS) for family in ("bitfit-all", "bitfit-ofa")
      for epochs in (10, 20) for early_stop in (True, False)),
    *(Cell("full", epochs, False, FULL_LRS) for epochs in (4, 8)),
)
# Edge checks (docs/defaults_search.md, declared 2026-12-07 before any of their runs): where a family's
# winner on GRID sits at the grid's largest epochs or learning rate, one step beyond it (epochs x1.5; lr by
# the grid's own spacing), at the winner's other values, once. BitFit all's winner: 20 epochs, the largest;
# full fine-tuning's: lr 1e-4, the largest.
EDGE_CHECKS: Tuple[Cell, ...] = (Cell("bitfit-all", 30, False, (3e-3,)),
                                  Cell("bitfit-ofa", 30, False, (3e-3,)),
                                  Cell("full", 4, False, (2e-4,), lr_edge=True))
CELLS = GRID + EDGE_CHECKS  # what --cells names and --summarize ranks (a run trains GRID, then edge_checks())
EPOCHS_STEP = 1.5  # an edge check's epochs past the grid's largest
NEXT_LR = {"bitfit-all": 3e-2, "bitfit-ofa": 3e-2, "full": 2e-4}  # one step past each grid's largest lr, by its spacing


@dataclass(frozen=True)
class Setting:
    """One setting's outcome: a cell at one learning rate, its score per task and what it cost."""

    cell: Cell
    lr: float
    scores: Dict[str, float]  # task -> the GLUE score (mean of its official metrics) at the best epoch
    updates: int  # trained, over the tasks

    @property
    def mean(self) -> Optional[float]:
        return sum(self.scores[t] for t in TASKS) / len(TASKS) if set(TASKS) <= set(self.scores) else None


def with_early_stopping(row: dict, patience: int) -> dict:
    """A runner row trained without early stopping, as the same run with fairseq's ``--patience`` ends:
    cut after the validation that ran out of patience (fairseq's ``should_stop_early``: a score that
    does not beat the best so far, ``patience`` times in a row), its best epoch and dev scores among the
    epochs kept, and the updates trained up to the cut."""
    train_args = row["settings"]["train_args"]
    metric = "loss"  # fairseq's default
    for flag, value in zip(train_args, train_args[1:]):
        if flag == "--best-checkpoint-metric":
            metric = value
        elif flag.startswith("--best-checkpoint-metric="):
            metric = flag.split("=", 1)[1]
    sign = 1 if "--maximize-best-checkpoint-metric" in train_args else -1
    curve = {int(epoch): values for epoch, values in row["curve"].items()}
    epochs = sorted(curve)
    if epochs != list(range(1, len(epochs) + 1)) or row["updates"] % len(epochs) or \
            any(metric not in values for values in curve.values()):
        raise UserError(f"{row['run_dir']}: its epochs' {metric} scores or updates cannot say where --patience "
                        "would have stopped it; train the cell with early stopping on instead")
    best, without, stop = None, 0, epochs[-1]
    for epoch in epochs:
        score = sign * curve[epoch][metric]
        if best is None or score > best:
            best, without = score, 0
            continue
        without += 1
        if without >= patience:
            stop = epoch
            break
    kept = {epoch: curve[epoch] for epoch in epochs[:stop]}
    best_epoch = max(kept, key=lambda epoch: (kept[epoch][row["primary_metric"]], -epoch))  # as the runner picks
    cut = dict(row, curve={str(epoch): values for epoch, values in kept.items()}, best_epoch=best_epoch,
               dev=kept[best_epoch], updates=row["updates"] // len(epochs) * stop)
    if "loss_curve" in row:
        cut["loss_curve"] = {epoch: losses for epoch, losses in row["loss_curve"].items() if int(epoch) <= stop}
    return cut


def runs_by_lr(root: Path, cell: Cell) -> Dict[float, List[dict]]:
    """The search's rows (seed SEED, full training data) of each of the cell's learning rates, from the ledger
    of the cell trained for it."""
    results = root / cell.trained_as.name / "results.json"
    rows = json.loads(results.read_text()).get("runs", []) if results.exists() else []
    return {lr: [r for r in rows if abs(r["lr"] - lr) <= 1e-12 * lr and r["seed"] == SEED and not r.get("size_curve")]
            for lr in cell.lrs}


def read_settings(root: Path, cells: Sequence[Cell] = CELLS) -> List[Setting]:
    """Every finished setting under ``root``, from each cell's results.json (early stopping on: from the
    runs of the cell trained for it, cut where patience would have stopped them)."""
    settings = []
    for cell in cells:
        for lr, mine in runs_by_lr(root, cell).items():
            if cell.early_stop:
                mine = [with_early_stopping(row, PATIENCE) for row in mine if "curve" in row]
            scores = {r["task"]: r["dev"]["glue_score"] for r in mine if "glue_score" in r.get("dev", {})}
            if scores:
                settings.append(Setting(cell, lr, scores, sum(int(r.get("updates") or 0) for r in mine)))
    return settings


def winners(settings: Sequence[Setting]) -> Dict[str, Setting]:
    """Each family's winner: the highest mean GLUE score over the three tasks; settings within
    TIE_POINTS of it tie, and the one that trained the fewest updates wins (then the lower lr)."""
    chosen = {}
    for family in dict.fromkeys(s.cell.family for s in settings):
        complete = [s for s in settings if s.cell.family == family and s.mean is not None]
        if not complete:
            continue
        best = max(s.mean for s in complete)
        tied = [s for s in complete if s.mean >= best - TIE_POINTS]
        chosen[family] = min(tied, key=lambda s: (s.updates, s.lr))
    return chosen


def edge_checks(settings: Sequence[Setting]) -> List[Cell]:
    """The edge checks docs/defaults_search.md's rule calls for, from the grid's settings: for each family
    whose grid settings have all finished, where its winner on the grid has the grid's largest epochs, the
    same setting at EPOCHS_STEP times the epochs; where it has the grid's largest lr, the same setting at
    the next lr (NEXT_LR)."""
    checks = []
    on_grid = [s for s in settings if s.cell in GRID and s.mean is not None]
    for family, winner in winners(on_grid).items():
        grid = [cell for cell in GRID if cell.family == family]
        if sum(len(cell.lrs) for cell in grid) != sum(1 for s in on_grid if s.cell.family == family):
            continue  # a setting still to finish could win
        if winner.cell.epochs == max(cell.epochs for cell in grid):
            checks.append(Cell(family, round(winner.cell.epochs * EPOCHS_STEP), winner.cell.early_stop, (winner.lr,)))
        if winner.lr == max(lr for cell in grid for lr in cell.lrs):
            checks.append(Cell(family, winner.cell.epochs, winner.cell.early_stop, (NEXT_LR[family],), lr_edge=True))
    return checks


def _fmt(value: Optional[float]) -> str:
    return "–" if value is None else f"{value:.1f}"


def summary(settings: Sequence[Setting], planned: Sequence[Cell]) -> Tuple[dict, str]:
    chosen = winners(settings)
    done = {(s.cell.name, s.lr) for s in settings if s.mean is not None}
    total = sum(len(cell.lrs) for cell in planned)
    lines = ["# Defaults search: every setting tried", "",
             f"{len(done)} of {total} settings finished (seed {SEED}; the grid and the criterion are declared in "
             "docs/defaults_search.md). Scores: each task's GLUE score (the mean of its official metrics) at the "
             f"run's best epoch; `mean` over {', '.join(TASKS)}; ties within {TIE_POINTS} points go to the setting "
             "that trained fewer updates. A `-es` setting (early stopping on) is its cell's runs without early "
             f"stopping, cut where `--patience {PATIENCE}` stops them: its scores and updates are the "
             "early-stopped run's.", "",
             "| setting | lr | " + " | ".join(TASKS) + " | mean | updates | winner |",
             "|---|---|" + "---:|" * len(TASKS) + "---:|---:|---|"]
    for s in sorted(settings, key=lambda s: (s.cell.family, s.cell.epochs, not s.cell.early_stop, s.lr)):
        won = "**yes**" if chosen.get(s.cell.family) == s else ""
        lines.append(f"| {s.cell.name} | {s.lr:g} | " + " | ".join(_fmt(s.scores.get(t)) for t in TASKS)
                     + f" | {_fmt(s.mean)} | {s.updates:,} | {won} |")
    due = edge_checks(settings)
    if due:
        lines += ["", "Edge checks the rule calls for (docs/defaults_search.md): " + "; ".join(
            f"`{cell.name}` at lr {cell.lrs[0]:g}" + ("" if cell in EDGE_CHECKS else ", not declared in EDGE_CHECKS yet")
            for cell in due) + "."]
    data = {"tasks": list(TASKS), "seed": SEED, "tie_points": TIE_POINTS, "finished": len(done), "planned": total,
            "settings": [{"cell": s.cell.name, "family": s.cell.family, "epochs": s.cell.epochs,
                          "early_stop": s.cell.early_stop, "lr": s.lr, "scores": s.scores, "mean": s.mean,
                          "updates": s.updates} for s in settings],
            "winners": {family: {"cell": s.cell.name, "lr": s.lr, "mean": s.mean} for family, s in chosen.items()},
            "edge_checks_due": [{"cell": cell.name, "lr": cell.lrs[0], "declared": cell in EDGE_CHECKS} for cell in due]}
    return data, "\n".join(lines) + "\n"


def run(glue_dir: Path, root: Path, cells: Sequence[Cell], passthrough: Sequence[str], resume: str,
        parallel: int = 1, reuse: Sequence[Path] = ()) -> List[Cell]:
    """Each cell's runner job in turn (finished runs are reused), the summary rewritten after each cell;
    then, for the families of ``cells``, the edge checks the rule calls for once their grid has finished
    (``edge_checks``).  ``resume``: the command a stopped search is continued with (the runner prints it
    when stopped).  The cells the summary ranks: ``cells`` and those edge checks."""
    environment = dict(os.environ, GLUE_BITFIT_COMMAND=resume)
    trained = list(dict.fromkeys(cell.trained_as for cell in cells))
    done = {cell: sum(len({r["task"] for r in rows} & set(TASKS)) for rows in runs_by_lr(root, cell).values())
            for cell in trained}
    total = sum(len(cell.lrs) * len(TASKS) for cell in trained)
    print(f"defaults search: {len(trained)} cell{'s' if len(trained) != 1 else ''} to train, {total} runs ({sum(done.values())} done earlier, "
          f"{total - sum(done.values())} to go; each cell's runner job shows its progress and ETA)", flush=True)
    ranked = list(cells)
    for number, cell in enumerate(trained, 1):
        cut = [other.name for other in cells if other.early_stop and other.trained_as == cell]
        print(f"defaults search: cell {number} of {len(trained)}: {cell.name} (lr {', '.join(f'{lr:g}' for lr in cell.lrs)};"
              f" {cell.epochs} epochs, early stopping off" + (f"; {', '.join(cut)}: these runs cut where --patience "
              f"{PATIENCE} stops" if cut else "") + f"; {done[cell]} of {len(cell.lrs) * len(TASKS)} runs done earlier)",
              flush=True)
        _train_cell(cell, glue_dir, root, passthrough, parallel, reuse, environment)
        write_summary(root, ranked)
    families = {cell.family for cell in cells}
    for check in edge_checks(read_settings(root, GRID)):
        if check.family not in families or check in ranked:
            continue
        print(f"defaults search: edge check {check.name} (lr {check.lrs[0]:g}; {check.epochs} epochs, early stopping "
              f"{'on' if check.early_stop else 'off'}): {check.family}'s winner on the grid sits on the grid's edge "
              "(docs/defaults_search.md)", flush=True)
        ranked.append(check)
        if check.trained_as not in trained:
            trained.append(check.trained_as)
            _train_cell(check.trained_as, glue_dir, root, passthrough, parallel, reuse, environment)
        write_summary(root, ranked)
    return ranked


def _train_cell(cell: Cell, glue_dir: Path, root: Path, passthrough: Sequence[str], parallel: int,
                reuse: Sequence[Path], environment: Dict[str, str]) -> None:
    command = [sys.executable, "-m", "fairseq_ext.experiments.glue_run",
               *cell.runner_args(glue_dir, root, passthrough, parallel, reuse=reuse)]
    status = subprocess.call(command, env=environment)
    if status != 0:
        sys.exit(status)  # the runner said why, and how its job goes on; this search goes on the same way


def write_summary(root: Path, cells: Sequence[Cell]) -> str:
    data, markdown = summary(read_settings(root, cells), cells)
    return write_report(root, "defaults_search", data, markdown)


@exit_on_user_error
def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    own = argv[:argv.index("--")] if "--" in argv else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--glue-dir", type=Path, default=Path("glue_data"))
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/defaults_search"))
    parser.add_argument("--cells", nargs="+", metavar="NAME", help="only these cells (default: the whole grid "
                        "and its edge checks): " + ", ".join(cell.name for cell in CELLS))
    parser.add_argument("--parallel", type=int, default=1, metavar="N",
                        help="runs trained at once, as the runner's PARALLEL (default 1). On a CPU each gets cores / N "
                        "threads; small models train faster as one-thread runs side by side")
    parser.add_argument("--reuse-results", nargs="+", type=Path, default=[], metavar="RESULTS_JSON",
                        help="other jobs' results.json files (a GLUE table's, another search's): a run there with the "
                        "same settings (train.py arguments, data, base model) is taken, not trained")
    parser.add_argument("--summarize", action="store_true", help="write the summary of what has finished (every "
                        "cell and the edge checks due, whatever --cells says); train nothing")
    args = parser.parse_args(own)
    if args.parallel < 1:
        raise UserError(f"--parallel {args.parallel}: expected a positive integer")
    missing = [path for path in args.reuse_results if not path.is_file()]
    if missing:
        raise UserError(f"--reuse-results {missing[0]}: no such file")
    by_name = {cell.name: cell for cell in CELLS}
    unknown = [name for name in args.cells or () if name not in by_name]
    if unknown:
        raise UserError(f"--cells {unknown[0]}: no such cell; cells: {', '.join(by_name)}")
    if args.summarize:
        due = edge_checks(read_settings(args.output_dir, GRID))
        print(write_summary(args.output_dir, list(dict.fromkeys([*CELLS, *due]))))
        return
    # Without --cells: the grid, then the edge checks its results call for (on this project's results
    # they are EDGE_CHECKS; elsewhere they are what the rule gives there).
    cells = [by_name[name] for name in args.cells] if args.cells else list(GRID)
    resume = shlex.join(["python", "-m", "fairseq_ext.experiments.defaults_search", *argv])
    ranked = run(args.glue_dir, args.output_dir, cells, passthrough, resume, args.parallel, args.reuse_results)
    print(write_summary(args.output_dir, ranked))


if __name__ == "__main__":
    main()
