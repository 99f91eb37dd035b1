"""convert_hf and model_dir on tiny random Hugging Face models built here.

A tiny BERT with its pretraining heads, a tiny RoBERTa with a byte-level BPE,
and a fairseq-format RoBERTa folder; plus every bad input the converter and the
model-folder reader must refuse with one line and exit status 2.
"""
import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import fairseq_ext  # noqa: F401,E402
from fairseq import checkpoint_utils, models, options, tasks  # noqa: E402
from fairseq.data import Dictionary  # noqa: E402
from fairseq.data.data_utils import collate_tokens  # noqa: E402
from fairseq.data.encoders.gpt2_bpe_utils import bytes_to_unicode  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402

from fairseq_ext.plugin.models import hf_import  # noqa: E402
from fairseq_ext.tools import convert_hf as convert_cli  # noqa: E402
from fairseq_ext.core.errors import UserError  # noqa: E402
from fairseq_ext.plugin.models.model_dir import build_bpe, load_model_dir  # noqa: E402

transformers = pytest.importorskip("transformers")

REPO = Path(__file__).resolve().parents[1]
SENTENCES = ["the movie is good.", "it's a bad film, and the acting is worse!", "she sees 3 dogs", "a"]
PAIRS = [("the movie is good.", "it is not."), ("where is it?", "in the 2nd room")]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)

BERT_VOCAB = (["[PAD]", "[unused0]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "movie", "is", "good", "film"]
              + list("abcdefghijklmnopqrstuvwxyz0123456789.,'!?")
              + ["##" + c for c in "abcdefghijklmnopqrstuvwxyz0123456789"]
              + ["##ing", "##ed"])
BERT_FAIRSEQ_SPECIALS = {"<s>": "[CLS]", "<pad>": "[PAD]", "</s>": "[SEP]", "<unk>": "[UNK]", "<mask>": "[MASK]"}
ROBERTA_MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "s"), ("Ġ", "is"), ("Ġ", "m"), ("o", "v"), ("i", "e"),
                  ("ov", "ie"), ("Ġm", "ovie"), ("o", "o"), ("Ġ", "g"), ("Ġg", "oo"), ("Ġgoo", "d"), ("i", "n")]


def perturbed(model):
    """Random non-zero values everywhere, biases and LayerNorms included, so no mapping hides."""
    torch.manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(torch.randn_like(parameter) * 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def tiny_bert_src(tmp_path_factory):
    """A BertForPreTraining folder (MLM and next-sentence heads) with a WordPiece vocab."""
    folder = tmp_path_factory.mktemp("hf_bert")
    config = transformers.BertConfig(vocab_size=len(BERT_VOCAB), max_position_embeddings=64, **TINY)
    perturbed(transformers.BertForPreTraining(config)).save_pretrained(folder)
    (folder / "vocab.txt").write_text("".join(token + "\n" for token in BERT_VOCAB), encoding="utf-8")
    (folder / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    return folder


@pytest.fixture(scope="module")
def tiny_roberta_src(tmp_path_factory):
    """A RobertaForMaskedLM folder with a byte-level BPE; <mask> sits at id 4 to make the permutation real."""
    folder = tmp_path_factory.mktemp("hf_roberta")
    tokens = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"] + list(bytes_to_unicode().values())
    tokens += ["".join(pair) for pair in ROBERTA_MERGES]
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(tokens)}), encoding="utf-8")
    # No trailing newline, as some tokenizers write it: the converter must keep the last merge.
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(p) for p in ROBERTA_MERGES),
                                       encoding="utf-8")
    config = transformers.RobertaConfig(vocab_size=len(tokens), max_position_embeddings=66, type_vocab_size=1,
                                        pad_token_id=1, bos_token_id=0, eos_token_id=2, layer_norm_eps=1e-5, **TINY)
    perturbed(transformers.RobertaForMaskedLM(config)).save_pretrained(folder)
    return folder


