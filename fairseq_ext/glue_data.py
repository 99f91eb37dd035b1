"""GLUE: what each task's files look like, and turning them into fairseq data.

``prepare_task`` (CLI: ``python -m fairseq_ext.glue_data prepare``) reads
``<glue-dir>/<TASK>/*.tsv`` as written by GLUE's download_glue_data.py, encodes
the text with a pretrained model's tokenizer and dictionary, and writes the
layout of fairseq's ``sentence_prediction`` task (which the ``glue`` task reads)::

    OUT/input0/{train,valid,test}.{bin,idx}, input0/dict.txt   first sentence
    OUT/input1/...                                             second sentence (pair tasks)
    OUT/label/{train,valid}.{bin,idx}, label/dict.txt          classification
    OUT/label/{train,valid}.label                              regression (STS-B), one float a line
    OUT/test.index                                             the test rows' GLUE ids, one a line
    OUT/manifest.json                                          rows read/written/skipped, cache key

MNLI writes valid (matched), valid1 (mismatched), test and test1 likewise.  Rows
are never dropped, except QQP rows with a wrong number of columns (a known flaw
of its files), which are skipped and counted; anything else malformed is a
``UserError`` naming file:line, and leaves no output.  Sequences are not
truncated here: the glue task truncates to --max-positions when it loads them.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from fairseq_ext import glue_metrics as gm
from fairseq_ext.atomic_write import write_text_atomically
from fairseq_ext.errors import UserError, exit_on_user_error

logger = logging.getLogger("fairseq_ext.glue_data")

GLUE_SOURCE_HINT = (
    "GLUE comes from GLUE's download_glue_data.py script (https://gluebenchmark.com/tasks), "
    "which writes <glue-dir>/<TASK>/{train,dev,test}.tsv"
)
PREPARED_FORMAT_VERSION = 1  # part of the cache key: bump when the prepared output changes
MANIFEST_NAME = "manifest.json"
LEADERBOARD_HEADER = ("index", "prediction")
ROWS_PER_CHUNK = 1000
PROGRESS_INTERVAL_S = 5.0


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


# --------------------------------------------------------------------------- reading


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


def task_file(spec: GlueTaskSpec, glue_dir, split: SplitSpec) -> Path:
    return Path(glue_dir) / spec.name / split.file_name


def check_glue_dir(glue_dir) -> Path:
    glue_dir = Path(glue_dir)
    if glue_dir.is_file():
        raise UserError(f"--glue-dir {glue_dir} is a file, not a directory; {GLUE_SOURCE_HINT}")
    if not glue_dir.is_dir():
        raise UserError(f"--glue-dir {glue_dir}: no such directory; {GLUE_SOURCE_HINT}")
    return glue_dir


def _missing_file_error(spec: GlueTaskSpec, path: Path) -> UserError:
    layout = ", ".join(s.file_name for s in spec.splits)
    return UserError(f"{path}: no such file; {spec.name} needs <glue-dir>/{spec.name}/{{{layout}}}. {GLUE_SOURCE_HINT}")


def read_split(task, glue_dir, split_name: str) -> SplitRows:
    """Read and check one split's TSV (by fairseq split name: train, valid, test, ...)."""
    spec = get_task_spec(task)
    split = spec.split(split_name)
    path = task_file(spec, check_glue_dir(glue_dir), split)
    if not path.is_file():
        raise _missing_file_error(spec, path)
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


# --------------------------------------------------------------------------- tokenizer


@dataclass
class _Tokenizer:
    """Where the BPE comes from, so that worker processes can rebuild or inherit it."""

    bpe: object  # has .encode(text) -> space-joined subword tokens
    model_dir: object  # a ModelDir, or None for a BPE object given directly
    dictionary_path: Path
    fingerprint: Optional[dict]  # None: the tokenizer cannot be identified, so no caching


