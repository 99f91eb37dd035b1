"""A BitFit delta back on its base model: rebuild the run's model, check the base, merge.

``apply_delta`` (CLI: ``python -m fairseq_ext.tools.delta apply``) rebuilds the model
from the delta's config, loads the base into it as fairseq's --restore-file does
(rounded to the training dtype, if not float32), checks the base fingerprint,
copies the delta in and writes a normal fairseq checkpoint: tensor for tensor the
run's full one (float32, as fairseq saves).  The predictors (classification:
``plugin.predictor``, seq2seq: ``plugin.seq2seq``) rebuild their shared model with the
same functions and swap their tasks' tensors in place with ``InPlaceDeltas``.
"""
import argparse
import contextlib
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch
from fairseq import tasks, utils
from fairseq.models import ARCH_MODEL_NAME_REGISTRY, ARCH_MODEL_REGISTRY
from omegaconf import OmegaConf

from ..core.delta_file import (CLASSIFICATION, Delta, check_base_fingerprint, check_dictionary, copy_delta_into,
                               read_delta)
from ..core import tuners
from ..core.errors import UserError, one_line
from ..core.files import check_output_file, write_atomically
from .checkpoints import checkpoint_config, load_checkpoint_file, model_only_checkpoint
from .patches import projections_as_modules
from .models.build import SEQ2SEQ_MODEL_OPTIONS, SHARED_MODEL_OPTIONS, build_fairseq_model, placeholder_dictionary
from .task_families import LANGUAGE_MODEL

# What two decoder-only language-model deltas must agree on to share one model: the decoder's shape,
# its input and output projections and embeddings (fairseq's transformer_lm options).
LANGUAGE_MODEL_OPTIONS = (
    "arch", "decoder_layers", "decoder_embed_dim", "decoder_ffn_embed_dim", "decoder_attention_heads",
    "decoder_normalize_before", "no_decoder_final_norm", "decoder_learned_pos", "decoder_input_dim",
    "decoder_output_dim", "share_decoder_input_output_embed", "layernorm_embedding", "no_scale_embedding",
    "no_token_positional_embeddings", "activation_fn", "max_target_positions", "tokens_per_sample",
    "adaptive_softmax_cutoff", "adaptive_input", "adaptive_input_cutoff", "tie_adaptive_weights",
    "character_embeddings")


def model_args(delta: Delta, overrides: Optional[Mapping[str, object]] = None) -> argparse.Namespace:
    """The delta's model config; ``overrides`` as fairseq's --model-overrides sets them."""
    return argparse.Namespace(**{**delta.model["args"], "arch": delta.arch, **(overrides or {})})


def model_options(delta: Delta) -> Sequence[str]:
    """The model options that shape the delta's network (what two deltas on one model must share)."""
    if delta.kind == LANGUAGE_MODEL:
        return LANGUAGE_MODEL_OPTIONS
    return SEQ2SEQ_MODEL_OPTIONS if delta.is_seq2seq else SHARED_MODEL_OPTIONS


def build_model(delta: Delta, dictionary=None, target_dictionary=None,
                overrides: Optional[Mapping[str, object]] = None):
    """The delta's fairseq model (no heads), built from its config; weights are random until loaded.

    Without dictionaries, placeholders of the recorded sizes stand in: all building reads.  A model
    that is not a classifier also reads a target dictionary: the recorded one (a seq2seq run's, a
    language model's separate output dictionary), else the source dictionary (a language model, BART's
    denoising, a masked LM).
    """
    if delta.arch not in ARCH_MODEL_REGISTRY:
        raise UserError(f"{delta.path}: unknown model arch {delta.arch!r} (a fairseq plugin missing?)")
    if dictionary is None:
        dictionary = placeholder_dictionary(delta.source_dictionary)
    if target_dictionary is None and delta.kind != CLASSIFICATION:
        target_dictionary = (placeholder_dictionary(delta.target_dictionary) if delta.target_dictionary is not None
                             else dictionary)
    model = build_fairseq_model(vars(model_args(delta, overrides)), dictionary, target_dictionary)
    if delta.kind == CLASSIFICATION and not hasattr(model, "register_classification_head"):
        raise UserError(f"{delta.path}: arch {delta.arch!r} has no classification heads, but the delta is "
                        f"{delta.describe_kind()}")
    tuner = tuner_of(delta)
    if tuner is not None:  # the run's added modules; loading the base keeps their initial values
        tuners.inject(model, tuner)
        projections_as_modules(model)
    return model.eval()


