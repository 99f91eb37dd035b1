"""The GLUE job's settings, each declared once: its environment variable, flag, kind, default and help.

``run_scripts/glue_bitfit.sh`` hands its environment to ``python -m fairseq_ext.experiments.glue_run
--from-env``; the same settings are flags of that command (a flag wins over the variable).  The
parser, the checks (whose one-line errors name the variable), the resume line and the script's
``--help`` are all made from ``SETTINGS``.
"""
import argparse
import os
import shlex
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Mapping, Optional, Sequence

from ...core.errors import UserError
from ...core.glue_tasks import get_task_spec

LAUNCHERS = ("local", "submitit", "submitit_local")
SCRIPT = "run_scripts/glue_bitfit.sh"


def _text(value: str, name: str):
    return value


def _integer(minimum: int, optional: bool = False) -> Callable[[str, str], Optional[int]]:
    expected = "a positive integer" if minimum == 1 else f"an integer of at least {minimum}"

    def parse(value: str, name: str) -> Optional[int]:
        if optional and value == "":
            return None
        try:
            number = int(value)
        except ValueError:
            number = None
        if number is None or number < minimum:
            raise UserError(f"{name} {value!r}: expected {expected}")
        return number
    return parse


def _number(value: str, name: str) -> float:
    try:
        number = float(value)
    except ValueError:
        number = -1.0
    if not number >= 0:
        raise UserError(f"{name} {value!r}: expected a number of at least 0")
    return number


def _list_of(kind, expected: str) -> Callable[[str, str], list]:
    def parse(value: str, name: str) -> list:
        try:
            items = [kind(item) for item in value.split()]
        except ValueError:
            items = None
        if items is None or (kind is int and any(item < 1 for item in items)):
            raise UserError(f"{name} {value!r}: expected space-separated {expected}")
        return items
    return parse


EVERY_TASK = "*"


def _train_subset(value: str, name: str) -> Dict[str, int]:
    """'' (every row), 'N' (N rows of every task) or 'TASK=N ...' (N rows of those tasks, every row of the
    others), as {task or EVERY_TASK: N}."""
    sizes: Dict[str, int] = {}
    for item in value.split():
        task, _, size = item.rpartition("=")
        try:
            task = get_task_spec(task).name if task else EVERY_TASK
            number = int(size)
        except (UserError, ValueError):
            number = 0
        if number < 1 or (task == EVERY_TASK and len(value.split()) > 1):
            raise UserError(f"{name} {value!r}: expected a positive integer (every task), or TASK=N pairs "
                            "separated by spaces (e.g. 'SST-2=8000 MNLI=20000')")
        sizes[task] = number
    return sizes


def train_subset_of(sizes: Dict[str, int], task: str) -> Optional[int]:
    """The rows TRAIN_SUBSET samples from ``task``'s training file; None: every row."""
    return sizes.get(task, sizes.get(EVERY_TASK))


def _launcher(value: str, name: str) -> str:
    if value not in LAUNCHERS:
        raise UserError(f"{name} {value!r}: expected {', '.join(LAUNCHERS[:-1])} or {LAUNCHERS[-1]}")
    return value


EXPORTS = ("hf",)


def _export(value: str, name: str) -> Optional[str]:
    if value not in ("",) + EXPORTS:
        raise UserError(f"{name} {value!r}: expected {' or '.join(EXPORTS)} (unset: no export)")
    return value or None


BF16_BASE_CHOICES = ("auto", "on", "off")


def _bf16_base(value: str, name: str) -> str:
    if value not in BF16_BASE_CHOICES:
        raise UserError(f"{name} {value!r}: expected {', '.join(BF16_BASE_CHOICES[:-1])} or {BF16_BASE_CHOICES[-1]}")
    return value


