"""GLUE files -> fairseq data: every task's format, row accounting, cache, bad input.

The real CoLA, SST-2 and STS-B files are read from ../shared/glue when present; the
other tasks are small files written here in the exact GLUE formats.  The tokenizer
is a tiny WordPiece trained on the fly, behind a stand-in for
fairseq_ext.plugin.models.model_dir (its interface: load_model_dir, build_bpe).
"""
import json
import multiprocessing
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from fairseq_ext.core.errors import UserError
from fairseq_ext.core.glue_files import read_split, write_leaderboard_tsv
from fairseq_ext.core.glue_tasks import TASKS
from fairseq_ext.plugin.data import glue_prepare
from fairseq_ext.plugin.data.glue_prepare import load_manifest, prepare_task, read_test_indices
from fairseq_ext.tools import glue_data as glue_data_cli
import tiny
from synthetic_glue import synthetic_sentence, write_synthetic_task

REPO = Path(__file__).resolve().parents[1]
GLUE = tiny.REAL_GLUE
needs_real_glue = pytest.mark.skipif(not (GLUE / "CoLA").is_dir(),
                                     reason="no real GLUE files (FAIRSEQ_EXT_TEST_GLUE, default ../shared/glue)")

class WordPieceBPE:
    """A fairseq-BPE-like object: ``encode(text)`` returns space-joined subword tokens."""

    def __init__(self, tokenizer_json):
        from tokenizers import Tokenizer

        self.tokenizer = Tokenizer.from_file(str(tokenizer_json))

    def encode(self, text):
        return " ".join(self.tokenizer.encode(text).tokens)


@dataclass
class TinyTokenizer:
    bpe: WordPieceBPE
    dictionary: Path  # fairseq dict.txt over the WordPiece vocabulary
    tokenizer_json: Path


def make_tiny_tokenizer(directory: Path) -> TinyTokenizer:
    from fairseq.data import Dictionary
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    rng = np.random.default_rng(0)
    corpus = [synthetic_sentence(rng, cue=i % 3) for i in range(400)]
    tokenizer = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tokenizer.normalizer = normalizers.BertNormalizer(lowercase=True)
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    trainer = trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"], show_progress=False)
    tokenizer.train_from_iterator(corpus, trainer)
    directory.mkdir(parents=True, exist_ok=True)
    tokenizer_json = directory / "tokenizer.json"
    tokenizer.save(str(tokenizer_json))
    dictionary = Dictionary()
    vocab = tokenizer.get_vocab()
    for token in sorted(vocab, key=vocab.get):
        dictionary.add_symbol(token)
    dictionary.save(str(directory / "dict.txt"))
    return TinyTokenizer(WordPieceBPE(tokenizer_json), directory / "dict.txt", tokenizer_json)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    return make_tiny_tokenizer(tmp_path_factory.mktemp("tiny_tokenizer"))


@pytest.fixture
def stub_model_dir(monkeypatch, tiny_tokenizer):
    """model_dir's interface, as glue_prepare uses it, over the tiny tokenizer; any --model-dir path loads it."""
    module = types.SimpleNamespace()
    module.load_model_dir = lambda path: SimpleNamespace(
        checkpoint=None,
        dictionary=str(tiny_tokenizer.dictionary),
        family="bert",
        bpe_args={"bpe": "test_wordpiece", "tokenizer_file": str(tiny_tokenizer.tokenizer_json)},
        pair_separator=False,
        pooling="cls",
    )
    module.build_bpe = lambda model_dir: WordPieceBPE(model_dir.bpe_args["tokenizer_file"])
    monkeypatch.setattr(glue_prepare, "load_model_dir", module.load_model_dir)
    monkeypatch.setattr(glue_prepare, "build_bpe", module.build_bpe)
    return module


def prepare(tiny, task, glue_dir, out, workers=1, **options):
    return prepare_task(
        task, glue_dir, tiny.bpe, tiny.dictionary, out, workers, tokenizer_files=[tiny.tokenizer_json], **options
    )


# ------------------------------------------------------------------ GLUE files in their exact formats