def tuner_of(delta: Delta) -> Optional[tuners.TunerSpec]:
    """The comparison method a delta's run trained (LoRA, IA3, adapters), None for BitFit alone."""
    header = delta.selection.get("tuner")
    if not header:
        return None
    try:
        return tuners.TunerSpec.from_header(header)
    except (tuners.TunerError, KeyError, TypeError, ValueError) as error:
        raise UserError(f"{delta.path}: its tuner {header!r} cannot be rebuilt: {one_line(error)}") from None


def shared_model(delta: Delta, base_state: dict, source: str, device, dictionary=None, target_dictionary=None,
                 overrides: Optional[Mapping[str, object]] = None, draw_init_as_fairseq: bool = False):
    """The model a predictor serves its tasks' deltas on: built from ``delta``'s config, holding the
    base weights (``base_state``, left as it is), in float32 on ``device``, in eval mode.

    The random init is overwritten, so the caller's RNG is left as it was; ``draw_init_as_fairseq``
    draws it from the caller's RNG instead, as fairseq's checkpoint loading does, so that a fairseq
    command sampling with --seed after loading draws the same samples as from a merged checkpoint."""
    with contextlib.nullcontext() if draw_init_as_fairseq else torch.random.fork_rng(devices=[]):
        model = build_model(delta, dictionary, target_dictionary, overrides)
    # load_base upgrades (renames) keys in the dict it gets: keep the caller's intact.
    load_base(model, dict(base_state), delta, source)
    # A bf16/fp16 run trained on the base rounded to that dtype; its full checkpoint holds float32
    # upcasts, which fairseq loads into a float32 model: do the same.
    return model.to(delta.dtype).float().to(device).eval()


def register_head(model, name: str, head_tensors: Mapping[str, torch.Tensor]) -> None:
    """Register a classification head shaped like ``head_tensors`` (dense/out_proj)."""
    try:
        num_classes = head_tensors["out_proj.weight"].shape[0]
        inner_dim = head_tensors["dense.weight"].shape[0]
    except KeyError as missing:
        raise UserError(f"head {name!r}: the delta lacks its {missing.args[0]}") from None
    model.register_classification_head(name, num_classes=num_classes, inner_dim=inner_dim)


def check_base_model(base_checkpoint: dict, delta: Delta, source: str) -> None:
    """Refuse a base of another kind of model than the delta's run (a RoBERTa classifier's delta on
    a translation transformer, or the reverse) with a sentence that says so, before any shape does."""
    base_model = checkpoint_config(base_checkpoint, "model") or {}
    base_arch = base_model.get("_name") or base_model.get("arch")
    ours, theirs = ARCH_MODEL_NAME_REGISTRY.get(base_arch), ARCH_MODEL_NAME_REGISTRY.get(delta.arch)
    if ours is None or theirs is None or ours == theirs:
        return
    base_task = checkpoint_config(base_checkpoint, "task") or {}
    task_name = base_task.get("_name") or base_task.get("task")
    trained_for = f", trained with task {task_name}" if task_name else ""
    raise UserError(f"{source}: a {ours} model (arch {base_arch}{trained_for}), but the delta is "
                    f"{delta.describe_kind()}: use the base model its run started from")


def check_same_model(loaded: Delta, delta: Delta, source: str) -> None:
    """Tasks of one predictor share one model: ``delta`` must have been trained on the model ``loaded`` built."""
    ours = {**loaded.model["args"], "arch": loaded.arch}
    theirs = {**delta.model["args"], "arch": delta.arch}
    for option in model_options(loaded):
        if ours.get(option) != theirs.get(option):
            raise UserError(f"{source}: model {option} {theirs.get(option)!r} differs from the loaded model's "
                            f"{ours.get(option)!r} (from {loaded.path}); tasks of one predictor share one model")
    if delta.dtype != loaded.dtype:
        raise UserError(f"{source}: trained in {delta.base['dtype']}, the loaded model is {loaded.base['dtype']}")
    if loaded.selection.get("tuner") != delta.selection.get("tuner"):
        def trained(header):
            return tuners.TunerSpec.from_header(header).describe() if header else "no tuner (BitFit)"
        raise UserError(f"{source}: trained with {trained(delta.selection.get('tuner'))}, the loaded model has "
                        f"{trained(loaded.selection.get('tuner'))}; tasks of one predictor share one model")


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


