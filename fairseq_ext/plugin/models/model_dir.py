"""The model folder: what GLUE data preparation, train.py runs and prediction read.

A model folder holds a fairseq checkpoint (model.pt), its dict.txt and its
tokenizer files.  ``python -m fairseq_ext.tools.convert_hf`` also writes
model_info.json, which names them (paths relative to the folder) and says how to
use the model:

    {"family": "bert", "arch": "bert_minilm_l6_h384", "model_args": {},
     "checkpoint": "model.pt", "dictionary": "dict.txt",
     "bpe_args": {"bpe": "wordpiece", "wordpiece_vocab": "vocab.txt", "wordpiece_lowercase": true},
     "pair_separator": false, "pooling": "mean"}

Without model_info.json (a fairseq RoBERTa release: model.pt, dict.txt,
encoder.json, vocab.bpe) the tokenizer is inferred from the files present and
the arch from the checkpoint's config.
"""
import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Union

from fairseq.data import encoders
from fairseq.models import ARCH_MODEL_NAME_REGISTRY

from ...core.errors import UserError
from ...core.files import require_file
from ..checkpoints import read_checkpoint_model_config
from ..data import wordpiece_bpe  # noqa: F401  (registers --bpe wordpiece)
from .bert import POOLING_CHOICES
from .build import options_beyond_arch

MODEL_INFO = "model_info.json"
FORMAT_VERSION = 1
FAMILIES = ("bert", "roberta")
# Decoder-only folders (hf_lm_import): train.py --task language_modeling reads them, not the encoder tools.
LANGUAGE_MODEL_FAMILIES = ("opt",)
# fairseq BPE options that name a file; model_info.json holds them relative to the folder.
BPE_FILE_OPTIONS = ("wordpiece_vocab", "gpt2_encoder_json", "gpt2_vocab_bpe", "sentencepiece_model")
# fairseq models that are RoBERTa encoders (same classification interface and pair format).
ROBERTA_MODELS = ("roberta", "xlmr", "camembert", "gottbert")


@dataclass(frozen=True)
class ModelDir:
    path: str  # absolute
    checkpoint: str  # absolute path of model.pt
    dictionary: str  # absolute path of dict.txt
    arch: str  # train.py --arch
    family: str  # "bert" or "roberta"
    bpe_args: Dict[str, object]  # fairseq BPE options, file paths absolute
    pair_separator: bool  # sentence pairs as "<s> a </s> </s> b </s>" (roberta), else "<s> a </s> b </s>"
    pooling: str  # "first" or "mean": how classification heads pool (bert --pooling)
    model_args: Dict[str, object] = field(default_factory=dict)  # options the arch does not default

    def arch_args(self) -> List[str]:
        """train.py options that build this checkpoint's model: --arch, model_args, --pooling."""
        args = ["--arch", self.arch]
        for key, value in self.model_args.items():
            flag = "--" + key.replace("_", "-")
            if value is True:
                args.append(flag)
            elif value is not False and value is not None:
                args += [flag, str(value)]
        if self.family == "bert":
            args += ["--pooling", self.pooling]
        return args


def write_model_info(folder: Union[str, Path], info: Dict[str, object]) -> None:
    """Write model_info.json (paths in ``info`` relative to ``folder``)."""
    with open(Path(folder) / MODEL_INFO, "w", encoding="utf-8") as info_file:
        json.dump({"format_version": FORMAT_VERSION, **info}, info_file, indent=2)
        info_file.write("\n")


def load_model_dir(path: Union[str, Path]) -> ModelDir:
    """Read a model folder: model_info.json if present, else what its files imply."""
    folder = Path(path).resolve()
    if not folder.is_dir():
        raise UserError(f"{path}: no such model folder")
    info_path = folder / MODEL_INFO
    info = _read_model_info(info_path) if info_path.is_file() else _infer_model_info(folder)
    checkpoint = require_file(folder, info.get("checkpoint", "model.pt"), "the fairseq checkpoint")
    dictionary = require_file(folder, info.get("dictionary", "dict.txt"), "the fairseq dictionary")
    bpe_args = dict(info["bpe_args"])
    for option in BPE_FILE_OPTIONS:
        if option in bpe_args:
            bpe_args[option] = str(require_file(folder, bpe_args[option], f"--{option.replace('_', '-')}"))
    return ModelDir(
        path=str(folder),
        checkpoint=str(checkpoint),
        dictionary=str(dictionary),
        arch=info["arch"],
        family=info["family"],
        bpe_args=bpe_args,
        pair_separator=bool(info.get("pair_separator", info["family"] == "roberta")),
        pooling=info.get("pooling", "first"),
        model_args=dict(info.get("model_args") or {}),
    )


