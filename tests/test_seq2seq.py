"""BitFit on sequence-to-sequence models: train.py --task translation, deltas, generation, bad input.

One tiny transformer pretrained on synthetic monotone translation, and one BitFit run (every bias)
fine-tuning it on reversed translation, serve most tests; each other run is as short as its
property allows.
"""
import shutil

import pytest
import torch

import fairseq_ext  # noqa: F401  (allow-lists fairseq checkpoint types for torch.load)
import tiny
from fairseq_ext import bitfit
from fairseq_ext.core import delta_file as deltas
from fairseq_ext.core.errors import UserError
from fairseq_ext.core.run_record import read_run_record
from fairseq_ext.tools import delta as delta_cli
from fairseq_ext.tools import generate as generate_cli

UPDATES = 12  # 160 pairs, batch 16: epoch 1 ends at update 10
GENERATION = ["--beam", "3", "--lenpen", "0.7", "--max-len-b", "12", "--batch-size", "8", "--num-workers", "0"]
assert_one_line_error = tiny.assert_one_line_error


def load(path):
    return torch.load(path, map_location="cpu")


def trained_names(checkpoint):
    return load(checkpoint)["optimizer_history"][-1]["bitfit"]["trainable"]


def bitfit_recipe(data, pretrained, save_dir, *extra):
    return tiny.translation_recipe(data, pretrained, save_dir, updates=UPDATES,
                                   extra=["--bitfit", "--save-interval-updates", "5", *extra])


@pytest.fixture(scope="module")
def translation_data(tmp_path_factory):
    return tiny.make_translation_data(tmp_path_factory.mktemp("translation_data"))


@pytest.fixture(scope="module")
def finetune_data(translation_data):
    return translation_data[1]


@pytest.fixture(scope="module")
def pretrained(translation_data, tmp_path_factory):
    return tiny.pretrain_translation(translation_data[0], tmp_path_factory.mktemp("pretrained_transformer"))


