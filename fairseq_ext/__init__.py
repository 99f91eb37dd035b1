"""BitFit for fairseq.

Importing ``fairseq_ext`` (or passing ``--user-dir fairseq_ext``) registers the
fairseq plugin: the ``glue`` task, the ``bert`` model and archs, the
``glue_prediction`` criterion and the ``wordpiece`` BPE, after applying
``fairseq_ext.plugin.patches.install()``.

Without fairseq installed the import registers nothing, and the framework-free
core still works on any ``torch.nn.Module``::

    from fairseq_ext import bitfit
    selection = bitfit.apply(model, terms="q,m2")

The layers and what may import what: docs/architecture.md.
"""
import importlib.util

from .core.cpu_threads import prefer_sleeping_threads

prefer_sleeping_threads()  # before anything imports torch

from .core import bitfit  # noqa: E402,F401  (the core: `from fairseq_ext import bitfit`)

if importlib.util.find_spec("fairseq") is not None:
    from .plugin import register as _register_plugin

    _register_plugin()
