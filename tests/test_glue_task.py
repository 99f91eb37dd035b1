"""The fairseq task ``glue`` and criterion ``glue_prediction``: setup, encoding, metrics, training.

In-process tests drive the task and criterion directly (a stand-in model gives
known predictions); subprocess tests run fairseq_cli.train on a tiny random
RoBERTa, once with 1 worker and once with 2 gloo workers.
"""
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, matthews_corrcoef

from fairseq_ext.core.errors import UserError
from fairseq_ext.plugin.data.glue_prepare import prepare_task
from test_glue_data import GLUE, tiny_tokenizer, write_synthetic_task  # noqa: F401  (tiny_tokenizer: a fixture)

REPO = Path(__file__).resolve().parents[1]
TINY_ROBERTA = (
    "--arch roberta --encoder-layers 2 --encoder-embed-dim 32 --encoder-ffn-embed-dim 64 "
    "--encoder-attention-heads 2 --max-positions 64"
).split()


def write_subset(glue_dir: Path, task: str, lines_per_file: dict):
    """The first lines (header included) of the real GLUE files."""
    (glue_dir / task).mkdir(parents=True, exist_ok=True)
    for name, count in lines_per_file.items():
        lines = (GLUE / task / name).read_text(encoding="utf-8").split("\n")[:count]
        (glue_dir / task / name).write_text("\n".join(lines) + "\n", encoding="utf-8")


def prepare_tiny(tiny, task, glue_dir, out):
    return prepare_task(task, glue_dir, tiny.bpe, tiny.dictionary, out, 1, tokenizer_files=[tiny.tokenizer_json])


@pytest.fixture(scope="module")
def cola_data(tmp_path_factory, tiny_tokenizer):
    if not (GLUE / "CoLA").is_dir():
        pytest.skip("no real GLUE files (FAIRSEQ_EXT_TEST_GLUE, default ../shared/glue)")
    root = tmp_path_factory.mktemp("cola")
    write_subset(root / "glue", "CoLA", {"train.tsv": 160, "dev.tsv": 100, "test.tsv": 21})  # CoLA train/dev: no header
    prepare_tiny(tiny_tokenizer, "CoLA", root / "glue", root / "data")
    return root / "data"


@pytest.fixture(scope="module")
def stsb_data(tmp_path_factory, tiny_tokenizer):
    if not (GLUE / "STS-B").is_dir():
        pytest.skip("no real GLUE files (FAIRSEQ_EXT_TEST_GLUE, default ../shared/glue)")
    root = tmp_path_factory.mktemp("stsb")
    write_subset(root / "glue", "STS-B", {"train.tsv": 65, "dev.tsv": 101, "test.tsv": 21})
    prepare_tiny(tiny_tokenizer, "STS-B", root / "glue", root / "data")
    return root / "data"


@pytest.fixture(scope="module")
def rte_data(tmp_path_factory, tiny_tokenizer):
    root = tmp_path_factory.mktemp("rte")
    write_synthetic_task(root / "glue", "RTE", rows_per_split=20)
    prepare_tiny(tiny_tokenizer, "RTE", root / "glue", root / "data")
    return root / "data"


def setup(data, *options, criterion="glue_prediction"):
    """(cfg, task) as fairseq-train builds them from the command line."""
    from fairseq import options as fairseq_options
    from fairseq import tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    parser = fairseq_options.get_training_parser()
    argv = [str(data), "--task", "glue", "--criterion", criterion, *TINY_ROBERTA, *options]
    cfg = convert_namespace_to_omegaconf(fairseq_options.parse_args_and_arch(parser, argv))
    return cfg, tasks.setup_task(cfg.task)


# ------------------------------------------------------------------ task setup


def test_task_settings_come_from_the_glue_task(cola_data, stsb_data):
    cfg, task = setup(cola_data)  # no --glue-task: the manifest says CoLA
    assert (task.spec.name, task.cfg.num_classes, task.cfg.regression_target) == ("CoLA", 2, False)
    assert task.cfg.init_token == task.source_dictionary.bos() and task.cfg.shorten_method == "truncate"
    cfg, task = setup(stsb_data, "--glue-task", "sts-b")
    assert (task.spec.name, task.cfg.num_classes, task.cfg.regression_target) == ("STS-B", 1, True)
    criterion = task.build_criterion(cfg.criterion)
    assert criterion.regression_target  # without --regression-target: the task decides


