"""Tiny real data and a tiny pretrained masked LM, built by the tests themselves.

The corpus is synthetic text with a learnable label (sentiment words), binarized
with fairseq-preprocess into the layouts fairseq's masked_lm and
sentence_prediction tasks read.  The pretrained model is a real fairseq RoBERTa
trained by train.py for a few masked-LM updates.
"""
import dataclasses
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
# Real GLUE files (at least CoLA, SST-2 and STS-B as download_glue_data.py writes them):
# $FAIRSEQ_EXT_TEST_GLUE, else ../shared/glue beside the repository. Tests that need them skip without.
REAL_GLUE = Path(os.environ.get("FAIRSEQ_EXT_TEST_GLUE") or REPO.parent / "shared" / "glue")

# A 2-layer, 32-dim RoBERTa: big enough to have every parameter role, fast on CPU.
TINY_ROBERTA = [
    "--arch", "roberta", "--encoder-layers", "2", "--encoder-embed-dim", "32",
    "--encoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
    "--max-positions", "64",
]
COMMON = ["--cpu", "--num-workers", "0", "--seed", "1", "--log-format", "simple", "--log-interval", "1"]

_POSITIVE = ["good", "great", "fine", "nice", "happy"]
_NEGATIVE = ["bad", "awful", "poor", "sad", "ugly"]
_FILLER = [f"w{i}" for i in range(40)]


def _sentence(rng: random.Random, label: int) -> str:
    words = rng.choices(_FILLER, k=rng.randint(4, 12))
    sentiment = _POSITIVE if label else _NEGATIVE
    for _ in range(rng.randint(1, 3)):
        words.insert(rng.randrange(len(words) + 1), rng.choice(sentiment))
    return " ".join(words)


def as_regression(delta):
    """A regression delta made from a trained classification one: a 1-output head, regression_target on."""
    out_proj = [name for name in delta.tensors if name.endswith(".out_proj.weight") and "classification_heads" in name]
    tensors = dict(delta.tensors)
    for name in out_proj:
        bias = name[:-len("weight")] + "bias"
        tensors[name], tensors[bias] = delta.tensors[name][:1].clone(), delta.tensors[bias][:1].clone()
    task = {**delta.task, "cfg": {**delta.task_cfg, "num_classes": 1, "regression_target": True, "glue_task": None},
            "label_symbols": None}  # no longer a GLUE classification task's delta
    return dataclasses.replace(delta, tensors=tensors, task=task, path=f"{delta.path}#regression")


def _env(env=None) -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **(env or {}))


def run(args, cwd=REPO, env=None, check=True, **kwargs):
    """Run a command with the test interpreter; fail with its output on error."""
    result = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=_env(env), capture_output=True, text=True, **kwargs
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"{' '.join(map(str, args))} exited {result.returncode}\n"
            f"--- stdout ---\n{result.stdout[-4000:]}\n--- stderr ---\n{result.stderr[-4000:]}"
        )
    return result


