"""fairseq plugin for BitFit: import it (or pass ``--user-dir fairseq_ext``) to register
its tasks, models, criterions and tokenizers.

Like fairseq's own plugins, each line imports one small module that registers one
component.
"""
import logging
import sys

# fairseq's wav2vec2_classification.py runs logging.basicConfig(level=DEBUG) when fairseq is
# first imported; a library import must not switch the whole program to DEBUG logging.
_root_logger_before_fairseq = None if "fairseq" in sys.modules else (
    logging.getLogger().level, list(logging.getLogger().handlers))

from .models import bert  # noqa: F401,E402  (keep first: models/__init__ hushes fairseq's import-time log)
from . import checkpoint_safety  # noqa: F401,E402  (allow-lists fairseq checkpoint types for torch.load)
from . import wordpiece_bpe  # noqa: F401,E402
from .tasks import glue  # noqa: F401,E402  (registers the task "glue")
from .criterions import glue_prediction  # noqa: F401,E402  (registers the criterion "glue_prediction")

if _root_logger_before_fairseq is not None:
    logging.getLogger().setLevel(_root_logger_before_fairseq[0])
    logging.getLogger().handlers[:] = _root_logger_before_fairseq[1]
