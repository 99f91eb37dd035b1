"""python -m fairseq_ext.tools.generate and tools.eval_lm with --delta: fairseq's generation and
evaluation get a model already built in memory (see PATCHES: models-in-memory)."""
import contextlib
from typing import Callable, Dict, Optional, Tuple

from fairseq import checkpoint_utils

from . import _mark


ModelLoader = Callable[[Optional[dict], object], Tuple[list, object]]  # (arg_overrides, task) -> (models, cfg)


@contextlib.contextmanager
def models_in_memory(loaders: Dict[str, ModelLoader]):
    """While the block runs, fairseq's ``checkpoint_utils.load_model_ensemble`` asked for one path
    that ``loaders`` names returns ``loaders[path](arg_overrides, task)``, a ``(models, cfg)`` pair
    built in memory, instead of reading the file (see PATCHES: models-in-memory); any other path
    loads as fairseq loads it."""
    fairseq_load = checkpoint_utils.load_model_ensemble

    def load_model_ensemble(filenames, arg_overrides=None, task=None, *args, **kwargs):
        if len(filenames) == 1 and filenames[0] in loaders:
            return loaders[filenames[0]](arg_overrides, task)
        return fairseq_load(filenames, arg_overrides, task, *args, **kwargs)

    checkpoint_utils.load_model_ensemble = load_model_ensemble
    _mark("models-in-memory")
    try:
        yield
    finally:
        checkpoint_utils.load_model_ensemble = fairseq_load
        _mark("models-in-memory", False)


@contextlib.contextmanager
def ensemble_in_memory(path: str, loader: Callable):
    """While the block runs, fairseq's ``checkpoint_utils.load_model_ensemble_and_task`` asked for exactly
    ``[path]`` returns ``loader(arg_overrides, task)``, a ``(models, cfg, task)`` triple built in memory.

    fairseq-eval-lm loads through ``load_model_ensemble_and_task`` (fairseq-generate and -interactive
    through ``load_model_ensemble``, which calls it): this is patches.models_in_memory one level down.
    """
    fairseq_load = checkpoint_utils.load_model_ensemble_and_task

    def load_model_ensemble_and_task(filenames, arg_overrides=None, task=None, *args, **kwargs):
        if list(filenames) == [path]:
            return loader(arg_overrides, task)
        return fairseq_load(filenames, arg_overrides, task, *args, **kwargs)

    checkpoint_utils.load_model_ensemble_and_task = load_model_ensemble_and_task
    _mark("models-in-memory")
    try:
        yield
    finally:
        checkpoint_utils.load_model_ensemble_and_task = fairseq_load
        _mark("models-in-memory", False)
