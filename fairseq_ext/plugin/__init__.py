"""The fairseq plugin: BitFit's fairseq components, and the patches they need.

``register()`` runs when ``fairseq_ext`` is imported (``import fairseq_ext``, or
``--user-dir fairseq_ext``): it applies ``patches.install()``, then imports one
small module per registered component, as fairseq's own plugins do.
"""


def register() -> None:
    from . import patches

    patches.install()  # first: the bert model takes over arch names the install frees
    from .models import bert  # noqa: F401  (the model "bert" and its archs)
    from .data import wordpiece_bpe  # noqa: F401  (the BPE "wordpiece")
    from .tasks import glue  # noqa: F401  (the task "glue")
    from .criterions import glue_prediction  # noqa: F401  (the criterion "glue_prediction")
