"""train.py in hydra form, as ``fairseq-hydra-train`` takes it, with sweeps on hydra's launchers.

    python train.py --config-dir configs/glue --config-name cola task.data=CoLA-bin \\
        checkpoint.restore_file=model.pt bitfit.bitfit=true bitfit.bitfit_terms=all
    python train.py -m --config-dir configs/glue --config-name cola ... \\
        optimization.lr=[1e-4],[4e-4],[7e-4],[1e-3] common.seed=1,2,3 hydra/launcher=joblib

The config is fairseq's (``FairseqConfig``, matched by name with the YAML file as
fairseq-hydra-train does) plus train.py's nodes (``options.TrainConfig``): the ``bitfit``
group and ``checkpoint.save_interval_minutes``.  Each job then goes through the same steps
as the argparse form: the BitFit checks, the precision and torchrun fixes, the resume rule
(all written for argparse's flat namespace, so they see the config through ``FlatView``),
and ``main.train``.  Errors name config keys (``bitfit.bitfit_terms``), not flags.

Relative paths mean what they mean in the argparse form: the job does not change directory.
In a multirun each job's relative ``checkpoint.save_dir`` is placed in the job's own sweep
folder, so that the jobs of a grid never share checkpoints.

``config_of_command`` goes the other way: the hydra config of an argparse-form command line
(the shipped configs/glue files are written with it).
"""
import contextlib
import importlib.util
import logging
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence

import yaml
from fairseq import metrics
from fairseq.dataclass.initialize import add_defaults, hydra_init
from fairseq.dataclass.utils import omegaconf_no_object_check
from fairseq.utils import reset_logging
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationKeyError, OmegaConfBaseException

from ..core.errors import UserError, error_line, one_line
from . import launch, options
from .options import TRAIN_PROG

logger = logging.getLogger(__name__)

# hydra's own command-line options: any of them selects the hydra form.
HYDRA_OPTIONS = ("--config-dir", "-cd", "--config-name", "-cn", "--config-path", "-cp", "-m", "--multirun",
                 "--hydra-help", "--info", "--cfg", "-c")
# Where hydra's launcher plugins come from: hydra/launcher=NAME needs the module, from the pip package.
LAUNCHER_PACKAGES = {
    "joblib": ("hydra_plugins.hydra_joblib_launcher", "hydra-joblib-launcher"),
    "submitit_local": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    "submitit_slurm": ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
}
# fairseq's config files start with '# @package _group_', which hydra reads as fairseq-hydra-train
# does only with 1.1 semantics; the job's directory change that comes with them is turned off.
HYDRA_VERSION_BASE = "1.1"
DEFAULT_HYDRA_OVERRIDES = {"hydra.job.chdir": "False", "hydra.job.name": "train"}
# The config groups whose keys the argparse form has as flat options.
FLAT_SECTIONS = ("common", "distributed_training", "dataset", "optimization", "checkpoint", "bitfit",
                 "model_parallel", "bmuf")


# The registered groups (a ``_name`` picks the dataclass whose defaults apply).
REGISTRY_SECTIONS = ("task", "criterion", "optimizer", "lr_scheduler")


def requested(argv: Sequence[str]) -> bool:
    """Does this command line use the hydra form (a hydra option such as --config-name or -m)?"""
    return any(arg.split("=", 1)[0] in HYDRA_OPTIONS for arg in argv)


class FlatView:
    """The argparse-like view of a fairseq config that train.py's checks take:
    ``view.restore_file`` reads and writes ``cfg.checkpoint.restore_file``."""

    def __init__(self, cfg: DictConfig):
        object.__setattr__(self, "_cfg", cfg)

    def key(self, name: str) -> Optional[str]:
        """``section.name`` of a flat option name, or None."""
        for section in FLAT_SECTIONS:
            group = self._cfg.get(section)
            if isinstance(group, DictConfig) and name in group:
                return f"{section}.{name}"
        return None

    def __getattr__(self, name: str):
        key = self.key(name)
        if key is None:
            raise AttributeError(name)
        return OmegaConf.select(self._cfg, key)

    def __setattr__(self, name: str, value) -> None:
        key = self.key(name)
        if key is None:
            raise AttributeError(name)
        section, option = key.split(".")
        self._cfg[section][option] = value


