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
weight is shared and each example gets its own task's bias terms (``mixed_batches.PerExampleBiases``)
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
and plain text; the options it shares with the server are in ``predictor_options``.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from fairseq.data import Dictionary
from fairseq.data.data_utils import collate_tokens

from ..core.delta_checks import validate_delta
from ..core.delta_file import Delta, check_base_fingerprint, check_delta_fits, dictionary_identity, read_delta
from ..core.errors import UserError
from ..core.glue_tasks import get_task_spec
from .checkpoints import load_checkpoint_file
from .deltas import InPlaceDeltas, check_same_model, register_head, shared_model, tuner_of
from .mixed_batches import PerExampleBiases
from .models.model_dir import MODEL_INFO, build_bpe, load_model_dir
from .predictor_options import check_task_delta, usable_device

logger = logging.getLogger(__name__)

Example = Union[str, Sequence[str]]  # a sentence, or a pair of sentences
Item = Tuple[str, Example]  # (task, example), for a batch that mixes tasks


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
        if mixed is None:
            return self._logits_task_by_task(encoded)
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

    def _logits_task_by_task(self, encoded: Sequence[Tuple[str, torch.Tensor]]) -> List[torch.Tensor]:
        """Mixed items as sub-batches of one task each, each task switched in place (LoRA, IA3 and
        adapters change more than biases, which a mixed batch cannot add per example)."""
        rows: List[Optional[torch.Tensor]] = [None] * len(encoded)
        active = self._in_place.active
        by_task: Dict[str, List[int]] = {}
        for position, (name, _) in enumerate(encoded):
            by_task.setdefault(name, []).append(position)
        try:
            for name, positions in by_task.items():
                self.use(name)
                head_key = self._task(name).head_key
                for indices, src_tokens in self.batches([encoded[p][1] for p in positions]):
                    output, _ = self.model(src_tokens.to(self.device), features_only=True,
                                           classification_head_name=head_key)
                    for index, row in zip(indices, output.cpu()):
                        rows[positions[index]] = row
        finally:
            if active is not None:
                self.use(active)
        return rows

    def predict_mixed(self, items: Sequence[Item]) -> List[Prediction]:
        """``predict`` for ``(task, example)`` items in any order and mix, in one pass per batch."""
        return [self.prediction(item[0], row) for item, row in zip(items, self.logits_mixed(items))]

    def prediction(self, name: str, logits: torch.Tensor) -> Prediction:
        """Task ``name``'s Prediction from one example's head output."""
        return _prediction(self._task(name).delta, logits.float())

    def prepare_mixed(self) -> Optional["PerExampleBiases"]:
        """The bias tables of the tasks added so far (made once after each add_task); None when the
        tasks carry a tuner (LoRA, IA3, adapters: their mixed batches run task by task); a UserError
        if some task trains what a mixed batch cannot add per example.  Servers call it at start."""
        if not self._tasks:
            raise UserError("no task added")
        if any(tuner_of(task.delta) is not None for task in self._tasks.values()):
            return None
        if self._mixed is None:
            trained = sorted({name for task in self._tasks.values() for name in task.body})
            tables = {name: torch.stack([task.body.get(name, self._in_place.base_values[name])
                                         for task in self._tasks.values()]) for name in trained}
            probe = torch.full((2, 3), self.dictionary.unk(), dtype=torch.long, device=self.device)
            probe[:, 0], probe[:, -1] = self.dictionary.bos(), self.dictionary.eos()
            self._mixed = PerExampleBiases(self.model, tables, probe)
        return self._mixed


def _prediction(delta: Delta, logits: torch.Tensor) -> Prediction:
    """One example's Prediction from its head output (float32)."""
    if delta.regression:
        return Prediction(None, float(logits[0]), logits.tolist(), None)
    probabilities = torch.softmax(logits, dim=-1)
    labels = delta.label_symbols or [str(i) for i in range(logits.shape[0])]
    best = int(probabilities.argmax())
    return Prediction(labels[best], float(probabilities[best]), logits.tolist(), probabilities.tolist())
