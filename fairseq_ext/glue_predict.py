"""Scores of a fine-tuned checkpoint on a prepared GLUE split (the test sets, mostly)."""
import warnings
from pathlib import Path

import numpy as np
import torch


@torch.no_grad()
def predict_split(checkpoint, prepared_dir, split: str, batch_size: int = 64) -> np.ndarray:
    """Classification logits [N, classes] or regression scores [N], in the split's row order."""
    from fairseq import checkpoint_utils

    import fairseq_ext  # noqa: F401  (the glue task, bert model and safe checkpoint loading)

    models, cfg, task = checkpoint_utils.load_model_ensemble_and_task(
        [str(checkpoint)], arg_overrides={"data": str(Path(prepared_dir))}
    )
    model = models[0].eval()
    task.load_dataset(split)
    dataset = task.dataset(split)
    # fairseq's loader asks for pinned memory, which a CPU-only machine warns about.
    warnings.filterwarnings("ignore", message=".*pin_memory.*")
    batches = task.get_batch_iterator(
        dataset, max_sentences=batch_size, max_positions=None, ignore_invalid_inputs=False, seed=1,
        num_workers=0,
    ).next_epoch_itr(shuffle=False)
    outputs = [None] * len(dataset)
    for sample in batches:
        logits, _ = model(
            **sample["net_input"], features_only=True,
            classification_head_name=cfg.task.classification_head_name,
        )
        for example_id, row in zip(sample["id"].tolist(), logits.float().cpu().numpy()):
            outputs[example_id] = row
    return np.stack(outputs).squeeze(-1) if task.cfg.regression_target else np.stack(outputs)
