"""train.py's machinery: options, the BitFit Trainer, deltas beside checkpoints, the run record."""