@dataclass(frozen=True)
class Setting:
    """One job setting: ``env`` in the script's environment, ``flag`` on the command line."""

    env: str
    default: str  # as the variable would give it; "" is unset
    parse: Callable[[str, str], object]  # (text, the setting's name) -> value, or UserError
    help: str
    shown_default: str = ""  # what the default means, where "" or the text alone does not say
    flag_name: str = ""  # where the flag is not the variable's name in lower case

    @property
    def flag(self) -> str:
        return "--" + (self.flag_name or self.env.lower().replace("_", "-"))

    @property
    def dest(self) -> str:
        return self.flag[2:].replace("-", "_")

    @property
    def default_text(self) -> str:
        return self.shown_default or self.default


SETTINGS = (
    Setting("GLUE_DIR", "", _text, "GLUE's glue_data folder: <TASK>/{train,dev,test}.tsv", "./glue_data"),
    Setting("TASKS", "", _text, "space-separated GLUE tasks", "every task present"),
    Setting("MODE", "bitfit", _text, "space-separated run modes: full, head (head-only baseline), bitfit (with "
            "BITFIT_TERMS), bitfit-<terms> (bitfit-all, bitfit-q,m2, ...), rand_uniform, rand_row_col, and the "
            "comparison methods lora, ia3, adapter"),
    Setting("BITFIT_TERMS", "ofa", _text, "train.py --bitfit-terms of the mode bitfit"),
    Setting("MODEL", "", _text, "a converted model folder or a Hugging Face BERT/RoBERTa folder",
            "embedded all-MiniLM-L6-v2"),
    Setting("OUTPUT_DIR", "outputs/glue", _text, "where data, runs and results go"),
    Setting("SEEDS", "1", _list_of(int, "positive integers"), "space-separated seeds"),
    Setting("LRS", "", _list_of(float, "numbers"), "space-separated learning rates; each is trained, the best "
            "on dev reported", "by mode and model size"),
    Setting("EPOCHS", "", _integer(1, optional=True), "max epochs", "by mode, model and task size"),
    Setting("MAX_SEQ_LEN", "128", _integer(1), "tokens per example (truncated, never dropped)"),
    Setting("TRAIN_SUBSET", "", _train_subset, "train on a seeded sample of N training rows: N (every task) or "
            "TASK=N pairs, e.g. 'SST-2=8000' (the other tasks every row)", "every row"),
    Setting("TRAIN_SUBSETS", "", _list_of(int, "positive integers"), "training-size curves: every mode at each "
            "size, e.g. '200 500 1000' (size_curves.png)", "none"),
    Setting("REUSE_RESULTS", "", _text, "space-separated results.json files of other jobs: a planned run whose row "
            "there has the same settings (train.py arguments, data, base model) is taken from it, not trained",
            "none"),
    Setting("EXPORT", "", _export, "hf: each task's best BitFit run as a transformers folder in "
            "OUTPUT_DIR/export/<TASK> (python -m fairseq_ext.tools.export_hf)", "no export"),
    Setting("BF16_BASE", "auto", _bf16_base, "bitfit-*, head, lora, ia3 and adapter runs with the frozen base "
            "in bf16 and the trained tensors and Adam's state in fp32 (train.py --bf16): on, off, or auto: on "
            "where the job trains on this machine's CPU, the CPU has native bf16 (AMX, AVX512-BF16) and OUTPUT_DIR "
            "holds no fp32 run of those modes"),
    Setting("NPROC", "1", _integer(1), "processes per node; torchrun when above 1"),
    Setting("NNODES", "1", _integer(1), "nodes of a multi-node torchrun job"),
    Setting("NODE_RANK", "0", _integer(0), "this node's rank in a multi-node job"),
    Setting("MASTER_ADDR", "127.0.0.1", _text, "torchrun's master address"),
    Setting("MASTER_PORT", "29500", _integer(1), "torchrun's master port"),
    Setting("WORKERS", "", _integer(1, optional=True), "processes that tokenize GLUE files", "the cores"),
    Setting("SAVE_MINUTES", "5", _number, "train.py --save-interval-minutes: checkpoint_last.pt at least this "
            "often, mid-epoch too (0: epoch ends only)"),
    Setting("PROGRESS_SECONDS", "60", _number, "seconds between progress lines when not on a terminal",
            flag_name="progress-interval"),
    Setting("PARALLEL", "1", _integer(1), "runs trained at once on this machine: one GPU each where there are "
            "GPUs, else OMP_NUM_THREADS = cores / PARALLEL each (unless OMP_NUM_THREADS is set)"),
    Setting("LAUNCHER", "local", _launcher, "local (this machine), submitit (each run a SLURM job; needs pip "
            "install submitit), submitit_local (submitit's local executor: the SLURM path without SLURM)"),
    Setting("SLURM_PARTITION", "", _text, "LAUNCHER=submitit: the partition", "the cluster's default"),
    Setting("SLURM_TIME_MIN", "720", _integer(1), "a run's SLURM time limit in minutes (a run that reaches it "
            "saves and stops; the same command resumes)"),
    Setting("SLURM_GPUS_PER_RUN", "1", _integer(0), "GPUs each run's SLURM job asks for"),
    Setting("SLURM_CPUS_PER_RUN", "8", _integer(1), "CPUs each run's SLURM job asks for"),
    Setting("SLURM_MEM_GB", "32", _integer(1), "memory each run's SLURM job asks for, in GB"),
)
BY_ENV: Dict[str, Setting] = {setting.env: setting for setting in SETTINGS}

