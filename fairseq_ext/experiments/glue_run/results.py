"""The GLUE runner's results: each run's row, the tables of results.md (and results.tex), and what is
gathered from each task's best runs (leaderboard files, the bias-change figure); ``plots`` draws them.

results.json keeps every run's row, the settings it was trained with included, so it is also
the job's ledger: a planned run whose row is there with the same settings is done, even when
its run folder has been deleted since (``Ledger``).
"""
import json
import logging
import os
import shutil
import statistics
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ...core import glue_metrics as gm
from ...core.errors import UserError
from ...core.files import write_atomically, write_text_atomically
from ...core.glue_tasks import TASK_NAMES, TASKS
from ...plugin.analysis import delta_bias_change, write_bias_change
from ...plugin.checkpoints import load_checkpoint_file
from ...plugin.models.hf_export import export
from ...training.options import BITFIT_PREFIX
from .base_identity import comparable_settings

logger = logging.getLogger(__name__)

def key_of_run(task: str, mode: str, lr: float, seed: int, curve_size: Optional[int] = None) -> tuple:
    """What tells runs apart: a training-size curve's runs (TRAIN_SUBSETS) are keyed by their size too."""
    return (task, mode, curve_size or 0, lr, seed)


def run_key(row: dict) -> tuple:
    return key_of_run(row["task"], row["mode"], row["lr"], row["seed"],
                      row.get("train_subset") if row.get("size_curve") else None)


class Ledger:
    """results.json's rows by run, as a job found them when it was planned, and the rows of other jobs'
    results.json files it may take runs from (REUSE_RESULTS)."""

    def __init__(self, path: Path, others: Sequence[Path] = ()):
        self.path = path
        self.rows = {run_key(row): row for row in load_results(path)}
        self.others = {Path(other): {run_key(row): row for row in load_results(Path(other), "REUSE_RESULTS")}
                       for other in others}

    def row(self, task: str, mode: str, lr: float, seed: int, curve_size: Optional[int]) -> Optional[dict]:
        """The row of a run (``curve_size``: its training size, for a run of a training-size curve)."""
        return self.rows.get(key_of_run(task, mode, lr, seed, curve_size))

    def other_rows(self, task: str, mode: str, lr: float, seed: int,
                   curve_size: Optional[int]) -> List[Tuple[Path, dict]]:
        """The same run's rows in the other jobs' files, each with the file it is in."""
        key = key_of_run(task, mode, lr, seed, curve_size)
        return [(path, rows[key]) for path, rows in self.others.items() if key in rows]


def main_rows(rows: List[dict]) -> List[dict]:
    return [row for row in rows if not row.get("size_curve")]


def curve_rows(rows: List[dict]) -> List[dict]:
    return [row for row in rows if row.get("size_curve")]


