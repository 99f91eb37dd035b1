"""--bitfit on every fairseq task family this package covers: a matrix of task and arch pairs.

Each pair gets a tiny model of its own (random init, saved as the base a run restores, as a
pretrained model would be), and for ``all`` and ``ofa`` one train.py run of 4 updates that saves
at update 2 and 4.  The run's update-2 checkpoint, put in a fresh --save-dir as checkpoint_last.pt,
resumes in a new process to update 4: the same tensors as the straight run.  Then: frozen tensors
bit-identical to the base, every selected bias changed, a delta beside every checkpoint, and
``delta apply`` of base + delta equal, tensor for tensor, to the run's checkpoint.
"""
import argparse
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Tuple

import pytest
import torch
from omegaconf import OmegaConf

import fairseq_ext  # noqa: F401  (registers the plugin: bert, glue, safe checkpoint loading)
import tiny
from fairseq_ext.core import bitfit
from fairseq_ext.core.delta_file import DELTA_SUFFIX, read_delta
from fairseq_ext.core.errors import UserError
from fairseq_ext.core.run_record import read_run_record
from fairseq_ext.plugin import task_families
from fairseq_ext.plugin.deltas import apply_delta

TINY_LM = ["--arch", "transformer_lm", "--decoder-layers", "2", "--decoder-embed-dim", "16",
           "--decoder-input-dim", "16", "--decoder-output-dim", "16", "--decoder-ffn-embed-dim", "32",
           "--decoder-attention-heads", "2", "--share-decoder-input-output-embed"]
TINY_BART = ["--arch", "bart_base", "--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "16",
             "--decoder-embed-dim", "16", "--encoder-ffn-embed-dim", "32", "--decoder-ffn-embed-dim", "32",
             "--encoder-attention-heads", "2", "--decoder-attention-heads", "2", "--max-source-positions", "64",
             "--max-target-positions", "64"]
SENTENCE_PREDICTION = ["--task", "sentence_prediction", "--criterion", "sentence_prediction", "--num-classes", "2",
                       "--init-token", "0", "--separator-token", "2"]


@dataclass(frozen=True)
class Pair:
    """One fairseq task with one arch: where its data is, and train.py's options for it."""

    data: str  # "text" (one binarized corpus), "classification" (input0/, label/), "translation"
    args: Tuple[str, ...]
    heads: bool = False  # the task adds a classification head the base lacks
    # Whether a resumed run can equal an uninterrupted one.  fairseq's DenoisingDataset seeds numpy per
    # example but draws its spans, masks and permutations from torch's global RNG, whose state at a
    # given update depends on the process's history: a resumed denoising run, with or without --bitfit,
    # noises its batches differently (fairseq-train's own behaviour).
    resumes_exactly: bool = True


PAIRS = {
    "language_modeling-transformer_lm": Pair("text", (
        "--task", "language_modeling", *TINY_LM, "--tokens-per-sample", "16", "--criterion", "cross_entropy")),
    "masked_lm-roberta": Pair("text", (
        "--task", "masked_lm", "--criterion", "masked_lm", *tiny.TINY_ROBERTA, "--tokens-per-sample", "32")),
    "translation-transformer": Pair("translation", (*tiny.TRANSLATION[:-2], *tiny.TINY_TRANSFORMER)),
    "sentence_prediction-roberta": Pair("classification", (*SENTENCE_PREDICTION, *tiny.TINY_ROBERTA), heads=True),
    "sentence_prediction-bert": Pair("classification", (
        *SENTENCE_PREDICTION, "--arch", "bert_tiny", "--max-positions", "64"), heads=True),
    "denoising-bart": Pair("text", (
        "--task", "denoising", *TINY_BART, "--mask", "0.3", "--mask-length", "span-poisson", "--replace-length", "1",
        "--poisson-lambda", "3", "--tokens-per-sample", "32", "--criterion", "cross_entropy"), resumes_exactly=False),
}
SELECTIONS = ("all", "ofa")
TRAINING = ["--optimizer", "adam", "--lr", "1e-2", "--batch-size", "8", "--required-batch-size-multiple", "1", "--max-update", "4",
            "--save-interval-updates", "2", "--no-epoch-checkpoints", *tiny.COMMON]


def load(path):
    return torch.load(path, map_location="cpu")


