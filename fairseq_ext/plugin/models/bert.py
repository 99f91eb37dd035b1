"""BERT-family encoders (BERT, MiniLM, ...) as the fairseq model ``bert``.

The model is fairseq's RoBERTa with BERT's differences added, so fairseq's
sentence_prediction task and criterion, and train.py, use it unchanged:

* token-type (segment) embeddings, derived from ``src_tokens``: 0 up to and
  including the first ``</s>`` ([SEP]), 1 after it;
* LayerNorm eps from the checkpoint's config (1e-12 for BERT; fairseq uses 1e-5);
* BERT's pretrained pooler (dense+tanh over [CLS]), kept so every checkpoint
  weight has a place; classification heads pool on their own;
* classification heads that pool the first token (RoBERTa, BERT) or the masked
  mean of all tokens (sentence-transformers checkpoints such as all-MiniLM);
* an optional MLM head (``--bert-lm-head``).

Layers are fairseq's TransformerEncoderLayer with normalize_before=False, which
is BERT's post-LayerNorm order; fairseq's "gelu" is the exact (erf) GELU.
"""
import logging

import torch
from torch import nn

from fairseq.models import register_model, register_model_architecture
from fairseq.models.roberta.model import RobertaClassificationHead, RobertaEncoder, RobertaModel
from fairseq.models.roberta.model import base_architecture as roberta_base_architecture
from fairseq.models.transformer import TransformerEncoder
from fairseq.modules.transformer_sentence_encoder import init_bert_params
from fairseq.utils import safe_getattr
from omegaconf import OmegaConf

from ...core.errors import UserError

logger = logging.getLogger(__name__)

POOLING_CHOICES = ("first", "mean")


def segment_ids(src_tokens: torch.Tensor, eos: int, num_segments: int) -> torch.Tensor:
    """BERT token types for ``<s> a </s> b </s>``: 0 through the first ``</s>``, then 1."""
    is_eos = src_tokens.eq(eos).long()
    eos_before = is_eos.cumsum(dim=1) - is_eos
    return eos_before.clamp(max=1).clamp(max=num_segments - 1)


def masked_mean(features: torch.Tensor, padding_mask: torch.Tensor) -> torch.Tensor:
    """Mean over non-pad positions of ``features`` (B x T x C), as sentence-transformers pools."""
    keep = (~padding_mask).unsqueeze(-1).type_as(features)
    return (features * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1e-9)


def use_layer_norm_eps(module: nn.Module, eps: float) -> None:
    """Give every LayerNorm under ``module`` the checkpoint's eps (fairseq builds them with 1e-5)."""
    for submodule in module.modules():
        if hasattr(submodule, "normalized_shape") and hasattr(submodule, "eps"):
            submodule.eps = eps


class BertSentenceEncoder(TransformerEncoder):
    """fairseq's TransformerEncoder plus BERT's token-type embeddings."""

    def __init__(self, args, dictionary, embed_tokens):
        super().__init__(args, dictionary, embed_tokens)
        self.eos_idx = dictionary.eos()
        self.num_segments = args.type_vocab_size
        self.segment_embeddings = (
            nn.Embedding(args.type_vocab_size, embed_tokens.embedding_dim) if args.type_vocab_size > 0 else None
        )

    def forward_embedding(self, src_tokens, token_embedding=None):
        if token_embedding is None:
            token_embedding = self.embed_tokens(src_tokens)
        if self.segment_embeddings is not None:
            # BERT sums token, position and segment embeddings before the embedding LayerNorm;
            # fairseq's forward_embedding adds positions to what it is given (embed_scale is 1).
            segments = segment_ids(src_tokens, self.eos_idx, self.num_segments)
            token_embedding = token_embedding + self.segment_embeddings(segments)
        return super().forward_embedding(src_tokens, token_embedding)


