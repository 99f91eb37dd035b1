"""BitFit deltas: the tensors a BitFit run trained, in a small safetensors file.

A BitFit run changes only bias terms and the task head (about 0.1% of RoBERTa's
parameters), yet every fairseq checkpoint holds the whole model.  With
``--bitfit``, train.py also writes ``NAME.delta.safetensors`` next to every
checkpoint ``NAME.pt`` it saves (checkpoint_best.pt -> checkpoint_best.delta.safetensors):

* tensors: every trained tensor (``requires_grad``) and the task heads
  (``classification_heads.*``: the pretrained base has none, so they travel in
  the delta even when ``--bitfit-freeze-heads`` leaves them frozen), in the
  training model's dtype (bf16/fp16 runs: half the bytes; fairseq's full
  checkpoint holds the same values upcast to float32);
* header metadata, one JSON string per section (``Delta`` lists them): the
  selection, the task config and its label symbols, the model config, the
  dictionary's identity, the training progress, the run's other config groups,
  a checksum of the delta's tensors and the fingerprint of the frozen base.

The base fingerprint is sha256 over the name, dtype, shape and bytes of every
frozen tensor of the model's state dict (heads and delta tensors excluded), in
name order, in the dtype the training model holds them: float32, or
float16/bfloat16 under --fp16/--bf16 (fairseq converts the model before it
loads the base; the dtype is recorded and the base is cast to it before
comparing).  It is computed at the run's first save; frozen tensors never
change (they have no gradient and are not in the optimizer).

    python -m fairseq_ext.delta info D.delta.safetensors
    python -m fairseq_ext.delta apply --base BASE.pt --delta D.delta.safetensors --out MERGED.pt

``apply`` rebuilds the model from the delta's config, loads BASE into it as
fairseq's --restore-file does (rounded to the training dtype, if not float32),
checks the fingerprint, copies the delta in and writes a normal fairseq
checkpoint: tensor for tensor the run's full one (float32, as fairseq saves).
Deltas are read without pickle (safetensors); checkpoints with torch's
weights_only loader and fairseq_ext's allow-list, unless --trust-checkpoint.
"""
from __future__ import annotations

import argparse
import enum
import hashlib
import json
import logging
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Mapping, Optional

import torch

from . import bitfit
from .atomic_write import check_output_file, write_atomically
from .checkpoint_safety import add_trust_checkpoint_argument
from .errors import UserError, exit_on_user_error, quiet_cli_logging

logger = logging.getLogger(__name__)

FORMAT = "fairseq-bitfit-delta"
FORMAT_VERSION = 1
DELTA_SUFFIX = ".delta.safetensors"
HEAD_PREFIX = "classification_heads."
# Model options that must agree for two deltas to share one base model (predict.py).
SHARED_MODEL_OPTIONS = ("arch", "encoder_layers", "encoder_embed_dim", "encoder_attention_heads",
                        "encoder_ffn_embed_dim", "max_positions", "type_vocab_size", "layer_norm_eps",
                        "activation_fn", "encoder_normalize_before", "layernorm_embedding",
                        "untie_weights_roberta", "pooling", "pooler_activation_fn",
                        "spectral_norm_classification_head")


def delta_path_for(checkpoint_path) -> str:
    """checkpoint_best.pt -> checkpoint_best.delta.safetensors (same folder)."""
    path = str(checkpoint_path)
    return (path[:-3] if path.endswith(".pt") else path) + DELTA_SUFFIX


# --------------------------------------------------------------------------- fingerprints


def tensors_fingerprint(tensors: Mapping[str, torch.Tensor]) -> str:
    """sha256 over the name, dtype, shape and bytes of each tensor, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach()
        digest.update(f"{name}\0{str(tensor.dtype)[6:]}\0{list(tensor.shape)}\n".encode())
        # A byte view works for every dtype (numpy has no bfloat16).
        digest.update(tensor.cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return "sha256:" + digest.hexdigest()


def frozen_base_tensors(state: Mapping[str, torch.Tensor], delta_names: Iterable[str]) -> Dict[str, torch.Tensor]:
    """What the base fingerprint covers: the state dict minus the heads and the delta's tensors."""
    delta_names = set(delta_names)
    return {name: tensor for name, tensor in state.items()
            if name not in delta_names and not name.startswith(HEAD_PREFIX)}