def load_split(out, key, split, dictionary_path):
    from fairseq.data import Dictionary, data_utils

    return data_utils.load_indexed_dataset(str(out / key / split), Dictionary.load(str(dictionary_path)))


# ------------------------------------------------------------------ real files


@needs_real_glue
def test_real_files_are_read_completely():
    cola_train = read_split("CoLA", GLUE, "train")
    assert cola_train.rows_read == len(cola_train.texts) == 8551
    assert (cola_train.labels.count("1"), cola_train.labels.count("0")) == (6023, 2528)
    assert cola_train.texts[0] == ("Our friends won't buy this analysis, let alone the next one we propose.",)
    assert len(read_split("CoLA", GLUE, "valid").texts) == 1043  # no final newline
    cola_test = read_split("CoLA", GLUE, "test")
    assert cola_test.indices == [str(i) for i in range(1063)] and cola_test.labels is None

    sst2_train = read_split("SST-2", GLUE, "train")
    assert (sst2_train.labels.count("1"), sst2_train.labels.count("0")) == (37569, 29780)
    assert sst2_train.texts[0] == ("hide new secretions from the parental units ",)  # trailing space kept
    assert len(read_split("SST-2", GLUE, "valid").texts) == 872

    stsb_dev = read_split("STS-B", GLUE, "valid")
    assert len(stsb_dev.texts) == 1500 and all(len(pair) == 2 for pair in stsb_dev.texts)
    assert all(0.0 <= float(score) <= 5.0 for score in stsb_dev.labels)
    assert len(read_split("STS-B", GLUE, "test").indices) == 1379


@needs_real_glue
def test_full_cola_and_stsb_account_for_every_row(tmp_path, tiny_tokenizer, stub_model_dir):
    from fairseq.data import Dictionary

    cola = prepare_task("CoLA", GLUE, "any/model/dir", None, tmp_path / "CoLA", workers=2)
    assert {name: entry["rows_written"] for name, entry in cola["splits"].items()} == {
        "train": 8551, "valid": 1043, "test": 1063,
    }
    assert all(entry["rows_read"] == entry["rows_written"] and not entry["rows_skipped"] for entry in cola["splits"].values())
    tokens = load_split(tmp_path / "CoLA", "input0", "train", tmp_path / "CoLA" / "input0" / "dict.txt")
    labels = load_split(tmp_path / "CoLA", "label", "train", tmp_path / "CoLA" / "label" / "dict.txt")
    assert len(tokens) == len(labels) == 8551
    dictionary = Dictionary.load(str(tmp_path / "CoLA" / "input0" / "dict.txt"))
    first = "Our friends won't buy this analysis, let alone the next one we propose."
    assert dictionary.string(tokens[0]) == tiny_tokenizer.bpe.encode(first)  # the pool kept the row order
    last_text = read_split("CoLA", GLUE, "train").texts[-1][0]
    assert dictionary.string(tokens[8550]) == tiny_tokenizer.bpe.encode(last_text)
    assert Dictionary.load(str(tmp_path / "CoLA" / "label" / "dict.txt")).symbols[4:6] == ["0", "1"]
    assert read_test_indices(tmp_path / "CoLA") == [str(i) for i in range(1063)]

    stsb = prepare_task("STS-B", GLUE, "any/model/dir", None, tmp_path / "STS-B", workers=1)
    assert stsb["splits"]["train"]["rows_written"] == 5749
    assert stsb["splits"]["valid"]["rows_written"] == 1500
    scores = (tmp_path / "STS-B" / "label" / "train.label").read_text().splitlines()
    assert len(scores) == 5749 and scores[0] == "5.000"
    assert len(load_split(tmp_path / "STS-B", "input1", "train", tiny_tokenizer.dictionary)) == 5749
    assert not (tmp_path / "STS-B" / "label" / "train.bin").exists()
    assert stsb["tokenizer"]["files"]["tokenizer_file"]  # the model dir's tokenizer files key the cache


