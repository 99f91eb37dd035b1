"""A full checkpoint's outputs on a GLUE split prepared by glue_prepare, in the split's row order: the
GLUE runner's leaderboard files (the test sets, mostly)."""
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from fairseq import checkpoint_utils


@torch.no_grad()
def predict_prepared_split(checkpoint, prepared_dir, split: str, batch_size: int = 64,
                           progress: Optional[Callable[[int, int], None]] = None) -> np.ndarray:
    """A full checkpoint's classification logits [N, classes] or regression scores [N] on a split
    prepared by glue_prepare (the test sets, mostly), in the split's row order.  ``progress(done,
    total)`` is called after each batch."""
    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(checkpoint)], arg_overrides={"data": str(Path(prepared_dir))}
    )
    model = models[0].eval()
    task.load_dataset(split)
    dataset = task.dataset(split)
    batches = task.get_batch_iterator(
        dataset, max_sentences=batch_size, max_positions=None, ignore_invalid_inputs=False, seed=1,
        num_workers=0,
    ).next_epoch_itr(shuffle=False)
    outputs = [None] * len(dataset)
    done = 0
    for sample in batches:
        logits, _ = model(
            **sample["net_input"], features_only=True,
            classification_head_name=cfg.task.classification_head_name,
        )
        for example_id, row in zip(sample["id"].tolist(), logits.float().cpu().numpy()):
            outputs[example_id] = row
        done += len(sample["id"])
        if progress is not None:
            progress(done, len(dataset))
    return np.stack(outputs).squeeze(-1) if task.cfg.regression_target else np.stack(outputs)
