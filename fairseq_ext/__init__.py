"""fairseq plugin for BitFit: import it (or pass ``--user-dir fairseq_ext``) to register
its tasks, models, criterions and tokenizers.

Like fairseq's own plugins, each line imports one small module that registers one
component.
"""
from . import checkpoint_safety  # noqa: F401  (allow-lists fairseq checkpoint types for torch.load)
