"""BERT's WordPiece tokenization as the fairseq BPE ``wordpiece``, offline.

Built from the ``tokenizers`` library's own BERT pieces (BertNormalizer,
BertPreTokenizer, WordPiece), configured from a local vocab.txt, so it gives the
tokens of BertTokenizerFast without network access.  fairseq's own ``bert`` BPE
downloads its vocab unless given one and then yields only [UNK].

    --bpe wordpiece --wordpiece-vocab DIR/vocab.txt [--wordpiece-lowercase]
"""
import os
from dataclasses import dataclass, field
from typing import List, Optional

from fairseq.data.encoders import register_bpe
from fairseq.dataclass import FairseqDataclass
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers

from ...core.errors import UserError

UNK_TOKEN = "[UNK]"
CONTINUATION_PREFIX = "##"


@dataclass
class WordpieceConfig(FairseqDataclass):
    wordpiece_vocab: str = field(default="???", metadata={"help": "WordPiece vocab.txt (one token a line)"})
    wordpiece_lowercase: Optional[bool] = field(
        default=None,
        metadata={"help": "lowercase the text (uncased models); default: lowercase when the vocab "
                          "has no uppercase token"},
    )
    wordpiece_strip_accents: Optional[bool] = field(
        default=None, metadata={"help": "strip accents; default: as --wordpiece-lowercase, like BERT"}
    )


def read_wordpiece_vocab(path: str) -> List[str]:
    """Tokens of a vocab.txt in id order, read the way BERT's tokenizers read it."""
    with open(path, encoding="utf-8") as vocab_file:
        return [line.rstrip("\n") for line in vocab_file]


def is_uncased_vocab(tokens: List[str]) -> bool:
    """True when no token has an uppercase letter: the vocab of a lowercasing (uncased) model."""
    return not any(token != token.lower() for token in tokens if not token.startswith("["))


def build_wordpiece_tokenizer(tokens: List[str], lowercase: bool, strip_accents: Optional[bool] = None) -> Tokenizer:
    """A tokenizers.Tokenizer doing BERT's normalization, pre-tokenization and WordPiece."""
    tokenizer = Tokenizer(models.WordPiece({token: i for i, token in enumerate(tokens)}, unk_token=UNK_TOKEN))
    tokenizer.normalizer = normalizers.BertNormalizer(
        clean_text=True, handle_chinese_chars=True, strip_accents=strip_accents, lowercase=lowercase
    )
    tokenizer.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tokenizer.decoder = decoders.WordPiece(prefix=CONTINUATION_PREFIX)
    return tokenizer


@register_bpe("wordpiece", dataclass=WordpieceConfig)
class WordpieceBPE:
    def __init__(self, cfg):
        vocab_path = cfg.wordpiece_vocab
        if not vocab_path or vocab_path == "???":
            raise UserError("--bpe wordpiece needs --wordpiece-vocab (the model's vocab.txt)")
        if not os.path.isfile(vocab_path):
            raise UserError(f"--wordpiece-vocab {vocab_path}: no such file")
        tokens = read_wordpiece_vocab(vocab_path)
        if UNK_TOKEN not in tokens:
            raise UserError(f"--wordpiece-vocab {vocab_path}: no {UNK_TOKEN} token; is it a WordPiece vocab.txt?")
        lowercase = cfg.wordpiece_lowercase
        if lowercase is None:
            lowercase = is_uncased_vocab(tokens)
        self.lowercase = lowercase
        self.tokenizer = build_wordpiece_tokenizer(tokens, lowercase, cfg.wordpiece_strip_accents)

    def encode(self, x: str) -> str:
        return " ".join(self.tokenizer.encode(x, add_special_tokens=False).tokens)

    def decode(self, x: str) -> str:
        return self.tokenizer.decoder.decode(x.split())

    def is_beginning_of_word(self, x: str) -> bool:
        return not x.startswith(CONTINUATION_PREFIX)