@pytest.fixture(scope="module")
def datasets(tmp_path_factory):
    classification = tiny.make_classification_data(tmp_path_factory.mktemp("classification"), n_train=120,
                                                   n_valid=16)
    translation = tiny.make_translation_data(tmp_path_factory.mktemp("translation"))[1]
    return {"text": classification / "mlm", "classification": classification, "translation": translation}


def build_base(pair: Pair, data: Path, path: Path) -> Path:
    """The pair's model with fairseq's random init, saved as a model file (what --restore-file reads):
    the 'pretrained' base of the matrix, made in this process instead of by a training run."""
    from fairseq import options, tasks
    from fairseq.dataclass.utils import convert_namespace_to_omegaconf

    from fairseq_ext.plugin.checkpoints import model_only_checkpoint

    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(data), *pair.args, *TRAINING])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = task.build_model(cfg.model)
    # A pretrained encoder has no classification head: the fine-tuning run adds its own.
    state = {name: tensor for name, tensor in model.state_dict().items()
             if not name.startswith(bitfit.CLASSIFICATION_HEADS)}
    # Plain containers, and a legacy model's Namespace: what torch's safe loader accepts.
    plain = {group: cfg[group] if isinstance(cfg[group], argparse.Namespace)
             else OmegaConf.to_container(cfg[group], resolve=True, enum_to_str=True)
             for group in ("common", "task", "model", "criterion")}
    torch.save(model_only_checkpoint(plain, state), path)
    return path