def load_results(path: Path, setting: Optional[str] = None) -> List[dict]:
    """The rows of a results.json; none where it does not exist yet, unless ``setting`` named it to read."""
    if not path.exists():
        if setting:
            raise UserError(f"{setting} {path}: no such file")
        return []
    try:
        return json.loads(path.read_text())["runs"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise UserError(f"{(setting + ' ') if setting else ''}{path}: not a results file of this tool ({error})") from None


def best_rows(rows: List[dict], by_size: bool = False) -> Dict[tuple, List[dict]]:
    """Per (task, mode), or (task, mode, training rows): the runs of the learning rate with the best mean dev score."""
    by_config: Dict[tuple, Dict[float, List[dict]]] = {}
    for row in rows:
        key = (row["task"], row["mode"], row["train_rows"]) if by_size else (row["task"], row["mode"])
        by_config.setdefault(key, {}).setdefault(row["lr"], []).append(row)
    best = {}
    for key, by_lr in by_config.items():
        def mean_primary(lr):
            scores = [r["dev"].get(r["primary_metric"], float("-inf")) for r in by_lr[lr]]
            return sum(scores) / len(scores)
        best[key] = by_lr[max(by_lr, key=mean_primary)]
    return best


def _mean(values):
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def _spread(values) -> Tuple[Optional[float], Optional[float]]:
    """(mean, sample standard deviation) of the values present; the deviation needs two."""
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _fmt(value, digits=1):
    return "–" if value is None else f"{value:.{digits}f}"


def _fmt_spread(mean, std, digits=1):
    return _fmt(mean, digits) if std is None else f"{mean:.{digits}f} ± {std:.{digits}f}"


def _seeds_note(count: int, seeds: int) -> str:
    """What a cell adds when fewer of the job's seeds than all stand behind it (a job still running)."""
    return "" if count >= seeds else f" ({count} of {seeds} seeds)"


MODE_ORDER = ("full", "bitfit-ofa", "bitfit-all", "bitfit-q,m2", "lora", "ia3", "adapter", "rand_uniform",
              "rand_row_col")


def _mode_order(mode: str):
    return (MODE_ORDER.index(mode) if mode in MODE_ORDER else len(MODE_ORDER), mode == "head", mode)


HOW_CHOSEN = ("For each task and mode, every learning rate in the mode's defaults (or LRS) is trained with every "
              "seed; the learning rate with the best mean dev score (the task's primary metric) over the seeds is "
              "reported. A run's score is its best epoch's, the epoch whose checkpoint_best.pt it keeps. Cells are "
              "the mean ± sample standard deviation over seeds; nothing is tuned per seed.")


@dataclass
class Cell:
    """A summary-table cell: (mean, sample std) over seeds per metric, and how many seeds stand behind it."""
    spreads: List[Tuple[Optional[float], Optional[float]]]
    seeds: int


# A row's measurements of the machine, not of the training's outcome: two runs that give the same
# results differ in them (and a delta's size in the path lengths its header records).
MEASURED_FIELDS = ("wall_time_s", "epoch_train_s", "peak_memory_bytes", "delta_bytes")


@dataclass
class Cost:
    """What a mode's best runs cost: the stored task, the training time, the memory."""
    delta_kib: Optional[float]  # mean size of the best checkpoint's delta; None: full fine-tuning (no delta)
    epoch_s: List[Optional[float]]  # per task: mean seconds of training steps per epoch
    peak_mib: Optional[float]  # the largest peak memory of a run (resident set on CPU, allocated on CUDA)
    seed_updates: Optional[float]  # one seed's updates over every task (mean over seeds); None unless all tasks ran
    seed_wall_min: Optional[float]  # one seed's wall time over every task, minutes, likewise


@dataclass
class SummaryLine:
    mode: str
    trainable_percent: Optional[float]
    cells: List[Optional[Cell]]  # one per task, None where the mode has no run of it
    mean: Optional[Cell]  # the GLUE score averaged over tasks, per seed; None unless every task has runs
    cost: Optional[Cost] = None


@dataclass
class Summary:
    """The main table of results.md and results.tex: each mode's best learning rate, per task."""
    tasks: List[str]
    metrics: Dict[str, Tuple[str, ...]]
    seeds: List[int]
    lines: List[SummaryLine]
    best: Dict[tuple, List[dict]]  # (task, mode) -> the runs of its best learning rate


def summary(rows: List[dict], specs: dict) -> Summary:
    best = best_rows(main_rows(rows))
    tasks = [t for t in specs if any(k[0] == t for k in best)]
    metrics = {t: specs[t].metrics + (("accuracy_mm",) if t == "MNLI" else ()) for t in tasks}
    lines = []
    for mode in sorted({k[1] for k in best}, key=_mode_order):
        cells, fractions, scores_by_seed = [], [], {}
        for task in tasks:
            runs = best.get((task, mode))
            if not runs:
                cells.append(None)
                continue
            cells.append(Cell([_spread([r["dev"].get(m) for r in runs]) for m in metrics[task]], len(runs)))
            for r in runs:
                scores_by_seed.setdefault(r["seed"], {})[task] = r["dev"].get("glue_score")
            fractions += [100.0 * r["trainable"] / r["total"] for r in runs if r.get("trainable") and r.get("total")]
        complete = [_mean(by_task.values()) for by_task in scores_by_seed.values() if len(by_task) == len(tasks)]
        mean = Cell([_spread(complete)], len(complete)) if complete and None not in cells else None
        lines.append(SummaryLine(mode, _mean(fractions), cells, mean, _cost([best.get((t, mode)) for t in tasks])))
    return Summary(tasks, metrics, sorted({r["seed"] for r in rows}), lines, best)


def _cost(runs_by_task: List[Optional[List[dict]]]) -> Cost:
    runs = [r for task_runs in runs_by_task for r in task_runs or []]
    deltas = [r["delta_bytes"] / 1024 for r in runs if r.get("delta_bytes")]
    peaks = [r["peak_memory_bytes"] / 2**20 for r in runs if r.get("peak_memory_bytes")]
    epoch_s = [_mean([r["epoch_train_s"] for r in task_runs or [] if r.get("epoch_train_s") is not None])
               for task_runs in runs_by_task]
    per_task = [{r["seed"]: r for r in task_runs} for task_runs in runs_by_task if task_runs]
    seeds = set.intersection(*(set(by_seed) for by_seed in per_task)) if len(per_task) == len(runs_by_task) else set()

    def per_seed(field: str, scale: float = 1.0) -> Optional[float]:
        totals = [sum(by_seed[seed].get(field) or 0 for by_seed in per_task) / scale for seed in sorted(seeds)]
        return _mean(totals) if totals else None

    return Cost(_mean(deltas), epoch_s, max(peaks) if peaks else None, per_seed("updates"),
                per_seed("wall_time_s", 60.0))


def results_markdown(rows: List[dict], specs: dict) -> str:
    """results.md: the summary (what the job prints at its end), then every run."""
    return summary_markdown(rows, specs) + "\n" + every_run_markdown(rows)


def summary_markdown(rows: List[dict], specs: dict) -> str:
    """The tables of results.md: each mode's cells, the defaults used, the training-size curves."""
    table = summary(rows, specs)
    tasks, seeds = table.tasks, table.seeds

    def cell(value: Optional[Cell]) -> str:
        if value is None:
            return "–"
        return "/".join(_fmt_spread(*spread) for spread in value.spreads) + _seeds_note(value.seeds, len(seeds))

    lines = [
        "# GLUE dev results",
        "",
        f"{HOW_CHOSEN} Metrics in %; seeds: {', '.join(map(str, seeds))}. `mean` averages each task's GLUE "
        "score (the mean of its official metrics), per seed, over the tasks.",
    ]
    if tasks:  # a job of training-size curves alone has no full-data table
        lines += ["", "| mode | trainable % | " + " | ".join(f"{t} ({'/'.join(table.metrics[t])})" for t in tasks)
                  + " | mean |", "|---|---|" + "---|" * len(tasks) + "---|"]
    for line in table.lines:
        lines.append(f"| {line.mode} | {_fmt(line.trainable_percent, 3)} | "
                     + " | ".join(cell(c) for c in line.cells) + f" | {cell(line.mean)} |")
    if any(line.cost and (line.cost.peak_mib or any(line.cost.epoch_s) or line.cost.seed_updates)
           for line in table.lines):
        lines += ["", "## Cost", "",
                  "Per mode, over the runs in the table above: the size of the best checkpoint's delta (what storing "
                  "one task takes), the seconds of training steps per epoch (fairseq's train_wall; validation and "
                  "saving aside), the largest peak memory of a run (the process's resident set on CPU, CUDA's "
                  "most allocated on a GPU), and what one seed's runs over every task took: updates trained and "
                  "wall minutes (validation, saving and any pause included; mean over seeds).", "",
                  "| mode | delta (KiB) | " + " | ".join(f"{t} s / epoch" for t in tasks)
                  + " | peak memory (MiB) | updates, one seed | wall min, one seed |",
                  "|---|---:|" + "---:|" * len(tasks) + "---:|---:|---:|"]
        for line in table.lines:
            cost = line.cost
            delta = "full model" if line.mode == "full" else _fmt(cost.delta_kib, 0)
            lines.append(f"| {line.mode} | {delta} | " + " | ".join(_fmt(s, 1) for s in cost.epoch_s)
                         + f" | {_fmt(cost.peak_mib, 0)} | {'–' if cost.seed_updates is None else f'{cost.seed_updates:,.0f}'}"
                         f" | {_fmt(cost.seed_wall_min, 1)} |")
    lines += relative_to_full_markdown(table, specs)
    best = table.best
    recipes = {}
    chosen = {**{key[:2]: runs for key, runs in best_rows(curve_rows(rows), by_size=True).items()}, **best}
    for (task, mode), runs in sorted(chosen.items(), key=lambda item: (_mode_order(item[0][1]), item[0][0])):
        for rule in dict.fromkeys((run.get("recipe") or {}).get("rule") for run in runs):
            if rule:  # every rule the cell's runs trained at: a row reused from another job keeps that job's
                recipes.setdefault(mode, {}).setdefault(rule, []).append(task)
    if recipes:
        lines += ["", "## Defaults", ""]
        for mode, rules in recipes.items():
            for rule, rule_tasks in rules.items():
                lines.append(f"- {mode} ({', '.join(rule_tasks)}): {rule}")
    curves = best_rows(curve_rows(rows), by_size=True)
    if curves:
        lines += ["", "## Training-size curves", "",
                  "Dev score (the task's primary metric, mean ± std over seeds, best learning rate per size) by "
                  "the number of training rows (TRAIN_SUBSETS); size_curves.png plots it.", "",
                  "| task | mode | " + " | ".join(f"{n:,} rows" for n in sorted({k[2] for k in curves})) + " |",
                  "|---|---|" + "---:|" * len({k[2] for k in curves})]
        sizes = sorted({k[2] for k in curves})
        for task, mode in sorted({k[:2] for k in curves}, key=lambda tm: (tm[0], _mode_order(tm[1]))):
            cells = []
            for size in sizes:
                runs = curves.get((task, mode, size))
                cells.append(_fmt_spread(*_spread([r["dev"].get(r["primary_metric"]) for r in runs]))
                             + _seeds_note(len(runs), len(seeds)) if runs else "–")
            lines.append(f"| {task} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def relative_to_full_markdown(table: Summary, specs: dict) -> List[str]:
    """Each mode's score as a fraction of full fine-tuning's (means over seeds, each task's primary metric and
    the mean GLUE score): how much of full fine-tuning a method keeps. Nothing without a full row."""
    full = next((line for line in table.lines if line.mode == "full"), None)
    if full is None or len(table.lines) < 2:
        return []

    def primary_mean(line: SummaryLine, index: int) -> Optional[float]:
        task, cell = table.tasks[index], line.cells[index]
        return cell.spreads[table.metrics[task].index(specs[task].primary_metric)][0] if cell else None

    def ratio(value: Optional[float], reference: Optional[float]) -> str:
        return "–" if value is None or reference is None or reference <= 0 else f"{value / reference:.3f}×"

    def mean_score(line: SummaryLine) -> Optional[float]:
        return line.mean.spreads[0][0] if line.mean else None

    lines = ["", "## Relative to full fine-tuning", "",
             "Each mode's mean dev score over full fine-tuning's, on each task's primary metric and on the mean "
             "GLUE score.", "",
             "| mode | " + " | ".join(f"{t} ({specs[t].primary_metric})" for t in table.tasks) + " | mean |",
             "|---|" + "---:|" * len(table.tasks) + "---:|"]
    for line in table.lines:
        if line.mode != "full":
            lines.append(f"| {line.mode} | " + " | ".join(ratio(primary_mean(line, i), primary_mean(full, i))
                                                          for i in range(len(table.tasks)))
                         + f" | {ratio(mean_score(line), mean_score(full))} |")
    return lines


def every_run_markdown(rows: List[dict]) -> str:
    """results.md's list of every run, with its settings' outcome and wall time."""
    lines = [
        "## Every run",
        "",
        "| task | mode | training rows | lr | seed | dev metrics | best epoch | updates | trainable / total | wall (s) |",
        "|---|---|---:|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (r["task"], _mode_order(r["mode"]), r["train_rows"], r["lr"], r["seed"])):
        dev = ", ".join(f"{k} {_fmt(v)}" for k, v in row["dev"].items())
        params = (f"{row['trainable']:,} / {row['total']:,}" if row.get("trainable") else "–")
        lines.append(f"| {row['task']} | {row['mode']} | {row['train_rows']:,} | {row['lr']:g} | {row['seed']} | "
                     f"{dev} | {row['best_epoch']} | {row['updates']} | {params} | {row['wall_time_s']:.0f} |")
    return "\n".join(lines) + "\n"


LATEX_METRICS = {gm.MCC: "MCC", gm.ACCURACY: "Acc.", "f1": "F1", gm.PEARSON: "Pearson", gm.SPEARMAN: "Spearman",
                 "accuracy_mm": "Acc.\\ (mm)"}
_LATEX_SPECIAL = {c: "\\" + c for c in "&%$#_{}"} | {"~": r"\textasciitilde{}", "^": r"\textasciicircum{}",
                                                     "\\": r"\textbackslash{}"}


def _latex_escape(text: str) -> str:
    return "".join(_LATEX_SPECIAL.get(c, c) for c in text)


def results_latex(rows: List[dict], specs: dict) -> Optional[str]:
    """results.md's main table as a LaTeX booktabs table to paste into a paper, the best mean of
    every metric in bold (ties at the shown precision too); None for a job without full-data runs."""
    table = summary(rows, specs)
    if not table.tasks:
        return None
    shown_means: Dict[tuple, List[str]] = {}  # (task, metric index; None for the mean column) -> every mode's
    for line in table.lines:
        for task, found in [*zip(table.tasks, line.cells), (None, line.mean)]:
            for index, (mean, _) in enumerate(found.spreads if found is not None else []):
                if mean is not None:
                    shown_means.setdefault((task, index), []).append(_fmt(mean))
    shown_best = {column: max(means, key=float) for column, means in shown_means.items() if len(means) > 1}

    def cell(cell_value: Optional[Cell], task: Optional[str]) -> str:
        if cell_value is None:
            return "--"
        parts = []
        for index, (mean, std) in enumerate(cell_value.spreads):
            shown = "--" if mean is None else _fmt(mean)
            value = rf"\textbf{{{shown}}}" if shown == shown_best.get((task, index)) else shown
            parts.append(value if std is None else rf"{value}\,{{\scriptsize$\pm${std:.1f}}}")
        note = _seeds_note(cell_value.seeds, len(table.seeds)).strip()
        return "/".join(parts) + (rf" {{\scriptsize{note}}}" if note else "")

    header = ["Mode", r"Trainable (\%)", *(_latex_escape(t) for t in table.tasks), "Mean"]
    metric_row = ["", "", *("/".join(LATEX_METRICS.get(m, _latex_escape(m)) for m in table.metrics[t])
                            for t in table.tasks), "GLUE score"]
    body = [" & ".join([_latex_escape(line.mode), _fmt(line.trainable_percent, 3),
                        *(cell(c, t) for c, t in zip(line.cells, table.tasks)), cell(line.mean, None)])
            + r" \\" for line in table.lines]
    seeds = ", ".join(map(str, table.seeds))
    return "\n".join([
        "% GLUE dev results, written by fairseq_ext.experiments.glue_run from results.json (results.md has",
        "% every run). Needs \\usepackage{booktabs}.",
        r"\begin{table}[t]",
        r"  \centering",
        r"  \small",
        r"  \setlength{\tabcolsep}{4pt}",
        r"  \begin{tabular}{lr" + "c" * (len(table.tasks) + 1) + "}",
        r"    \toprule",
        "    " + " & ".join(header) + r" \\",
        "    " + " & ".join(metric_row) + r" \\",
        r"    \midrule",
        *("    " + line for line in body),
        r"    \bottomrule",
        r"  \end{tabular}",
        rf"  \caption{{GLUE dev results (\%): mean $\pm$ sample standard deviation over seeds {seeds}, each "
        r"mode at the learning rate with the best mean dev score; a run's score is its best epoch's. Mean: "
        r"each task's GLUE score (the mean of its official metrics) averaged over the tasks, per seed. "
        r"Best in bold.}",
        r"  \label{tab:glue-dev}",
        r"\end{table}",
    ]) + "\n"


def _with_comparable_settings(row: dict) -> dict:
    """A row as the ledger keeps it: its base checkpoint named by digest where it was recorded by path."""
    return {**row, "settings": comparable_settings(row["settings"])} if row.get("settings") else row


_writing = threading.Lock()  # runs trained side by side finish in threads of one job: they add their rows in turn


def write_results(output_dir: Path, new_rows: List[dict]) -> List[dict]:
    """results.json (the ledger), results.md and results.tex with ``new_rows`` added or replaced: written after
    each finished run, so a job that stops keeps its finished runs' rows."""
    with _writing:
        return _write_results(output_dir, new_rows)


def _write_results(output_dir: Path, new_rows: List[dict]) -> List[dict]:
    path = output_dir / "results.json"
    rows = {run_key(r): r for r in load_results(path)}
    rows.update({run_key(r): r for r in new_rows})
    rows = {key: _with_comparable_settings(row) for key, row in rows.items()}
    rows = sorted(rows.values(), key=run_key)
    specs = {name: TASKS[name] for name in TASK_NAMES}
    write_text_atomically(path, json.dumps({"how_chosen": HOW_CHOSEN, "runs": rows}, indent=1) + "\n")
    write_text_atomically(output_dir / "results.md", results_markdown(rows, specs))
    latex = results_latex(rows, specs)
    if latex is not None:
        write_text_atomically(output_dir / "results.tex", latex)
    return rows


def best_bitfit_runs(rows: List[dict]) -> Dict[str, dict]:
    """Each task's BitFit run with the best dev score, over the BitFit modes' best learning rates."""
    best: Dict[str, dict] = {}
    for (task, mode), runs in best_rows(main_rows(rows)).items():
        if not mode.startswith(BITFIT_PREFIX):
            continue
        run = max(runs, key=lambda r: r["dev"].get(r["primary_metric"], float("-inf")))
        if task not in best or run["dev"].get(run["primary_metric"], float("-inf")) > \
                best[task]["dev"].get(best[task]["primary_metric"], float("-inf")):
            best[task] = run
    return best


def write_bias_change_of_best_runs(output_dir: Path, rows: List[dict], base_checkpoint: str) -> Optional[Path]:
    """OUTPUT_DIR/bias_change/: how far each bias term moved in each task's best BitFit run (a panel per task)."""
    best = best_bitfit_runs(rows)
    base = load_checkpoint_file(base_checkpoint)
    tables = {}
    for task, run in sorted(best.items()):
        delta = Path(run["run_dir"]) / "checkpoint_best.delta.safetensors"
        if not delta.exists():
            continue
        try:
            tables[f"{task} {run['mode']}"] = delta_bias_change(base, delta, str(delta), str(base_checkpoint))
        except UserError as error:  # a run of another model in the same OUTPUT_DIR: no panel, not a failed job
            logger.warning(f"bias change of {delta} left out: {error}")
    return write_bias_change(tables, output_dir / "bias_change") if tables else None


def collect_predictions(output_dir: Path, rows: List[dict]) -> None:
    """OUTPUT_DIR/predictions/<mode>/: each task's leaderboard files from its best run."""
    for (task, mode), runs in best_rows(main_rows(rows)).items():
        best = max(runs, key=lambda r: r["dev"].get(r["primary_metric"], float("-inf")))
        for path in (best.get("predictions") or {}).values():
            if Path(path).exists():
                target = output_dir / "predictions" / mode / Path(path).name
                target.parent.mkdir(parents=True, exist_ok=True)
                write_atomically(target, lambda tmp, source=path: shutil.copyfile(source, tmp))



def export_best_runs(output_dir: Path, rows: List[dict], model_dir: str) -> List[Path]:
    """EXPORT=hf: OUTPUT_DIR/export/<TASK>/, each task's best BitFit run as a transformers folder (replacing an
    earlier job's once the new one is complete)."""
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the job's output is its own progress lines
    written = []
    for task, run in sorted(best_bitfit_runs(rows).items()):
        delta = Path(run["run_dir"]) / "checkpoint_best.delta.safetensors"
        target = output_dir / "export" / task
        fresh = target.with_name(f".{task}.new")
        shutil.rmtree(fresh, ignore_errors=True)
        try:
            export(model_dir, fresh, delta=delta, report=None)
        except UserError as error:  # a run of another model in the same OUTPUT_DIR: not a failed job
            logger.warning(f"export of {delta} left out: {error}")
            continue
        shutil.rmtree(target, ignore_errors=True)
        os.rename(fresh, target)
        written.append(target)
    return written
