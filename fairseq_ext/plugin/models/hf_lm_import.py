"""A Hugging Face OPT folder into a fairseq ``transformer_lm`` model folder, offline and exact.

    python -m fairseq_ext.tools.convert_hf SRC_DIR OUT_DIR      (config.json's model_type "opt")

OPT was trained with metaseq, a fairseq descendant, and maps onto fairseq's ``transformer_lm``
one tensor for one tensor: learned positions after the padding index (OPT's offset of 2 is
fairseq's ``padding_idx + 1``), no embedding scaling (``--no-scale-embedding``), pre- or post-LN
(``--decoder-normalize-before``), the final LayerNorm, the optional ``project_in``/``project_out``
of OPT-350m (``--decoder-input-dim``/``--decoder-output-dim``), q scaled by head_dim**-0.5 after
its bias, and a tied output projection.  OPT's vocabulary is fairseq's: ``<s> <pad> </s> <unk>``
at ids 0-3, so a fairseq index *is* the OPT token id and the logits over the vocabulary are
OPT's, position for position (tests/test_lm_import.py measures it against transformers).

OUT_DIR gets model.pt (a model-only checkpoint, config as plain values), dict.txt (symbol ``i``
for id ``i``; ``madeupwordNNNN`` for the rows the embedding has beyond vocab.json, fairseq's own
padding symbols), encoder.json + vocab.bpe (fairseq's ``gpt2`` BPE, offline) and model_info.json
(family "opt", the train.py options beyond ``--arch transformer_lm``).

GPT-2 is refused: its network maps exactly too, but its only special token is ``<|endoftext|>``,
and fairseq's dictionary always adds ``<s>``, ``<pad>``, ``<unk>`` beside it: fairseq's softmax
would run over three symbols GPT-2 lacks, so its probabilities could not be GPT-2's.
"""
import json
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch
from fairseq.data import Dictionary
from fairseq.dataclass.configs import FairseqConfig
from fairseq.models.transformer_lm import TransformerLanguageModelConfig
from fairseq.tasks.language_modeling import LanguageModelingConfig
from omegaconf import OmegaConf

from ...core.errors import UserError
from ...core.files import require_file, write_folder_atomically
from ..checkpoints import model_only_checkpoint
from .build import architecture_config, build_fairseq_model
from .hf_import import ACTIVATIONS, GPT2_BPE_ARGS, convert, gpt2_bpe_files, load_weights, read_json, write_dictionary
from .model_dir import write_model_info

LANGUAGE_MODEL_TYPES = ("opt",)
ARCH = "transformer_lm"
# fairseq's Dictionary ids 0-3, by name: OPT's vocab.json holds them at the same ids.
FAIRSEQ_SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
GPT2_REFUSAL = ("gpt2 is not imported: fairseq's dictionary adds <s>, <pad> and <unk> beside GPT-2's single "
                "<|endoftext|>, so fairseq's softmax would cover three symbols GPT-2 lacks and its probabilities "
                "could not equal GPT-2's (docs/language_models.md)")
# Options that set a transformer_lm's shape or arithmetic: train.py needs each one that differs
# from --arch transformer_lm's default to build the model model.pt fills.
STRUCTURE_OPTIONS = ("decoder_layers", "decoder_embed_dim", "decoder_input_dim", "decoder_output_dim",
                     "decoder_ffn_embed_dim", "decoder_attention_heads", "activation_fn", "decoder_normalize_before",
                     "no_decoder_final_norm", "decoder_learned_pos", "no_scale_embedding",
                     "share_decoder_input_output_embed", "max_target_positions")
# OPT module inside decoder.layers.N -> the same name in fairseq; outside the layers:
LAYER_MODULES = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.out_proj",
                 "self_attn_layer_norm", "fc1", "fc2", "final_layer_norm")
MODULES = {"decoder.embed_tokens": "decoder.embed_tokens", "decoder.embed_positions": "decoder.embed_positions",
           "decoder.final_layer_norm": "decoder.layer_norm", "decoder.project_in": "decoder.project_in_dim",
           "decoder.project_out": "decoder.project_out_dim", "lm_head": "decoder.output_projection"}


