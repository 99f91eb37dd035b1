"""Hugging Face OPT into fairseq's transformer_lm (tools.convert_hf): the same logits as transformers'
own forward, the same token ids from fairseq's BPE as from the Hugging Face tokenizer, and a BitFit run
of train.py on the imported folder.

Each model is a randomly initialised OPTConfig built by transformers offline, with a byte-level BPE
trained here by the tokenizers package; every tensor is drawn larger than OPT's init (biases and
LayerNorms included), so a tensor mapped to the wrong place shows in the logits.
"""
import json

import pytest
import torch

import fairseq_ext  # noqa: F401  (registers the plugin)
import tiny
from fairseq_ext.plugin.checkpoints import load_checkpoint_file
from fairseq_ext.plugin.models.build import build_fairseq_model
from fairseq_ext.plugin.models.hf_lm_import import convert_hf_folder
from fairseq_ext.tools import convert_hf as convert_cli

transformers = pytest.importorskip("transformers")
tokenizers = pytest.importorskip("tokenizers")

TEXT = ["the cat sat on the mat", "a dog ran in the park", "the bird sang on a branch", "cats and dogs play"]
SPECIALS = ["<s>", "<pad>", "</s>", "<unk>"]
# Pre-LN with a final LayerNorm (OPT-125m's layout); post-LN with project_in/out and no final
# LayerNorm (OPT-350m's layout).
CONFIGS = {
    "pre-ln": dict(hidden_size=32, word_embed_proj_dim=32, do_layer_norm_before=True),
    "post-ln-projected": dict(hidden_size=32, word_embed_proj_dim=16, do_layer_norm_before=False),
}
TOLERANCE = 1e-5  # fp32; measured 2026-12-06: at most 1.9e-06 in logits and log-probabilities, both layouts


def save_tokenizer(folder):
    """A byte-level BPE over TEXT in OPT's layout: <s> <pad> </s> <unk> at ids 0-3."""
    bpe = tokenizers.ByteLevelBPETokenizer()
    bpe.train_from_iterator(TEXT * 20, vocab_size=300, min_frequency=1, special_tokens=SPECIALS)
    bpe.save_model(str(folder))
    return len(json.loads((folder / "vocab.json").read_text()))


def make_opt(folder, layout: str):
    folder.mkdir()
    vocab = save_tokenizer(folder)
    config = transformers.OPTConfig(vocab_size=vocab + 3, num_hidden_layers=2, ffn_dim=48, num_attention_heads=4,
                                    max_position_embeddings=64, pad_token_id=1, bos_token_id=2, eos_token_id=2,
                                    **CONFIGS[layout])  # 3 rows beyond vocab.json, as OPT pads its embedding
    torch.manual_seed(0)
    model = transformers.OPTForCausalLM(config).eval()
    with torch.no_grad():  # larger than OPT's init (std 0.02), so every tensor weighs in the logits
        for name, parameter in model.named_parameters():
            parameter.normal_(1.0 if "layer_norm.weight" in name else 0.0, 0.3 if "layer_norm" in name else 0.2)
    model.save_pretrained(folder)
    return model