# run_scripts/glue_bitfit.sh passes --from-env; a script that calls it may name itself for the resume line here.
FROM_ENV = "--from-env"
RESUME_COMMAND_VARIABLE = "GLUE_BITFIT_COMMAND"


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog, description="Fine-tune on GLUE with BitFit, full fine-tuning, head-only or a control; "
        "arguments after -- go to train.py.")
    parser.add_argument(FROM_ENV, action="store_true",
                        help="take each setting not given as a flag from its environment variable")
    for setting in SETTINGS:
        shown = f" (default: {setting.default_text})" if setting.default_text else ""
        parser.add_argument(setting.flag, default=None, metavar=setting.env, help=setting.help + shown)
    return parser


def parse(argv: Sequence[str], prog: str, environ: Mapping[str, str] = os.environ) -> argparse.Namespace:
    """The settings as typed values: a flag, else (with --from-env) a non-empty variable, else the default."""
    args = build_parser(prog).parse_args(list(argv))
    for setting in SETTINGS:
        text = getattr(args, setting.dest)
        if text is None:
            text = (environ.get(setting.env) or setting.default) if args.from_env else setting.default
        setattr(args, setting.dest, setting.parse(text.strip() if setting.parse is not _text else text, setting.env))
    return args


def given_in(environ: Mapping[str, str]) -> List[str]:
    """``NAME=value`` of every setting set in ``environ``, in the table's order, quoted for a shell."""
    return [f"{setting.env}={shlex.quote(environ[setting.env])}" for setting in SETTINGS if environ.get(setting.env)]


def resume_command(argv: Sequence[str], from_env: bool, environ: Mapping[str, str] = os.environ) -> str:
    """The command that resumes this job: the caller's own (``GLUE_BITFIT_COMMAND``), the script with the
    variables it was given, or this module's command line."""
    if environ.get(RESUME_COMMAND_VARIABLE):
        return environ[RESUME_COMMAND_VARIABLE]
    if from_env:
        passthrough = list(argv[list(argv).index("--") + 1:]) if "--" in argv else []
        return " ".join(given_in(environ) + ["bash", shlex.quote(environ.get("GLUE_BITFIT_SCRIPT", SCRIPT))]
                        + [shlex.quote(arg) for arg in passthrough])
    return shlex.join([sys.executable, "-m", "fairseq_ext.experiments.glue_run", *argv])


def help_text() -> str:
    """The script's --help: every variable with its default and meaning."""
    lines = ["bash run_scripts/glue_bitfit.sh [train.py arguments]: GLUE end to end (docs/glue.md).",
             "Settings, as environment variables (defaults in brackets):"]
    for setting in SETTINGS:
        default = f" [{setting.default_text}]" if setting.default_text else ""
        lines.append(f"  {setting.env:<19} {setting.help}{default}")
    return "\n".join(lines)
