"""results.md's and results.tex's tables from results.json's rows (experiments/glue_run/results.py), without training."""
import statistics

from fairseq_ext.core.glue_tasks import get_task_spec
from fairseq_ext.experiments.glue_run.results import results_latex, results_markdown


def row(mode, lr, seed, mcc):
    return {"task": "CoLA", "mode": mode, "lr": lr, "seed": seed, "train_rows": 8551, "primary_metric": "mcc",
            "dev": {"mcc": mcc, "glue_score": mcc}, "trainable": 10, "total": 1000, "best_epoch": 1,
            "updates": 5, "wall_time_s": 1.0}


def table_line(markdown, mode):
    return next(line for line in markdown.splitlines() if line.startswith(f"| {mode} |"))


def test_cells_are_the_best_learning_rates_mean_and_std_and_say_when_seeds_are_missing():
    full = [30.0, 27.5, 29.0]
    rows = [row("full", 5e-5, seed, mcc) for seed, mcc in zip((1, 2, 3), full)]
    rows += [row("full", 1e-5, seed, 10.0) for seed in (1, 2, 3)]  # the worse learning rate: not reported
    rows += [row("bitfit-ofa", 1e-3, seed, mcc) for seed, mcc in ((1, 20.0), (2, 17.0))]  # seed 3 not run yet
    markdown = results_markdown(rows, {"CoLA": get_task_spec("CoLA")})
    spread = f"{statistics.fmean(full):.1f} ± {statistics.stdev(full):.1f}"
    assert table_line(markdown, "full") == f"| full | 1.000 | {spread} | {spread} |"
    ofa = f"18.5 ± {statistics.stdev([20.0, 17.0]):.1f} (2 of 3 seeds)"
    assert table_line(markdown, "bitfit-ofa") == f"| bitfit-ofa | 1.000 | {ofa} | {ofa} |"


def latex_line(latex, mode):
    return next(line.strip() for line in latex.splitlines() if line.strip().startswith(f"{mode} &"))


def test_latex_table_has_the_markdown_cells_with_each_metrics_best_mean_in_bold():
    full = [30.0, 27.5, 29.0]
    rows = [row("full", 5e-5, seed, mcc) for seed, mcc in zip((1, 2, 3), full)]
    rows += [row("bitfit-ofa", 1e-3, seed, mcc) for seed, mcc in ((1, 20.0), (2, 17.0))]  # seed 3 not run yet
    rows += [row("rand_uniform", 1e-3, seed, 31.0) for seed in (1, 2, 3)]  # the best CoLA mean, no spread
    latex = results_latex(rows, {"CoLA": get_task_spec("CoLA")})
    spread = rf"{statistics.fmean(full):.1f}\,{{\scriptsize$\pm${statistics.stdev(full):.1f}}}"
    assert latex_line(latex, "full") == rf"full & 1.000 & {spread} & {spread} \\"
    ofa = rf"18.5\,{{\scriptsize$\pm${statistics.stdev([20.0, 17.0]):.1f}}} {{\scriptsize(2 of 3 seeds)}}"
    assert latex_line(latex, "bitfit-ofa") == rf"bitfit-ofa & 1.000 & {ofa} & {ofa} \\"
    best = r"\textbf{31.0}\,{\scriptsize$\pm$0.0}"
    assert latex_line(latex, r"rand\_uniform") == rf"rand\_uniform & 1.000 & {best} & {best} \\"
    assert latex.count(r"\begin{tabular}{lrcc}") == 1 and r"\toprule" in latex and r"\bottomrule" in latex
    assert r"seeds 1, 2, 3" in latex and "& MCC & GLUE score" in latex


def test_latex_table_is_left_out_without_full_data_runs():
    rows = [dict(row("bitfit-ofa", 1e-3, 1, 20.0), size_curve=True, train_subset=100)]
    assert results_latex(rows, {"CoLA": get_task_spec("CoLA")}) is None


def test_each_mode_is_shown_as_a_fraction_of_full_fine_tuning():
    full = [30.0, 27.5, 29.0]
    rows = [row("full", 5e-5, seed, mcc) for seed, mcc in zip((1, 2, 3), full)]
    rows += [row("bitfit-ofa", 1e-3, seed, mcc) for seed, mcc in ((1, 20.0), (2, 17.0))]
    markdown = results_markdown(rows, {"CoLA": get_task_spec("CoLA")})
    relative = markdown.split("## Relative to full fine-tuning", 1)[1].split("\n## ", 1)[0]
    fraction = f"{18.5 / statistics.fmean(full):.3f}×"
    assert "| mode | CoLA (mcc) | mean |" in relative and f"| bitfit-ofa | {fraction} | {fraction} |" in relative
    assert "| full |" not in relative
    # A full fine-tuning score at or below zero has no fraction; without a full row there is no section.
    negative = [row("full", 5e-5, 1, -2.0), row("bitfit-ofa", 1e-3, 1, 3.0)]
    assert "| bitfit-ofa | – | – |" in results_markdown(negative, {"CoLA": get_task_spec("CoLA")})
    assert "## Relative" not in results_markdown(rows[3:], {"CoLA": get_task_spec("CoLA")})


def test_cost_says_what_one_seed_over_every_task_took():
    def sts(mode, seed, updates, wall):
        return {**row(mode, 1e-3, seed, 50.0), "task": "STS-B", "primary_metric": "spearman",
                "dev": {"pearson": 50.0, "spearman": 50.0, "glue_score": 50.0}, "updates": updates, "wall_time_s": wall}

    rows = [dict(row("full", 5e-5, seed, 30.0), updates=100, wall_time_s=600.0) for seed in (1, 2, 3)]
    rows += [sts("full", 1, 50, 300.0), sts("full", 2, 70, 420.0)]  # seed 3 of STS-B not run yet
    rows += [dict(row("head", 1e-3, 1, 5.0), updates=40, wall_time_s=60.0)]  # no STS-B run: no per-seed total
    markdown = results_markdown(rows, {"CoLA": get_task_spec("CoLA"), "STS-B": get_task_spec("STS-B")})
    cost = markdown.split("## Cost", 1)[1].split("\n## ", 1)[0]
    assert "| updates, one seed | wall min, one seed |" in cost
    # Seeds 1 and 2 ran both tasks: 150 and 170 updates, 15 and 17 minutes.
    assert table_line(cost.split("|---|", 1)[1], "full").endswith("| 160 | 16.0 |")
    assert table_line(cost.split("|---|", 1)[1], "head").endswith("| – | – |")


def test_defaults_name_every_rule_a_cell_s_runs_trained_at():
    """A row reused from another job (REUSE_RESULTS) keeps that job's rule; the section lists it beside this job's."""
    own = dict(row("full", 1e-4, 2, 28.0), recipe={"rule": "the small-model recipe: lr 1e-4"})
    reused = dict(row("full", 1e-4, 1, 34.0), recipe={"rule": "the small-model recipe: lr 5e-5; LRS=1e-4"})
    markdown = results_markdown([reused, own, dict(own, seed=3)], {"CoLA": get_task_spec("CoLA")})
    defaults = markdown.split("## Defaults")[1].split("\n## ")[0]
    assert [line for line in defaults.splitlines() if line.startswith("- ")] == [
        "- full (CoLA): the small-model recipe: lr 5e-5; LRS=1e-4", "- full (CoLA): the small-model recipe: lr 1e-4"]