def build_bpe(model_dir: Union[ModelDir, str, Path]):
    """The fairseq BPE object (``encode(str) -> str``) of a model folder, offline."""
    if not isinstance(model_dir, ModelDir):
        model_dir = load_model_dir(model_dir)
    return encoders.build_bpe(argparse.Namespace(**model_dir.bpe_args))


def _read_model_info(path: Path) -> Dict[str, object]:
    try:
        with open(path, encoding="utf-8") as info_file:
            info = json.load(info_file)
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read: {error}") from None
    if not isinstance(info, dict):
        raise UserError(f"{path}: expected a JSON object")
    for key in ("family", "arch", "bpe_args"):
        if key not in info:
            raise UserError(f"{path}: no {key!r}")
    if info["family"] in LANGUAGE_MODEL_FAMILIES:
        raise UserError(f"{path}: a decoder-only language model ({info['family']}); GLUE data, predict and serve "
                        "need an encoder: train it with train.py --task language_modeling (docs/language_models.md)")
    if info["family"] not in FAMILIES:
        raise UserError(f"{path}: family {info['family']!r} is not one of {', '.join(FAMILIES)}")
    if info.get("pooling", "first") not in POOLING_CHOICES:
        raise UserError(f"{path}: pooling {info['pooling']!r} is not one of {', '.join(POOLING_CHOICES)}")
    if not isinstance(info["bpe_args"], dict) or "bpe" not in info["bpe_args"]:
        raise UserError(f"{path}: bpe_args must be an object with a 'bpe' key")
    return info


def _infer_model_info(folder: Path) -> Dict[str, object]:
    """model_info for a folder without one, e.g. a fairseq RoBERTa release."""
    if (folder / "encoder.json").is_file() or (folder / "vocab.bpe").is_file():
        bpe_args = {"bpe": "gpt2", "gpt2_encoder_json": "encoder.json", "gpt2_vocab_bpe": "vocab.bpe"}
    elif (folder / "sentencepiece.bpe.model").is_file():
        bpe_args = {"bpe": "sentencepiece", "sentencepiece_model": "sentencepiece.bpe.model"}
    elif (folder / "vocab.txt").is_file():
        bpe_args = {"bpe": "wordpiece", "wordpiece_vocab": "vocab.txt"}
        lowercase = _read_json_if_present(folder / "tokenizer_config.json").get("do_lower_case")
        if isinstance(lowercase, bool):
            bpe_args["wordpiece_lowercase"] = lowercase
    else:
        raise UserError(f"{folder}: missing the tokenizer (encoder.json + vocab.bpe, sentencepiece.bpe.model "
                        f"or vocab.txt) and no {MODEL_INFO}")
    checkpoint = require_file(folder, "model.pt", "the fairseq checkpoint")
    model_cfg = read_checkpoint_model_config(checkpoint)
    arch = model_cfg.get("_name") or model_cfg.get("arch")
    model = ARCH_MODEL_NAME_REGISTRY.get(arch)
    if model == "bert":
        family = "bert"
    elif model in ROBERTA_MODELS:
        family = "roberta"
    else:
        raise UserError(f"{checkpoint}: arch {arch!r} is not a BERT or RoBERTa encoder")
    return {"family": family, "arch": arch, "bpe_args": bpe_args, "pair_separator": family == "roberta",
            "pooling": model_cfg.get("pooling") or "first", "model_args": options_beyond_arch(arch, model_cfg)}


def _read_json_if_present(path: Path) -> Dict[str, object]:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as json_file:
            value = json.load(json_file)
    except (OSError, ValueError) as error:
        raise UserError(f"{path}: cannot read: {error}") from None
    return value if isinstance(value, dict) else {}
