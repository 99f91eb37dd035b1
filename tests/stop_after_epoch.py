"""train.py's CLI that sends itself SIGTERM right after the checkpoint saved at the end of epoch
$STOP_AFTER_EPOCH: a stop at an exact place in training, through the real signal path (the signal
arrives while the checkpoint is written, so train.py raises it once the save is whole)."""
import os
import signal

from fairseq import checkpoint_utils

from fairseq_ext.training.main import cli_main

STOP_AFTER_EPOCH = int(os.environ["STOP_AFTER_EPOCH"])
fairseq_save_checkpoint = checkpoint_utils.save_checkpoint


def save_then_stop(cfg, trainer, epoch_itr, val_loss):
    saved = fairseq_save_checkpoint(cfg, trainer, epoch_itr, val_loss)
    if epoch_itr.epoch == STOP_AFTER_EPOCH and epoch_itr.end_of_epoch():
        os.kill(os.getpid(), signal.SIGTERM)
    return saved


checkpoint_utils.save_checkpoint = save_then_stop

if __name__ == "__main__":
    cli_main()
