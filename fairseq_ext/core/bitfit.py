"""BitFit core: choose the bias terms to train, freeze the rest, report, save/load.

Framework-agnostic on purpose: it works on any ``torch.nn.Module`` whose
parameter names follow fairseq's conventions (``self_attn.q_proj``, ``fc1``,
``final_layer_norm``...) and imports nothing from fairseq, so it can be tested
and reused alone.

BitFit: Ben Zaken, Ravfogel, Goldberg, "BitFit: Simple Parameter-efficient
Fine-tuning for Transformer-based Masked Language-models", ACL 2022.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple

import torch

from . import controls

# The paper's bias symbols (Table 1 / Fig. 1) and the fairseq modules that hold
# them.  Layer terms only match inside ``layers.N.`` so that a head or an LM head
# that happens to own an ``fc1`` is never taken for a transformer layer.
# Cross-attention (``encoder_attn``) counts with its self-attention counterpart.
_LAYER = r"(^|\.)layers\.\d+\."
PAPER_TERMS: Dict[str, str] = {
    "q": _LAYER + r"(self_attn|encoder_attn)\.q_proj\.bias$",
    "k": _LAYER + r"(self_attn|encoder_attn)\.k_proj\.bias$",
    "v": _LAYER + r"(self_attn|encoder_attn)\.v_proj\.bias$",
    "m1": _LAYER + r"(self_attn|encoder_attn)\.out_proj\.bias$",
    "ln1": _LAYER + r"(self_attn_layer_norm|encoder_attn_layer_norm)\.bias$",
    "m2": _LAYER + r"fc1\.bias$",
    "m3": _LAYER + r"fc2\.bias$",
    "ln2": _LAYER + r"final_layer_norm\.bias$",
    # fairseq calls it layernorm_embedding (bart, transformer, newer roberta) or
    # emb_layer_norm (older roberta checkpoints).
    "emb_ln": r"(^|\.)(layernorm_embedding|emb_layer_norm)\.bias$",
}
_PAPER_PATTERNS = {symbol: re.compile(pattern) for symbol, pattern in PAPER_TERMS.items()}


def is_bias(name: str) -> bool:
    """A bias term: ``...bias``, and MultiheadAttention's learned ``bias_k``/``bias_v``."""
    return name.rsplit(".", 1)[-1].startswith("bias")


def ofa_filter(name: str) -> bool:
    """OFA's BitFit name filter (OFA-Sys/OFA train.py), reproduced as a rule."""
    return ("layer_norm" in name and "bias" in name) or ("fc" in name and "bias" in name)


# Named selections besides the paper symbols.
NAMED_SELECTIONS: Dict[str, Callable[[str], bool]] = {
    "ofa": ofa_filter,
    "all": is_bias,
    "none": lambda name: False,  # no bias term: with the heads this is head-only training
}

VALID_TERMS = tuple(NAMED_SELECTIONS) + tuple(PAPER_TERMS)
# The paper's random-subset controls (core.controls): weight entries instead of bias terms; used alone.
CONTROL_TERMS = controls.CONTROLS
# fairseq's sentence-prediction heads (RobertaModel.classification_heads): new per task, so trained by default.
CLASSIFICATION_HEADS = "classification_heads."
DEFAULT_HEAD_PREFIXES = (CLASSIFICATION_HEADS,)
# The report's group order: the paper's symbols, then anything else a regex selects, then the heads.
# A tuner's tensors (core.tuners, the comparison modes) report as their method.
TUNER_ROLES = ("lora", "ia3", "adapter")
ROLE_ORDER = tuple(PAPER_TERMS) + ("other", "masked") + TUNER_ROLES + ("head",)


class SelectionError(ValueError):
    """An invalid ``--bitfit-terms`` value; the message lists the valid names."""


