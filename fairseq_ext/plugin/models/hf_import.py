"""Convert a Hugging Face BERT or RoBERTa folder into a fairseq model folder, offline.

    python -m fairseq_ext.tools.convert_hf SRC_DIR OUT_DIR [--pooling first|mean]

SRC_DIR holds config.json, model.safetensors or pytorch_model.bin, and the
tokenizer: vocab.txt (BERT) or vocab.json + merges.txt (RoBERTa).  OUT_DIR gets

* model.pt: a fairseq checkpoint of this plugin's ``bert`` model or of fairseq's
  ``roberta``, loadable with torch's safe ``torch.load(weights_only=True)`` (the
  config is plain dicts) and by ``--restore-file`` with strict loading;
* dict.txt: the fairseq dictionary; the checkpoint's embedding rows are permuted
  so fairseq ids give the same vectors as the original tokenizer's ids;
* the tokenizer for fairseq's BPE: vocab.txt (``wordpiece``), or encoder.json +
  vocab.bpe (``gpt2``);
* model_info.json: what fine-tuning and prediction need (see model_dir.py).

Every source tensor is carried over or the conversion fails; the few that have no
place in a fairseq encoder (BERT's next-sentence head, RoBERTa's unused pooler)
are named in the report.  Output is written to a temporary folder and renamed,
so a failed conversion leaves nothing behind.
"""
import json
import logging
import os
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
from fairseq.data import Dictionary
from fairseq.models import ARCH_MODEL_INV_REGISTRY
from safetensors.torch import load_file

from ...core.errors import UserError, one_line
from ...core.files import require_file, write_folder_atomically
from ..checkpoints import model_only_checkpoint
from ..data import wordpiece_bpe
from .bert import POOLING_CHOICES
from .build import architecture_config, build_fairseq_model, options_beyond_arch
from .model_dir import write_model_info

logger = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("bert", "roberta")
POOLING_CONFIG = os.path.join("1_Pooling", "config.json")
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json",
                "pytorch_model.bin", "pytorch_model.bin.index.json")
# Hugging Face's hidden_act -> fairseq's activation_fn ("gelu" is the exact erf form in both).
ACTIVATIONS = {"gelu": "gelu", "relu": "relu", "gelu_new": "gelu_accurate", "gelu_pytorch_tanh": "gelu_accurate"}
# fairseq's Dictionary ids 0-3, then dict.txt, then <mask>, which fairseq's tasks append.
FAIRSEQ_SPECIALS = ("bos", "pad", "eos", "unk")
BERT_SPECIAL_DEFAULTS = {"bos": "[CLS]", "pad": "[PAD]", "eos": "[SEP]", "unk": "[UNK]", "mask": "[MASK]"}
ROBERTA_SPECIAL_DEFAULTS = {"bos": "<s>", "pad": "<pad>", "eos": "</s>", "unk": "<unk>", "mask": "<mask>"}
SPECIAL_TOKEN_KEYS = {"bos": ("cls_token", "bos_token"), "pad": ("pad_token",), "eos": ("sep_token", "eos_token"),
                      "unk": ("unk_token",), "mask": ("mask_token",)}

