"""A BitFit result out of fairseq: a transformers folder (or a PEFT adapter), checked by their forward pass.

    export(base_dir, out_dir, delta=D)             # base model folder + delta -> transformers folder
    export(base_dir, out_dir, checkpoint=C)        # a full checkpoint (base_dir gives the tokenizer)
    export(base_dir, out_dir)                      # the encoder alone: a base for PEFT adapters
    export(base_dir, out_dir, delta=D, fmt="peft") # a PEFT adapter over the unmodified base

The transformers folder holds config.json (BertForSequenceClassification,
RobertaForSequenceClassification, or for a mean-pooled head the class in
``hf_mean_pooling``, named in ``auto_map``), model.safetensors and the run's
tokenizer (its ids are the fairseq dictionary's; ``hf_export_maps``).  Before the
folder appears, it is loaded back with transformers' Auto classes and its logits on
probe sentences are compared with the fairseq model's: a difference above 1e-4, or
token ids other than the run's, fail the export.  Everything is written into a
temporary folder beside ``out_dir`` and renamed: a failed export leaves nothing.
"""
import argparse
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import torch
from fairseq.data import Dictionary
from fairseq.models import ARCH_MODEL_NAME_REGISTRY

from ...core.delta_file import CLASSIFICATION, dictionary_identity, read_delta
from ...core.errors import UserError
from ...core.glue_tasks import get_task_spec
from ..checkpoints import checkpoint_config, load_checkpoint_file
from ..deltas import model_with_delta, tuner_of
from .build import build_fairseq_model
from .hf_export_maps import (MEAN_POOLING_FILE, Classifier, check_structure, transformers_class, transformers_config,
                             transformers_tokenizer, transformers_weights)
from .model_dir import MODEL_INFO, ModelDir, build_bpe, load_model_dir

FORMATS = ("hf", "peft")
TOLERANCE = 1e-4  # the export's own check; the tests hold the result to 1e-5 against the predictor
SINGLES = ("The movie was good.", "It's a bad film, and the acting is even worse!", "she sees 3 dogs")
PAIRS = (("A man is sleeping.", "A person rests on a bed."), ("Where is it?", "In the second room."))


def check_output_folder(out: Path, flag: str = "--out") -> None:
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{flag} {out}: already exists and is not an empty folder; give a new or empty folder")


def run_family(arch: str, source: str) -> str:
    model = ARCH_MODEL_NAME_REGISTRY.get(arch)
    if model not in ("bert", "roberta"):
        what = f"a {model} model" if model else "not a registered fairseq arch"
        raise UserError(f"{source}: arch {arch!r} ({what}): export to transformers covers bert and roberta encoders")
    return model


def load_dictionary(model_dir: ModelDir) -> Dictionary:
    dictionary = Dictionary.load(model_dir.dictionary)
    dictionary.add_symbol("<mask>")  # as sentence_prediction and masked_lm load it
    return dictionary


class Run:
    """The fairseq side of an export: the merged model in memory, its task and how it reads text."""

    def __init__(self, model, classifier: Classifier, task_cfg: dict, pair: Optional[bool], delta=None,
                 base_values=None):
        self.model, self.classifier, self.task_cfg, self.pair = model.float().eval(), classifier, task_cfg, pair
        self.delta, self.base_values = delta, base_values or {}

    def token_ids(self, bpe, dictionary, texts: Sequence[str]) -> torch.Tensor:
        """As the predictor encodes an example: BPE, dictionary, --init-token, --separator-token."""
        segments = []
        for position, text in enumerate(texts):
            ids = dictionary.encode_line(bpe.encode(text), append_eos=True, add_if_not_exist=False).long()
            prefix = self.task_cfg.get("init_token") if position == 0 else self.task_cfg.get("separator_token")
            segments.append(torch.cat([ids.new_tensor([prefix]), ids]) if prefix is not None else ids)
        return torch.cat(segments)

    @torch.no_grad()
    def outputs(self, tokens: torch.Tensor) -> torch.Tensor:
        """One example's logits (the head's output), or its last hidden states for the encoder alone."""
        head = self.classifier.head
        output, _ = self.model(tokens.unsqueeze(0), features_only=True, classification_head_name=head)
        return output[0]


