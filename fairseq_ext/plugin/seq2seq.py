"""Sequence-to-sequence BitFit: generate from a base model plus task deltas, no merged checkpoint.

A seq2seq BitFit run (``train.py --task translation --arch transformer|bart_base|... --bitfit``)
trains bias terms only; its delta records the task with its languages, both dictionaries and
the model config (``training.delta_writer``), and ``delta apply`` merges it (``plugin.deltas``).

``Seq2SeqPredictor`` keeps one base model in memory and any number of task deltas; switching
tasks copies a task's few bias tensors into the model in place (``InPlaceDeltas``, as the
classification predictor does).  Generation is fairseq's own: its hub interface
(``GeneratorHubInterface``: the task's ``SequenceGenerator``, every generation option).

    from fairseq_ext.plugin.seq2seq import Seq2SeqPredictor
    predictor = Seq2SeqPredictor("pretrained/checkpoint_best.pt", data="data-bin")  # dict.{src,tgt}.txt there
    predictor.add_task("news", "runs/news/checkpoint_best.delta.safetensors")
    predictor.add_task("chat", "runs/chat/checkpoint_best.delta.safetensors")
    predictor.translate("news", ["s3 s1 s4"], beam=4, lenpen=0.6, max_len_b=50)   # -> ["t7 t2 t9"]
    predictor.generate("chat", ["s3 s1 s4"], beam=4, nbest=2)                      # fairseq's n-best dicts

Sentences are text as the training data was before fairseq-preprocess (tokens of the source
dictionary); hypotheses come back as target-dictionary text.  The command line, fairseq-generate
with ``--delta`` (``python -m fairseq_ext.tools.generate``), hands fairseq's own generation loop
this predictor's model (``patches.models_in_memory``).
"""
import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

from fairseq.dataclass.configs import GenerationConfig
from fairseq.hub_utils import GeneratorHubInterface
from fairseq.tasks.translation import TranslationTask
from omegaconf import OmegaConf

from ..core.delta_file import Delta, check_base_fingerprint, check_delta_fits, read_delta
from ..core.errors import UserError
from .checkpoints import load_checkpoint_file
from .deltas import (InPlaceDeltas, check_base_model, check_same_model, check_seq2seq_dictionaries, merged_cfg,
                     seq2seq_task, shared_model)
from .predictor_options import usable_device

# Keyword options translate() and generate() pass on: fairseq's generation options, and the hub's own.
GENERATION_OPTIONS = frozenset(name for name in GenerationConfig.__dataclass_fields__ if name != "_name")
HUB_OPTIONS = frozenset(("verbose", "skip_invalid_size_inputs", "inference_step_args", "prefix_allowed_tokens_fn"))


def is_seq2seq_task(task) -> bool:
    """Translation and the tasks built on it (summarization runs are ``--task translation`` on text pairs)."""
    return isinstance(task, TranslationTask)


def check_generates(delta: Delta, source: str) -> None:
    """Only a seq2seq delta generates: a classification delta predicts labels."""
    if not delta.is_seq2seq:
        raise UserError(f"{source}: {delta.describe_kind()}: it predicts labels, it does not generate; "
                        "use python -m fairseq_ext.tools.predict")


