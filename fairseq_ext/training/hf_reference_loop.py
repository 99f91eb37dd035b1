"""The plain Hugging Face transformers loop that train.py is measured against.

What a user would otherwise write to fine-tune the same pretrained folder on a GLUE
task: ``AutoModelForSequenceClassification`` and its tokenizer, a shuffled DataLoader
with dynamic padding (``DataCollatorWithPadding``), AdamW with linear warmup and
decay, fp32 on the CPU's cores (on a GPU, optionally fp16 AMP).  Its best form
(``grouped_batches``, ``fused_adamw``) is what Trainer's ``group_by_length=True`` gives:
transformers' ``LengthGroupedSampler``, here with megabatches of the GLUE runner's size,
and torch's fused AdamW kernel.  It trains the same set of parameters as a train.py
run: everything (``full``), or a ``--bitfit-terms`` selection mapped onto the Hugging
Face names (``hf_import.fairseq_name``) plus the task head (pooler and classifier).

Nothing is downloaded: the folder must hold the model and its tokenizer.
"""
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from ..core import bitfit, glue_metrics
from ..core.errors import UserError
from ..core.glue_files import SplitRows
from ..plugin.models.hf_import import fairseq_name, model_family, normalized_name, read_json
from .options import BITFIT_PREFIX, FULL, mode_flags

HEAD_MODULES = ("classifier.", "pooler.", "bert.pooler.", "roberta.pooler.")


def _transformers():
    try:
        import transformers
    except ImportError:
        raise UserError("the Hugging Face reference loop needs transformers: pip install transformers") from None
    return transformers


def check_loop_modes(modes: Sequence[str]) -> None:
    """The modes this loop can train beside train.py: ``full`` and ``bitfit-<terms>`` (it has no head-only,
    control or tuner counterpart); a UserError names any other."""
    for mode in modes:
        if mode != FULL and not mode.startswith(BITFIT_PREFIX):
            raise UserError(f"--modes {mode}: expected full or bitfit-<terms> (the transformers loop has no other)")
        mode_flags(mode)
        if mode != FULL:
            try:
                bitfit.parse_terms(mode[len(BITFIT_PREFIX):])
            except bitfit.SelectionError as error:
                raise UserError(f"--modes {mode}: {error}") from None


def select_trainable(model: torch.nn.Module, family: str, terms: str) -> Tuple[int, int]:
    """Freeze what a train.py run with ``terms`` (``full`` or a --bitfit-terms spec) would freeze; (trainable, total)."""
    wanted = None if terms == FULL else bitfit.parse_terms(terms)
    for name, parameter in model.named_parameters():
        if wanted is None or name.startswith(HEAD_MODULES):
            chosen = True
        else:
            mapped = fairseq_name(family, normalized_name(name))
            chosen = mapped is not None and wanted(mapped)
        parameter.requires_grad_(chosen)
    return bitfit.count_parameters(model)


@dataclass
class EpochResult:
    epoch: int
    seconds: float  # from the first step's start to the last step's end: batches and steps, no evaluation
    updates: int
    dev: Dict[str, float] = field(default_factory=dict)


def length_grouped_sampler(lengths: Sequence[int], batch_size: int, megabatch_batches: int, generator):
    """transformers' ``LengthGroupedSampler`` (Trainer's ``group_by_length``) with megabatches of
    ``megabatch_batches`` batches; Trainer's own default is min(50, examples / (4 * batch))."""
    transformers = _transformers()
    from transformers.trainer_pt_utils import get_length_grouped_indices

    class MegabatchLengthGroupedSampler(transformers.trainer_pt_utils.LengthGroupedSampler):
        def __iter__(self):
            return iter(get_length_grouped_indices(self.lengths, self.batch_size, megabatch_batches,
                                                   generator=self.generator))

    return MegabatchLengthGroupedSampler(batch_size, lengths=list(lengths), generator=generator)


