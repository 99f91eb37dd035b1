"""Reading fairseq checkpoints safely, and writing model-only ones.

fairseq calls ``torch.load`` without ``weights_only``; torch >= 2.6 defaults it to
True and rejects the few Python objects fairseq pickles: the legacy
``argparse.Namespace`` model config, and numpy scalars that metrics and ``best``
scores can carry.  Rather than turning the safety off for every file
(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1), ``fairseq_ext.plugin.patches`` allow-lists
exactly ``FAIRSEQ_CHECKPOINT_TYPES``, so loading a checkpoint still cannot run
arbitrary code.  ``--trust-checkpoint`` is the one way a CLI of this package turns
the safe loader off, for one file.
"""
import argparse
import os
import pickle
import zipfile
from typing import Dict, Optional

import numpy
import torch

from ..core.errors import UserError, one_line


def _numpy_scalar_types():
    # numpy 2 moved the scalar reconstructor to numpy._core; numpy 1 has numpy.core.
    core = getattr(numpy, "_core", None) or numpy.core
    dtypes = [type(numpy.dtype(name)) for name in ("float64", "float32", "float16", "int64", "int32", "bool")]
    return [core.multiarray.scalar, numpy.dtype, *dtypes]


FAIRSEQ_CHECKPOINT_TYPES = [argparse.Namespace, *_numpy_scalar_types()]


def check_checkpoint_container(path: str, what: str) -> None:
    """Refuse a file torch.load could only fail on with a traceback: a truncated download, a
    text file.  torch.save writes a zip archive (whole only with its closing directory);
    torch < 1.6 wrote a pickle, which starts with the protocol marker."""
    if zipfile.is_zipfile(path):
        return
    with open(path, "rb") as handle:
        start = handle.read(2)
    if len(start) == 2 and start[0] == 0x80 and 2 <= start[1] <= 5:
        return
    raise UserError(f"{what} {path}: not a whole PyTorch checkpoint (truncated or corrupt?)")


def check_loads_safely(path: str, what: str) -> None:
    """Refuse, in one line, a checkpoint torch's safe loader would stop on: not a whole PyTorch file, or
    holding Python objects outside the allow-list (which could run code when unpickled).  Its tensors are
    memory-mapped, not read, so checking even a large file costs little."""
    check_checkpoint_container(path, what)
    try:
        _load_mapped(path)
    except pickle.UnpicklingError:
        raise UserError(f"{what} {path}: holds Python objects outside the allow-list of fairseq checkpoint "
                        "types, which could run code when unpickled; train.py does not load it") from None
    except (RuntimeError, OSError, EOFError) as error:
        raise UserError(f"{what} {path}: cannot read the checkpoint (truncated or corrupt?): {one_line(error)}") from None


def add_trust_checkpoint_argument(parser, flag: str = "--base") -> None:
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help=f"unpickle {flag} without torch's weights_only safety (only for files you trust)")


def load_checkpoint_file(path, trust_checkpoint: bool = False, flag: str = "--base") -> dict:
    """A fairseq checkpoint, read with torch's weights_only loader (allow-list) unless trusted."""
    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as error:
        if trust_checkpoint:
            raise UserError(f"{flag} {path}: cannot read the checkpoint: {one_line(error)}") from None
        raise UserError(f"{flag} {path}: not a plain fairseq checkpoint, or it holds Python objects outside the "
                        f"allow-list ({one_line(error)}); pass --trust-checkpoint to unpickle it if you trust "
                        "the file") from None
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise UserError(f"{flag} {path}: cannot read the checkpoint (truncated or corrupt?): "
                        f"{one_line(error)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"{flag} {path}: not a fairseq checkpoint (no 'model' state dict)")
    return state


def _load_mapped(path):
    """torch.load with the safe loader, tensors memory-mapped (not read until used); its errors as they are."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files from torch < 1.6 cannot be memory-mapped
        return torch.load(path, map_location="cpu", weights_only=True)


def _mapped_checkpoint(path):
    """A checkpoint's contents with its tensors memory-mapped (not read until used)."""
    try:
        return _load_mapped(path)
    except (pickle.UnpicklingError, RuntimeError, OSError, EOFError) as error:
        raise UserError(f"{path}: cannot read the checkpoint: {one_line(error)}") from None


def checkpoint_parameter_count(path) -> int:
    """Elements of a checkpoint's model tensors, a tied (shared) tensor once, without reading them."""
    state = _mapped_checkpoint(path)
    model = state.get("model") if isinstance(state, dict) else None
    if not isinstance(model, dict):
        raise UserError(f"{path}: not a fairseq checkpoint (no 'model' state dict)")
    storages = {}
    for tensor in model.values():
        if torch.is_tensor(tensor) and tensor.is_floating_point():
            storages[(tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())] = tensor.numel()
    return sum(storages.values())


def read_checkpoint_model_config(path) -> Dict[str, object]:
    """The model config stored in a fairseq checkpoint, as a dict, without reading its tensors."""
    model_cfg = checkpoint_config(_mapped_checkpoint(path), "model")
    if model_cfg is None:
        raise UserError(f"{path}: no model config (cfg.model or args) in the checkpoint")
    return model_cfg


def checkpoint_config(state, group: str) -> Optional[Dict[str, object]]:
    """One config group (``model``, ``task``) of a loaded fairseq checkpoint, as a dict, or None.

    fairseq >= 0.10 keeps ``cfg.<group>`` (a dict, or an argparse.Namespace for legacy models);
    older checkpoints keep every option in one ``args`` Namespace.
    """
    cfg = state.get("cfg") if isinstance(state, dict) else None
    group_cfg = cfg.get(group) if isinstance(cfg, dict) else None
    if group_cfg is None and isinstance(state, dict):
        group_cfg = state.get("args")
    if isinstance(group_cfg, argparse.Namespace):
        group_cfg = vars(group_cfg)
    return group_cfg if isinstance(group_cfg, dict) else None


def model_only_checkpoint(cfg: dict, model_state: Dict[str, torch.Tensor], num_updates: int = 0,
                          extra_state: Optional[dict] = None) -> dict:
    """A fairseq checkpoint with a model and its config but no optimizer state.

    Like a pretrained model.pt it is a model file, not a resume point: ``--restore-file``,
    ``load_model_ensemble_and_task`` and train.py's resume check read it.
    """
    return {
        "args": None,
        "cfg": cfg,
        "model": model_state,
        "criterion": None,
        # fairseq's checkpoint upgrade reads optimizer_history[-1]; no optimizer state is stored.
        "optimizer_history": [{"criterion_name": "none", "optimizer_name": "none",
                               "lr_scheduler_state": {"best": None}, "num_updates": num_updates}],
        "task_state": {},
        "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0}, **(extra_state or {})},
        "last_optimizer_state": None,
    }


def checked_path_option(path_option: Optional[str], purpose: str) -> str:
    """fairseq's --path (checkpoints joined by ':'), each a whole checkpoint file; ``purpose``: what it is
    for, in the one-line error when it is missing."""
    from fairseq import utils  # by then fairseq is imported (the plugin's quiet import)

    if path_option is None:
        raise UserError(f"--path: required: {purpose}")
    for path in utils.split_paths(path_option):
        if not os.path.isfile(path):
            raise UserError(f"--path {path}: no such file")
        check_checkpoint_container(path, "--path")
    return path_option