def flags_as_keys(message: str, view: FlatView) -> str:
    """A check's message with each ``--flag`` it names written as its config key."""
    def as_key(match):
        return view.key(match.group(1).replace("-", "_")) or match.group(0)
    return re.sub(r"--([a-z][a-z0-9-]*)", as_key, message)


@contextlib.contextmanager
def named_as_keys(view: FlatView) -> Iterator[None]:
    """UserErrors raised inside name config keys instead of flags."""
    try:
        yield
    except UserError as error:
        raise UserError(flags_as_keys(str(error), view)) from None


def check(cfg: DictConfig) -> None:
    """train.py's checks of its options, on a composed config (no side effects)."""
    view = FlatView(cfg)
    with named_as_keys(view):
        launch.reject_conflicting_precision([flag for flag in launch.PRECISION_FLAGS
                                             if getattr(view, flag[2:].replace("-", "_"))])
        options.validate_args(view)


def prepare(cfg: DictConfig) -> Optional[str]:
    """The argparse form's steps after parsing, on a hydra config: checks, precision and torchrun
    fixes, the resume rule.  Returns the checkpoint this launch resumes, or None."""
    check(cfg)
    view = FlatView(cfg)
    with named_as_keys(view):
        # A config file may say distributed_world_size: 1 (fairseq's GLUE configs do); torchrun decides.
        launch.configure_precision(view, tpu_requested=bool(cfg.common.tpu))
        launch.configure_torchrun(view)
        return launch.resolve_restore_file(view)


def plain_config(cfg: DictConfig) -> DictConfig:
    """hydra's composed config as fairseq's training takes it: the task's, model's and other
    registered groups' defaults filled in, interpolations resolved, the keys fixed."""
    add_defaults(cfg)
    with omegaconf_no_object_check():
        cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=True, enum_to_str=True))
    OmegaConf.set_struct(cfg, True)
    return cfg


def register_schema(config_name: str) -> None:
    """fairseq's schema under the config's name (fairseq-hydra-train's matching), with train.py's nodes."""
    from hydra.core.config_store import ConfigStore

    hydra_init(config_name)
    store = ConfigStore.instance()
    store.store(name=config_name, node=options.TrainConfig)
    store.store(name="bitfit", node=options.BitFitConfig)


def _hydra_arguments(argv: Sequence[str]):
    """hydra's reading of the command line (its own parser), with its errors as one line."""
    from hydra._internal.utils import get_args_parser

    def refuse(message: str):
        raise UserError(f"{message} (hydra's options, such as -m, --config-dir and --config-name, go before "
                        "the key=value overrides)")

    parser = get_args_parser()
    parser.error = refuse
    return parser.parse_args(list(argv))


def _check_launcher(overrides) -> None:
    for override in overrides:
        if override.key_or_group == "hydra/launcher" and not override.is_sweep_override():
            name = str(override.value())
            module, package = LAUNCHER_PACKAGES.get(name, (None, None))
            if module and importlib.util.find_spec(module) is None:
                raise UserError(f"hydra/launcher={name}: the launcher plugin is not installed; "
                                f"pip install {package} (or the project's extra: pip install -e '.[sweep]')")


def _job_overrides(overrides) -> List[List[str]]:
    """Override lists that together use every value of every sweep once (first values elsewhere)."""
    def first(override) -> str:
        return f"{override.get_key_element()}={next(iter(override.sweep_string_iterator()))}"

    fixed = [o.input_line for o in overrides if not o.is_sweep_override()]
    sweeps = [o for o in overrides if o.is_sweep_override()]
    variants = [fixed + [first(o) for o in sweeps]]
    for index, sweep in enumerate(sweeps):
        for value in list(sweep.sweep_string_iterator())[1:]:
            others = [first(o) for o in sweeps[:index] + sweeps[index + 1:]]
            variants.append(fixed + others + [f"{sweep.get_key_element()}={value}"])
    return variants


