"""A fairseq BERT or RoBERTa encoder as transformers' own model: its config, weights and tokenizer.

Parameter names are hf_import's maps read backwards (every transformers name goes through
``hf_import.fairseq_name``), so the two directions cannot drift apart.  Token ids stay the
fairseq dictionary's: the tokenizer written lists its tokens in that order, so no embedding
row moves and the ids transformers' tokenizer gives are the ids the run was trained on.
"""
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ...core.errors import UserError
from ..data import wordpiece_bpe
from . import hf_import
from .model_dir import ModelDir

MEAN_POOLING_CLASS = "BertForMeanPooledSequenceClassification"
MEAN_POOLING_FILE = "modeling_bitfit_mean_pooling.py"  # what the exported folder calls hf_mean_pooling.py


@dataclass(frozen=True)
class HeadLayout:
    """Where a fairseq classification head's dense and out_proj go in a transformers class."""

    class_name: str
    dense: str  # the transformers module that takes the head's dense layer
    out_proj: str


# Checked against transformers' source: BertForSequenceClassification runs the pooler (dense + tanh over
# [CLS]), dropout, classifier; RobertaClassificationHead runs dropout, dense, tanh, dropout, out_proj over
# <s>: each is fairseq's head (dropout, dense, tanh, dropout, out_proj over the first token) in eval mode.
HEADS = {
    ("bert", "first"): HeadLayout("BertForSequenceClassification", "bert.pooler.dense", "classifier"),
    ("roberta", "first"): HeadLayout("RobertaForSequenceClassification", "classifier.dense", "classifier.out_proj"),
    ("bert", "mean"): HeadLayout(MEAN_POOLING_CLASS, "classifier.dense", "classifier.out_proj"),
}
ENCODER_CLASSES = {"bert": "BertModel", "roberta": "RobertaModel"}  # the encoder alone (a PEFT adapter's base)
# fairseq activation_fn -> transformers hidden_act: hf_import's map read backwards.
HIDDEN_ACT = {}
for _hf_name, _fairseq_name in hf_import.ACTIVATIONS.items():
    HIDDEN_ACT.setdefault(_fairseq_name, _hf_name)
# Model options whose other values give a network transformers' BERT and RoBERTa classes do not have.
REQUIRED_OPTIONS = {"encoder_normalize_before": False, "layernorm_embedding": True, "no_scale_embedding": True,
                    "no_token_positional_embeddings": False, "pooler_activation_fn": "tanh",
                    "spectral_norm_classification_head": False}
SENTENCE_ENCODER = hf_import.SENTENCE_ENCODER
FIRST_POSITION = 2  # fairseq's learned positions start after padding_idx (1)


@dataclass
class Classifier:
    """What the export reads from a fairseq run: its merged weights and how it was trained."""

    family: str  # "bert" or "roberta"
    model_cfg: Dict[str, object]  # the run's model options
    state: Dict[str, torch.Tensor]  # the merged model's state dict, float32
    vocab_size: int
    pooling: str  # "first" or "mean"
    head: Optional[str]  # the classification head's name; None: the encoder alone
    labels: Optional[List[str]]  # class names in class order; None: regression or no head
    max_tokens: Optional[int]  # what the run truncated examples to
    source: str  # for messages: the flags that named the input

    @property
    def layout(self) -> Optional[HeadLayout]:
        return HEADS[(self.family, self.pooling)] if self.head else None

    @property
    def class_name(self) -> str:
        return self.layout.class_name if self.head else ENCODER_CLASSES[self.family]

    def head_tensor(self, part: str) -> torch.Tensor:
        return self.state[f"classification_heads.{self.head}.{part}"]


def check_structure(classifier: Classifier) -> None:
    """Refuse, in one line, a network transformers' classes would compute differently."""
    cfg = classifier.model_cfg
    for option, required in REQUIRED_OPTIONS.items():
        value = cfg.get(option, required)
        if value is None and option == "pooler_activation_fn":
            value = "tanh"
        if value != required:
            raise UserError(f"{classifier.source}: model option {option} {value!r}: transformers' "
                            f"{classifier.class_name} has no such variant (it needs {required!r})")
    if cfg.get("activation_fn", "gelu") not in HIDDEN_ACT:
        raise UserError(f"{classifier.source}: activation_fn {cfg['activation_fn']!r} has no transformers "
                        f"equivalent ({', '.join(HIDDEN_ACT)})")
    if (classifier.family, classifier.pooling) not in HEADS:
        raise UserError(f"{classifier.source}: {classifier.pooling} pooling on a {classifier.family} model is not "
                        "exportable")
    if classifier.head:
        inner, hidden = classifier.head_tensor("dense.weight").shape
        if inner != hidden:
            raise UserError(f"{classifier.source}: the head's inner dimension {inner} differs from the hidden size "
                            f"{hidden}; transformers' heads are hidden x hidden")


