"""BitFit runs: each copy fairseq makes of a saved checkpoint carries its delta along (see PATCHES:
delta-following-copies)."""
import inspect
import weakref
from typing import Callable, Optional

from fairseq import checkpoint_utils

from . import _mark


CopyHook = Callable[[str, str, bool, Callable[[str, str, bool], bool]], bool]
_copy_hook: Optional[Callable[[], Optional[CopyHook]]] = None  # gives the hook, or None once it is gone


def route_checkpoint_copies(hook: CopyHook) -> None:
    """fairseq's copies of a saved checkpoint to its other names go through
    ``hook(src, dst, overwrite, copy_file)``, with fairseq's own copy as ``copy_file``.
    The latest hook wins: one training run saves at a time in a process.  A bound method (a
    run's delta writer) is held weakly, so a finished run's trainer and model are freed, not
    kept until the next run in the process (hydra's sweeps, the benchmark) replaces the hook."""
    global _copy_hook
    _copy_hook = weakref.WeakMethod(hook) if inspect.ismethod(hook) else (lambda: hook)
    if getattr(checkpoint_utils.PathManager, "routes_copies", False):
        return
    fairseq_path_manager = checkpoint_utils.PathManager

    class RoutedPathManager(fairseq_path_manager):
        routes_copies = True

        @staticmethod
        def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
            hook = _copy_hook() if _copy_hook is not None else None
            if hook is None:
                return fairseq_path_manager.copy(src_path, dst_path, overwrite)
            return hook(src_path, dst_path, overwrite, fairseq_path_manager.copy)

    checkpoint_utils.PathManager = RoutedPathManager
    _mark("delta-following-copies")