def dictionary_identity(dictionary) -> dict:
    """Size, special indices and a hash of the symbols of a fairseq Dictionary."""
    symbols = json.dumps(list(dictionary.symbols), ensure_ascii=False).encode()
    return {"size": len(dictionary), "bos": dictionary.bos(), "pad": dictionary.pad(), "eos": dictionary.eos(),
            "unk": dictionary.unk(), "sha256": hashlib.sha256(symbols).hexdigest()}


# --------------------------------------------------------------------------- the file


@dataclass
class Delta:
    """A delta file: its tensors and its metadata sections (each a JSON object in the header)."""

    tensors: Dict[str, torch.Tensor]
    selection: dict  # {"terms", "train_heads", "trained": [names], "unused": [names], "delta_only"}
    task: dict  # {"cfg": fairseq task config, "label_symbols": class names or None, "truncate_to": tokens}
    model: dict  # {"arch", "args": the model config, "namespace": whether fairseq keeps it as a Namespace}
    dictionary: dict  # dictionary_identity() of the task's source dictionary
    base: dict  # {"fingerprint", "dtype", "tensors", "parameters"} of the frozen base tensors
    progress: dict  # {"num_updates", "epoch", "valid_metric", "valid_score"} when the checkpoint was saved
    training_cfg: dict  # the run's other fairseq config groups (common, optimization, ...)
    path: str = field(default="", compare=False)

    SECTIONS = ("selection", "task", "model", "dictionary", "base", "progress", "training_cfg")

    # -- what the predictor and apply read --
    @property
    def task_cfg(self) -> dict:
        return self.task["cfg"]

    @property
    def task_name(self) -> str:
        return self.task_cfg.get("_name") or "?"

    @property
    def glue_task(self) -> Optional[str]:
        return self.task_cfg.get("glue_task")

    @property
    def head_name(self) -> Optional[str]:
        return self.task_cfg.get("classification_head_name")

    @property
    def regression(self) -> bool:
        return bool(self.task_cfg.get("regression_target", False))

    @property
    def label_symbols(self) -> Optional[List[str]]:
        return self.task.get("label_symbols")

    @property
    def arch(self) -> str:
        return self.model["arch"]

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.base["dtype"])

    def head_names(self) -> List[str]:
        return sorted({name[len(HEAD_PREFIX):].split(".")[0] for name in self.tensors if name.startswith(HEAD_PREFIX)})

    def head_tensors(self, head: str) -> Dict[str, torch.Tensor]:
        """The tensors of one head, named relative to the head (``dense.weight``...)."""
        prefix = f"{HEAD_PREFIX}{head}."
        return {name[len(prefix):]: tensor for name, tensor in self.tensors.items() if name.startswith(prefix)}

    def body_tensors(self) -> Dict[str, torch.Tensor]:
        return {name: tensor for name, tensor in self.tensors.items() if not name.startswith(HEAD_PREFIX)}

    # -- storage --
    def metadata(self) -> Dict[str, str]:
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                    "tensors_sha256": tensors_fingerprint(self.tensors)}
        for section in self.SECTIONS:
            metadata[section] = json.dumps(getattr(self, section), default=_plain_json, sort_keys=True)
        return metadata

    def save(self, path) -> None:
        """Write atomically: a reader never sees a half-written delta."""
        from safetensors.torch import save_file

        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in self.tensors.items()}
        write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=self.metadata()))


# What readers of a delta look up in its header (CheckpointDeltaWriter writes them all).
REQUIRED_KEYS = {
    "selection": ("terms", "train_heads", "trained"),
    "task": ("cfg",),
    "model": ("arch", "args", "namespace"),
    "dictionary": ("sha256", "size"),
    "base": ("fingerprint", "dtype", "tensors", "parameters"),
}