def transformers_config(classifier: Classifier):
    """transformers' BertConfig or RobertaConfig of the model, labels and problem type included."""
    import transformers

    cfg, state = classifier.model_cfg, classifier.state
    positions = state[SENTENCE_ENCODER + "embed_positions.weight"].shape[0]
    options = dict(
        vocab_size=classifier.vocab_size, hidden_size=cfg["encoder_embed_dim"],
        num_hidden_layers=cfg["encoder_layers"], num_attention_heads=cfg["encoder_attention_heads"],
        intermediate_size=cfg["encoder_ffn_embed_dim"], hidden_act=HIDDEN_ACT[cfg.get("activation_fn", "gelu")],
        hidden_dropout_prob=cfg.get("dropout", 0.1), attention_probs_dropout_prob=cfg.get("attention_dropout", 0.1),
        classifier_dropout=cfg.get("pooler_dropout"), pad_token_id=1, bos_token_id=0, eos_token_id=2)
    if classifier.head:
        num_labels = classifier.head_tensor("out_proj.weight").shape[0]
        labels = classifier.labels or [f"LABEL_{i}" for i in range(num_labels)]
        options.update(num_labels=num_labels, id2label=dict(enumerate(labels)),
                       label2id={label: i for i, label in enumerate(labels)},
                       problem_type="regression" if classifier.labels is None and num_labels == 1
                       else "single_label_classification")
    if classifier.family == "bert":
        # HF's BERT numbers positions from 0; fairseq's rows 0-1 are never used.
        options.update(max_position_embeddings=positions - FIRST_POSITION, type_vocab_size=2,
                       layer_norm_eps=cfg.get("layer_norm_eps", 1e-12))
        config = transformers.BertConfig(**options)
    else:
        # HF's RoBERTa numbers positions after the padding id, as fairseq does: the same table.
        options.update(max_position_embeddings=positions, type_vocab_size=1, layer_norm_eps=1e-5)
        config = transformers.RobertaConfig(**options)
    if classifier.head and classifier.pooling == "mean":
        config.auto_map = {"AutoModelForSequenceClassification": f"{Path(MEAN_POOLING_FILE).stem}.{MEAN_POOLING_CLASS}"}
    config.architectures = [classifier.class_name]
    return config


def transformers_class(classifier: Classifier):
    if classifier.class_name == MEAN_POOLING_CLASS:
        from .hf_mean_pooling import BertForMeanPooledSequenceClassification

        return BertForMeanPooledSequenceClassification
    import transformers

    return getattr(transformers, classifier.class_name)


def source_name(classifier: Classifier, key: str, prefix: str) -> Optional[str]:
    """The fairseq tensor a transformers parameter comes from (None: derived, not copied)."""
    layout = classifier.layout
    for module, part in ((layout.dense, "dense"), (layout.out_proj, "out_proj")) if layout else ():
        if key.startswith(module + "."):
            return f"classification_heads.{classifier.head}.{part}.{key[len(module) + 1:]}"
    inner = key[len(prefix) + 1:] if key.startswith(prefix + ".") else key
    if inner == hf_import.WORD_EMBEDDINGS:
        return SENTENCE_ENCODER + "embed_tokens.weight"
    if inner == hf_import.POSITION_EMBEDDINGS:
        return SENTENCE_ENCODER + "embed_positions.weight"
    if inner == hf_import.TOKEN_TYPE_EMBEDDINGS and classifier.family == "roberta":
        return None  # fairseq's roberta has no token types: one zero row
    return hf_import.fairseq_name(classifier.family, inner)


def transformers_weights(classifier: Classifier, expected: Dict[str, torch.Tensor], prefix: str
                         ) -> Tuple[Dict[str, torch.Tensor], Dict[str, str], List[str]]:
    """(transformers state dict, {transformers name: fairseq name}, fairseq tensors left out)."""
    state, weights, names = classifier.state, {}, {}
    for key, target in expected.items():
        inner = key[len(prefix) + 1:] if key.startswith(prefix + ".") else key
        if inner.startswith(hf_import.BUFFERS):
            weights[key] = target
            continue
        name = source_name(classifier, key, prefix)
        if name is None:
            tensor = torch.zeros_like(target)
        elif name not in state:
            raise UserError(f"{classifier.source}: the model has no {name} (needed for transformers' {key})")
        else:
            tensor = state[name]
            names[key] = name
        if inner == hf_import.POSITION_EMBEDDINGS and classifier.family == "bert":
            tensor = tensor[FIRST_POSITION:]
        elif inner == hf_import.TOKEN_TYPE_EMBEDDINGS and name is not None:
            # transformers' tokenizer gives type 1 after the first [SEP]; fairseq clamps to its last row.
            rows = torch.arange(target.shape[0]).clamp(max=max(tensor.shape[0] - 1, 0))
            tensor = tensor[rows] if tensor.shape[0] else torch.zeros_like(target)
        if tuple(tensor.shape) != tuple(target.shape):
            raise UserError(f"{classifier.source}: {name} has shape {tuple(tensor.shape)}, transformers' {key} "
                            f"{tuple(target.shape)}")
        weights[key] = tensor.detach().to(target.dtype).clone()
    used = set(names.values())
    left_out = sorted(name for name in state if name not in used and not name.endswith(".version")
                      and not name.startswith(f"classification_heads.{classifier.head}."))
    return weights, names, left_out