def language_model_type(src_dir) -> Optional[str]:
    """config.json's model_type if the folder holds a decoder-only LM this package knows of, else None
    (a missing or unreadable config is left to the encoder import, which names it)."""
    config_path = Path(src_dir) / "config.json"
    if not config_path.is_file():
        return None
    try:
        model_type = json.loads(config_path.read_text(encoding="utf-8")).get("model_type")
    except (OSError, ValueError, AttributeError):
        return None
    return model_type if model_type in (*LANGUAGE_MODEL_TYPES, "gpt2") else None


def convert_hf_folder(src_dir, out_dir, pooling: Optional[str] = None,
                      report: Optional[Callable[[str], None]] = print) -> Path:
    """``tools.convert_hf``: an OPT folder as a language model, BERT/RoBERTa as encoders."""
    model_type = language_model_type(src_dir)
    if model_type == "gpt2":
        config = read_json(Path(src_dir) / "config.json")
        architectures = ", ".join(config.get("architectures") or []) or "none listed"
        raise UserError(f"{Path(src_dir) / 'config.json'}: unsupported model_type 'gpt2' (architectures: "
                        f"{architectures}); supported: bert, roberta encoders, opt language models; {GPT2_REFUSAL}")
    if model_type is None:
        return convert(src_dir, out_dir, pooling=pooling, report=report)
    if pooling is not None:
        raise UserError(f"--pooling {pooling}: {src_dir} is a language model ({model_type}); it has no "
                        "classification heads to pool for")
    return convert_language_model(src_dir, out_dir, report=report)


