"""Predict many BitFit tasks with one base model in memory.

A BitFit task differs from its pretrained base only in a few bias vectors and
its classification head, which is what its delta holds (``fairseq_ext.core.delta_file``).
``MultiTaskPredictor`` loads the base once; each task keeps its delta's small
tensors and its own classification head (registered under the task's key).
Switching tasks copies the task's bias vectors into the shared model in place,
and puts back the base values of those another task had changed: no reload.

    from fairseq_ext.plugin.predictor import MultiTaskPredictor
    predictor = MultiTaskPredictor(model_dir)            # a model folder, or a checkpoint (+ dictionary=)
    predictor.add_task("cola", "runs/cola/checkpoint_best.delta.safetensors")
    predictor.add_task("rte", "runs/rte/checkpoint_best.delta.safetensors")
    predictor.predict("cola", ["The book was read by Mary."])
    predictor.predict("rte", [("A man sleeps.", "A person rests.")])
    # -> [Prediction(label='1', score=0.93, logits=[...], probabilities=[...])]

``predict_mixed`` serves a batch that mixes tasks in one forward pass: every frozen
weight is shared and each example gets its own task's bias terms (``PerExampleBiases``)
and head; its logits equal ``predict``'s within float rounding (1e-6).

    predictor.predict_mixed([("cola", "The book was read by Mary."), ("rte", ("A man sleeps.", "A person rests."))])

Examples are encoded as the run's training data was: the model folder's
tokenizer (none for a bare checkpoint: whitespace-separated tokens, as
fairseq-preprocess without --bpe) and dictionary, then the task's --init-token
and --separator-token (BERT pairs ``<s> a </s> b </s>``, RoBERTa pairs
``<s> a </s> </s> b </s>``), truncated to the task's length; batches group
examples of similar length.  Logits are bit-identical to the run's full
checkpoint for the same batches.

The command line (``python -m fairseq_ext.tools.predict``) reads GLUE test files
and plain text; ``predict_prepared_split`` scores a prepared GLUE split with a
full checkpoint (the GLUE runner's leaderboard files).
"""
from __future__ import annotations

import contextlib
import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from fairseq import checkpoint_utils
from fairseq.data import Dictionary
from fairseq.data.data_utils import collate_tokens
from fairseq.modules import MultiheadAttention
from torch import nn

from ..core.delta_checks import validate_delta
from ..core.delta_file import Delta, check_base_fingerprint, check_delta_fits, dictionary_identity, read_delta
from ..core.errors import UserError
from ..core.glue_tasks import TASK_NAMES, get_task_spec
from . import patches
from .checkpoints import add_trust_checkpoint_argument, load_checkpoint_file
from .deltas import InPlaceDeltas, check_same_model, register_head, shared_model
from .models.model_dir import MODEL_INFO, build_bpe, load_model_dir

logger = logging.getLogger(__name__)

Example = Union[str, Sequence[str]]  # a sentence, or a pair of sentences
Item = Tuple[str, Example]  # (task, example), for a batch that mixes tasks
_ATTENTION_PROJECTION = re.compile(r"^(.*)\.(q|k|v|out)_proj\.bias$")


@dataclass
class Prediction:
    label: Optional[str]  # the predicted class's name; None for regression
    score: float  # the predicted class's probability; the predicted value for regression
    logits: List[float]
    probabilities: Optional[List[float]]  # softmax over the classes, in class order; None for regression


@dataclass
class _Task:
    name: str
    delta: Delta
    head_key: str  # its head in model.classification_heads
    body: Dict[str, torch.Tensor]  # its trained non-head tensors, float32 on the model's device
    pair: Optional[bool]  # True/False when known (a GLUE task), None: either


