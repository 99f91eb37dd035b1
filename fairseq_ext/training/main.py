"""train.py's flow: fairseq-train's own training loop, with a Trainer that freezes for BitFit.

1. ``patches.install()``: the fairseq fixes every run needs (docs/fairseq_patches.md).
2. ``options.parse(argv)``: fairseq-train's parser plus ``--bitfit*``, checked, fitted to
   this machine (torchrun, precision), and the resume rule: a restarted fine-tuning
   run continues from its ``checkpoint_last.pt``.  In hydra form (``--config-name``, ``-m``)
   ``hydra_form`` composes the config and takes the same steps for each job.
3. ``distributed_utils.call_main``: fairseq's launcher (one process, a torchrun rank, or
   spawned GPU workers) runs ``train_worker`` in each training process.
4. ``train_worker``: ``fairseq_cli.train.main`` with ``BitFitTrainer`` in place of
   fairseq's Trainer (it freezes the model after it is built and before the optimizer
   exists); the first worker keeps ``SAVE_DIR/run_record.json``.

``python -m fairseq_ext.training.main`` is train.py (``options.TRAIN_COMMAND``: how the
experiment drivers launch it, also under torchrun's ``-m``).
"""
import argparse
import contextlib
import functools
import logging
import resource
import sys
from pathlib import Path
from typing import Dict, Optional

import torch
import fairseq_cli.train  # its import sets up fairseq-train's logging (INFO on stdout), as in fairseq-train
from fairseq.distributed import utils as distributed_utils

from ..core import interrupts
from ..core.errors import UserError, exit_on_user_error, one_line
from ..core.run_record import RECORD_NAME, RunRecord, read_run_record
from ..plugin import patches, task_families
from . import hydra_form, options, stop_rules
from .options import TRAIN_PROG
from .run_progress import ProgressPublisher
from .timed_saves import TimedCheckpoints
from .trainer import BitFitTrainer

logger = logging.getLogger(__name__)


@exit_on_user_error(prog=TRAIN_PROG)
def cli_main(argv=None, trainer_class=BitFitTrainer) -> None:
    """train.py: every fairseq-train option, plus ``--bitfit``; or the hydra form (``--config-name``,
    ``-m``), as fairseq-hydra-train takes it.  ``trainer_class`` lets tools such as the benchmark
    time the real loop with a BitFitTrainer subclass."""
    argv = sys.argv[1:] if argv is None else argv
    patches.install()
    run = functools.partial(train, trainer_class=trainer_class)
    if hydra_form.requested(argv):
        hydra_form.main(argv, run)
        return
    run(*options.parse(argv, prog=TRAIN_PROG))


def train(cfg, resumed_from: Optional[str] = None, trainer_class=BitFitTrainer) -> None:
    """Train with a parsed and checked config, in every process fairseq's launcher starts."""
    # A partial of a module-level function: fairseq's spawned GPU workers unpickle it by name,
    # so they too train with trainer_class, not with fairseq's Trainer.
    worker = functools.partial(train_worker, trainer_class=trainer_class, resumed_from=resumed_from)
    task_families.check_arch_before_build(_registered_name(cfg.task, "task"), _registered_name(cfg.model, "arch"))
    try:
        with interrupts.handled():
            distributed_utils.call_main(cfg, worker)
    except interrupts.Interrupted as stop:
        if distributed_utils.is_master(cfg.distributed_training):
            print(f"{TRAIN_PROG}: {stop.signal_name}: stopped. {_how_to_go_on(cfg)}", file=sys.stderr, flush=True)
        sys.exit(stop.exit_status)


def _registered_name(group, legacy_option: str) -> Optional[str]:
    """``--task`` or ``--arch`` from a config group: a dataclass's ``_name``, a legacy Namespace's option."""
    if isinstance(group, argparse.Namespace):
        return getattr(group, legacy_option, None)
    return group.get("_name") if group is not None else None