def parse_terms(spec: str) -> Callable[[str], bool]:
    """Turn a selection spec into a predicate on parameter names.

    ``spec`` is ``ofa``, ``all``, ``none``, a comma-separated list of paper symbols
    and named selections (``q,m2``), or ``re:REGEX`` (searched in each name; the
    whole rest of the spec is the regex, commas included).
    """
    spec = (spec or "").strip()
    if spec in CONTROL_TERMS:
        return lambda name: False  # no bias term: apply() draws the control's weight entries
    if spec.startswith("re:"):
        try:
            pattern = re.compile(spec[3:])
        except re.error as error:
            raise SelectionError(f"invalid regular expression {spec[3:]!r}: {error}") from None
        return lambda name: pattern.search(name) is not None
    if not spec:
        raise SelectionError(f"empty selection; valid names: {', '.join(VALID_TERMS)} or re:REGEX")
    terms = [term.strip() for term in spec.split(",")]
    if not all(terms):
        raise SelectionError(f"empty term in {spec!r}; valid names: {', '.join(VALID_TERMS)}, joined by "
                             "single commas, or re:REGEX")
    if any(term in CONTROL_TERMS for term in terms):
        raise SelectionError(f"{', '.join(CONTROL_TERMS)} are controls of their own: give one alone, not in {spec!r}")
    unknown = [term for term in terms if term not in VALID_TERMS]
    if unknown:
        raise SelectionError(
            f"unknown term {', '.join(map(repr, unknown))}; valid names: "
            f"{', '.join(VALID_TERMS)}, comma-separated, re:REGEX, or a control ({', '.join(CONTROL_TERMS)})"
        )
    predicates = [
        NAMED_SELECTIONS[term] if term in NAMED_SELECTIONS else _PAPER_PATTERNS[term].search
        for term in terms
    ]
    return lambda name: any(predicate(name) for predicate in predicates)


def role_of(name: str, head_prefixes: Sequence[str] = DEFAULT_HEAD_PREFIXES) -> str:
    """The report group of a parameter: a paper symbol, ``head``, or ``other``."""
    if _is_head(name, head_prefixes):
        return "head"
    for symbol, pattern in _PAPER_PATTERNS.items():
        if pattern.search(name):
            return symbol
    return "other"


def _is_head(name: str, head_prefixes: Sequence[str]) -> bool:
    return any(name.startswith(prefix) or ("." + prefix) in name for prefix in head_prefixes)


def has_heads(model: torch.nn.Module, head_prefixes: Sequence[str] = DEFAULT_HEAD_PREFIXES) -> bool:
    """Whether the model has task heads: a sentence-prediction model does, a seq2seq model does not
    (its output projection is tied to its embeddings, or a plain weight: never a head)."""
    return any(_is_head(name, head_prefixes) for name, _ in model.named_parameters())


@dataclass
class Selection:
    """What BitFit trains in one model: parameter names, each with its report group."""

    terms: str
    train_heads: bool
    groups: Dict[str, str] = field(default_factory=dict)  # name -> role, in model order
    unused: List[str] = field(default_factory=list)  # selected, but no gradient: left frozen
    # Controls only: weight name -> bool mask of the entries that train, and the seed that drew them.
    masks: Dict[str, torch.Tensor] = field(default_factory=dict)
    seed: Optional[int] = None
    tuner: Optional[dict] = None  # a comparison method's settings (core.tuners.TunerSpec.header()), trained too

    @property
    def names(self) -> List[str]:
        return list(self.groups)


def select(
    model: torch.nn.Module,
    terms: str = "ofa",
    train_heads: bool = True,
    head_prefixes: Sequence[str] = DEFAULT_HEAD_PREFIXES,
) -> Selection:
    """Choose the parameters BitFit trains: matching bias terms, plus the task heads.

    Heads (``classification_heads.*``) are trained by default because a new head
    starts from random init; OFA's filter alone would leave it frozen there.
    """
    wanted = parse_terms(terms)
    selection = Selection(terms=terms, train_heads=train_heads)
    for name, _ in model.named_parameters():
        if _is_head(name, head_prefixes):
            chosen = train_heads or wanted(name)
        else:
            chosen = wanted(name)
        if chosen:
            selection.groups[name] = role_of(name, head_prefixes)
    return selection


def freeze(model: torch.nn.Module, names: Iterable[str]) -> None:
    """Freeze every parameter, then unfreeze ``names``."""
    names = set(names)
    missing = names - {name for name, _ in model.named_parameters()}
    if missing:
        raise KeyError(f"no such parameters: {sorted(missing)}")
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in names)


def find_unused(
    model: torch.nn.Module, names: Iterable[str], forward_backward: Callable[[], None]
) -> List[str]:
    """Names among ``names`` that receive no gradient from ``forward_backward()``.

    ``forward_backward`` runs one representative loss and calls ``backward``.
    DDP rejects trainable parameters that get no gradient, so BitFit leaves them
    frozen (RoBERTa's LM head during sentence classification, for instance).
    Gradients are cleared afterwards; ``requires_grad`` is left as it was.
    """
    names = set(names)
    parameters = dict(model.named_parameters())
    previous = {name: p.requires_grad for name, p in parameters.items()}
    for name, parameter in parameters.items():
        parameter.grad = None
        parameter.requires_grad_(name in names)
    try:
        forward_backward()
        return [name for name in parameters if name in names and parameters[name].grad is None]
    finally:
        for name, parameter in parameters.items():
            parameter.grad = None
            parameter.requires_grad_(previous[name])