def usable_device(name: str) -> torch.device:
    """The torch device ``--device`` names, if this machine has it."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this torch has no CUDA device; use --device cpu")
    return device


class MultiTaskPredictor:
    """One base model, many task deltas; see the module docstring."""

    def __init__(self, base, *, dictionary=None, trust_checkpoint: bool = False, batch_size: int = 32,
                 device: str = "cpu"):
        base = Path(base)
        if base.is_file() and base.name == "model.pt" and (base.parent / MODEL_INFO).is_file():
            base = base.parent  # a model folder's own model.pt stands for the folder: its tokenizer applies
        if base.is_dir():
            model_dir = load_model_dir(base)
            checkpoint, dictionary = model_dir.checkpoint, dictionary or model_dir.dictionary
            self._bpe = build_bpe(model_dir)
        elif base.is_file():
            checkpoint, dictionary = base, dictionary or base.parent / "dict.txt"
            self._bpe = None
        else:
            raise UserError(f"--base {base}: no such model folder or checkpoint")
        if not Path(dictionary).is_file():
            raise UserError(f"{dictionary}: no such dictionary (the base model's fairseq dict.txt)")
        if batch_size < 1:
            raise UserError(f"--batch-size {batch_size}: must be at least 1")
        self.dictionary = Dictionary.load(str(dictionary))
        self.dictionary.add_symbol("<mask>")  # as sentence_prediction and masked_lm load it
        self.batch_size = batch_size
        self.device = usable_device(device)
        self.base_source = str(checkpoint)
        self._base_state: Optional[dict] = load_checkpoint_file(checkpoint, trust_checkpoint)["model"]
        self.model = None  # built from the first task's model config
        self._model_delta: Optional[Delta] = None
        self._in_place: Optional[InPlaceDeltas] = None  # each task's bias tensors, swapped into the model
        self._tasks: Dict[str, _Task] = {}
        self._mixed: Optional[PerExampleBiases] = None  # the bias tables of the tasks added so far

    # -- tasks ------------------------------------------------------------------------

    @property
    def tasks(self) -> List[str]:
        return list(self._tasks)

    def add_task(self, name: str, delta: Union[str, Path, Delta]) -> None:
        """Add a task from its delta file; the delta must come from a run on this base."""
        if name in self._tasks:
            raise UserError(f"task {name!r} is added twice")
        if isinstance(delta, Delta):
            validate_delta(delta)  # read_delta checks what it reads; one made in memory is checked here
        else:
            delta = read_delta(delta)
        source = f"--delta {name}={delta.path}"
        check_task_delta(name, delta)
        if self.model is None:
            self._build(delta, source)
        else:
            check_same_model(self._model_delta, delta, source)
        if dictionary_identity(self.dictionary) != delta.source_dictionary:
            raise UserError(f"{source}: trained with another dictionary ({delta.dictionary['size']} symbols) than "
                            f"the base's ({len(self.dictionary)} symbols)")
        base = self._in_place.base_state()
        check_base_fingerprint(base, delta, f"--base {self.base_source}", force_flag=None)
        # float32 like the model (see _build); bf16/fp16 deltas upcast losslessly.
        body = {tensor_name: tensor.float() for tensor_name, tensor in delta.body_tensors(base).items()}
        check_delta_fits(self.model, body, source)
        head_key = f"task{len(self._tasks)}"
        head_tensors = delta.head_tensors(delta.head_name)
        register_head(self.model, head_key, head_tensors)
        try:  # the head must read the model's features: refused in one line, the model left as it was
            check_delta_fits(self.model, {f"classification_heads.{head_key}.{tensor_name}": tensor.float()
                                          for tensor_name, tensor in head_tensors.items()}, source)
        except UserError:
            del self.model.classification_heads[head_key]
            raise
        head = self.model.classification_heads[head_key].to(self.device).eval()
        head.load_state_dict(head_tensors, strict=True)
        glue_task = delta.glue_task
        pair = get_task_spec(glue_task).is_pair if glue_task else None
        body = {tensor_name: tensor.to(self.device) for tensor_name, tensor in body.items()}
        self._in_place.add(name, body)
        self._tasks[name] = _Task(name, delta, head_key, body, pair)
        self._mixed = None

    def _build(self, delta: Delta, source: str) -> None:
        self.model = shared_model(delta, self._base_state, source, self.device, self.dictionary)
        self._model_delta = delta
        self._base_state = None  # the model holds the base now
        self._in_place = InPlaceDeltas(self.model)

    def delta(self, name: str) -> Delta:
        return self._task(name).delta

    def takes_pairs(self, name: str) -> Optional[bool]:
        """Whether task ``name`` reads sentence pairs (known for GLUE tasks), else None."""
        return self._task(name).pair

    def _task(self, name: str) -> _Task:
        if name not in self._tasks:
            raise UserError(f"no task {name!r}; added: {', '.join(self._tasks) or 'none'}")
        return self._tasks[name]

    def use(self, name: str) -> None:
        """Switch the shared model to task ``name``: copy its bias tensors in place."""
        self._in_place.use(self._task(name).name)

    # -- encoding and batching ----------------------------------------------------------

    def encode(self, name: str, examples: Sequence[Example]) -> List[torch.Tensor]:
        """Token ids per example, exactly as the task's training data was encoded."""
        task = self._task(name)
        return [self._encode(task, example) for example in examples]

    def check(self, name: str, examples: Sequence[Example]) -> None:
        """Refuse what ``encode`` would refuse (an unknown task, a malformed example, a pair for a
        single-sentence task), without tokenizing."""
        task = self._task(name)
        for example in examples:
            self._texts(task, example)

    @staticmethod
    def _texts(task: _Task, example: Example) -> Tuple[str, ...]:
        texts = (example,) if isinstance(example, str) else tuple(example)
        if not 1 <= len(texts) <= 2 or not all(isinstance(text, str) for text in texts):
            raise UserError(f"an example is a sentence or a pair of sentences, not {example!r}")
        if task.pair is not None and (len(texts) == 2) != task.pair:
            raise UserError(f"task {task.name!r} ({task.delta.glue_task}) takes "
                            f"{'sentence pairs' if task.pair else 'single sentences'}")
        return texts

    def _encode(self, task: _Task, example: Example) -> torch.Tensor:
        texts = self._texts(task, example)
        cfg = task.delta.task_cfg
        segments = []
        for position, text in enumerate(texts):
            line = self._bpe.encode(text) if self._bpe is not None else text
            ids = self.dictionary.encode_line(line, append_eos=True, add_if_not_exist=False).long()
            # sentence_prediction: <init> first sentence, then <separator> second sentence.
            prefix = cfg.get("init_token") if position == 0 else cfg.get("separator_token")
            if prefix is not None:
                ids = torch.cat([ids.new_tensor([prefix]), ids])
            segments.append(ids)
        tokens = torch.cat(segments)
        truncate_to = self.max_tokens(task.name)
        return tokens[:truncate_to] if truncate_to else tokens

    def max_tokens(self, name: str) -> Optional[int]:
        """The length task ``name``'s examples are truncated to (its training's), None: not truncated."""
        delta = self._task(name).delta
        return delta.task.get("truncate_to") or delta.task_cfg.get("max_positions")

    def batches(self, tokens: Sequence[torch.Tensor]) -> Iterator[Tuple[List[int], torch.Tensor]]:
        """(example indices, right-padded src_tokens) batches of similar length, longest first."""
        order = sorted(range(len(tokens)), key=lambda i: -len(tokens[i]))
        for start in range(0, len(order), self.batch_size):
            indices = order[start:start + self.batch_size]
            yield indices, collate_tokens([tokens[i] for i in indices], self.dictionary.pad(), left_pad=False)

    # -- prediction -------------------------------------------------------------------

    @torch.no_grad()
    def logits(self, name: str, examples: Sequence[Example]) -> torch.Tensor:
        """[N, classes] head outputs in the order of ``examples`` (the model's dtype)."""
        task = self._task(name)
        tokens = self.encode(name, examples)
        self.use(name)
        rows: List[Optional[torch.Tensor]] = [None] * len(tokens)
        for indices, src_tokens in self.batches(tokens):
            output, _ = self.model(src_tokens.to(self.device), features_only=True,
                                   classification_head_name=task.head_key)
            for index, row in zip(indices, output.cpu()):
                rows[index] = row
        if not rows:
            return torch.empty(0, self.model.classification_heads[task.head_key].out_proj.out_features)
        return torch.stack(rows)

    def predict(self, name: str, examples: Sequence[Example]) -> List[Prediction]:
        """One Prediction per example: label, score, logits and class probabilities."""
        delta = self._task(name).delta
        return [_prediction(delta, row) for row in self.logits(name, examples).float()]

    # -- mixed-task batches -------------------------------------------------------------

    @torch.no_grad()
    def logits_mixed(self, items: Sequence[Item]) -> List[torch.Tensor]:
        """Head outputs of ``(task, example)`` items in any order and mix, in input order.

        One forward pass per batch of similar length, whatever its tasks: the frozen
        weights are shared, each example gets its task's bias terms (the base values
        where its task trains fewer terms than another), and each task's head runs on
        its rows.  The model's in-place task (``use``) is left as it was.
        """
        encoded = []
        for item in items:
            if isinstance(item, str) or len(item) != 2 or not isinstance(item[0], str):
                raise UserError(f"an item is (task, sentence or pair of sentences), not {item!r}")
            encoded.append((item[0], self._encode(self._task(item[0]), item[1])))
        return self.logits_mixed_encoded(encoded)

    @torch.no_grad()
    def logits_mixed_encoded(self, encoded: Sequence[Tuple[str, torch.Tensor]]) -> List[torch.Tensor]:
        """``logits_mixed`` of ``(task, token ids from encode)`` items: a server tokenizes on
        another thread than the one running the model."""
        if not encoded:
            return []
        task_names = list(self._tasks)
        task_of = torch.tensor([task_names.index(self._task(name).name) for name, _ in encoded], dtype=torch.long)
        tokens = [ids for _, ids in encoded]
        mixed = self.prepare_mixed()
        rows: List[Optional[torch.Tensor]] = [None] * len(tokens)
        for indices, src_tokens in self.batches(tokens):
            src_tokens, task_index = src_tokens.to(self.device), task_of[indices].to(self.device)
            with mixed.applied(task_index):
                features, _ = self.model(src_tokens, features_only=True)
            padding_mask = src_tokens.eq(self.dictionary.pad())
            for task_number in task_index.unique().tolist():
                selected = (task_index == task_number).nonzero(as_tuple=True)[0]
                head = self.model.classification_heads[self._tasks[task_names[task_number]].head_key]
                output = head(features.index_select(0, selected), padding_mask=padding_mask.index_select(0, selected))
                for position, row in zip(selected.tolist(), output.cpu()):
                    rows[indices[position]] = row
        return rows

    def predict_mixed(self, items: Sequence[Item]) -> List[Prediction]:
        """``predict`` for ``(task, example)`` items in any order and mix, in one pass per batch."""
        return [self.prediction(item[0], row) for item, row in zip(items, self.logits_mixed(items))]

    def prediction(self, name: str, logits: torch.Tensor) -> Prediction:
        """Task ``name``'s Prediction from one example's head output."""
        return _prediction(self._task(name).delta, logits.float())

    def prepare_mixed(self) -> "PerExampleBiases":
        """The bias tables of the tasks added so far (made once after each add_task); a UserError
        if some task trains what a mixed batch cannot add per example.  Servers call it at start."""
        if self._mixed is None:
            if not self._tasks:
                raise UserError("no task added")
            trained = sorted({name for task in self._tasks.values() for name in task.body})
            tables = {name: torch.stack([task.body.get(name, self._in_place.base_values[name])
                                         for task in self._tasks.values()]) for name in trained}
            probe = torch.full((2, 3), self.dictionary.unk(), dtype=torch.long, device=self.device)
            probe[:, 0], probe[:, -1] = self.dictionary.bos(), self.dictionary.eos()
            self._mixed = PerExampleBiases(self.model, tables, probe)
        return self._mixed