def test_task_setup_rejects_inconsistent_options(cola_data, tmp_path):
    with pytest.raises(UserError, match="--glue-task SST-2, but .* holds CoLA data"):
        setup(cola_data, "--glue-task", "SST-2")
    with pytest.raises(UserError, match="unknown GLUE task 'CoLB'"):
        setup(cola_data, "--glue-task", "CoLB")
    with pytest.raises(UserError, match="--num-classes 3 contradicts --glue-task CoLA"):
        setup(cola_data, "--num-classes", "3")
    for length in ("-1", "2"):
        with pytest.raises(UserError, match=f"--max-seq-len {length}: must be at least 3"):
            setup(cola_data, "--max-seq-len", length)
    cfg, task = setup(cola_data, criterion="sentence_prediction")
    with pytest.raises(UserError, match="needs --criterion glue_prediction"):
        task.build_criterion(cfg.criterion)

    swapped = tmp_path / "swapped"  # labels as fairseq-preprocess orders them: by frequency
    (swapped / "label").mkdir(parents=True)
    (swapped / "input0").symlink_to(cola_data / "input0", target_is_directory=True)
    (swapped / "label" / "dict.txt").write_text("1 6023\n0 2528\n")
    with pytest.raises(UserError, match="label/dict.txt lists the classes 1, 0; CoLA needs 0, 1"):
        setup(swapped, "--glue-task", "CoLA")


def first_example_tokens(data, *options):
    cfg, task = setup(data, "--no-shuffle", *options)
    task.load_dataset("valid")
    return task, task.dataset("valid")[0]["net_input.src_tokens"]


def test_pair_encoding_follows_the_separator_option(rte_data):
    task, bert_style = first_example_tokens(rte_data)
    dictionary = task.source_dictionary
    bos, eos = dictionary.bos(), dictionary.eos()
    assert bert_style[0] == bos and bert_style[-1] == eos
    assert (bert_style == eos).sum() == 2  # <s> a </s> b </s>
    _, roberta_style = first_example_tokens(rte_data, "--separator-token", str(eos))
    assert len(roberta_style) == len(bert_style) + 1
    first_eos = int((bert_style == eos).nonzero()[0])
    assert roberta_style[first_eos] == roberta_style[first_eos + 1] == eos  # <s> a </s> </s> b </s>


def test_long_examples_are_truncated_not_dropped(rte_data):
    cfg, task = setup(rte_data, "--max-positions", "8")
    task.load_dataset("valid")
    dataset = task.dataset("valid")
    assert len(dataset) == 20
    assert max(len(dataset[i]["net_input.src_tokens"]) for i in range(len(dataset))) == 8


# ------------------------------------------------------------------ criterion metrics, in process


class ScoringModel(torch.nn.Module):
    """A stand-in for a classification model: scores that vary with the tokens."""

    def __init__(self, num_classes):
        super().__init__()
        self.classification_heads = torch.nn.ModuleDict({"sentence_classification_head": torch.nn.Identity()})
        self.num_classes = num_classes

    def forward(self, src_tokens, src_lengths, features_only=True, classification_head_name=None):
        signature = (src_tokens.float() * torch.arange(src_tokens.size(1))).sum(dim=1, keepdim=True)
        return torch.sin(signature * torch.arange(1, self.num_classes + 1)), None

    def get_targets(self, sample, net_output):
        return sample["target"]


def validate_in_process(data, checkpoint=None):
    """Run the task's validation steps as fairseq's trainer does, with 1 worker, on the
    ScoringModel or on a checkpoint's tiny RoBERTa."""
    from fairseq.logging import metrics

    cfg, task = setup(data)
    criterion = task.build_criterion(cfg.criterion)
    if checkpoint is None:
        model = ScoringModel(task.spec.num_classes).eval()
    else:
        from fairseq import checkpoint_utils

        model = task.build_model(cfg.model)
        model.load_state_dict(checkpoint_utils.load_checkpoint_to_cpu(str(checkpoint))["model"])
        model.eval()
    task.load_dataset("valid")
    batches = task.get_batch_iterator(task.dataset("valid"), max_sentences=16).next_epoch_itr(shuffle=False)
    outputs, targets = [], []
    with metrics.aggregate(new_root=True) as validation:
        for sample in batches:
            _, _, logging_output = task.valid_step(sample, model, criterion)
            with metrics.aggregate():
                task.reduce_metrics([logging_output], criterion)
            with torch.no_grad():
                head = "sentence_classification_head"
                outputs.append(model(**sample["net_input"], features_only=True, classification_head_name=head)[0])
            targets.append(sample["target"].view(-1))
    return task, validation.get_smoothed_values(), torch.cat(outputs).numpy(), torch.cat(targets).numpy()


def percent(value):
    return round(100 * value, 2)


