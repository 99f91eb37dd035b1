"""Decoder-only language models end to end: BitFit-adapt a tiny transformer_lm, then evaluate
(fairseq-eval-lm) and sample (fairseq-interactive) from the base plus its delta, with no merged file.

One tiny LM pretrained by train.py on synthetic text, and one BitFit run (every bias) adapting it,
serve every test; evaluation and sampling run in this process.
"""
import random
import shutil

import pytest
import torch

import fairseq_ext  # noqa: F401
import tiny
from fairseq_ext.core.delta_file import DELTA_SUFFIX, read_delta
from fairseq_ext.plugin.deltas import apply_delta
from fairseq_ext.plugin.language_models import LanguageModelPredictor
from fairseq_ext.tools import eval_lm as eval_lm_cli
from fairseq_ext.tools import generate as generate_cli

TINY_LM = ["--task", "language_modeling", "--arch", "transformer_lm", "--decoder-layers", "2",
           "--decoder-embed-dim", "16", "--decoder-input-dim", "16", "--decoder-output-dim", "16",
           "--decoder-ffn-embed-dim", "32", "--decoder-attention-heads", "2", "--share-decoder-input-output-embed",
           "--tokens-per-sample", "16", "--optimizer", "adam", "--batch-size", "8", "--no-epoch-checkpoints",
           *tiny.COMMON]
# fairseq's decoder hands torch a float causal mask with a bool padding mask (evaluating padded batches).
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")
SAMPLING = ["--task", "language_modeling", "--cpu", "--beam", "1", "--sampling", "--sampling-topk", "5",
            "--seed", "3", "--max-len-b", "8"]


def _text(rng: random.Random, shifted: bool) -> str:
    # Two "domains": the same words, the adapted one with a word order the pretrained one lacks.
    words = [f"w{rng.randrange(12)}" for _ in range(rng.randint(3, 8))]
    return " ".join(sorted(words, reverse=shifted))


@pytest.fixture(scope="module")
def lm_data(tmp_path_factory):
    """(pretraining, adaptation) binarized text with one dictionary."""
    root = tmp_path_factory.mktemp("lm_data")
    rng = random.Random(0)
    folders = []
    for name, shifted in (("pretrain", False), ("adapt", True)):
        for split, size in (("train", 200), ("valid", 30)):
            (root / f"{name}.{split}").write_text("\n".join(_text(rng, shifted) for _ in range(size)) + "\n")
        folder = root / f"{name}-bin"
        args = ["--trainpref", root / f"{name}.train", "--validpref", root / f"{name}.valid"]
        tiny._preprocess(args, folder, srcdict=folders[0] / "dict.txt" if folders else None)
        folders.append(folder)
    return folders


