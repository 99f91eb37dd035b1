"""Decoder-only language models: a base plus BitFit deltas, evaluated and sampled with no merged checkpoint.

A language-model BitFit run (``train.py --task language_modeling --arch transformer_lm ... --bitfit``)
trains bias terms only; its delta records the task config, the dictionary and the model config
(``training.delta_writer``), and ``delta apply`` merges it (``plugin.deltas``).

``LanguageModelPredictor`` keeps one base model in memory and any number of deltas; switching
copies a delta's bias tensors in place (``InPlaceDeltas``).  Sampling and scoring are fairseq's own
hub interface (``GeneratorHubInterface``: the task's ``SequenceGenerator``, every generation option):

    from fairseq_ext.plugin.language_models import LanguageModelPredictor
    lm = LanguageModelPredictor("pretrained/checkpoint_best.pt", data="data-bin")   # dict.txt there
    lm.add_task("reviews", "runs/reviews/checkpoint_best.delta.safetensors")
    lm.sample("reviews", ["the movie"], beam=1, sampling=True, sampling_topk=10, max_len_b=20)
    lm.score("reviews", ["the movie was great ."])   # fairseq's dicts with positional_scores

The command lines, fairseq-eval-lm (``python -m fairseq_ext.tools.eval_lm``) and fairseq-generate /
-interactive (``python -m fairseq_ext.tools.generate``) with ``--delta``, hand fairseq's own loops this
predictor's model (``patches.ensemble_in_memory``).
"""
import warnings
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence, Union

from fairseq.hub_utils import GeneratorHubInterface
from omegaconf import OmegaConf

from ..core.delta_file import Delta, check_base_fingerprint, check_delta_fits, read_delta
from ..core.errors import UserError
from .checkpoints import load_checkpoint_file
from .deltas import (InPlaceDeltas, check_base_model, check_language_model_dictionaries, check_same_model,
                     language_model_task, merged_cfg, shared_model)
from .predictor import usable_device
from .seq2seq import GENERATION_OPTIONS, HUB_OPTIONS
from .task_families import LANGUAGE_MODEL, task_kind



def check_language_model(delta: Delta, source: str) -> None:
    """Only a language-model delta is evaluated or sampled as a language model."""
    if delta.kind != LANGUAGE_MODEL:
        raise UserError(f"{source}: {delta.describe_kind()}, not a language-model delta (task language_modeling)")


def check_language_model_task(task, delta: Delta, source: str) -> None:
    """The fairseq task a language-model delta is read with: language_modeling, on the run's dictionary."""
    if task_kind(task) != LANGUAGE_MODEL:
        raise UserError(f"{source}: a language-model delta; read it with --task language_modeling "
                        f"(not {type(task).__name__})")
    check_language_model_dictionaries(task, delta, source)


