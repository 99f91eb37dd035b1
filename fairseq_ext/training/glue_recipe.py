"""The GLUE fine-tuning recipe: train.py's arguments for one run, and the defaults that fit the model.

fairseq's RoBERTa GLUE recipe (examples/roberta/README.glue.md: Adam betas (0.9, 0.98),
eps 1e-6, polynomial decay with 6% warmup, the best checkpoint by the task's metric)
is the frame for every run.  What varies is chosen by one rule, ``default_recipe``,
written into each run's result so a reader knows how every number was chosen:

* models of ``LARGE_MODEL_PARAMS`` parameters and more (RoBERTa/BERT base and large):
  full fine-tuning takes fairseq's per-task learning rate and batch size for 10
  epochs; BitFit and head-only take lr 1e-3 (the official BitFit code's default) at
  batch 32 for 20 epochs on tasks under 10k rows, 10 on larger ones;
* smaller models (the embedded MiniLM, 22.7M): see ``SMALL_MODEL``;
* the comparison methods (LoRA, IA3, adapters) take the bias rule's frame with their own
  paper's learning rate (``TUNER_LR``), LoRA at its paper's batch and epochs on large models.

``python -m fairseq_ext.experiments.glue_run`` (``run_scripts/glue_bitfit.sh``) and the
speed comparison build their train.py commands here.
"""
import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

from ..core.errors import UserError
from .options import FULL, mode_flags, parse_known_options, parse_options

# fairseq's RoBERTa GLUE recipe (examples/roberta/README.glue.md): lr and batch size per task.
FULL_FT_LR = {"MNLI": 1e-5, "QNLI": 1e-5, "QQP": 1e-5, "RTE": 2e-5, "SST-2": 1e-5,
              "MRPC": 1e-5, "CoLA": 1e-5, "STS-B": 2e-5, "WNLI": 1e-5}
FULL_FT_BATCH = {"MNLI": 32, "QNLI": 32, "QQP": 32, "RTE": 16, "SST-2": 32,
                 "MRPC": 16, "CoLA": 16, "STS-B": 16, "WNLI": 16}
BITFIT_LR = 1e-3  # the official BitFit code's default
BITFIT_BATCH = 32
SMALL_TASK_ROWS = 10_000  # BitFit trains these longer: its updates are small
LARGE_MODEL_PARAMS = 100_000_000

# The comparison methods' learning rates, each from its paper:
# LoRA: Hu et al., ICLR 2022, Table 9 (RoBERTa-base: r 8 on q and v, alpha 8, batch 16, per-task lr and
# epochs; WNLI is not in it: the lr of its small-task neighbours); IA3: Liu et al., NeurIPS 2022, §3.3
# and Appendix (T-Few: lr 3e-3); bottleneck adapters: Houlsby et al., ICML 2019, §3.1 (size 64 of their
# {8, 64, 256}; lr 3e-4, the middle of their {3e-5, 3e-4, 3e-3}).
LORA_LR = {"MNLI": 5e-4, "SST-2": 5e-4, "MRPC": 4e-4, "CoLA": 4e-4, "QNLI": 4e-4, "QQP": 5e-4, "RTE": 5e-4,
           "STS-B": 4e-4, "WNLI": 4e-4}
LORA_EPOCHS = {"MNLI": 30, "SST-2": 60, "MRPC": 30, "CoLA": 80, "QNLI": 25, "QQP": 25, "RTE": 80, "STS-B": 40,
               "WNLI": 80}
LORA_BATCH = 16
TUNER_LR = {"ia3": 3e-3, "adapter": 3e-4}
TUNER_SOURCE = {"lora": "Hu et al. 2022, Table 9", "ia3": "Liu et al. 2022 (T-Few)",
                "adapter": "Houlsby et al. 2019"}

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
    if mode in TUNER_SOURCE:
        return _tuner_recipe(mode, task, train_rows, large, size)
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
    return Recipe((1e-4,), 32, 4, 0.1, None,
                  f"{size}: the small-model recipe for full fine-tuning: lr 1e-4, batch 32, 4 epochs "
                  "(full fine-tuning's winner in the defaults search, docs/defaults_search.md)")


def _small_bias(size: str) -> Recipe:
    return Recipe((3e-3,), 32, 20, 0.0, None,
                  f"{size}: the small-model recipe for bias and head training: lr 3e-3, batch 32, 20 epochs, "
                  "no early stopping (BitFit all's winner in the defaults search, docs/defaults_search.md)")


SMALL_MODEL = {FULL: _small_full, "bias": _small_bias}


def _tuner_recipe(method: str, task: str, train_rows: int, large: bool, size: str) -> Recipe:
    """A comparison method: its paper's lr in the bias rule's frame; LoRA on large models as in its paper."""
    lr = LORA_LR.get(task, 4e-4) if method == "lora" else TUNER_LR[method]
    source = f"lr {lr:g} ({TUNER_SOURCE[method]})"
    if large and method == "lora":
        epochs = LORA_EPOCHS.get(task, 30)
        return Recipe((lr,), LORA_BATCH, epochs, 0.0, None,
                      f"{size}: LoRA's RoBERTa-base setting, {source}, batch {LORA_BATCH}, {epochs} epochs")
    frame = default_recipe("bitfit-all", task, train_rows, LARGE_MODEL_PARAMS if large else 0)
    return Recipe((lr,), frame.batch, frame.epochs, frame.weight_decay, frame.patience,
                  f"{size}: {method} {source} in the bias rule's frame: batch {frame.batch}, "
                  f"{'up to ' if frame.patience else ''}{frame.epochs} epochs"
                  f"{f', patience {frame.patience}' if frame.patience else ''}")