def converted(src, out):
    hf_import.convert(src, out, report=None)
    return load_model_dir(out)


def fairseq_model_from_checkpoint(model_dir):
    dictionary = Dictionary.load(model_dir.dictionary)
    dictionary.add_symbol("<mask>")
    state = checkpoint_utils.load_checkpoint_to_cpu(model_dir.checkpoint)
    model = models.build_model(state["cfg"].model, argparse.Namespace(source_dictionary=dictionary))
    model.load_state_dict(state["model"], strict=True, model_cfg=state["cfg"].model)
    return model.eval(), dictionary


def encode(model_dir, bpe, dictionary, first, second=None):
    line = f"<s> {bpe.encode(first)} </s>"
    if second is not None:
        line += (" </s> " if model_dir.pair_separator else " ") + f"{bpe.encode(second)} </s>"
    return dictionary.encode_line(line, append_eos=False, add_if_not_exist=False).long()


def source_ids_of(dictionary, source_id_of_symbol):
    """For each fairseq id, the source tokenizer's id of the same token."""
    return torch.tensor([source_id_of_symbol(symbol) for symbol in dictionary.symbols])


def check_parity(model_dir, hf_model, hf_tokenizer, source_id_of_symbol, tmp_path):
    """Same ids, hidden states and MLM logits as transformers, for sentences and pairs."""
    model, dictionary = fairseq_model_from_checkpoint(model_dir)
    bpe = build_bpe(model_dir)
    to_source = source_ids_of(dictionary, source_id_of_symbol)
    ours = [encode(model_dir, bpe, dictionary, s) for s in SENTENCES]
    ours += [encode(model_dir, bpe, dictionary, a, b) for a, b in PAIRS]
    theirs = [hf_tokenizer(s).input_ids for s in SENTENCES] + [hf_tokenizer(a, b).input_ids for a, b in PAIRS]
    for fairseq_ids, source_ids in zip(ours, theirs):
        assert to_source[fairseq_ids].tolist() == source_ids
    src_tokens = collate_tokens(ours, dictionary.pad())
    keep = src_tokens.ne(dictionary.pad())
    hf_inputs = {"input_ids": torch.where(keep, to_source[src_tokens], hf_tokenizer.pad_token_id),
                 "attention_mask": keep.long()}
    if model_dir.family == "bert":
        encoded = [hf_tokenizer(s) for s in SENTENCES] + [hf_tokenizer(a, b) for a, b in PAIRS]
        hf_inputs["token_type_ids"] = collate_tokens([torch.tensor(e.token_type_ids) for e in encoded], 0)
        assert hf_inputs["token_type_ids"].sum() > 0
    with torch.no_grad():
        logits, extra = model(src_tokens, return_all_hiddens=True)
        features, _ = model(src_tokens, features_only=True)
        expected = hf_model(**hf_inputs, output_hidden_states=True)
    assert (features - expected.hidden_states[-1])[keep].abs().max() < 1e-5
    assert (logits - expected.logits[:, :, to_source])[keep].abs().max() < 1e-4
    return model


def test_tiny_bert_with_pretraining_heads_matches_transformers(tiny_bert_src, tmp_path):
    model_dir = converted(tiny_bert_src, tmp_path / "bert")
    assert model_dir.arch == "bert" and model_dir.pooling == "first"  # no 1_Pooling/config.json
    assert model_dir.model_args == {"encoder_layers": 2, "encoder_embed_dim": 32, "encoder_attention_heads": 2,
                                    "encoder_ffn_embed_dim": 64, "max_positions": 64}
    hf_model = transformers.BertForMaskedLM.from_pretrained(str(tiny_bert_src)).eval()
    hf_model.bert.pooler = None  # BertForMaskedLM drops it; output_hidden_states still covers the encoder
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(tiny_bert_src))
    model = check_parity(model_dir, hf_model, tokenizer,
                         lambda s: BERT_VOCAB.index(BERT_FAIRSEQ_SPECIALS.get(s, s)), tmp_path)
    assert model.encoder.lm_head is not None  # the checkpoint has one, so its config asks for it


