"""fairseq 0.12's use of ``numpy.compat.long``, which numpy 2 removed.

fairseq's ``TokenBlockDataset`` with ``break_mode="eos"`` (every language-model prompt fairseq-interactive
and the LM hub encode, and training with ``--sample-break-mode eos``) and ``LanguagePairDataset``'s
``num_tokens_vec`` call ``np.compat.long``: under numpy 2 they end in ``AttributeError: module 'numpy'
has no attribute 'compat'``.  numpy 1 defined ``numpy.compat.long`` as Python's ``int``; ``install``
puts back exactly that name, only where numpy lacks it.

``patches.install()`` applies it (see PATCHES: numpy2-compat-long).
"""
import types

import numpy


def install() -> None:
    """Give numpy 2 the ``numpy.compat.long`` fairseq 0.12 reads (numpy 1: ``int``); no-op on numpy 1."""
    compat = getattr(numpy, "compat", None)
    if compat is None:
        compat = types.ModuleType("numpy.compat")
        numpy.compat = compat
    if not hasattr(compat, "long"):
        compat.long = int


def installed() -> bool:
    return hasattr(getattr(numpy, "compat", None), "long")
