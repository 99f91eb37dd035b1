"""train.py's live progress, in the run record: where the run is, how fast, what is saved.

fairseq logs a line every --log-interval updates into its log; a driver that runs
train.py (the GLUE runner) needs the same as data, often: ``ProgressPublisher``
refreshes the record's ``progress`` entry at most every ``interval_s`` seconds,
after each update (``patches.fairseq_train_with(after_update=...)``) and after each
checkpoint save.
"""
import math
import time
from typing import Optional

from fairseq.logging import metrics

from ..core.run_record import RunRecord

DEFAULT_INTERVAL_S = 2.0


def update_freq(cfg, epoch: int) -> int:
    """--update-freq of an epoch: fairseq's list gives one per epoch, the last for the rest."""
    freqs = cfg.optimization.update_freq
    return freqs[min(epoch, len(freqs)) - 1]


def planned_updates(cfg, done_before_epoch: int, epoch: int, epoch_total: int) -> Optional[int]:
    """The updates the run will make by --max-epoch and --max-update (later epochs as long as this one)."""
    limits = []
    if cfg.optimization.max_epoch:
        limits.append(done_before_epoch + epoch_total * (cfg.optimization.max_epoch - epoch + 1))
    if cfg.optimization.max_update:
        limits.append(cfg.optimization.max_update)
    return min(limits) if limits else None


class ProgressPublisher:
    """Keeps ``record``'s progress entry current while fairseq's loop trains."""

    def __init__(self, record: RunRecord, interval_s: float = DEFAULT_INTERVAL_S):
        self.record, self.interval_s = record, interval_s
        self._last_publish = 0.0
        self._rate_mark: Optional[tuple] = None  # (time, updates) the speed is measured from
        self.rate: Optional[float] = None
        # What an earlier launch saved last counts until this one saves.
        self.last_saved_updates: Optional[int] = (record.data.get("progress") or {}).get("last_saved_updates")
        self._latest: dict = {}

    def after_update(self, cfg, trainer, epoch_itr, end_of_epoch: bool, should_stop: bool) -> None:
        now = time.monotonic()
        updates = trainer.get_num_updates()
        if self._rate_mark is None:
            self._rate_mark = (now, updates)
        elif now - self._rate_mark[0] >= self.interval_s:
            # Speed over the last interval, smoothed: validation pauses show as a dip, not a cliff.
            recent = (updates - self._rate_mark[1]) / (now - self._rate_mark[0])
            self.rate = recent if self.rate is None else 0.5 * self.rate + 0.5 * recent
            self._rate_mark = (now, updates)
        freq = update_freq(cfg, epoch_itr.epoch)
        epoch_total = math.ceil(len(epoch_itr) / freq)  # fairseq groups the epoch's batches by --update-freq
        epoch_updates = epoch_total if end_of_epoch else math.ceil(epoch_itr.iterations_in_epoch / freq)
        loss = metrics.get_smoothed_values("train").get("loss")
        self._latest = {
            "updates": updates,
            "total_updates": updates if should_stop else planned_updates(cfg, updates - epoch_updates,
                                                                         epoch_itr.epoch, epoch_total),
            "epoch": epoch_itr.epoch, "max_epoch": cfg.optimization.max_epoch or None,
            "epoch_updates": epoch_updates, "epoch_total": epoch_total,
            "loss": None if loss is None else round(float(loss), 4),
            "updates_per_s": None if self.rate is None else round(self.rate, 3),
        }
        if now - self._last_publish >= self.interval_s or end_of_epoch or should_stop:
            self._publish(now)

    def saved(self, updates: int) -> None:
        """A checkpoint holding ``updates`` updates was written."""
        self.last_saved_updates = updates
        self._publish(time.monotonic())

    def _publish(self, now: float) -> None:
        self.record.set_progress({**self._latest, "last_saved_updates": self.last_saved_updates})
        self._last_publish = now