class LanguageModelPredictor:
    """One base decoder-only language model, many deltas; see the module docstring.

    ``base`` is the checkpoint the runs started from (``--restore-file``), or a folder holding it as
    ``model.pt``; the dictionary (``dict.txt``) is read from ``data`` (default: the base's folder), or
    comes with ``task``, a fairseq language-modelling task already set up (fairseq-eval-lm's).
    ``draw_init_as_fairseq``: see ``deltas.shared_model`` (the command lines set it, so that sampling
    with --seed draws what it draws from a merged checkpoint).
    """

    def __init__(self, base, data=None, *, task=None, trust_checkpoint: bool = False, device: str = "cpu",
                 model_overrides: Optional[Mapping[str, object]] = None, base_flag: str = "--base",
                 draw_init_as_fairseq: bool = False):
        base = Path(base)
        if base.is_dir():
            base = base / "model.pt"  # fairseq's released language models: model.pt, dict.txt beside
        self.base_source = f"{base_flag} {base}"
        self.data = Path(data) if data is not None else base.parent
        self.device = usable_device(device)
        self._base: Optional[dict] = load_checkpoint_file(base, trust_checkpoint, flag=base_flag)
        self.task = task
        self._model_overrides = dict(model_overrides or {})
        self._draw_init_as_fairseq = draw_init_as_fairseq
        self.model = None
        self.cfg = None
        self._model_delta: Optional[Delta] = None
        self._in_place: Optional[InPlaceDeltas] = None
        self._deltas: Dict[str, Delta] = {}
        self._hub: Optional[GeneratorHubInterface] = None

    @property
    def tasks(self) -> List[str]:
        return list(self._deltas)

    def add_task(self, name: str, delta: Union[str, Path, Delta]) -> None:
        """Add a delta; it must come from a language-model run on this base and dictionary."""
        if name in self._deltas:
            raise UserError(f"task {name!r} is added twice")
        if not isinstance(delta, Delta):
            delta = read_delta(delta)
        source = f"--delta {delta.path}"
        check_language_model(delta, source)
        if self.model is None:
            self._build(delta, source)
        else:
            check_same_model(self._model_delta, delta, source)
            check_language_model_dictionaries(self.task, delta, source)
        check_base_fingerprint(self._in_place.base_state(), delta, self.base_source, force_flag=None)
        tensors = {tensor_name: tensor.float().to(self.device) for tensor_name, tensor in delta.tensors.items()}
        check_delta_fits(self.model, tensors, source)
        self._in_place.add(name, tensors)
        self._deltas[name] = delta

    def _build(self, delta: Delta, source: str) -> None:
        check_base_model(self._base, delta, self.base_source)
        if self.task is None:
            self.task = language_model_task(delta, self.data)
        check_language_model_task(self.task, delta, source)
        self.model = shared_model(delta, self._base["model"], self.base_source, self.device,
                                  self.task.source_dictionary, self.task.target_dictionary, self._model_overrides,
                                  self._draw_init_as_fairseq)
        self._base = None
        self._model_delta = delta
        self._in_place = InPlaceDeltas(self.model)
        self.cfg = OmegaConf.create(merged_cfg(delta), flags={"allow_objects": True})

    def use(self, name: str) -> None:
        """Switch the shared model to delta ``name``: copy its bias tensors in place."""
        if name not in self._deltas:
            raise UserError(f"no task {name!r}; added: {', '.join(self._deltas) or 'none'}")
        self._in_place.use(name)

    @property
    def hub(self) -> GeneratorHubInterface:
        if self.model is None:
            raise UserError("no task added")
        if self._hub is None:
            self._hub = GeneratorHubInterface(self.cfg, self.task, [self.model]).to(self.device)
        return self._hub

    def _check(self, texts: Sequence[str], options: Mapping[str, object]) -> None:
        unknown = sorted(set(options) - GENERATION_OPTIONS - HUB_OPTIONS)
        if unknown:
            raise UserError(f"unknown generation option {unknown[0]!r}; fairseq's are "
                            f"{', '.join(sorted(GENERATION_OPTIONS))}")
        if isinstance(texts, str) or not all(isinstance(text, str) for text in texts):
            raise UserError("texts are a list of strings")

    def sample(self, name: str, prompts: Sequence[str], beam: int = 1, **options) -> List[str]:
        """Each prompt continued, as text (the prompt included, as fairseq's hub returns it); ``options``:
        fairseq's generation options (``sampling``, ``sampling_topk``, ``sampling_topp``, ``temperature``,
        ``max_len_b``, ``no_repeat_ngram_size``, ...)."""
        self._check(prompts, options)
        self.use(name)
        if not prompts:
            return []
        hub = self.hub
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pin_memory.*")
            hypotheses = hub.generate([hub.encode(prompt) for prompt in prompts], beam=beam, **options)
        return [hub.decode(best[0]["tokens"]) for best in hypotheses]

    def score(self, name: str, sentences: Sequence[str], **options) -> List[dict]:
        """fairseq's scores of each sentence under delta ``name``: ``tokens``, ``positional_scores``
        (natural-log probability of each token, the end of sentence included) and ``score`` (their mean)."""
        self._check(sentences, options)
        self.use(name)
        if not sentences:
            return []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pin_memory.*")
            return self.hub.score(list(sentences), **options)
