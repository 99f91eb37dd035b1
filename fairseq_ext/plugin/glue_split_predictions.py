"""A trained GLUE model's outputs on a split prepared by glue_prepare, in the split's row order: the
GLUE runner's leaderboard files (the test sets, mostly)."""
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from fairseq import checkpoint_utils, tasks
from omegaconf import OmegaConf

from .deltas import merged_cfg, merged_model


@dataclass
class PreparedClassifier:
    """A sentence-prediction model and its task, reading one folder prepared by glue_prepare."""
    model: torch.nn.Module
    task: object
    head: str


def load_checkpoint(checkpoint, prepared_dir) -> PreparedClassifier:
    """A full fairseq checkpoint, its task reading ``prepared_dir``."""
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(checkpoint)], arg_overrides={"data": str(Path(prepared_dir))}
    )
    return PreparedClassifier(models[0].eval(), task, cfg.task.classification_head_name)


def load_base_and_delta(base_checkpoint, delta_path, prepared_dir) -> PreparedClassifier:
    """A base checkpoint plus a delta, merged in memory (what ``apply_delta`` would write, in float32
    as fairseq saves checkpoints), its task reading ``prepared_dir``."""
    model, delta = merged_model(base_checkpoint, delta_path)
    cfg = OmegaConf.create(merged_cfg(delta), flags={"allow_objects": True})
    cfg.task.data = str(Path(prepared_dir))
    return PreparedClassifier(model.float().eval(), tasks.setup_task(cfg.task), cfg.task.classification_head_name)


@torch.no_grad()
def predict_prepared_split(classifier: PreparedClassifier, split: str, batch_size: int = 64,
                           progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """Classification logits [N, classes] or regression scores [N] on a prepared split (the test
    sets, mostly), in the split's row order.  ``progress(done, total)`` is called after each batch."""
    task = classifier.task
    task.load_dataset(split)
    dataset = task.dataset(split)
    batches = task.get_batch_iterator(
        dataset, max_sentences=batch_size, max_positions=None, ignore_invalid_inputs=False, seed=1,
        num_workers=0,
    ).next_epoch_itr(shuffle=False)
    outputs = [None] * len(dataset)
    done = 0
    for sample in batches:
        logits, _ = classifier.model(**sample["net_input"], features_only=True,
                                     classification_head_name=classifier.head)
        for example_id, row in zip(sample["id"].tolist(), logits.float().cpu().numpy()):
            outputs[example_id] = row
        done += len(sample["id"])
        if progress is not None:
            progress(done, len(dataset))
    return np.stack(outputs).squeeze(-1) if task.cfg.regression_target else np.stack(outputs)