def apply(
    model: torch.nn.Module,
    terms: str = "ofa",
    train_heads: bool = True,
    head_prefixes: Sequence[str] = DEFAULT_HEAD_PREFIXES,
    forward_backward: Optional[Callable[[], None]] = None,
    seed: int = 1,
    added: Optional[Mapping[str, str]] = None,
    tuner: Optional[dict] = None,
) -> Selection:
    """Select, drop the selected parameters that get no gradient, and freeze the rest.

    ``added``: tensors a tuner added ({name: its role}, core.tuners), trained besides the selection;
    ``tuner`` (its settings) is kept in the selection.

    A control (``rand_uniform``, ``rand_row_col``) trains, besides the heads, as many weight
    entries as the ``all`` selection trains bias parameters, drawn with ``seed``: its masks
    are in ``selection.masks``; keep the rest of those matrices fixed with
    ``controls.MaskGuard`` while training.

    A selection that trains nothing is an error, except ``none`` (heads only) on a model
    without heads, such as a seq2seq model: it freezes everything, the frozen baseline.
    """
    selection = select(model, terms, train_heads, head_prefixes)
    if added:
        selection.groups.update(added)
        parameters = [name for name, _ in model.named_parameters()]
        selection.groups = {name: selection.groups[name] for name in parameters if name in selection.groups}
    selection.tuner = dict(tuner) if tuner else None
    if forward_backward is not None and selection.groups:
        selection.unused = find_unused(model, selection.names, forward_backward)
        for name in selection.unused:
            del selection.groups[name]
    if terms.strip() in CONTROL_TERMS:
        _draw_control(model, selection, terms.strip(), head_prefixes, forward_backward, seed)
    frozen_baseline = terms.strip() == "none" and train_heads and not has_heads(model, head_prefixes)
    if not selection.groups and not frozen_baseline:
        raise SelectionError(
            f"selection {terms!r}{'' if train_heads else ' with frozen heads'} trains no parameter"
        )
    freeze(model, selection.names)
    return selection


def _draw_control(model, selection: Selection, kind: str, head_prefixes, forward_backward, seed: int) -> None:
    """Add a control's masked matrices to ``selection``: as many entries as ``all`` trains bias parameters."""
    biases = [name for name, role in select(model, "all", False, head_prefixes).groups.items() if role != "head"]
    unused = set(find_unused(model, biases, forward_backward)) if forward_backward is not None else set()
    parameters = dict(model.named_parameters())
    budget = sum(parameters[name].numel() for name in biases if name not in unused)
    shapes = {name: tuple(p.shape) for name, p in controls.control_matrices(model)}
    if not shapes or budget == 0:
        raise SelectionError(f"{kind}: the model has no layer weight matrices or no bias terms to match")
    selection.masks = controls.draw_masks(shapes, budget, kind, seed)
    selection.seed = seed
    for name in parameters:  # model order, heads after the masked matrices they follow
        if name in selection.masks:
            selection.groups[name] = "masked"
    selection.groups = {name: selection.groups[name] for name in parameters if name in selection.groups}


def count_parameters(model: torch.nn.Module) -> tuple:
    """(trainable, total) parameter counts; tied parameters are counted once."""
    trainable = total = 0
    for parameter in model.parameters():
        total += parameter.numel()
        if parameter.requires_grad:
            trainable += parameter.numel()
    return trainable, total


def format_trainable(trainable: int, total: int) -> str:
    """PEFT-style one-liner: ``trainable params: N || all params: M || trainable%: P``."""
    return f"trainable params: {trainable:,} || all params: {total:,} || trainable%: {100.0 * trainable / max(total, 1):.4f}"


def trainable_summary(model: torch.nn.Module) -> str:
    """``format_trainable`` of a model's own counts."""
    return format_trainable(*count_parameters(model))


def print_trainable_parameters(model: torch.nn.Module) -> None:
    print(trainable_summary(model))


def tally_by_role(sizes: Mapping[str, int], head_prefixes: Sequence[str] = DEFAULT_HEAD_PREFIXES,
                  roles: Optional[Mapping[str, str]] = None) -> Dict[str, Tuple[int, int]]:
    """{role: (tensors, parameters)} of named tensor sizes, in ROLE_ORDER; ``roles`` overrides role_of."""
    tally: Dict[str, List[int]] = {}
    for name, size in sizes.items():
        role = roles[name] if roles is not None else role_of(name, head_prefixes)
        counts = tally.setdefault(role, [0, 0])
        counts[0] += 1
        counts[1] += size
    return {role: tuple(tally[role]) for role in sorted(tally, key=ROLE_ORDER.index)}


