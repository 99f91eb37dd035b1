"""GLUE folders the tests write themselves: every task's files in the exact layout GLUE's
download_glue_data.py produces, with labels a model can learn.

Each example carries a cue for its label: a classification sentence holds words of its
class (``CUES``), and an STS-B pair shares more words the higher its score.  The GLUE
runner's tests train on these, so they run on every clone; the real files
(``tiny.REAL_GLUE``) add a layer on top where they exist.
"""
from pathlib import Path
from typing import Dict, Iterable

import numpy as np

from fairseq_ext.core.glue_tasks import TASKS

WORDS = (
    "the a an this that some every no man woman dog cat city story film movie question answer sentence "
    "is was will can did has saw bought read wrote liked hated told asked know think believe "
    "big small old new quickly slowly very and or but because if why how what "
    "who where when to of in on at by with for from about john mary bill sue house car book"
).split()
# Words that mark class i of a task (in the task's label order): what a model learns.
CUES = (("awful", "boring", "broken", "wrong"), ("great", "lovely", "brilliant", "right"),
        ("perhaps", "maybe", "unclear", "possibly"))

MNLI_TRAIN_HEADER = (
    "index promptID pairID genre sentence1_binary_parse sentence2_binary_parse sentence1_parse "
    "sentence2_parse sentence1 sentence2 label1 gold_label"
).split()
MNLI_DEV_HEADER = MNLI_TRAIN_HEADER[:-1] + "label2 label3 label4 label5 gold_label".split()
MNLI_TEST_HEADER = MNLI_TRAIN_HEADER[:10]
STSB_HEADER = "index genre filename year old_index source1 source2 sentence1 sentence2 score".split()


def synthetic_sentence(rng, min_words=3, max_words=12, cue=None) -> str:
    words = list(rng.choice(WORDS, size=rng.integers(min_words, max_words + 1)))
    if cue is not None:
        words.insert(int(rng.integers(len(words) + 1)), str(rng.choice(CUES[cue])))
    return " ".join(words).capitalize() + str(rng.choice([".", "?", "!", " ."]))


def write_tsv(path: Path, header, rows, bom=False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = (["\t".join(header)] if header else []) + ["\t".join(map(str, row)) for row in rows]
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + ("\n".join(lines) + "\n").encode())


def _similar_pair(rng, score: float):
    """Two sentences sharing about score/5 of their words."""
    first = list(rng.choice(WORDS, size=10))
    second = [word if rng.random() < score / 5.0 else str(rng.choice(WORDS)) for word in first]
    return " ".join(first).capitalize() + ".", " ".join(second).capitalize() + "."


