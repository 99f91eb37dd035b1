"""train.py's options: fairseq-train's, plus the ``--bitfit*`` group, parsed into fairseq's config.

``parse(argv)`` is the whole sequence from a command line to the config that
fairseq_cli.train.main takes: fairseq's training parser with the BitFit group,
the BitFit checks, the fixes for this machine (torchrun, precision) and the
resume rule (``launch``), then fairseq's argparse-to-omegaconf conversion with the
BitFit options attached as ``cfg.bitfit``.
"""
import argparse
import logging
import sys
import warnings
from dataclasses import dataclass, field
from typing import List, Optional, Sequence, Tuple

from fairseq import options
from fairseq.dataclass import FairseqDataclass
from fairseq.dataclass.configs import CheckpointConfig, FairseqConfig
from fairseq.dataclass.utils import convert_namespace_to_omegaconf, gen_parser_from_dataclass
from omegaconf import OmegaConf, open_dict
from omegaconf.errors import InterpolationKeyError

from ..core import bitfit, tuners
from ..core.errors import UserError
from . import launch

logger = logging.getLogger(__name__)

# train.py as a module, for drivers that launch it (also under torchrun's -m), and the name
# its error lines carry however it was launched.
TRAIN_MODULE = "fairseq_ext.training.main"
TRAIN_COMMAND = [sys.executable, "-m", TRAIN_MODULE]
TRAIN_PROG = "train.py"

# Run modes of the experiment drivers (GLUE runner, benchmark): full fine-tuning, the heads
# alone, or BitFit with a --bitfit-terms selection.
FULL, HEAD_ONLY, BITFIT_PREFIX = "full", "head", "bitfit-"


def mode_label(mode: str, bitfit_terms: str = "ofa") -> str:
    """``bitfit`` + terms -> ``bitfit-<terms>``; ``full`` and ``head`` stay as they are."""
    return f"{BITFIT_PREFIX}{bitfit_terms}" if mode == "bitfit" else mode


def mode_flags(label: str) -> List[str]:
    """train.py flags of a run mode: ``full``, ``head`` (heads only), ``bitfit-<any --bitfit-terms>``, a
    random-subset control (``rand_uniform``, ``rand_row_col``), or a comparison method (``lora``, ``ia3``,
    ``adapter``: ``--tuner`` at its defaults)."""
    if label == FULL:
        return []
    if label in tuners.TUNERS:
        return ["--tuner", label]
    if label == HEAD_ONLY:
        return ["--bitfit", "--bitfit-terms", "none"]
    if label in bitfit.CONTROL_TERMS:
        return ["--bitfit", "--bitfit-terms", label]
    if label.startswith(BITFIT_PREFIX) and label != BITFIT_PREFIX:
        return ["--bitfit", "--bitfit-terms", label[len(BITFIT_PREFIX):]]
    raise UserError(f"unknown mode {label!r}; modes: {FULL}, {HEAD_ONLY}, bitfit (with BITFIT_TERMS, default ofa), "
                    f"{BITFIT_PREFIX}<terms> (e.g. {BITFIT_PREFIX}all), a control "
                    f"({', '.join(bitfit.CONTROL_TERMS)}) or a comparison method ({', '.join(tuners.TUNERS)})")


