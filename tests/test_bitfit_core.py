"""The framework-agnostic BitFit core, on the real parameter names of fairseq models."""
import argparse
import re

import pytest
import torch

from fairseq_ext import bitfit


def _args(**overrides):
    base = dict(
        encoder_layers=2, encoder_embed_dim=16, encoder_ffn_embed_dim=32, encoder_attention_heads=2,
        decoder_layers=2, decoder_embed_dim=16, decoder_ffn_embed_dim=32, decoder_attention_heads=2,
        max_positions=32, max_source_positions=32, max_target_positions=32, tokens_per_sample=32,
    )
    base.update(overrides)
    return argparse.Namespace(**base)


class _Task:
    """The little of a fairseq task that build_model needs."""

    def __init__(self, dictionary):
        self.source_dictionary = self.target_dictionary = self.dictionary = dictionary


def _dictionary():
    from fairseq.data import Dictionary

    d = Dictionary()
    for i in range(20):
        d.add_symbol(f"w{i}")
    return d


def build(arch):
    from fairseq.models import ARCH_MODEL_REGISTRY, ARCH_CONFIG_REGISTRY

    args = _args(arch=arch)
    ARCH_CONFIG_REGISTRY[arch](args)
    model = ARCH_MODEL_REGISTRY[arch].build_model(args, _Task(_dictionary()))
    if hasattr(model, "register_classification_head"):
        model.register_classification_head("sentence_classification_head", num_classes=2)
    return model


@pytest.fixture(scope="module")
def roberta():
    return build("roberta")


@pytest.fixture(scope="module")
def transformer():
    return build("transformer")


@pytest.fixture(scope="module")
def bart():
    return build("bart_base")


def names(model, terms, **kw):
    return set(bitfit.select(model, terms, **kw).names)


def test_ofa_is_exactly_the_ofa_filter_plus_heads(roberta):
    all_names = [n for n, _ in roberta.named_parameters()]
    ofa = {n for n in all_names if ("layer_norm" in n and "bias" in n) or ("fc" in n and "bias" in n)}
    heads = {n for n in all_names if n.startswith("classification_heads.")}
    assert names(roberta, "ofa") == ofa | heads
    assert names(roberta, "ofa", train_heads=False) == ofa
    # What the filter keeps and misses on roberta (docs/fairseq_patches.md, "Facts the code and tests rely on").
    assert "encoder.sentence_encoder.layers.0.fc1.bias" in ofa
    assert "encoder.lm_head.layer_norm.bias" in ofa
    assert "encoder.sentence_encoder.layers.0.self_attn.q_proj.bias" not in ofa
    assert "encoder.sentence_encoder.layernorm_embedding.bias" not in ofa


def test_paper_symbols_on_roberta(roberta):
    layer = "encoder.sentence_encoder.layers.{}."
    assert names(roberta, "q,m2", train_heads=False) == {
        (layer + s).format(i) for i in range(2) for s in ("self_attn.q_proj.bias", "fc1.bias")
    }
    expected = {
        "k": "self_attn.k_proj.bias", "v": "self_attn.v_proj.bias", "m1": "self_attn.out_proj.bias",
        "ln1": "self_attn_layer_norm.bias", "m3": "fc2.bias", "ln2": "final_layer_norm.bias",
    }
    for symbol, suffix in expected.items():
        assert names(roberta, symbol, train_heads=False) == {(layer + suffix).format(i) for i in range(2)}
    assert names(roberta, "emb_ln", train_heads=False) == {"encoder.sentence_encoder.layernorm_embedding.bias"}


def test_all_is_every_bias(roberta, bart):
    for model in (roberta, bart):
        every_bias = {n for n, _ in model.named_parameters() if n.endswith("bias")}
        assert names(model, "all", train_heads=False) == every_bias


