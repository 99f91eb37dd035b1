"""Planning a GLUE job: the model, the modes, and each run's train.py arguments, checked against what
its folder or its row in results.json was trained with before."""
import hashlib
import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Set

from ...core.bitfit import SelectionError, parse_terms
from ...core.errors import UserError
from ...core.glue_tasks import TASK_NAMES, GlueTaskSpec
from ...plugin.data.glue_prepare import same_data
from ...plugin.models import hf_import
from ...plugin.models.model_dir import load_model_dir
from ...plugin.models.pretrained import default_model_dir
from ...training.glue_recipe import Recipe, TrainCommand, train_command
from ...training.launch import PRECISION_FLAGS, cpu_native_bf16
from ...training.options import BITFIT_PREFIX, HEAD_ONLY, mode_flags, mode_label, parse_options
from .base_identity import BASE, base_change, base_digest, comparable_settings
from .results import Ledger
from .console import saved_updates
from .run_file import RunFile, finished_result

logger = logging.getLogger("fairseq_ext.experiments.glue_run")


def _folder_fingerprint(folder: Path) -> str:
    """Tells folders apart by where they are and what they hold (file names, sizes, times)."""
    listing = [str(folder.resolve())] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                                         for f in sorted(folder.iterdir()) if f.is_file()]
    return hashlib.sha256("\n".join(listing).encode()).hexdigest()[:12]


def resolve_model(model: Optional[str], output_dir: Path):
    """The model folder: the embedded default, a converted folder, or a Hugging Face folder to import."""
    if not model:
        return load_model_dir(default_model_dir())
    path = Path(model)
    if not path.is_dir():
        raise UserError(f"MODEL {model}: not a directory (a converted model folder or a Hugging Face folder)")
    if (path / "model.pt").exists():
        return load_model_dir(path)
    if (path / "config.json").exists():
        target = output_dir / "models" / f"{path.resolve().name}-{_folder_fingerprint(path)}"
        if not (target / "model.pt").exists():
            logger.info(f"importing the Hugging Face folder {path} into {target}")
            hf_import.convert(path, target)
        return load_model_dir(target)
    raise UserError(f"MODEL {model}: holds neither model.pt (fairseq) nor config.json (Hugging Face)")


def present_tasks(glue_dir: Path) -> List[str]:
    return [name for name in TASK_NAMES if (glue_dir / name / "train.tsv").is_file()]


def run_modes(text: str, bitfit_terms: str) -> List[str]:
    """MODE's run modes as labels (full, head, bitfit-<terms>, a control, a comparison method), each checked."""
    given = text.split()
    if not given:
        raise UserError("MODE is empty; modes: full, head, bitfit, bitfit-<terms>, rand_uniform, rand_row_col, "
                        "lora, ia3 or adapter")
    modes = []
    for mode in given:
        label = mode_label(mode, bitfit_terms) if mode == "bitfit" else mode
        setting = f"BITFIT_TERMS {bitfit_terms}" if mode == "bitfit" else f"MODE {mode}"
        try:
            mode_flags(label)
            if label.startswith(BITFIT_PREFIX):
                parse_terms(label[len(BITFIT_PREFIX):])
        except (UserError, SelectionError) as error:
            raise UserError(f"{setting}: {error}") from None
        modes.append(label)
    return list(dict.fromkeys(modes))


# Modes whose base is frozen: it can live in bf16 while the trained tensors keep fp32 masters (BF16_BASE).
FROZEN_BASE_MODES = (HEAD_ONLY, "lora", "ia3", "adapter")
BF16_FLAG = "--bf16"


def has_frozen_base(mode: str) -> bool:
    return mode.startswith(BITFIT_PREFIX) or mode in FROZEN_BASE_MODES


@dataclass(frozen=True)
class BaseChoice:
    """BF16_BASE resolved for a job: whether frozen-base runs get --bf16, and the plan's line saying why."""

    bf16: bool
    line: str

    def flags(self, mode: str) -> List[str]:
        return [BF16_FLAG] if self.bf16 and has_frozen_base(mode) else []


def _recorded_precisions(output_dir: Path, ledger: Ledger) -> Set[bool]:
    """Whether each frozen-base run OUTPUT_DIR already holds (its folder or results row), or REUSE_RESULTS has to
    give, was trained with --bf16: {} for none, {False} for fp32 only, {True} for bf16 only."""
    rows = list(ledger.rows.values()) + [row for other in ledger.others.values() for row in other.values()]
    recorded = [row.get("settings") for row in rows if has_frozen_base(row.get("mode", ""))]
    runs = output_dir / "runs"
    if runs.is_dir():
        recorded += [RunFile.read(run_dir).settings for run_dir in runs.glob("*/*/*")
                     if run_dir.is_dir() and has_frozen_base(run_dir.parent.name)]
    return {BF16_FLAG in settings.get("train_args", []) for settings in recorded if settings is not None}


