"""fairseq plugin for BitFit: import it (or pass ``--user-dir fairseq_ext``) to register
its tasks, models, criterions and tokenizers.

Like fairseq's own plugins, each line imports one small module that registers one
component.
"""
from .models import bert  # noqa: F401  (keep first: models/__init__ hushes fairseq's import-time log)
from . import checkpoint_safety  # noqa: F401  (allow-lists fairseq checkpoint types for torch.load)
from . import wordpiece_bpe  # noqa: F401
from .tasks import glue  # noqa: F401  (registers the task "glue")
from .criterions import glue_prediction  # noqa: F401  (registers the criterion "glue_prediction")
