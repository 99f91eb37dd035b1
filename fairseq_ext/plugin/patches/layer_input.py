"""BitFit runs: the first layer of every fairseq TransformerEncoder gets a contiguous input (see PATCHES:
contiguous-layer-input)."""
from torch import nn

from . import _mark


def contiguous_layer_input(model: nn.Module) -> int:
    """Give the first layer of every fairseq TransformerEncoder a contiguous input (see PATCHES:
    contiguous-layer-input); returns how many encoders were changed."""
    from fairseq.models.transformer import TransformerEncoderBase

    changed = 0
    for module in model.modules():
        if isinstance(module, TransformerEncoderBase) and len(module.layers) > 0:
            first = module.layers[0]
            if _contiguous_input not in first._forward_pre_hooks.values():
                first.register_forward_pre_hook(_contiguous_input)
                changed += 1
    if changed:
        _mark("contiguous-layer-input")
    return changed


def _contiguous_input(layer, args):
    """A forward pre-hook (module-level: models stay picklable): the layer's input x, made contiguous."""
    return (args[0].contiguous(), *args[1:]) if args and not args[0].is_contiguous() else None
