"""Building a fairseq model from a config alone: no task, no data, no training run.

The converter fills a freshly built model with imported weights, a delta merge
rebuilds the model a delta was trained on, and model folders record the options
their checkpoint needs beyond its ``--arch``.  All of them build through here.
"""
import argparse
from typing import Dict

from fairseq.data import Dictionary
from fairseq.models import ARCH_CONFIG_REGISTRY, ARCH_MODEL_REGISTRY

from ...core.errors import UserError

# Model options that set the network's shape or arithmetic: to load a checkpoint strictly,
# train.py needs the checkpoint's value wherever its --arch default differs.
STRUCTURE_OPTIONS = ("encoder_layers", "encoder_embed_dim", "encoder_attention_heads", "encoder_ffn_embed_dim",
                     "max_positions", "type_vocab_size", "layer_norm_eps", "activation_fn",
                     "encoder_normalize_before", "layernorm_embedding", "untie_weights_roberta")
# Options of the classification heads a model registers.
HEAD_OPTIONS = ("pooling", "pooler_activation_fn", "spectral_norm_classification_head")
# What two task deltas must agree on to share one base model in memory.
SHARED_MODEL_OPTIONS = ("arch", *STRUCTURE_OPTIONS, *HEAD_OPTIONS)
# The same for encoder-decoder models (fairseq's transformer and bart archs): the options that set
# their network's shape or arithmetic, decoder and embedding sharing included.
SEQ2SEQ_MODEL_OPTIONS = (
    "arch", "encoder_layers", "encoder_embed_dim", "encoder_ffn_embed_dim", "encoder_attention_heads",
    "encoder_normalize_before", "encoder_learned_pos", "decoder_layers", "decoder_embed_dim",
    "decoder_ffn_embed_dim", "decoder_attention_heads", "decoder_normalize_before", "decoder_learned_pos",
    "decoder_output_dim", "share_decoder_input_output_embed", "share_all_embeddings", "layernorm_embedding",
    "no_scale_embedding", "no_token_positional_embeddings", "activation_fn", "max_source_positions",
    "max_target_positions", "no_cross_attention", "cross_self_attention", "adaptive_softmax_cutoff")


class DictionaryOnlyTask:
    """What fairseq's build_model needs from a task, for building the model to fill: the
    dictionary, and a seq2seq model's target dictionary."""

    def __init__(self, dictionary, target_dictionary=None):
        self.source_dictionary = dictionary
        self.target_dictionary = target_dictionary

    def max_positions(self):
        return None


def build_fairseq_model(model_cfg: Dict[str, object], dictionary, target_dictionary=None):
    """The registered ``model_cfg["arch"]`` built from ``model_cfg``; weights are random until loaded."""
    model_class = ARCH_MODEL_REGISTRY[model_cfg["arch"]]
    return model_class.build_model(argparse.Namespace(**model_cfg), DictionaryOnlyTask(dictionary, target_dictionary))


def architecture_config(arch: str, /, **explicit) -> Dict[str, object]:
    """Every option of the registered fairseq ``arch``: ``explicit`` values, its defaults for the rest."""
    args = argparse.Namespace(**explicit)
    ARCH_CONFIG_REGISTRY[arch](args)
    return vars(args)


def options_beyond_arch(arch: str, model_cfg: Dict[str, object]) -> Dict[str, object]:
    """The structural options of ``model_cfg`` that ``--arch arch`` alone would not reproduce."""
    defaults = architecture_config(arch)
    # fairseq's roberta archs leave max_positions to the task; their position table defaults to 512.
    defaults.setdefault("max_positions", defaults.get("max_source_positions"))
    return {key: model_cfg[key] for key in STRUCTURE_OPTIONS
            if model_cfg.get(key) is not None and model_cfg[key] != defaults.get(key)}


def placeholder_dictionary(identity: dict) -> Dictionary:
    """A Dictionary with a recorded size and special indices: all a model's construction reads."""
    dictionary = Dictionary()
    specials = (dictionary.bos(), dictionary.pad(), dictionary.eos(), dictionary.unk())
    if specials != tuple(identity[key] for key in ("bos", "pad", "eos", "unk")):
        raise UserError(f"the dictionary has non-standard special tokens {identity}; "
                        "the model cannot be rebuilt without its dict.txt")
    for index in range(len(dictionary), identity["size"]):
        dictionary.add_symbol(f"<placeholder{index}>")
    return dictionary