def choose_bf16_base(setting: str, modes: Sequence[str], passthrough: Sequence[str], local_cpu: bool,
                     output_dir: Path, ledger: Ledger) -> BaseChoice:
    """BF16_BASE (auto, on, off) for this job.  auto follows the frozen-base runs OUTPUT_DIR (or REUSE_RESULTS)
    holds, so that its results.json rows and interrupted runs keep being reused and resumed with the settings
    they were trained with: fp32 if any is fp32, bf16 if all are bf16, even on a CPU without native bf16 (a
    job resumed on another machine). With none, bf16 only for a job that trains on a CPU with native bf16."""
    frozen = [mode for mode in modes if has_frozen_base(mode)]
    on_line = (f"precision: {' '.join(frozen)}: frozen base in bf16, trained tensors and Adam's state in fp32 "
               f"(train.py {BF16_FLAG}; BF16_BASE={setting}")
    if not frozen:
        return BaseChoice(False, "precision: fp32 (no frozen-base mode in this job)")
    if setting == "on":
        return BaseChoice(True, on_line + ")")
    if setting == "off":
        return BaseChoice(False, "precision: fp32 (BF16_BASE=off)")

    def fp32(why: str) -> BaseChoice:
        return BaseChoice(False, f"precision: fp32 (BF16_BASE=auto: {why})")

    given = [flag for flag in passthrough if flag in PRECISION_FLAGS]
    if given:
        return fp32(f"train.py arguments after -- set {' '.join(given)}")
    if not local_cpu:
        return fp32("runs train elsewhere than this machine's CPU")
    where = f"{output_dir}{' or REUSE_RESULTS' if ledger.others else ''}"
    recorded, native = _recorded_precisions(output_dir, ledger), cpu_native_bf16()
    if False in recorded:
        return fp32(f"{where} holds fp32 runs of these modes, kept reusable; BF16_BASE=on for bf16")
    if recorded:
        slower = "; this CPU has no native bf16 (AMX, AVX512-BF16), so they train slower" if native is None else ""
        return BaseChoice(True, on_line + f": {where} holds bf16 runs of these modes, kept reusable{slower}; "
                                          "BF16_BASE=off for fp32)")
    if native is None:
        return fp32("this CPU has no native bf16 (AMX, AVX512-BF16)")
    return BaseChoice(True, on_line + f": this CPU has {native}; BF16_BASE=off for fp32)")


def run_settings(command: TrainCommand, prepared: Path, run_dir: Path, checkpoint: str, manifest: dict) -> dict:
    """What a run's result depends on: train.py's arguments (folders and the base checkpoint as placeholders,
    logging and saving flags aside), the prepared data's key and the base checkpoint's digest."""
    places = {str(prepared): "DATA", str(run_dir): "RUN_DIR", str(checkpoint): BASE}
    return {"train_args": [places.get(arg, arg) for arg in command.settings_args],
            "data": manifest.get("cache_key") or manifest["splits"],
            "base": base_digest(checkpoint)}


# train.py options that only log and save: a run trained with other values of them is the same run.
BOOKKEEPING_OPTIONS = ("save_interval_minutes", "tensorboard_logdir", "log_format", "log_interval", "no_progress_bar")


def _trained_options(train_args: List[str]) -> Dict[str, object]:
    """What train.py's own parser reads from ``train_args``, logging and saving options aside."""
    return {name: value for name, value in vars(parse_options(train_args)).items() if name not in BOOKKEEPING_OPTIONS}


def settings_change(before: dict, settings: dict, manifest: dict) -> Optional[str]:
    """What differs between the settings a run was trained with and ``settings`` (of data prepared as
    ``manifest`` says); None if nothing.  The base model is compared by its checkpoint's digest, the
    arguments as train.py reads them: their order, a flag's spelling and flags given twice do not matter,
    a changed value does."""
    before = comparable_settings(before)
    recorded_data = settings["data"] if same_data(before["data"], manifest) else before["data"]
    if recorded_data != settings["data"]:  # the data's key: its rows, or the file key it was recorded under
        return "the training data (GLUE files, TRAIN_SUBSET or the model's tokenizer)"
    base = base_change(before, settings)
    if base:
        return base
    if before["train_args"] == settings["train_args"]:
        return None
    try:
        old = _trained_options(before["train_args"])
    except UserError as error:
        return f"train.py arguments (the recorded ones no longer parse: {error})"
    new = _trained_options(settings["train_args"])
    changed = [f"--{name.replace('_', '-')} {old.get(name, '(unset)')} -> {new.get(name, '(unset)')}"
               for name in sorted(set(old) | set(new)) if old.get(name) != new.get(name)]
    return "train.py arguments (" + ", ".join(changed[:4]) + ")" if changed else None