def seq2seq_task(delta: Delta, data):
    """The delta's fairseq task (translation and the tasks built on it), reading its dictionaries from
    ``data`` as training did (``dict.{lang}.txt``): the dictionaries the model's token ids index."""
    task_cfg = OmegaConf.create({**delta.task_cfg, "data": str(data)})
    languages = f"{delta.source_lang}, {delta.target_lang}"
    try:
        return tasks.setup_task(task_cfg)
    except FileNotFoundError as error:
        raise UserError(f"{data}: no dictionaries of the delta's languages ({languages}) there: "
                        f"{one_line(error)}") from None


def check_seq2seq_dictionaries(task, delta: Delta, source: str) -> None:
    """A seq2seq task's languages and both dictionaries must be the delta's run's."""
    pair = (getattr(task.cfg, "source_lang", None), getattr(task.cfg, "target_lang", None))
    if pair != (delta.source_lang, delta.target_lang):
        raise UserError(f"{source}: reads {pair[0]}-{pair[1]}, but the delta was trained "
                        f"{delta.source_lang}-{delta.target_lang} (--source-lang/--target-lang)")
    data = getattr(task.cfg, "data", "")
    check_dictionary(delta.source_dictionary, task.source_dictionary,
                     f"the source dictionary {Path(data) / f'dict.{pair[0]}.txt'}", source)
    check_dictionary(delta.target_dictionary, task.target_dictionary,
                     f"the target dictionary {Path(data) / f'dict.{pair[1]}.txt'}", source)


def language_model_task(delta: Delta, data):
    """The delta's language-modelling task, its dictionary read from ``data`` (``dict.txt``) as training did."""
    task_cfg = OmegaConf.create({**delta.task_cfg, "data": str(data)})
    try:
        return tasks.setup_task(task_cfg)
    except FileNotFoundError as error:
        raise UserError(f"{data}: no dict.txt of the delta's language model there: {one_line(error)}") from None


def check_language_model_dictionaries(task, delta: Delta, source: str) -> None:
    """A language model's input (and separate output) dictionary must be its run's."""
    data = Path(getattr(task.args, "data", "") or "")
    check_dictionary(delta.source_dictionary, task.source_dictionary, f"the dictionary {data / 'dict.txt'}", source)
    if delta.target_dictionary is not None:
        check_dictionary(delta.target_dictionary, task.target_dictionary,
                         f"the output dictionary of {data / 'dict.txt'}", source)


def check_language_model_dictionary(folder: Path, delta: Delta, source: str) -> None:
    check_language_model_dictionaries(language_model_task(delta, folder), delta, source)


def merged_model(base_path, delta_path, force: bool = False, trust_checkpoint: bool = False, merge: bool = True
                 ) -> Tuple[torch.nn.Module, Delta]:
    """Base + delta as one model in memory (``model_with_delta``), from their files; and the delta.

    A seq2seq delta's dictionaries are checked against ``dict.{lang}.txt`` beside the base
    when the base has them (fairseq's released translation models do).
    """
    delta = delta_path if isinstance(delta_path, Delta) else read_delta(delta_path)
    base = load_checkpoint_file(base_path, trust_checkpoint)
    source = f"--base {base_path}"
    check_base_model(base, delta, source)
    folder = Path(base_path).parent
    if delta.kind == LANGUAGE_MODEL and (folder / "dict.txt").is_file():  # fairseq's released LMs keep it there
        check_language_model_dictionary(folder, delta, source)
    if delta.is_seq2seq and all((folder / f"dict.{lang}.txt").is_file() for lang in (delta.source_lang,
                                                                                       delta.target_lang)):
        check_seq2seq_dictionaries(seq2seq_task(delta, folder), delta, source)
    model, _ = model_with_delta(delta, base, source, force, merge)
    return model, delta


