"""Which fairseq task families a BitFit run can train, and what kind of delta each one writes.

A delta records its run's task config and dictionaries so that ``delta apply``, generation and
evaluation can rebuild the run's model without the run.  fairseq keeps a task's options in two
shapes: dataclass tasks (translation, masked_lm, sentence_prediction, denoising) in ``task.cfg``;
legacy tasks (``LegacyFairseqTask``: language_modeling, sentence_ranking, multilingual_translation,
speech_to_text...) in ``task.args``, with ``task.cfg`` None.  ``task_config`` reads both.

The families, each with its delta kind (``Delta.kind``):

============================  ==================  ===============================================
fairseq task (and subclasses)  kind                what the delta is for
============================  ==================  ===============================================
sentence_prediction, glue      classification      labels (tools.predict, the server)
translation                    seq2seq             generation (tools.generate)
language_modeling              language-model      perplexity (tools.eval_lm), sampling (tools.generate)
masked_lm                      masked-lm           continued pretraining: ``delta apply``, then fine-tune
denoising                      denoising           BART's continued pretraining: ``delta apply``
============================  ==================  ===============================================

Any other task is refused before training (``check_trainable``): its delta could not be rebuilt
by any reader of this package, so a run would train and leave nothing usable beside its checkpoints.
"""
import argparse
from typing import Optional

from fairseq.models import FairseqLanguageModel
from fairseq.tasks.denoising import DenoisingTask
from fairseq.tasks.language_modeling import LanguageModelingTask
from fairseq.tasks.masked_lm import MaskedLMTask
from fairseq.tasks.sentence_prediction import SentencePredictionTask
from fairseq.tasks.translation import TranslationTask
from omegaconf import OmegaConf

from ..core.delta_file import CLASSIFICATION, SEQ2SEQ
from ..core.errors import UserError

LANGUAGE_MODEL, MASKED_LM, DENOISING = "language-model", "masked-lm", "denoising"
# (task class, kind, the task's name in messages), most specific first: glue is a sentence_prediction task.
FAMILIES = (
    (TranslationTask, SEQ2SEQ, "translation"),
    (LanguageModelingTask, LANGUAGE_MODEL, "language_modeling"),
    (MaskedLMTask, MASKED_LM, "masked_lm"),
    (DenoisingTask, DENOISING, "denoising"),
    (SentencePredictionTask, CLASSIFICATION, "sentence_prediction"),
)
SUPPORTED_TASKS = ", ".join(name for _, _, name in FAMILIES)
# Kinds whose model is an encoder-decoder built with a source and a target dictionary.
ENCODER_DECODER_KINDS = (SEQ2SEQ, DENOISING)


def task_kind(task) -> Optional[str]:
    """The delta kind of a fairseq task, or None for a task outside the supported families."""
    for task_class, kind, _ in FAMILIES:
        if isinstance(task, task_class):
            return kind
    return None


def task_kind_of_name(task_name: str) -> Optional[str]:
    """The delta kind of the registered fairseq task ``task_name`` (``--task``), or None."""
    from fairseq.tasks import TASK_REGISTRY

    task_class = TASK_REGISTRY.get(task_name)
    for family_class, kind, _ in FAMILIES:
        if task_class is not None and issubclass(task_class, family_class):
            return kind
    return None


def task_config(task) -> dict:
    """The task's options as the task resolved them, as a plain dict: ``task.cfg`` for dataclass
    tasks, ``task.args`` for legacy ones (a Namespace, or the omegaconf node train.py handed it)."""
    options = task.cfg if getattr(task, "cfg", None) is not None else getattr(task, "args", None)
    if options is None:
        raise UserError(f"task {type(task).__name__}: holds neither a config nor arguments; a BitFit delta "
                        "cannot record it")
    if OmegaConf.is_config(options):
        return OmegaConf.to_container(options, resolve=True, enum_to_str=True)
    if isinstance(options, argparse.Namespace):
        return dict(vars(options))
    if hasattr(options, "__dataclass_fields__"):  # a dataclass instance, not yet an omegaconf node
        return OmegaConf.to_container(OmegaConf.structured(options), resolve=True, enum_to_str=True)
    return dict(options)


def check_trainable(task, model, task_name: str, arch: str) -> str:
    """The delta kind of a BitFit run of ``task`` and ``model``, or one UserError line saying why
    this pair cannot give a usable delta (checked before training, not at the first save)."""
    kind = task_kind(task)
    if kind is None:
        raise UserError(f"--task {task_name}: BitFit runs cover the task families {SUPPORTED_TASKS} (and tasks "
                        f"built on them, such as glue); {task_name} is not one of them, so its delta could not be "
                        "rebuilt (docs/language_models.md lists the families and why others are left out)")
    if getattr(task, "source_dictionary", None) is None:
        raise UserError(f"--task {task_name}: has no token dictionary, which a BitFit delta records")
    if kind == LANGUAGE_MODEL and not isinstance(model, FairseqLanguageModel):
        raise UserError(_not_a_language_model(arch, type(model).__name__))
    if kind == CLASSIFICATION and not hasattr(model, "register_classification_head"):
        raise UserError(f"--arch {arch}: --task {task_name} needs a model with classification heads "
                        "(roberta, bert, bart)")
    return kind


def _not_a_language_model(arch: str, model_class_name: str) -> str:
    return (f"--arch {arch}: --task language_modeling trains decoder-only language models (transformer_lm, "
            f"lstm_lm, ...); {arch} is a {model_class_name}")


def check_arch_before_build(task_name: Optional[str], arch: Optional[str]) -> None:
    """One line for an encoder-decoder ``--arch`` with ``--task language_modeling``, before fairseq builds it:
    fairseq's own build_model fails on it with a traceback (no ``supported_targets``), before
    ``check_trainable`` could see the model."""
    from fairseq.models import ARCH_MODEL_REGISTRY
    from fairseq.tasks import TASK_REGISTRY

    task_class, model_class = TASK_REGISTRY.get(task_name), ARCH_MODEL_REGISTRY.get(arch)
    if task_class is None or model_class is None:
        return  # fairseq's parser has already named an unknown one
    if issubclass(task_class, LanguageModelingTask) and not issubclass(model_class, FairseqLanguageModel):
        raise UserError(_not_a_language_model(arch, model_class.__name__))
