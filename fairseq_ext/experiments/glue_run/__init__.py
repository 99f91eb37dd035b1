"""GLUE end to end: prepare, fine-tune with train.py, collect results, predict test sets.

``run_scripts/glue_bitfit.sh`` maps its environment variables onto this CLI::

    python -m fairseq_ext.experiments.glue_run --glue-dir glue_data --tasks "CoLA STS-B" --mode bitfit \\
        --output-dir outputs/glue -- --max-update 30      # after --: passed to train.py

For every task, mode, learning rate and seed, one train.py run is made in
``OUTPUT_DIR/runs/<TASK>/<mode>/lr<LR>-seed<SEED>/``; a run that finished is
not run again, and an interrupted one resumes from its last checkpoint.  What a
run gave is read from the run record train.py writes (``run_record.json``), not
from its log.  The results of all runs in OUTPUT_DIR (this call's and earlier
ones', other modes included) are written to results.json, results.md (results.tex: its
table in LaTeX) and curves.png.
Runs are trained one after another, up to ``--parallel`` at once, or each as a
submitit job (``--launcher``; see ``Dispatch``): the results are the same.  A run
whose folder was deleted is still done while its row in results.json (which keeps
the settings it was trained with) matches.

This module is the command line and the job; ``settings`` declares the job's settings, ``plan``
plans its runs, ``dispatch`` trains them (one after another, at once, or as submitit jobs), ``runs``
launches one train.py run and shows its progress, and ``results`` turns the runs' rows into
results.json, results.md, results.tex and plots.
"""
import contextlib
import dataclasses
import logging
import os
import sys
from pathlib import Path
from typing import List

import torch

from ...core import interrupts
from ...core.errors import UserError, exit_on_user_error
from ...core.glue_files import check_glue_dir, read_split
from ...core.glue_tasks import GLUE_SOURCE_HINT, TASKS, get_task_spec
from ...plugin.checkpoints import checkpoint_parameter_count
from ...plugin.data.glue_prepare import prepare_task
from ...training.glue_recipe import check_user_arguments, default_recipe
from . import settings
from .dispatch import Dispatch, run_summary
from .plan import bookkeeping_args, choose_bf16_base, plan_run, present_tasks, resolve_model, run_modes
from .plots import plot_curves, plot_loss_curves, plot_size_curves
from .results import (Ledger, collect_predictions, export_best_runs, summary_markdown, write_bias_change_of_best_runs,
                      write_results)
from .console import JobProgress
from .runs import JobStage

__all__ = ["main", "PROG", "Dispatch", "JobProgress", "run_summary"]

logger = logging.getLogger("fairseq_ext.experiments.glue_run")  # also when run as __main__


DEFAULT_GLUE_DIR = "glue_data"


PROG = "glue_bitfit"  # run_scripts/glue_bitfit.sh: what its one-line errors and its stop line are headed with


def _check_settings(args, passthrough: List[str]) -> None:
    """What no single setting's own check can tell, checked before anything runs."""
    if (args.parallel > 1 or args.launcher != "local") and (args.nproc > 1 or args.nnodes > 1):
        # Runs at once would share torchrun's master port, and a node's runs must follow the plan's order.
        raise UserError(f"NPROC {args.nproc}, NNODES {args.nnodes}: torchrun runs are trained one at a time; "
                        "use PARALLEL=1 and LAUNCHER=local with NPROC or NNODES above 1")
    output_dir = Path(args.output_dir)
    if output_dir.exists() and not output_dir.is_dir():
        raise UserError(f"OUTPUT_DIR {output_dir}: is a file, not a folder")
    check_user_arguments(passthrough)


def _glue_dir(given: str) -> Path:
    """GLUE_DIR, or ./glue_data when it is not set; errors name the variable the run script's users set."""
    if not given and not Path(DEFAULT_GLUE_DIR).is_dir():
        raise UserError(f"GLUE_DIR is not set and its default, {DEFAULT_GLUE_DIR}, is not a directory in "
                        f"{Path.cwd()}: set GLUE_DIR to GLUE's glue_data folder. {GLUE_SOURCE_HINT}")
    try:
        return check_glue_dir(given or DEFAULT_GLUE_DIR)
    except UserError as error:
        raise UserError(str(error).replace("--glue-dir", "GLUE_DIR")) from None