class PerExampleBiases:
    """Each example's own bias terms in one forward pass over a batch that mixes tasks.

    A BitFit task changes only additive terms: a Linear's ``x @ W.T + b`` and a LayerNorm's
    ``norm(x) * g + beta``.  For the pass, each biased module in ``tables`` ({parameter name:
    [tasks, dim]}) has its bias set to zero and a forward hook adds every example's row of
    the table, gathered by the example's task index.  fairseq's attention then computes
    through its projection modules (``patches.attention_through_projections``).  Which
    dimension of each module's output is the batch (fairseq's encoder layers and a pre-norm
    encoder's final LayerNorm run time-major, its embedding LayerNorm batch-major) is read
    off one forward pass of ``probe``, a [2, 3] batch of token ids.
    """

    def __init__(self, model: nn.Module, tables: Dict[str, torch.Tensor], probe: torch.Tensor):
        modules = dict(model.named_modules())
        self.tables = tables
        self.parameters = dict(model.named_parameters())
        targets = {}
        attention = {}
        for name in tables:
            module_name, _, kind = name.rpartition(".")
            module = modules.get(module_name)
            if kind != "bias" or not _adds_its_bias(module):
                raise UserError(f"{name}: a mixed-task batch adds per-task bias terms of Linear and LayerNorm "
                                "modules only; predict tasks that train other tensors one task at a time (predict)")
            targets[name] = module
            projection = _ATTENTION_PROJECTION.match(name)
            if projection and isinstance(modules.get(projection.group(1)), MultiheadAttention):
                attention[projection.group(1)] = modules[projection.group(1)]
        self.attention = list(attention.values())
        self.targets = {}  # parameter name -> (module, the batch dimension of its output)
        for name, batch_dim in _batch_dims(model, targets, probe, self.attention).items():
            self.targets[name] = (targets[name], batch_dim)
        self.zeros = {name: torch.zeros_like(self.parameters[name]) for name in self.targets}

    @contextlib.contextmanager
    def applied(self, task_index: torch.Tensor):
        """While the block runs, example i of the model's input gets the biases of task ``task_index[i]``."""
        saved, handles = {}, []
        try:
            for name, (module, batch_dim) in self.targets.items():
                rows = self.tables[name].index_select(0, task_index).unsqueeze(1 - batch_dim)
                saved[name] = self.parameters[name].data
                self.parameters[name].data = self.zeros[name]  # swapped for the pass, not copied
                handles.append(module.register_forward_hook(functools.partial(_add_rows, rows=rows,
                                                                              batch_dim=batch_dim)))
            with patches.attention_through_projections(self.attention):
                yield
        finally:
            for handle in handles:
                handle.remove()
            for name, data in saved.items():
                self.parameters[name].data = data