def read_delta(path) -> Delta:
    """Read and check a delta file (no pickle involved); UserError on anything wrong."""
    from safetensors import SafetensorError, safe_open

    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such delta file")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                        f"{_one_line(error)}") from None
    if metadata.get("format") != FORMAT:
        raise UserError(f"{path}: a safetensors file, but not a BitFit delta (no '{FORMAT}' metadata)")
    if metadata.get("format_version") != str(FORMAT_VERSION):
        raise UserError(f"{path}: delta format version {metadata.get('format_version')!r}; "
                        f"this fairseq_ext reads version {FORMAT_VERSION}")
    sections = {}
    for section in Delta.SECTIONS:
        try:
            sections[section] = json.loads(metadata[section])
        except (KeyError, ValueError):
            raise UserError(f"{path}: corrupt delta: header section {section!r} is missing or not JSON") from None
        if not isinstance(sections[section], dict):
            raise UserError(f"{path}: corrupt delta: header section {section!r} is not a JSON object")
        missing_keys = [key for key in REQUIRED_KEYS.get(section, ()) if key not in sections[section]]
        if missing_keys:
            raise UserError(f"{path}: corrupt delta: header section {section!r} has no {missing_keys[0]!r}")
    if not isinstance(getattr(torch, str(sections["base"]["dtype"]), None), torch.dtype):
        raise UserError(f"{path}: corrupt delta: base dtype {sections['base']['dtype']!r} is not a torch dtype")
    if metadata.get("tensors_sha256") != tensors_fingerprint(tensors):
        raise UserError(f"{path}: corrupt delta: its tensors do not match the checksum in its header")
    delta = Delta(tensors=tensors, path=path, **sections)
    missing = sorted(set(delta.selection.get("trained", ())) - set(tensors))
    if missing:
        raise UserError(f"{path}: corrupt delta: the header lists trained tensors it does not hold: {missing[0]}")
    return delta


# --------------------------------------------------------------------------- training: one delta per checkpoint


class CheckpointDeltaWriter:
    """Writes the delta next to every checkpoint a BitFit run saves (BitFitTrainer.save_checkpoint).

    fairseq writes one checkpoint per save and copies it to the other names due
    (checkpoint_best.pt -> checkpoint_last.pt); ``_follow_checkpoint_copies`` makes
    those copies carry the delta along.  With ``--bitfit-delta-only`` the only full
    checkpoint is checkpoint_last.pt, which resuming needs; every other name gets
    its delta alone.
    """

    def __init__(self, trainer):
        self.trainer = trainer
        self.delta_only = bool(trainer.cfg.bitfit.get("bitfit_delta_only", False))
        self._run_sections: Optional[dict] = None  # what stays the same for the whole run
        _follow_checkpoint_copies()

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
            _DELTA_ONLY_SAVES[os.path.abspath(filename)] = full
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
        return Delta(tensors={name: state[name].detach().cpu().clone() for name in names},
                     progress=progress, **self._run_sections["sections"])

    def _describe_run(self, model, state) -> dict:
        from omegaconf import OmegaConf

        trainer = self.trainer
        trained = [name for name, p in model.named_parameters() if p.requires_grad]
        trained_set = set(trained)
        names = [name for name in state if name in trained_set or name.startswith(HEAD_PREFIX)]
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
                          "unused": list(selection.unused), "delta_only": self.delta_only},
            "task": _task_section(trainer.task),
            "model": {"arch": model_args.get("arch") or model_args.get("_name"), "args": model_args,
                      "namespace": namespace},
            "dictionary": dictionary_identity(trainer.task.source_dictionary),
            "base": {"fingerprint": tensors_fingerprint(frozen), "dtype": _dtype_name(frozen),
                     "tensors": len(frozen), "parameters": _distinct_numel(frozen.values())},
            "training_cfg": {key: value for key, value in plain_cfg.items() if key not in ("model", "task")},
        }
        return {"names": names, "sections": sections}


