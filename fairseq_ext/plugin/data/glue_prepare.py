"""GLUE files into fairseq data: tokenize, binarize, and cache the result.

``prepare_task`` (CLI: ``python -m fairseq_ext.tools.glue_data prepare``) reads
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

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch
from fairseq.binarizer import BinarizeSummary, VocabularyDatasetBinarizer
from fairseq.data import Dictionary, indexed_dataset

from ...core.errors import UserError
from ...core.files import file_sha256, write_text_atomically
from ...core.glue_files import SplitRows, check_glue_dir, missing_file_error, read_tsv, task_file
from ...core.glue_tasks import GlueTaskSpec, get_task_spec
from ...core.progress import eta_seconds, format_duration
from ..models.model_dir import build_bpe, load_model_dir

logger = logging.getLogger(__name__)

PREPARED_FORMAT_VERSION = 1  # part of the cache key: bump when the prepared output changes
MANIFEST_NAME = "manifest.json"
PREPARE_COMMAND = "python -m fairseq_ext.tools.glue_data prepare"  # named in error messages
ROWS_PER_CHUNK = 1000
PROGRESS_INTERVAL_S = 5.0

# --------------------------------------------------------------------------- tokenizer


@dataclass
class _Tokenizer:
    """Where the BPE comes from, so that worker processes can rebuild or inherit it."""

    bpe: object  # has .encode(text) -> space-joined subword tokens
    model_dir: object  # a ModelDir, or None for a BPE object given directly
    dictionary_path: Path
    fingerprint: Optional[dict]  # None: the tokenizer cannot be identified, so no caching


def _resolve_tokenizer(model_dir_or_bpe, dictionary, tokenizer_files: Sequence) -> _Tokenizer:
    is_model_dir = isinstance(model_dir_or_bpe, (str, os.PathLike)) or hasattr(model_dir_or_bpe, "bpe_args")
    if not is_model_dir:  # a BPE object
        if not hasattr(model_dir_or_bpe, "encode"):
            raise TypeError(f"expected a model directory or a BPE object with .encode(), got {model_dir_or_bpe!r}")
        bpe, model_dir = model_dir_or_bpe, None
        files = {str(f): file_sha256(f) for f in tokenizer_files}
        fingerprint = {"bpe": f"{type(bpe).__module__}.{type(bpe).__qualname__}", "files": files} if files else None
    else:
        model_dir = model_dir_or_bpe
        if isinstance(model_dir, (str, os.PathLike)):
            model_dir = load_model_dir(model_dir)
        bpe = build_bpe(model_dir)
        files, settings = {}, {}
        for key, value in sorted(dict(model_dir.bpe_args).items()):
            if isinstance(value, (str, os.PathLike)) and Path(value).is_file():
                files[key] = file_sha256(value)
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
        self.bpe = bpe
        self.binarizer = VocabularyDatasetBinarizer(Dictionary.load(str(dictionary_path)), append_eos=True)

    def encode_rows(self, rows):
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
        bpe = build_bpe(model_dir)
    _encoder = _Encoder(bpe, dictionary_path)


def _init_pool_worker(bpe, model_dir, dictionary_path):
    # A stop signal is the parent's to handle: it ends the pool (no traceback from each worker).
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    _init_encoder(bpe, model_dir, dictionary_path)


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
            ``fairseq_ext.plugin.models.model_dir``), or any BPE object with ``.encode(text) -> str``.
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
            raise missing_file_error(spec, path)
        else:
            absent.append(split)
            logger.warning(f"{path} not found: no {split.name} split, so no {split.leaderboard_file} for the leaderboard")

    tokenizer = _resolve_tokenizer(model_dir_or_bpe, dictionary, tokenizer_files)
    read = {split.name: read_tsv(spec, split, path) for split, path in present}
    cache_key = file_cache_key = None
    if tokenizer.fingerprint is not None:
        inputs = {split: rows.digest() for split, rows in read.items()}
        cache_key = _cache_key(spec, inputs, tokenizer, train_subset, train_subset_seed)
        file_cache_key = _cache_key(spec, {split.name: file_sha256(path) for split, path in present}, tokenizer,
                                    train_subset, train_subset_seed)
        cached = _cached_manifest(out_dir, cache_key, file_cache_key)
        if cached is not None:
            logger.info(f"{spec.name}: {out_dir} is up to date (cached), nothing to do")
            return cached
    else:
        logger.info("a BPE object without tokenizer_files cannot be fingerprinted: preparing without the cache")
    _check_replaceable(out_dir, spec)

    for rows in read.values():
        for reason, lines in rows.skipped_lines.items():
            shown = ", ".join(map(str, lines[:10])) + (", ..." if len(lines) > 10 else "")
            logger.warning(f"{rows.path}: skipped {len(lines)} rows ({reason}): lines {shown}")
    subset_skips = apply_train_subset(read["train"], train_subset, train_subset_seed)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        manifest = _write_prepared(spec, read, subset_skips, tokenizer, staging, workers)
        manifest.update(
            cache_key=cache_key,
            file_cache_key=file_cache_key,
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


def _cache_key(spec, inputs: Dict[str, str], tokenizer: _Tokenizer, train_subset, train_subset_seed) -> str:
    """What prepared data depends on, as a hash; ``inputs``: a digest of each split's rows (the cache key),
    or of its file's bytes (``file_cache_key``: how data prepared before 2026-12-06 was keyed)."""
    key = {
        "format": PREPARED_FORMAT_VERSION,
        "task": spec.name,
        "inputs": inputs,
        "tokenizer": tokenizer.fingerprint,
        "dictionary": file_sha256(tokenizer.dictionary_path),
        "train_subset": [train_subset, train_subset_seed] if train_subset else None,
    }
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _cached_manifest(out_dir: Path, cache_key: str, file_cache_key: str) -> Optional[dict]:
    """The manifest of ``out_dir`` if it was prepared from the same rows; a preparation keyed by the same
    file bytes (made before rows were the key) gets both keys written into its manifest."""
    try:
        manifest = load_manifest(out_dir)
    except UserError:
        return None
    if manifest.get("cache_key") == file_cache_key and file_cache_key != cache_key:
        manifest.update(cache_key=cache_key, file_cache_key=file_cache_key)
        write_text_atomically(out_dir / MANIFEST_NAME, json.dumps(manifest, indent=2) + "\n")
    return manifest if manifest.get("cache_key") == cache_key else None