def structure_args(config: dict, config_path: Path) -> Dict[str, object]:
    """transformer_lm options from an OPT config.json; one line for what fairseq cannot build exactly."""

    def get(key):
        if key not in config:
            raise UserError(f"{config_path}: no {key}")
        return config[key]

    activation = config.get("activation_function", "relu")
    if activation not in ACTIVATIONS:
        raise UserError(f"{config_path}: activation_function {activation!r} is not supported ({', '.join(ACTIVATIONS)})")
    if config.get("enable_bias", True) is not True:
        raise UserError(f"{config_path}: enable_bias false: the model has no bias terms for BitFit to train")
    if config.get("layer_norm_elementwise_affine", True) is not True:
        raise UserError(f"{config_path}: layer_norm_elementwise_affine false is not supported (fairseq's "
                        "LayerNorms have a weight and a bias)")
    if config.get("pad_token_id", 1) != 1:
        raise UserError(f"{config_path}: pad_token_id {config['pad_token_id']} is not supported (fairseq's "
                        "positions and padding assume 1)")
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    if hidden % heads:
        raise UserError(f"{config_path}: hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    word_dim = config.get("word_embed_proj_dim") or hidden
    return {
        "decoder_layers": get("num_hidden_layers"),
        "decoder_embed_dim": hidden,
        "decoder_input_dim": word_dim,  # != hidden: fairseq's project_in_dim / project_out_dim
        "decoder_output_dim": word_dim,
        "decoder_ffn_embed_dim": get("ffn_dim"),
        "decoder_attention_heads": heads,
        "activation_fn": ACTIVATIONS[activation],
        "decoder_normalize_before": bool(config.get("do_layer_norm_before", True)),
        # OPT keeps its final LayerNorm only when pre-LN and not _remove_final_layer_norm, as fairseq does.
        "no_decoder_final_norm": bool(config.get("_remove_final_layer_norm", False)),
        "decoder_learned_pos": True,
        "no_scale_embedding": True,
        "share_decoder_input_output_embed": config.get("tie_word_embeddings", True) is not False,
        "max_target_positions": get("max_position_embeddings"),
    }


def lm_vocabulary(folder: Path, vocab_size: int):
    """(dict.txt symbols for ids 4.., the BPE file writers), checking OPT's id layout."""
    vocab_path = require_file(folder, "vocab.json", "the byte-level BPE vocab of an OPT model")
    merges_path = require_file(folder, "merges.txt", "the byte-level BPE merges of an OPT model")
    ids_by_token = read_json(vocab_path, "the BPE vocab")
    if not isinstance(ids_by_token, dict) or len(set(ids_by_token.values())) != len(ids_by_token):
        raise UserError(f"{vocab_path}: expected a JSON object mapping each token to a distinct id")
    for fairseq_id, token in enumerate(FAIRSEQ_SPECIALS):
        if ids_by_token.get(token) != fairseq_id:
            raise UserError(f"{vocab_path}: {token} has id {ids_by_token.get(token)}; fairseq's dictionary needs it "
                            f"at {fairseq_id} (<s> <pad> </s> <unk> at 0-3, as in OPT)")
    tokens = {i: token for token, i in ids_by_token.items()}
    if max(tokens) >= vocab_size:
        raise UserError(f"{vocab_path}: token {tokens[max(tokens)]!r} has id {max(tokens)}, beyond config.json's "
                        f"vocab_size {vocab_size}")
    # Rows without a token (the embedding padded to a round size) get fairseq's padding symbols.
    symbols = [str(i) if i in tokens else f"madeupword{i:04d}" for i in range(len(FAIRSEQ_SPECIALS), vocab_size)]
    return symbols, gpt2_bpe_files(ids_by_token, set(FAIRSEQ_SPECIALS), merges_path), str(vocab_path)


def fairseq_name(name: str) -> Optional[str]:
    """The transformer_lm parameter for an OPT tensor (with or without OPTForCausalLM's ``model.``)."""
    name = name[len("model."):] if name.startswith("model.") else name
    module, _, kind = name.rpartition(".")
    parts = module.split(".", 3)
    if len(parts) == 4 and parts[:2] == ["decoder", "layers"] and parts[3] in LAYER_MODULES:
        return f"{module}.{kind}"
    return f"{MODULES[module]}.{kind}" if module in MODULES else None


def map_weights(weights: Dict[str, torch.Tensor], expected: Dict[str, torch.Tensor], tied: bool,
                weights_path: Path) -> Dict[str, torch.Tensor]:
    """OPT tensors -> the transformer_lm state dict; fails on any tensor left on either side."""
    state = {}
    for name, tensor in weights.items():
        target = fairseq_name(name)
        if target == "decoder.output_projection.weight" and tied:
            continue  # the embedding, checked below
        if target not in expected:
            raise UserError(f"{weights_path}: {name} has no place in fairseq's transformer_lm"
                            + (f" ({target})" if target else "") + " (task models are not supported)")
        if tuple(tensor.shape) != tuple(expected[target].shape):
            raise UserError(f"{weights_path}: {name} has shape {tuple(tensor.shape)}, but config.json gives a "
                            f"model whose {target} has shape {tuple(expected[target].shape)}")
        state[target] = tensor
    lm_head = next((t for n, t in weights.items() if fairseq_name(n) == "decoder.output_projection.weight"), None)
    if tied:
        if lm_head is not None and "decoder.embed_tokens.weight" in state \
                and not torch.equal(lm_head, state["decoder.embed_tokens.weight"]):
            raise UserError(f"{weights_path}: lm_head.weight differs from the token embeddings although "
                            "config.json ties them")
        if "decoder.embed_tokens.weight" in state:
            state["decoder.output_projection.weight"] = state["decoder.embed_tokens.weight"]
    state.setdefault("decoder.version", expected["decoder.version"])
    missing = [name for name in expected if name not in state]
    if missing:
        raise UserError(f"{weights_path}: no tensor for {len(missing)} parameters of fairseq's transformer_lm, "
                        f"e.g. {missing[0]}")
    return state


def model_config(structure: Dict[str, object], config: dict) -> Dict[str, object]:
    """Every transformer_lm option, as plain values: building from model.pt needs no defaults."""
    defaults = OmegaConf.to_container(OmegaConf.structured(TransformerLanguageModelConfig), resolve=False,
                                      enum_to_str=True)
    # The dataclass takes these from the task; a model file stands alone.
    defaults.update(add_bos_token=False, tokens_per_sample=structure["max_target_positions"], tpu=False)
    return architecture_config(ARCH, **{**defaults, **structure, "_name": ARCH, "arch": ARCH,
                                        "dropout": config.get("dropout", 0.1),
                                        "attention_dropout": config.get("attention_dropout", 0.0),
                                        "activation_dropout": config.get("activation_dropout", 0.0),
                                        "decoder_layerdrop": config.get("layerdrop", 0.0)})


def checkpoint_config(model_cfg: Dict[str, object]) -> Dict[str, object]:
    """fairseq's whole config with its defaults, the language_modeling task and ``model_cfg``, as plain
    values: fairseq's hub and ``tools.eval_lm --path`` set up everything from a checkpoint's config."""
    cfg = OmegaConf.structured(FairseqConfig)
    cfg.task = OmegaConf.structured(LanguageModelingConfig(tokens_per_sample=model_cfg["max_target_positions"]))
    cfg.task._name = "language_modeling"
    plain = OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)
    return {**plain, "model": model_cfg}


