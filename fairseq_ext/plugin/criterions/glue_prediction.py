"""The fairseq criterion ``glue_prediction``: sentence_prediction's loss, GLUE's metrics.

The loss is fairseq's own (cross entropy, or MSE for regression).  What differs is
the logging, which stays correct with any number of workers:

- every step logs a confusion matrix (classification) or six float64 sums
  (regression), which fairseq sums across workers like any other statistic;
  accuracy, F1, MCC and Pearson are derived from the sums;
- Spearman needs every prediction: during validation each worker keeps its
  (example id, prediction, target) triples, and after fairseq's sum the triples
  are gathered from all workers (``torch.distributed.all_gather_object``, gloo or
  NCCL) and de-duplicated by id (fairseq's dummy batches repeat examples).

Logged names (percentages, 2 decimals): ``accuracy``, ``f1``, ``mcc``,
``pearson``, ``spearman`` as the task has them, and ``glue_score``, the mean of
the task's official metrics.  Spearman (hence STS-B's glue_score) appears in
validation only.  Use the glue task with it (``--task glue``).
"""
from dataclasses import dataclass

import numpy as np
import torch
from fairseq.criterions import register_criterion
from fairseq.criterions.sentence_prediction import SentencePredictionConfig, SentencePredictionCriterion
from fairseq.distributed import utils as distributed_utils
from fairseq.logging import metrics
from fairseq.logging.meters import safe_round

from ...core import glue_metrics as gm
from ...core.errors import UserError

# Keys in the per-step logging outputs (summed across workers by fairseq) and in the
# meters; meters whose names start with "_" are kept but not printed.
CONFUSION_KEY = "glue_confusion"
REGRESSION_SUMS_KEY = "glue_regression_sums"
RANKED_EXAMPLES_KEY = "glue_ranked_examples"  # > 0 after the sum: some worker holds validation triples
EXAMPLE_METERS = ("_glue_example_ids", "_glue_predictions", "_glue_targets")


@dataclass
class GluePredictionConfig(SentencePredictionConfig):
    """fairseq's sentence_prediction options; the glue task decides regression and metrics."""


class _LogitsRecorder:
    """Passes everything through to the model and keeps the classification output,
    so that fairseq's loss code runs unchanged and the metrics see its logits."""

    def __init__(self, model):
        self._model = model
        self.logits = None

    def __call__(self, *args, **kwargs):
        output = self._model(*args, **kwargs)
        self.logits = output[0]
        return output

    def __getattr__(self, name):
        return getattr(self._model, name)


@register_criterion("glue_prediction", dataclass=GluePredictionConfig)
class GluePredictionCriterion(SentencePredictionCriterion):
    def __init__(self, cfg: GluePredictionConfig, task):
        super().__init__(cfg, task)
        spec = getattr(task, "spec", None)
        if spec is None:
            raise UserError("--criterion glue_prediction needs --task glue")
        if cfg.report_mcc or cfg.report_acc_and_f1 or cfg.report_pearson_and_spearman:
            raise UserError("--criterion glue_prediction logs the official GLUE metrics itself: drop --report-*")
        if cfg.regression_target and not spec.regression:
            raise UserError(f"--regression-target contradicts --glue-task {spec.name}, a classification task")
        self.spec = spec
        self.regression_target = spec.regression
        self._validation_examples = []  # this worker's (ids, predictions, targets) since the last reduce

    def forward(self, model, sample, reduce=True):
        recorder = _LogitsRecorder(model)
        loss, sample_size, logging_output = super().forward(recorder, sample, reduce)
        logging_output.pop("ncorrect", None)  # accuracy comes from the confusion matrix
        targets = sample["target"].view(-1).detach().cpu().numpy()
        if self.regression_target:
            predictions = recorder.logits.detach().view(-1).float().cpu().numpy()
            logging_output[REGRESSION_SUMS_KEY] = torch.from_numpy(gm.regression_sums(predictions, targets))
            ranked = 0
            if not model.training:
                ids = sample["id"].view(-1).cpu().numpy()
                self._validation_examples.append((ids, predictions, targets))
                ranked = len(ids)
            logging_output[RANKED_EXAMPLES_KEY] = ranked
        else:
            predictions = recorder.logits.detach().argmax(dim=-1).cpu().numpy()
            confusion = gm.confusion_matrix(targets, predictions, self.spec.num_classes)
            logging_output[CONFUSION_KEY] = torch.from_numpy(confusion)
        return loss, sample_size, logging_output

    def log_glue_metrics(self, logging_outputs) -> None:
        """Log the task's metrics; called by GlueTask.reduce_metrics on every worker at every step."""
        for key in (CONFUSION_KEY, REGRESSION_SUMS_KEY):
            parts = [log[key] for log in logging_outputs if key in log]
            if parts:
                metrics.log_scalar_sum("_" + key, sum(parts))
        ranked = sum(float(log.get(RANKED_EXAMPLES_KEY, 0)) for log in logging_outputs)
        if ranked > 0:
            # The sum is the same on every worker, so all of them take part in the gather.
            local = self._take_validation_examples()
            gathered = gm.gather_examples(*local, group=distributed_utils.get_data_parallel_group())
            for meter, values in zip(EXAMPLE_METERS, gathered):
                metrics.log_concat_tensor(meter, torch.from_numpy(np.asarray(values)))
        # Spearman, hence STS-B's glue_score, needs the validation triples.
        names = self.spec.logged_metrics if not self.regression_target or ranked > 0 else (gm.PEARSON,)
        for name in names:
            metrics.log_derived(name, lambda meters, name=name: self._percent_from_meters(meters, name))

    def _take_validation_examples(self):
        examples, self._validation_examples = self._validation_examples, []
        if not examples:
            return np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0)
        return tuple(np.concatenate(column) for column in zip(*examples))

    def _percent_from_meters(self, meters, name):
        statistics = self._statistics(meters)
        values = gm.official_metrics(self.spec.metrics, **statistics)
        if "confusion" in statistics:  # accuracy for every classification task, official or not
            values.setdefault(gm.ACCURACY, gm.accuracy(statistics["confusion"]))
        return safe_round(100.0 * values.get(name, 0.0), 2)

    def _statistics(self, meters) -> dict:
        statistics = {}
        if "_" + CONFUSION_KEY in meters:
            statistics["confusion"] = np.rint(self._summed(meters, CONFUSION_KEY)).astype(np.int64)
        if "_" + REGRESSION_SUMS_KEY in meters:
            statistics["sums"] = self._summed(meters, REGRESSION_SUMS_KEY)
        if all(meter in meters and meters[meter].tensor is not None for meter in EXAMPLE_METERS):
            statistics["examples"] = gm.unique_examples(*(meters[meter].tensor.numpy() for meter in EXAMPLE_METERS))
        return statistics

    @staticmethod
    def _summed(meters, key):
        value = meters["_" + key].sum
        return value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