SENTENCE_ENCODER = "encoder.sentence_encoder."
# Hugging Face module inside encoder.layer.N -> fairseq module inside layers.N
LAYER_MODULES = {
    "attention.self.query": "self_attn.q_proj",
    "attention.self.key": "self_attn.k_proj",
    "attention.self.value": "self_attn.v_proj",
    "attention.output.dense": "self_attn.out_proj",
    "attention.output.LayerNorm": "self_attn_layer_norm",
    "intermediate.dense": "fc1",
    "output.dense": "fc2",
    "output.LayerNorm": "final_layer_norm",
}
MODULES = {
    "bert": {
        "embeddings.LayerNorm": SENTENCE_ENCODER + "layernorm_embedding",
        "embeddings.token_type_embeddings": SENTENCE_ENCODER + "segment_embeddings",
        "pooler.dense": "encoder.pooler.dense",
        "cls.predictions.transform.dense": "encoder.lm_head.dense",
        "cls.predictions.transform.LayerNorm": "encoder.lm_head.layer_norm",
    },
    "roberta": {
        "embeddings.LayerNorm": SENTENCE_ENCODER + "layernorm_embedding",
        "lm_head.dense": "encoder.lm_head.dense",
        "lm_head.layer_norm": "encoder.lm_head.layer_norm",
    },
}
WORD_EMBEDDINGS = "embeddings.word_embeddings.weight"
POSITION_EMBEDDINGS = "embeddings.position_embeddings.weight"
TOKEN_TYPE_EMBEDDINGS = "embeddings.token_type_embeddings.weight"
LM_BIAS = {"bert": "cls.predictions.bias", "roberta": "lm_head.bias"}
LM_DECODER = {"bert": "cls.predictions.decoder", "roberta": "lm_head.decoder"}
BUFFERS = ("embeddings.position_ids", "embeddings.token_type_ids")
# Heads a fairseq encoder has no place for: BERT's next-sentence prediction, RoBERTa's pooler
# (fairseq's classification heads bring their own dense + tanh).
UNUSED_HEADS = {"bert": ("cls.seq_relationship.",), "roberta": ("pooler.",)}


@dataclass
class Vocabulary:
    """A tokenizer's vocab in fairseq order: ``hf_ids[i]`` is the source row of fairseq id i."""

    hf_ids: List[int]
    dict_symbols: List[str]  # dict.txt, i.e. fairseq ids 4 .. len-2
    files: Dict[str, Callable[[Path], None]]  # output file -> writer
    bpe_args: Dict[str, object]
    source_file: str


@dataclass
class Conversion:
    state_dict: Dict[str, torch.Tensor] = field(default_factory=dict)
    report: List[str] = field(default_factory=list)
    consumed: set = field(default_factory=set)


def read_json(path: Path, what: str = "") -> dict:
    try:
        with open(path, encoding="utf-8") as json_file:
            return json.load(json_file)
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read {what or 'JSON'}: {error}") from None


def model_family(config: dict, config_path: Path) -> str:
    model_type = config.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES or config.get("is_decoder") or config.get("add_cross_attention"):
        what = repr(model_type) + (" as a decoder" if model_type in SUPPORTED_MODEL_TYPES else "")
        architectures = ", ".join(config.get("architectures") or []) or "none listed"
        raise UserError(f"{config_path}: unsupported model_type {what} (architectures: {architectures}); "
                        f"supported: {', '.join(SUPPORTED_MODEL_TYPES)} encoders, opt language models")
    return model_type


def special_tokens(folder: Path, defaults: Dict[str, str]) -> Dict[str, str]:
    """The tokenizer's special tokens, as special_tokens_map.json names them if present."""
    names = dict(defaults)
    path = folder / "special_tokens_map.json"
    if path.is_file():
        declared = read_json(path)
        for role, keys in SPECIAL_TOKEN_KEYS.items():
            for key in keys:
                value = declared.get(key)
                if isinstance(value, dict):
                    value = value.get("content")
                if isinstance(value, str):
                    names[role] = value
                    break
    return names


def fairseq_order(ids_by_token: Dict[str, int], specials: Dict[str, str], vocab_path: Path) -> List[int]:
    """Source ids in fairseq id order: the four fairseq specials, the rest in source order, mask last."""
    for role, token in specials.items():
        if token not in ids_by_token:
            raise UserError(f"{vocab_path}: no {token} token (needed as fairseq's {role})")
    special_ids = [ids_by_token[specials[role]] for role in FAIRSEQ_SPECIALS]
    mask_id = ids_by_token[specials["mask"]]
    excluded = set(special_ids) | {mask_id}
    rest = sorted(i for i in set(ids_by_token.values()) if i not in excluded)
    return special_ids + rest + [mask_id]