def options_beyond_arch(model_cfg: Dict[str, object]) -> Dict[str, object]:
    """The structural options train.py needs beyond ``--arch transformer_lm`` (its dataclass defaults)."""
    defaults = TransformerLanguageModelConfig()
    return {key: model_cfg[key] for key in STRUCTURE_OPTIONS if model_cfg[key] != getattr(defaults, key)}


def check_dictionary(path: Path, symbols: List[str], vocab_file: str) -> Dictionary:
    """dict.txt read back as fairseq's language_modeling task reads it, every symbol kept."""
    dictionary = Dictionary.load(str(path))
    if dictionary.symbols[dictionary.nspecial:] != symbols:
        raise UserError(f"{vocab_file}: some tokens do not survive fairseq's dict.txt format")
    return dictionary


def convert_language_model(src_dir, out_dir, report: Optional[Callable[[str], None]] = print) -> Path:
    """Import the Hugging Face OPT folder ``src_dir`` into the fairseq model folder ``out_dir``."""
    src, out = Path(src_dir).resolve(), Path(out_dir).resolve()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out_dir}: already exists; give a new or empty folder")
    config_path = require_file(src, "config.json", "a Hugging Face model folder has config.json and model weights")
    config = read_json(config_path, "the model config")
    structure = structure_args(config, config_path)
    vocab_size = config.get("vocab_size")
    if not isinstance(vocab_size, int) or vocab_size <= len(FAIRSEQ_SPECIALS):
        raise UserError(f"{config_path}: vocab_size {vocab_size!r} is not a vocabulary size")
    symbols, bpe_files, vocab_file = lm_vocabulary(src, vocab_size)
    weights, weights_path = load_weights(src)
    model_cfg = model_config(structure, config)
    model_args = options_beyond_arch(model_cfg)

    def fill(staging: Path):
        write_dictionary(staging / "dict.txt", symbols)
        model = build_fairseq_model(model_cfg, check_dictionary(staging / "dict.txt", symbols, vocab_file))
        model.load_state_dict(map_weights(weights, model.state_dict(), structure["share_decoder_input_output_embed"],
                                          weights_path), strict=True)
        for name, write in bpe_files.items():
            write(staging)
        torch.save(model_only_checkpoint(checkpoint_config(model_cfg), model.state_dict()), staging / "model.pt")
        write_model_info(staging, {
            "family": "opt", "arch": ARCH, "model_args": model_args, "checkpoint": "model.pt",
            "dictionary": "dict.txt", "bpe_args": dict(GPT2_BPE_ARGS),
            "source": {"path": str(src), "model_type": "opt", "architectures": config.get("architectures")},
        })
        return sum(t.numel() for t in model.parameters())

    parameters = write_folder_atomically(out, fill)
    if report is not None:
        flags = "".join(f" --{key.replace('_', '-')}" + ("" if value is True else f" {value}")
                        for key, value in model_args.items())
        report(f"converted {src} (opt, {len(weights)} tensors) -> {out}: {parameters:,} parameters; "
               f"train.py --task language_modeling --arch {ARCH}{flags}")
    return out