class DeltaGenerationPredictor:
    """One base fairseq model in memory and many BitFit deltas switched in place, for fairseq's hub
    interface (generation, scoring).  A subclass says which deltas it takes and how it reads their task:
    ``check_delta_kind``, ``new_task``, ``check_task`` (the first delta's) and ``check_dictionaries`` (the
    others').

    ``base`` is the checkpoint the runs started from (``--restore-file``), or a folder holding it as
    ``model.pt``; dictionaries are read from ``data`` (default: the base's folder), or come with ``task``,
    a fairseq task already set up (fairseq-generate's).  ``model_overrides`` change the model's config as
    fairseq's ``--model-overrides`` does; ``draw_init_as_fairseq``: see ``deltas.shared_model``.
    """

    def __init__(self, base, data=None, *, task=None, trust_checkpoint: bool = False, device: str = "cpu",
                 model_overrides: Optional[Mapping[str, object]] = None, base_flag: str = "--base",
                 draw_init_as_fairseq: bool = False):
        base = Path(base)
        if base.is_dir():
            base = base / "model.pt"  # fairseq's released models: model.pt, the dictionaries beside it
        self.base_source = f"{base_flag} {base}"
        self.data = Path(data) if data is not None else base.parent
        self.device = usable_device(device)
        self._base: Optional[dict] = load_checkpoint_file(base, trust_checkpoint, flag=base_flag)
        self.task = task
        self._model_overrides = dict(model_overrides or {})
        self._draw_init_as_fairseq = draw_init_as_fairseq
        self.model = None  # built from the first delta's model config
        self.cfg = None  # the first delta's run config (fairseq's omegaconf form): generation defaults
        self._model_delta: Optional[Delta] = None
        self._in_place: Optional[InPlaceDeltas] = None
        self._deltas: Dict[str, Delta] = {}
        self._hub: Optional[GeneratorHubInterface] = None

    # What a subclass says of its deltas.
    def check_delta_kind(self, delta: Delta, source: str) -> None:
        raise NotImplementedError

    def new_task(self, delta: Delta):
        raise NotImplementedError

    def check_task(self, task, delta: Delta, source: str) -> None:
        raise NotImplementedError

    def check_dictionaries(self, task, delta: Delta, source: str) -> None:
        raise NotImplementedError

    # -- tasks ------------------------------------------------------------------------

    @property
    def tasks(self) -> List[str]:
        return list(self._deltas)

    def delta(self, name: str) -> Delta:
        return self._deltas[self._task_name(name)]

    def add_task(self, name: str, delta: Union[str, Path, Delta]) -> None:
        """Add a task from its delta file; the delta must come from a run on this base and dictionaries."""
        if name in self._deltas:
            raise UserError(f"task {name!r} is added twice")
        if not isinstance(delta, Delta):
            delta = read_delta(delta)
        source = f"--delta {delta.path}"
        self.check_delta_kind(delta, source)
        if self.model is None:
            self._build(delta, source)
        else:
            check_same_model(self._model_delta, delta, source)
            self.check_dictionaries(self.task, delta, source)
        check_base_fingerprint(self._in_place.base_state(), delta, self.base_source, force_flag=None)
        # float32 like the model (see _build); bf16/fp16 deltas upcast losslessly.
        tensors = {tensor_name: tensor.float().to(self.device) for tensor_name, tensor in delta.tensors.items()}
        check_delta_fits(self.model, tensors, source)
        self._in_place.add(name, tensors)
        self._deltas[name] = delta

    def _build(self, delta: Delta, source: str) -> None:
        check_base_model(self._base, delta, self.base_source)
        if self.task is None:
            self.task = self.new_task(delta)
        self.check_task(self.task, delta, source)
        self.model = shared_model(delta, self._base["model"], self.base_source, self.device,
                                  self.task.source_dictionary, self.task.target_dictionary, self._model_overrides,
                                  self._draw_init_as_fairseq)
        self._base = None  # the model holds the base now
        self._model_delta = delta
        self._in_place = InPlaceDeltas(self.model)
        # The config as fairseq reads it from a checkpoint (omegaconf, the legacy model Namespace kept).
        self.cfg = OmegaConf.create(merged_cfg(delta), flags={"allow_objects": True})

    def _task_name(self, name: str) -> str:
        if name not in self._deltas:
            raise UserError(f"no task {name!r}; added: {', '.join(self._deltas) or 'none'}")
        return name

    def use(self, name: str) -> None:
        """Switch the shared model to task ``name``: copy its bias tensors in place."""
        self._in_place.use(self._task_name(name))

    @property
    def hub(self) -> GeneratorHubInterface:
        """fairseq's generation interface over the shared model (whichever task is in use)."""
        if self.model is None:
            raise UserError("no task added")
        if self._hub is None:
            self._hub = GeneratorHubInterface(self.cfg, self.task, [self.model]).to(self.device)
        return self._hub

    @staticmethod
    def check_generation_options(texts: Sequence[str], options: Mapping[str, object]) -> None:
        unknown = sorted(set(options) - GENERATION_OPTIONS - HUB_OPTIONS)
        if unknown:
            raise UserError(f"unknown generation option {unknown[0]!r}; fairseq's are "
                            f"{', '.join(sorted(GENERATION_OPTIONS))}")
        if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
            raise UserError("sentences are a list of strings")


class Seq2SeqPredictor(DeltaGenerationPredictor):
    """One base seq2seq model, many task deltas; see the module docstring (the dictionaries are
    ``dict.{lang}.txt`` in ``data``)."""

    def check_delta_kind(self, delta: Delta, source: str) -> None:
        check_generates(delta, source)

    def new_task(self, delta: Delta):
        return seq2seq_task(delta, self.data)

    def check_task(self, task, delta: Delta, source: str) -> None:
        check_seq2seq_dictionaries(task, delta, source)

    def check_dictionaries(self, task, delta: Delta, source: str) -> None:
        check_seq2seq_dictionaries(task, delta, source)

    # -- generation: fairseq's hub interface ----------------------------------------------

    def translate(self, name: str, sentences: Sequence[str], beam: int = 5, **options) -> List[str]:
        """The best hypothesis of each sentence, as text; ``options``: fairseq's generation options
        (``lenpen``, ``max_len_b``, ``nbest``, ``sampling``, ...)."""
        return [self.hub.decode(hypotheses[0]["tokens"]) for hypotheses in
                self.generate(name, sentences, beam, **options)]

    def generate(self, name: str, sentences: Sequence[str], beam: int = 5, **options) -> List[List[dict]]:
        """fairseq's hypotheses of each sentence (``tokens``, ``score``, ``positional_scores``,
        ``alignment``), best first, in input order: the whole beam, as fairseq's hub gives it, or the
        first ``nbest`` when that option is given (as fairseq-generate prints them)."""
        self.check_generation_options(sentences, options)
        self.use(name)
        if not sentences:
            return []
        hub = self.hub
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pin_memory.*")  # fairseq's loader asks for it, CPUs lack it
            hypotheses = hub.generate([hub.encode(sentence) for sentence in sentences], beam=beam, **options)
        return [best[:options["nbest"]] for best in hypotheses] if "nbest" in options else hypotheses
