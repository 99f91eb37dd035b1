"""The parameter-efficient methods BitFit is compared with, on any ``torch.nn.Module`` named as
fairseq names its transformers: LoRA and IA3 through PEFT, bottleneck adapters written here.

* LoRA (Hu et al., ICLR 2022): a low-rank update ``B @ A * alpha / rank`` beside chosen Linear
  layers (PEFT's ``LoraConfig``); merged into their weights, the model's graph is the base's.
* IA3 (Liu et al., NeurIPS 2022, "Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper
  than In-Context Learning"): learned vectors that rescale the keys, the values and the FFN's
  inner activation (PEFT's ``IA3Config``); mergeable too.
* Bottleneck adapters (Houlsby et al., ICML 2019): ``h + up(gelu(down(h)))`` on each layer's
  attention output and FFN output, before the residual; PEFT has none.  ``up`` starts at zero, so
  an injected model computes what the base computes.  Adapters add layers: never merged.

Injected modules keep the base's names in the model's state dict: PEFT wraps a Linear as
``q_proj.base_layer``, and hooks here save it as ``q_proj.weight`` and read a base saved that way.
A checkpoint of a tuned model is the base's names plus the tuner's tensors, the base fingerprint
of a delta is computed as for BitFit, and loading a base into an injected model keeps the
tuner's initial values.  Which layers are targeted is said with the paper's bias symbols
(``core.bitfit.PAPER_TERMS``): q, k, v, m1 (attention output), m2 (fc1), m3 (fc2).
"""
from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, field
from typing import List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

from .bitfit import PAPER_TERMS

LORA, IA3, ADAPTER = "lora", "ia3", "adapter"
TUNERS = (LORA, IA3, ADAPTER)
LINEAR_ROLES = ("q", "k", "v", "m1", "m2", "m3")
# The tensors each method adds, as they appear in parameter names (role in the trainable report).
ADDED_TENSOR = re.compile(r"(^|\.)(lora_A|lora_B|ia3_l|adapter_attn|adapter_ffn)(\.|$)")

# Each method's default targets, from its paper: LoRA on q and v (Hu et al., Table 2/§7.1);
# IA3 on keys, values and the FFN's inner activation (Liu et al. §3.3).
DEFAULT_TARGETS = {LORA: ("q", "v"), IA3: ("k", "v", "m3"), ADAPTER: ()}


class TunerError(ValueError):
    """A tuner setting that cannot be applied to this model."""


@dataclass(frozen=True)
class TunerSpec:
    """One method and its settings: what a delta records so that a reader can rebuild the model."""

    method: str
    rank: int = 8  # LoRA's r
    alpha: float = 8.0  # LoRA's alpha: the update is scaled by alpha / r
    targets: Tuple[str, ...] = field(default=())  # the Linear roles LoRA or IA3 wrap; () = the method's default
    adapter_size: int = 64  # the adapters' bottleneck

    def __post_init__(self):
        if self.method not in TUNERS:
            raise TunerError(f"unknown method {self.method!r}; methods: {', '.join(TUNERS)}")
        if not self.targets and self.method != ADAPTER:
            object.__setattr__(self, "targets", DEFAULT_TARGETS[self.method])
        unknown = [role for role in self.targets if role not in LINEAR_ROLES]
        if unknown:
            raise TunerError(f"unknown target {unknown[0]!r}; targets: {', '.join(LINEAR_ROLES)}, comma-separated")
        if self.method == ADAPTER and self.targets:
            raise TunerError("adapters go after each attention and each FFN; they take no targets")
        if self.rank < 1 or self.adapter_size < 1:
            raise TunerError("the rank and the adapter size are at least 1")

    @property
    def mergeable(self) -> bool:
        """Whether trained tensors fold into the base weights, leaving the base's graph."""
        return self.method != ADAPTER

    def header(self) -> dict:
        """The settings that shape this method, as a delta and the run record keep them."""
        if self.method == LORA:
            return {"method": LORA, "rank": self.rank, "alpha": self.alpha, "targets": list(self.targets)}
        if self.method == IA3:
            return {"method": IA3, "targets": list(self.targets)}
        return {"method": ADAPTER, "adapter_size": self.adapter_size}

    @classmethod
    def from_header(cls, data: Mapping[str, object]) -> "TunerSpec":
        return cls(method=str(data["method"]), rank=int(data.get("rank", 8)), alpha=float(data.get("alpha", 8.0)),
                   targets=tuple(data.get("targets") or ()), adapter_size=int(data.get("adapter_size", 64)))

    def describe(self) -> str:
        if self.method == LORA:
            return f"LoRA r {self.rank}, alpha {self.alpha:g} on {','.join(self.targets)}"
        if self.method == IA3:
            return f"IA3 on {','.join(self.targets)}"
        return f"bottleneck adapters of size {self.adapter_size} after each attention and FFN"


def linear_modules(model: nn.Module, roles: Sequence[str]) -> List[str]:
    """Names of the Linear layers whose bias has one of the paper's ``roles`` (their weights: same module)."""
    patterns = [re.compile(PAPER_TERMS[role]) for role in roles]
    return [name for name, module in model.named_modules()
            if isinstance(module, nn.Linear) and any(p.search(name + ".bias") for p in patterns)]


