"""The GLUE job's figures: curves.png (dev score per epoch, a panel per task, a line per mode),
loss_curves.png (training and dev loss per epoch) and size_curves.png (dev score against training
rows), each line the mean over seeds (with a one-std band on the score figures)."""
import contextlib
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from ...core.files import write_atomically
from .results import _mode_order, _spread, best_rows, curve_rows, main_rows


def plot_curves(rows: List[dict], specs: dict, path: Path) -> None:
    """Dev metric per epoch, one panel per task, one line per mode (its best lr): the mean over
    seeds, with a band of one standard deviation where there are several."""
    best = best_rows(main_rows(rows))
    with _task_figure(best, specs, path) as panels:
        for ax, task in panels:
            primary = specs[task].primary_metric
            for mode, runs in _modes_of(best, task):
                epochs = sorted({int(e) for run in runs for e in run["curve"]})
                spreads = [_spread([run["curve"].get(str(e), {}).get(primary) for run in runs]) for e in epochs]
                label = f"{mode} (lr {runs[0]['lr']:g}, {len(runs)} seed{'s' if len(runs) > 1 else ''})"
                _line_with_band(ax, epochs, spreads, label, band=len(runs) > 1)
            _label_panel(ax, task, "epoch", f"dev {primary} (%)", integer_x=True)


def plot_loss_curves(rows: List[dict], specs: dict, path: Path) -> None:
    """Training loss (solid) and dev loss (dashed) per epoch, one panel per task, one colour per mode (its
    best lr), the mean over seeds: whether a run still learned when its budget ended, and whether it fit
    its training data beyond what generalises.  Rows from before losses were kept are left out."""
    best = {key: [run for run in runs if run.get("loss_curve")] for key, runs in best_rows(main_rows(rows)).items()}
    best = {key: runs for key, runs in best.items() if runs}
    with _task_figure(best, specs, path) as panels:
        for ax, task in panels:
            for mode, runs in _modes_of(best, task):
                epochs = sorted({int(e) for run in runs for e in run["loss_curve"]})
                colour = None
                for split, style in (("train", "-"), ("dev", "--")):
                    means = [_spread([run["loss_curve"].get(str(e), {}).get(split) for run in runs])[0] for e in epochs]
                    line, = ax.plot(epochs, means, style, marker="o", markersize=2, color=colour,
                                    label=f"{mode} {split} (lr {runs[0]['lr']:g})")
                    colour = line.get_color()
            unit = "squared error / ln 2" if specs[task].regression else "bits / sentence"
            _label_panel(ax, task, "epoch", f"loss (fairseq's: {unit})", integer_x=True, legend_size=6)


def plot_size_curves(rows: List[dict], specs: dict, path: Path) -> None:
    """Dev metric against training rows (log scale), one panel per task, one line per mode: the
    mean over seeds with a one-std band."""
    best = best_rows(curve_rows(rows), by_size=True)
    with _task_figure(best, specs, path) as panels:
        for ax, task in panels:
            primary = specs[task].primary_metric
            for mode in sorted({k[1] for k in best if k[0] == task}, key=_mode_order):
                sizes = sorted(k[2] for k in best if k[:2] == (task, mode))
                spreads = [_spread([r["dev"].get(primary) for r in best[(task, mode, size)]]) for size in sizes]
                _line_with_band(ax, sizes, spreads, mode, band=any(sd is not None for _, sd in spreads))
            ax.set_xscale("log")
            _label_panel(ax, task, "training rows", f"dev {primary} (%)")


@contextlib.contextmanager
def _task_figure(best: Dict[tuple, list], specs: dict, path: Path):
    """A panel for each task that ``best`` (keyed by task first) has, side by side: the block draws into the
    (axes, task) pairs given, and the figure is saved at ``path`` after it; nothing when there is no task."""
    tasks = [t for t in specs if any(k[0] == t for k in best)]
    if not tasks:
        yield []
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    try:
        yield list(zip(axes[0], tasks))
        fig.tight_layout()
        write_atomically(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    finally:
        plt.close(fig)


def _modes_of(best: Dict[tuple, list], task: str) -> List[Tuple[str, list]]:
    """(mode, its runs) of one task, in the tables' mode order."""
    return [(mode, runs) for (t, mode), runs in sorted(best.items(), key=lambda item: _mode_order(item[0][1]))
            if t == task]


def _line_with_band(ax, xs: Sequence, spreads: Sequence[Tuple[float, Optional[float]]], label: str, band: bool):
    """The means as a line, and a band of one standard deviation around them."""
    means = [m for m, _ in spreads]
    line, = ax.plot(xs, means, marker="o", markersize=3, label=label)
    if band:
        ax.fill_between(xs, [m - (sd or 0.0) for m, sd in spreads], [m + (sd or 0.0) for m, sd in spreads],
                        color=line.get_color(), alpha=0.2, linewidth=0)


def _label_panel(ax, task: str, xlabel: str, ylabel: str, integer_x: bool = False, legend_size: int = 7) -> None:
    import matplotlib.ticker

    if integer_x:
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_title(task)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=legend_size)
