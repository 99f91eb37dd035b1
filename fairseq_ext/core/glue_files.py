"""GLUE's TSV files: reading and checking them, and writing leaderboard files.

GLUE files are plain tab-separated text (no quoting: SST-2 and MNLI text holds
quote characters); headers and columns are checked against the task's spec and
every error names the file and line.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np

from .errors import UserError
from .files import write_text_atomically
from .glue_tasks import GLUE_SOURCE_HINT, GlueTaskSpec, SplitSpec, get_task_spec

LEADERBOARD_HEADER = ("index", "prediction")


@dataclass
class SplitRows:
    """The data rows of one GLUE file, checked."""

    split: SplitSpec
    path: Path
    texts: List[Tuple[str, ...]]  # one tuple of text columns per row
    labels: Optional[List[str]]  # labelled splits
    indices: Optional[List[str]]  # test splits: the GLUE id of each row
    rows_read: int
    skipped_lines: Dict[str, List[int]] = field(default_factory=dict)  # reason -> 1-based line numbers

    def digest(self) -> str:
        """What the rows say, as a hash: the same for any bytes that read as the same rows (CRLF or LF line
        ends, a byte-order mark), different once a row is added, removed or edited."""
        rows = {"texts": self.texts, "labels": self.labels, "indices": self.indices}
        return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8")).hexdigest()


def task_file(spec: GlueTaskSpec, glue_dir, split: SplitSpec) -> Path:
    return Path(glue_dir) / spec.name / split.file_name


def check_glue_dir(glue_dir) -> Path:
    glue_dir = Path(glue_dir)
    if glue_dir.is_file():
        raise UserError(f"--glue-dir {glue_dir} is a file, not a directory; {GLUE_SOURCE_HINT}")
    if not glue_dir.is_dir():
        raise UserError(f"--glue-dir {glue_dir}: no such directory; {GLUE_SOURCE_HINT}")
    return glue_dir


def missing_file_error(spec: GlueTaskSpec, path: Path) -> UserError:
    layout = ", ".join(s.file_name for s in spec.splits)
    return UserError(f"{path}: no such file; {spec.name} needs <glue-dir>/{spec.name}/{{{layout}}}. {GLUE_SOURCE_HINT}")


def read_split(task, glue_dir, split_name: str) -> SplitRows:
    """Read and check one split's TSV (by fairseq split name: train, valid, test, ...)."""
    spec = get_task_spec(task)
    split = spec.split(split_name)
    path = task_file(spec, check_glue_dir(glue_dir), split)
    if not path.is_file():
        raise missing_file_error(spec, path)
    return read_tsv(spec, split, path)


def read_tsv(spec: GlueTaskSpec, split: SplitSpec, path: Path) -> SplitRows:
    """Read one GLUE TSV file as ``split`` of ``spec``; header and columns are checked,
    and errors name the file and line."""
    # GLUE files are read as plain tab-separated text: no quoting (SST-2 and MNLI
    # text holds quote characters).  utf-8-sig drops the BOM of MRPC train/dev.
    data = path.read_bytes()
    try:
        lines = data.decode("utf-8-sig").split("\n")
    except UnicodeDecodeError as error:
        line = data[:error.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 (byte 0x{data[error.start]:02x}); GLUE files are UTF-8 text") from None
    if lines and lines[-1] == "":
        lines.pop()  # the final newline; CoLA dev.tsv has none
    lines = [line[:-1] if line.endswith("\r") else line for line in lines]

    headerless = split.labelled and spec.headerless_columns is not None
    if headerless:
        header, first_data_line = list(spec.headerless_columns), 1
    else:
        if not lines:
            raise UserError(f"{path}: empty file, expected a header line and data rows")
        header, first_data_line = lines[0].split("\t"), 2
    wanted = list(spec.text_columns) + ([spec.label_column] if split.labelled else [spec.test_index_column])
    missing = [name for name in wanted if name not in header]
    if missing:
        raise UserError(
            f"{path}:1: header has no column {missing[0]!r} (found: {', '.join(header)}); "
            f"is this the GLUE {spec.name} {split.file_name}?"
        )
    positions = [header.index(name) for name in wanted]
    text_positions, key_position = positions[:-1], positions[-1]

    rows = SplitRows(split, path, [], [] if split.labelled else None, None if split.labelled else [], 0)
    skip_bad_rows = spec.skip_wrong_column_count and split.labelled
    for line_number, line in enumerate(lines[first_data_line - 1:], start=first_data_line):
        rows.rows_read += 1
        columns = line.split("\t")
        if len(columns) != len(header):
            if skip_bad_rows:
                rows.skipped_lines.setdefault("wrong column count", []).append(line_number)
                continue
            raise UserError(f"{path}:{line_number}: expected {len(header)} tab-separated columns, found {len(columns)}")
        rows.texts.append(tuple(columns[p] for p in text_positions))
        key = columns[key_position]
        if split.labelled:
            rows.labels.append(_checked_label(spec, key, path, line_number))
        else:
            rows.indices.append(key)
    if rows.rows_read == 0:
        raise UserError(f"{path}: no data rows")
    if not rows.texts:
        raise UserError(f"{path}: all {rows.rows_read} data rows were skipped as malformed")
    return rows


def _checked_label(spec: GlueTaskSpec, value: str, path: Path, line_number: int) -> str:
    if not spec.regression:
        if value not in spec.labels:
            raise UserError(f"{path}:{line_number}: label {value!r} is not one of {', '.join(spec.labels)}")
        return value
    low, high = spec.score_range
    try:
        score = float(value)
    except ValueError:
        score = float("nan")
    if not low <= score <= high:  # also rejects nan
        raise UserError(f"{path}:{line_number}: score {value!r} is not a number in [{low:g}, {high:g}]")
    return value.strip()


def write_leaderboard_tsv(task, indices, predictions, path) -> Path:
    """Write a GLUE submission file: header ``index<TAB>prediction``, one row per test example.

    ``predictions`` are class ids (or a [N, num_classes] score array, whose argmax is
    taken), written as the task's label strings (MNLI ``entailment``..., QNLI/RTE
    ``entailment``/``not_entailment``, the others ``0``/``1``); for STS-B, scores,
    clipped to [0, 5].  Name the file by ``SplitSpec.leaderboard_file`` (e.g. CoLA.tsv).
    """
    spec = get_task_spec(task)
    indices = [str(index) for index in indices]
    values = np.asarray(predictions)
    if not spec.regression and values.ndim == 2:
        values = values.argmax(axis=1)
    values = values.reshape(-1) if values.ndim == 2 and values.shape[1] == 1 else values
    if values.ndim != 1 or len(values) != len(indices):
        raise UserError(f"{len(indices)} test indices but predictions of shape {tuple(np.shape(predictions))}")
    if spec.regression:
        low, high = spec.score_range
        cells = [f"{v:.3f}" for v in np.clip(values.astype(np.float64), low, high)]
    else:
        if not np.issubdtype(values.dtype, np.integer) or values.min() < 0 or values.max() >= spec.num_classes:
            raise UserError(f"{spec.name} predictions must be class ids 0..{spec.num_classes - 1}")
        cells = [spec.labels[int(v)] for v in values]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = ["\t".join(LEADERBOARD_HEADER)] + [f"{i}\t{cell}" for i, cell in zip(indices, cells)]
    write_text_atomically(path, "\n".join(lines) + "\n")
    return path