def check_same_settings(run_dir: Path, settings: dict, manifest: dict, recorded_row: Optional[dict],
                        results_file: Path) -> None:
    """Refuse to reuse or resume a run that was trained with other settings: its folder's run file, or its
    row in results.json (rows from before settings were kept in them are not checked)."""
    recorded = RunFile.read(run_dir).settings if run_dir.is_dir() else None
    if recorded is not None:
        change = settings_change(recorded, settings, manifest)
        if change:
            raise UserError(f"{run_dir} was trained with other settings: {change} changed; "
                            "use another OUTPUT_DIR, or delete that run folder to train it again")
    if recorded_row is not None and recorded_row.get("settings") is not None:
        change = settings_change(recorded_row["settings"], settings, manifest)
        if change:
            raise UserError(f"{results_file} holds a row for {run_dir} trained with other settings: {change} "
                            "changed; use another OUTPUT_DIR, or delete that run folder and its row in "
                            "results.json to train it again")


@dataclass(frozen=True)
class PlannedRun:
    """One run of the job, as planned: what it trains, where, with which train.py arguments and settings."""

    spec: GlueTaskSpec
    mode: str  # full, head or bitfit-<terms>
    lr: float
    seed: int
    prepared: Path
    run_dir: Path
    train_args: List[str]
    settings: dict
    train_rows: int
    planned_updates: int
    base_checkpoint: str
    recipe: Recipe
    train_subset: Optional[int] = None  # TRAIN_SUBSET or the TRAIN_SUBSETS size; None: every row
    curve: bool = False  # one size of a TRAIN_SUBSETS training-size curve
    recorded: Optional[dict] = None  # its row in results.json (or REUSE_RESULTS), trained with these settings
    reused_from: Optional[Path] = None  # the other job's results.json its recorded row comes from
    result: Optional[dict] = None  # its results row, if it finished (its run file's)
    updates_done: int = 0  # an interrupted run: the updates in the checkpoint it resumes from

    @property
    def label(self) -> str:
        rows = f" {self.train_rows:,} rows" if self.curve else ""
        return f"{self.spec.name}{rows} {self.mode} lr {self.lr:g} seed {self.seed}"

    @property
    def finished(self) -> bool:
        return self.result is not None or self.recorded is not None


def plan_run(spec, model, prepared: Path, manifest: dict, run_dir: Path, args, mode: str, recipe: Recipe, lr: float,
             seed: int, passthrough: List[str], bookkeeping: Sequence[str], ledger: Ledger,
             train_subset: Optional[int] = None, curve: bool = False) -> PlannedRun:
    """One run's train.py arguments, checked against what its folder, or its row in results.json, was
    trained with before."""
    train_rows = manifest["splits"]["train"]["rows_written"]
    world_size = args.nproc * args.nnodes
    command = train_command(spec, model, prepared, run_dir, mode, recipe, lr, seed, train_rows, world_size,
                            passthrough, args.max_seq_len, bookkeeping)
    settings = run_settings(command, prepared, run_dir, model.checkpoint, manifest)
    key = (spec.name, mode, lr, seed, train_subset if curve else None)
    row = ledger.row(*key)
    check_same_settings(run_dir, settings, manifest, row, ledger.path)
    recorded = row if row is not None and row.get("settings") is not None and \
        settings_change(row["settings"], settings, manifest) is None else None
    result, reused_from = finished_result(run_dir), None
    if recorded is None and result is None:  # another job's row of the same run and settings
        recorded, reused_from = next(((other, path) for path, other in ledger.other_rows(*key) if other.get("settings")
                                      and settings_change(other["settings"], settings, manifest) is None), (None, None))
    return PlannedRun(spec=spec, mode=mode, lr=lr, seed=seed, prepared=prepared, run_dir=run_dir, train_args=command.args,
                      settings=settings, train_rows=train_rows, planned_updates=command.total_updates,
                      base_checkpoint=str(model.checkpoint), recipe=recipe, train_subset=train_subset, curve=curve,
                      recorded=recorded, reused_from=reused_from, result=result, updates_done=saved_updates(run_dir))


def bookkeeping_args(args, tensorboard_dir: Path) -> List[str]:
    """train.py flags for saving and logging: --save-interval-minutes, and tensorboard logs where it is installed."""
    flags = ["--save-interval-minutes", f"{args.save_minutes:g}"]
    if importlib.util.find_spec("tensorboardX") is not None or importlib.util.find_spec("tensorboard") is not None:
        flags += ["--tensorboard-logdir", str(tensorboard_dir)]
    return flags