def _adds_its_bias(module) -> bool:
    """A module whose bias is added to its output last: Linear, and LayerNorms (torch's, apex's)."""
    return isinstance(module, (nn.Linear, nn.LayerNorm)) or (
        type(module).__name__.endswith("LayerNorm") and hasattr(module, "normalized_shape"))


@torch.no_grad()
def _batch_dims(model: nn.Module, targets: Dict[str, nn.Module], probe: torch.Tensor,
                attention: List[nn.Module]) -> Dict[str, int]:
    """{parameter name: the batch dimension of its module's output} from one forward of ``probe``
    (batch 2, length 3), with ``attention`` through its projections as in a mixed pass; modules
    the forward never runs are left out: their bias is never added."""
    batch, length = probe.shape
    shapes, handles = {}, []

    def record(module, inputs, output, name):
        shapes.setdefault(name, tuple(output.shape))  # returns None: the output stays as it is

    try:
        for name, module in targets.items():
            handles.append(module.register_forward_hook(functools.partial(record, name=name)))
        with patches.attention_through_projections(attention):
            model(probe, features_only=True)
    finally:
        for handle in handles:
            handle.remove()
    dims = {}
    for name, shape in shapes.items():
        if shape[:2] == (batch, length):
            dims[name] = 0
        elif shape[:2] == (length, batch):
            dims[name] = 1
        else:
            raise UserError(f"{name}: its module's output {shape} has no batch x time layout; a mixed-task batch "
                            "cannot add per-example biases there")
    return dims