# --------------------------------------------------------------------------- the tokenizer

def _checked_vocab(vocab: Dict[str, int], model_dir: ModelDir) -> Dict[str, int]:
    if len(set(vocab.values())) != len(vocab):
        raise UserError(f"{model_dir.dictionary}: two fairseq ids map to one token; the tokenizer cannot be written")
    return vocab


def wordpiece_tokenizer(model_dir: ModelDir, symbols: List[str], max_tokens: int):
    import transformers

    specials = hf_import.BERT_SPECIAL_DEFAULTS
    vocab_path = model_dir.bpe_args["wordpiece_vocab"]
    tokens = wordpiece_bpe.read_wordpiece_vocab(vocab_path)
    vocab = {}
    for index, symbol in enumerate(symbols):
        token = specials[hf_import.FAIRSEQ_SPECIALS[index]] if index < 4 else symbol
        vocab.setdefault(specials["mask"] if symbol == "<mask>" else token, index)
    missing = [token for token in tokens if token not in vocab]
    if missing:
        # fairseq maps such a token to <unk>; a WordPiece without it would split the word otherwise.
        raise UserError(f"{vocab_path}: {len(missing)} tokens are not in {model_dir.dictionary} (e.g. {missing[0]!r}): "
                        "transformers' tokenizer would split those words differently")
    lowercase = model_dir.bpe_args.get("wordpiece_lowercase")
    if lowercase is None:
        lowercase = wordpiece_bpe.is_uncased_vocab(tokens)
    return transformers.BertTokenizer(vocab=_checked_vocab(vocab, model_dir), do_lower_case=lowercase,
                                      strip_accents=model_dir.bpe_args.get("wordpiece_strip_accents"),
                                      tokenize_chinese_chars=True, model_max_length=max_tokens)


def byte_level_tokenizer(model_dir: ModelDir, symbols: List[str], max_tokens: int):
    import transformers

    encoder_path, merges_path = model_dir.bpe_args["gpt2_encoder_json"], model_dir.bpe_args["gpt2_vocab_bpe"]
    tokens_by_id = {i: token for token, i in hf_import.read_json(Path(encoder_path), "the BPE encoder").items()}
    specials = hf_import.ROBERTA_SPECIAL_DEFAULTS
    vocab = {}
    for index, symbol in enumerate(symbols):
        if index < 4:
            token = specials[hf_import.FAIRSEQ_SPECIALS[index]]
        elif symbol == "<mask>":
            token = specials["mask"]
        else:
            # dict.txt holds the GPT-2 BPE's ids; other symbols (madeupword0000) are tokens of their own.
            token = tokens_by_id.get(int(symbol), symbol) if symbol.isdigit() else symbol
        vocab.setdefault(token, index)
    lines = Path(merges_path).read_text(encoding="utf-8").split("\n")
    merges = [tuple(line.split(" ")) for line in lines[1 if lines and lines[0].startswith("#version") else 0:]
              if line.strip()]
    return transformers.RobertaTokenizer(vocab=_checked_vocab(vocab, model_dir), merges=merges,
                                         model_max_length=max_tokens)


def transformers_tokenizer(model_dir: ModelDir, symbols: List[str], max_tokens: int):
    """The run's tokenizer as transformers' BertTokenizer or RobertaTokenizer, ids in fairseq order."""
    bpe = model_dir.bpe_args.get("bpe")
    if bpe == "wordpiece":
        return wordpiece_tokenizer(model_dir, symbols, max_tokens)
    if bpe == "gpt2":
        return byte_level_tokenizer(model_dir, symbols, max_tokens)
    raise UserError(f"{model_dir.path}: tokenizer {bpe!r} is not exportable (wordpiece and gpt2 are)")


def write_json(path: Path, data) -> None:
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