@dataclass
class BitFitConfig(FairseqDataclass):
    bitfit: bool = field(
        default=False,
        metadata={"help": "train only bias terms (and the task heads); freeze every other weight"},
    )
    bitfit_terms: str = field(
        default="ofa",
        metadata={
            "help": "which bias terms --bitfit trains: 'ofa' (OFA's layer_norm/fc bias filter), "
            "'all' (every bias, as in the paper), 'none' (heads only), paper symbols joined by "
            "commas (q,k,v,m1,ln1,m2,m3,ln2,emb_ln; e.g. 'q,m2'), or 're:REGEX' on parameter names"
        },
    )
    bitfit_freeze_heads: bool = field(
        default=False,
        metadata={
            "help": "freeze the task heads (classification_heads.*) too, exactly as OFA's filter "
            "does; a newly initialised head then stays at its random init"
        },
    )
    bitfit_delta_only: bool = field(
        default=False,
        metadata={
            "help": "save BitFit deltas (NAME.delta.safetensors: the trained tensors) for every checkpoint, "
            "but a full checkpoint only as checkpoint_last.pt, which resuming needs"
        },
    )
    fused_adam: bool = field(
        default=False,
        metadata={"help": "--optimizer adam on CPU through torch's fused AdamW kernel, computing fairseq's Adam "
                          "update in one pass over each tensor: faster full fine-tuning, numbers equal to "
                          "fairseq-train's up to rounding (without it: fairseq's exact numbers)"},
    )
    tuner: str = field(
        default="",
        metadata={"help": "also train a comparison method's added tensors: lora, ia3 or adapter (bottleneck "
                          "adapters); alone it trains them and the heads (as --bitfit --bitfit-terms none would)"},
    )
    lora_rank: int = field(default=8, metadata={"help": "--tuner lora: the rank r"})
    lora_alpha: float = field(default=8.0, metadata={"help": "--tuner lora: alpha (the update is scaled by alpha/r)"})
    tuner_targets: str = field(
        default="",
        metadata={"help": "--tuner lora/ia3: the Linear layers wrapped, as paper symbols q,k,v,m1,m2,m3 "
                          "(default: lora q,v; ia3 k,v,m3)"},
    )
    adapter_size: int = field(default=64, metadata={"help": "--tuner adapter: the bottleneck size"})


USAGE = f"{TRAIN_PROG} DATA [fairseq-train options] [--bitfit [--bitfit-terms SPEC] ...]"
HELP_INTRO = """fairseq-train with BitFit: every fairseq-train option, plus the options below.

BitFit (bias-only fine-tuning):
  --bitfit                   train only the selected bias terms and the task heads; freeze the rest
  --bitfit-terms SPEC        ofa (default: OFA's layer_norm/fc bias filter), all (every bias),
                             none (heads only), paper symbols q,k,v,m1,ln1,m2,m3,ln2,emb_ln
                             joined by commas (e.g. q,m2), or re:REGEX on parameter names
  --bitfit-freeze-heads      freeze the task heads too (OFA's exact behaviour)
  --bitfit-delta-only        keep checkpoint_last.pt whole; every other checkpoint is its delta alone
  --tuner lora|ia3|adapter   train a comparison method instead (with --bitfit: as well): LoRA (--lora-rank 8,
                             --lora-alpha 8, --tuner-targets q,v), IA3 (k,v,m3), or bottleneck adapters
                             (--adapter-size 64); its delta, resume and reports work as BitFit's
train.py:
  --save-interval-minutes M  also save checkpoint_last.pt every M minutes, mid-epoch included
                             (0: off); a restarted run resumes from it

A restarted run (same command, same --save-dir) resumes from its checkpoint_last.pt.
Example, the RoBERTa GLUE recipe with BitFit:
  train.py RTE-bin --task sentence_prediction --criterion sentence_prediction --num-classes 2 \\
    --arch roberta_base --restore-file roberta.base/model.pt --reset-optimizer --reset-dataloader \\
    --reset-meters --lr 1e-3 --batch-size 32 --max-epoch 10 --bitfit --bitfit-terms all
Every fairseq-train option follows."""


@dataclass
class TimedSaveConfig(FairseqDataclass):
    save_interval_minutes: float = field(
        default=0.0,
        metadata={"help": "also save checkpoint_last.pt (and its delta) whenever M minutes have passed since the "
                          "last save, mid-epoch included, without validating; a restart resumes inside the epoch. "
                          "0: off (fairseq-train's behaviour)"},
    )


