"""What the timing scripts on a real GLUE task share (compile_cost, parallel_throughput,
profile_update): the task prepared for the embedded model in a temporary folder, and train.py in
this process with every update timed.

Times are ``time.perf_counter()`` (CLOCK_MONOTONIC on Linux: one clock for all of a machine's
processes, so updates of runs trained side by side can be put on one time line)."""
import contextlib
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence

from ..core.errors import UserError
from ..core.glue_tasks import GlueTaskSpec
from ..plugin.checkpoints import checkpoint_parameter_count
from ..plugin.data.glue_prepare import prepare_task
from ..plugin.models.model_dir import ModelDir, load_model_dir
from ..plugin.models.pretrained import default_model_dir
from .main import cli_main
from .options import mode_flags
from .trainer import BitFitTrainer


@dataclass(frozen=True)
class TimingTask:
    """A real GLUE task prepared for the embedded model, in a folder that lasts as long as the ``with``."""

    spec: GlueTaskSpec
    model: ModelDir
    workdir: Path
    train_rows: int
    model_params: int

    @property
    def data_dir(self) -> Path:
        return self.workdir / "data"


@contextlib.contextmanager
def prepared_timing_task(glue_dir: Path, spec: GlueTaskSpec, prefix: str) -> Iterator[TimingTask]:
    model = load_model_dir(default_model_dir())
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        workdir = Path(tmp)
        manifest = prepare_task(spec, glue_dir, model, model.dictionary, workdir / "data", 1)
        yield TimingTask(spec, model, workdir, manifest["splits"]["train"]["rows_written"],
                         checkpoint_parameter_count(model.checkpoint))


def check_train_py_modes(modes: Sequence[str]) -> None:
    """Every mode is one train.py trains (``--modes``' one-line error otherwise)."""
    for mode in modes:
        try:
            mode_flags(mode)
        except UserError as error:
            raise UserError(f"--modes: {error}") from None


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
