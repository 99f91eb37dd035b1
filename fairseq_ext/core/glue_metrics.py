"""Official GLUE metrics, computed from statistics that add up across workers.

Classification keeps a confusion matrix, ``counts[target, prediction]``: accuracy,
F1 and Matthews correlation follow from it exactly, and the matrices of several
workers simply add.  Regression keeps six float64 sums for Pearson, which add the
same way.  Spearman needs the ranks over the whole set, so it needs every
prediction: ``gather_examples`` collects them from all workers (gloo or NCCL).

Every function returns a fraction (accuracy 0.853, not 85.3).
"""
from __future__ import annotations

import math
from typing import Optional, Sequence, Tuple

import numpy as np
import torch.distributed as dist
from scipy.stats import spearmanr

ACCURACY = "accuracy"
F1 = "f1"
MCC = "mcc"
PEARSON = "pearson"
SPEARMAN = "spearman"
GLUE_SCORE = "glue_score"  # the mean of a task's official metrics, as the GLUE leaderboard averages them

CONFUSION_METRICS = (ACCURACY, F1, MCC)  # computable from the confusion matrix alone
REGRESSION_SUM_NAMES = ("n", "sum_x", "sum_y", "sum_xx", "sum_yy", "sum_xy")

Examples = Tuple[np.ndarray, np.ndarray, np.ndarray]  # (example ids, predictions, targets)