def _classifier(family, model_cfg, state, dictionary, head, labels, max_tokens, source) -> Classifier:
    rows = state["encoder.sentence_encoder.embed_tokens.weight"].shape[0]
    if rows != len(dictionary):
        raise UserError(f"{source}: the model has {rows} token embeddings, the base folder's dictionary "
                        f"{len(dictionary)} symbols: use the model folder the run started from")
    pooling = (model_cfg.get("pooling") or "first") if family == "bert" else "first"
    return Classifier(family, model_cfg, {k: v.float() for k, v in state.items()}, rows, pooling, head, labels,
                      max_tokens, source)


def _labels(task_cfg: dict, label_symbols: Optional[List[str]]) -> Optional[List[str]]:
    if task_cfg.get("regression_target"):
        return None
    if task_cfg.get("glue_task"):
        return list(get_task_spec(task_cfg["glue_task"]).labels)
    return list(label_symbols) if label_symbols else None


def _pair(task_cfg: dict) -> Optional[bool]:
    return get_task_spec(task_cfg["glue_task"]).is_pair if task_cfg.get("glue_task") else None


def run_from_delta(model_dir: ModelDir, dictionary, delta_path, force: bool, trust: bool) -> Run:
    delta = read_delta(delta_path)
    source = f"--delta {delta_path}"
    if delta.kind != CLASSIFICATION:
        raise UserError(f"{source}: {delta.describe_kind()}: only classification deltas export to transformers "
                        "(seq2seq and language-model export is not supported)")
    family = run_family(delta.arch, source)
    if dictionary_identity(dictionary) != delta.source_dictionary:
        raise UserError(f"{source}: trained with another dictionary ({delta.dictionary['size']} symbols) than "
                        f"--base {model_dir.path}'s ({len(dictionary)} symbols): use the base its run started from")
    tuner = tuner_of(delta)
    if tuner is not None and not tuner.mergeable:
        raise UserError(f"--delta {delta.path}: {tuner.describe()} add layers transformers' standard classes have "
                        "no place for; export LoRA, IA3 or BitFit runs, or serve this delta with tools.serve")
    base = load_checkpoint_file(model_dir.checkpoint, trust)
    model, base_values = model_with_delta(delta, base, f"--base {model_dir.path}", force)
    del base
    task_cfg, model_cfg = delta.task_cfg, {**delta.model["args"], "arch": delta.arch}
    max_tokens = delta.task.get("truncate_to") or task_cfg.get("max_positions")
    classifier = _classifier(family, model_cfg, model.float().state_dict(), dictionary, delta.head_name,
                             _labels(task_cfg, delta.label_symbols), max_tokens, source)
    return Run(model, classifier, task_cfg, _pair(task_cfg), delta, base_values)


def _built(model_cfg: dict, dictionary, state: dict, head: Optional[str], source: str):
    model = build_fairseq_model(dict(model_cfg), dictionary)
    if head:
        model.register_classification_head(head, num_classes=state[f"classification_heads.{head}.out_proj.weight"]
                                           .shape[0], inner_dim=state[f"classification_heads.{head}.dense.weight"]
                                           .shape[0])
    try:
        model.load_state_dict(state, strict=True, model_cfg=argparse.Namespace(**model_cfg))
    except RuntimeError as error:
        raise UserError(f"{source}: does not fit its own config: {str(error).splitlines()[0]}") from None
    return model