def transformer_layers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """(name, layer) of each transformer layer: a module with ``self_attn`` and an ``fc2``."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(getattr(module, "self_attn", None), nn.Module)
            and isinstance(getattr(module, "fc2", None), nn.Linear)]


def inject(model: nn.Module, spec: TunerSpec) -> List[str]:
    """Add ``spec``'s tensors to ``model`` in place; returns their parameter names, in model order.

    The base's tensors are left as they are; what the caller trains is its business (``core.bitfit``
    freezes everything else).
    """
    if any(ADDED_TENSOR.search(name) for name, _ in model.named_parameters()):
        raise TunerError("the model already has a tuner")
    if spec.method == ADAPTER:
        _add_adapters(model, spec.adapter_size)
    else:
        _inject_peft(model, spec)
    return [name for name, _ in model.named_parameters() if ADDED_TENSOR.search(name)]


def _inject_peft(model: nn.Module, spec: TunerSpec) -> None:
    import peft  # only the LoRA and IA3 modes need it
    from peft.tuners.tuners_utils import BaseTunerLayer

    targets = linear_modules(model, spec.targets)
    if not targets:
        raise TunerError(f"{spec.method}: the model has no Linear layer of role {', '.join(spec.targets)}")
    if spec.method == LORA:
        config = peft.LoraConfig(r=spec.rank, lora_alpha=spec.alpha, lora_dropout=0.0, target_modules=targets)
    else:
        feedforward = [name for name in targets if re.search(PAPER_TERMS["m3"], name + ".bias")]
        config = peft.IA3Config(target_modules=targets, feedforward_modules=feedforward)
    trainable = {name: p.requires_grad for name, p in model.named_parameters()}
    peft.inject_adapter_in_model(config, model)
    for name, parameter in model.named_parameters():  # PEFT freezes the rest; the caller decides that
        canonical = name.replace(".base_layer.", ".")
        if canonical in trainable:
            parameter.requires_grad_(trainable[canonical])
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.register_state_dict_post_hook(_save_base_names)
            module.register_load_state_dict_pre_hook(_read_base_names)


def _save_base_names(module, state_dict, prefix, local_metadata) -> None:
    """A wrapped Linear saves its base weights under the base's names (``q_proj.weight``)."""
    wrapped = prefix + "base_layer."
    for key in [key for key in state_dict if key.startswith(wrapped)]:
        state_dict[prefix + key[len(wrapped):]] = state_dict.pop(key)


def _read_base_names(module, state_dict, prefix, *args) -> None:
    """A wrapped Linear reads the base's names, and keeps its tuner's values where a base has none."""
    for name, _ in module.get_base_layer().named_parameters(recurse=False):
        if prefix + name in state_dict:
            state_dict[prefix + "base_layer." + name] = state_dict.pop(prefix + name)
    _keep_missing(module, state_dict, prefix, skip="base_layer.")


def _keep_missing(module: nn.Module, state_dict, prefix: str, skip: Optional[str] = None) -> None:
    for name, tensor in itertools.chain(module.named_parameters(), module.named_buffers()):  # no save hooks
        if (skip is None or not name.startswith(skip)) and prefix + name not in state_dict:
            state_dict[prefix + name] = tensor.detach()


class BottleneckAdapter(nn.Module):
    """``h + up(gelu(down(h)))``; ``up`` starts at zero, so the adapter starts as the identity."""

    def __init__(self, dim: int, size: int):
        super().__init__()
        self.down = nn.Linear(dim, size)
        self.up = nn.Linear(size, dim)
        nn.init.normal_(self.down.weight, std=1e-2)  # Houlsby et al. §3.6: near-identity init
        nn.init.zeros_(self.down.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.register_load_state_dict_pre_hook(lambda module, state, prefix, *args: _keep_missing(module, state, prefix))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return hidden + self.up(nn.functional.gelu(self.down(hidden)))


def _add_adapters(model: nn.Module, size: int) -> None:
    layers = transformer_layers(model)
    if not layers:
        raise TunerError("adapter: the model has no transformer layer (a module with self_attn and fc2)")
    for _, layer in layers:
        dim = layer.fc2.out_features
        layer.adapter_attn = BottleneckAdapter(dim, size).to(layer.fc2.weight.dtype)
        layer.adapter_ffn = BottleneckAdapter(dim, size).to(layer.fc2.weight.dtype)
        # The attention module returns (output, weights): the adapter takes the output.
        layer.self_attn.register_forward_hook(
            lambda module, inputs, output, adapter=layer.adapter_attn: (adapter(output[0]),) + tuple(output[1:]))
        layer.fc2.register_forward_hook(lambda module, inputs, output, adapter=layer.adapter_ffn: adapter(output))


def merge(model: nn.Module) -> None:
    """Fold LoRA or IA3 into the base weights and put the plain Linear layers back, in place: the
    model's graph, names and cost become the base's.  Adapters cannot be merged (TunerError)."""
    if any(hasattr(layer, "adapter_attn") for _, layer in transformer_layers(model)):
        raise TunerError("adapters add layers: they cannot be merged into the base weights")
    from peft.tuners.tuners_utils import BaseTunerLayer

    wrapped = [(name, module) for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    for name, module in wrapped:
        module.merge()
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.get_base_layer())


def trained_tensor_role(name: str) -> Optional[str]:
    """The report group of a tensor a tuner added (``lora``, ``ia3``, ``adapter``), else None."""
    match = ADDED_TENSOR.search(name)
    if match is None:
        return None
    return {"lora_A": LORA, "lora_B": LORA, "ia3_l": IA3}.get(match.group(2), ADAPTER)


def spec_from_options(method: str, rank: int, alpha: float, targets: str, adapter_size: int) -> TunerSpec:
    """A spec from train.py's flags (``targets``: comma-separated roles, empty for the default)."""
    roles = tuple(role.strip() for role in targets.split(",") if role.strip())
    return TunerSpec(method, rank, alpha, roles, adapter_size)