class BertPooler(nn.Module):
    """BERT's pretrained pooler: dense + tanh over the first token."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.dense = nn.Linear(embed_dim, embed_dim)
        self.activation = nn.Tanh()

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.activation(self.dense(features[:, 0]))


class BertEncoder(RobertaEncoder):
    """RoBERTa's encoder wrapper with BERT's sentence encoder, pooler and optional MLM head."""

    def __init__(self, args, dictionary):
        super().__init__(args, dictionary)
        # Not on the classification path (heads pool on their own); pooled_output() exposes it.
        self.pooler = BertPooler(args.encoder_embed_dim)
        use_layer_norm_eps(self, args.layer_norm_eps)

    def build_encoder(self, args, dictionary, embed_tokens):
        encoder = BertSentenceEncoder(args, dictionary, embed_tokens)
        encoder.apply(init_bert_params)
        return encoder

    def build_lm_head(self, embed_dim, output_dim, activation_fn, weight):
        # Fine-tuning never uses the MLM head: leaving it out spares memory and keeps DDP free
        # of unused trainable parameters.
        if not self.args.bert_lm_head:
            return None
        return super().build_lm_head(embed_dim, output_dim, activation_fn, weight)

    def output_layer(self, features, masked_tokens=None, **unused):
        if self.lm_head is None:
            raise UserError("--arch bert: this model has no MLM head; pass --bert-lm-head to predict tokens")
        return super().output_layer(features, masked_tokens=masked_tokens)

    def pooled_output(self, features: torch.Tensor) -> torch.Tensor:
        """BERT's pooled [CLS] vector (pretrained dense + tanh) for B x T x C features."""
        return self.pooler(features)


class BertClassificationHead(RobertaClassificationHead):
    """RoBERTa's head (dropout, dense, tanh, dropout, out_proj) over a pooled vector."""

    def __init__(self, *args, pooling: str = "first", **kwargs):
        super().__init__(*args, **kwargs)
        if pooling not in POOLING_CHOICES:
            raise UserError(f"--pooling {pooling!r}: choose one of {', '.join(POOLING_CHOICES)}")
        self.pooling = pooling

    def forward(self, features, padding_mask=None, **kwargs):
        if self.pooling == "mean":
            if padding_mask is None:
                padding_mask = features.new_zeros(features.shape[:2], dtype=torch.bool)
            # RobertaClassificationHead reads position 0: hand it the mean as a 1-token sequence.
            features = masked_mean(features, padding_mask).unsqueeze(1)
        return super().forward(features)


@register_model("bert")
class BertModel(RobertaModel):
    """BERT-family encoder with RoBERTa's interface (classification heads, forward, upgrades)."""

    @classmethod
    def hub_models(cls):
        return {}

    @staticmethod
    def add_args(parser):
        RobertaModel.add_args(parser)
        parser.add_argument("--type-vocab-size", type=int, metavar="N",
                            help="number of token-type (segment) embeddings; 0 for none")
        parser.add_argument("--layer-norm-eps", type=float, metavar="EPS",
                            help="LayerNorm epsilon (BERT: 1e-12)")
        parser.add_argument("--pooling", choices=POOLING_CHOICES,
                            help="how classification heads pool the tokens: first ([CLS]) or mean "
                                 "(masked mean, as sentence-transformers)")
        parser.add_argument("--bert-lm-head", action="store_true",
                            help="build the masked-LM head (needed for masked_lm, not for fine-tuning)")

    @classmethod
    def build_model(cls, args, task):
        if OmegaConf.is_config(args):
            OmegaConf.set_struct(args, False)
        base_architecture(args)
        encoder = BertEncoder(args, task.source_dictionary)
        if OmegaConf.is_config(args):
            OmegaConf.set_struct(args, True)
        return cls(args, encoder)

    def forward(self, src_tokens, features_only=False, return_all_hiddens=False,
                classification_head_name=None, **kwargs):
        if classification_head_name is not None:
            features_only = True
        x, extra = self.encoder(src_tokens, features_only, return_all_hiddens, **kwargs)
        if classification_head_name is not None:
            padding_mask = src_tokens.eq(self.encoder.sentence_encoder.padding_idx)
            x = self.classification_heads[classification_head_name](x, padding_mask=padding_mask)
        return x, extra

    def register_classification_head(self, name, num_classes=None, inner_dim=None, pooling=None, **kwargs):
        """Register a classification head; ``pooling`` defaults to the model's ``--pooling``."""
        inner_dim = inner_dim or self.args.encoder_embed_dim
        if name in self.classification_heads:
            previous = self.classification_heads[name]
            if (num_classes, inner_dim) != (previous.out_proj.out_features, previous.dense.out_features):
                logger.warning(f're-registering head "{name}" with num_classes {num_classes} '
                               f"(prev: {previous.out_proj.out_features}) and inner_dim {inner_dim} "
                               f"(prev: {previous.dense.out_features})")
        self.classification_heads[name] = BertClassificationHead(
            input_dim=self.args.encoder_embed_dim,
            inner_dim=inner_dim,
            num_classes=num_classes,
            activation_fn=self.args.pooler_activation_fn,
            pooler_dropout=self.args.pooler_dropout,
            q_noise=self.args.quant_noise_pq,
            qn_block_size=self.args.quant_noise_pq_block_size,
            do_spectral_norm=self.args.spectral_norm_classification_head,
            pooling=pooling or self.args.pooling,
        )

    def upgrade_state_dict_named(self, state_dict, name):
        # RoBERTa's upgrade adds this model's classification heads when the checkpoint (a
        # pretrained encoder) has none, so --restore-file loads strictly.
        super().upgrade_state_dict_named(state_dict, name)
        lm_head = (name + "." if name else "") + "encoder.lm_head."
        if self.encoder.lm_head is None:
            dropped = [key for key in state_dict if key.startswith(lm_head)]
            for key in dropped:
                del state_dict[key]
            if dropped:
                logger.info("not loading the checkpoint's MLM head (pass --bert-lm-head to keep it)")
        else:
            for key, value in self.encoder.lm_head.state_dict().items():
                if lm_head + key not in state_dict:
                    logger.info(f"the checkpoint has no {lm_head + key}: keeping its initial value")
                    state_dict[lm_head + key] = value