@pytest.mark.parametrize("config, arch", [
    (dict(model_type="bert", num_hidden_layers=12, hidden_size=768, num_attention_heads=12, intermediate_size=3072,
          max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12), "bert_base"),
    (dict(model_type="bert", num_hidden_layers=24, hidden_size=1024, num_attention_heads=16, intermediate_size=4096,
          max_position_embeddings=512, type_vocab_size=2, layer_norm_eps=1e-12), "bert_large"),
    (dict(model_type="roberta", num_hidden_layers=12, hidden_size=768, num_attention_heads=12,
          intermediate_size=3072, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5), "roberta_base"),
    (dict(model_type="roberta", num_hidden_layers=24, hidden_size=1024, num_attention_heads=16,
          intermediate_size=4096, max_position_embeddings=514, type_vocab_size=1, layer_norm_eps=1e-5), "roberta_large"),
])
def test_base_and_large_configs_get_their_named_arch(config, arch):
    structure = hf_import.structure_args(config["model_type"], config, Path("config.json"))
    assert hf_import.pick_architecture(config["model_type"], structure) == (arch, {})


def test_bin_weights_with_tied_decoder_give_the_same_checkpoint(tiny_bert_src, tmp_path):
    """pytorch_model.bin (read with weights_only=True) holding the tied decoder tensors too."""
    src = tmp_path / "bin"
    shutil.copytree(tiny_bert_src, src)
    hf_model = transformers.BertForPreTraining.from_pretrained(str(tiny_bert_src))
    state = hf_model.state_dict()
    assert "cls.predictions.decoder.weight" in state and "cls.predictions.decoder.bias" in state
    torch.save(state, src / "pytorch_model.bin")
    (src / "model.safetensors").unlink()
    a = torch.load(converted(tiny_bert_src, tmp_path / "a").checkpoint, weights_only=True)["model"]
    b = torch.load(converted(src, tmp_path / "b").checkpoint, weights_only=True)["model"]
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_tiny_bert_restores_through_train_options(tiny_bert_src, tmp_path):
    """The train.py path: model from --arch + model_args, MLM head dropped, new head kept."""
    model_dir = converted(tiny_bert_src, tmp_path / "bert")
    data = tmp_path / "data"
    (data / "input0").mkdir(parents=True)
    (data / "label").mkdir()
    shutil.copy(model_dir.dictionary, data / "input0" / "dict.txt")
    (data / "label" / "dict.txt").write_text("0 1\n1 1\n")
    args = options.parse_args_and_arch(options.get_training_parser(), [
        str(data), "--task", "sentence_prediction", "--criterion", "sentence_prediction", "--num-classes", "2",
        "--max-positions", "64", *model_dir.arch_args()])
    cfg = convert_namespace_to_omegaconf(args)
    model = tasks.setup_task(cfg.task).build_model(cfg.model)
    state = checkpoint_utils.load_checkpoint_to_cpu(model_dir.checkpoint)
    assert any(k.startswith("encoder.lm_head.") for k in state["model"])
    model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    assert model.encoder.lm_head is None and "sentence_classification_head" in model.classification_heads