# -- train.py arguments -------------------------------------------------------------


@dataclass(frozen=True)
class TrainCommand:
    """One run's train.py command line, what of it decides the result, and its schedule's length."""

    args: List[str]  # train.py's arguments
    settings_args: List[str]  # the same without the flags that only log and save (``bookkeeping``)
    total_updates: int  # the updates the learning-rate schedule decays over (the run's planned length)


# The options train.py's schedule depends on, each checked to be a positive count (0: unset, where allowed).
SCHEDULE_COUNTS = (("max_update", "--max-update", True), ("max_epoch", "--max-epoch", True),
                   ("batch_size", "--batch-size", False))


def check_schedule_counts(options) -> None:
    """--max-update, --max-epoch, --batch-size and --update-freq as counts a schedule can be made of."""
    for name, flag, zero_unsets in SCHEDULE_COUNTS:
        value = getattr(options, name)
        if value is None or value < (0 if zero_unsets else 1):
            raise UserError(f"{flag} {value!r}: expected a positive integer")
    if any(freq < 1 for freq in options.update_freq):
        raise UserError(f"--update-freq {','.join(map(str, options.update_freq))!r}: expected positive integers")


def check_user_arguments(passthrough: Sequence[str]) -> None:
    """train.py arguments a user adds to the recipe, read by fairseq's parser before anything is written:
    a value of the wrong type, or a count a schedule cannot be made of, is one line."""
    check_schedule_counts(parse_known_options(["DATA", "--batch-size", "1", "--max-epoch", "1", *passthrough]))


def schedule_updates(options, train_rows: int, world_size: int) -> int:
    """The updates the polynomial schedule decays over, from train.py's parsed ``options``: --max-update if
    set, else what --max-epoch epochs take at the batch size, update frequency and world size."""
    check_schedule_counts(options)
    if options.max_update:
        return options.max_update
    if not options.max_epoch:
        raise UserError("--max-epoch 0 and --max-update 0: the run would never end; set one of them")
    batches_per_epoch = max(1, math.ceil(train_rows / (options.batch_size * world_size)))
    freqs = options.update_freq
    return sum(math.ceil(batches_per_epoch / freqs[min(epoch, len(freqs) - 1)]) for epoch in range(options.max_epoch))


def train_command(spec, model, data_dir: Path, save_dir: Path, mode_label: str, recipe: Recipe, lr: float,
                  seed: int, train_rows: int, world_size: int, passthrough: Sequence[str], max_seq_len: int,
                  bookkeeping: Sequence[str] = ()) -> TrainCommand:
    """One run's train.py command: the RoBERTa GLUE recipe with ``recipe``'s values and the schedule its
    options give (read by fairseq's own parser, so a flag given after the script wins as it does in
    train.py), then ``bookkeeping`` (flags that do not change what is trained), the mode's flags and the
    user's (``passthrough``)."""
    recipe_args = [
        str(data_dir), "--task", "glue", "--glue-task", spec.name, "--criterion", "glue_prediction",
        *model.arch_args(), "--restore-file", model.checkpoint,
        "--reset-optimizer", "--reset-dataloader", "--reset-meters",
        "--max-seq-len", str(max_seq_len), "--batch-size", str(recipe.batch), "--max-epoch", str(recipe.epochs),
        "--group-by-length", str(LENGTH_GROUP_BATCHES * recipe.batch),
        "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--adam-eps", "1e-06",
        "--weight-decay", f"{recipe.weight_decay:g}", "--clip-norm", "0.0",
        "--lr", str(lr), "--lr-scheduler", "polynomial_decay",
        "--seed", str(seed), "--save-dir", str(save_dir), "--no-epoch-checkpoints",
        "--best-checkpoint-metric", spec.primary_metric, "--maximize-best-checkpoint-metric",
        "--valid-subset", ",".join(spec.valid_subsets),
        "--log-format", "json", "--log-interval", "50", "--no-progress-bar", "--num-workers", "0",
    ]
    if recipe.patience:
        recipe_args += ["--patience", str(recipe.patience)]
    if mode_label == FULL and world_size > 1:
        recipe_args.append("--find-unused-parameters")  # RoBERTa's LM head gets no gradient in classification
    if model.pair_separator:
        recipe_args += ["--separator-token", "2"]  # RoBERTa pairs: <s> a </s> </s> b </s>
    user_args = mode_flags(mode_label) + list(passthrough)
    total = schedule_updates(parse_options(recipe_args + user_args), train_rows, world_size)
    schedule = ["--total-num-update", str(total), "--warmup-updates", str(int(round(0.06 * total)))]
    return TrainCommand(args=recipe_args + schedule + list(bookkeeping) + user_args,
                        settings_args=recipe_args + schedule + user_args, total_updates=total)