@pytest.fixture(scope="module", params=list(CONFIGS))
def imported(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    hf_model = make_opt(root / "hf", request.param)
    convert_hf_folder(root / "hf", root / "fairseq", report=None)
    return request.param, hf_model, root


def fairseq_model(folder):
    from fairseq.data import Dictionary

    checkpoint = load_checkpoint_file(folder / "model.pt")
    model = build_fairseq_model(checkpoint["cfg"]["model"], Dictionary.load(str(folder / "dict.txt")))
    model.load_state_dict(checkpoint["model"], strict=True)
    return model.eval()


def test_logits_equal_transformers_forward(imported):
    layout, hf_model, root = imported
    model = fairseq_model(root / "fairseq")
    assert model.decoder.embed_tokens.num_embeddings == hf_model.config.vocab_size  # fairseq index = OPT id
    torch.manual_seed(1)
    tokens = torch.randint(4, hf_model.config.vocab_size, (3, 24))
    tokens[:, 0] = 2  # </s> first: OPT's tokenizer and fairseq's language_modeling blocks both start so
    # A right-padded row: fairseq skips <pad> in its positions and masks it, as attention_mask does.
    tokens[2, 15:] = 1
    mask = tokens.ne(1).long()
    with torch.no_grad():
        expected = hf_model(tokens, attention_mask=mask).logits
        logits = model(tokens)[0]
    kept = mask.bool()
    difference = (logits - expected).abs()[kept].max().item()
    log_probs = (logits.log_softmax(-1) - expected.log_softmax(-1)).abs()[kept].max().item()
    print(f"{layout}: max |logit difference| {difference:.3g}, max |log-prob difference| {log_probs:.3g}")
    assert difference <= TOLERANCE and log_probs <= TOLERANCE
    assert expected.std() > 0.5  # logits that tell tokens apart, not two near-constant outputs


def test_fairseq_tokenizes_and_scores_text_as_transformers(imported):
    """The folder's gpt2 BPE gives the Hugging Face tokenizer's ids, and fairseq's hub, loading model.pt
    as any fairseq LM, gives each token the log-probability transformers gives it after </s>."""
    from fairseq.models.transformer_lm import TransformerLanguageModel

    from fairseq_ext.plugin.models.hf_import import GPT2_BPE_ARGS

    layout, hf_model, root = imported
    folder = root / "fairseq"
    info = json.loads((folder / "model_info.json").read_text())
    assert info["family"] == "opt" and info["arch"] == "transformer_lm" and info["bpe_args"] == GPT2_BPE_ARGS
    hub = TransformerLanguageModel.from_pretrained(
        str(folder), "model.pt", data_name_or_path=str(folder), bpe="gpt2",
        gpt2_encoder_json=str(folder / "encoder.json"), gpt2_vocab_bpe=str(folder / "vocab.bpe")).eval()
    reference = transformers.AutoTokenizer.from_pretrained(str(root / "hf"))
    for text in ("the cat ran in the park", "Dogs, birds and 3 cats!"):
        ids = reference(text, add_special_tokens=False)["input_ids"]
        assert hub.encode(text).tolist() == ids + [2]  # fairseq ends a line with </s>
        scored = hub.score(text)
        with torch.no_grad():
            log_probs = hf_model(torch.tensor([[2] + ids])).logits.log_softmax(-1)[0]
        expected = log_probs[torch.arange(len(ids)), torch.tensor(ids)]
        difference = (scored["positional_scores"] - expected).abs().max().item()
        print(f"{layout}: hub score {text!r}: max |log-prob difference| {difference:.3g}")
        assert difference <= TOLERANCE


def test_train_py_bitfit_trains_the_imported_model(imported, tmp_path):
    layout, _, root = imported
    if layout != "pre-ln":
        pytest.skip("one training run is enough")
    folder = root / "fairseq"
    info = json.loads((folder / "model_info.json").read_text())
    raw = tmp_path / "raw"
    raw.mkdir()
    for split, count in (("train", 40), ("valid", 8)):
        (raw / f"{split}.txt").write_text("\n".join(TEXT[i % len(TEXT)] for i in range(count)) + "\n")
        tiny.run(["-m", "fairseq.examples.roberta.multiprocessing_bpe_encoder", "--encoder-json",
                  str(folder / "encoder.json"), "--vocab-bpe", str(folder / "vocab.bpe"), "--inputs",
                  str(raw / f"{split}.txt"), "--outputs", str(raw / f"{split}.bpe"), "--workers", "1", "--keep-empty"])
    data = tmp_path / "bin"
    tiny._preprocess(["--trainpref", raw / "train.bpe", "--validpref", raw / "valid.bpe"], data,
                     srcdict=folder / "dict.txt")
    model_args = []
    for key, value in info["model_args"].items():
        model_args += [f"--{key.replace('_', '-')}"] + ([] if value is True else [str(value)])
    save_dir = tmp_path / "run"
    tiny.run(["train.py", str(data), "--task", "language_modeling", "--arch", info["arch"], *model_args,
              "--tokens-per-sample", "16", "--restore-file", str(folder / "model.pt"), "--reset-optimizer",
              "--reset-dataloader", "--reset-meters", "--optimizer", "adam", "--lr", "1e-2", "--batch-size", "4",
              "--required-batch-size-multiple", "1", "--max-update", "3", "--no-epoch-checkpoints", "--save-dir", str(save_dir), "--bitfit",
              "--bitfit-terms", "all", *tiny.COMMON])
    base = torch.load(folder / "model.pt", map_location="cpu")["model"]
    trained = torch.load(save_dir / "checkpoint_last.pt", map_location="cpu")["model"]
    changed = {name for name, tensor in base.items() if not torch.equal(tensor, trained[name])}
    assert changed and all(name.endswith(".bias") for name in changed), changed
    assert "decoder.layers.0.self_attn.q_proj.bias" in changed
    assert (save_dir / "checkpoint_last.delta.safetensors").is_file()


def test_gpt2_and_bad_opt_folders_get_one_line_and_nothing_written(imported, tmp_path, capfd):
    _, _, root = imported
    import shutil

    def attempt(edit, *extra):
        src = tmp_path / "src"
        shutil.rmtree(src, ignore_errors=True)
        shutil.copytree(root / "hf", src)
        edit(src)
        out_parent = tmp_path / "out"
        out_parent.mkdir(exist_ok=True)
        with pytest.raises(SystemExit) as exit_info:
            convert_cli.main([str(src), str(out_parent / "model"), *extra])
        lines = capfd.readouterr().err.strip().splitlines()
        assert exit_info.value.code == 2 and len(lines) == 1, lines
        assert list(out_parent.iterdir()) == []
        return lines[0]

    def config(**changes):
        def edit(src):
            values = json.loads((src / "config.json").read_text())
            (src / "config.json").write_text(json.dumps({**values, **changes}))
        return edit

    def vocab_pad_and_eos_swapped(src):
        vocab = json.loads((src / "vocab.json").read_text())
        vocab["<pad>"], vocab["</s>"] = vocab["</s>"], vocab["<pad>"]
        (src / "vocab.json").write_text(json.dumps(vocab))

    assert "gpt2 is not imported: fairseq's dictionary adds <s>, <pad> and <unk>" in attempt(
        config(model_type="gpt2", architectures=["GPT2LMHeadModel"]))
    assert "enable_bias false" in attempt(config(enable_bias=False))
    assert "has shape" in attempt(config(ffn_dim=40))
    assert "<pad> has id 2; fairseq's dictionary needs it at 1" in attempt(vocab_pad_and_eos_swapped)
    assert "--pooling mean" in attempt(lambda src: None, "--pooling", "mean")