def check_command_line(argv: Sequence[str]) -> None:
    """Compose every job's config before anything runs, so a bad key or value is one line naming
    it (hydra would print its own multi-line report, or fail inside a job of a sweep)."""
    from hydra import initialize, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    arguments = _hydra_arguments(argv)
    modes = [flag for flag, on in (("--multirun", arguments.multirun), ("--cfg", arguments.cfg),
                                   ("--info", arguments.info), ("--run", arguments.run)) if on]
    if len(modes) > 1:
        raise UserError(f"{' and '.join(modes)} exclude each other: give one")
    try:
        parsed = OverridesParser.create().parse_overrides(arguments.overrides)
    except HydraException as error:
        raise UserError(one_line(error)) from None
    _check_launcher(parsed)
    config_name = arguments.config_name or "config"
    if arguments.config_dir and not Path(arguments.config_dir).is_dir():
        raise UserError(f"--config-dir {arguments.config_dir}: no such folder")
    # fairseq's schema is stored under the config's name, so a missing file would compose silently.
    if arguments.config_dir and not (Path(arguments.config_dir) / f"{config_name}.yaml").is_file():
        raise UserError(f"--config-name {config_name}: no {config_name}.yaml in {arguments.config_dir}")
    if not arguments.config_dir and not arguments.config_path and config_name != "config":
        raise UserError(f"--config-name {config_name} needs --config-dir, the folder that holds {config_name}.yaml")
    user_overrides = list(parsed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # hydra's notices about the 1.1 semantics fairseq's configs need
        if arguments.config_dir:
            context = initialize_config_dir(config_dir=str(Path(arguments.config_dir).absolute()),
                                            version_base=HYDRA_VERSION_BASE)
        else:
            context = initialize(config_path=None, version_base=HYDRA_VERSION_BASE)
        with context:
            _compose_each(config_name, _job_overrides(user_overrides))


def _compose_each(config_name: str, jobs: List[List[str]]) -> None:
    from hydra import compose
    from hydra.errors import HydraException

    for job in jobs:
        try:
            cfg = compose(config_name=config_name, overrides=job)
        except (HydraException, OmegaConfBaseException) as error:
            raise UserError(_composition_error(error)) from None
        except yaml.YAMLError as error:
            raise UserError(_yaml_error(error)) from None
        try:
            check(plain_config(cfg))
        except InterpolationKeyError as error:
            raise UserError(options.criterion_lacks_option(error, cfg.task._name, cfg.criterion._name,
                                                           spelled=as_key_choice)) from None
        except OmegaConfBaseException as error:
            raise UserError(one_line(error)) from None


def as_key_choice(group: str, name: str) -> str:
    return f"{group}._name={name}"

def _composition_error(error: BaseException) -> str:
    """hydra's (often multi-line, nested) composition error as one line."""
    text = " ".join(line.strip() for line in str(error).splitlines() if line.strip())
    cause = error.__cause__
    if isinstance(cause, OmegaConfBaseException):
        text += ": " + one_line(cause)
    unknown = re.match(r"Could not override '([^']+)'", text)
    if unknown and isinstance(cause, OmegaConfBaseException):
        return f"{unknown.group(1)}: no such config key ({one_line(cause)})"
    for tail in (" Config search path:", " See https://", " Set the environment variable HYDRA_FULL_ERROR"):
        text = text.split(tail)[0]
    return text


def _yaml_error(error: "yaml.YAMLError") -> str:
    mark = getattr(error, "problem_mark", None)
    where = f"{mark.name}, line {mark.line + 1}" if mark is not None else "a config file"
    return f"{where}: not valid YAML: {getattr(error, 'problem', None) or one_line(error)}"


def _log_as_fairseq_train() -> None:
    """fairseq-train's log lines on stdout, as in the argparse form, instead of hydra's logging; and,
    as hydra's logging would, into the job's folder (train.log)."""
    from hydra.core.hydra_config import HydraConfig

    root = logging.getLogger()
    for handler in list(root.handlers):  # fairseq's reset_logging skips every other handler
        root.removeHandler(handler)
    reset_logging()
    if HydraConfig.initialized():
        handler = logging.FileHandler(Path(HydraConfig.get().runtime.output_dir) / "train.log")
        handler.setFormatter(root.handlers[0].formatter)
        root.addHandler(handler)


def _in_sweep_folder(cfg: DictConfig) -> None:
    """In a multirun, a relative save dir goes into the job's own sweep folder."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
        return
    save_dir = Path(cfg.checkpoint.save_dir)
    if not save_dir.is_absolute():
        cfg.checkpoint.save_dir = str(Path(HydraConfig.get().runtime.output_dir) / save_dir)


def _with_default_overrides(argv: Sequence[str], overrides: List[str]) -> List[str]:
    """argv with DEFAULT_HYDRA_OVERRIDES the user did not give, beside the user's ``overrides``
    (hydra's parser takes its overrides as one group)."""
    given = {override.split("=", 1)[0] for override in overrides}
    defaults = [f"{key}={value}" for key, value in DEFAULT_HYDRA_OVERRIDES.items() if key not in given]
    at = list(argv).index(overrides[0]) if overrides else len(argv)
    return [*argv[:at], *defaults, *argv[at:]]


def main(argv: Sequence[str], train: Callable[[DictConfig, Optional[str]], None]) -> None:
    """Run train.py's hydra form: ``train(cfg, resumed_from)`` for the run, or each job of a sweep."""
    import hydra

    arguments = _hydra_arguments(argv)
    config_name = arguments.config_name or "config"
    register_schema(config_name)
    check_command_line(argv)

    def job(cfg: DictConfig) -> float:
        _log_as_fairseq_train()
        cfg = plain_config(cfg)
        _in_sweep_folder(cfg)
        try:
            train(cfg, prepare(cfg))
        except UserError as error:  # hydra reports exceptions its own way, with exit status 1
            print(error_line(TRAIN_PROG, str(error)), file=sys.stderr, flush=True)
            raise SystemExit(2) from None
        try:  # a sweeper's objective, as fairseq-hydra-train returns it
            return metrics.get_smoothed_value("valid", cfg.checkpoint.best_checkpoint_metric)
        except KeyError:  # no validation ran
            return float("inf")

    from hydra.errors import HydraException

    saved_argv = sys.argv
    sys.argv = [TRAIN_PROG, *_with_default_overrides(argv, arguments.overrides)]
    # hydra then raises what it would print as a report (with exit status 1): errors stay one line.
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # hydra's notices about the 1.1 semantics fairseq's configs need
            hydra.main(config_path=None, config_name=config_name, version_base=HYDRA_VERSION_BASE)(job)()
    except (HydraException, OmegaConfBaseException) as error:
        raise UserError(_composition_error(error)) from None
    finally:
        sys.argv = saved_argv


def _registry_defaults(section: str, name: str) -> dict:
    from fairseq.criterions import CRITERION_DATACLASS_REGISTRY
    from fairseq.optim import OPTIMIZER_DATACLASS_REGISTRY
    from fairseq.optim.lr_scheduler import LR_SCHEDULER_DATACLASS_REGISTRY
    from fairseq.tasks import TASK_DATACLASS_REGISTRY

    registry = {"task": TASK_DATACLASS_REGISTRY, "criterion": CRITERION_DATACLASS_REGISTRY,
                "optimizer": OPTIMIZER_DATACLASS_REGISTRY, "lr_scheduler": LR_SCHEDULER_DATACLASS_REGISTRY}[section]
    return OmegaConf.to_container(OmegaConf.structured(registry[name]), resolve=False)


def _differences(values: dict, defaults: dict, cfg: dict) -> dict:
    """The keys set to other than their default; a default that names another key
    (``${optimization.max_update}``) is that key's value in ``cfg``."""
    def default_of(key):
        default = defaults[key]
        if isinstance(default, str) and default.startswith("${") and default.endswith("}"):
            section, _, name = default[2:-1].partition(".")
            return cfg.get(section, {}).get(name)
        return default

    return {key: value for key, value in values.items()
            if key != "_name" and key in defaults and value != default_of(key)}


def config_of_command(train_args: List[str]) -> Dict[str, dict]:
    """The hydra form's config (as a dict) of an argparse-form command line: what differs from the defaults."""
    args = options.parse_args(train_args)
    cfg = OmegaConf.to_container(options.to_config(args), resolve=True)
    defaults = OmegaConf.to_container(OmegaConf.structured(options.TrainConfig), resolve=False)
    out: Dict[str, dict] = {}
    for section in REGISTRY_SECTIONS:
        name = cfg[section]["_name"]
        out[section] = {"_name": name, **_differences(cfg[section], _registry_defaults(section, name), cfg)}
    out["model"] = {"_name": args.arch}
    for section in FLAT_SECTIONS:
        changed = _differences(cfg.get(section) or {}, defaults.get(section) or {}, cfg)
        if changed:
            out[section] = changed
    return out