def model_with_delta(delta: Delta, base: dict, source: str, force: bool = False, merge: bool = True):
    """(the run's model in memory, the base values of what the delta changes): the delta's model built with
    its heads (and its tuner's layers), the base checkpoint ``base`` loaded as --restore-file does, checked
    against the delta's base fingerprint (``force``: warn only), the delta copied in; in the training dtype.
    A LoRA or IA3 delta is folded into the weights unless ``merge`` is False; adapters stay layers."""
    model = build_model(delta)
    for head in delta.head_names():
        register_head(model, head, delta.head_tensors(head))
    load_base(model, base["model"], delta, source)
    model.to(delta.dtype)  # what fairseq's --fp16/--bf16 did to the training model before loading the base
    check_base_fingerprint(model.state_dict(), delta, source, force)
    trained = delta.trained_tensors(model.state_dict())
    state = model.state_dict()
    base_values = {name: state[name].detach().clone() for name in trained if name in state}
    copy_delta_into(model, trained, f"--delta {delta.path}")
    tuner = tuner_of(delta)
    if tuner is not None and tuner.mergeable and merge:
        tuners.merge(model)  # LoRA and IA3 fold into the weights: the base's graph and names again
    return model, base_values


def apply_delta(base_path, delta_path, out_path, force: bool = False, trust_checkpoint: bool = False) -> Path:
    """Write base + delta (``merged_model``) as a normal fairseq checkpoint at ``out_path``; returns it."""
    out_path = Path(out_path)
    for flag, other in (("--base", base_path), ("--delta", delta_path)):
        if out_path.exists() and out_path.resolve() == Path(other).resolve():
            raise UserError(f"--out {out_path} is the {flag} file; write the merged checkpoint elsewhere")
    check_output_file(out_path, "--out")
    tuner = tuner_of(read_delta(delta_path))
    if tuner is not None and not tuner.mergeable:
        raise UserError(f"--delta {delta_path}: {tuner.describe()} add layers a fairseq checkpoint of the base "
                        "architecture has no place for; serve the delta unmerged (tools.predict or tools.serve "
                        "with --delta)")
    model, delta = merged_model(base_path, delta_path, force, trust_checkpoint)
    checkpoint = merged_checkpoint(delta, model.state_dict())
    write_atomically(out_path, lambda tmp: torch.save(checkpoint, tmp))
    return out_path


def merged_cfg(delta: Delta) -> dict:
    """The fairseq config of the run's checkpoint: its config groups, task and model."""
    cfg = dict(delta.training_cfg)
    cfg["task"] = delta.task_cfg
    cfg["model"] = model_args(delta) if delta.model["namespace"] else dict(delta.model["args"])
    return cfg


def merged_checkpoint(delta: Delta, model_state: Dict[str, torch.Tensor]) -> dict:
    """A model-only fairseq checkpoint holding the run's config and ``model_state``."""
    return model_only_checkpoint(
        merged_cfg(delta), utils.move_to_cpu(model_state),  # fp16/bf16 become float32, as fairseq saves checkpoints
        num_updates=int(delta.progress.get("num_updates") or 0), extra_state={"bitfit_delta": delta.progress})


class InPlaceDeltas:
    """Many deltas on one model in memory: switching copies a delta's tensors into the model in
    place, and puts back the base values of those the previous delta changed but this one does
    not train.  No reload: a switch costs a few small copies.

    ``add`` takes each delta's trained tensors (shaped, typed and placed as the model's); the
    base value of every tensor some delta trains is kept the first time a delta names it.
    """

    def __init__(self, model: torch.nn.Module):
        self.model = model
        self.base_values: Dict[str, torch.Tensor] = {}
        self.deltas: Dict[str, Dict[str, torch.Tensor]] = {}
        self.active: Optional[str] = None
        self._parameters = dict(model.named_parameters())

    def add(self, name: str, tensors: Dict[str, torch.Tensor]) -> None:
        self._parameters = dict(self.model.named_parameters())  # modules (heads) may have been added
        for tensor_name in tensors:
            if tensor_name not in self.base_values:
                # Only tensors some delta trains are ever overwritten: this one still holds its base value.
                self.base_values[tensor_name] = self._parameters[tensor_name].detach().clone()
        self.deltas[name] = tensors

    def use(self, name: str) -> None:
        if self.active == name:
            return
        tensors = self.deltas[name]
        previous = self.deltas[self.active] if self.active is not None else {}
        with torch.no_grad():
            for tensor_name in previous.keys() - tensors.keys():
                self._parameters[tensor_name].copy_(self.base_values[tensor_name])
            for tensor_name, tensor in tensors.items():
                self._parameters[tensor_name].copy_(tensor)
        self.active = name

    def base_state(self) -> Dict[str, torch.Tensor]:
        """The model's state with every tensor some delta changed put back to its base value."""
        return {name: self.base_values.get(name, tensor) for name, tensor in self.model.state_dict().items()}
