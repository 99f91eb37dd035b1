"""--save-interval-minutes: a stop loses minutes, not an epoch.

fairseq saves at epoch ends and every --save-interval-updates updates (validating
each time).  ``TimedCheckpoints`` also writes checkpoint_last.pt (and, in BitFit runs,
its delta) whenever M minutes have passed since the last save, mid-epoch included,
without validating: fairseq's own ``checkpoint_utils.save_checkpoint`` with no
validation score writes just that file, with the epoch iterator's position, so a
restarted run continues inside the epoch exactly where the save was made.  Only the
newest such checkpoint exists: each one replaces checkpoint_last.pt.
"""
import logging
import time

import torch
from fairseq import checkpoint_utils
from fairseq.distributed import utils as distributed_utils


logger = logging.getLogger(__name__)


class TimedCheckpoints:
    """Saves checkpoint_last.pt when ``minutes`` have passed since the last save of any kind."""

    def __init__(self, minutes: float):
        self.interval_s = minutes * 60.0
        self.last_save = time.monotonic()

    def saved(self) -> None:
        self.last_save = time.monotonic()

    def after_update(self, cfg, trainer, epoch_itr, end_of_epoch: bool, should_stop: bool) -> None:
        if should_stop:
            return  # fairseq has just saved the run's last state
        due = time.monotonic() - self.last_save >= self.interval_s
        if trainer.data_parallel_world_size > 1:
            # Every rank must take the same branch: saving can be collective (sharded optimizer state).
            flag = torch.tensor([1.0 if due else 0.0], device=trainer.device)
            due = bool(distributed_utils.all_reduce(flag, group=trainer.data_parallel_process_group, op="max").item())
        if due:
            logger.info(f"--save-interval-minutes: saving checkpoint_last at update {trainer.get_num_updates()}")
            checkpoint_utils.save_checkpoint(cfg.checkpoint, trainer, epoch_itr, None)
            self.saved()