@exit_on_user_error(prog=PROG)
def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    passthrough = argv[argv.index("--") + 1:] if "--" in argv else []
    if passthrough in (["--help"], ["-h"]):
        print(settings.help_text())
        return
    args = settings.parse(argv[: argv.index("--")] if "--" in argv else argv, PROG)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", force=True)
    for noisy in ("fairseq", "matplotlib"):  # train.py keeps fairseq's full log in each run's train.log
        logging.getLogger(noisy).setLevel(logging.WARNING)

    glue_dir = _glue_dir(args.glue_dir)
    tasks = args.tasks.split() or present_tasks(glue_dir)
    if not tasks:
        raise UserError(f"GLUE_DIR {glue_dir}: no task folder with a train.tsv; expected "
                        f"{glue_dir}/<TASK>/{{train,dev,test}}.tsv. {GLUE_SOURCE_HINT}")
    specs = [get_task_spec(task) for task in tasks]
    modes = run_modes(args.mode, args.bitfit_terms)
    not_run = [task for task in args.train_subset if task != settings.EVERY_TASK and task not in [s.name for s in specs]]
    if not_run:
        raise UserError(f"TRAIN_SUBSET names {not_run[0]}, which this job does not train (TASKS: "
                        f"{' '.join(s.name for s in specs)})")
    args.train_subsets = sorted(set(args.train_subsets))
    _check_settings(args, passthrough)
    dispatch = Dispatch(args, passthrough)
    output_dir = Path(args.output_dir)
    stage = JobStage()
    try:
        with interrupts.handled(), _removed_if_left_empty(output_dir):
            run_job(args, specs, modes, args.seeds, args.lrs, passthrough, glue_dir, output_dir, stage, dispatch)
    except interrupts.Interrupted as stop:
        print(f"\n{PROG}: {stop.signal_name}: stopped {stage.describe()}. Finished runs and each run's last "
              f"checkpoint are kept; to resume, run the same command: "
              f"{settings.resume_command(argv, args.from_env)}", file=sys.stderr, flush=True)
        sys.exit(stop.exit_status)


@contextlib.contextmanager
def _removed_if_left_empty(folder: Path):
    """Make ``folder``; if this call made it and the job fails before writing into it, remove it again."""
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    try:
        yield
    except BaseException:
        if created:
            for directory in sorted((d for d in folder.rglob("*") if d.is_dir()), key=lambda d: -len(d.parts)):
                with contextlib.suppress(OSError):
                    directory.rmdir()  # only empty ones
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise


def run_job(args, specs, modes, seeds, lrs, passthrough, glue_dir: Path, output_dir: Path, stage: JobStage,
            dispatch: "Dispatch") -> None:
    model = resolve_model(args.model, output_dir)
    model_params = checkpoint_parameter_count(model.checkpoint)
    print(f"GLUE {' '.join(modes)}: tasks {' '.join(s.name for s in specs)}; model {model.path} ({model.arch}, "
          f"{model_params / 1e6:.1f}M parameters)", flush=True)

    # Every task's files are read and checked before the first run trains.
    curve = bool(args.train_subsets)
    if curve:
        for spec in specs:
            available = len(read_split(spec.name, glue_dir, "train").texts)
            too_many = [size for size in args.train_subsets if size > available]
            if too_many:
                raise UserError(f"TRAIN_SUBSETS {too_many[0]}: {spec.name} has {available:,} training rows")
    runs, ledger = [], Ledger(output_dir / "results.json", [Path(path) for path in args.reuse_results.split()])
    local_cpu = args.launcher == "local" and not torch.cuda.is_available()
    base = choose_bf16_base(args.bf16_base, modes, passthrough, local_cpu, output_dir, ledger)
    for spec in specs:
        for size in args.train_subsets if curve else [settings.train_subset_of(args.train_subset, spec.name)]:
            folder = f"{spec.name}-{size}rows" if curve else spec.name  # TRAIN_SUBSET keeps the task's folder
            data_dir = output_dir / "data" / folder
            manifest = prepare_task(spec, glue_dir, model, model.dictionary, data_dir, args.workers or os.cpu_count() or 1,
                                    train_subset=size)
            train_rows = manifest["splits"]["train"]["rows_written"]
            for mode in modes:
                recipe = default_recipe(mode, spec.name, train_rows, model_params)
                if args.epochs:
                    recipe = dataclasses.replace(recipe, epochs=args.epochs, rule=f"{recipe.rule}; EPOCHS={args.epochs}")
                if lrs:
                    recipe = dataclasses.replace(recipe, lrs=tuple(lrs),
                                                 rule=f"{recipe.rule}; LRS={' '.join(map(str, lrs))}")
                for lr in recipe.lrs:
                    for seed in seeds:
                        run_name = f"{folder}/{mode}/lr{lr:g}-seed{seed}"
                        runs.append(plan_run(spec, model, data_dir, manifest, output_dir / "runs" / run_name, args,
                                             mode, recipe, lr, seed, base.flags(mode) + passthrough,
                                             bookkeeping_args(args, output_dir / "tensorboard" / run_name), ledger,
                                             size, curve))
    job = JobProgress(runs, args.progress_interval, dispatch.concurrency(runs))
    print("\n".join(job.plan_lines() + [base.line]), flush=True)
    rows = dispatch.train(runs, args, job, stage)
    if args.node_rank != 0:
        return
    all_rows = write_results(output_dir, rows)
    plot_curves(all_rows, TASKS, output_dir / "curves.png")
    plot_loss_curves(all_rows, TASKS, output_dir / "loss_curves.png")
    plot_size_curves(all_rows, TASKS, output_dir / "size_curves.png")
    collect_predictions(output_dir, all_rows)
    write_bias_change_of_best_runs(output_dir, all_rows, model.checkpoint)
    exported = export_best_runs(output_dir, all_rows, model.path) if args.export == "hf" else []
    print(f"\n{summary_markdown(all_rows, TASKS).strip()}\n", flush=True)
    written = [output_dir / name for name in ("results.json", "results.md", "results.tex", "curves.png",
                                               "loss_curves.png", "size_curves.png", "bias_change/bias_change.png",
                                               "predictions")]
    print("results: " + ", ".join(str(path) for path in written + exported if path.exists()))
