"""train.py's CLI, then each rank saves its final parameters to $RANK_DUMP_DIR/rank<R>.pt.

$FAIL_RANK=R makes rank R raise during training.

fairseq saves checkpoints from rank 0 only; tests that compare ranks need all.
"""
import os
import sys

import torch

from fairseq_ext.training.main import cli_main
from fairseq_ext.training.trainer import BitFitTrainer


class RecordingTrainer(BitFitTrainer):
    last = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        RecordingTrainer.last = self

    def train_step(self, samples, raise_oom=False):
        # $FAIL_RANK=R makes rank R fail at its third update: how a job dies matters.
        if os.environ.get("FAIL_RANK") == os.environ.get("RANK", "0") and self.get_num_updates() == 2:
            raise RuntimeError(f"injected failure on rank {os.environ.get('RANK')}")
        return super().train_step(samples, raise_oom)


if __name__ == "__main__":
    cli_main(sys.argv[1:], trainer_class=RecordingTrainer)
    rank = int(os.environ.get("RANK", "0"))
    parameters = {name: p.detach().clone() for name, p in RecordingTrainer.last._model.named_parameters()}
    torch.save(parameters, os.path.join(os.environ["RANK_DUMP_DIR"], f"rank{rank}.pt"))
