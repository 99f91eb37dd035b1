"""The fairseq task ``glue``: sentence_prediction set up from a GLUE task name.

``--task glue --glue-task CoLA`` (default: the task in DATA/manifest.json) sets
--num-classes, regression and the metrics that the ``glue_prediction``
criterion logs, on data written by ``python -m fairseq_ext.tools.glue_data prepare``.
Examples are ``<s> a </s>`` or, for pairs, ``<s> a </s> b </s>`` (BERT);
RoBERTa models pass ``--separator-token 2`` for ``<s> a </s> </s> b </s>``.
Sequences longer than --max-positions are truncated (``--shorten-method
truncate`` by default), never dropped.
"""
import contextlib
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from fairseq.data import SortDataset
from fairseq.tasks import register_task
from fairseq.tasks.sentence_prediction import (
    SHORTEN_METHOD_CHOICES,
    SentencePredictionConfig,
    SentencePredictionTask,
)
from omegaconf import OmegaConf, open_dict

from ...core.errors import UserError
from ...core.glue_tasks import get_task_spec
from ..criterions.glue_prediction import GluePredictionCriterion
from ..data.glue_prepare import MANIFEST_NAME, PREPARE_COMMAND, load_manifest

logger = logging.getLogger(__name__)


@dataclass
class GlueConfig(SentencePredictionConfig):
    glue_task: Optional[str] = field(
        default=None,
        metadata={
            "help": "the GLUE task of --data, e.g. CoLA or STS-B (all: python -m fairseq_ext.tools.glue_data info); "
            "sets --num-classes, regression and the logged metrics (default: the task in DATA/manifest.json)"
        },
    )
    max_seq_len: Optional[int] = field(
        default=None,
        metadata={
            "help": "truncate examples to N tokens (default: --max-positions). --max-positions also sizes "
            "the model's position table, so it must stay at the pretrained value (512 for BERT/RoBERTa)"
        },
    )
    shorten_method: SHORTEN_METHOD_CHOICES = field(
        default="truncate",
        metadata={"help": "how sequences longer than --max-positions are shortened (default: truncate)"},
    )
    group_by_length: int = field(
        default=0,
        metadata={
            "help": "length-grouped training batches: shuffle, cut the order into chunks of N examples and "
            "sort each chunk by length, so a batch pads little (e.g. 50 x --batch-size); fairseq still "
            "shuffles the batches every epoch. 0: fairseq's random batches"
        },
    )


def _editable(cfg):
    return open_dict(cfg) if OmegaConf.is_config(cfg) else contextlib.nullcontext()


@register_task("glue", dataclass=GlueConfig)
class GlueTask(SentencePredictionTask):
    """sentence_prediction whose classes, regression flag and metrics come from ``glue_tasks.TASKS``."""

    def __init__(self, cfg, data_dictionary, label_dictionary):
        super().__init__(cfg, data_dictionary, label_dictionary)
        self.spec = get_task_spec(cfg.glue_task)

    @classmethod
    def setup_task(cls, cfg, **kwargs):
        if cfg.max_seq_len is not None and cfg.max_seq_len < 3:
            raise UserError(f"--max-seq-len {cfg.max_seq_len}: must be at least 3 (<s>, a token, </s>)")
        if cfg.group_by_length < 0:
            raise UserError(f"--group-by-length {cfg.group_by_length}: must be 0 (off) or a chunk size")
        spec = cls._resolve_spec(cfg)
        if cfg.num_classes not in (-1, spec.num_classes):
            raise UserError(f"--num-classes {cfg.num_classes} contradicts --glue-task {spec.name} ({spec.num_classes})")
        with _editable(cfg):
            cfg.glue_task = spec.name
            cfg.num_classes = spec.num_classes
            cfg.regression_target = spec.regression
        task = super().setup_task(cfg, **kwargs)
        if cfg.init_token is None:
            with _editable(cfg):
                cfg.init_token = task.source_dictionary.bos()  # <s> (BERT's [CLS]) starts every example
        if not spec.regression:
            cls._check_label_order(task, spec, cfg.data)
        return task

    @staticmethod
    def _resolve_spec(cfg):
        manifest_path = Path(str(cfg.data)) / MANIFEST_NAME
        prepared_for = load_manifest(cfg.data).get("task") if manifest_path.is_file() else None
        if cfg.glue_task is None:
            if prepared_for is None:
                raise UserError(f"--glue-task is required: {manifest_path} does not say which GLUE task the data is")
            return get_task_spec(prepared_for)
        spec = get_task_spec(cfg.glue_task)
        if prepared_for is not None and prepared_for != spec.name:
            raise UserError(f"--glue-task {spec.name}, but {cfg.data} holds {prepared_for} data ({manifest_path})")
        return spec

    @staticmethod
    def _check_label_order(task, spec, data_dir) -> None:
        # Class i must be spec.labels[i]: leaderboard files and F1's positive class rely on it.
        # fairseq-preprocess orders labels by frequency instead.
        dictionary = task.label_dictionary
        found = dictionary.symbols[dictionary.nspecial:dictionary.nspecial + spec.num_classes]
        if tuple(found) != spec.labels:
            raise UserError(
                f"{data_dir}/label/dict.txt lists the classes {', '.join(found)}; {spec.name} needs "
                f"{', '.join(spec.labels)} in that order: prepare it with `{PREPARE_COMMAND}`"
            )

    def load_dataset(self, split, combine=False, **kwargs):
        dataset = super().load_dataset(split, combine=combine, **kwargs)
        if self.cfg.group_by_length > 0 and isinstance(dataset, SortDataset):
            # sentence_prediction orders examples by one seeded random key (np.lexsort: the last key
            # is the primary one). Training keeps that order across chunks of N examples and sorts
            # each chunk by length; evaluation, where order does not matter, is sorted by length.
            (random_key,) = dataset.sort_order
            lengths = dataset.dataset.sizes[0]  # tokens per example (sentence_prediction's sizes)
            keys = [random_key, lengths]
            if split == "train":
                keys.append(random_key // self.cfg.group_by_length)
            dataset = self.datasets[split] = SortDataset(dataset.dataset, sort_order=keys)
        return dataset

    def max_positions(self):
        # Where examples are truncated and batches filtered; the model keeps --max-positions.
        if self.cfg.max_seq_len is None:
            return self.cfg.max_positions
        return min(self.cfg.max_seq_len, self.cfg.max_positions)

    def build_criterion(self, cfg, from_checkpoint=False):
        criterion = super().build_criterion(cfg, from_checkpoint)
        if not isinstance(criterion, GluePredictionCriterion):
            raise UserError("--task glue needs --criterion glue_prediction (it logs the official GLUE metrics)")
        return criterion

    def reduce_metrics(self, logging_outputs, criterion):
        super().reduce_metrics(logging_outputs, criterion)
        criterion.log_glue_metrics(logging_outputs)