def same_data(recorded_key, manifest: dict) -> bool:
    """Whether data a run recorded (its ``cache_key``, or the file key of data prepared before rows were the
    key) is the data of ``manifest``."""
    return recorded_key is not None and recorded_key in (manifest.get("cache_key"), manifest.get("file_cache_key"))


def _check_replaceable(out_dir: Path, spec: GlueTaskSpec) -> None:
    """Only an older preparation of the same task may be replaced."""
    if not out_dir.is_dir() or not any(out_dir.iterdir()):
        return
    if not (out_dir / MANIFEST_NAME).is_file():
        raise UserError(f"--out {out_dir} exists and is not a prepared GLUE directory; refusing to replace it")
    prepared_for = load_manifest(out_dir).get("task")
    if prepared_for != spec.name:
        raise UserError(f"--out {out_dir} holds prepared {prepared_for} data; refusing to replace it with {spec.name}")


def apply_train_subset(rows: SplitRows, size: Optional[int], seed: int) -> int:
    """Keep a seeded sample of ``size`` training rows, in file order; returns how many were left out."""
    if size is None or size >= len(rows.texts):
        return 0
    keep = np.sort(np.random.default_rng(seed).choice(len(rows.texts), size=size, replace=False))
    left_out = len(rows.texts) - size
    rows.texts = [rows.texts[i] for i in keep]
    rows.labels = [rows.labels[i] for i in keep]
    return left_out


def _write_prepared(spec, read: Dict[str, SplitRows], subset_skips: int, tokenizer: _Tokenizer, out: Path, workers) -> dict:
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
        pool = multiprocessing.Pool(workers, _init_pool_worker, (bpe, tokenizer.model_dir, tokenizer.dictionary_path))
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
    builders = [
        indexed_dataset.make_builder(str(d / f"{rows.split.name}.bin"), impl="mmap", vocab_size=vocab_size)
        for d in input_dirs
    ]
    chunks = [rows.texts[start:start + ROWS_PER_CHUNK] for start in range(0, len(rows.texts), ROWS_PER_CHUNK)]
    results = pool.imap(_encode_chunk, chunks) if pool is not None else map(_encode_chunk, chunks)
    summary = BinarizeSummary()
    longest, done, started = 0, 0, time.monotonic()
    last_report = started
    for encoded_columns, chunk_summary in results:
        summary.merge(chunk_summary)
        for builder, encoded in zip(builders, encoded_columns):
            for ids in encoded:
                builder.add_item(_as_tensor(ids))
        lengths = sum(np.array([len(ids) for ids in encoded]) for encoded in encoded_columns)
        longest = max(longest, int(lengths.max()))
        done += len(encoded_columns[0])
        if time.monotonic() - last_report >= PROGRESS_INTERVAL_S or done == len(rows.texts):
            rate = done / max(time.monotonic() - started, 1e-9)
            eta = "" if done == len(rows.texts) else \
                f", {rate:,.0f} rows/s, ETA {format_duration(eta_seconds(done, len(rows.texts), rate))}"
            logger.info(f"{spec.name} {rows.split.name}: {done}/{len(rows.texts)} rows tokenized{eta}")
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
    return torch.from_numpy(ids)


def _write_labels(spec, rows: SplitRows, label_dir: Path, label_dictionary) -> None:
    if spec.regression:
        (label_dir / f"{rows.split.name}.label").write_text("".join(f"{v}\n" for v in rows.labels), encoding="utf-8")
        return
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
        raise UserError(f"{path}: no such file; prepare the data with `{PREPARE_COMMAND}`")
    except json.JSONDecodeError as error:
        raise UserError(f"{path}: not valid JSON ({error})")


def read_test_indices(prepared_dir, split: str = "test") -> List[str]:
    """The GLUE ids of a prepared test split's rows, in the order of its .bin/.idx (and predictions)."""
    entry = load_manifest(prepared_dir).get("splits", {}).get(split)
    if entry is None or "index_file" not in entry:
        raise UserError(f"{prepared_dir}: no prepared test split {split!r}")
    return (Path(prepared_dir) / entry["index_file"]).read_text(encoding="utf-8").splitlines()