@dataclass
class TimedCheckpointConfig(TimedSaveConfig, CheckpointConfig):
    """fairseq's checkpoint group with ``save_interval_minutes``."""


@dataclass
class TrainConfig(FairseqConfig):
    """fairseq's config with train.py's additions: the ``bitfit`` group and
    ``checkpoint.save_interval_minutes``.  The hydra form's schema; the argparse form attaches
    the same nodes to fairseq's converted config (``attach_bitfit_config``)."""
    checkpoint: TimedCheckpointConfig = field(default=TimedCheckpointConfig)
    bitfit: BitFitConfig = field(default=BitFitConfig)


def add_bitfit_args(parser) -> None:
    """Add the ``--bitfit*`` and train.py's own options to a fairseq training parser (once, before parsing)."""
    gen_parser_from_dataclass(parser.add_argument_group("BitFit"), BitFitConfig())
    gen_parser_from_dataclass(parser.add_argument_group("train.py"), TimedSaveConfig())


def attach_bitfit_config(cfg, args) -> None:
    """Store the BitFit options in ``cfg.bitfit``.

    convert_namespace_to_omegaconf keeps only dataclass fields, so a plain argparse
    flag would vanish for dataclass models; a config node survives, is pickled to
    spawned workers and is saved in every checkpoint's cfg.
    """
    values = {name: getattr(args, name) for name in BitFitConfig.__dataclass_fields__ if name != "_name"}
    with open_dict(cfg):
        cfg.bitfit = OmegaConf.structured(BitFitConfig(**values))
    with open_dict(cfg.checkpoint):
        cfg.checkpoint.save_interval_minutes = float(args.save_interval_minutes)


def tuner_spec(options) -> Optional[tuners.TunerSpec]:
    """The ``--tuner`` method and its settings (parsed options or ``cfg.bitfit``), None without one."""
    if not getattr(options, "tuner", ""):
        return None
    try:
        return tuners.spec_from_options(options.tuner, options.lora_rank, options.lora_alpha,
                                        options.tuner_targets, options.adapter_size)
    except tuners.TunerError as error:
        raise UserError(f"argument --tuner {options.tuner}: {error}") from None


def validate_args(args) -> None:
    """Reject, before anything is built, options fairseq would stop on with a traceback, and impossible
    BitFit options."""
    if args.batch_size is None and args.max_tokens is None:
        raise UserError("--batch-size or --max-tokens is needed: fairseq forms its batches by one of them")
    validate_bitfit_args(args)


def trains_selection(options) -> bool:
    """Whether the run trains a selection (``--bitfit``, ``--tuner`` or both) and writes deltas."""
    return bool(options.bitfit or getattr(options, "tuner", ""))


def selection_terms(options) -> str:
    """The bias terms trained: ``--bitfit-terms`` with ``--bitfit``; none with ``--tuner`` alone."""
    return options.bitfit_terms if options.bitfit else "none"


def validate_bitfit_args(args) -> None:
    """Reject impossible BitFit options before anything is built."""
    try:
        bitfit.parse_terms(args.bitfit_terms)
    except bitfit.SelectionError as error:
        raise UserError(f"argument --bitfit-terms: {error}") from None
    tuner_spec(args)
    flag = "--bitfit" if args.bitfit else "--tuner"
    if trains_selection(args) and getattr(args, "model_parallel_size", 1) > 1:
        raise UserError(f"{flag} cannot be used with --model-parallel-size > 1: fairseq trains model-parallel "
                        "runs with its MegatronTrainer, which this package does not extend")
    if args.bitfit_delta_only and not trains_selection(args):
        raise UserError("--bitfit-delta-only needs --bitfit or --tuner: only their runs write deltas")
    if args.save_interval_minutes < 0:
        raise UserError(f"--save-interval-minutes {args.save_interval_minutes:g}: must be positive (0: off)")
    if args.save_interval_minutes and (args.no_save or args.no_last_checkpoints):
        flag = "--no-save" if args.no_save else "--no-last-checkpoints"
        raise UserError(f"--save-interval-minutes saves checkpoint_last.pt, which {flag} turns off")
    if trains_selection(args) and getattr(args, "ddp_backend", None) == "fully_sharded":
        raise UserError(
            f"{flag} cannot be used with --ddp-backend fully_sharded: it flattens and renames "
            "parameters, so no bias filter can see them; use pytorch_ddp, c10d or legacy_ddp"
        )