def _add_rows(module, inputs, output, rows, batch_dim):
    if output.shape[batch_dim] != rows.shape[batch_dim]:
        raise RuntimeError(f"{type(module).__name__} output {tuple(output.shape)}: batch not in dimension {batch_dim}")
    output.add_(rows)  # in place: the module's fresh output, no second activation-sized tensor (no grad here)


def _prediction(delta: Delta, logits: torch.Tensor) -> Prediction:
    """One example's Prediction from its head output (float32)."""
    if delta.regression:
        return Prediction(None, float(logits[0]), logits.tolist(), None)
    probabilities = torch.softmax(logits, dim=-1)
    labels = delta.label_symbols or [str(i) for i in range(logits.shape[0])]
    best = int(probabilities.argmax())
    return Prediction(labels[best], float(probabilities[best]), logits.tolist(), probabilities.tolist())


def add_predictor_arguments(parser, base_help: str) -> None:
    """The command-line options a MultiTaskPredictor is built from (the predict and serve tools)."""
    parser.add_argument("--base", required=True, help=base_help)
    parser.add_argument("--delta", action="append", required=True, metavar="TASK=PATH",
                        help="a task and its delta (repeatable)")
    parser.add_argument("--dictionary", help="the base's dict.txt (default: the model folder's, or beside --base)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    add_trust_checkpoint_argument(parser)


def parse_delta_options(values: Sequence[str]) -> Dict[str, str]:
    """{task: delta path} of ``--delta TASK=PATH`` options; a task named twice is an error."""
    deltas = {}
    for value in values:
        name, separator, path = value.partition("=")
        if not separator or not name.strip() or not path:
            raise UserError(f"--delta {value!r}: expected TASK=PATH, e.g. "
                            "--delta cola=runs/cola/checkpoint_best.delta.safetensors")
        if name.strip() in deltas:
            raise UserError("--delta: a task name is given twice")
        deltas[name.strip()] = path
    return deltas


def check_task_delta(name: str, delta: Delta) -> None:
    """What the predictors need of a delta served as task ``name``, checked before any model or input is
    read: a classification delta, with its head, of the GLUE task ``name`` names (if it names one)."""
    source = f"--delta {name}={delta.path}"
    if delta.is_seq2seq:
        raise UserError(f"{source}: {delta.describe_kind()}: it generates sequences, it has no labels to "
                        "predict; generate with python -m fairseq_ext.tools.generate")
    check_task_name(name, delta)
    if delta.head_name not in delta.head_names():
        raise UserError(f"{source}: holds no classification head {delta.head_name!r}")


def check_task_name(name: str, delta: Delta) -> None:
    """A task named like a GLUE task must be the GLUE task its delta was trained on (``--delta MRPC=``
    with an RTE delta would answer with RTE's labels)."""
    named = next((t for t in TASK_NAMES if t.lower() == name.lower()), None)
    if named is not None and delta.glue_task is not None and named != delta.glue_task:
        raise UserError(f"--delta {name}={delta.path}: that delta was trained on GLUE {delta.glue_task}, not "
                        f"{named}; name the task after what it predicts, e.g. --delta {delta.glue_task}=...")


def glue_spec_for(name: str, delta: Delta):
    """The GLUE task of a delta (its glue task, or a --task named like a GLUE task), or None."""
    glue_name = delta.glue_task or next((t for t in TASK_NAMES if t.lower() == name.lower()), None)
    if glue_name is None:
        return None
    spec = get_task_spec(glue_name)
    labels = None if spec.regression else list(spec.labels)
    if delta.regression != spec.regression or (labels is not None and delta.label_symbols != labels):
        def outputs(regression, symbols):
            return "a regression target" if regression else "classes " + ", ".join(symbols or [])

        raise UserError(f"--task {name}: GLUE {spec.name} has {outputs(spec.regression, labels)}, but {delta.path} "
                        f"predicts {outputs(delta.regression, delta.label_symbols)}")
    return spec


@torch.no_grad()
def predict_prepared_split(checkpoint, prepared_dir, split: str, batch_size: int = 64,
                           progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """A full checkpoint's classification logits [N, classes] or regression scores [N] on a split
    prepared by glue_prepare (the test sets, mostly), in the split's row order.  ``progress(done,
    total)`` is called after each batch."""
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(checkpoint)], arg_overrides={"data": str(Path(prepared_dir))}
    )
    model = models[0].eval()
    task.load_dataset(split)
    dataset = task.dataset(split)
    batches = task.get_batch_iterator(
        dataset, max_sentences=batch_size, max_positions=None, ignore_invalid_inputs=False, seed=1,
        num_workers=0,
    ).next_epoch_itr(shuffle=False)
    outputs = [None] * len(dataset)
    done = 0
    for sample in batches:
        logits, _ = model(
            **sample["net_input"], features_only=True,
            classification_head_name=cfg.task.classification_head_name,
        )
        for example_id, row in zip(sample["id"].tolist(), logits.float().cpu().numpy()):
            outputs[example_id] = row
        done += len(sample["id"])
        if progress is not None:
            progress(done, len(dataset))
    return np.stack(outputs).squeeze(-1) if task.cfg.regression_target else np.stack(outputs)
