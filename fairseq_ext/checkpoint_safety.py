"""Let torch >= 2.6's safe ``torch.load`` read fairseq checkpoints.

fairseq calls ``torch.load`` without ``weights_only``; torch now defaults it to
True and rejects the few Python objects fairseq pickles: the legacy
``argparse.Namespace`` model config, and numpy scalars that metrics and
``best`` scores can carry.  Rather than turning the safety off for every file
(TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD=1), allow-list exactly those types, so loading
a checkpoint still cannot run arbitrary code.
"""
import argparse
import zipfile

import numpy
import torch

from .errors import UserError


def _numpy_scalar_types():
    # numpy 2 moved the scalar reconstructor to numpy._core; numpy 1 has numpy.core.
    core = getattr(numpy, "_core", None) or numpy.core
    dtypes = [type(numpy.dtype(name)) for name in ("float64", "float32", "float16", "int64", "int32", "bool")]
    return [core.multiarray.scalar, numpy.dtype, *dtypes]


FAIRSEQ_CHECKPOINT_TYPES = [argparse.Namespace, *_numpy_scalar_types()]

torch.serialization.add_safe_globals(FAIRSEQ_CHECKPOINT_TYPES)


def check_checkpoint_container(path: str, what: str) -> None:
    """Refuse a file torch.load could only fail on with a traceback: a truncated download, a
    text file.  torch.save writes a zip archive (whole only with its closing directory);
    torch < 1.6 wrote a pickle, which starts with the protocol marker."""
    if zipfile.is_zipfile(path):
        return
    with open(path, "rb") as handle:
        start = handle.read(2)
    if len(start) == 2 and start[0] == 0x80 and 2 <= start[1] <= 5:
        return
    raise UserError(f"{what} {path}: not a whole PyTorch checkpoint (truncated or corrupt?)")


def add_trust_checkpoint_argument(parser) -> None:
    """The one way a CLI of this package turns the safe loader off, for one file."""
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="unpickle --base without torch's weights_only safety (only for files you trust)")


def _broadcast_object(obj, src_rank, group, dist_device):
    """Send a Python object from ``src_rank`` to every rank of ``group``.

    fairseq broadcasts the loaded checkpoint (minus its tensors) to the other
    ranks with torch.save/torch.load, and its cfg is by then an omegaconf
    DictConfig, which the safe loader rejects.  The object comes from our own
    rank 0, which read the file with the safe loader, so plain pickling between
    ranks (torch.distributed.broadcast_object_list) is sound.
    """
    objects = [obj]
    torch.distributed.broadcast_object_list(objects, src=src_rank, group=group, device=dist_device)
    return objects[0]


def _install_rank_broadcast():
    from fairseq.distributed import utils as distributed_utils

    distributed_utils._broadcast_object_slow = _broadcast_object


_install_rank_broadcast()