def _training_parser(prog: Optional[str] = None) -> argparse.ArgumentParser:
    """fairseq-train's parser with ``--bitfit*``; its errors are UserErrors: one line, and a caller learns
    them as data (core.errors), like every bad input."""
    parser = options.get_training_parser()
    if prog:
        parser.prog = prog
    parser.usage, parser.description = USAGE, HELP_INTRO
    parser.formatter_class = argparse.RawDescriptionHelpFormatter

    def refuse(message: str):
        raise UserError(message)

    parser.error = refuse
    add_bitfit_args(parser)
    return parser


def parse_options(argv: Sequence[str], prog: Optional[str] = None) -> argparse.Namespace:
    """fairseq-train's options plus ``--bitfit*`` as fairseq's own parser reads them (the last of a flag
    given twice wins), unchecked and not fitted to the machine: what a command line means."""
    return options.parse_args_and_arch(_training_parser(prog), input_args=list(argv))


def parse_known_options(argv: Sequence[str]) -> argparse.Namespace:
    """The options of fairseq-train's own parser among ``argv``, each checked for its type; the options of
    a model or task not named here are left alone."""
    return _training_parser().parse_known_args(list(argv))[0]


def parse_args(argv: Sequence[str], prog: Optional[str] = None):
    """fairseq-train's options plus ``--bitfit*``, checked and fitted to this machine."""
    argv = list(argv)
    launch.reject_conflicting_precision(argv)
    args = parse_options(argv, prog)
    validate_args(args)
    launch.configure_precision(args, tpu_requested="--tpu" in argv)
    launch.configure_torchrun(args, world_size_given="--distributed-world-size" in argv)
    return args


# The criterion each sentence-classification task takes an option from (--classification-head-name).
TASK_CRITERIA = {"glue": "glue_prediction", "sentence_prediction": "sentence_prediction"}


def as_flag(group: str, name: str) -> str:
    return f"--{group} {name}"


def criterion_lacks_option(error: InterpolationKeyError, task: str, criterion: str, spelled=as_flag) -> str:
    """One line for a task option that refers to its criterion's (sentence_prediction's
    classification_head_name) under a criterion that lacks it, where fairseq ends in omegaconf's
    traceback.  ``spelled(group, name)`` writes a choice as the command line's form gives it."""
    source = str(error).splitlines()[0].split("'")[1::2] or ["the criterion"]
    hint = spelled("criterion", TASK_CRITERIA[task]) if task in TASK_CRITERIA else "the task's criterion"
    return (f"{spelled('task', task)} takes {error.full_key} from {source[0]}, which "
            f"{spelled('criterion', criterion)} does not have; use {hint}")


def to_config(args):
    """fairseq's omegaconf config of parsed options, with ``cfg.bitfit``."""
    with warnings.catch_warnings():
        # fairseq composes its config through hydra's deprecated APIs: noise for users.
        warnings.simplefilter("ignore")
        try:
            cfg = convert_namespace_to_omegaconf(args)
        except InterpolationKeyError as error:
            raise UserError(criterion_lacks_option(error, args.task, args.criterion)) from None
    attach_bitfit_config(cfg, args)
    return cfg


def parse(argv: Sequence[str], prog: Optional[str] = None) -> Tuple[object, Optional[str]]:
    """(cfg, the checkpoint this launch resumes or None) from train.py's command line."""
    args = parse_args(argv, prog)
    resumed_from = launch.resolve_restore_file(args)
    return to_config(args), resumed_from