def run_from_checkpoint(model_dir: ModelDir, dictionary, checkpoint, trust: bool) -> Run:
    source = f"--checkpoint {checkpoint}"
    state = load_checkpoint_file(checkpoint, trust, flag="--checkpoint")
    model_cfg, task_cfg = checkpoint_config(state, "model"), checkpoint_config(state, "task") or {}
    if model_cfg is None:
        raise UserError(f"{source}: no model config in the checkpoint")
    arch = model_cfg.get("_name") or model_cfg.get("arch")
    family = run_family(arch, source)
    head = task_cfg.get("classification_head_name") or "sentence_classification_head"
    if f"classification_heads.{head}.out_proj.weight" not in state["model"]:
        raise UserError(f"{source}: no classification head {head!r}; export a fine-tuned classifier's checkpoint, "
                        "or give --base alone for the encoder")
    model_cfg, task_cfg = {**model_cfg, "arch": arch}, dict(task_cfg)
    if task_cfg.get("_name") == "glue" and task_cfg.get("init_token") is None:
        task_cfg["init_token"] = dictionary.bos()  # what the glue task sets up (a delta records it resolved)
    weights = state["model"]
    _classifier(family, model_cfg, weights, dictionary, head, None, None, source)  # dictionary check first
    model = _built(model_cfg, dictionary, weights, head, source)
    max_tokens = task_cfg.get("max_seq_len") or task_cfg.get("max_positions")
    classifier = _classifier(family, model_cfg, model.state_dict(), dictionary, head, _labels(task_cfg, None),
                             max_tokens if isinstance(max_tokens, int) else None, source)
    return Run(model, classifier, task_cfg, _pair(task_cfg))


def run_of_base(model_dir: ModelDir, dictionary, trust: bool) -> Run:
    source = f"--base {model_dir.path}"
    state = load_checkpoint_file(model_dir.checkpoint, trust)
    model_cfg = {**(checkpoint_config(state, "model") or {}), "arch": model_dir.arch}
    family = run_family(model_dir.arch, source)
    weights = {k: v for k, v in state["model"].items() if not k.startswith("classification_heads.")}
    if family == "bert":
        model_cfg["bert_lm_head"] = any(k.startswith("encoder.lm_head.") for k in weights)
    model = _built(model_cfg, dictionary, weights, None, source)
    task_cfg = {"init_token": 0, "separator_token": 2 if model_dir.pair_separator else None}
    classifier = _classifier(family, model_cfg, model.state_dict(), dictionary, None, None, None, source)
    return Run(model, classifier, task_cfg, None)


# --------------------------------------------------------------------------- transformers side

def transformers_model(classifier: Classifier, state_override: Optional[dict] = None):
    """(transformers model holding the classifier's weights, {hf name: fairseq name}, fairseq names left out)."""
    check_structure(classifier)
    config = transformers_config(classifier)
    model_class = transformers_class(classifier)
    model = model_class(config).eval()
    if state_override is not None:
        classifier = Classifier(**{**classifier.__dict__, "state": state_override})
    weights, names, left_out = transformers_weights(classifier, model.state_dict(), model.base_model_prefix)
    model.load_state_dict(weights, strict=True)
    return model, names, left_out


def probe_texts(run: Run) -> List[Tuple[str, ...]]:
    singles = [(text,) for text in SINGLES]
    pairs = [tuple(pair) for pair in PAIRS]
    return singles if run.pair is False else pairs if run.pair else singles + pairs


@torch.no_grad()
def compare(run: Run, model: torch.nn.Module, tokenizer, bpe, dictionary, what: str) -> float:
    """Largest difference between ``model``'s outputs and fairseq's on the probes (token ids checked too)."""
    model.eval()
    largest = 0.0
    for texts in probe_texts(run):
        expected_ids = run.token_ids(bpe, dictionary, texts)
        encoded = tokenizer(*texts, return_tensors="pt")
        if encoded["input_ids"][0].tolist() != expected_ids.tolist():
            raise UserError(f"{run.classifier.source}: transformers' tokenizer gives other token ids than the run "
                            f"for {texts!r} (its --init-token/--separator-token are not the {run.classifier.family} format?); "
                            f"the {what} is not written")
        output = model(**encoded)
        theirs = output.logits[0] if run.classifier.head else output.last_hidden_state[0]
        largest = max(largest, float((theirs - run.outputs(expected_ids)).abs().max()))
    if not largest <= TOLERANCE:
        raise UserError(f"{run.classifier.source}: the exported {what} differs from the fairseq model by "
                        f"{largest:.2e} (more than {TOLERANCE:g}) on probe sentences; nothing is written")
    return largest