def _file_sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _resolve_tokenizer(model_dir_or_bpe, dictionary, tokenizer_files: Sequence) -> _Tokenizer:
    is_model_dir = isinstance(model_dir_or_bpe, (str, os.PathLike)) or hasattr(model_dir_or_bpe, "bpe_args")
    if not is_model_dir:  # a BPE object
        if not hasattr(model_dir_or_bpe, "encode"):
            raise TypeError(f"expected a model directory or a BPE object with .encode(), got {model_dir_or_bpe!r}")
        bpe, model_dir = model_dir_or_bpe, None
        files = {str(f): _file_sha256(f) for f in tokenizer_files}
        fingerprint = {"bpe": f"{type(bpe).__module__}.{type(bpe).__qualname__}", "files": files} if files else None
    else:
        from fairseq_ext.model_dir import build_bpe, load_model_dir  # the BERT/RoBERTa model directory

        model_dir = model_dir_or_bpe
        if isinstance(model_dir, (str, os.PathLike)):
            model_dir = load_model_dir(model_dir)
        bpe = build_bpe(model_dir)
        files, settings = {}, {}
        for key, value in sorted(dict(model_dir.bpe_args).items()):
            if isinstance(value, (str, os.PathLike)) and Path(value).is_file():
                files[key] = _file_sha256(value)
            else:
                settings[key] = value if isinstance(value, (str, int, float, bool, type(None))) else repr(value)
        fingerprint = {"family": getattr(model_dir, "family", None), "bpe_args": settings, "files": files}
        if dictionary is None:
            dictionary = model_dir.dictionary
    if dictionary is None:
        raise UserError("no dictionary: pass the model's dict.txt along with a BPE object")
    dictionary_path = Path(dictionary)
    if not dictionary_path.is_file():
        raise UserError(f"{dictionary_path}: no such dictionary file (the model's fairseq dict.txt)")
    return _Tokenizer(bpe, model_dir, dictionary_path, fingerprint)


# Worker state: set once per process by _init_encoder, used by _encode_chunk.
_encoder = None


class _Encoder:
    """Text -> BPE -> fairseq ids, with fairseq's binarizer (counts <unk> replacements)."""

    def __init__(self, bpe, dictionary_path: Path):
        from fairseq.binarizer import VocabularyDatasetBinarizer
        from fairseq.data import Dictionary

        self.bpe = bpe
        self.binarizer = VocabularyDatasetBinarizer(Dictionary.load(str(dictionary_path)), append_eos=True)

    def encode_rows(self, rows):
        from fairseq.binarizer import BinarizeSummary

        summary = BinarizeSummary()
        columns = list(zip(*rows))
        encoded = [
            [self.binarizer.binarize_line(self.bpe.encode(text), summary).numpy() for text in column]
            for column in columns
        ]
        return encoded, summary


def _init_encoder(bpe, model_dir, dictionary_path):
    global _encoder
    if bpe is None:
        from fairseq_ext.model_dir import build_bpe

        bpe = build_bpe(model_dir)
    _encoder = _Encoder(bpe, dictionary_path)


def _encode_chunk(rows):
    return _encoder.encode_rows(rows)


# --------------------------------------------------------------------------- preparing


