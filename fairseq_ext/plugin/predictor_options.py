"""What the predictors' command lines share (tools.predict, tools.serve, tools.analysis, the serving
benchmark): the options a MultiTaskPredictor is built from, their parsing, and the checks of ``--device``,
``--delta`` and ``--task`` that run before any model or input is read (the predictors run them too)."""
from typing import Dict, Sequence

import torch

from ..core.delta_file import CLASSIFICATION, Delta
from ..core.errors import UserError
from ..core.glue_tasks import TASK_NAMES, get_task_spec
from .checkpoints import add_trust_checkpoint_argument


def usable_device(name: str) -> torch.device:
    """The torch device ``--device`` names, if this machine has it."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: this torch has no CUDA device; use --device cpu")
    return device


def add_predictor_arguments(parser, base_help: str) -> None:
    """The command-line options a MultiTaskPredictor is built from (the predict and serve tools)."""
    parser.add_argument("--base", required=True, help=base_help)
    parser.add_argument("--delta", action="append", required=True, metavar="TASK=PATH",
                        help="a task and its delta (repeatable)")
    parser.add_argument("--dictionary", help="the base's dict.txt (default: the model folder's, or beside --base)")
    parser.add_argument("--device", default="cpu", help="torch device (default: cpu)")
    add_trust_checkpoint_argument(parser)


def parse_delta_options(values: Sequence[str]) -> Dict[str, str]:
    """{task: delta path} of ``--delta TASK=PATH`` options; a task named twice is an error."""
    deltas = {}
    for value in values:
        name, separator, path = value.partition("=")
        if not separator or not name.strip() or not path:
            raise UserError(f"--delta {value!r}: expected TASK=PATH, e.g. "
                            "--delta cola=runs/cola/checkpoint_best.delta.safetensors")
        if name.strip() in deltas:
            raise UserError("--delta: a task name is given twice")
        deltas[name.strip()] = path
    return deltas


def check_task_delta(name: str, delta: Delta) -> None:
    """What the predictors need of a delta served as task ``name``, checked before any model or input is
    read: a classification delta, with its head, of the GLUE task ``name`` names (if it names one)."""
    source = f"--delta {name}={delta.path}"
    if delta.is_seq2seq:
        raise UserError(f"{source}: {delta.describe_kind()}: it generates sequences, it has no labels to "
                        "predict; generate with python -m fairseq_ext.tools.generate")
    if delta.kind != CLASSIFICATION:
        raise UserError(f"{source}: {delta.describe_kind()}: it models text, it has no labels to predict; "
                        "sample with python -m fairseq_ext.tools.generate, score with python -m "
                        "fairseq_ext.tools.eval_lm")
    check_task_name(name, delta)
    if delta.head_name not in delta.head_names():
        raise UserError(f"{source}: holds no classification head {delta.head_name!r}")


def check_task_name(name: str, delta: Delta) -> None:
    """A task named like a GLUE task must be the GLUE task its delta was trained on (``--delta MRPC=``
    with an RTE delta would answer with RTE's labels)."""
    named = next((t for t in TASK_NAMES if t.lower() == name.lower()), None)
    if named is not None and delta.glue_task is not None and named != delta.glue_task:
        raise UserError(f"--delta {name}={delta.path}: that delta was trained on GLUE {delta.glue_task}, not "
                        f"{named}; name the task after what it predicts, e.g. --delta {delta.glue_task}=...")


def glue_spec_for(name: str, delta: Delta):
    """The GLUE task of a delta (its glue task, or a --task named like a GLUE task), or None."""
    glue_name = delta.glue_task or next((t for t in TASK_NAMES if t.lower() == name.lower()), None)
    if glue_name is None:
        return None
    spec = get_task_spec(glue_name)
    labels = None if spec.regression else list(spec.labels)
    if delta.regression != spec.regression or (labels is not None and delta.label_symbols != labels):
        def outputs(regression, symbols):
            return "a regression target" if regression else "classes " + ", ".join(symbols or [])

        raise UserError(f"--task {name}: GLUE {spec.name} has {outputs(spec.regression, labels)}, but {delta.path} "
                        f"predicts {outputs(delta.regression, delta.label_symbols)}")
    return spec
