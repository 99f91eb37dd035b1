"""A BitFit delta as a PEFT adapter over the unmodified transformers base, exact.

What carries each trained tensor (all of it PEFT's own machinery, written by PEFT's save_pretrained):

* Linear biases (q, k, v; m1, the attention output; m2 and m3, the feed-forward layers): BEFT
  vectors, trained bias minus base bias.  BEFT adds the vector to the layer's output, and
  ``merge_and_unload`` folds it into the bias.
* LayerNorm biases (LN1, LN2 and the embeddings' LayerNorm: ``ofa`` and ``all`` train them):
  those LayerNorm modules whole, through ``modules_to_save`` (their weight is the base's, their
  bias the trained one): 2 x hidden values each.
* the task head: ``modules_to_save`` (``classifier``; for BERT also ``bert.pooler.dense``, which
  BertForSequenceClassification uses as the head's dense layer).

Refused in one line: random-subset controls (they change weight entries, not biases) and a run
that trained no Linear bias (a head-only run: the merged export carries it).  Tensors off the
classification path (the MLM head's biases, BERT's pretrained pooler) are reported as left out.
"""
from pathlib import Path
from typing import Callable, List, Optional, Tuple

import torch
from torch import nn

from ...core.errors import UserError
from .hf_export_maps import MEAN_POOLING_FILE, SENTENCE_ENCODER

OFF_PATH = ("encoder.lm_head.", "encoder.pooler.")  # never on the classification path


def head_modules(layout) -> List[str]:
    """The head's two Linear layers as modules_to_save names.  Leaves, not RoBERTa's head module whole: PEFT's
    merge_and_unload can put back only a wrapped module that has a weight."""
    return sorted((layout.dense, layout.out_proj))


def adapter_parts(run, hf_base: nn.Module, merged_state: dict, names: dict) -> Tuple[dict, List[str], List[str]]:
    """({module: BEFT vector}, LayerNorm modules to save, fairseq tensors left out) of the run's delta."""
    delta = run.delta
    if delta.masked_entries():
        raise UserError(f"--delta {delta.path}: a random-subset control changes weight entries, which no PEFT "
                        "adapter carries exactly; export the merged model (--format hf)")
    to_hf = {fairseq: hf for hf, fairseq in names.items()}
    unused = set(delta.selection.get("unused") or ())
    base_state = hf_base.state_dict()
    vectors, layer_norms, left_out = {}, set(), []
    for name in sorted(delta.body_tensors()):
        if name not in to_hf:
            if name in unused or name.startswith(OFF_PATH) or not name.startswith(SENTENCE_ENCODER):
                left_out.append(name)
                continue
            raise UserError(f"--delta {delta.path}: {name} has no place in transformers' model; export the merged "
                            "model (--format hf)")
        module_name, _, kind = to_hf[name].rpartition(".")
        module = hf_base.get_submodule(module_name)
        if isinstance(module, nn.Linear) and kind == "bias":
            vectors[module_name] = merged_state[to_hf[name]] - base_state[to_hf[name]]
        elif isinstance(module, nn.LayerNorm):
            layer_norms.add(module_name)
        else:
            raise UserError(f"--delta {delta.path}: {name} ({type(module).__name__} {kind}) has no exact PEFT "
                            "carrier; export the merged model (--format hf)")
    if not vectors:
        raise UserError(f"--delta {delta.path}: the run trained no Linear bias (selection "
                        f"{delta.selection.get('terms')!r}), so there is nothing for BEFT; export the merged model "
                        "(--format hf)")
    return vectors, sorted(layer_norms), left_out


def write_adapter(run, staging: Path, base_name: Optional[str], check: Callable[[nn.Module], float]
                  ) -> Tuple[List[str], float]:
    """PEFT's adapter folder for ``run`` in ``staging``; (report lines, the check's largest difference).

    ``check(model)`` compares a model's outputs with the fairseq run's; it is given the adapter as
    PEFT loads it back (``PeftModel.from_pretrained``) over a base whose head is zeros.
    """
    import peft

    from .hf_export import transformers_model

    classifier = run.classifier
    base_values = {name: value.float() for name, value in run.base_values.items()
                   if not name.startswith("classification_heads.")}
    merged, names, _ = transformers_model(classifier)
    hf_base, _, _ = transformers_model(classifier, state_override={**classifier.state, **base_values})
    vectors, layer_norms, left_out = adapter_parts(run, hf_base, merged.state_dict(), names)
    saved = head_modules(classifier.layout) + layer_norms
    # No task_type: SEQ_CLS would add the head's container module ("classifier") to modules_to_save.
    config = peft.BeftConfig(target_modules=sorted(vectors), modules_to_save=list(saved),
                             inference_mode=True)
    model = peft.get_peft_model(hf_base, config)
    merged_modules = dict(merged.named_modules())
    with torch.no_grad():
        for module_name, vector in vectors.items():
            model.base_model.model.get_submodule(module_name).beft_bias["default"].copy_(vector.view(1, -1))
        for module_name in saved:
            wrapper = model.base_model.model.get_submodule(module_name)
            wrapper.modules_to_save["default"].load_state_dict(merged_modules[module_name].state_dict())
    model.peft_config["default"].base_model_name_or_path = base_name
    model.save_pretrained(str(staging))
    if classifier.pooling == "mean":
        Path(staging, MEAN_POOLING_FILE).write_bytes(Path(__file__).with_name("hf_mean_pooling.py").read_bytes())
    largest = check(reloaded(classifier, base_values, staging))
    lines = [f"BEFT vectors: {len(vectors)} Linear biases; modules_to_save: {', '.join(head_modules(classifier.layout))}"
             f" (head) and {len(layer_norms)} LayerNorms"]
    if left_out:
        lines.append(f"not exported (off transformers' classification path): {', '.join(left_out)}")
    return lines, largest


def reloaded(classifier, base_values: dict, staging: Path) -> nn.Module:
    """The adapter as a user loads it: PeftModel.from_pretrained over the base, its head zeroed (the adapter's
    own head must take its place)."""
    import peft

    from .hf_export import transformers_model

    state = {**classifier.state, **base_values}
    for name in list(state):
        if name.startswith("classification_heads."):
            state[name] = torch.zeros_like(state[name])
    base, _, _ = transformers_model(classifier, state_override=state)
    return peft.PeftModel.from_pretrained(base, str(staging)).eval()
