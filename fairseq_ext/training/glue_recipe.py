"""The GLUE fine-tuning recipe: train.py's arguments for one run, and the defaults that fit the model.

fairseq's RoBERTa GLUE recipe (examples/roberta/README.glue.md: Adam betas (0.9, 0.98),
eps 1e-6, polynomial decay with 6% warmup, the best checkpoint by the task's metric)
is the frame for every run.  What varies is chosen by one rule, ``default_recipe``,
written into each run's result so a reader knows how every number was chosen:

* models of ``LARGE_MODEL_PARAMS`` parameters and more (RoBERTa/BERT base and large):
  full fine-tuning takes fairseq's per-task learning rate and batch size for 10
  epochs; BitFit and head-only take lr 1e-3 (the official BitFit code's default) at
  batch 32 for 20 epochs on tasks under 10k rows, 10 on larger ones;
* smaller models (the embedded MiniLM, 22.7M): see ``SMALL_MODEL``.

``python -m fairseq_ext.experiments.glue_run`` (``run_scripts/glue_bitfit.sh``) and the
speed comparison build their train.py commands here.
"""
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..core.errors import UserError
from .options import FULL, mode_flags

# fairseq's RoBERTa GLUE recipe (examples/roberta/README.glue.md): lr and batch size per task.
FULL_FT_LR = {"MNLI": 1e-5, "QNLI": 1e-5, "QQP": 1e-5, "RTE": 2e-5, "SST-2": 1e-5,
              "MRPC": 1e-5, "CoLA": 1e-5, "STS-B": 2e-5, "WNLI": 1e-5}
FULL_FT_BATCH = {"MNLI": 32, "QNLI": 32, "QQP": 32, "RTE": 16, "SST-2": 32,
                 "MRPC": 16, "CoLA": 16, "STS-B": 16, "WNLI": 16}
BITFIT_LR = 1e-3  # the official BitFit code's default
BITFIT_BATCH = 32
SMALL_TASK_ROWS = 10_000  # BitFit trains these longer: its updates are small
LARGE_MODEL_PARAMS = 100_000_000

# Length-grouped batches (glue task --group-by-length): chunks of this many batches.
LENGTH_GROUP_BATCHES = 50


@dataclass(frozen=True)
class Recipe:
    """What one run trains with, and the rule that chose it."""

    lrs: Tuple[float, ...]  # each is a run; the best on dev is reported
    batch: int
    epochs: int
    weight_decay: float
    patience: Optional[int]  # fairseq --patience: stop after this many validations without a better dev score
    rule: str

    def describe(self) -> dict:
        return asdict(self)


def default_recipe(mode: str, task: str, train_rows: int, model_params: int) -> Recipe:
    """The defaults of a run mode (``full``, ``head`` or a BitFit mode) for a task and a model size."""
    large = model_params >= LARGE_MODEL_PARAMS
    size = f"{model_params / 1e6:.1f}M parameters ({'>=' if large else '<'} {LARGE_MODEL_PARAMS // 10**6}M)"
    if large:
        if mode == FULL:
            return Recipe((FULL_FT_LR[task],), FULL_FT_BATCH[task], 10, 0.1, None,
                          f"{size}: fairseq's RoBERTa GLUE recipe for full fine-tuning ({task}: lr "
                          f"{FULL_FT_LR[task]:g}, batch {FULL_FT_BATCH[task]}, 10 epochs)")
        epochs = 20 if train_rows < SMALL_TASK_ROWS else 10
        return Recipe((BITFIT_LR,), BITFIT_BATCH, epochs, 0.0, None,
                      f"{size}: BitFit lr {BITFIT_LR:g} (official BitFit code), batch {BITFIT_BATCH}, {epochs} "
                      f"epochs ({'<' if train_rows < SMALL_TASK_ROWS else '>='} {SMALL_TASK_ROWS:,} rows)")
    return SMALL_MODEL[FULL if mode == FULL else "bias"](size)


def _small_full(size: str) -> Recipe:
    return Recipe((5e-5,), 32, 4, 0.1, None,
                  f"{size}: the small-model recipe for full fine-tuning: lr 5e-5, batch 32, 4 epochs")


def _small_bias(size: str) -> Recipe:
    return Recipe((1e-3,), 32, 10, 0.0, 3,
                  f"{size}: the small-model recipe for bias and head training: lr 1e-3, batch 32, up to 10 "
                  "epochs, stopping after 3 epochs without a better dev score")


SMALL_MODEL = {FULL: _small_full, "bias": _small_bias}


# -- train.py arguments -------------------------------------------------------------


def passthrough_value(passthrough: Sequence[str], *flags: str) -> Optional[str]:
    """The value train.py will see for one of ``flags`` among extra arguments (the last given)."""
    found = None
    for i, arg in enumerate(passthrough):
        for flag in flags:
            if arg == flag and i + 1 < len(passthrough):
                found = passthrough[i + 1]
            elif arg.startswith(flag + "="):
                found = arg.split("=", 1)[1]
    return found