def test_classification_metrics_equal_sklearn(cola_data):
    task, logged, scores, targets = validate_in_process(cola_data)
    predictions = scores.argmax(axis=1)
    assert len(set(predictions)) == 2 and len(targets) == 100  # CoLA dev.tsv has no header line
    assert logged["mcc"] == percent(matthews_corrcoef(targets, predictions))
    assert logged["accuracy"] == percent(accuracy_score(targets, predictions))
    assert logged["glue_score"] == logged["mcc"]
    assert "f1" not in logged


def test_regression_metrics_equal_scipy(stsb_data):
    task, logged, scores, targets = validate_in_process(stsb_data)
    assert len(targets) == 100
    assert logged["pearson"] == percent(pearsonr(scores[:, 0].astype(np.float64), targets)[0])
    assert logged["spearman"] == percent(spearmanr(scores[:, 0], targets)[0])
    assert logged["glue_score"] == percent((pearsonr(scores[:, 0].astype(np.float64), targets)[0]
                                            + spearmanr(scores[:, 0], targets)[0]) / 2)


# ------------------------------------------------------------------ fairseq_cli.train end to end


def fairseq_train(data, save_dir, *options, env=None, wait=True):
    command = [sys.executable, "-m", "fairseq_cli.train", str(data), "--user-dir", str(REPO / "fairseq_ext"),
               "--task", "glue", "--criterion", "glue_prediction", *TINY_ROBERTA, "--batch-size", "16",
               "--required-batch-size-multiple", "1", "--optimizer", "adam", "--no-progress-bar",
               "--log-format", "simple", "--log-interval", "1", "--cpu", "--num-workers", "0",
               "--save-dir", str(save_dir), *options]
    environment = dict(os.environ, PYTHONPATH=str(REPO), **(env or {}))
    process = subprocess.Popen(command, cwd=save_dir.parent, env=environment, text=True,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if not wait:
        return process
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 0, output[-3000:]
    return output


def valid_stats(output):
    """The key/value pairs of each 'valid on' log line."""
    stats = []
    for line in output.splitlines():
        if "valid on 'valid' subset" in line:
            fields = line.split(" | ")[3:]
            stats.append(dict(field.split(" ", 1) for field in fields))
    return stats


def test_cola_training_logs_mcc_and_keeps_the_best_checkpoint(cola_data, tmp_path):
    output = fairseq_train(
        cola_data, tmp_path / "checkpoints", "--lr", "1e-3", "--max-update", "6", "--validate-interval-updates", "2",
        "--save-interval-updates", "2", "--no-epoch-checkpoints",
        "--best-checkpoint-metric", "mcc", "--maximize-best-checkpoint-metric",
    )
    stats = valid_stats(output)
    assert len(stats) >= 3 and all({"mcc", "accuracy", "glue_score"} <= set(s) for s in stats), output[-3000:]
    mcc = [float(s["mcc"]) for s in stats]
    assert float(stats[-1]["best_mcc"]) == max(mcc)
    assert (tmp_path / "checkpoints" / "checkpoint_best.pt").is_file()
    train_lines = [line for line in output.splitlines() if "| train_inner |" in line]
    assert train_lines and "mcc=" in train_lines[0]  # summable statistics also give training metrics


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_stsb_validation_is_the_same_with_two_gloo_workers(stsb_data, tmp_path):
    """Two gloo workers validate a model exactly as one worker does.

    lr 0 keeps the random model as initialised; the 1-worker reference validates
    the checkpoint the 2-worker run saved.  100 validation rows in batches of 16
    make 7 batches: the second worker gets a dummy batch (repeated examples) that
    must not count.
    """
    frozen = ["--lr", "0", "--max-update", "2", "--no-epoch-checkpoints", "--best-checkpoint-metric", "spearman",
              "--maximize-best-checkpoint-metric", "--batch-size-valid", "16"]
    distributed = ["--distributed-world-size", "2", "--distributed-init-method", "env://", "--distributed-no-spawn",
                   "--distributed-backend", "gloo", "--ddp-backend", "legacy_ddp"]
    port = str(free_port())
    workers = [
        fairseq_train(stsb_data, tmp_path / "two", *frozen, *distributed, "--distributed-rank", str(rank), wait=False,
                      env={"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "RANK": str(rank)})
        for rank in (0, 1)
    ]
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0, 0], outputs[0][-2000:] + outputs[1][-2000:]
    two_workers = valid_stats(outputs[0])[-1]

    _, one_worker, scores, targets = validate_in_process(stsb_data, tmp_path / "two" / "checkpoint_last.pt")
    assert len(targets) == 100
    for name in ("pearson", "spearman", "glue_score", "loss"):
        assert float(two_workers[name]) == one_worker[name], (name, one_worker, two_workers)
    assert one_worker["spearman"] == percent(spearmanr(scores[:, 0], targets)[0])
