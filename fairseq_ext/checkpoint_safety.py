"""Let torch >= 2.6's safe ``torch.load`` read fairseq checkpoints.

fairseq calls ``torch.load`` without ``weights_only``; torch now defaults it to
True and rejects the few Python objects fairseq pickles: the legacy
``argparse.Namespace`` model config, and numpy scalars that metrics and
``best`` scores can carry.  Rather than turning the safety off for every file
(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1), allow-list exactly those types, so loading
a checkpoint still cannot run arbitrary code.
"""
import argparse

import numpy
import torch


def _numpy_scalar_types():
    # numpy 2 moved the scalar reconstructor to numpy._core; numpy 1 has numpy.core.
    core = getattr(numpy, "_core", None) or numpy.core
    dtypes = [type(numpy.dtype(name)) for name in ("float64", "float32", "float16", "int64", "int32", "bool")]
    return [core.multiarray.scalar, numpy.dtype, *dtypes]


FAIRSEQ_CHECKPOINT_TYPES = [argparse.Namespace, *_numpy_scalar_types()]

torch.serialization.add_safe_globals(FAIRSEQ_CHECKPOINT_TYPES)
