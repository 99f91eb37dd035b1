"""Every model train.py trains: ``train``/``eval`` and ``set_num_updates`` without fairseq's redundant
module walks (see PATCHES: cached-module-walks)."""
from typing import Dict, List

from fairseq.models import BaseFairseqModel, FairseqEncoder
from torch import nn

from . import _mark


# set_num_updates implementations that only pass the count on to descendants.
_FORWARDING = {BaseFairseqModel.set_num_updates, FairseqEncoder.set_num_updates}
# What a model caches about its own tree; never pickled or copied.
_CACHE_KEYS = ("_walked_mode", "_update_count_receivers")


def _update_count_receivers(model: nn.Module) -> List[nn.Module]:
    """The modules below ``model`` with a set_num_updates of their own (not a forwarding one)."""
    receivers = []
    for module in model.modules():
        if module is model or not hasattr(module, "set_num_updates"):
            continue
        if getattr(type(module), "set_num_updates", None) not in _FORWARDING:
            receivers.append(module)
    return receivers


def _new_instance(cls):
    return cls.__new__(cls)


class CachedModuleWalks:
    """Mixin for a fairseq model: ``train``/``eval`` and ``set_num_updates`` without redundant walks.

    Every update, fairseq calls ``model.train()`` twice (Trainer.train_step and
    FairseqTask.train_step) and ``model.set_num_updates(n)``, which BaseFairseqModel
    calls on every module that has it, and FairseqEncoder's version walks its subtree
    again: quadratic in nested encoders (RoBERTa's).  The model here walks only when
    its mode really changes and sends the update count straight to the modules that
    use it; the result is the same.  A caller that switches a submodule's mode
    directly (``model.encoder.eval()``) must call ``model.train()``/``eval()`` on the
    model itself afterwards, as fairseq always does.
    """

    def train(self, mode: bool = True):
        if self.__dict__.get("_walked_mode") is mode:
            return self
        super().train(mode)
        # The tree may have grown since the last walk (heads registered by a checkpoint load).
        self.__dict__["_update_count_receivers"] = _update_count_receivers(self)
        self.__dict__["_walked_mode"] = mode
        return self

    def set_num_updates(self, num_updates):
        receivers = self.__dict__.get("_update_count_receivers")
        if receivers is None:
            receivers = self.__dict__["_update_count_receivers"] = _update_count_receivers(self)
        for module in receivers:
            module.set_num_updates(num_updates)

    def load_state_dict(self, *args, **kwargs):
        for key in _CACHE_KEYS:  # a load may add modules: walk again next time
            self.__dict__.pop(key, None)
        return super().load_state_dict(*args, **kwargs)

    def __reduce_ex__(self, protocol):
        # Pickle and deep-copy as the plain fairseq class (the subclass is made at run time
        # and cannot be found by name); the copy walks as fairseq does.
        reduced = list(super().__reduce_ex__(protocol))
        reduced[0], reduced[1] = _new_instance, (_PLAIN_CLASS[type(self)],)
        reduced[2] = {k: v for k, v in reduced[2].items() if k not in _CACHE_KEYS}
        return tuple(reduced)


_SUBCLASSES: Dict[type, type] = {}  # fairseq model class -> its CachedModuleWalks subclass
_PLAIN_CLASS: Dict[type, type] = {}  # and back


def cache_module_walks(model: nn.Module) -> nn.Module:
    """Switch a fairseq model (in place) to its CachedModuleWalks subclass; returns it.

    Models that are not BaseFairseqModel are left alone: their set_num_updates
    semantics are unknown.
    """
    cls = type(model)
    if not isinstance(model, BaseFairseqModel) or isinstance(model, CachedModuleWalks):
        return model
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(cls.__name__, (CachedModuleWalks, cls),
                                {"__module__": cls.__module__, "__qualname__": cls.__qualname__})
        _PLAIN_CLASS[_SUBCLASSES[cls]] = cls
    model.__class__ = _SUBCLASSES[cls]
    _mark("cached-module-walks")
    return model
