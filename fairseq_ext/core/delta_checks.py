"""Is a BitFit delta consistent with itself?  The checks every reader of a delta runs.

``validate_delta`` is called by ``delta_file.read_delta`` on every delta it reads (so by
``delta info``, ``delta apply``, predict, serve, analysis and generate alike), and by the
predictors on a ``Delta`` handed to them in memory.  It needs no model: it checks the
header against the tensors.  What needs the base model (every tensor names one of its
parameters, with its shape and dtype; the base fingerprint) is checked where the model is
built (``delta_file.check_delta_fits``, ``check_base_fingerprint``).

A delta fails with one ``UserError`` line naming the file and the first problem found:

* the selection: every trained tensor outside the heads is one the header lists, and the
  header lists none the file lacks (``read_delta`` also checks the latter);
* a random-subset control's entries: integer indices and values of one length, in pairs;
* dtypes: every floating tensor in the training dtype the header records;
* values: every floating value finite (a NaN bias predicts ``nan`` for every input);
* heads (a classification delta whose task names its head): each head exactly
  ``dense.{weight,bias}`` and ``out_proj.{weight,bias}`` with consistent shapes, its input
  the model's embedding size; the task's head has as many outputs as the header says the
  task has (1 for regression, ``num_classes``, one per label symbol, and the GLUE task's).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Dict

import torch

from .bitfit import CLASSIFICATION_HEADS
from .errors import UserError
from .glue_tasks import TASK_NAMES, get_task_spec

if TYPE_CHECKING:  # delta_file imports this module
    from .delta_file import Delta

HEAD_TENSORS = ("dense.bias", "dense.weight", "out_proj.bias", "out_proj.weight")


def validate_delta(delta: "Delta") -> None:
    """Refuse a delta whose header and tensors disagree, or whose values are not finite (see module doc)."""
    where = f"{delta.path or 'delta'}: corrupt delta"
    _check_selection(delta, where)
    _check_masked_entries(delta, where)
    for name, tensor in delta.tensors.items():
        if not tensor.is_floating_point():
            continue
        if tensor.dtype != delta.dtype:
            raise UserError(f"{where}: tensor {name} is {str(tensor.dtype)[6:]}, but the header records training "
                            f"in {delta.base['dtype']}")
        finite = torch.isfinite(tensor)
        if not bool(finite.all()):
            bad = tensor[~finite]
            raise UserError(f"{where}: tensor {name} holds {bad.numel()} non-finite value(s) "
                            f"(first: {float(bad[0])})")
    if not delta.is_seq2seq and delta.head_name:
        for head in delta.head_names():
            _check_head_shapes(delta, head, where)
        _check_task_against_head(delta, where)


def _check_selection(delta: "Delta", where: str) -> None:
    listed = delta.selection.get("trained")
    if not isinstance(listed, list) or not all(isinstance(name, str) for name in listed):
        raise UserError(f"{where}: the selection's 'trained' is not a list of tensor names")
    holds = set(delta.trained_names())
    missing = sorted(set(listed) - holds)
    if missing:
        raise UserError(f"{where}: the header lists trained tensors it does not hold: {missing[0]}")
    unlisted = sorted(name for name in holds - set(listed) if not name.startswith(CLASSIFICATION_HEADS))
    if unlisted:
        raise UserError(f"{where}: it holds tensor {unlisted[0]}, which its selection "
                        f"({delta.selection.get('terms')!r}) does not list as trained")


def _check_masked_entries(delta: "Delta", where: str) -> None:
    from .delta_file import MASKED_INDICES, MASKED_VALUES

    for name in delta.tensors:
        if name.endswith(MASKED_VALUES) and name[:-len(MASKED_VALUES)] + MASKED_INDICES not in delta.tensors:
            raise UserError(f"{where}: {name} has no {name[:-len(MASKED_VALUES)] + MASKED_INDICES} beside it")
        if name.endswith(MASKED_INDICES) and name[:-len(MASKED_INDICES)] + MASKED_VALUES not in delta.tensors:
            raise UserError(f"{where}: {name} has no {name[:-len(MASKED_INDICES)] + MASKED_VALUES} beside it")
    for name, (indices, values) in delta.masked_entries().items():
        if indices.dtype != torch.int64 or indices.dim() != 1 or values.shape != indices.shape:
            raise UserError(f"{where}: {name}'s trained entries are not int64 indices and values of one length")
        if indices.numel() and int(indices.min()) < 0:
            raise UserError(f"{where}: {name}'s trained entries have a negative index")


def _check_head_shapes(delta: "Delta", head: str, where: str) -> None:
    tensors: Dict[str, torch.Tensor] = delta.head_tensors(head)
    prefix = f"{CLASSIFICATION_HEADS}{head}."
    extra = sorted(set(tensors) - set(HEAD_TENSORS))
    if extra:
        raise UserError(f"{where}: head {head!r} has an unexpected tensor {prefix}{extra[0]}")
    missing = sorted(set(HEAD_TENSORS) - set(tensors))
    if missing:
        raise UserError(f"{where}: head {head!r} lacks its {prefix}{missing[0]}")
    dense, out = tensors["dense.weight"], tensors["out_proj.weight"]
    shapes_agree = (dense.dim() == 2 and out.dim() == 2 and tensors["dense.bias"].shape == dense.shape[:1]
                    and out.shape[1] == dense.shape[0] and tensors["out_proj.bias"].shape == out.shape[:1])
    if not shapes_agree:
        shapes = ", ".join(f"{name} {tuple(tensors[name].shape)}" for name in HEAD_TENSORS)
        raise UserError(f"{where}: head {head!r} has misshaped tensors ({shapes})")
    embed_dim = delta.model["args"].get("encoder_embed_dim")
    if isinstance(embed_dim, int) and dense.shape[1] != embed_dim:
        raise UserError(f"{where}: head {head!r} reads {dense.shape[1]} features, but the model's "
                        f"encoder_embed_dim is {embed_dim}")


def _check_task_against_head(delta: "Delta", where: str) -> None:
    head = delta.head_name
    if head not in delta.head_names():
        raise UserError(f"{where}: holds no classification head {head!r}, the head its task names")
    outputs = delta.head_tensors(head)["out_proj.weight"].shape[0]
    claims = []  # (what the header says, outputs it implies)
    if delta.regression:
        claims.append(("a regression target", 1))
    num_classes = delta.task_cfg.get("num_classes")
    if isinstance(num_classes, int) and num_classes > 0:
        claims.append((f"num_classes {num_classes}", num_classes))
    symbols = delta.label_symbols
    if symbols is not None:
        if not isinstance(symbols, list) or not all(isinstance(symbol, str) for symbol in symbols):
            raise UserError(f"{where}: its label symbols are not a list of strings")
        if delta.regression:
            raise UserError(f"{where}: a regression task with label symbols {symbols}")
        claims.append((f"{len(symbols)} label symbols {symbols}", len(symbols)))
    glue_task = delta.glue_task
    if glue_task is not None:
        if str(glue_task) not in TASK_NAMES:
            raise UserError(f"{where}: its task names GLUE task {glue_task!r}; GLUE tasks: {', '.join(TASK_NAMES)}")
        spec = get_task_spec(glue_task)
        if spec.regression != delta.regression:
            raise UserError(f"{where}: its task is GLUE {spec.name}, a "
                            f"{'regression' if spec.regression else 'classification'} task, but its header says "
                            f"{'regression' if delta.regression else 'classification'}")
        claims.append((f"GLUE {spec.name}", spec.num_classes))
    for claim, count in claims:
        if count != outputs:
            raise UserError(f"{where}: its head {head!r} has {outputs} output(s), but its task header says "
                            f"{claim} ({count} output(s))")