def test_encoder_decoder_symbols_include_cross_attention(transformer, bart):
    for model in (transformer, bart):
        q = names(model, "q", train_heads=False)
        assert "decoder.layers.1.encoder_attn.q_proj.bias" in q
        assert "decoder.layers.1.self_attn.q_proj.bias" in q
        assert "encoder.layers.0.self_attn.q_proj.bias" in q
        assert len(q) == 2 + 2 * 2  # encoder self-attn, decoder self- and cross-attn
        ln1 = names(model, "ln1", train_heads=False)
        assert "decoder.layers.0.encoder_attn_layer_norm.bias" in ln1
    assert names(bart, "emb_ln", train_heads=False) == {
        "encoder.layernorm_embedding.bias", "decoder.layernorm_embedding.bias"}


def test_regex_and_none(roberta):
    assert names(roberta, "re:layers\\.1\\..*q_proj\\.bias$", train_heads=False) == {
        "encoder.sentence_encoder.layers.1.self_attn.q_proj.bias"}
    heads = {n for n, _ in roberta.named_parameters() if n.startswith("classification_heads.")}
    assert names(roberta, "none") == heads


@pytest.mark.parametrize("spec", ["qq", "q,,zz", "q,,k", "q,", "", "re:("])
def test_bad_terms_are_rejected_with_the_valid_names(spec):
    with pytest.raises(bitfit.SelectionError) as error:
        bitfit.parse_terms(spec)
    if not spec.startswith("re:"):
        assert "m2" in str(error.value) and "re:REGEX" in str(error.value)


def test_selection_that_trains_nothing_is_an_error():
    model = build("roberta")
    with pytest.raises(bitfit.SelectionError, match="trains no parameter"):
        bitfit.apply(model, "none", train_heads=False)


def test_paper_fractions_on_roberta_base():
    """q,m2 is the paper's ~0.04% subset and all biases ~0.09% (of RoBERTa-base)."""
    from fairseq.models.roberta import RobertaModel, base_architecture

    args = argparse.Namespace(arch="roberta_base", max_positions=512)
    base_architecture(args)
    task = _Task(_dictionary())
    task.source_dictionary = _FakeDict(50265)
    model = RobertaModel.build_model(args, task)
    total = sum(p.numel() for p in model.parameters())
    fractions = {}
    for terms in ("q,m2", "all"):
        # The LM head is unused in fine-tuning; the trainer's probe leaves it frozen.
        chosen = [n for n in bitfit.select(model, terms, train_heads=False).names if "lm_head" not in n]
        bitfit.freeze(model, chosen)
        fractions[terms] = 100.0 * bitfit.count_parameters(model)[0] / total
    assert 0.03 < fractions["q,m2"] < 0.05
    assert 0.07 < fractions["all"] < 0.11


class _FakeDict:
    """A dictionary of a given size: only its length and special indices are used."""

    def __init__(self, size):
        self.size = size

    def __len__(self):
        return self.size

    def pad(self):
        return 1


def test_freeze_find_unused_and_report(roberta):
    model = build("roberta")
    tokens = torch.tensor([[0, 5, 6, 7, 2], [0, 8, 9, 2, 1]])

    def forward_backward():
        logits, _ = model(tokens, features_only=True, classification_head_name="sentence_classification_head")
        logits.sum().backward()

    selection = bitfit.apply(model, "ofa", forward_backward=forward_backward)
    # The LM head is not used for classification: DDP would reject it if trainable.
    assert selection.unused == ["encoder.lm_head.layer_norm.bias"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(selection.names)
    assert all(p.grad is None for p in model.parameters())
    text = bitfit.report(model, selection)
    assert re.search(r"trainable params: [\d,]+ \|\| all params: [\d,]+ \|\| trainable%: [\d.]+", text)
    assert re.search(r"^\s+m2\s+2 tensors\s+64 params$", text, re.M)
    assert "head" in text and "encoder.lm_head.layer_norm.bias" in text


def test_trainable_state_dict_round_trip():
    model = build("roberta")
    bitfit.apply(model, "q,m2")
    saved = bitfit.trainable_state_dict(model)
    assert set(saved) == {n for n, p in model.named_parameters() if p.requires_grad}
    other = build("roberta")
    bitfit.load_trainable_state_dict(other, saved)
    params = dict(other.named_parameters())
    assert all(torch.equal(params[n], t) for n, t in saved.items())
    with pytest.raises(KeyError):
        bitfit.load_trainable_state_dict(other, {"nope.bias": torch.zeros(1)})