@needs_real_glue
def test_sst2_train_subset_is_seeded_and_recorded(tmp_path, tiny_tokenizer):
    first = prepare(tiny_tokenizer, "SST-2", GLUE, tmp_path / "a", train_subset=300)
    train = first["splits"]["train"]
    assert train["rows_read"] == 67349
    assert train["rows_written"] == 300
    assert train["rows_skipped"] == {"not in --train-subset": 67049}
    assert first["train_subset"] == {"size": 300, "seed": 1}
    assert first["splits"]["valid"]["rows_written"] == 872  # only training rows are subsampled
    prepare(tiny_tokenizer, "SST-2", GLUE, tmp_path / "b", train_subset=300)
    assert (tmp_path / "a/input0/train.bin").read_bytes() == (tmp_path / "b/input0/train.bin").read_bytes()
    with pytest.raises(UserError, match=r"--train-subset-seed -5: must be in \[0, 2\*\*32\)"):
        prepare(tiny_tokenizer, "SST-2", GLUE, tmp_path / "c", train_subset=300, train_subset_seed=-5)


# ------------------------------------------------------------------ every task's format


@pytest.mark.parametrize("task", ["MRPC", "QQP", "MNLI", "QNLI", "RTE", "WNLI"])
def test_synthetic_task_formats_prepare(tmp_path, tiny_tokenizer, task, caplog):
    written = write_synthetic_task(tmp_path / "glue", task)
    spec = TASKS[task]
    with caplog.at_level("WARNING", logger="fairseq_ext.plugin.data.glue_prepare"):
        manifest = prepare(tiny_tokenizer, task, tmp_path / "glue", tmp_path / "out")
    out = tmp_path / "out"

    assert set(manifest["splits"]) == {s.name for s in spec.splits}
    for split in spec.splits:
        entry = manifest["splits"][split.name]
        assert entry["rows_read"] == written[split.file_name]
        assert entry["rows_written"] + sum(entry["rows_skipped"].values()) == entry["rows_read"]
        assert len(load_split(out, "input1", split.name, tiny_tokenizer.dictionary)) == entry["rows_written"]
        if split.labelled:
            assert len(load_split(out, "label", split.name, out / "label" / "dict.txt")) == entry["rows_written"]
        else:
            assert entry["leaderboard_file"] == split.leaderboard_file
            assert read_test_indices(out, split.name) == [str(i) for i in range(entry["rows_written"])]
    assert (out / "label" / "dict.txt").read_text().split()[::2] == list(spec.labels)

    if task == "QQP":
        assert manifest["splits"]["train"]["rows_skipped"] == {"wrong column count": 2}
        assert manifest["splits"]["train"]["skipped_lines"] == {"wrong column count": [7, 8]}
        assert "skipped 2 rows (wrong column count): lines 7, 8" in caplog.text
    else:
        assert all(not entry["rows_skipped"] for entry in manifest["splits"].values())
    if task == "MNLI":
        assert manifest["valid_subsets"] == ["valid", "valid1"]
        assert (manifest["splits"]["test1"]["leaderboard_file"], manifest["splits"]["test"]["leaderboard_file"]) == (
            "MNLI-mm.tsv", "MNLI-m.tsv",
        )
    if task == "MRPC":  # the BOM is not part of the first column's name
        assert read_split("MRPC", tmp_path / "glue", "train").labels[0] in ("0", "1")


def test_cache_skips_unchanged_inputs_and_redoes_changed_ones(tmp_path, tiny_tokenizer, caplog):
    write_synthetic_task(tmp_path / "glue", "RTE")
    first = prepare(tiny_tokenizer, "RTE", tmp_path / "glue", tmp_path / "out")
    stamp = (tmp_path / "out" / "manifest.json").stat().st_mtime_ns
    with caplog.at_level("INFO", logger="fairseq_ext.plugin.data.glue_prepare"):
        again = prepare(tiny_tokenizer, "RTE", tmp_path / "glue", tmp_path / "out")
    assert "cached" in caplog.text
    assert again == first and (tmp_path / "out" / "manifest.json").stat().st_mtime_ns == stamp

    write_synthetic_task(tmp_path / "glue", "RTE", rows_per_split=7, seed=1)
    changed = prepare(tiny_tokenizer, "RTE", tmp_path / "glue", tmp_path / "out")
    assert changed["cache_key"] != first["cache_key"]
    assert changed["splits"]["train"]["rows_written"] == 7
    assert not list(tmp_path.glob(".out.*"))  # no staging or old copies left


