"""The nine GLUE tasks: their files, columns, labels and official metrics.

One ``GlueTaskSpec`` per task (``TASKS``), as GLUE's download_glue_data.py writes
them: which TSV columns hold the text and the label, the classes in their
leaderboard order, the official metrics, and which files are train, dev and
test.  The glue task, its criterion, data preparation, the predictor and the
GLUE runner all read this one table.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

from . import glue_metrics as gm
from .errors import UserError

GLUE_SOURCE_HINT = (
    "GLUE comes from GLUE's download_glue_data.py script (https://gluebenchmark.com/tasks), "
    "which writes <glue-dir>/<TASK>/{train,dev,test}.tsv"
)


@dataclass(frozen=True)
class SplitSpec:
    """One GLUE file and the fairseq split name it becomes."""

    name: str  # fairseq split: train, valid, valid1, test, test1
    file_name: str  # inside <glue-dir>/<TASK>/
    labelled: bool = True
    leaderboard_file: Optional[str] = None  # the GLUE submission file of a test split


@dataclass(frozen=True)
class GlueTaskSpec:
    """A GLUE task: its columns, labels and official metrics."""

    name: str
    text_columns: Tuple[str, ...]  # header names of sentence1[, sentence2]
    label_column: str
    labels: Optional[Tuple[str, ...]]  # class i is labels[i], also the leaderboard string; None: regression
    metrics: Tuple[str, ...]  # the official metrics, as named in the logs (glue_metrics)
    primary_metric: str  # what the BitFit paper reports; pass it to --best-checkpoint-metric
    splits: Tuple[SplitSpec, ...]
    test_index_column: str = "index"
    headerless_columns: Optional[Tuple[str, ...]] = None  # CoLA train/dev have no header line
    skip_wrong_column_count: bool = False  # QQP train/dev: skip and count such rows
    score_range: Tuple[float, float] = (0.0, 5.0)  # regression targets (STS-B)

    @property
    def regression(self) -> bool:
        return self.labels is None

    @property
    def num_classes(self) -> int:
        return 1 if self.regression else len(self.labels)

    @property
    def is_pair(self) -> bool:
        return len(self.text_columns) == 2

    @property
    def logged_metrics(self) -> Tuple[str, ...]:
        """The official metrics, plus accuracy for every classification task, plus glue_score."""
        extra = (gm.ACCURACY,) if not self.regression and gm.ACCURACY not in self.metrics else ()
        return self.metrics + extra + (gm.GLUE_SCORE,)

    @property
    def valid_subsets(self) -> Tuple[str, ...]:
        return tuple(s.name for s in self.splits if s.labelled and s.name != "train")

    @property
    def test_splits(self) -> Tuple[SplitSpec, ...]:
        return tuple(s for s in self.splits if not s.labelled)

    def split(self, name: str) -> SplitSpec:
        for split in self.splits:
            if split.name == name:
                return split
        raise UserError(f"{self.name} has no split {name!r} (it has: {', '.join(s.name for s in self.splits)})")

    def summary(self) -> dict:
        """What a run script needs to know, as JSON-able values."""
        return {
            "task": self.name,
            "num_classes": self.num_classes,
            "regression": self.regression,
            "labels": list(self.labels) if self.labels else None,
            "pair": self.is_pair,
            "metrics": list(self.metrics),
            "logged_metrics": list(self.logged_metrics),
            "primary_metric": self.primary_metric,
            "valid_subsets": list(self.valid_subsets),
            "leaderboard_files": {s.name: s.leaderboard_file for s in self.test_splits},
        }


def _standard_splits(leaderboard_file: str) -> Tuple[SplitSpec, ...]:
    return (
        SplitSpec("train", "train.tsv"),
        SplitSpec("valid", "dev.tsv"),
        SplitSpec("test", "test.tsv", labelled=False, leaderboard_file=leaderboard_file),
    )


BINARY = ("0", "1")
NLI_BINARY = ("entailment", "not_entailment")

TASKS: Dict[str, GlueTaskSpec] = {
    spec.name: spec
    for spec in (
        GlueTaskSpec(
            "CoLA", ("sentence",), "label", BINARY, (gm.MCC,), gm.MCC, _standard_splits("CoLA.tsv"),
            headerless_columns=("source", "label", "mark", "sentence"),
        ),
        GlueTaskSpec("SST-2", ("sentence",), "label", BINARY, (gm.ACCURACY,), gm.ACCURACY, _standard_splits("SST-2.tsv")),
        GlueTaskSpec(
            "MRPC", ("#1 String", "#2 String"), "Quality", BINARY, (gm.F1, gm.ACCURACY), gm.F1,
            _standard_splits("MRPC.tsv"),
        ),
        GlueTaskSpec(
            "STS-B", ("sentence1", "sentence2"), "score", None, (gm.PEARSON, gm.SPEARMAN), gm.SPEARMAN,
            _standard_splits("STS-B.tsv"),
        ),
        GlueTaskSpec(
            "QQP", ("question1", "question2"), "is_duplicate", BINARY, (gm.F1, gm.ACCURACY), gm.F1,
            _standard_splits("QQP.tsv"), test_index_column="id", skip_wrong_column_count=True,
        ),
        GlueTaskSpec(
            "MNLI", ("sentence1", "sentence2"), "gold_label", ("entailment", "neutral", "contradiction"),
            (gm.ACCURACY,), gm.ACCURACY,
            (
                SplitSpec("train", "train.tsv"),
                SplitSpec("valid", "dev_matched.tsv"),
                SplitSpec("valid1", "dev_mismatched.tsv"),
                SplitSpec("test", "test_matched.tsv", labelled=False, leaderboard_file="MNLI-m.tsv"),
                SplitSpec("test1", "test_mismatched.tsv", labelled=False, leaderboard_file="MNLI-mm.tsv"),
            ),
        ),
        GlueTaskSpec("QNLI", ("question", "sentence"), "label", NLI_BINARY, (gm.ACCURACY,), gm.ACCURACY, _standard_splits("QNLI.tsv")),
        GlueTaskSpec("RTE", ("sentence1", "sentence2"), "label", NLI_BINARY, (gm.ACCURACY,), gm.ACCURACY, _standard_splits("RTE.tsv")),
        GlueTaskSpec("WNLI", ("sentence1", "sentence2"), "label", BINARY, (gm.ACCURACY,), gm.ACCURACY, _standard_splits("WNLI.tsv")),
    )
}
TASK_NAMES = tuple(TASKS)


def get_task_spec(task) -> GlueTaskSpec:
    """The spec of a task name (case-insensitive: "sts-b" works) or the spec itself."""
    if isinstance(task, GlueTaskSpec):
        return task
    by_lower_name = {name.lower(): spec for name, spec in TASKS.items()}
    spec = by_lower_name.get(str(task).lower())
    if spec is None:
        raise UserError(f"unknown GLUE task {task!r}; valid tasks: {', '.join(TASK_NAMES)}")
    return spec