def confusion_matrix(targets, predictions, num_classes: int) -> np.ndarray:
    """``counts[t, p]``: how many examples of class t were predicted as p (int64)."""
    targets = np.asarray(targets, dtype=np.int64).reshape(-1)
    predictions = np.asarray(predictions, dtype=np.int64).reshape(-1)
    if targets.shape != predictions.shape:
        raise ValueError(f"{targets.size} targets but {predictions.size} predictions")
    for name, values in (("target", targets), ("prediction", predictions)):
        if values.size and (values.min() < 0 or values.max() >= num_classes):
            raise ValueError(f"{name} class outside 0..{num_classes - 1}")
    flat = np.bincount(targets * num_classes + predictions, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def accuracy(confusion) -> float:
    confusion = np.asarray(confusion)
    total = int(confusion.sum())
    return int(np.trace(confusion)) / total if total else 0.0


def f1(confusion, positive_class: int = 1) -> float:
    """F1 of ``positive_class`` (GLUE: class 1, "duplicate"/"equivalent"); 0 when undefined, as sklearn."""
    confusion = np.asarray(confusion)
    true_positive = int(confusion[positive_class, positive_class])
    false_positive = int(confusion[:, positive_class].sum()) - true_positive
    false_negative = int(confusion[positive_class, :].sum()) - true_positive
    denominator = 2 * true_positive + false_positive + false_negative
    return 2 * true_positive / denominator if denominator else 0.0


def matthews_corrcoef(confusion) -> float:
    """Matthews correlation (multi-class R_K); 0 when a marginal is constant, as sklearn."""
    confusion = np.asarray(confusion)
    # Python ints: the products below overflow nothing and stay exact until the sqrt.
    true_counts = [int(v) for v in confusion.sum(axis=1)]
    predicted_counts = [int(v) for v in confusion.sum(axis=0)]
    correct = int(np.trace(confusion))
    total = sum(true_counts)
    covariance = correct * total - sum(t * p for t, p in zip(true_counts, predicted_counts))
    true_variance = total * total - sum(t * t for t in true_counts)
    predicted_variance = total * total - sum(p * p for p in predicted_counts)
    if true_variance == 0 or predicted_variance == 0:
        return 0.0
    return covariance / math.sqrt(true_variance * predicted_variance)


def regression_sums(predictions, targets) -> np.ndarray:
    """float64 ``[n, Σx, Σy, Σx², Σy², Σxy]`` (x: prediction, y: target): summable Pearson statistics."""
    x = np.asarray(predictions, dtype=np.float64).reshape(-1)
    y = np.asarray(targets, dtype=np.float64).reshape(-1)
    if x.shape != y.shape:
        raise ValueError(f"{x.size} predictions but {y.size} targets")
    return np.array([x.size, x.sum(), y.sum(), (x * x).sum(), (y * y).sum(), (x * y).sum()], dtype=np.float64)


def pearson(sums) -> float:
    """Pearson correlation from ``regression_sums`` (summed over workers); 0 when a side is constant."""
    n, sum_x, sum_y, sum_xx, sum_yy, sum_xy = (float(v) for v in np.asarray(sums, dtype=np.float64))
    covariance = n * sum_xy - sum_x * sum_y
    variance_x = n * sum_xx - sum_x * sum_x
    variance_y = n * sum_yy - sum_y * sum_y
    if variance_x <= 0 or variance_y <= 0:
        return 0.0
    return max(-1.0, min(1.0, covariance / math.sqrt(variance_x * variance_y)))


def spearman(predictions, targets) -> float:
    """Spearman rank correlation over the whole set; 0 when a side is constant."""
    x = np.asarray(predictions, dtype=np.float64).reshape(-1)
    y = np.asarray(targets, dtype=np.float64).reshape(-1)
    if x.size < 2 or np.all(x == x[0]) or np.all(y == y[0]):
        return 0.0
    return float(spearmanr(x, y)[0])


def unique_examples(ids, predictions, targets) -> Examples:
    """Each example once, ordered by id.

    fairseq's validation iterator pads the shards of the last batches with a dummy
    batch (a copy of real examples) so that every worker steps equally often; its
    examples come back here twice.
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    unique_ids, first = np.unique(ids, return_index=True)
    return (
        unique_ids,
        np.asarray(predictions, dtype=np.float64).reshape(-1)[first],
        np.asarray(targets, dtype=np.float64).reshape(-1)[first],
    )


def gather_examples(ids, predictions, targets, group=None) -> Examples:
    """Every worker's (ids, predictions, targets), concatenated in rank order.

    Uses ``torch.distributed.all_gather_object``, so it works with gloo on CPU and
    NCCL on GPU; without an initialised process group it returns its input.  Every
    worker of ``group`` must call it (it is a collective).
    """
    local = tuple(np.asarray(values).reshape(-1) for values in (ids, predictions, targets))
    world_size = _world_size(group)
    if world_size == 1:
        return local
    parts = [None] * world_size
    dist.all_gather_object(parts, local, group=group)
    return tuple(np.concatenate([part[column] for part in parts]) for column in range(3))


def _world_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        return 1
    return dist.get_world_size(group)


def official_metrics(
    metric_names: Sequence[str],
    confusion=None,
    sums=None,
    examples: Optional[Examples] = None,
) -> dict:
    """The requested metrics, each from the statistic it needs, plus ``glue_score``.

    ``confusion`` serves accuracy/F1/MCC, ``sums`` Pearson, ``examples`` (unique
    (ids, predictions, targets)) Spearman.  A metric whose statistic is missing is
    left out, and so is ``glue_score`` unless all of the task's metrics are present.
    """
    values = {}
    for name in metric_names:
        if name in CONFUSION_METRICS and confusion is not None:
            values[name] = {ACCURACY: accuracy, F1: f1, MCC: matthews_corrcoef}[name](confusion)
        elif name == PEARSON and sums is not None:
            values[name] = pearson(sums)
        elif name == SPEARMAN and examples is not None:
            values[name] = spearman(examples[1], examples[2])
        elif name not in CONFUSION_METRICS + (PEARSON, SPEARMAN):
            raise ValueError(f"unknown GLUE metric {name!r}")
    if metric_names and all(name in values for name in metric_names):
        values[GLUE_SCORE] = sum(values[name] for name in metric_names) / len(metric_names)
    return values