def _task_section(task) -> dict:
    from omegaconf import OmegaConf

    # The task's own config: setup_task resolved it (the glue task fills in --num-classes, --init-token...);
    # the run's cfg.task keeps the command line's values.
    task_cfg = task.cfg
    task_cfg = OmegaConf.to_container(task_cfg, resolve=True, enum_to_str=True) if OmegaConf.is_config(task_cfg) \
        else dict(vars(task_cfg) if isinstance(task_cfg, argparse.Namespace) else task_cfg)
    labels = getattr(task, "label_dictionary", None)
    num_classes = task_cfg.get("num_classes")
    label_symbols = None
    if labels is not None and not task_cfg.get("regression_target") and isinstance(num_classes, int):
        # sentence_prediction's class i is label symbol nspecial + i.
        label_symbols = list(labels.symbols[labels.nspecial:labels.nspecial + num_classes])
    truncate_to = task.max_positions() if hasattr(task, "max_positions") else None
    return {"cfg": task_cfg, "label_symbols": label_symbols,
            "truncate_to": truncate_to if isinstance(truncate_to, int) else None}


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


# fairseq's PathManager.copy, in checkpoint_utils, made to copy the delta along. Keys: checkpoints
# saved as a delta only (abspath); values: the full resume file written at that save, or None.
_DELTA_ONLY_SAVES: Dict[str, Optional[str]] = {}


def _follow_checkpoint_copies() -> None:
    """fairseq saves a checkpoint once and copies it to the other due names; copy its delta too."""
    from fairseq import checkpoint_utils

    fairseq_path_manager = checkpoint_utils.PathManager
    if getattr(fairseq_path_manager, "copies_bitfit_deltas", False):
        return

    class DeltaFollowingPathManager(fairseq_path_manager):
        copies_bitfit_deltas = True

        @staticmethod
        def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
            src_delta = delta_path_for(src_path)
            if not os.path.isfile(src_delta):
                return fairseq_path_manager.copy(src_path, dst_path, overwrite)
            _remove_if_present(delta_path_for(dst_path))
            source = os.path.abspath(src_path)
            if source in _DELTA_ONLY_SAVES:
                destination = os.path.abspath(dst_path)
                if destination != _DELTA_ONLY_SAVES[source]:
                    _remove_if_present(dst_path, reason="stale: this run writes deltas only")
                copied = True
            else:
                copied = fairseq_path_manager.copy(src_path, dst_path, overwrite)
            write_atomically(delta_path_for(dst_path), lambda tmp: shutil.copyfile(src_delta, tmp))
            return copied

    checkpoint_utils.PathManager = DeltaFollowingPathManager


# --------------------------------------------------------------------------- rebuilding a model


def load_checkpoint_file(path, trust_checkpoint: bool = False, flag: str = "--base") -> dict:
    """A fairseq checkpoint, read with torch's weights_only loader (allow-list) unless trusted."""
    from . import checkpoint_safety  # noqa: F401  (allow-lists the types fairseq checkpoints hold)

    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"{flag} {path}: no such file")
    try:
        state = torch.load(path, map_location="cpu", weights_only=not trust_checkpoint)
    except pickle.UnpicklingError as error:
        if trust_checkpoint:
            raise UserError(f"{flag} {path}: cannot read the checkpoint: {_one_line(error)}") from None
        raise UserError(f"{flag} {path}: not a plain fairseq checkpoint, or it holds Python objects outside the "
                        f"allow-list ({_one_line(error)}); pass --trust-checkpoint to unpickle it if you trust "
                        "the file") from None
    except (RuntimeError, OSError, EOFError, ValueError) as error:
        raise UserError(f"{flag} {path}: cannot read the checkpoint (truncated or corrupt?): "
                        f"{_one_line(error)}") from None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        raise UserError(f"{flag} {path}: not a fairseq checkpoint (no 'model' state dict)")
    return state


