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

This module is the file format alone (torch and safetensors, no fairseq): the
training side writes deltas with ``fairseq_ext.training.delta_writer``, and
``fairseq_ext.plugin.deltas`` merges one into its base model.  Deltas are read
without pickle.
"""
from __future__ import annotations

import argparse
import enum
import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Mapping, Optional, Tuple

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .bitfit import CLASSIFICATION_HEADS, load_trainable_state_dict
from .controls import merge_masked
from .delta_checks import validate_delta
from .errors import UserError, one_line
from .files import write_atomically

logger = logging.getLogger(__name__)

FORMAT = "fairseq-bitfit-delta"
FORMAT_VERSION = 1
DELTA_SUFFIX = ".delta.safetensors"
# What a delta's run was (its header's task "kind"): a sequence-to-sequence run (translation and the
# tasks built on it: generate from it) or a classification one (sentence prediction: predict labels).
# Deltas written before seq2seq runs had deltas are all classification ones and record no kind.
SEQ2SEQ, CLASSIFICATION = "seq2seq", "classification"


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


# A random-subset control's weight is stored as its trained entries: NAME#indices (int64, flat) and NAME#values.
MASKED_INDICES, MASKED_VALUES = "#indices", "#values"


def frozen_base_tensors(state: Mapping[str, torch.Tensor], delta_names: Iterable[str]) -> Dict[str, torch.Tensor]:
    """What the base fingerprint covers: the state dict minus the heads and the delta's tensors."""
    delta_names = set(delta_names)
    return {name: tensor for name, tensor in state.items()
            if name not in delta_names and not name.startswith(CLASSIFICATION_HEADS)}


def dictionary_identity(dictionary) -> dict:
    """Size, special indices and a hash of the symbols of a fairseq Dictionary."""
    symbols = json.dumps(list(dictionary.symbols), ensure_ascii=False).encode()
    return {"size": len(dictionary), "bos": dictionary.bos(), "pad": dictionary.pad(), "eos": dictionary.eos(),
            "unk": dictionary.unk(), "sha256": hashlib.sha256(symbols).hexdigest()}


def check_dictionary(expected: dict, dictionary, what: str, source: str) -> None:
    """Refuse a dictionary other than the one a delta was trained with (``expected``: its identity).

    Token ids mean nothing with another dictionary, even one of the same size: the run's
    embeddings and outputs are indexed by its own symbols.
    """
    found = dictionary_identity(dictionary)
    if found != expected:
        raise UserError(f"{source}: {what} ({found['size']} symbols, sha256 {found['sha256']}) is not the "
                        f"dictionary the delta was trained with ({expected['size']} symbols, sha256 "
                        f"{expected.get('sha256')})")


# --------------------------------------------------------------------------- the file