@pytest.fixture(scope="module")
def bases(datasets, tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return {name: build_base(pair, datasets[pair.data], root / f"{name}.pt") for name, pair in PAIRS.items()}


def command(pair: Pair, data: Path, base: Path, save_dir: Path, terms: str):
    return ["train.py", str(data), *pair.args, *TRAINING, "--restore-file", str(base), "--reset-optimizer",
            "--reset-dataloader", "--reset-meters", "--save-dir", str(save_dir), "--bitfit", "--bitfit-terms", terms]


@pytest.mark.parametrize("terms", SELECTIONS)
@pytest.mark.parametrize("pair_name", list(PAIRS))
def test_trains_saves_resumes_and_exports_a_delta(pair_name, terms, datasets, bases, tmp_path):
    pair, base_path = PAIRS[pair_name], bases[pair_name]
    data = datasets[pair.data]
    straight = tmp_path / "straight"
    tiny.run(command(pair, data, base_path, straight, terms))

    # Saved: a delta beside every checkpoint.
    checkpoints = sorted(path.name for path in straight.glob("*.pt"))
    assert {"checkpoint_1_2.pt", "checkpoint_last.pt", "checkpoint_best.pt"} <= set(checkpoints)
    for name in checkpoints:
        assert (straight / name.replace(".pt", DELTA_SUFFIX)).is_file(), name

    # Trained: exactly the selection, every selected tensor changed, every other one bit-identical.
    base = load(base_path)["model"]
    final = load(straight / "checkpoint_last.pt")
    check_selection_trained(pair, terms, base, final, straight)
    straight_delta = read_delta(straight / f"checkpoint_last{DELTA_SUFFIX}")
    if terms == SELECTIONS[0]:  # resuming does not depend on the selection: once per family
        # Resumed in a new process from the update-2 save: the straight run's tensors and deltas.
        resumed = tmp_path / "resumed"
        resumed.mkdir()
        shutil.copyfile(straight / "checkpoint_1_2.pt", resumed / "checkpoint_last.pt")
        second = tiny.run(command(pair, data, base_path, resumed, terms))
        assert "resuming the interrupted run" in second.stdout
        again = load(resumed / "checkpoint_last.pt")
        assert again["optimizer_history"][-1]["num_updates"] == 4
        resumed_delta = read_delta(resumed / f"checkpoint_last{DELTA_SUFFIX}")
        assert straight_delta.tensors.keys() == resumed_delta.tensors.keys()
        if pair.resumes_exactly:
            assert all(torch.equal(again["model"][name], tensor) for name, tensor in final["model"].items())
            assert all(torch.equal(resumed_delta.tensors[name], t) for name, t in straight_delta.tensors.items())
        else:
            check_selection_trained(pair, terms, base, again, resumed)

    # The delta records the task family and the dictionary; apply rebuilds the checkpoint exactly.
    assert straight_delta.kind == task_families.task_kind_of_name(pair.args[pair.args.index("--task") + 1])
    assert straight_delta.dictionary["size"] > 4 and straight_delta.dictionary["sha256"]
    merged = load(apply_delta(base_path, straight / f"checkpoint_last{DELTA_SUFFIX}", tmp_path / "merged.pt"))
    assert merged["model"].keys() == final["model"].keys()
    assert all(torch.equal(merged["model"][name], tensor) for name, tensor in final["model"].items())


def check_selection_trained(pair: Pair, terms: str, base: dict, checkpoint: dict, save_dir: Path) -> None:
    """The run trained exactly its selection (the heads too): every selected tensor changed, every
    other tensor bit-identical to the base."""
    trained = set(checkpoint["optimizer_history"][-1]["bitfit"]["trainable"])
    unused = set(read_run_record(save_dir / "run_record.json")["bitfit"]["unused"])
    rule = bitfit.NAMED_SELECTIONS[terms]
    heads = {name for name in checkpoint["model"] if name.startswith(bitfit.CLASSIFICATION_HEADS)}
    assert bool(heads) == pair.heads
    assert trained == {name for name in base if rule(name) and name not in unused} | heads
    assert trained - heads, "no bias trained"
    for name, tensor in base.items():
        if name in trained:
            assert not torch.equal(tensor, checkpoint["model"][name]), f"{name} was selected but did not change"
        else:
            assert torch.equal(tensor, checkpoint["model"][name]), f"{name} is frozen but changed"
    assert checkpoint["model"].keys() == base.keys() | heads


def test_a_tied_language_model_output_projection_stays_frozen(bases):
    """transformer_lm with --share-decoder-input-output-embed: the output projection is the embedding,
    a weight; `all` trains every bias and leaves it (and so the embedding) as the base holds it."""
    base = load(bases["language_modeling-transformer_lm"])["model"]
    assert "decoder.output_projection.weight" in base
    assert torch.equal(base["decoder.output_projection.weight"], base["decoder.embed_tokens.weight"])
    assert not bitfit.NAMED_SELECTIONS["all"]("decoder.output_projection.weight")


def test_language_model_roles_are_the_papers(bases):
    """Every bias of a decoder-only transformer_lm layer maps to its paper symbol, none to 'other'."""
    names = [name for name in load(bases["language_modeling-transformer_lm"])["model"] if bitfit.is_bias(name)]
    roles = {}
    for name in names:
        roles.setdefault(bitfit.role_of(name), []).append(name)
    assert {role: len(group) for role, group in roles.items()} == {
        "q": 2, "k": 2, "v": 2, "m1": 2, "ln1": 2, "m2": 2, "m3": 2, "ln2": 2}


def test_a_task_outside_the_families_is_refused_in_one_line():
    from fairseq.tasks.sentence_ranking import SentenceRankingTask

    task = SentenceRankingTask.__new__(SentenceRankingTask)  # no data needed: the family decides
    with pytest.raises(UserError, match=r"^--task sentence_ranking: BitFit runs cover the task families "
                                        r"translation, language_modeling, masked_lm, denoising, sentence_prediction"):
        task_families.check_trainable(task, None, "sentence_ranking", "roberta")


def test_an_encoder_decoder_arch_on_language_modeling_is_refused_in_one_line(bases):
    from fairseq.models.transformer import TransformerModel
    from fairseq.tasks.language_modeling import LanguageModelingTask

    task = LanguageModelingTask.__new__(LanguageModelingTask)
    task.dictionary = task.output_dictionary = object()
    model = TransformerModel.__new__(TransformerModel)
    with pytest.raises(UserError, match=r"^--arch transformer: --task language_modeling trains decoder-only "):
        task_families.check_trainable(task, model, "language_modeling", "transformer")


def test_train_py_refuses_a_pair_it_cannot_rebuild_before_training(datasets, tmp_path):
    """The refusal as a user meets it (an encoder-decoder arch on language_modeling): train.py in its own
    process, one line, exit status 2, and no checkpoint or delta written (never a traceback at the first
    save)."""
    save_dir = tmp_path / "run"
    result = tiny.run(["train.py", str(datasets["text"]), "--task", "language_modeling", *tiny.TINY_TRANSFORMER,
                       "--tokens-per-sample", "16", *TRAINING, "--save-dir",
                       str(save_dir), "--bitfit"], check=False)
    assert result.returncode == 2, result.stderr[-3000:]
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "--arch transformer: --task language_modeling trains decoder-only" in lines[0], lines
    assert "Traceback" not in result.stdout + result.stderr
    assert not list(save_dir.glob("*.pt")) and not list(save_dir.glob(f"*{DELTA_SUFFIX}"))