def load_transformers_folder(folder: Path, classifier: Classifier):
    """The folder as its users load it: AutoModelForSequenceClassification (the encoder alone: AutoModel)."""
    from transformers import AutoModel, AutoModelForSequenceClassification

    if not classifier.head:
        return AutoModel.from_pretrained(str(folder))
    return AutoModelForSequenceClassification.from_pretrained(str(folder),
                                                              trust_remote_code=classifier.pooling == "mean")


def source_folder(model_dir: ModelDir) -> Optional[str]:
    """The Hugging Face folder the base model was imported from (model_info.json's source), if it still exists."""
    try:
        info = json.loads((Path(model_dir.path) / MODEL_INFO).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    path = (info.get("source") or {}).get("path")
    return path if path and Path(path).is_dir() else None


def write_transformers_folder(run: Run, model_dir: ModelDir, dictionary, staging: Path) -> List[str]:
    model, _, left_out = transformers_model(run.classifier)
    model.save_pretrained(str(staging))
    if run.classifier.head and run.classifier.pooling == "mean":
        shutil.copyfile(Path(__file__).with_name("hf_mean_pooling.py"), staging / MEAN_POOLING_FILE)
    tokenizer_for(run, model_dir, dictionary).save_pretrained(str(staging))
    return left_out


def tokenizer_for(run: Run, model_dir: ModelDir, dictionary):
    classifier = run.classifier
    positions = classifier.state["encoder.sentence_encoder.embed_positions.weight"].shape[0] - 2
    return transformers_tokenizer(model_dir, list(dictionary.symbols), classifier.max_tokens or positions)


def export(base_dir, out_dir, delta=None, checkpoint=None, fmt: str = "hf", force: bool = False,
           trust_checkpoint: bool = False, report: Optional[Callable[[str], None]] = print) -> Path:
    """Write the transformers folder (``fmt`` "hf") or PEFT adapter (``fmt`` "peft") at ``out_dir``."""
    out = Path(out_dir).resolve()
    if fmt not in FORMATS:
        raise UserError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if delta is not None and checkpoint is not None:
        raise UserError("--delta and --checkpoint: give one (a delta on --base, or a full checkpoint)")
    if fmt == "peft" and delta is None:
        raise UserError("--format peft needs --delta: an adapter holds what a BitFit run changed on its base")
    check_output_folder(out)
    model_dir = load_model_dir(base_dir)
    dictionary = load_dictionary(model_dir)
    if delta is not None:
        run = run_from_delta(model_dir, dictionary, delta, force, trust_checkpoint)
    elif checkpoint is not None:
        run = run_from_checkpoint(model_dir, dictionary, checkpoint, trust_checkpoint)
    else:
        run = run_of_base(model_dir, dictionary, trust_checkpoint)
    bpe = build_bpe(model_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        if fmt == "peft":
            from .hf_export_peft import write_adapter

            lines, largest = write_adapter(run, staging, source_folder(model_dir),
                                           lambda model: compare(run, model, tokenizer_for(run, model_dir, dictionary),
                                                                 bpe, dictionary, "PEFT adapter"))
            what = "PEFT adapter"
        else:
            from transformers import AutoTokenizer

            left_out = write_transformers_folder(run, model_dir, dictionary, staging)
            largest = compare(run, load_transformers_folder(staging, run.classifier), AutoTokenizer.from_pretrained(str(staging)),
                              bpe, dictionary, "transformers folder")
            lines = [f"not exported (no place on transformers' path): {', '.join(left_out)}"] if left_out else []
            what = "transformers folder"
        for path in staging.rglob("*"):  # some writers (safetensors, mkstemp) make files private
            os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~_umask())
        os.chmod(staging, 0o777 & ~_umask())  # mkdtemp makes it private
        if out.exists():
            out.rmdir()  # checked empty above
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if report is not None:
        for line in lines:
            report(line)
        report(f"exported {run.classifier.source} on --base {model_dir.path} -> {out} ({what}, "
               f"{run.classifier.class_name}; largest difference from fairseq on probe sentences: {largest:.1e})")
    return out


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