def write_synthetic_task(glue_dir: Path, task: str, rows_per_split=12, seed=0, train_rows=None) -> Dict[str, int]:
    """Write <glue_dir>/<task>/*.tsv as download_glue_data.py does (``train_rows`` training rows, default
    ``rows_per_split``); returns {file name: data rows}."""
    rng = np.random.default_rng(seed)
    spec = TASKS[task]
    directory = glue_dir / task
    sizes = {"train.tsv": train_rows or rows_per_split}

    def rows_of(name):
        return sizes.get(name, rows_per_split)

    def label_index():
        return int(rng.integers(len(spec.labels)))

    def pair(cue=None):
        return synthetic_sentence(rng), synthetic_sentence(rng, cue=cue)

    written = {}
    if task == "CoLA":  # train/dev: no header; source, label, the original's '*' mark, sentence
        for name in ("train.tsv", "dev.tsv"):
            rows = []
            for _ in range(rows_of(name)):
                label = label_index()
                rows.append(("gj04", label, "" if label else "*", synthetic_sentence(rng, cue=label)))
            write_tsv(directory / name, None, rows)
        write_tsv(directory / "test.tsv", ["index", "sentence"],
                  [(i, synthetic_sentence(rng, cue=label_index())) for i in range(rows_per_split)])
    elif task == "SST-2":
        for name in ("train.tsv", "dev.tsv"):
            rows = [(synthetic_sentence(rng, cue=label), label) for label in (label_index() for _ in range(rows_of(name)))]
            write_tsv(directory / name, ["sentence", "label"], rows)
        write_tsv(directory / "test.tsv", ["index", "sentence"],
                  [(i, synthetic_sentence(rng, cue=label_index())) for i in range(rows_per_split)])
    elif task == "STS-B":
        for name in ("train.tsv", "dev.tsv", "test.tsv"):
            rows = []
            for i in range(rows_of(name)):
                score = round(float(rng.integers(0, 26)) / 5.0, 3)
                first, second = _similar_pair(rng, score)
                rows.append([i, "main-captions", "MSRvid", "2012test", f"{i:04d}", "none", "none", first, second]
                            + ([f"{score:.3f}"] if name != "test.tsv" else []))
            write_tsv(directory / name, STSB_HEADER if name != "test.tsv" else STSB_HEADER[:-1], rows)
    elif task == "MRPC":  # msr_paraphrase based: train/dev keep the source file's BOM header
        header = ["Quality", "#1 ID", "#2 ID", "#1 String", "#2 String"]
        for name in ("train.tsv", "dev.tsv"):
            rows = [(spec.labels[k], 700000 + i, 800000 + i, *pair(k))
                    for i, k in enumerate(label_index() for _ in range(rows_of(name)))]
            write_tsv(directory / name, ["\ufeff" + header[0]] + header[1:], rows)
        write_tsv(directory / "test.tsv", ["index"] + header[1:],
                  [(i, 1000 + i, 2000 + i, *pair()) for i in range(rows_per_split)])
    elif task == "QQP":  # question text with a newline splits a row in two: both lines are malformed
        header = ["id", "qid1", "qid2", "question1", "question2", "is_duplicate"]
        for name in ("train.tsv", "dev.tsv"):
            rows = [(i, 2 * i + 1, 2 * i + 2, *pair(k), spec.labels[k])
                    for i, k in enumerate(label_index() for _ in range(rows_of(name)))]
            if name == "train.tsv":
                rows[5:5] = [(99, 199, 200, "Why is the sky blue?"), ("Because of the air?", 0)]
            write_tsv(directory / name, header, rows)
            written[name] = len(rows)
        write_tsv(directory / "test.tsv", ["id", "question1", "question2"], [(i, *pair()) for i in range(rows_per_split)])
    elif task == "MNLI":
        def parse(text):
            return "( " + text + " )"

        def mnli_row(i, label, copies):
            s1, s2 = pair(label)
            return (i, 31193 + i, f"{31193 + i}n", "government", parse(s1), parse(s2), parse(s1), parse(s2), s1, s2,
                    *([spec.labels[label]] * copies if copies else []))

        write_tsv(directory / "train.tsv", MNLI_TRAIN_HEADER, [mnli_row(i, label_index(), 2) for i in range(rows_of("train.tsv"))])
        for name in ("dev_matched.tsv", "dev_mismatched.tsv"):
            write_tsv(directory / name, MNLI_DEV_HEADER, [mnli_row(i, label_index(), 6) for i in range(rows_per_split)])
        for name in ("test_matched.tsv", "test_mismatched.tsv"):
            write_tsv(directory / name, MNLI_TEST_HEADER, [mnli_row(i, None, 0) for i in range(rows_per_split)])
    else:  # QNLI, RTE, WNLI: index, two text columns, label
        text_columns = list(spec.text_columns)
        for name in ("train.tsv", "dev.tsv"):
            rows = [(i, *pair(k), spec.labels[k]) for i, k in enumerate(label_index() for _ in range(rows_of(name)))]
            write_tsv(directory / name, ["index"] + text_columns + ["label"], rows)
        write_tsv(directory / "test.tsv", ["index"] + text_columns, [(i, *pair()) for i in range(rows_per_split)])
    return {split.file_name: written.get(split.file_name, rows_of(split.file_name)) for split in spec.splits}


def make_glue_dir(root: Path, tasks: Iterable[str] = ("CoLA", "SST-2", "STS-B", "MRPC", "RTE"), rows_per_split=40,
                  train_rows=None, seed=0) -> Path:
    """A glue_data folder holding ``tasks``, each task with its own seed."""
    for offset, task in enumerate(tasks):
        write_synthetic_task(Path(root), task, rows_per_split, seed + offset, train_rows)
    return Path(root)
