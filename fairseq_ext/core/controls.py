"""The BitFit paper's random-subset controls (Ben Zaken et al. 2022, Table 3), on any ``torch.nn.Module``.

Is it the bias terms that matter, or only how few parameters train?  A control
trains exactly as many entries as the ``all`` bias selection has bias parameters,
taken from the encoder's weight matrices (the 2-D ``weight`` of every module inside
``layers.N.``: attention projections, fc1, fc2), chosen by a seed:

* ``rand_uniform``: entries drawn uniformly, without replacement, from all those matrices;
* ``rand_row_col``: whole rows or columns, drawn at random from every matrix's rows and
  columns; the last one drawn is cut so the count is exact.

A control's matrices require gradients as wholes (autograd computes a matrix's
gradient whole), so ``MaskGuard`` zeroes every gradient outside the mask as it is
produced, and puts the entries outside the mask back to their saved values after
each optimizer step: whatever an optimizer does with a zero gradient (weight decay,
Adam's epsilon, fp16 master copies), they stay bit-identical.  The cost, stated:
these matrices' gradients, optimizer state and all-reduce traffic are as large as in
full fine-tuning of them; only the entries in the mask can change.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Tuple

import numpy as np
import torch

RAND_UNIFORM, RAND_ROW_COL = "rand_uniform", "rand_row_col"
CONTROLS = (RAND_UNIFORM, RAND_ROW_COL)
_LAYER_MATRIX = re.compile(r"(^|\.)layers\.\d+\..*\.weight$")


def control_matrices(model: torch.nn.Module) -> List[Tuple[str, torch.nn.Parameter]]:
    """The weight matrices a control draws from, in model order."""
    return [(name, p) for name, p in model.named_parameters() if p.dim() == 2 and _LAYER_MATRIX.search(name)]


def draw_masks(shapes: Mapping[str, Tuple[int, int]], count: int, kind: str, seed: int) -> Dict[str, torch.Tensor]:
    """{matrix name: bool mask} with exactly ``count`` True entries over all matrices (``shapes`` in model order)."""
    if kind not in CONTROLS:
        raise ValueError(f"unknown control {kind!r}; controls: {', '.join(CONTROLS)}")
    names = list(shapes)
    sizes = np.array([shapes[n][0] * shapes[n][1] for n in names], dtype=np.int64)
    total = int(sizes.sum())
    if not 0 < count <= total:
        raise ValueError(f"cannot choose {count:,} entries from {total:,}")
    rng = np.random.default_rng(seed)
    flat = np.zeros(total, dtype=bool)
    offsets = np.concatenate([[0], np.cumsum(sizes)])
    if kind == RAND_UNIFORM:
        flat[rng.choice(total, size=count, replace=False, shuffle=False)] = True
    else:
        # Every row and every column of every matrix is a candidate; take them in a random order.
        candidates = [(i, axis, k) for i, n in enumerate(names) for axis in (0, 1) for k in range(shapes[n][axis])]
        chosen = 0
        for pick in rng.permutation(len(candidates)):
            i, axis, k = candidates[pick]
            rows, cols = shapes[names[i]]
            block = flat[offsets[i]:offsets[i + 1]].reshape(rows, cols)
            line = block[k, :] if axis == 0 else block[:, k]  # a view: marking it marks ``flat``
            new = np.flatnonzero(~line)[: count - chosen]  # entries not yet chosen (a row meets columns)
            line[new] = True
            chosen += len(new)
            if chosen == count:
                break
    return {name: torch.from_numpy(flat[offsets[i]:offsets[i + 1]].reshape(shapes[name]).copy())
            for i, name in enumerate(names) if flat[offsets[i]:offsets[i + 1]].any()}


def mask_indices(mask: torch.Tensor) -> torch.Tensor:
    """A mask as the int64 flat indices of its True entries (how deltas and checkpoints store it)."""
    return torch.nonzero(mask.reshape(-1), as_tuple=True)[0].to(torch.int64)


def mask_from_indices(indices: torch.Tensor, shape) -> torch.Tensor:
    mask = torch.zeros(int(np.prod(shape)), dtype=torch.bool)
    mask[indices.to(torch.int64)] = True
    return mask.reshape(shape)


class MaskGuard:
    """Keeps every entry of the masked matrices outside its mask exactly as it was at ``snapshot()``.

    Gradients are masked from construction on; take the snapshot once the starting weights
    are in place (a trainer loads a checkpoint after building the model), before the first step.
    """

    def __init__(self, model: torch.nn.Module, masks: Mapping[str, torch.Tensor]):
        parameters = dict(model.named_parameters())
        self.masks = {name: mask.to(parameters[name].device) for name, mask in masks.items()}
        self.parameters = {name: parameters[name] for name in masks}
        self.saved: Optional[Dict[str, torch.Tensor]] = None
        self._hooks = [p.register_hook(self._zero_outside(self.masks[name])) for name, p in self.parameters.items()]

    def snapshot(self) -> None:
        self.saved = {name: p.detach().clone() for name, p in self.parameters.items()}

    @staticmethod
    def _zero_outside(mask: torch.Tensor) -> Callable[[torch.Tensor], torch.Tensor]:
        return lambda grad: grad * mask.to(grad.dtype)

    @torch.no_grad()
    def restore(self, master_copies: Iterable[Tuple[torch.nn.Parameter, torch.Tensor]] = ()) -> None:
        """Put the entries outside each mask back, in the parameters and in any (parameter, master copy
        view of the same shape) pairs an optimizer keeps, such as fp16 training's fp32 masters."""
        if self.saved is None:
            raise RuntimeError("MaskGuard.restore() before snapshot()")
        for name, parameter in self.parameters.items():
            parameter.copy_(torch.where(self.masks[name], parameter, self.saved[name]))
        by_parameter = {id(p): name for name, p in self.parameters.items()}
        for parameter, master in master_copies:
            name = by_parameter.get(id(parameter))
            if name is not None:
                master.copy_(torch.where(self.masks[name], master, self.saved[name].to(master.dtype)))

    def remove(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []


def masked_entry_count(masks: Mapping[str, torch.Tensor]) -> int:
    return int(sum(int(mask.sum()) for mask in masks.values()))


def merge_masked(base: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """``base`` with the entries at flat ``indices`` replaced by ``values`` (a copy)."""
    merged = base.detach().clone()
    merged.view(-1)[indices.to(torch.int64)] = values.to(merged.dtype)
    return merged


def masked_values(tensor: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    return tensor.detach().reshape(-1)[indices.to(torch.int64)].clone()


def describe(masks: Mapping[str, torch.Tensor], kind: str, seed: Optional[int]) -> str:
    return (f"{kind}: {masked_entry_count(masks):,} weight entries in {len(masks)} matrices"
            + (f", seed {seed}" if seed is not None else ""))