def _trained_sizes(model: torch.nn.Module, selection: Selection) -> Dict[str, int]:
    """Entries that can change per selected tensor: all of it, or a control matrix's masked entries."""
    parameters = dict(model.named_parameters())
    return {name: int(selection.masks[name].sum()) if name in selection.masks else parameters[name].numel()
            for name in selection.groups}


def _selection_tally(model: torch.nn.Module, selection: Selection) -> Dict[str, Tuple[int, int]]:
    return tally_by_role(_trained_sizes(model, selection), roles=selection.groups)


def trained_and_total(model: torch.nn.Module, selection: Optional[Selection] = None) -> Tuple[int, int]:
    """(parameters that can change, all parameters): ``count_parameters``, with a control's matrices
    counted by their masked entries."""
    trainable, total = count_parameters(model)
    if selection is not None and selection.masks:
        trainable = sum(_trained_sizes(model, selection).values())
    return trainable, total


def role_lines(tally: Mapping[str, Tuple[int, int]]) -> List[str]:
    """One report line per role: ``  q           2 tensors           64 params``."""
    return [f"  {role:<7} {tensors:>4} tensors {count:>12,} params" for role, (tensors, count) in tally.items()]


def report(model: torch.nn.Module, selection: Selection) -> str:
    """Multi-line report: totals, bias terms vs heads, and a count per selected group."""
    tally = _selection_tally(model, selection)
    head = tally.get("head", (0, 0))
    not_bias = ("head", "masked") + TUNER_ROLES
    bias_tensors = sum(v[0] for k, v in tally.items() if k not in not_bias)
    bias_params = sum(v[1] for k, v in tally.items() if k not in not_bias)
    heads = f"heads {'trained' if selection.train_heads else 'frozen'}" if has_heads(model) else "no task heads"
    tuner = f"{selection.tuner['method']} ({_tuner_settings(selection.tuner)}) and " if selection.tuner else ""
    lines = [
        f"{tuner}BitFit selection {selection.terms!r}, {heads}",
        format_trainable(*trained_and_total(model, selection)),
        f"bias terms: {bias_params:,} params in {bias_tensors} tensors || "
        f"heads: {head[1]:,} params in {head[0]} tensors",
        *role_lines(tally),
    ]
    if selection.masks:
        lines.append(f"random control {controls.describe(selection.masks, selection.terms, selection.seed)} "
                     "(the 'all' selection's bias parameter count); the rest of those matrices stays fixed")
    if selection.unused:
        lines.append(
            "left frozen, selected but unused in the forward pass: " + ", ".join(selection.unused)
        )
    if not selection.groups:
        lines.append("nothing is trained: every weight stays as loaded (the frozen baseline)")
    return "\n".join(lines)


def _tuner_settings(tuner: Mapping[str, object]) -> str:
    return ", ".join(f"{key} {value if not isinstance(value, list) else ','.join(value)}"
                    for key, value in tuner.items() if key != "method" and value not in ([], ()))


def summary(model: torch.nn.Module, selection: Selection) -> dict:
    """``report`` as data: the selection, the tensors and parameters per group, the unused ones."""
    tally = _selection_tally(model, selection)
    data = {"terms": selection.terms, "train_heads": selection.train_heads, "unused": list(selection.unused),
            "groups": {role: {"tensors": tensors, "params": params} for role, (tensors, params) in tally.items()}}
    if selection.masks:
        data["control"] = {"kind": selection.terms, "seed": selection.seed,
                           "entries": controls.masked_entry_count(selection.masks), "matrices": len(selection.masks)}
    if selection.tuner:
        data["tuner"] = dict(selection.tuner)
    return data


def trainable_state_dict(model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """The trained part only: every parameter with ``requires_grad``, detached copies."""
    return {
        name: parameter.detach().clone()
        for name, parameter in model.named_parameters()
        if parameter.requires_grad
    }


def load_trainable_state_dict(
    model: torch.nn.Module, state: Dict[str, torch.Tensor], strict: bool = True
) -> None:
    """Copy saved trained tensors into ``model`` in place (shapes must match)."""
    parameters = dict(model.named_parameters())
    unknown = sorted(set(state) - set(parameters))
    if unknown and strict:
        raise KeyError(f"tensors not in the model: {unknown}")
    with torch.no_grad():
        for name, tensor in state.items():
            if name not in parameters:
                continue
            target = parameters[name]
            if target.shape != tensor.shape:
                raise ValueError(
                    f"{name}: saved shape {tuple(tensor.shape)} != model shape {tuple(target.shape)}"
                )
            target.copy_(tensor)