def start(args, cwd=REPO, env=None) -> subprocess.Popen:
    """``run``'s command in the background (stdout and stderr piped, as text)."""
    return subprocess.Popen([sys.executable, *args], cwd=cwd, env=_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def last_saved_updates(run_record: Path):
    """The update count of a run's last checkpoint save, from its run_record.json (None before one)."""
    if not run_record.exists():
        return None
    return (json.loads(run_record.read_text()).get("progress") or {}).get("last_saved_updates")


def interrupt_when(job: subprocess.Popen, ready, timeout=300):
    """SIGINT to ``job`` once ``ready()`` holds; (stdout, stderr) after it has stopped as a stopped run
    must: exit 130, no traceback."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and job.poll() is None:
        if ready():
            job.send_signal(signal.SIGINT)
            break
        time.sleep(0.1)
    stdout, stderr = job.communicate(timeout=timeout)
    assert job.returncode == 130, stdout[-3000:] + stderr[-3000:]
    assert "Traceback" not in stdout + stderr
    return stdout, stderr


def _preprocess(pref_args, destdir, srcdict=None):
    args = ["-m", "fairseq_cli.preprocess", "--only-source", "--destdir", str(destdir), "--workers", "1"]
    args += pref_args
    if srcdict:
        args += ["--srcdict", str(srcdict)]
    run(args)


def make_classification_data(root: Path, n_train=160, n_valid=40, seed=0) -> Path:
    """Binarized sentence-classification data (input0/, label/) plus a masked-LM copy (mlm/)."""
    rng = random.Random(seed)
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", n_train), ("valid", n_valid)):
        labels = [rng.randint(0, 1) for _ in range(size)]
        (raw / f"{split}.input0").write_text("\n".join(_sentence(rng, y) for y in labels) + "\n")
        (raw / f"{split}.label").write_text("\n".join(str(y) for y in labels) + "\n")
    data = root / "bin"
    _preprocess(["--trainpref", raw / "train.input0", "--validpref", raw / "valid.input0"], data / "input0")
    _preprocess(["--trainpref", raw / "train.label", "--validpref", raw / "valid.label"], data / "label")
    _preprocess(
        ["--trainpref", raw / "train.input0", "--validpref", raw / "valid.input0"],
        data / "mlm",
        srcdict=data / "input0" / "dict.txt",
    )
    return data


def pretrain_masked_lm(data: Path, save_dir: Path, updates=20) -> Path:
    """A real pretrained tiny RoBERTa: a few masked-LM updates with train.py."""
    run(
        ["train.py", str(data / "mlm"), "--task", "masked_lm", "--criterion", "masked_lm",
         *TINY_ROBERTA, "--tokens-per-sample", "32", "--batch-size", "16",
         "--optimizer", "adam", "--lr", "1e-3", "--max-update", str(updates),
         "--save-dir", str(save_dir), "--no-epoch-checkpoints", *COMMON]
    )
    return save_dir / "checkpoint_last.pt"


def glue_recipe(data: Path, pretrained: Path, save_dir: Path, updates=12, extra=()):
    """fairseq's RoBERTa GLUE fine-tuning recipe, shrunk: restore a pretrained LM, new head."""
    return [
        "train.py", str(data), "--task", "sentence_prediction", "--criterion", "sentence_prediction",
        "--num-classes", "2", "--init-token", "0", "--separator-token", "2",
        *TINY_ROBERTA, "--restore-file", str(pretrained),
        "--reset-optimizer", "--reset-dataloader", "--reset-meters",
        "--batch-size", "16", "--optimizer", "adam", "--lr", "1e-2",
        "--lr-scheduler", "polynomial_decay", "--total-num-update", str(updates),
        "--warmup-updates", "2", "--max-update", str(updates),
        "--save-dir", str(save_dir), "--no-epoch-checkpoints",
        "--best-checkpoint-metric", "accuracy", "--maximize-best-checkpoint-metric",
        *COMMON, *extra,
    ]


def run_main(main, capsys, *argv):
    """A CLI ``main`` in-process: (exit status, stdout, stderr)."""
    try:
        main([str(arg) for arg in argv])
        status = 0
    except SystemExit as exit:
        status = exit.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def assert_one_line_error(result, *fragments):
    """``run_main``'s result is exit status 2 with one stderr line holding every fragment."""
    status, _, err = result
    assert status == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


# ------------------------------------------------------------------ seq2seq: a tiny translation model

# A 2+2-layer, 16-dim transformer: every encoder, decoder and cross-attention bias role, fast on CPU.
# The output projection is tied to the decoder's embeddings, as in fairseq's translation recipes.
TINY_TRANSFORMER = [
    "--arch", "transformer", "--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "16",
    "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
    "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--share-decoder-input-output-embed",
]
TRANSLATION = ["--task", "translation", "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
               "--optimizer", "adam", "--batch-size", "16"]


def make_translation_data(root: Path):
    """(pretraining, fine-tuning) binarized src-tgt data: the synthetic corpora of the BLEU experiment
    (monotone word-for-word translation, then reversed), small, with one dictionary per language."""
    from fairseq_ext.experiments.seq2seq_bleu import SETTINGS, make_data

    return make_data(root, SETTINGS["new-word-order"], (200, 24, 24), (160, 24, 24), vocab=20, lengths=(3, 7),
                     joined=False)


def pretrain_translation(data: Path, save_dir: Path, updates=30) -> Path:
    """A real pretrained tiny translation transformer: a few updates of train.py --task translation."""
    run(["train.py", str(data), *TRANSLATION, *TINY_TRANSFORMER, "--lr", "5e-3", "--max-update", str(updates),
         "--save-dir", str(save_dir), "--no-epoch-checkpoints", *COMMON])
    return save_dir / "checkpoint_last.pt"


def translation_recipe(data: Path, pretrained: Path, save_dir: Path, updates=12, extra=()):
    """Fine-tuning a pretrained translation model on new data, fairseq-style (--restore-file, --reset-*)."""
    return ["train.py", str(data), *TRANSLATION, *TINY_TRANSFORMER, "--lr", "1e-2",
            "--restore-file", str(pretrained), "--reset-optimizer", "--reset-dataloader", "--reset-meters",
            "--max-update", str(updates), "--save-dir", str(save_dir), "--no-epoch-checkpoints", *COMMON, *extra]


def embedded_model_dir():
    """The embedded MiniLM's model folder, converted on first use; the test skips where it cannot be."""
    import pytest
    from fairseq_ext.core.errors import UserError
    from fairseq_ext.plugin.models.model_dir import load_model_dir
    from fairseq_ext.plugin.models.pretrained import default_model_dir

    try:
        return load_model_dir(default_model_dir())
    except UserError as error:
        pytest.skip(str(error))