def train_worker(cfg, trainer_class=BitFitTrainer, resumed_from: Optional[str] = None, **kwargs) -> None:
    """One training process: fairseq_cli.train.main with ``trainer_class``, recorded by the first worker."""
    patches.install()  # a spawned worker is a fresh interpreter
    stop_rules.forget()  # the resumed checkpoint, if any, brings its own
    record = _open_record(cfg, resumed_from)
    trainer = functools.partial(trainer_class, record=record) if record is not None else trainer_class
    progress = ProgressPublisher(record) if record is not None else None
    minutes = cfg.checkpoint.get("save_interval_minutes", 0.0)
    timed_saves = TimedCheckpoints(minutes) if minutes else None

    def after_update(cfg, trainer, epoch_itr, end_of_epoch, should_stop):
        state = (cfg, trainer, epoch_itr, end_of_epoch, should_stop)
        if timed_saves is not None:
            timed_saves.after_update(*state)
        if progress is not None:
            progress.after_update(*state)
        if record is None:
            return
        if should_stop and stop_rules.ended_early(cfg):
            record.set_early_stop({"epoch": epoch_itr.epoch, "updates": trainer.get_num_updates(),
                                   "metric": cfg.checkpoint.best_checkpoint_metric,
                                   "best": stop_rules.current().best, "patience": cfg.checkpoint.patience})
        elif record.data.get("early_stop"):
            record.set_early_stop(None)  # this launch trains past where an earlier one stopped early

    def on_saved(trainer, path):
        if timed_saves is not None:
            timed_saves.saved()
        if progress is not None and path is not None:
            progress.saved(trainer.get_num_updates())

    cuda_peak = patches.cuda_peak_memory() if torch.cuda.is_available() and not cfg.common.cpu else None
    with cuda_peak or contextlib.nullcontext(), patches.fairseq_train_with(
            trainer, on_stats=record.add_stats if record is not None else None, after_update=after_update,
            on_saved=on_saved, ended=stop_rules.ended_early):
        try:
            fairseq_cli.train.main(cfg, **kwargs)
        except BaseException as error:
            if record is not None:
                record.end(*_how_it_ended(error), checkpoints=_checkpoints(cfg),
                           peak_memory_bytes=_peak_memory(cuda_peak))
            raise
        finally:
            patches.stop_batch_prefetching()  # before the interpreter ends them mid-batch
    if record is not None:
        record.end("finished", checkpoints=_checkpoints(cfg), peak_memory_bytes=_peak_memory(cuda_peak))


def _peak_memory(cuda_peak) -> int:
    """This process's peak memory so far: CUDA's most allocated, or on CPU the resident set's peak."""
    if cuda_peak is not None:
        return cuda_peak.current()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _how_to_go_on(cfg) -> str:
    """The sentence that tells an interrupted run's user what was kept and how to continue."""
    last = Path(cfg.checkpoint.save_dir) / f"checkpoint_last{cfg.checkpoint.checkpoint_suffix}.pt"
    if cfg.checkpoint.no_save or not last.exists():
        return "No checkpoint was saved; the same command starts the run again."
    saved = None
    record_path = Path(cfg.checkpoint.save_dir) / RECORD_NAME
    if record_path.exists():
        saved = (read_run_record(record_path).get("progress") or {}).get("last_saved_updates")
    at = f" (update {saved:,})" if saved is not None else ""
    return f"{last}{at} is whole: run the same command to resume from it."


def _how_it_ended(error: BaseException):
    """(status, one-line error or None) of a launch that raised ``error``."""
    if isinstance(error, KeyboardInterrupt):
        return "interrupted", None
    if isinstance(error, SystemExit):
        return ("finished", None) if error.code in (0, None) else ("failed", f"exit status {error.code}")
    if isinstance(error, UserError):
        return "failed", str(error)
    return "failed", f"{type(error).__name__}: {one_line(error)}"


def _open_record(cfg, resumed_from: Optional[str]) -> Optional[RunRecord]:
    """The run record, kept by the first worker (with --no-save too: it is not a checkpoint)."""
    if not distributed_utils.is_master(cfg.distributed_training):
        return None
    save_dir = Path(cfg.checkpoint.save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    return RunRecord.open(save_dir, resumed_from)


def _checkpoints(cfg) -> Dict[str, str]:
    """{file name: path} of the checkpoints and deltas in the save dir."""
    save_dir = Path(cfg.checkpoint.save_dir).resolve()
    return {path.name: str(path) for path in sorted(save_dir.glob("checkpoint*")) if path.is_file()}


if __name__ == "__main__":
    # Run the imported module, not this __main__ copy: fairseq's spawned workers find train_worker by name.
    from fairseq_ext.training.main import cli_main as train_cli_main

    train_cli_main()
