"""train.py's scope in fairseq's training loop (see PATCHES: bitfit-trainer, recorded-progress-bars,
update-hooks, whole-checkpoints, patience-state, stop-batch-prefetching): fairseq's loop builds train.py's
Trainer, its progress bars also feed the run record, every update ends in train.py's hooks, checkpoints are
written whole, and its batch-prefetching threads end before the interpreter does."""
import contextlib
import queue
import threading
import time
from typing import Callable, Dict, Optional

from fairseq import checkpoint_utils
from fairseq.data import iterators
from fairseq.logging import progress_bar

from ...core import interrupts
from . import _mark, logger


StatsCallback = Callable[[str, Optional[int], Dict[str, object]], None]  # (tag, epoch, stats)


class _RecordedProgressBar(progress_bar.BaseProgressBar):
    """A fairseq progress bar that also hands each printed stats dict to a callback.

    The epoch is the one the bar was made for: fairseq's tensorboard, wandb, aim and
    azureml wrappers do not carry it themselves.
    """

    def __init__(self, wrapped_bar, epoch: Optional[int], on_stats: StatsCallback):
        self.wrapped_bar = wrapped_bar
        self.epoch = epoch
        self.on_stats = on_stats

    def __iter__(self):
        return iter(self.wrapped_bar)

    def __getattr__(self, name):
        return getattr(self.wrapped_bar, name)

    def log(self, stats, tag=None, step=None):
        self.wrapped_bar.log(stats, tag=tag, step=step)

    def print(self, stats, tag=None, step=None):
        self.wrapped_bar.print(stats, tag=tag, step=step)
        self.on_stats(tag, self.epoch, stats)

    def update_config(self, config):
        self.wrapped_bar.update_config(config)


# after_update(cfg, trainer, epoch_itr, end_of_epoch, should_stop), once per update.
UpdateHook = Callable[[object, object, object, bool, bool], None]
# on_saved(trainer, the checkpoint this rank wrote or None), after each checkpoint save.
SavedHook = Callable[[object, Optional[str]], None]


class _WholeCheckpointSaves:
    """fairseq's checkpoint_utils.save_checkpoint with stop signals held back while it writes, then ``on_saved``.

    fairseq stores the best score as ``save_checkpoint.best`` (read and written through
    the module's global name), so attributes go to the wrapped function.
    """

    def __init__(self, save_checkpoint, on_saved: Optional[SavedHook]):
        object.__setattr__(self, "_save", save_checkpoint)
        object.__setattr__(self, "_on_saved", on_saved)

    def __call__(self, checkpoint_cfg, trainer, epoch_itr, val_loss):
        with interrupts.deferred():
            saved = self._save(checkpoint_cfg, trainer, epoch_itr, val_loss)
        if self._on_saved is not None:
            self._on_saved(trainer, saved)
        return saved

    def __getattr__(self, name):
        return getattr(self._save, name)

    def __setattr__(self, name, value):
        setattr(self._save, name, value)

    def __delattr__(self, name):
        delattr(self._save, name)


@contextlib.contextmanager
def fairseq_train_with(trainer_factory, on_stats: Optional[StatsCallback] = None,
                       after_update: Optional[UpdateHook] = None, on_saved: Optional[SavedHook] = None,
                       ended: Optional[Callable[[object], bool]] = None):
    """While the block runs, fairseq_cli.train.main builds ``trainer_factory(cfg, task, model,
    criterion, quantizer)`` instead of fairseq's Trainer; (with ``on_stats``) its progress
    bars hand every stats dict they print to ``on_stats(tag, epoch, stats)``; ``after_update``
    runs after each update's validate-and-save; checkpoints are written whole whatever signal
    arrives, and ``on_saved(trainer, path)`` runs after each save on every rank (path: what this
    rank wrote, or None); once ``ended(cfg)`` holds (a resumed run that had already stopped early), no
    further epoch trains."""
    # Imported here, not with the plugin: its import sets up fairseq-train's logging (INFO on stdout).
    import fairseq_cli.train

    original_trainer, original_bar = fairseq_cli.train.Trainer, progress_bar.progress_bar
    original_validate_and_save = fairseq_cli.train.validate_and_save
    original_train_epoch = fairseq_cli.train.train
    original_save = checkpoint_utils.save_checkpoint

    def recorded_progress_bar(iterator, *args, epoch: Optional[int] = None, **kwargs):
        return _RecordedProgressBar(original_bar(iterator, *args, epoch=epoch, **kwargs), epoch, on_stats)

    def validate_and_save_then_hook(cfg, trainer, task, epoch_itr, valid_subsets, end_of_epoch):
        valid_losses, should_stop = original_validate_and_save(cfg, trainer, task, epoch_itr, valid_subsets,
                                                               end_of_epoch)
        after_update(cfg, trainer, epoch_itr, end_of_epoch, should_stop)
        return valid_losses, should_stop

    def train_epoch_unless_ended(cfg, trainer, task, epoch_itr):
        if ended(cfg):
            logger.info(f"the resumed checkpoint was saved after --patience {cfg.checkpoint.patience} had run "
                        "out: nothing left to train")
            return [None], True
        return original_train_epoch(cfg, trainer, task, epoch_itr)

    fairseq_cli.train.Trainer = trainer_factory
    _mark("bitfit-trainer")
    if ended is not None:
        fairseq_cli.train.train = train_epoch_unless_ended
        _mark("patience-state")
    checkpoint_utils.save_checkpoint = _WholeCheckpointSaves(original_save, on_saved)
    _mark("whole-checkpoints")
    if on_stats is not None:
        progress_bar.progress_bar = recorded_progress_bar
        _mark("recorded-progress-bars")
    if after_update is not None:
        fairseq_cli.train.validate_and_save = validate_and_save_then_hook
        _mark("update-hooks")
    try:
        yield
    finally:
        fairseq_cli.train.Trainer, progress_bar.progress_bar = original_trainer, original_bar
        fairseq_cli.train.validate_and_save = original_validate_and_save
        fairseq_cli.train.train = original_train_epoch
        checkpoint_utils.save_checkpoint = original_save
        for name in ("bitfit-trainer", "recorded-progress-bars", "update-hooks", "whole-checkpoints", "patience-state"):
            _mark(name, False)


def stop_batch_prefetching(timeout_s: float = 10.0) -> None:
    """End fairseq's batch-prefetching threads (see PATCHES: stop-batch-prefetching).

    Each stops after the batch it is making: its length limit is set to what it has
    made, and its queue is emptied until the thread has put its end marker and left.
    Call it when nothing reads the batches any more.
    """
    for thread in threading.enumerate():
        if not isinstance(thread, iterators.BackgroundConsumer):
            continue
        thread._max_len = 0  # checked after each batch it puts
        deadline = time.monotonic() + timeout_s
        while thread.is_alive() and time.monotonic() < deadline:
            with contextlib.suppress(queue.Empty):
                while True:
                    thread._queue.get_nowait()
            thread.join(0.05)
        if thread.is_alive():
            logger.warning(f"fairseq's batch-prefetching thread {thread.name} did not stop within {timeout_s:g} s")