@pytest.fixture(scope="module")
def base(lm_data, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("lm_base")
    tiny.run(["train.py", str(lm_data[0]), *TINY_LM, "--lr", "5e-3", "--max-update", "30", "--save-dir", str(save_dir)])
    return save_dir / "checkpoint_last.pt"


@pytest.fixture(scope="module")
def bitfit_run(lm_data, base, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("lm_bitfit")
    result = tiny.run(["train.py", str(lm_data[1]), *TINY_LM, "--lr", "1e-2", "--max-update", "12",
                       "--restore-file", str(base), "--reset-optimizer", "--reset-dataloader", "--reset-meters",
                       "--save-dir", str(save_dir), "--bitfit", "--bitfit-terms", "all"])
    (save_dir / "train.log").write_text(result.stdout)
    return save_dir


@pytest.fixture(scope="module")
def delta(bitfit_run):
    return bitfit_run / f"checkpoint_last{DELTA_SUFFIX}"


def test_the_report_lists_the_decoder_roles_and_the_delta_its_dictionary(bitfit_run, delta, lm_data):
    log = (bitfit_run / "train.log").read_text()
    assert "BitFit selection 'all', no task heads" in log
    for role in ("q", "k", "v", "m1", "ln1", "m2", "m3", "ln2"):
        assert f"  {role:<7}    2 tensors" in log
    loaded = read_delta(delta)
    assert loaded.kind == "language-model" and loaded.task_name == "language_modeling"
    from fairseq.data import Dictionary

    from fairseq_ext.core.delta_file import dictionary_identity
    assert loaded.dictionary == dictionary_identity(Dictionary.load(str(lm_data[1] / "dict.txt")))
    assert "decoder.output_projection.weight" not in loaded.tensors  # tied to the embedding: a frozen weight


def _eval_lm(capsys, *argv):
    status, out, err = tiny.run_main(eval_lm_cli.main, capsys, *argv)
    assert status == 0, err
    return out + err


def test_eval_lm_from_base_plus_delta_is_eval_lm_on_the_runs_checkpoint(caplog, lm_data, base, bitfit_run, delta):
    options = ["--gen-subset", "valid", "--cpu", "--tokens-per-sample", "16", "--context-window", "4", "--output-word-probs",
               "--max-tokens", "256", "--num-workers", "0"]
    results = {}
    for name, path in (("delta", ["--path", base, "--delta", delta]),
                       ("full", ["--path", bitfit_run / "checkpoint_last.pt"])):
        caplog.clear()
        with caplog.at_level("INFO", logger="fairseq_cli.eval_lm"):
            results[name] = eval_lm_cli.main([str(lm_data[1]), *map(str, path), *options])  # loss, perplexity
        # --output-word-probs: one line per sentence, each word with its log probability.
        results[name + " words"] = [record.getMessage() for record in caplog.records
                                    if record.name == "fairseq_cli.eval_lm" and record.getMessage().endswith("]")]
    assert results["delta"] == results["full"] and results["delta"]["perplexity"] > 1
    assert results["delta words"] == results["full words"] and results["delta words"]
    base_only = eval_lm_cli.main([str(lm_data[1]), "--path", str(base), *options])
    assert base_only["perplexity"] > results["delta"]["perplexity"]  # the adaptation helped on its own domain


def _samples(capsys, *argv):
    status, out, err = tiny.run_main(generate_cli.main, capsys, "--interactive", *argv)
    assert status == 0, err
    return [line for line in out.splitlines() if line[:2] in ("S-", "H-", "P-")]


def test_sampling_from_base_plus_delta_draws_what_fairseq_draws_from_the_merged_checkpoint(
        capsys, lm_data, base, delta, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("w1 w2\nw5\n")
    merged = apply_delta(base, delta, tmp_path / "merged.pt")
    from_delta = _samples(capsys, lm_data[1], "--path", base, "--delta", delta, *SAMPLING, "--input", prompts)
    from_merged = _samples(capsys, lm_data[1], "--path", merged, *SAMPLING, "--input", prompts)
    assert from_delta == from_merged
    assert sum(line.startswith("H-") for line in from_delta) == 2


def test_the_python_api_scores_and_samples_each_delta_on_one_base(lm_data, base, delta, bitfit_run):
    lm = LanguageModelPredictor(base, data=lm_data[1])
    lm.add_task("adapted", delta)
    scored = lm.score("adapted", ["w9 w5 w1"])
    from fairseq.models.transformer_lm import TransformerLanguageModel

    full = TransformerLanguageModel.from_pretrained(str(bitfit_run), "checkpoint_last.pt",
                                                    data_name_or_path=str(lm_data[1]))
    assert torch.equal(scored[0]["positional_scores"], full.score("w9 w5 w1")["positional_scores"])
    torch.manual_seed(0)
    text = lm.sample("adapted", ["w3"], sampling=True, sampling_topk=3, max_len_b=5)
    assert text[0].startswith("w3")


def test_bad_input_is_one_line(capsys, lm_data, base, delta, tmp_path):
    def eval_lm(*argv):
        return tiny.run_main(eval_lm_cli.main, capsys, *map(str, argv))

    other_data = tmp_path / "other-bin"
    shutil.copytree(lm_data[1], other_data)
    with open(other_data / "dict.txt", "a") as dictionary:
        dictionary.write("w99 1\n")
    tiny.assert_one_line_error(eval_lm(other_data, "--path", base, "--delta", delta, "--cpu"),
                               "--delta", "is not the dictionary the delta was trained with")
    tiny.assert_one_line_error(eval_lm(lm_data[1], "--path", base, "--delta", delta, "--cpu", "--gen-subset", "test"),
                               "--gen-subset test", "Dataset not found")
    tiny.assert_one_line_error(eval_lm(lm_data[1], "--path", tmp_path / "none.pt", "--delta", delta),
                               "--path", "no such file")
    tiny.assert_one_line_error(eval_lm(lm_data[1], "--path", base, "--delta", tmp_path / "none.delta.safetensors"),
                               "no such delta file")
    other_base = tmp_path / "other.pt"
    checkpoint = torch.load(base, map_location="cpu")
    checkpoint["model"]["decoder.layers.0.fc1.weight"] += 1
    torch.save(checkpoint, other_base)
    tiny.assert_one_line_error(eval_lm(lm_data[1], "--path", other_base, "--delta", delta, "--cpu"),
                               f"--path {other_base} is not the base")
    status, _, err = tiny.run_main(generate_cli.main, capsys, "--interactive", str(lm_data[1]), "--task",
                                   "translation", "--source-lang", "a", "--target-lang", "b", "--path", str(base),
                                   "--delta", str(delta))
    assert status == 2 and len(err.strip().splitlines()) == 1, err


def test_the_classification_predictor_refuses_a_language_model_delta(base, delta):
    """predict and the server take classification deltas only: a language model's is one line that says
    where it can be used."""
    from fairseq_ext.core.errors import UserError
    from fairseq_ext.plugin.predictor_options import check_task_delta

    with pytest.raises(UserError, match="it models text, it has no labels to predict; sample with python -m "
                                        "fairseq_ext.tools.generate, score with python -m fairseq_ext.tools.eval_lm"):
        check_task_delta("lm", read_delta(delta))
