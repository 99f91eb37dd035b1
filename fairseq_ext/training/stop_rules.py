"""When a run ends, the same after a restart: --patience's state travels in the checkpoints.

fairseq keeps early stopping's state (the best validation score and how many validations
have not beaten it) as attributes of ``fairseq_cli.train.should_stop_early``, in memory
only, so a restarted run counts from zero and trains longer than an uninterrupted one.
Here it is saved in every checkpoint's ``extra_state`` and restored when a checkpoint is
resumed, under the rule fairseq applies to its own ``extra_state["best"]``: not with
--reset-optimizer or --reset-meters.  A run whose patience had already run out when it
saved (stopped after its last validation, then restarted) trains nothing more.

Each training in a process starts from no state (``forget``): hydra's ``-m`` runs its jobs
one after another in one process, where fairseq's function attributes would carry one
job's best score into the next.
"""
import logging
from dataclasses import asdict, dataclass
from typing import Optional

import fairseq_cli.train
from fairseq import checkpoint_utils

logger = logging.getLogger(__name__)

EXTRA_STATE_KEY = "patience"


@dataclass(frozen=True)
class PatienceState:
    """Early stopping's state: the best validation score so far, and validations since it improved."""

    best: Optional[float] = None
    validations_without_improvement: int = 0

    def ran_out(self, patience: int) -> bool:
        return patience > 0 and self.validations_without_improvement >= patience


def current() -> PatienceState:
    stop_early = fairseq_cli.train.should_stop_early
    best = getattr(stop_early, "best", None)
    return PatienceState(None if best is None else float(best), int(getattr(stop_early, "num_runs", 0)))


def _set(state: PatienceState) -> None:
    stop_early = fairseq_cli.train.should_stop_early
    stop_early.best = state.best
    stop_early.num_runs = state.validations_without_improvement


def forget() -> None:
    """No early-stopping state and no best checkpoint score: a training starts from scratch."""
    _set(PatienceState())
    if hasattr(checkpoint_utils.save_checkpoint, "best"):
        del checkpoint_utils.save_checkpoint.best


def save_into(extra_state: dict) -> None:
    """Add the current state to a checkpoint's ``extra_state``."""
    extra_state[EXTRA_STATE_KEY] = asdict(current())


def restore_from(extra_state: Optional[dict], reset: bool) -> None:
    """Take the state a resumed checkpoint saved (none: a checkpoint of fairseq-train or from before
    this was kept, whose run counts from zero, as fairseq-train's would)."""
    saved = (extra_state or {}).get(EXTRA_STATE_KEY)
    if reset or saved is None:
        _set(PatienceState())
        return
    _set(PatienceState(saved.get("best"), int(saved.get("validations_without_improvement", 0))))


def ended_early(cfg) -> bool:
    """Whether --patience has stopped the run: after a validation, or in the checkpoint it resumed."""
    return current().ran_out(cfg.checkpoint.patience)