def placeholder_dictionary(identity: dict):
    """A Dictionary with the recorded size and special indices: all a model's construction reads."""
    from fairseq.data import Dictionary

    dictionary = Dictionary()
    specials = (dictionary.bos(), dictionary.pad(), dictionary.eos(), dictionary.unk())
    if specials != tuple(identity[key] for key in ("bos", "pad", "eos", "unk")):
        raise UserError(f"the delta's dictionary has non-standard special tokens {identity}; "
                        "it cannot be rebuilt without its dict.txt")
    for index in range(len(dictionary), identity["size"]):
        dictionary.add_symbol(f"<placeholder{index}>")
    return dictionary


def model_args(delta: Delta) -> argparse.Namespace:
    return argparse.Namespace(**{**delta.model["args"], "arch": delta.arch})


def build_model(delta: Delta, dictionary=None):
    """The delta's fairseq model (no heads), built from its config; weights are random until loaded."""
    from fairseq.models import ARCH_MODEL_REGISTRY

    from . import models  # noqa: F401  (registers the bert model and archs)
    from .convert_hf import build_fairseq_model

    if delta.arch not in ARCH_MODEL_REGISTRY:
        raise UserError(f"{delta.path}: unknown model arch {delta.arch!r} (a fairseq plugin missing?)")
    if dictionary is None:
        dictionary = placeholder_dictionary(delta.dictionary)
    model = build_fairseq_model(vars(model_args(delta)), dictionary)
    if not hasattr(model, "register_classification_head"):
        raise UserError(f"{delta.path}: arch {delta.arch!r} has no classification heads; deltas can be applied "
                        "to sentence-prediction encoders (BERT, RoBERTa)")
    return model.eval()


def register_head(model, name: str, head_tensors: Mapping[str, torch.Tensor]) -> None:
    """Register a classification head shaped like ``head_tensors`` (dense/out_proj)."""
    try:
        num_classes = head_tensors["out_proj.weight"].shape[0]
        inner_dim = head_tensors["dense.weight"].shape[0]
    except KeyError as missing:
        raise UserError(f"head {name!r}: the delta lacks its {missing.args[0]}") from None
    model.register_classification_head(name, num_classes=num_classes, inner_dim=inner_dim)


def load_base(model, base_state: dict, delta: Delta, source: str) -> None:
    """Load the base weights the way fairseq's --restore-file does (with its checkpoint upgrades)."""
    try:
        incompatible = model.load_state_dict(base_state, strict=False, model_cfg=model_args(delta))
    except RuntimeError as error:  # shapes differ
        detail = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), _one_line(error))
        raise UserError(f"{source}: does not fit the delta's model (arch {delta.arch}): {detail}") from None
    problems = [f"missing {name}" for name in incompatible.missing_keys]
    problems += [f"unexpected {name}" for name in incompatible.unexpected_keys]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{source}: does not fit the delta's model (arch {delta.arch}): {problems[0]}{more}")


def check_base_fingerprint(state: Mapping[str, torch.Tensor], delta: Delta, source: str, force: bool = False,
                           force_flag: Optional[str] = "--force") -> None:
    """Refuse a base other than the one the delta was trained from (``force``: warn only)."""
    frozen = frozen_base_tensors(state, delta.tensors)
    # In the training dtype: lossless for a model already rounded to it (fp32 upcasts of bf16 values).
    found = tensors_fingerprint({name: t.to(delta.dtype) if t.is_floating_point() else t for name, t in frozen.items()})
    expected = delta.base["fingerprint"]
    if found == expected:
        return
    message = (f"{source} is not the base {delta.path} was trained from: its frozen weights' fingerprint "
               f"{found[:19]}... differs from the delta's {expected[:19]}...")
    if not force:
        raise UserError(message + (f"; pass {force_flag} to merge anyway" if force_flag else ""))
    logger.warning(message + " (--force: merging anyway)")