def passthrough_ints(passthrough: Sequence[str], *flags: str) -> Optional[List[int]]:
    """A positive integer (or fairseq's comma list of them, as --update-freq takes) given after the script."""
    value = passthrough_value(passthrough, *flags)
    if value is None:
        return None
    try:
        numbers = [int(v) for v in value.split(",")]
    except ValueError:
        numbers = []
    if not numbers or min(numbers) < 1:
        raise UserError(f"{flags[0]} {value!r} (after the script): expected a positive integer")
    return numbers


def check_passthrough(passthrough: Sequence[str]) -> None:
    for flags in (("--max-update",), ("--max-epoch",), ("--batch-size", "--max-sentences"), ("--update-freq",)):
        passthrough_ints(passthrough, *flags)


def schedule_updates(passthrough: Sequence[str], batch: int, epochs: int, train_rows: int, world_size: int) -> int:
    """The updates the polynomial schedule decays over: --max-update if given, else what
    --max-epoch epochs take at the batch size, update frequency and world size train.py will use."""
    max_update = passthrough_ints(passthrough, "--max-update")
    if max_update:
        return max_update[0]
    batch = (passthrough_ints(passthrough, "--batch-size", "--max-sentences") or [batch])[0]
    epochs = (passthrough_ints(passthrough, "--max-epoch") or [epochs])[0]
    update_freq = passthrough_ints(passthrough, "--update-freq") or [1]
    batches_per_epoch = max(1, math.ceil(train_rows / (batch * world_size)))
    return sum(math.ceil(batches_per_epoch / update_freq[min(epoch, len(update_freq) - 1)])
               for epoch in range(epochs))


def train_command(spec, model, data_dir: Path, save_dir: Path, mode_label: str, recipe: Recipe, lr: float,
                  seed: int, train_rows: int, world_size: int, passthrough: Sequence[str], max_seq_len: int,
                  bookkeeping: Sequence[str] = ()) -> List[str]:
    """The train.py arguments of one run: the RoBERTa GLUE recipe with ``recipe``'s values, then
    ``bookkeeping`` (flags that do not change what is trained), then the mode's and the user's."""
    total_updates = schedule_updates(passthrough, recipe.batch, recipe.epochs, train_rows, world_size)
    args = [
        str(data_dir), "--task", "glue", "--glue-task", spec.name, "--criterion", "glue_prediction",
        *model.arch_args(), "--restore-file", model.checkpoint,
        "--reset-optimizer", "--reset-dataloader", "--reset-meters",
        "--max-seq-len", str(max_seq_len), "--batch-size", str(recipe.batch), "--max-epoch", str(recipe.epochs),
        "--group-by-length", str(LENGTH_GROUP_BATCHES * recipe.batch),
        "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--adam-eps", "1e-06",
        "--weight-decay", f"{recipe.weight_decay:g}", "--clip-norm", "0.0",
        "--lr", str(lr), "--lr-scheduler", "polynomial_decay", "--total-num-update", str(total_updates),
        "--warmup-updates", str(int(round(0.06 * total_updates))),
        "--seed", str(seed), "--save-dir", str(save_dir), "--no-epoch-checkpoints",
        "--best-checkpoint-metric", spec.primary_metric, "--maximize-best-checkpoint-metric",
        "--valid-subset", ",".join(spec.valid_subsets),
        "--log-format", "json", "--log-interval", "50", "--no-progress-bar", "--num-workers", "0",
    ]
    if recipe.patience:
        args += ["--patience", str(recipe.patience)]
    if mode_label == FULL and world_size > 1:
        args.append("--find-unused-parameters")  # RoBERTa's LM head gets no gradient in classification
    if model.pair_separator:
        args += ["--separator-token", "2"]  # RoBERTa pairs: <s> a </s> </s> b </s>
    return args + list(bookkeeping) + mode_flags(mode_label) + list(passthrough)


# train.py flags that change how a run is logged and saved, not what it trains: left out when
# a run folder's settings are compared (value-taking flags, then switches).
BOOKKEEPING_FLAGS = ("--save-interval-minutes", "--tensorboard-logdir", "--log-format", "--log-interval")
BOOKKEEPING_SWITCHES = ("--no-progress-bar",)


def without_bookkeeping(train_args: Sequence[str]) -> List[str]:
    kept, skip = [], False
    for arg in train_args:
        if skip:
            skip = False
        elif arg in BOOKKEEPING_SWITCHES:
            continue
        elif arg in BOOKKEEPING_FLAGS:
            skip = True
        elif not arg.startswith(tuple(f"{flag}=" for flag in BOOKKEEPING_FLAGS)):
            kept.append(arg)
    return kept