@dataclass
class Delta:
    """A delta file: its tensors and its metadata sections (each a JSON object in the header)."""

    tensors: Dict[str, torch.Tensor]
    selection: dict  # {"terms", "train_heads", "trained": [names], "unused": [names], "delta_only"}
    task: dict  # {"cfg": fairseq task config, "label_symbols": class names or None, "truncate_to": tokens}
    model: dict  # {"arch", "args": the model config, "namespace": whether fairseq keeps it as a Namespace}
    dictionary: dict  # dictionary_identity() of the task's source dictionary; seq2seq: + "target": the target's
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
    def kind(self) -> str:
        """SEQ2SEQ or CLASSIFICATION: how the run's model is used (generate, or predict labels)."""
        return self.task.get("kind", CLASSIFICATION)

    @property
    def is_seq2seq(self) -> bool:
        return self.kind == SEQ2SEQ

    def describe_kind(self) -> str:
        """``a seq2seq delta (task translation, de-en)``, ``a classification delta (task sentence_prediction)``."""
        pair = f", {self.source_lang}-{self.target_lang}" if self.is_seq2seq else ""
        return f"a {self.kind} delta (task {self.task_name}{pair}, arch {self.arch})"

    @property
    def source_lang(self) -> Optional[str]:
        return self.task_cfg.get("source_lang")

    @property
    def target_lang(self) -> Optional[str]:
        return self.task_cfg.get("target_lang")

    @property
    def source_dictionary(self) -> dict:
        """The identity of the (source) dictionary the run read its input with."""
        return {key: value for key, value in self.dictionary.items() if key != "target"}

    @property
    def target_dictionary(self) -> Optional[dict]:
        """The identity of a seq2seq run's target dictionary; None for classification."""
        return self.dictionary.get("target")

    @property
    def arch(self) -> str:
        return self.model["arch"]

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.base["dtype"])

    def head_names(self) -> List[str]:
        return sorted({name[len(CLASSIFICATION_HEADS):].split(".")[0] for name in self.tensors if name.startswith(CLASSIFICATION_HEADS)})

    def head_tensors(self, head: str) -> Dict[str, torch.Tensor]:
        """The tensors of one head, named relative to the head (``dense.weight``...)."""
        prefix = f"{CLASSIFICATION_HEADS}{head}."
        return {name[len(prefix):]: tensor for name, tensor in self.tensors.items() if name.startswith(prefix)}

    def masked_entries(self) -> Dict[str, Tuple[torch.Tensor, torch.Tensor]]:
        """A random-subset control's trained entries: {weight name: (flat indices, values)}."""
        return {name[:-len(MASKED_INDICES)]: (tensor, self.tensors[name[:-len(MASKED_INDICES)] + MASKED_VALUES])
                for name, tensor in self.tensors.items() if name.endswith(MASKED_INDICES)}

    def trained_names(self) -> List[str]:
        """Every parameter the delta changes: whole tensors, and the weights a control changed entries of."""
        whole = [name for name in self.tensors if not name.endswith((MASKED_INDICES, MASKED_VALUES))]
        return whole + list(self.masked_entries())

    def body_tensors(self, base: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
        """The trained tensors outside the heads; with ``base`` (a state dict holding the base values),
        a control's weights too, as the base with the trained entries put in."""
        body = {name: tensor for name, tensor in self.tensors.items()
                if not name.startswith(CLASSIFICATION_HEADS) and not name.endswith((MASKED_INDICES, MASKED_VALUES))}
        if base is not None:
            for name, (indices, values) in self.masked_entries().items():
                body[name] = merge_masked(base[name], indices, values)
        return body

    def trained_tensors(self, base: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """What to copy into a model holding the base to make the run's model: heads and body."""
        heads = {name: tensor for name, tensor in self.tensors.items() if name.startswith(CLASSIFICATION_HEADS)}
        return {**self.body_tensors(base), **heads}

    # -- storage --
    def metadata(self) -> Dict[str, str]:
        metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION),
                    "tensors_sha256": tensors_fingerprint(self.tensors)}
        for section in self.SECTIONS:
            metadata[section] = json.dumps(getattr(self, section), default=plain_json, sort_keys=True)
        metadata[HEADER_DIGEST] = header_digest(metadata)
        return metadata

    def save(self, path) -> None:
        """Write atomically: a reader never sees a half-written delta."""
        tensors = {name: tensor.detach().cpu().contiguous() for name, tensor in self.tensors.items()}
        write_atomically(path, lambda tmp: save_file(tensors, tmp, metadata=self.metadata()))


HEADER_DIGEST = "header_sha256"  # over every other header entry, tensors_sha256 included: the whole file


def header_digest(metadata: Mapping[str, str]) -> str:
    """sha256 over a delta header's entries (but its own), in key order."""
    entries = {key: value for key, value in metadata.items() if key != HEADER_DIGEST}
    return "sha256:" + hashlib.sha256(json.dumps(entries, sort_keys=True).encode()).hexdigest()


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
    path = str(path)
    if not os.path.isfile(path):
        raise UserError(f"{path}: no such delta file")
    try:
        with safe_open(path, framework="pt") as handle:
            metadata = handle.metadata() or {}
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{path}: not a readable safetensors file (truncated or corrupt?): "
                        f"{one_line(error)}") from None
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
    if HEADER_DIGEST not in metadata:
        # Deltas written before 2026-12 have none: their header is checked for consistency, not integrity.
        logger.warning(f"{path}: written without a header checksum (an older delta): its header is checked "
                       f"for consistency only; python -m fairseq_ext.tools.delta migrate adds one")
    elif metadata[HEADER_DIGEST] != header_digest(metadata):
        raise UserError(f"{path}: corrupt delta: its header does not match the header checksum in it "
                        "(edited or damaged)")
    if metadata.get("tensors_sha256") != tensors_fingerprint(tensors):
        raise UserError(f"{path}: corrupt delta: its tensors do not match the checksum in its header")
    delta = Delta(tensors=tensors, path=path, **sections)
    validate_delta(delta)
    return delta


def check_base_fingerprint(state: Mapping[str, torch.Tensor], delta: Delta, source: str, force: bool = False,
                           force_flag: Optional[str] = "--force") -> None:
    """Refuse a base other than the one the delta was trained from (``force``: warn only)."""
    frozen = frozen_base_tensors(state, delta.trained_names())
    # In the training dtype: lossless for a model already rounded to it (fp32 upcasts of bf16 values).
    found = tensors_fingerprint({name: t.to(delta.dtype) if t.is_floating_point() else t for name, t in frozen.items()})
    expected = delta.base["fingerprint"]
    if found == expected:
        return
    # In full: two fingerprints can share any prefix.
    message = (f"{source} is not the base {delta.path} was trained from: its frozen weights' fingerprint "
               f"{found} differs from the delta's {expected}")
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
    load_trainable_state_dict(model, dict(tensors))


def plain_json(value):
    """JSON for the values fairseq configs hold beyond JSON's own types."""
    if isinstance(value, argparse.Namespace):
        return vars(value)
    if isinstance(value, enum.Enum):
        return value.value
    if hasattr(value, "item") and callable(value.item):  # numpy and torch scalars
        return value.item()
    return str(value)