def check_delta_fits(model, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Every delta tensor must name a parameter of the model with the same shape and dtype."""
    parameters = dict(model.named_parameters())
    for name, tensor in tensors.items():
        target = parameters.get(name)
        if target is None:
            raise UserError(f"{source}: the model has no parameter {name}")
        if target.shape != tensor.shape or target.dtype != tensor.dtype:
            raise UserError(f"{source}: {name} is {tensor.dtype} {tuple(tensor.shape)} in the delta, "
                            f"{target.dtype} {tuple(target.shape)} in the model")


def copy_delta_into(model, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy delta tensors into the model's parameters, in place."""
    check_delta_fits(model, tensors, source)
    bitfit.load_trainable_state_dict(model, dict(tensors))


# --------------------------------------------------------------------------- apply


def apply_delta(base_path, delta_path, out_path, force: bool = False, trust_checkpoint: bool = False) -> Path:
    """Write base + delta as a normal fairseq checkpoint at ``out_path``; returns it."""
    out_path = Path(out_path)
    for flag, other in (("--base", base_path), ("--delta", delta_path)):
        if out_path.exists() and out_path.resolve() == Path(other).resolve():
            raise UserError(f"--out {out_path} is the {flag} file; write the merged checkpoint elsewhere")
    check_output_file(out_path, "--out")
    delta = read_delta(delta_path)
    base = load_checkpoint_file(base_path, trust_checkpoint)
    model = build_model(delta)
    for head in delta.head_names():
        register_head(model, head, delta.head_tensors(head))
    load_base(model, base["model"], delta, f"--base {base_path}")
    del base
    model.to(delta.dtype)  # what fairseq's --fp16/--bf16 did to the training model before loading the base
    check_base_fingerprint(model.state_dict(), delta, f"--base {base_path}", force)
    copy_delta_into(model, delta.tensors, f"--delta {delta_path}")
    checkpoint = merged_checkpoint(delta, model.state_dict())
    write_atomically(out_path, lambda tmp: torch.save(checkpoint, tmp))
    return out_path


def merged_checkpoint(delta: Delta, model_state: Dict[str, torch.Tensor]) -> dict:
    """A fairseq checkpoint holding the run's config and ``model_state``, without optimizer state.

    Like a converted pretrained model.pt it is a model file, not a resume point.
    """
    from fairseq import utils

    cfg = dict(delta.training_cfg)
    cfg["task"] = delta.task_cfg
    cfg["model"] = model_args(delta) if delta.model["namespace"] else dict(delta.model["args"])
    return {
        "args": None,
        "cfg": cfg,
        "model": utils.move_to_cpu(model_state),  # fp16/bf16 become float32, as fairseq saves checkpoints
        "criterion": None,
        # fairseq's checkpoint upgrade reads optimizer_history[-1]; no optimizer state is stored.
        "optimizer_history": [{"criterion_name": "none", "optimizer_name": "none",
                               "lr_scheduler_state": {"best": None},
                               "num_updates": int(delta.progress.get("num_updates") or 0)}],
        "task_state": {},
        "extra_state": {"train_iterator": {"epoch": 1, "iterations_in_epoch": 0}, "bitfit_delta": delta.progress},
        "last_optimizer_state": None,
    }


# --------------------------------------------------------------------------- info


def describe(delta: Delta) -> str:
    """A human-readable summary: sizes, selection, task, model, base and progress."""
    file_bytes = os.path.getsize(delta.path) if delta.path else 0
    tensor_bytes = sum(t.numel() * t.element_size() for t in delta.tensors.values())
    per_role: Dict[str, List[int]] = {}
    for name, tensor in delta.tensors.items():
        counts = per_role.setdefault(bitfit.role_of(name), [0, 0])
        counts[0] += 1
        counts[1] += tensor.numel()
    selection, task, base = delta.selection, delta.task_cfg, delta.base
    total = base["parameters"] + sum(t.numel() for t in delta.tensors.values())
    lines = [
        f"{delta.path}: BitFit delta (format {FORMAT_VERSION}), {file_bytes:,} bytes",
        f"tensors: {len(delta.tensors)}, {sum(c[1] for c in per_role.values()):,} params, {tensor_bytes:,} bytes "
        f"({100.0 * sum(c[1] for c in per_role.values()) / max(total, 1):.4f}% of the model's {total:,} values), "
        f"dtype {base['dtype']}",
    ]
    order = list(bitfit.PAPER_TERMS) + ["other", "head"]
    for role in sorted(per_role, key=order.index):
        lines.append(f"  {role:<7} {per_role[role][0]:>4} tensors {per_role[role][1]:>12,} params")
    lines += [
        f"selection: --bitfit-terms {selection['terms']}, heads {'trained' if selection['train_heads'] else 'frozen'}"
        + (", delta-only run" if selection.get("delta_only") else ""),
        f"task: {delta.task_name}" + (f" (GLUE {delta.glue_task})" if delta.glue_task else "")
        + f", head {delta.head_name!r}, "
        + ("regression" if delta.regression else f"{task.get('num_classes')} classes {delta.label_symbols}")
        + f", init token {task.get('init_token')}, separator {task.get('separator_token')}, "
        f"truncate to {delta.task.get('truncate_to')}",
        f"model: arch {delta.arch}, " + ", ".join(
            f"{key} {delta.model['args'][key]}" for key in SHARED_MODEL_OPTIONS[1:] if key in delta.model["args"]),
        f"dictionary: {delta.dictionary['size']} symbols, sha256 {delta.dictionary['sha256'][:16]}...",
        f"base: {base['fingerprint']} over {base['tensors']} frozen tensors ({base['parameters']:,} params)",
        f"saved at: update {delta.progress.get('num_updates')}, epoch {delta.progress.get('epoch')}, "
        f"valid {delta.progress.get('valid_metric')} {delta.progress.get('valid_score')}",
    ]
    return "\n".join(lines)


# --------------------------------------------------------------------------- helpers


def _plain_json(value):
    """JSON for the values fairseq configs hold beyond JSON's own types."""
    if isinstance(value, argparse.Namespace):
        return vars(value)
    if isinstance(value, enum.Enum):
        return value.value
    if hasattr(value, "item") and callable(value.item):  # numpy and torch scalars
        return value.item()
    return str(value)


def _remove_if_present(path, reason: Optional[str] = None) -> None:
    if os.path.lexists(path):
        if reason:
            logger.info(f"removing {path} ({reason})")
        os.remove(path)


def _same_path(a, b) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def _one_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fairseq_ext.delta", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="print a delta's metadata and sizes")
    info.add_argument("delta", help="a .delta.safetensors file")
    info.add_argument("--json", action="store_true", help="print every metadata section as JSON")
    apply = commands.add_parser("apply", help="merge a delta into its base: a normal fairseq checkpoint")
    apply.add_argument("--base", required=True, help="the pretrained fairseq checkpoint the run started from "
                                                    "(e.g. a model folder's model.pt)")
    apply.add_argument("--delta", required=True, help="the .delta.safetensors file")
    apply.add_argument("--out", required=True, help="the merged checkpoint to write")
    apply.add_argument("--force", action="store_true", help="merge even if the base's fingerprint differs")
    add_trust_checkpoint_argument(apply)
    return parser


@exit_on_user_error
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    quiet_cli_logging()
    if args.command == "info":
        delta = read_delta(args.delta)
        if args.json:
            sections = {section: getattr(delta, section) for section in Delta.SECTIONS}
            sections["tensors"] = {name: {"dtype": str(t.dtype)[6:], "shape": list(t.shape)}
                                   for name, t in delta.tensors.items()}
            print(json.dumps(sections, indent=2, default=_plain_json))
        else:
            print(describe(delta))
        return
    out = apply_delta(args.base, args.delta, args.out, force=args.force, trust_checkpoint=args.trust_checkpoint)
    print(f"wrote {out} ({os.path.getsize(out):,} bytes)")


if __name__ == "__main__":
    main()
