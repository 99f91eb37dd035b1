"""A BitFit delta back on its base model: rebuild the run's model, check the base, merge.

``apply_delta`` (CLI: ``python -m fairseq_ext.tools.delta apply``) rebuilds the model
from the delta's config, loads the base into it as fairseq's --restore-file does
(rounded to the training dtype, if not float32), checks the base fingerprint,
copies the delta in and writes a normal fairseq checkpoint: tensor for tensor the
run's full one (float32, as fairseq saves).  The multi-task predictor rebuilds its
shared model with the same functions.
"""
import argparse
from pathlib import Path
from typing import Dict, Mapping

import torch
from fairseq import utils
from fairseq.models import ARCH_MODEL_REGISTRY

from ..core.delta_file import Delta, check_base_fingerprint, copy_delta_into, read_delta
from ..core.errors import UserError, one_line
from ..core.files import check_output_file, write_atomically
from .checkpoints import load_checkpoint_file, model_only_checkpoint
from .models.build import build_fairseq_model, placeholder_dictionary


def model_args(delta: Delta) -> argparse.Namespace:
    return argparse.Namespace(**{**delta.model["args"], "arch": delta.arch})


def build_model(delta: Delta, dictionary=None):
    """The delta's fairseq model (no heads), built from its config; weights are random until loaded."""
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
        detail = next((line.strip() for line in str(error).splitlines() if "size mismatch" in line), one_line(error))
        raise UserError(f"{source}: does not fit the delta's model (arch {delta.arch}): {detail}") from None
    problems = [f"missing {name}" for name in incompatible.missing_keys]
    problems += [f"unexpected {name}" for name in incompatible.unexpected_keys]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UserError(f"{source}: does not fit the delta's model (arch {delta.arch}): {problems[0]}{more}")


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
    """A model-only fairseq checkpoint holding the run's config and ``model_state``."""
    cfg = dict(delta.training_cfg)
    cfg["task"] = delta.task_cfg
    cfg["model"] = model_args(delta) if delta.model["namespace"] else dict(delta.model["args"])
    return model_only_checkpoint(
        cfg, utils.move_to_cpu(model_state),  # fp16/bf16 become float32, as fairseq saves checkpoints
        num_updates=int(delta.progress.get("num_updates") or 0), extra_state={"bitfit_delta": delta.progress})