class ReferenceLoop:
    """One model from a Hugging Face folder, trained on tokenized GLUE rows by a plain loop."""

    def __init__(self, hf_folder, spec, terms: str, seed: int = 1, max_length: int = 128, device: str = "cpu",
                 amp: bool = False):
        """``amp``: on CUDA, fp16 autocast with a gradient scaler (torch's AMP, what a transformers user runs)."""
        transformers = _transformers()
        folder = Path(hf_folder)
        self.spec, self.terms, self.seed, self.max_length = spec, terms, seed, max_length
        self.device, self.amp = torch.device(device), amp
        if amp and self.device.type != "cuda":
            raise UserError("the transformers loop's fp16 AMP needs a CUDA device")
        torch.manual_seed(seed)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
        labels = 1 if spec.regression else spec.num_classes
        self.model = transformers.AutoModelForSequenceClassification.from_pretrained(
            str(folder), num_labels=labels, local_files_only=True,
            problem_type="regression" if spec.regression else "single_label_classification")
        family = model_family(read_json(folder / "config.json", "the model config"), folder / "config.json")
        self.trainable, self.total = select_trainable(self.model, family, terms)
        self.model.to(self.device)
        self.collate = transformers.DataCollatorWithPadding(self.tokenizer)

    def _encode(self, rows: SplitRows) -> List[dict]:
        columns = list(zip(*rows.texts))
        encoded = self.tokenizer(*columns, truncation=True, max_length=self.max_length)
        examples = []
        for i in range(len(rows.texts)):
            example = {key: values[i] for key, values in encoded.items()}
            if rows.labels is not None:
                label = rows.labels[i]
                example["labels"] = float(label) if self.spec.regression else self.spec.labels.index(label)
            examples.append(example)
        return examples

    def train(self, train_rows: SplitRows, dev_rows: SplitRows, epochs: int, batch_size: int, lr: float,
              weight_decay: float = 0.0, warmup: float = 0.06,
              on_step: Optional[Callable[[int, int], None]] = None, grouped_batches: int = 0,
              fused_adamw: bool = False) -> List[EpochResult]:
        """Train ``epochs`` epochs; each epoch's time and dev metrics (the task's official ones, in %).
        ``grouped_batches`` > 0: length-grouped megabatches of that many batches, else random batches."""
        transformers = _transformers()
        train, dev = self._encode(train_rows), self._encode(dev_rows)
        generator = torch.Generator().manual_seed(self.seed)
        if grouped_batches > 0:
            sampler = length_grouped_sampler([len(e["input_ids"]) for e in train], batch_size, grouped_batches,
                                             generator)
            loader = torch.utils.data.DataLoader(train, batch_size=batch_size, sampler=sampler,
                                                 collate_fn=self.collate)
        else:
            loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True,
                                                 collate_fn=self.collate, generator=generator)
        total_updates = epochs * len(loader)
        optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad], lr=lr,
                                      weight_decay=weight_decay, fused=fused_adamw or None)
        schedule = transformers.get_linear_schedule_with_warmup(optimizer, int(round(warmup * total_updates)),
                                                                total_updates)
        scaler = torch.amp.GradScaler("cuda") if self.amp else None
        results, done = [], 0
        for epoch in range(1, epochs + 1):
            self.model.train()
            first_start = last_end = None
            for batch in loader:
                start = time.perf_counter()
                first_start = first_start or start
                batch = {key: value.to(self.device) for key, value in batch.items()}
                # The profiler's scopes carry fairseq's names, so both loops' updates read alike.
                with torch.autograd.profiler.record_function("forward"), \
                        torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                    loss = self.model(**batch).loss
                with torch.autograd.profiler.record_function("backward"):
                    (scaler.scale(loss) if scaler else loss).backward()
                with torch.autograd.profiler.record_function("optimizer"):
                    if scaler:
                        scaler.step(optimizer)
                        scaler.update()
                    else:
                        optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                if self.device.type == "cuda":
                    torch.cuda.synchronize()  # the update's device work belongs to its time
                last_end = time.perf_counter()
                done += 1
                if on_step is not None:
                    on_step(done, total_updates)
            results.append(EpochResult(epoch, last_end - first_start, len(loader), self.evaluate(dev, batch_size)))
        return results

    @torch.no_grad()
    def evaluate(self, examples: Sequence[dict], batch_size: int) -> Dict[str, float]:
        self.model.eval()
        predictions, targets = [], []
        for start in range(0, len(examples), batch_size):
            batch = self.collate([dict(e) for e in examples[start:start + batch_size]])
            targets.append(batch.pop("labels").numpy())
            with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.amp):
                logits = self.model(**{key: value.to(self.device) for key, value in batch.items()}).logits.float().cpu()
            predictions.append(logits.squeeze(-1).numpy() if self.spec.regression else logits.argmax(-1).numpy())
        predicted, target = np.concatenate(predictions), np.concatenate(targets)
        if self.spec.regression:
            values = glue_metrics.official_metrics(
                self.spec.metrics, sums=glue_metrics.regression_sums(predicted, target),
                examples=(np.arange(len(target)), predicted, target))
        else:
            confusion = glue_metrics.confusion_matrix(target, predicted, self.spec.num_classes)
            values = glue_metrics.official_metrics(self.spec.metrics, confusion=confusion)
        return {name: round(100.0 * value, 2) for name, value in values.items() if math.isfinite(value)}