def bert_vocabulary(folder: Path) -> Vocabulary:
    vocab_path = require_file(folder, "vocab.txt", "the WordPiece vocab of a BERT model")
    tokens = wordpiece_bpe.read_wordpiece_vocab(str(vocab_path))
    ids_by_token = {}
    for i, token in enumerate(tokens):
        if token in ids_by_token:
            raise UserError(f"{vocab_path}: token {token!r} appears twice (lines {ids_by_token[token] + 1}, {i + 1})")
        ids_by_token[token] = i
    hf_ids = fairseq_order(ids_by_token, special_tokens(folder, BERT_SPECIAL_DEFAULTS), vocab_path)

    config_path = folder / "tokenizer_config.json"
    tokenizer_config = read_json(config_path) if config_path.is_file() else {}
    lowercase = tokenizer_config.get("do_lower_case")
    if not isinstance(lowercase, bool):
        lowercase = wordpiece_bpe.is_uncased_vocab(tokens)
    bpe_args = {"bpe": "wordpiece", "wordpiece_vocab": "vocab.txt", "wordpiece_lowercase": lowercase}
    if isinstance(tokenizer_config.get("strip_accents"), bool):
        bpe_args["wordpiece_strip_accents"] = tokenizer_config["strip_accents"]
    return Vocabulary(
        hf_ids=hf_ids,
        dict_symbols=[tokens[i] for i in hf_ids[4:-1]],
        files={"vocab.txt": lambda out: shutil.copyfile(vocab_path, out / "vocab.txt")},
        bpe_args=bpe_args,
        source_file=str(vocab_path),
    )


GPT2_BPE_ARGS = {"bpe": "gpt2", "gpt2_encoder_json": "encoder.json", "gpt2_vocab_bpe": "vocab.bpe"}