def test_out_dir_of_another_kind_is_never_replaced(tmp_path, tiny_tokenizer):
    write_synthetic_task(tmp_path / "glue", "RTE")
    write_synthetic_task(tmp_path / "glue", "WNLI")
    prepare(tiny_tokenizer, "RTE", tmp_path / "glue", tmp_path / "out")
    with pytest.raises(UserError, match="holds prepared RTE data; refusing to replace it with WNLI"):
        prepare(tiny_tokenizer, "WNLI", tmp_path / "glue", tmp_path / "out")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("mine")
    with pytest.raises(UserError, match="is not a prepared GLUE directory"):
        prepare(tiny_tokenizer, "WNLI", tmp_path / "glue", tmp_path / "notes")
    assert load_manifest(tmp_path / "out")["task"] == "RTE"
    assert (tmp_path / "notes" / "todo.txt").read_text() == "mine"


def test_absent_test_split_is_recorded(tmp_path, tiny_tokenizer):
    write_synthetic_task(tmp_path / "glue", "WNLI")
    (tmp_path / "glue" / "WNLI" / "test.tsv").unlink()
    manifest = prepare(tiny_tokenizer, "WNLI", tmp_path / "glue", tmp_path / "out")
    assert manifest["absent_splits"] == ["test"] and "test" not in manifest["splits"]


# ------------------------------------------------------------------ leaderboard files


def test_leaderboard_files(tmp_path):
    path = write_leaderboard_tsv("MNLI", ["0", "1", "2"], np.array([2, 0, 1]), tmp_path / "MNLI-m.tsv")
    assert path.read_text() == "index\tprediction\n0\tcontradiction\n1\tentailment\n2\tneutral\n"
    scores = np.array([[0.1, 0.9], [0.8, 0.2]])  # scores: argmax
    write_leaderboard_tsv("RTE", [0, 1], scores, tmp_path / "RTE.tsv")
    assert (tmp_path / "RTE.tsv").read_text().splitlines()[1:] == ["0\tnot_entailment", "1\tentailment"]
    write_leaderboard_tsv("CoLA", [5], [1], tmp_path / "CoLA.tsv")
    assert (tmp_path / "CoLA.tsv").read_text().splitlines() == ["index\tprediction", "5\t1"]
    write_leaderboard_tsv("STS-B", [0, 1, 2], [-0.3, 2.3456, 7.0], tmp_path / "STS-B.tsv")
    assert (tmp_path / "STS-B.tsv").read_text().splitlines()[1:] == ["0\t0.000", "1\t2.346", "2\t5.000"]
    with pytest.raises(UserError, match="3 test indices"):
        write_leaderboard_tsv("CoLA", [0, 1, 2], [1, 0], tmp_path / "bad.tsv")
    with pytest.raises(UserError, match="class ids 0..1"):
        write_leaderboard_tsv("CoLA", [0], [2], tmp_path / "bad.tsv")
    assert not (tmp_path / "bad.tsv").exists() and not list(tmp_path.glob(".*tmp*"))


# ------------------------------------------------------------------ bad input: one line, exit 2, no output


def _cli_child(argv, stderr_path):
    sys.stderr = open(stderr_path, "w")
    sys.argv = ["glue_data.py", *argv]
    glue_data_cli.main(argv)


def run_cli(argv, tmp_path):
    """Run the CLI's main in a forked child (fairseq is already imported there): (exit code, stderr lines)."""
    stderr_path = tmp_path / "stderr.txt"
    child = multiprocessing.get_context("fork").Process(target=_cli_child, args=(argv, stderr_path))
    child.start()
    child.join(60)
    return child.exitcode, stderr_path.read_text().splitlines()