def prepare_task(
    task,
    glue_dir,
    model_dir_or_bpe,
    dictionary,
    out_dir,
    workers: int = 1,
    *,
    train_subset: Optional[int] = None,
    train_subset_seed: int = 1,
    tokenizer_files: Sequence = (),
) -> dict:
    """Prepare one GLUE task for fairseq; returns the manifest (also in ``out_dir/manifest.json``).

    Args:
        task: task name (``"CoLA"``, case-insensitive) or a ``GlueTaskSpec``.
        glue_dir: the ``glue_data`` directory holding ``<TASK>/*.tsv``.
        model_dir_or_bpe: a pretrained model directory (path or ``ModelDir``, see
            ``fairseq_ext.model_dir``), or any BPE object with ``.encode(text) -> str``.
        dictionary: the model's ``dict.txt``; None takes the model directory's.
        out_dir: where the fairseq data goes; replaced as a whole, never half-written.
        workers: processes that tokenize in parallel.
        train_subset: keep only this many training rows, a seeded uniform sample in
            file order (for CPU runs); the rest are counted as skipped.
        train_subset_seed: the sample's seed.
        tokenizer_files: with a BPE object, the files that define it; they key the
            cache (without them every call prepares afresh).

    A second call with the same input files, tokenizer, dictionary and options
    finds ``out_dir`` up to date and returns its manifest ("cached").
    """
    spec = get_task_spec(task)
    glue_dir = check_glue_dir(glue_dir)
    out_dir = Path(out_dir)
    if workers < 1:
        raise UserError(f"--workers {workers}: must be at least 1")
    if train_subset is not None and train_subset < 1:
        raise UserError(f"--train-subset {train_subset}: must be at least 1")
    if not 0 <= train_subset_seed < 2**32:
        raise UserError(f"--train-subset-seed {train_subset_seed}: must be in [0, 2**32)")
    if out_dir.exists() and not out_dir.is_dir():
        raise UserError(f"--out {out_dir} is a file, not a directory")

    present, absent = [], []
    for split in spec.splits:
        path = task_file(spec, glue_dir, split)
        if path.is_file():
            present.append((split, path))
        elif split.labelled:
            raise _missing_file_error(spec, path)
        else:
            absent.append(split)
            logger.warning(f"{path} not found: no {split.name} split, so no {split.leaderboard_file} for the leaderboard")

    tokenizer = _resolve_tokenizer(model_dir_or_bpe, dictionary, tokenizer_files)
    cache_key = None
    if tokenizer.fingerprint is not None:
        cache_key = _cache_key(spec, present, tokenizer, train_subset, train_subset_seed)
        cached = _cached_manifest(out_dir, cache_key)
        if cached is not None:
            logger.info(f"{spec.name}: {out_dir} is up to date (cached), nothing to do")
            return cached
    else:
        logger.info("a BPE object without tokenizer_files cannot be fingerprinted: preparing without the cache")
    _check_replaceable(out_dir, spec)

    read = {split.name: read_tsv(spec, split, path) for split, path in present}
    for rows in read.values():
        for reason, lines in rows.skipped_lines.items():
            shown = ", ".join(map(str, lines[:10])) + (", ..." if len(lines) > 10 else "")
            logger.warning(f"{rows.path}: skipped {len(lines)} rows ({reason}): lines {shown}")
    subset_skips = _apply_train_subset(read["train"], train_subset, train_subset_seed)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        manifest = _write_prepared(spec, read, subset_skips, tokenizer, staging, workers)
        manifest.update(
            cache_key=cache_key,
            glue_dir=str(glue_dir.resolve()),
            absent_splits=[split.name for split in absent],
            train_subset=None if train_subset is None else {"size": train_subset, "seed": train_subset_seed},
        )
        (staging / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
        _replace_dir(staging, out_dir)  # the manifest, written last, marks a complete preparation
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info(f"{spec.name}: prepared {out_dir}")
    return manifest


def _cache_key(spec, present, tokenizer: _Tokenizer, train_subset, train_subset_seed) -> str:
    key = {
        "format": PREPARED_FORMAT_VERSION,
        "task": spec.name,
        "inputs": {split.name: _file_sha256(path) for split, path in present},
        "tokenizer": tokenizer.fingerprint,
        "dictionary": _file_sha256(tokenizer.dictionary_path),
        "train_subset": [train_subset, train_subset_seed] if train_subset else None,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _cached_manifest(out_dir: Path, cache_key: str) -> Optional[dict]:
    try:
        manifest = load_manifest(out_dir)
    except UserError:
        return None
    return manifest if manifest.get("cache_key") == cache_key else None


def _check_replaceable(out_dir: Path, spec: GlueTaskSpec) -> None:
    """Only an older preparation of the same task may be replaced."""
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not (out_dir / MANIFEST_NAME).is_file():
        raise UserError(f"--out {out_dir} exists and is not a prepared GLUE directory; refusing to replace it")
    prepared_for = load_manifest(out_dir).get("task")
    if prepared_for != spec.name:
        raise UserError(f"--out {out_dir} holds prepared {prepared_for} data; refusing to replace it with {spec.name}")


def _apply_train_subset(rows: SplitRows, size: Optional[int], seed: int) -> int:
    """Keep a seeded sample of ``size`` training rows, in file order; returns how many were left out."""
    if size is None or size >= len(rows.texts):
        return 0
    keep = np.sort(np.random.default_rng(seed).choice(len(rows.texts), size=size, replace=False))
    left_out = len(rows.texts) - size
    rows.texts = [rows.texts[i] for i in keep]
    rows.labels = [rows.labels[i] for i in keep]
    return left_out


def _write_prepared(spec, read: Dict[str, SplitRows], subset_skips: int, tokenizer: _Tokenizer, out: Path, workers) -> dict:
    from fairseq.data import Dictionary

    input_dirs = [out / f"input{column}" for column in range(len(spec.text_columns))]
    for directory in input_dirs + [out / "label"]:
        directory.mkdir(parents=True)
        if directory.name != "label":
            shutil.copyfile(tokenizer.dictionary_path, directory / "dict.txt")
    vocab_size = len(Dictionary.load(str(tokenizer.dictionary_path)))
    label_dictionary = None
    if not spec.regression:
        label_dictionary = Dictionary()
        for label in spec.labels:  # class i is spec.labels[i]: the order is the task's, not the data's
            label_dictionary.add_symbol(label)
        label_dictionary.save(str(out / "label" / "dict.txt"))

    splits = {}
    use_pool = workers > 1 and sum(len(rows.texts) for rows in read.values()) > ROWS_PER_CHUNK
    pool = None
    if use_pool:
        # A model directory is rebuilt in each worker; a BPE object is inherited (fork) or pickled.
        bpe = tokenizer.bpe if tokenizer.model_dir is None else None
        pool = multiprocessing.Pool(workers, _init_encoder, (bpe, tokenizer.model_dir, tokenizer.dictionary_path))
    else:
        _init_encoder(tokenizer.bpe, None, tokenizer.dictionary_path)
    try:
        for split_name, rows in read.items():
            stats = _binarize_texts(spec, rows, input_dirs, vocab_size, pool)
            if rows.labels is not None:
                _write_labels(spec, rows, out / "label", label_dictionary)
            skipped = {reason: len(lines) for reason, lines in rows.skipped_lines.items()}
            if split_name == "train" and subset_skips:
                skipped["not in --train-subset"] = subset_skips
            entry = {
                "file": f"{spec.name}/{rows.split.file_name}",
                "rows_read": rows.rows_read,
                "rows_written": len(rows.texts),
                "rows_skipped": skipped,
                "skipped_lines": {reason: lines for reason, lines in rows.skipped_lines.items()},
                **stats,
            }
            if entry["rows_read"] != entry["rows_written"] + sum(skipped.values()):
                raise AssertionError(f"row accounting is off for {rows.path}: {entry}")
            if rows.indices is not None:
                index_file = f"{split_name}.index"
                (out / index_file).write_text("".join(f"{index}\n" for index in rows.indices), encoding="utf-8")
                entry.update(index_file=index_file, leaderboard_file=rows.split.leaderboard_file)
            splits[split_name] = entry
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
    return {
        "format_version": PREPARED_FORMAT_VERSION,
        **spec.summary(),
        "dictionary": {"source": str(tokenizer.dictionary_path), "size": vocab_size},
        "tokenizer": tokenizer.fingerprint,
        "splits": splits,
    }


def _binarize_texts(spec, rows: SplitRows, input_dirs, vocab_size, pool) -> dict:
    from fairseq.binarizer import BinarizeSummary
    from fairseq.data import indexed_dataset

    builders = [
        indexed_dataset.make_builder(str(d / f"{rows.split.name}.bin"), impl="mmap", vocab_size=vocab_size)
        for d in input_dirs
    ]
    chunks = [rows.texts[start:start + ROWS_PER_CHUNK] for start in range(0, len(rows.texts), ROWS_PER_CHUNK)]
    results = pool.imap(_encode_chunk, chunks) if pool is not None else map(_encode_chunk, chunks)
    summary = BinarizeSummary()
    longest, done, last_report = 0, 0, time.monotonic()
    for encoded_columns, chunk_summary in results:
        summary.merge(chunk_summary)
        for builder, encoded in zip(builders, encoded_columns):
            for ids in encoded:
                builder.add_item(_as_tensor(ids))
        lengths = sum(np.array([len(ids) for ids in encoded]) for encoded in encoded_columns)
        longest = max(longest, int(lengths.max()))
        done += len(encoded_columns[0])
        if time.monotonic() - last_report >= PROGRESS_INTERVAL_S or done == len(rows.texts):
            logger.info(f"{spec.name} {rows.split.name}: {done}/{len(rows.texts)} rows tokenized")
            last_report = time.monotonic()
    for builder, directory in zip(builders, input_dirs):
        builder.finalize(str(directory / f"{rows.split.name}.idx"))
    if summary.num_tok and summary.replaced_percent > 5:
        logger.warning(
            f"{spec.name} {rows.split.name}: {summary.replaced_percent:.1f}% of tokens are <unk>: "
            "does the dictionary belong to the tokenizer?"
        )
    # +1 for the <s> the task prepends (and +1 more for RoBERTa's pair separator).
    return {"tokens": summary.num_tok, "unk_tokens": summary.num_replaced, "longest_row_tokens": longest + 1}


def _as_tensor(ids):
    import torch

    return torch.from_numpy(ids)


def _write_labels(spec, rows: SplitRows, label_dir: Path, label_dictionary) -> None:
    if spec.regression:
        (label_dir / f"{rows.split.name}.label").write_text("".join(f"{v}\n" for v in rows.labels), encoding="utf-8")
        return
    from fairseq.data import indexed_dataset

    builder = indexed_dataset.make_builder(
        str(label_dir / f"{rows.split.name}.bin"), impl="mmap", vocab_size=len(label_dictionary)
    )
    for label in rows.labels:
        builder.add_item(label_dictionary.encode_line(label, append_eos=True, add_if_not_exist=False))
    builder.finalize(str(label_dir / f"{rows.split.name}.idx"))


def _replace_dir(staging: Path, out_dir: Path) -> None:
    """Move the finished ``staging`` to ``out_dir``, replacing an older preparation."""
    old = None
    if out_dir.exists():
        old = out_dir.parent / f".{out_dir.name}.old-{uuid.uuid4().hex[:8]}"
        out_dir.rename(old)
    staging.rename(out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


# --------------------------------------------------------------------------- prepared data


def load_manifest(prepared_dir) -> dict:
    path = Path(prepared_dir) / MANIFEST_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"{path}: no such file; prepare the data with `python -m fairseq_ext.glue_data prepare`")
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON ({error})")


def read_test_indices(prepared_dir, split: str = "test") -> List[str]:
    """The GLUE ids of a prepared test split's rows, in the order of its .bin/.idx (and predictions)."""
    entry = load_manifest(prepared_dir).get("splits", {}).get(split)
    if entry is None or "index_file" not in entry:
        raise UserError(f"{prepared_dir}: no prepared test split {split!r}")
    return (Path(prepared_dir) / entry["index_file"]).read_text(encoding="utf-8").splitlines()


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


# --------------------------------------------------------------------------- CLI


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fairseq_ext.glue_data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="encode and binarize one GLUE task for fairseq")
    prepare.add_argument("--task", required=True, help=f"one of {', '.join(TASK_NAMES)} (case-insensitive)")
    prepare.add_argument("--glue-dir", required=True, help="the glue_data directory (holds CoLA/train.tsv, ...)")
    prepare.add_argument("--model-dir", required=True, help="pretrained model directory: its tokenizer and dict.txt")
    prepare.add_argument("--out", required=True, help="output directory (replaced as a whole when inputs change)")
    prepare.add_argument("--workers", type=int, default=_usable_cpus(), help="tokenizer processes (default: all CPUs)")
    prepare.add_argument(
        "--train-subset", type=int, metavar="N",
        help="keep N training rows, a seeded uniform sample kept in file order (for CPU runs); recorded in the manifest",
    )
    prepare.add_argument("--train-subset-seed", type=int, default=1, help="seed of --train-subset (default: 1)")

    info = commands.add_parser("info", help="print a task's classes, metrics and splits as JSON")
    info.add_argument("--task", help=f"one of {', '.join(TASK_NAMES)} (default: all of them)")
    return parser


@exit_on_user_error
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        specs = [get_task_spec(args.task)] if args.task else list(TASKS.values())
        summaries = [spec.summary() for spec in specs]
        print(json.dumps(summaries[0] if args.task else summaries, indent=2))
        return
    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO, stream=sys.stderr, force=True
    )
    manifest = prepare_task(
        args.task, args.glue_dir, args.model_dir, None, args.out, args.workers,
        train_subset=args.train_subset, train_subset_seed=args.train_subset_seed,
    )
    for name, entry in manifest["splits"].items():
        skipped = ", ".join(f"{count} {reason}" for reason, count in entry["rows_skipped"].items()) or "none"
        logger.info(f"{name}: {entry['rows_written']}/{entry['rows_read']} rows written (skipped: {skipped})")


if __name__ == "__main__":
    main()
