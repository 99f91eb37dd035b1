"""BitFit runs: each copy fairseq makes of a saved checkpoint carries its delta along (see PATCHES:
delta-following-copies)."""
from typing import Callable, Optional

from fairseq import checkpoint_utils

from . import _mark


CopyHook = Callable[[str, str, bool, Callable[[str, str, bool], bool]], bool]
_copy_hook: Optional[CopyHook] = None


def route_checkpoint_copies(hook: CopyHook) -> None:
    """fairseq's copies of a saved checkpoint to its other names go through
    ``hook(src, dst, overwrite, copy_file)``, with fairseq's own copy as ``copy_file``.
    The latest hook wins: one training run saves at a time in a process."""
    global _copy_hook
    _copy_hook = hook
    if getattr(checkpoint_utils.PathManager, "routes_copies", False):
        return
    fairseq_path_manager = checkpoint_utils.PathManager

    class RoutedPathManager(fairseq_path_manager):
        routes_copies = True

        @staticmethod
        def copy(src_path: str, dst_path: str, overwrite: bool = False) -> bool:
            if _copy_hook is None:
                return fairseq_path_manager.copy(src_path, dst_path, overwrite)
            return _copy_hook(src_path, dst_path, overwrite, fairseq_path_manager.copy)

    checkpoint_utils.PathManager = RoutedPathManager
    _mark("delta-following-copies")