def bert_architecture(name: str, **defaults):
    """Register architecture ``name``: ``defaults`` over the BERT-base ones.

    bert_base and bert_large are free to take once patches.install() has run (the plugin's
    registration runs it first): fairseq's deprecated masked_lm model registers them too.
    """

    def architecture(args):
        for key, value in defaults.items():
            setattr(args, key, safe_getattr(args, key, value))
        base_architecture(args)

    architecture.__name__ = f"{name}_architecture"
    return register_model_architecture("bert", name)(architecture)


@register_model_architecture("bert", "bert")
def base_architecture(args):
    args.encoder_layers = safe_getattr(args, "encoder_layers", 12)
    args.encoder_embed_dim = safe_getattr(args, "encoder_embed_dim", 768)
    args.encoder_ffn_embed_dim = safe_getattr(args, "encoder_ffn_embed_dim", 3072)
    args.encoder_attention_heads = safe_getattr(args, "encoder_attention_heads", 12)
    args.max_positions = safe_getattr(args, "max_positions", 512)
    args.type_vocab_size = safe_getattr(args, "type_vocab_size", 2)
    args.layer_norm_eps = safe_getattr(args, "layer_norm_eps", 1e-12)
    args.pooling = safe_getattr(args, "pooling", "first")
    args.bert_lm_head = safe_getattr(args, "bert_lm_head", False)
    # BERT fine-tuning applies hidden_dropout_prob (0.1) before its classifier.
    args.pooler_dropout = safe_getattr(args, "pooler_dropout", 0.1)
    # The rest is RoBERTa's, which is BERT's: learned positions, embedding LayerNorm,
    # post-LN layers, exact GELU, unscaled embeddings, tanh in classification heads.
    roberta_base_architecture(args)


bert_architecture("bert_base")
bert_architecture("bert_large", encoder_layers=24, encoder_embed_dim=1024, encoder_ffn_embed_dim=4096,
                  encoder_attention_heads=16)
bert_architecture("bert_medium", encoder_layers=8, encoder_embed_dim=512, encoder_ffn_embed_dim=2048,
                  encoder_attention_heads=8)
bert_architecture("bert_small", encoder_layers=4, encoder_embed_dim=512, encoder_ffn_embed_dim=2048,
                  encoder_attention_heads=8)
bert_architecture("bert_mini", encoder_layers=4, encoder_embed_dim=256, encoder_ffn_embed_dim=1024,
                  encoder_attention_heads=4)
bert_architecture("bert_tiny", encoder_layers=2, encoder_embed_dim=128, encoder_ffn_embed_dim=512,
                  encoder_attention_heads=2)
# sentence-transformers' all-MiniLM models were trained with mean pooling.
bert_architecture("bert_minilm_l6_h384", encoder_layers=6, encoder_embed_dim=384, encoder_ffn_embed_dim=1536,
                  encoder_attention_heads=12, pooling="mean")
bert_architecture("bert_minilm_l12_h384", encoder_layers=12, encoder_embed_dim=384, encoder_ffn_embed_dim=1536,
                  encoder_attention_heads=12, pooling="mean")
