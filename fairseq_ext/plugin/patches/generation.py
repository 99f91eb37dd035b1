"""python -m fairseq_ext.tools.generate and tools.eval_lm with --delta: fairseq's generation and
evaluation get a model already built in memory (see PATCHES: models-in-memory)."""
import contextlib
from typing import Callable, Dict, Optional, Tuple

from fairseq import checkpoint_utils

from . import _mark


ModelLoader = Callable[[Optional[dict], object], Tuple[list, object]]  # (arg_overrides, task) -> (models, cfg)


@contextlib.contextmanager
def _loaded_from_memory(loader_name: str, is_ours: Callable[[list], bool], loader: Callable):
    """While the block runs, ``checkpoint_utils.<loader_name>`` asked for filenames ``is_ours`` accepts returns
    ``loader(filenames, arg_overrides, task)``; any other call loads as fairseq loads."""
    fairseq_load = getattr(checkpoint_utils, loader_name)

    def load(filenames, arg_overrides=None, task=None, *args, **kwargs):
        if is_ours(list(filenames)):
            return loader(list(filenames), arg_overrides, task)
        return fairseq_load(filenames, arg_overrides, task, *args, **kwargs)

    setattr(checkpoint_utils, loader_name, load)
    _mark("models-in-memory")
    try:
        yield
    finally:
        setattr(checkpoint_utils, loader_name, fairseq_load)
        _mark("models-in-memory", False)


def models_in_memory(loaders: Dict[str, ModelLoader]):
    """While the block runs, fairseq's ``checkpoint_utils.load_model_ensemble`` asked for one path
    that ``loaders`` names returns ``loaders[path](arg_overrides, task)``, a ``(models, cfg)`` pair
    built in memory, instead of reading the file (see PATCHES: models-in-memory); any other path
    loads as fairseq loads it."""
    return _loaded_from_memory("load_model_ensemble", lambda filenames: len(filenames) == 1 and filenames[0] in loaders,
                               lambda filenames, arg_overrides, task: loaders[filenames[0]](arg_overrides, task))


def ensemble_in_memory(path: str, loader: Callable):
    """While the block runs, fairseq's ``checkpoint_utils.load_model_ensemble_and_task`` asked for exactly
    ``[path]`` returns ``loader(arg_overrides, task)``, a ``(models, cfg, task)`` triple built in memory.

    fairseq-eval-lm loads through ``load_model_ensemble_and_task`` (fairseq-generate and -interactive
    through ``load_model_ensemble``, which calls it): this is models_in_memory one level down.
    """
    return _loaded_from_memory("load_model_ensemble_and_task", lambda filenames: filenames == [path],
                               lambda filenames, arg_overrides, task: loader(arg_overrides, task))