@pytest.fixture(scope="module")
def bitfit_run(finetune_data, pretrained, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("bitfit_all")
    result = tiny.run(bitfit_recipe(finetune_data, pretrained, save_dir, "--bitfit-terms", "all"))
    (save_dir / "train.log").write_text(result.stdout)
    return save_dir


@pytest.fixture(scope="module")
def none_run(finetune_data, pretrained, tmp_path_factory):
    save_dir = tmp_path_factory.mktemp("bitfit_none")
    tiny.run(tiny.translation_recipe(finetune_data, pretrained, save_dir, updates=3,
                                     extra=["--bitfit", "--bitfit-terms", "none"]))
    return save_dir


@pytest.fixture(scope="module")
def best_delta(bitfit_run):
    return bitfit_run / f"checkpoint_best{deltas.DELTA_SUFFIX}"


def generated(capsys, *argv):
    """What python -m fairseq_ext.tools.generate prints for each sentence (S, T, H, D, P lines), by id."""
    status, out, err = tiny.run_main(generate_cli.main, capsys, *argv)
    assert status == 0, err
    lines = sorted(line for line in out.splitlines() if line[:2] in ("S-", "T-", "H-", "D-", "P-"))
    assert sum(line.startswith("H-") for line in lines) == 24
    return lines


# ------------------------------------------------------------------ training


def test_bitfit_trains_every_selected_bias_of_encoder_decoder_and_cross_attention(bitfit_run, pretrained):
    before = load(pretrained)["model"]
    after = load(bitfit_run / "checkpoint_last.pt")["model"]
    trained = set(trained_names(bitfit_run / "checkpoint_last.pt"))
    assert trained == {name for name in before if name.endswith(".bias")}
    for name in ("encoder.layers.0.self_attn.q_proj.bias", "decoder.layers.1.self_attn.v_proj.bias",
                 "decoder.layers.1.encoder_attn.q_proj.bias", "decoder.layers.0.encoder_attn.out_proj.bias",
                 "decoder.layers.0.encoder_attn_layer_norm.bias", "decoder.layers.1.fc2.bias"):
        assert name in trained
    for name, tensor in before.items():
        if name in trained:
            assert not torch.equal(tensor, after[name]), f"{name} was selected but did not change"
        else:  # every weight, the embeddings and the tied output projection included
            assert torch.equal(tensor, after[name]), f"{name} is frozen but changed"
    assert "decoder.output_projection.weight" in before and "decoder.output_projection.weight" not in trained

    record = read_run_record(bitfit_run / "run_record.json")
    groups = {role: group["tensors"] for role, group in record["bitfit"]["groups"].items()}
    # q, k, v, m1, ln1: encoder self-attention, decoder self-attention and cross-attention, 2 layers each
    assert groups == {"q": 6, "k": 6, "v": 6, "m1": 6, "ln1": 6, "m2": 4, "m3": 4, "ln2": 4}
    assert record["bitfit"]["unused"] == []
    assert "BitFit selection 'all', no task heads" in (bitfit_run / "train.log").read_text()


def _tiny_transformer():
    from fairseq.data import Dictionary

    from fairseq_ext.plugin.models.build import architecture_config, build_fairseq_model

    dictionary = Dictionary()
    for index in range(12):
        dictionary.add_symbol(f"w{index}")
    sizes = {f"{side}_{option}": value for side in ("encoder", "decoder") for option, value in (
        ("layers", 2), ("embed_dim", 16), ("ffn_embed_dim", 32), ("attention_heads", 2))}
    model_cfg = architecture_config("transformer", arch="transformer", share_decoder_input_output_embed=True, **sizes)
    return build_fairseq_model(model_cfg, dictionary, dictionary)


def test_each_symbol_selects_its_encoder_decoder_and_cross_attention_biases():
    """The table of docs/seq2seq.md, on fairseq's transformer parameter names."""
    model = _tiny_transformer()
    expected = {
        "q": ["self_attn.q_proj", "encoder_attn.q_proj"], "k": ["self_attn.k_proj", "encoder_attn.k_proj"],
        "v": ["self_attn.v_proj", "encoder_attn.v_proj"], "m1": ["self_attn.out_proj", "encoder_attn.out_proj"],
        "ln1": ["self_attn_layer_norm", "encoder_attn_layer_norm"], "m2": ["fc1"], "m3": ["fc2"],
        "ln2": ["final_layer_norm"],
    }
    for symbol, modules in expected.items():
        names = set(bitfit.select(model, symbol).names)
        wanted = {f"{side}.layers.{layer}.{module}.bias" for side in ("encoder", "decoder") for layer in (0, 1)
                  for module in modules if side == "decoder" or not module.startswith("encoder_attn")}
        assert names == wanted, symbol
    assert bitfit.select(model, "emb_ln").names == []  # transformer has no embedding LayerNorm (bart has)
    every_bias = {name for name, _ in model.named_parameters() if name.endswith("bias")}
    assert set(bitfit.select(model, "all").names) == every_bias
    assert set(bitfit.select(model, "ofa").names) == {name for name in every_bias if "layer_norm" in name or ".fc" in name}
    assert set(bitfit.select(model, "none").names) == set()
    assert set(bitfit.select(model, r"re:encoder_attn\..*bias$").names) == {
        name for name in every_bias if ".encoder_attn." in name}
    assert not bitfit.has_heads(model)


def test_none_trains_nothing_the_frozen_baseline(none_run, pretrained):
    before = load(pretrained)["model"]
    after = load(none_run / "checkpoint_last.pt")
    assert after["optimizer_history"][-1]["bitfit"]["trainable"] == []
    assert all(torch.equal(tensor, after["model"][name]) for name, tensor in before.items())
    record = read_run_record(none_run / "run_record.json")
    assert record["parameters"]["trainable"] == 0 and record["status"] == "finished"
    delta = deltas.read_delta(none_run / f"checkpoint_best{deltas.DELTA_SUFFIX}")
    assert delta.tensors == {} and delta.is_seq2seq


def test_bart_trains_its_biases_and_embedding_layernorms(finetune_data, tmp_path):
    """bart_base (shrunk) from random init on the translation task: only the biases move."""
    from fairseq_ext.experiments.seq2seq_bleu import preprocess

    raw, joined = finetune_data.parent / "raw" / "finetune", tmp_path / "joined-bin"
    # bart shares all embeddings: one dictionary for both languages
    preprocess(["--source-lang", "src", "--target-lang", "tgt", "--joined-dictionary", "--trainpref", f"{raw}.train",
                "--validpref", f"{raw}.valid", "--destdir", str(joined)])
    shrink = [flag for layer in ("encoder", "decoder") for flag in (
        f"--{layer}-layers", "1", f"--{layer}-embed-dim", "16", f"--{layer}-ffn-embed-dim", "32",
        f"--{layer}-attention-heads", "2")]
    tiny.run(["train.py", str(joined), *tiny.TRANSLATION, "--arch", "bart_base", *shrink, "--lr", "1e-2",
              "--max-update", "4", "--save-interval-updates", "2", "--save-dir", str(tmp_path / "run"), "--bitfit",
              "--bitfit-terms", "all", *tiny.COMMON])
    run_dir = tmp_path / "run"
    first, last = load(run_dir / "checkpoint_1_2.pt")["model"], load(run_dir / "checkpoint_last.pt")["model"]
    trained = set(trained_names(run_dir / "checkpoint_last.pt"))
    assert trained == {name for name in last if name.endswith(".bias")}
    assert {"encoder.layernorm_embedding.bias", "decoder.layernorm_embedding.bias",
            "decoder.layers.0.encoder_attn.k_proj.bias"} <= trained
    for name, tensor in first.items():
        assert torch.equal(tensor, last[name]) != (name in trained), name
    delta = deltas.read_delta(run_dir / f"checkpoint_last{deltas.DELTA_SUFFIX}")
    assert delta.is_seq2seq and delta.arch == "bart_base" and delta.target_dictionary["size"] > 4


def test_interrupted_delta_only_run_resumes_to_the_same_result(bitfit_run, finetune_data, pretrained, tmp_path):
    """Stopped after 6 updates and relaunched (--bitfit-delta-only), a run ends as the straight one;
    relaunching it with another selection is refused."""
    save_dir = tmp_path / "resumed"
    tiny.run(bitfit_recipe(finetune_data, pretrained, save_dir, "--bitfit-terms", "all", "--bitfit-delta-only",
                           "--max-update", "6"))
    second = tiny.run(bitfit_recipe(finetune_data, pretrained, save_dir, "--bitfit-terms", "all",
                                    "--bitfit-delta-only"))
    assert "resuming the interrupted run" in second.stdout
    straight = load(bitfit_run / "checkpoint_last.pt")["model"]
    resumed = load(save_dir / "checkpoint_last.pt")["model"]
    assert all(torch.equal(resumed[name], tensor) for name, tensor in straight.items())
    assert sorted(path.name for path in save_dir.glob("*.pt")) == ["checkpoint_last.pt"]
    expected = sorted(path.name for path in bitfit_run.glob("*" + deltas.DELTA_SUFFIX))
    assert sorted(path.name for path in save_dir.glob("*" + deltas.DELTA_SUFFIX)) == expected
    for name in expected:
        a, b = deltas.read_delta(save_dir / name), deltas.read_delta(bitfit_run / name)
        assert a.tensors.keys() == b.tensors.keys() and all(torch.equal(a.tensors[n], t) for n, t in b.tensors.items())

    refused = tiny.run(bitfit_recipe(finetune_data, pretrained, save_dir, "--bitfit-terms", "q",
                                     "--max-update", "14"), check=False)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1 and "--bitfit-terms 'q'" in lines[0], refused.stderr


def test_the_benchmark_times_a_translation_workload():
    """run_scripts/benchmark.sh rows of an encoder-decoder arch: train.py on synthetic translation."""
    from fairseq_ext.experiments.benchmark import measure_in_process

    full, none = measure_in_process([("transformer_tiny", "full"), ("transformer_tiny", "bitfit-none")], "cpu",
                                    4, 16, 2, 1, "fp32")
    assert full["trainable"] == full["total"] == none["total"] > 2_000_000  # WMT'16 en-de's 32,768 symbols
    assert none["trainable"] == 0 and 0 < none["step_ms_median"] <= none["update_ms_median"]


# ------------------------------------------------------------------ deltas


def test_delta_records_the_task_languages_and_both_dictionaries(best_delta, finetune_data, capsys):
    from fairseq.data import Dictionary

    delta = deltas.read_delta(best_delta)
    assert delta.is_seq2seq and delta.task_name == "translation" and (delta.source_lang, delta.target_lang) == ("src", "tgt")
    for side, identity in (("src", delta.source_dictionary), ("tgt", delta.target_dictionary)):
        assert identity == deltas.dictionary_identity(Dictionary.load(str(finetune_data / f"dict.{side}.txt")))
    assert delta.source_dictionary["sha256"] != delta.target_dictionary["sha256"]
    assert delta.arch == "transformer" and delta.model["args"]["decoder_layers"] == 2 and delta.head_names() == []
    status, out, _ = tiny.run_main(delta_cli.main, capsys, "info", best_delta)
    assert status == 0
    assert "task: translation, src -> tgt" in out and "no task heads" in out and "decoder_layers 2" in out
    assert f"source {delta.source_dictionary['size']} symbols" in out and "target " in out


def test_apply_is_exact_and_fairseq_generate_reads_the_merged_checkpoint(bitfit_run, best_delta, pretrained,
                                                                         finetune_data, tmp_path, capsys):
    merged = tmp_path / "merged.pt"
    status, _, err = tiny.run_main(delta_cli.main, capsys, "apply", "--base", pretrained, "--delta", best_delta,
                                   "--out", merged)
    assert status == 0, err
    full, rebuilt = load(bitfit_run / "checkpoint_best.pt")["model"], load(merged)["model"]
    assert list(rebuilt) == list(full)
    assert all(torch.equal(rebuilt[name], tensor) and rebuilt[name].dtype == tensor.dtype
               for name, tensor in full.items())
    # Stock fairseq-generate, with the plugin for torch's safe loading; the same as base + delta.
    result = tiny.run(["-m", "fairseq_cli.generate", str(finetune_data), "--path", str(merged),
                       "--user-dir", str(tiny.REPO / "fairseq_ext"), *GENERATION])
    theirs = sorted(line for line in result.stdout.splitlines() if line[:2] in ("S-", "T-", "H-", "D-", "P-"))
    assert theirs == generated(capsys, finetune_data, "--path", pretrained, "--delta", best_delta, *GENERATION)


# ------------------------------------------------------------------ generation


def test_generation_from_base_plus_delta_equals_the_full_checkpoint(bitfit_run, best_delta, pretrained,
                                                                    finetune_data, capsys):
    ours = generated(capsys, finetune_data, "--path", pretrained, "--delta", best_delta, *GENERATION)
    assert ours == generated(capsys, finetune_data, "--path", bitfit_run / "checkpoint_best.pt", *GENERATION)
    assert ours != generated(capsys, finetune_data, "--path", pretrained, *GENERATION)
    # fairseq-interactive on raw text, the same way
    interactive = ["--interactive", finetune_data, "--input", finetune_data.parent / "raw" / "finetune.test.src",
                   "--buffer-size", "8", *GENERATION]
    assert generated(capsys, *interactive, "--path", pretrained, "--delta", best_delta) == generated(
        capsys, *interactive, "--path", bitfit_run / "checkpoint_best.pt")


def test_many_deltas_on_one_base_translate_as_their_full_checkpoints(bitfit_run, none_run, best_delta, pretrained,
                                                                     finetune_data, tmp_path):
    from fairseq.models.transformer import TransformerModel

    from fairseq_ext.plugin.seq2seq import Seq2SeqPredictor

    sources = (finetune_data.parent / "raw" / "finetune.test.src").read_text().splitlines()
    options = {"beam": 3, "lenpen": 0.7, "max_len_b": 12}
    predictor = Seq2SeqPredictor(pretrained, data=finetune_data)
    predictor.add_task("all", best_delta)
    predictor.add_task("none", none_run / f"checkpoint_best{deltas.DELTA_SUFFIX}")
    outputs = [predictor.translate(name, sources, **options) for name in ("all", "none", "all")]  # switching back
    for name, output, folder in zip(("all", "none", "all"), outputs, (bitfit_run, none_run, bitfit_run)):
        hub = TransformerModel.from_pretrained(str(folder), checkpoint_file="checkpoint_best.pt",
                                               data_name_or_path=str(finetune_data))
        assert output == hub.translate(sources, **options), name
    assert outputs[0] != outputs[1]
    # A model folder (model.pt with dict.{lang}.txt beside it, as fairseq releases translation models) is a base too.
    shutil.copytree(finetune_data, tmp_path / "folder")
    shutil.copyfile(pretrained, tmp_path / "folder" / "model.pt")
    from_folder = Seq2SeqPredictor(tmp_path / "folder")
    from_folder.add_task("all", best_delta)
    assert from_folder.translate("all", sources, **options) == outputs[0]
    nbest = predictor.generate("all", sources[:2], beam=3, nbest=2, max_len_b=12)
    assert [len(hypotheses) for hypotheses in nbest] == [2, 2]
    with pytest.raises(UserError, match="unknown generation option 'lenpn'"):
        predictor.translate("all", sources, lenpn=0.7)


# ------------------------------------------------------------------ bad input


@pytest.fixture(scope="module")
def classification_delta(tiny_data, tiny_pretrained, tmp_path_factory):
    """A BitFit delta of the tiny RoBERTa sentence classifier (2 updates)."""
    save_dir = tmp_path_factory.mktemp("classification")
    tiny.run(tiny.glue_recipe(tiny_data, tiny_pretrained, save_dir, updates=2, extra=["--bitfit"]))
    return save_dir / f"checkpoint_last{deltas.DELTA_SUFFIX}"


def test_classification_and_seq2seq_deltas_stay_on_their_own_bases(classification_delta, best_delta, pretrained,
                                                                   tiny_pretrained, tiny_data, finetune_data, tmp_path,
                                                                   capsys):
    out = tmp_path / "merged.pt"
    assert_one_line_error(tiny.run_main(delta_cli.main, capsys, "apply", "--base", pretrained, "--delta",
                                        classification_delta, "--out", out),
                          f"--base {pretrained}: a transformer model", "classification delta")
    assert_one_line_error(tiny.run_main(delta_cli.main, capsys, "apply", "--base", tiny_pretrained, "--delta",
                                        best_delta, "--out", out),
                          f"--base {tiny_pretrained}: a roberta model", "a seq2seq delta (task translation, src-tgt")
    assert_one_line_error(tiny.run_main(generate_cli.main, capsys, finetune_data, "--path", pretrained, "--delta",
                                        classification_delta),
                          f"--delta {classification_delta}", "classification delta", "predicts labels")
    assert not out.exists()

    from fairseq_ext.plugin.predictor import MultiTaskPredictor

    predictor = MultiTaskPredictor(tiny_pretrained, dictionary=tiny_data / "input0" / "dict.txt")
    with pytest.raises(UserError, match="generates sequences"):
        predictor.add_task("translate", best_delta)


def test_another_base_or_dictionary_is_refused_in_one_line(best_delta, pretrained, finetune_data, tmp_path, capsys):
    other = load(pretrained)
    other["model"]["encoder.layers.0.fc1.weight"] += 1e-3  # a frozen weight
    other_base = tmp_path / "other.pt"
    torch.save(other, other_base)
    assert_one_line_error(tiny.run_main(generate_cli.main, capsys, finetune_data, "--path", other_base,
                                        "--delta", best_delta), f"--path {other_base} is not the base")
    assert_one_line_error(tiny.run_main(delta_cli.main, capsys, "apply", "--base", other_base, "--delta", best_delta,
                                        "--out", tmp_path / "merged.pt"), "is not the base", "--force")

    for side in ("src", "tgt"):
        data = tmp_path / f"data_{side}"
        shutil.copytree(finetune_data, data)
        lines = (data / f"dict.{side}.txt").read_text().splitlines()
        lines[0], lines[1] = lines[1], lines[0]  # same size, two symbols swapped
        (data / f"dict.{side}.txt").write_text("\n".join(lines) + "\n")
        what = "source" if side == "src" else "target"
        assert_one_line_error(tiny.run_main(generate_cli.main, capsys, data, "--path", pretrained, "--delta",
                                            best_delta),
                              f"the {what} dictionary {data / f'dict.{side}.txt'}", "is not the dictionary")
        # A base folder holding the dictionaries (as fairseq's released models do) is checked on apply.
        shutil.copyfile(pretrained, data / "model.pt")
        assert_one_line_error(tiny.run_main(delta_cli.main, capsys, "apply", "--base", data / "model.pt",
                                            "--delta", best_delta, "--out", tmp_path / "merged.pt"),
                              f"the {what} dictionary")
    assert_one_line_error(tiny.run_main(generate_cli.main, capsys, finetune_data, "--path", pretrained, "--delta",
                                        best_delta, "--source-lang", "tgt", "--target-lang", "src"),
                          "reads tgt-src, but the delta was trained src-tgt")
    assert_one_line_error(tiny.run_main(generate_cli.main, capsys, finetune_data, "--delta", best_delta),
                          "--path: required")
    assert_one_line_error(tiny.run_main(generate_cli.main, capsys, finetune_data, "--path", tmp_path / "nope.pt"),
                          f"--path {tmp_path / 'nope.pt'}: no such file")
    assert not (tmp_path / "merged.pt").exists()