def test_tiny_roberta_matches_transformers(tiny_roberta_src, tmp_path):
    model_dir = converted(tiny_roberta_src, tmp_path / "roberta")
    assert (model_dir.family, model_dir.arch, model_dir.pair_separator) == ("roberta", "roberta", True)
    assert model_dir.model_args["max_positions"] == 64
    vocab = json.loads((tiny_roberta_src / "vocab.json").read_text(encoding="utf-8"))
    merges = Path(model_dir.bpe_args["gpt2_vocab_bpe"]).read_text(encoding="utf-8").splitlines()
    assert merges[-1] == " ".join(ROBERTA_MERGES[-1])
    hf_model = transformers.RobertaForMaskedLM.from_pretrained(str(tiny_roberta_src)).eval()
    tokenizer = transformers.RobertaTokenizerFast.from_pretrained(str(tiny_roberta_src))
    # dict.txt symbols are the ids encoder.json gives, which are the source ids here.
    specials = {name: vocab[name] for name in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")}
    check_parity(model_dir, hf_model, tokenizer, lambda s: specials[s] if s in specials else int(s), tmp_path)


def test_roberta_without_mlm_head_gets_a_fresh_one(tiny_roberta_src, tmp_path):
    """A RobertaModel folder (pooler, no MLM head): same features; the pooler is reported as left out."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copy(tiny_roberta_src / name, src / name)
    hf_model = transformers.RobertaModel.from_pretrained(str(tiny_roberta_src), add_pooling_layer=True)
    perturbed(hf_model).save_pretrained(src)
    report = []
    hf_import.convert(src, tmp_path / "out", report=report.append)
    assert any(line.startswith("pooler.dense.weight: not carried over") for line in report)
    assert "encoder.lm_head.dense.weight: initialised (the source has no MLM head)" in report
    model, dictionary = fairseq_model_from_checkpoint(load_model_dir(tmp_path / "out"))
    tokens = torch.tensor([[0, 5, 100, 200, 2, 1]])  # fairseq ids: <s> ... </s> <pad>
    vocab = json.loads((src / "vocab.json").read_text(encoding="utf-8"))
    specials = {name: vocab[name] for name in ("<s>", "<pad>", "</s>", "<unk>", "<mask>")}
    to_source = source_ids_of(dictionary, lambda s: specials[s] if s in specials else int(s))
    with torch.no_grad():
        features, _ = model(tokens, features_only=True)
        expected = hf_model(input_ids=to_source[tokens], attention_mask=tokens.ne(1).long()).last_hidden_state
    assert (features - expected)[:, :5].abs().max() < 1e-5


def test_fairseq_roberta_folder_without_model_info_loads(tiny_roberta_src, tmp_path):
    """A fairseq RoBERTa release layout (model.pt with args, dict.txt, encoder.json, vocab.bpe)."""
    source = converted(tiny_roberta_src, tmp_path / "converted")
    folder = tmp_path / "fairseq_roberta"
    folder.mkdir()
    for name in ("dict.txt", "encoder.json", "vocab.bpe"):
        shutil.copy(Path(source.path) / name, folder / name)
    args = options.parse_args_and_arch(options.get_training_parser(), [
        str(folder), "--task", "masked_lm", "--criterion", "masked_lm", "--arch", "roberta", "--encoder-layers", "2",
        "--encoder-embed-dim", "32", "--encoder-ffn-embed-dim", "64", "--encoder-attention-heads", "2",
        "--max-positions", "64"])
    task = tasks.setup_task(args)
    model = task.build_model(args)
    torch.save({"args": args, "model": model.state_dict(), "extra_state": {"epoch": 1},
                "optimizer_history": [{"criterion_name": "MaskedLmLoss", "optimizer_name": "FairseqAdam",
                                       "lr_scheduler_state": {"best": None}, "num_updates": 10}],
                "last_optimizer_state": None}, folder / "model.pt")

    model_dir = load_model_dir(folder)
    assert (model_dir.family, model_dir.arch, model_dir.pair_separator, model_dir.pooling) == \
        ("roberta", "roberta", True, "first")
    assert model_dir.bpe_args == {"bpe": "gpt2", "gpt2_encoder_json": str(folder / "encoder.json"),
                                  "gpt2_vocab_bpe": str(folder / "vocab.bpe")}
    assert model_dir.model_args == {"encoder_layers": 2, "encoder_embed_dim": 32, "encoder_attention_heads": 2,
                                    "encoder_ffn_embed_dim": 64, "max_positions": 64}
    bpe = build_bpe(model_dir)  # local files: no download
    from fairseq.models.roberta import RobertaModel

    hub = RobertaModel.from_pretrained(str(folder), checkpoint_file="model.pt", **model_dir.bpe_args)
    tokens = hub.encode("the movie is good.")
    assert tokens.tolist() == encode(model_dir, bpe, task.source_dictionary, "the movie is good.").tolist()
    assert hub.extract_features(tokens).shape == (1, len(tokens), 32)


# --- bad input: one line on stderr, exit status 2, nothing left behind -------------------------------

def edit_json(path: Path, **changes):
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


class Unsafe:
    """A pickled object torch's safe loader must refuse."""


def _bad_cases():
    def delete(name):
        return lambda src: (src / name).unlink()

    def extra_token(src):
        with open(src / "vocab.txt", "a", encoding="utf-8") as f:
            f.write("extra\n")

    def extra_tensor(src):
        from safetensors.torch import load_file, save_file

        weights = load_file(str(src / "model.safetensors"))
        weights["classifier.weight"] = torch.zeros(2, 32)
        save_file(weights, str(src / "model.safetensors"))

    def missing_tensor(src):
        from safetensors.torch import load_file, save_file

        weights = load_file(str(src / "model.safetensors"))
        del weights["bert.encoder.layer.1.intermediate.dense.weight"]
        save_file(weights, str(src / "model.safetensors"))

    def unsafe_bin(src):
        (src / "model.safetensors").unlink()
        torch.save({"weights": Unsafe()}, src / "pytorch_model.bin")

    return {
        "missing folder": (lambda src: shutil.rmtree(src), "no such folder"),
        "a file": (lambda src: (shutil.rmtree(src), src.write_text("{}")), "a file, not a folder"),
        "missing config.json": (delete("config.json"), "missing config.json"),
        "missing weights": (delete("model.safetensors"), "missing model.safetensors or pytorch_model.bin"),
        "missing vocab.txt": (delete("vocab.txt"), "missing vocab.txt"),
        "deberta": (lambda src: edit_json(src / "config.json", model_type="deberta-v2",
                                          architectures=["DebertaV2Model"]),
                    "unsupported model_type 'deberta-v2' (architectures: DebertaV2Model); supported: bert, roberta"),
        "gpt2": (lambda src: edit_json(src / "config.json", model_type="gpt2", architectures=["GPT2LMHeadModel"]),
                 "unsupported model_type 'gpt2'"),
        "bert as a decoder": (lambda src: edit_json(src / "config.json", is_decoder=True), "as a decoder"),
        "vocab size": (extra_token, f"has {len(BERT_VOCAB) + 1} tokens but"),
        "shape": (lambda src: edit_json(src / "config.json", intermediate_size=48),
                  "intermediate.dense.bias has shape (64,), but config.json"),
        "leftover tensor": (extra_tensor, "have no place in the fairseq bert model, e.g. classifier.weight"),
        "missing tensor": (missing_tensor, "no tensor for 1 parameters of the fairseq bert model, "
                                           "e.g. encoder.sentence_encoder.layers.1.fc1.weight"),
        "unsafe pickle": (unsafe_bin, "pytorch_model.bin: cannot read the weights"),
    }


BAD_CASES = _bad_cases()


@pytest.mark.parametrize("case", list(BAD_CASES))
def test_bad_source_gets_one_line_and_exit_2(case, tiny_bert_src, tmp_path, capfd):
    src = tmp_path / "src"
    shutil.copytree(tiny_bert_src, src)
    mutate, message = BAD_CASES[case]
    mutate(src)
    out_parent = tmp_path / "out"
    out_parent.mkdir()
    with pytest.raises(SystemExit) as exit_info:
        convert_cli.main([str(src), str(out_parent / "model")])
    assert exit_info.value.code == 2
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert list(out_parent.iterdir()) == []  # no output, no staging folder


def test_existing_output_and_roberta_mean_pooling_are_refused(tiny_bert_src, tiny_roberta_src, tmp_path, capfd):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    for argv, message in (([str(tiny_bert_src), str(out)], "already exists"),
                          ([str(tiny_roberta_src), str(tmp_path / "r"), "--pooling", "mean"], "--pooling mean")):
        with pytest.raises(SystemExit) as exit_info:
            convert_cli.main(argv)
        lines = capfd.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1 and message in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"] and (out / "keep.txt").read_text() == "mine"


def test_cli_process_reports_one_line_and_exit_2(tiny_bert_src, tmp_path):
    src = tmp_path / "src"
    shutil.copytree(tiny_bert_src, src)
    edit_json(src / "config.json", model_type="gpt2", architectures=["GPT2LMHeadModel"])
    result = subprocess.run([sys.executable, "-m", "fairseq_ext.tools.convert_hf", str(src), str(tmp_path / "out")],
                            cwd=REPO, capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("convert_hf.py: error: ") and "supported: bert, roberta" in lines[0]
    assert not (tmp_path / "out").exists()


def test_model_dir_without_model_info_is_inferred_from_the_checkpoint(tiny_bert_src, tmp_path):
    written = converted(tiny_bert_src, tmp_path / "bert")
    (Path(written.path) / "model_info.json").unlink()
    (Path(written.path) / "tokenizer_config.json").write_text(json.dumps({"do_lower_case": True}))
    assert load_model_dir(written.path) == written


def test_model_dir_errors_name_the_folder_and_file(tiny_bert_src, tmp_path):
    model_dir = converted(tiny_bert_src, tmp_path / "bert")
    folder = Path(model_dir.path)
    (folder / "vocab.txt").unlink()
    with pytest.raises(UserError, match=f"{folder}: missing vocab.txt"):
        load_model_dir(folder)
    edit_json(folder / "model_info.json", family="gpt2")
    with pytest.raises(UserError, match="family 'gpt2'"):
        load_model_dir(folder)
    (folder / "model_info.json").unlink()
    with pytest.raises(UserError, match="missing the tokenizer"):
        load_model_dir(folder)
    (folder / "encoder.json").write_text("{}")
    with pytest.raises(UserError, match=f"{folder}: missing vocab.bpe"):
        load_model_dir(folder)
    (folder / "model.pt").unlink()
    with pytest.raises(UserError, match="missing model.pt"):
        load_model_dir(folder)
    with pytest.raises(UserError, match="no such model folder"):
        load_model_dir(tmp_path / "nowhere")


def test_glue_run_imports_each_hugging_face_folder_once_and_tells_same_named_ones_apart(tiny_bert_src, tmp_path):
    """MODEL=.../model twice with different models behind the same folder name: two imports."""
    import shutil

    from fairseq_ext.experiments.glue_run import resolve_model

    first, second = tmp_path / "a" / "model", tmp_path / "b" / "model"
    shutil.copytree(tiny_bert_src, first)
    shutil.copytree(tiny_bert_src, second)
    other = transformers.BertForPreTraining.from_pretrained(second)
    with torch.no_grad():
        other.bert.embeddings.LayerNorm.bias.add_(1.0)
    other.save_pretrained(second)
    out = tmp_path / "out"
    a, b, a_again = resolve_model(str(first), out), resolve_model(str(second), out), resolve_model(str(first), out)
    assert a.path != b.path and a_again.path == a.path

    def embedding_layer_norm_bias(folder):
        state = torch.load(folder.checkpoint, map_location="cpu", weights_only=False)["model"]
        return next(v for k, v in state.items() if k.endswith("layernorm_embedding.bias"))

    assert torch.allclose(embedding_layer_norm_bias(b), embedding_layer_norm_bias(a) + 1.0)