def assert_one_line_error(code, lines, expected):
    assert code == 2, lines
    assert len(lines) == 1 and lines[0].startswith("glue_data.py: error: "), lines
    assert expected in lines[0], lines


def corrupt(path: Path, line_number: int, new_line: str):
    lines = path.read_text(encoding="utf-8-sig").split("\n")
    lines[line_number - 1] = new_line
    path.write_text("\n".join(lines))


BAD_INPUTS = {
    "unknown task": (lambda glue: None, ["--task", "CoLB"], "unknown GLUE task 'CoLB'; valid tasks: CoLA, SST-2, MRPC"),
    "glue dir is a file": (lambda glue: None, ["--glue-dir", "FILE"], "is a file, not a directory"),
    "missing file": (
        lambda glue: (glue / "RTE" / "dev.tsv").unlink(), [], "RTE/dev.tsv: no such file; RTE needs <glue-dir>/RTE/"
    ),
    "wrong column count": (
        lambda glue: corrupt(glue / "RTE" / "train.tsv", 4, "3\tonly one sentence\tentailment"), [],
        "RTE/train.tsv:4: expected 4 tab-separated columns, found 3",
    ),
    "label outside the label set": (
        lambda glue: corrupt(glue / "RTE" / "dev.tsv", 6, "4\tA man.\tA dog.\tneutral"), [],
        "RTE/dev.tsv:6: label 'neutral' is not one of entailment, not_entailment",
    ),
    "empty split": (
        lambda glue: (glue / "RTE" / "train.tsv").write_text("index\tsentence1\tsentence2\tlabel\n"), [],
        "RTE/train.tsv: no data rows",
    ),
    "header without a needed column": (
        lambda glue: corrupt(glue / "RTE" / "test.tsv", 1, "idx\tsentence1\tsentence2"), [],
        "RTE/test.tsv:1: header has no column 'index'",
    ),
    "bad --workers": (lambda glue: None, ["--workers", "0"], "--workers 0: must be at least 1"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_exit_2_and_no_output(case, tmp_path, stub_model_dir):
    damage, overrides, expected = BAD_INPUTS[case]
    glue = tmp_path / "glue"
    write_synthetic_task(glue, "RTE")
    damage(glue)
    (tmp_path / "FILE").write_text("not a directory")
    options = {"--task": "RTE", "--glue-dir": str(glue), "--model-dir": "any/model/dir", "--out": str(tmp_path / "out")}
    for flag, value in zip(overrides[::2], overrides[1::2]):
        options[flag] = str(tmp_path / value) if value == "FILE" else value
    argv = ["prepare"] + [item for pair in options.items() for item in pair]
    code, lines = run_cli(argv, tmp_path)
    assert_one_line_error(code, lines, expected)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_cli_entry_point_in_a_subprocess(tmp_path):
    environment = dict(os.environ, PYTHONPATH=str(REPO))
    result = subprocess.run(
        [sys.executable, "-m", "fairseq_ext.tools.glue_data", "prepare", "--task", "XNLI", "--glue-dir", str(tmp_path),
         "--model-dir", str(tmp_path), "--out", str(tmp_path / "out")],
        cwd=REPO, env=environment, capture_output=True, text=True, timeout=120,
    )
    lines = result.stderr.splitlines()
    assert_one_line_error(result.returncode, lines, "unknown GLUE task 'XNLI'")
    assert not (tmp_path / "out").exists()


def test_cli_prepares_then_finds_the_cache(tmp_path, stub_model_dir):
    write_synthetic_task(tmp_path / "glue", "WNLI")
    argv = ["prepare", "--task", "wnli", "--glue-dir", str(tmp_path / "glue"), "--model-dir", "m", "--out",
            str(tmp_path / "out"), "--workers", "1"]
    code, lines = run_cli(argv, tmp_path)
    assert code == 0, lines
    assert json.loads((tmp_path / "out" / "manifest.json").read_text())["task"] == "WNLI"
    assert any("train: 12/12 rows written" in line for line in lines)
    code, lines = run_cli(argv, tmp_path)
    assert code == 0 and any("cached" in line for line in lines), lines
