"""train.py in this process with every update timed: what the side-by-side timing scripts measure.

Times are ``time.perf_counter()`` (CLOCK_MONOTONIC on Linux: one clock for all of a machine's
processes, so updates of runs trained side by side can be put on one time line)."""
import time
from dataclasses import dataclass
from typing import Callable, List, Optional, Sequence

from .main import cli_main
from .trainer import BitFitTrainer


@dataclass(frozen=True)
class UpdateTime:
    start: float
    end: float

    @property
    def seconds(self) -> float:
        return self.end - self.start


def train_timed(argv: Sequence[str], updates: int,
                before_first_update: Optional[Callable[[BitFitTrainer], None]] = None) -> List[UpdateTime]:
    """Train ``updates`` updates of train.py's ``argv`` with no saving and no validation; each update's
    start and end. ``before_first_update`` gets the trainer once, before the first update is timed."""
    times: List[UpdateTime] = []

    class TimedTrainer(BitFitTrainer):
        def train_step(self, samples, raise_oom=False):
            if before_first_update is not None and not times:
                before_first_update(self)
            start = time.perf_counter()
            output = super().train_step(samples, raise_oom)
            times.append(UpdateTime(start, time.perf_counter()))
            return output

    cli_main(list(argv) + ["--no-save", "--disable-validation", "--log-interval", "1000", "--max-update", str(updates)],
             trainer_class=TimedTrainer)
    return times
