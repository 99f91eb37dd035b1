"""The BitFit delta beside every checkpoint a BitFit run saves (BitFitTrainer.save_checkpoint).

With ``--bitfit``, train.py writes ``NAME.delta.safetensors`` next to every checkpoint
``NAME.pt`` (checkpoint_best.pt -> checkpoint_best.delta.safetensors): the trained
tensors and the task heads, with the run's selection, task, model, dictionary and
base fingerprint in the header (the format: ``fairseq_ext.core.delta_file``).
"""
import argparse
import logging
import os
import shutil
from typing import Dict, Mapping, Optional

import torch
from omegaconf import OmegaConf

from ..core import controls
from ..core.bitfit import CLASSIFICATION_HEADS
from ..core.delta_file import (MASKED_INDICES, MASKED_VALUES, Delta, delta_path_for, dictionary_identity,
                               frozen_base_tensors, tensors_fingerprint)
from ..core.errors import UserError
from ..core.files import write_atomically
from ..plugin import patches
from ..plugin.task_families import ENCODER_DECODER_KINDS, LANGUAGE_MODEL, check_trainable, task_config

logger = logging.getLogger(__name__)


class CheckpointDeltaWriter:
    """Writes the delta next to every checkpoint a BitFit run saves (BitFitTrainer.save_checkpoint).

    fairseq writes one checkpoint per save and copies it to the other names due
    (checkpoint_best.pt -> checkpoint_last.pt); ``copy_checkpoint`` makes those copies
    carry the delta along (``patches.route_checkpoint_copies``).  With
    ``--bitfit-delta-only`` the only full checkpoint is checkpoint_last.pt, which
    resuming needs; every other name gets its delta alone.

    Constructing it checks that the run's task and model can give a usable delta
    (``task_families.check_trainable``): one line and exit status 2, not a traceback at the
    first save.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.kind = check_run(trainer.cfg, trainer.task, trainer._model)
        self.delta_only = bool(trainer.cfg.bitfit.get("bitfit_delta_only", False))
        self._run_sections: Optional[dict] = None  # what stays the same for the whole run
        # Checkpoints saved as a delta only (abspath) -> the full resume file written at that save, or None.
        self._delta_only_saves: Dict[str, Optional[str]] = {}
        self._mask_indices: Dict[str, torch.Tensor] = {}  # a control's flat indices per weight, made once
        patches.route_checkpoint_copies(self.copy_checkpoint)

    def save(self, filename, extra_state, save_full):
        """Save ``filename`` (fairseq's ``Trainer.save_checkpoint`` is ``save_full``) and its delta."""
        trainer = self.trainer
        if not trainer.should_save_checkpoint_on_current_rank:
            return save_full(filename, extra_state)
        delta = self.current_delta(extra_state)
        delta_path = delta_path_for(filename)
        _remove_if_present(delta_path)  # never leave an old delta beside a new checkpoint
        resume_file = os.path.join(os.path.dirname(filename), f"checkpoint_last{trainer.checkpoint_suffix}.pt")
        if not self.delta_only or _same_path(filename, resume_file):
            saved = save_full(filename, extra_state)
        else:
            _remove_if_present(filename, reason="stale: this run writes deltas only")
            full = None
            if not trainer.cfg.checkpoint.no_last_checkpoints:
                # fairseq writes checkpoint_last at every save; only its full state is kept.
                full = os.path.abspath(save_full(resume_file, extra_state) or resume_file)
            self._delta_only_saves[os.path.abspath(filename)] = full
            saved = os.path.abspath(delta_path)
        delta.save(delta_path)
        logger.info(f"BitFit delta: {delta_path} ({os.path.getsize(delta_path):,} bytes)")
        return saved

    def current_delta(self, extra_state) -> Delta:
        model = self.trainer._model  # unwrapped: names without DDP prefixes
        state = model.state_dict()
        if self._run_sections is None:
            self._run_sections = self._describe_run(model, state)
        names = self._run_sections["names"]
        iterator = extra_state.get("train_iterator") or {}
        score = extra_state.get("val_loss")  # fairseq's name for the --best-checkpoint-metric value
        epoch = iterator.get("epoch")
        if epoch is not None and not iterator.get("iterations_in_epoch"):
            epoch -= 1  # fairseq's iterator state points at the next epoch once one ends
        progress = {"num_updates": self.trainer.get_num_updates(), "epoch": epoch,
                    "valid_metric": self.trainer.cfg.checkpoint.best_checkpoint_metric,
                    "valid_score": None if score is None else float(score)}
        masks = self.trainer.bitfit_selection.masks  # a random-subset control: only the masked entries
        tensors = {}
        for name in names:
            if name in masks:
                indices = self._mask_indices.setdefault(name, controls.mask_indices(masks[name]))
                tensors[name + MASKED_INDICES] = indices
                tensors[name + MASKED_VALUES] = controls.masked_values(state[name].cpu(), indices)
            else:
                tensors[name] = state[name].detach().cpu().clone()
        return Delta(tensors=tensors, progress=progress, **self._run_sections["sections"])

    def copy_checkpoint(self, src_path: str, dst_path: str, overwrite: bool, copy_file) -> bool:
        """fairseq's copy of a saved checkpoint to another name (``copy_file``), its delta included."""
        src_delta = delta_path_for(src_path)
        if not os.path.isfile(src_delta):
            return copy_file(src_path, dst_path, overwrite)
        _remove_if_present(delta_path_for(dst_path))
        source = os.path.abspath(src_path)
        if source in self._delta_only_saves:
            if os.path.abspath(dst_path) != self._delta_only_saves[source]:
                _remove_if_present(dst_path, reason="stale: this run writes deltas only")
            copied = True
        else:
            copied = copy_file(src_path, dst_path, overwrite)
        write_atomically(delta_path_for(dst_path), lambda tmp: shutil.copyfile(src_delta, tmp))
        return copied

    def _describe_run(self, model, state) -> dict:
        trainer = self.trainer
        trained = [name for name, p in model.named_parameters() if p.requires_grad]
        trained_set = set(trained)
        names = [name for name in state if name in trained_set or name.startswith(CLASSIFICATION_HEADS)]
        frozen = frozen_base_tensors(state, names)
        selection = trainer.bitfit_selection
        cfg = trainer.cfg
        plain_cfg = (OmegaConf.to_container(cfg, resolve=True, enum_to_str=True) if OmegaConf.is_config(cfg)
                     else dict(cfg))
        model_cfg = cfg.model
        namespace = isinstance(model_cfg, argparse.Namespace)
        model_args = vars(model_cfg) if namespace else OmegaConf.to_container(model_cfg, resolve=True, enum_to_str=True)
        sections = {
            "selection": {"terms": selection.terms, "train_heads": selection.train_heads, "trained": trained,
                          "unused": list(selection.unused), "delta_only": self.delta_only,
                          **({"tuner": selection.tuner} if selection.tuner else {})},
            "task": _task_section(trainer.task, self.kind),
            "model": {"arch": model_args.get("arch") or model_args.get("_name"), "args": model_args,
                      "namespace": namespace},
            "dictionary": _dictionary_section(trainer.task, self.kind),
            "base": {"fingerprint": tensors_fingerprint(frozen), "dtype": _dtype_name(frozen),
                     "tensors": len(frozen), "parameters": _distinct_numel(frozen.values())},
            "training_cfg": {key: value for key, value in plain_cfg.items() if key not in ("model", "task")},
        }
        return {"names": names, "sections": sections}


def check_run(cfg, task, model) -> str:
    """The delta kind of a BitFit run (``task_families``); UserError for a task or arch that cannot give one.

    BitFitTrainer calls it before the selection probe runs a loss, so such a run stops before anything
    trains; the writer calls it again at the first save."""
    arch = getattr(cfg.model, "arch", None) or getattr(cfg.model, "_name", None) or "?"
    task_name = getattr(cfg.task, "_name", None) or getattr(cfg.task, "task", None) or "?"
    return check_trainable(task, model, task_name, arch)


def _dictionary_section(task, kind: str) -> dict:
    """The source dictionary's identity; under "target" the target dictionary's, for an encoder-decoder run
    and for a language model whose output dictionary is not its input one (--output-dictionary-size)."""
    section = dictionary_identity(task.source_dictionary)
    target = task.target_dictionary
    if kind in ENCODER_DECODER_KINDS or (kind == LANGUAGE_MODEL and target is not None
                                         and target is not task.source_dictionary):
        section["target"] = dictionary_identity(target)
    return section


def _task_section(task, kind: str) -> dict:
    # The task's own config: setup_task resolved it (the glue task fills in --num-classes, --init-token...);
    # the run's cfg.task keeps the command line's values.  Legacy tasks keep theirs in task.args.
    task_cfg = task_config(task)
    labels = getattr(task, "label_dictionary", None)
    num_classes = task_cfg.get("num_classes")
    label_symbols = None
    if labels is not None and not task_cfg.get("regression_target") and isinstance(num_classes, int):
        # sentence_prediction's class i is label symbol nspecial + i.
        label_symbols = list(labels.symbols[labels.nspecial:labels.nspecial + num_classes])
    truncate_to = task.max_positions() if hasattr(task, "max_positions") else None
    return {"cfg": task_cfg, "kind": kind,
            "label_symbols": label_symbols, "truncate_to": truncate_to if isinstance(truncate_to, int) else None}


def _distinct_numel(tensors) -> int:
    """Elements of distinct tensors: a tied weight (RoBERTa's LM head) appears twice in a state dict."""
    seen = {}
    for tensor in tensors:
        seen[(tensor.data_ptr(), tensor.numel())] = tensor.numel()
    return sum(seen.values())


def _dtype_name(tensors: Mapping[str, torch.Tensor]) -> str:
    floating = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(floating) > 1:
        raise UserError(f"BitFit delta: frozen tensors in several dtypes ({sorted(map(str, floating))})")
    return str(floating.pop() if floating else torch.float32)[len("torch."):]


def _remove_if_present(path, reason: Optional[str] = None) -> None:
    if os.path.lexists(path):
        if reason:
            logger.info(f"removing {path} ({reason})")
        os.remove(path)


def _same_path(a, b) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)
