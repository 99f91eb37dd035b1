"""Batches that mix BitFit tasks: each example gets its own task's bias terms in one forward pass over
a shared model (``PerExampleBiases``, what ``MultiTaskPredictor.predict_mixed`` runs on)."""
import contextlib
import functools
import re
from typing import Dict, List

import torch
from fairseq.modules import MultiheadAttention
from torch import nn

from ..core.errors import UserError
from . import patches

_ATTENTION_PROJECTION = re.compile(r"^(.*)\.(q|k|v|out)_proj\.bias$")


class PerExampleBiases:
    """Each example's own bias terms in one forward pass over a batch that mixes tasks.

    A BitFit task changes only additive terms: a Linear's ``x @ W.T + b`` and a LayerNorm's
    ``norm(x) * g + beta``.  For the pass, each biased module in ``tables`` ({parameter name:
    [tasks, dim]}) has its bias set to zero and a forward hook adds every example's row of
    the table, gathered by the example's task index.  fairseq's attention then computes
    through its projection modules (``patches.attention_through_projections``).  Which
    dimension of each module's output is the batch (fairseq's encoder layers and a pre-norm
    encoder's final LayerNorm run time-major, its embedding LayerNorm batch-major) is read
    off one forward pass of ``probe``, a [2, 3] batch of token ids.
    """

    def __init__(self, model: nn.Module, tables: Dict[str, torch.Tensor], probe: torch.Tensor):
        modules = dict(model.named_modules())
        self.tables = tables
        self.parameters = dict(model.named_parameters())
        targets = {}
        attention = {}
        for name in tables:
            module_name, _, kind = name.rpartition(".")
            module = modules.get(module_name)
            if kind != "bias" or not _adds_its_bias(module):
                raise UserError(f"{name}: a mixed-task batch adds per-task bias terms of Linear and LayerNorm "
                                "modules only; predict tasks that train other tensors one task at a time (predict)")
            targets[name] = module
            projection = _ATTENTION_PROJECTION.match(name)
            if projection and isinstance(modules.get(projection.group(1)), MultiheadAttention):
                attention[projection.group(1)] = modules[projection.group(1)]
        self.attention = list(attention.values())
        self.targets = {}  # parameter name -> (module, the batch dimension of its output)
        for name, batch_dim in _batch_dims(model, targets, probe, self.attention).items():
            self.targets[name] = (targets[name], batch_dim)
        self.zeros = {name: torch.zeros_like(self.parameters[name]) for name in self.targets}

    @contextlib.contextmanager
    def applied(self, task_index: torch.Tensor):
        """While the block runs, example i of the model's input gets the biases of task ``task_index[i]``."""
        saved, handles = {}, []
        try:
            for name, (module, batch_dim) in self.targets.items():
                rows = self.tables[name].index_select(0, task_index).unsqueeze(1 - batch_dim)
                saved[name] = self.parameters[name].data
                self.parameters[name].data = self.zeros[name]  # swapped for the pass, not copied
                handles.append(module.register_forward_hook(functools.partial(_add_rows, rows=rows,
                                                                              batch_dim=batch_dim)))
            with patches.attention_through_projections(self.attention):
                yield
        finally:
            for handle in handles:
                handle.remove()
            for name, data in saved.items():
                self.parameters[name].data = data


def _adds_its_bias(module) -> bool:
    """A module whose bias is added to its output last: Linear, and LayerNorms (torch's, apex's)."""
    return isinstance(module, (nn.Linear, nn.LayerNorm)) or (
        type(module).__name__.endswith("LayerNorm") and hasattr(module, "normalized_shape"))


@torch.no_grad()
def _batch_dims(model: nn.Module, targets: Dict[str, nn.Module], probe: torch.Tensor,
                attention: List[nn.Module]) -> Dict[str, int]:
    """{parameter name: the batch dimension of its module's output} from one forward of ``probe``
    (batch 2, length 3), with ``attention`` through its projections as in a mixed pass; modules
    the forward never runs are left out: their bias is never added."""
    batch, length = probe.shape
    shapes, handles = {}, []

    def record(module, inputs, output, name):
        shapes.setdefault(name, tuple(output.shape))  # returns None: the output stays as it is

    try:
        for name, module in targets.items():
            handles.append(module.register_forward_hook(functools.partial(record, name=name)))
        with patches.attention_through_projections(attention):
            model(probe, features_only=True)
    finally:
        for handle in handles:
            handle.remove()
    dims = {}
    for name, shape in shapes.items():
        if shape[:2] == (batch, length):
            dims[name] = 0
        elif shape[:2] == (length, batch):
            dims[name] = 1
        else:
            raise UserError(f"{name}: its module's output {shape} has no batch x time layout; a mixed-task batch "
                            "cannot add per-example biases there")
    return dims


def _add_rows(module, inputs, output, rows, batch_dim):
    if output.shape[batch_dim] != rows.shape[batch_dim]:
        raise RuntimeError(f"{type(module).__name__} output {tuple(output.shape)}: batch not in dimension {batch_dim}")
    output.add_(rows)  # in place: the module's fresh output, no second activation-sized tensor (no grad here)
