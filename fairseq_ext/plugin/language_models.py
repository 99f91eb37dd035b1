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
from typing import List, Sequence

from ..core.delta_file import Delta
from ..core.errors import UserError
from .deltas import check_language_model_dictionaries, language_model_task
from .seq2seq import DeltaGenerationPredictor
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


class LanguageModelPredictor(DeltaGenerationPredictor):
    """One base decoder-only language model, many deltas; see the module docstring.

    ``base`` is the checkpoint the runs started from (``--restore-file``), or a folder holding it as
    ``model.pt``; the dictionary (``dict.txt``) is read from ``data`` (default: the base's folder), or
    comes with ``task``, a fairseq language-modelling task already set up (fairseq-eval-lm's).
    ``draw_init_as_fairseq``: see ``deltas.shared_model`` (the command lines set it, so that sampling
    with --seed draws what it draws from a merged checkpoint).
    """

    def check_delta_kind(self, delta: Delta, source: str) -> None:
        check_language_model(delta, source)

    def new_task(self, delta: Delta):
        return language_model_task(delta, self.data)

    def check_task(self, task, delta: Delta, source: str) -> None:
        check_language_model_task(task, delta, source)

    def check_dictionaries(self, task, delta: Delta, source: str) -> None:
        check_language_model_dictionaries(task, delta, source)

    def sample(self, name: str, prompts: Sequence[str], beam: int = 1, **options) -> List[str]:
        """Each prompt continued, as text (the prompt included, as fairseq's hub returns it); ``options``:
        fairseq's generation options (``sampling``, ``sampling_topk``, ``sampling_topp``, ``temperature``,
        ``max_len_b``, ``no_repeat_ngram_size``, ...)."""
        self.check_generation_options(prompts, options)
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
        self.check_generation_options(sentences, options)
        self.use(name)
        if not sentences:
            return []
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*pin_memory.*")
            return self.hub.score(list(sentences), **options)