def gpt2_bpe_files(ids_by_token: Dict[str, int], special_names: set, merges_path: Path
                   ) -> Dict[str, Callable[[Path], None]]:
    """Writers of encoder.json and vocab.bpe, fairseq's ``gpt2`` BPE files, from a byte-level BPE's
    vocab.json and merges.txt.  fairseq's gpt2 BPE writes the id from encoder.json and dict.txt holds
    those ids as symbols (as in fairseq's own RoBERTa): the source ids, so the two stay readable."""
    encoder = {token: i for token, i in ids_by_token.items() if token not in special_names}
    with open(merges_path, encoding="utf-8") as merges_file:
        merges = [line.rstrip("\n") for line in merges_file]
    merges = [m for m in merges[1 if merges and merges[0].startswith("#version") else 0:] if m.strip()]

    def write_encoder(out: Path):
        with open(out / "encoder.json", "w", encoding="utf-8") as f:
            json.dump(encoder, f, ensure_ascii=False)

    def write_merges(out: Path):
        # fairseq's reader skips the first line and the text after the last newline.
        with open(out / "vocab.bpe", "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(m + "\n" for m in merges))

    return {"encoder.json": write_encoder, "vocab.bpe": write_merges}


def roberta_vocabulary(folder: Path) -> Vocabulary:
    vocab_path = require_file(folder, "vocab.json", "the byte-level BPE vocab of a RoBERTa model")
    merges_path = require_file(folder, "merges.txt", "the byte-level BPE merges of a RoBERTa model")
    ids_by_token = read_json(vocab_path, "the BPE vocab")
    if not isinstance(ids_by_token, dict) or sorted(ids_by_token.values()) != list(range(len(ids_by_token))):
        raise UserError(f"{vocab_path}: expected a JSON object mapping each token to a distinct id 0..N-1")
    specials = special_tokens(folder, ROBERTA_SPECIAL_DEFAULTS)
    hf_ids = fairseq_order(ids_by_token, specials, vocab_path)
    files = gpt2_bpe_files(ids_by_token, set(specials.values()), merges_path)
    return Vocabulary(
        hf_ids=hf_ids,
        dict_symbols=[str(i) for i in hf_ids[4:-1]],
        files=files,
        bpe_args=dict(GPT2_BPE_ARGS),
        source_file=str(vocab_path),
    )


def load_weights(folder: Path) -> Tuple[Dict[str, torch.Tensor], Path]:
    for name in WEIGHT_FILES:
        path = folder / name
        if path.is_file():
            break
    else:
        raise UserError(f"{folder}: missing model.safetensors or pytorch_model.bin (the model weights)")
    if name.endswith(".index.json"):
        index = read_json(path, "the weights index")
        shards = sorted(set((index.get("weight_map") or {}).values()))
        if not shards:
            raise UserError(f"{path}: no weight_map")
        paths = [require_file(folder, shard, f"listed in {name}") for shard in shards]
    else:
        paths = [path]
    weights = {}
    for shard in paths:
        try:
            if shard.suffix == ".safetensors":
                weights.update(load_file(str(shard)))
            else:
                weights.update(torch.load(shard, map_location="cpu", weights_only=True))
        except Exception as error:  # corrupt or unsafe files: name the file, not a traceback
            raise UserError(f"{shard}: cannot read the weights: {one_line(error)}") from None
    return weights, path


def normalized_name(name: str) -> str:
    """Drop a task model's prefix (bert., roberta.) and old TF names (gamma/beta)."""
    name = re.sub(r"^(bert|roberta)\.", "", name)
    return re.sub(r"LayerNorm\.gamma$", "LayerNorm.weight", re.sub(r"LayerNorm\.beta$", "LayerNorm.bias", name))


def fairseq_name(family: str, name: str) -> Optional[str]:
    """The fairseq parameter for a source tensor that maps one-to-one, else None."""
    module, _, kind = name.rpartition(".")
    layer = re.fullmatch(r"encoder\.layer\.(\d+)\.(.+)", module)
    if layer and layer.group(2) in LAYER_MODULES:
        return f"{SENTENCE_ENCODER}layers.{layer.group(1)}.{LAYER_MODULES[layer.group(2)]}.{kind}"
    if module in MODULES[family]:
        return f"{MODULES[family][module]}.{kind}"
    return None


def structure_args(family: str, config: dict, config_path: Path) -> Dict[str, object]:
    """fairseq model options that fix the model's shape and arithmetic, from config.json."""

    def get(key):
        if key not in config:
            raise UserError(f"{config_path}: no {key}")
        return config[key]

    if config.get("position_embedding_type", "absolute") != "absolute":
        raise UserError(f"{config_path}: position_embedding_type {config['position_embedding_type']!r} is not "
                        "supported (only absolute)")
    hidden_act = config.get("hidden_act", "gelu")
    if hidden_act not in ACTIVATIONS:
        raise UserError(f"{config_path}: hidden_act {hidden_act!r} is not supported ({', '.join(ACTIVATIONS)})")
    args = {
        "encoder_layers": get("num_hidden_layers"),
        "encoder_embed_dim": get("hidden_size"),
        "encoder_attention_heads": get("num_attention_heads"),
        "encoder_ffn_embed_dim": get("intermediate_size"),
        "activation_fn": ACTIVATIONS[hidden_act],
        # post-LN with an embedding LayerNorm: BERT's and RoBERTa's layout (not roberta_prenorm's)
        "encoder_normalize_before": False,
        "layernorm_embedding": True,
    }
    if args["encoder_embed_dim"] % args["encoder_attention_heads"]:
        raise UserError(f"{config_path}: hidden_size {args['encoder_embed_dim']} is not a multiple of "
                        f"num_attention_heads {args['encoder_attention_heads']}")
    eps = config.get("layer_norm_eps", 1e-12)
    if family == "bert":
        args.update(max_positions=get("max_position_embeddings"), type_vocab_size=config.get("type_vocab_size", 2),
                    layer_norm_eps=eps)
    else:
        # fairseq's roberta: LayerNorm eps 1e-5, positions after the padding id 1, no token types.
        if abs(eps - 1e-5) > 1e-9:
            raise UserError(f"{config_path}: layer_norm_eps {eps} is not supported for roberta (fairseq uses 1e-5)")
        if config.get("pad_token_id", 1) != 1:
            raise UserError(f"{config_path}: pad_token_id {config['pad_token_id']} is not supported for roberta "
                            "(fairseq's positions assume 1)")
        if config.get("type_vocab_size", 1) != 1:
            raise UserError(f"{config_path}: type_vocab_size {config['type_vocab_size']} is not supported for "
                            "roberta (fairseq's roberta has no token types)")
        args["max_positions"] = get("max_position_embeddings") - 2
        if config.get("tie_word_embeddings", True) is False:
            args["untie_weights_roberta"] = True
    if family == "bert" and config.get("tie_word_embeddings", True) is False:
        raise UserError(f"{config_path}: tie_word_embeddings false is not supported for bert")
    return args


def pick_architecture(family: str, structure: Dict[str, object]) -> Tuple[str, Dict[str, object]]:
    """The registered arch whose defaults build this model, and the options it still needs."""
    generic = "bert" if family == "bert" else "roberta"
    named = [arch for arch in ARCH_MODEL_INV_REGISTRY[generic] if arch != generic and arch.startswith(generic + "_")]
    for arch in named + [generic]:
        differing = options_beyond_arch(arch, structure)
        if not differing:
            return arch, {}
    return generic, differing


def default_pooling(folder: Path) -> str:
    """What the checkpoint was trained with: mean if sentence-transformers' pooling config says so."""
    path = folder / POOLING_CONFIG
    if path.is_file() and read_json(path).get("pooling_mode_mean_tokens"):
        return "mean"
    return "first"


def map_weights(family: str, weights: Dict[str, torch.Tensor], vocabulary: Vocabulary,
                expected: Dict[str, torch.Tensor], weights_path: Path, untied_decoder: bool = False) -> Conversion:
    """Source tensors -> fairseq state dict entries; fails on any tensor left on either side."""
    result = Conversion()
    source = {}
    for original_name, tensor in weights.items():
        source[normalized_name(original_name)] = (original_name, tensor)

    def take(name: str) -> torch.Tensor:
        result.consumed.add(name)
        return source[name][1]

    def put(src: str, dst: str, tensor: torch.Tensor, note: str = ""):
        if dst not in expected:
            raise UserError(f"{weights_path}: {source[src][0]} has no place in the fairseq {family} model ({dst})")
        if tuple(tensor.shape) != tuple(expected[dst].shape):
            raise UserError(f"{weights_path}: {source[src][0]} has shape {tuple(source[src][1].shape)}, but "
                            f"config.json gives a model whose {dst} has shape {tuple(expected[dst].shape)}")
        result.state_dict[dst] = tensor
        result.report.append(f"{source[src][0]} -> {dst} {tuple(tensor.shape)}{' ' + note if note else ''}")

    if WORD_EMBEDDINGS not in source:
        raise UserError(f"{weights_path}: no {WORD_EMBEDDINGS}; is this a {family} checkpoint?")
    words = take(WORD_EMBEDDINGS)
    if words.shape[0] != len(vocabulary.hf_ids):
        raise UserError(f"{vocabulary.source_file} has {len(vocabulary.hf_ids)} tokens but "
                        f"{weights_path} has {words.shape[0]} word embeddings")
    order = torch.tensor(vocabulary.hf_ids)
    put(WORD_EMBEDDINGS, SENTENCE_ENCODER + "embed_tokens.weight", words[order], "(rows in dict.txt order)")

    if POSITION_EMBEDDINGS not in source:
        raise UserError(f"{weights_path}: no {POSITION_EMBEDDINGS}")
    positions = take(POSITION_EMBEDDINGS)
    if family == "bert":
        # fairseq's learned positions start at padding_idx + 1 = 2; rows 0-1 are never used.
        positions = torch.cat([positions.new_zeros(2, positions.shape[1]), positions])
        put(POSITION_EMBEDDINGS, SENTENCE_ENCODER + "embed_positions.weight", positions, "(after 2 unused rows)")
    else:
        note = ""
        if TOKEN_TYPE_EMBEDDINGS in source:
            # RoBERTa's single token type is added to every token: fold it into the positions.
            positions = positions + take(TOKEN_TYPE_EMBEDDINGS)[0]
            note = f"(plus {source[TOKEN_TYPE_EMBEDDINGS][0]}, its only row)"
        put(POSITION_EMBEDDINGS, SENTENCE_ENCODER + "embed_positions.weight", positions, note)

    lm_bias = LM_BIAS[family]
    if lm_bias in source:
        put(lm_bias, "encoder.lm_head.bias", take(lm_bias)[order], "(rows in dict.txt order)")
        decoder_weight, decoder_bias = LM_DECODER[family] + ".weight", LM_DECODER[family] + ".bias"
        if decoder_weight in source and untied_decoder:
            put(decoder_weight, "encoder.lm_head.weight", take(decoder_weight)[order],
                "(untied, rows in dict.txt order)")
        elif decoder_weight in source:
            if not torch.equal(take(decoder_weight), words):
                raise UserError(f"{weights_path}: {source[decoder_weight][0]} differs from the word embeddings "
                                "although config.json ties them")
            result.report.append(f"{source[decoder_weight][0]}: tied to the word embeddings")
        if decoder_bias in source:
            if not torch.equal(take(decoder_bias), source[lm_bias][1]):
                raise UserError(f"{weights_path}: {source[decoder_bias][0]} differs from {source[lm_bias][0]}")
            result.report.append(f"{source[decoder_bias][0]}: same tensor as {source[lm_bias][0]}")

    for name in source:
        if name in result.consumed:
            continue
        target = fairseq_name(family, name)
        if target is not None:
            put(name, target, take(name))
        elif name.startswith(BUFFERS):
            take(name)
            result.report.append(f"{source[name][0]}: index buffer, not a weight")
        elif name.startswith(UNUSED_HEADS[family]):
            take(name)
            result.report.append(f"{source[name][0]}: not carried over (fairseq's {family} encoder has no such head)")

    leftover = [source[name][0] for name in source if name not in result.consumed]
    if leftover:
        raise UserError(f"{weights_path}: {len(leftover)} tensors have no place in the fairseq {family} model, "
                        f"e.g. {leftover[0]} (task models such as *ForSequenceClassification are not supported)")
    return result


def fill_derived(family: str, conversion: Conversion, model, weights_path: Path) -> None:
    """Entries the model derives itself (tied weights, buffers) or, for roberta, a missing MLM head."""
    expected = model.state_dict()
    lm_head = [name for name in expected if name.startswith("encoder.lm_head.")]
    if family == "roberta" and not any(name in conversion.state_dict for name in lm_head):
        # fairseq's roberta always has an MLM head; a checkpoint without one (RobertaModel)
        # gets a fresh head, which fine-tuning never uses.
        for name in lm_head:
            if name != "encoder.lm_head.weight":
                conversion.state_dict[name] = expected[name]
                conversion.report.append(f"{name}: initialised (the source has no MLM head)")
    if "encoder.lm_head.weight" in expected and "encoder.lm_head.weight" not in conversion.state_dict:
        # tied to the token embeddings, as in the source
        words = conversion.state_dict[SENTENCE_ENCODER + "embed_tokens.weight"]
        conversion.state_dict["encoder.lm_head.weight"] = words
    conversion.state_dict.setdefault(SENTENCE_ENCODER + "version", expected[SENTENCE_ENCODER + "version"])
    missing = [name for name in expected if name not in conversion.state_dict]
    if missing:
        raise UserError(f"{weights_path}: no tensor for {len(missing)} parameters of the fairseq {family} model, "
                        f"e.g. {missing[0]}")


def write_dictionary(path: Path, symbols: List[str]) -> None:
    with open(path, "w", encoding="utf-8") as dict_file:
        for symbol in symbols:
            dict_file.write(f"{symbol} 1\n")


def load_dictionary(path: Path, expected_symbols: List[str], vocab_file: str):
    """Read dict.txt back as fairseq's tasks do (plus <mask>) and check it kept every token."""
    try:
        dictionary = Dictionary.load(str(path))
    except (RuntimeError, ValueError) as error:
        raise UserError(f"{vocab_file}: cannot become a fairseq dict.txt: {error}") from None
    if dictionary.symbols[dictionary.nspecial:] != expected_symbols:
        raise UserError(f"{vocab_file}: some tokens do not survive fairseq's dict.txt format "
                        "(whitespace inside a token?)")
    dictionary.add_symbol("<mask>")
    return dictionary


def convert(src_dir, out_dir, pooling: Optional[str] = None, report: Optional[Callable[[str], None]] = print,
            source_note: Optional[dict] = None) -> Path:
    """Convert the Hugging Face folder ``src_dir`` into the fairseq model folder ``out_dir``.

    ``report`` receives one line per tensor and a summary (None: silent); ``source_note``
    is added to model_info.json's "source".
    """
    src, out = Path(src_dir).resolve(), Path(out_dir).resolve()
    if src.is_file():
        raise UserError(f"{src_dir}: a file, not a folder; give the Hugging Face model folder (config.json, weights, "
                        "tokenizer)")
    if not src.is_dir():
        raise UserError(f"{src_dir}: no such folder")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out_dir}: already exists; give a new or empty folder")
    config_path = require_file(src, "config.json", "a Hugging Face model folder has config.json and model weights")
    config = read_json(config_path, "the model config")
    family = model_family(config, config_path)
    structure = structure_args(family, config, config_path)
    pooling = pooling or default_pooling(src)
    if pooling not in POOLING_CHOICES:
        raise UserError(f"--pooling {pooling}: choose one of {', '.join(POOLING_CHOICES)}")
    if family == "roberta" and pooling != "first":
        raise UserError(f"--pooling {pooling}: fairseq's roberta classification heads use the first token; "
                        f"pass --pooling first to convert {src_dir} anyway")
    vocabulary = bert_vocabulary(src) if family == "bert" else roberta_vocabulary(src)
    if len(vocabulary.hf_ids) != config.get("vocab_size", len(vocabulary.hf_ids)):
        raise UserError(f"{vocabulary.source_file} has {len(vocabulary.hf_ids)} tokens but {config_path} says "
                        f"vocab_size {config['vocab_size']}")
    weights, weights_path = load_weights(src)

    arch, model_args = pick_architecture(family, structure)
    explicit = {"_name": arch, "arch": arch, **model_args,
                "dropout": config.get("hidden_dropout_prob", 0.1),
                "attention_dropout": config.get("attention_probs_dropout_prob", 0.1)}
    if family == "bert":
        explicit.update(pooling=pooling, bert_lm_head=LM_BIAS["bert"] in {normalized_name(n) for n in weights})
    # Stored whole, as plain values: building from the checkpoint needs no arch defaults, and
    # torch's safe loader reads it without an allow-list.
    model_cfg = architecture_config(arch, **explicit)

    def fill(staging: Path):
        write_dictionary(staging / "dict.txt", vocabulary.dict_symbols)
        dictionary = load_dictionary(staging / "dict.txt", vocabulary.dict_symbols, vocabulary.source_file)
        model = build_fairseq_model(model_cfg, dictionary)
        conversion = map_weights(family, weights, vocabulary, model.state_dict(), weights_path,
                                 untied_decoder=bool(model_cfg.get("untie_weights_roberta")))
        fill_derived(family, conversion, model, weights_path)
        model.load_state_dict(conversion.state_dict, strict=True)
        for name, write in vocabulary.files.items():
            write(staging)
        torch.save(model_only_checkpoint({"model": model_cfg}, model.state_dict()), staging / "model.pt")
        write_model_info(staging, {
            "family": family,
            "arch": arch,
            "model_args": model_args,
            "checkpoint": "model.pt",
            "dictionary": "dict.txt",
            "bpe_args": vocabulary.bpe_args,
            "pair_separator": family == "roberta",
            "pooling": pooling,
            "source": {"path": str(src), "model_type": family, "architectures": config.get("architectures"),
                       **(source_note or {})},
        })
        return model, conversion

    model, conversion = write_folder_atomically(out, fill)
    if report is not None:
        for line in conversion.report:
            report(line)
        parameters = sum(t.numel() for t in model.parameters())
        report(f"converted {src} ({family}, {len(weights)} tensors) -> {out} (--arch {arch}"
               + "".join(f" --{k.replace('_', '-')} {v}" for k, v in model_args.items())
               + f", pooling {pooling}, {parameters:,} parameters)")
    return out
