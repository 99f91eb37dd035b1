#!/usr/bin/env python3
"""fairseq-train with BitFit: every fairseq-train option, plus ``--bitfit``.

The training loop is fairseq's own (``fairseq_cli.train.main``); this file only
adds the BitFit options, a few guards fairseq lacks, and a Trainer that freezes
the model before the optimizer exists.  Without ``--bitfit`` the run is
fairseq-train's, number for number.

    python train.py DATA --task sentence_prediction ... --bitfit --bitfit-terms ofa
"""
import logging
import os
import sys
import warnings

import fairseq_cli.train
from fairseq import options
from fairseq.dataclass.utils import convert_namespace_to_omegaconf
from fairseq.distributed import utils as distributed_utils

import fairseq_ext  # noqa: F401  (registers the plugin's tasks, models and tokenizers)
from fairseq_ext.checkpoint_safety import check_checkpoint_container
from fairseq_ext.errors import UserError, exit_on_user_error
from fairseq_ext.launch import configure_precision, configure_torchrun, reject_conflicting_precision
from fairseq_ext.trainer import BitFitTrainer, add_bitfit_args, attach_bitfit_config, validate_bitfit_args

logger = logging.getLogger("train")

DEFAULT_RESTORE_FILE = "checkpoint_last.pt"


def resolve_restore_file(args) -> None:
    """Fail on a missing or broken --restore-file, and resume an interrupted fine-tuning run.

    Stock fairseq silently trains from random init when --restore-file does not
    exist, and with the RoBERTa GLUE recipe (--restore-file PRETRAINED --reset-*)
    a restarted run starts over from PRETRAINED.  Here, once the run has saved a
    checkpoint_last.pt, a restart continues from it, as --finetune-from-model does.
    """
    # fairseq reads checkpoint_last{suffix}.pt when --restore-file is checkpoint_last.pt
    last = os.path.join(args.save_dir, f"checkpoint_last{args.checkpoint_suffix}.pt")
    if args.restore_file == DEFAULT_RESTORE_FILE:
        if os.path.isfile(last):
            check_checkpoint_container(last, "resuming from")
        return
    if os.path.isfile(last) and os.path.abspath(last) != os.path.abspath(args.restore_file):
        logger.info(f"resuming the interrupted run from {last}; --restore-file {args.restore_file} "
                    "was used on its first launch")
        args.restore_file = DEFAULT_RESTORE_FILE
        args.reset_optimizer = args.reset_lr_scheduler = False
        args.reset_meters = args.reset_dataloader = False
        check_checkpoint_container(last, "resuming from")
    elif not os.path.isfile(args.restore_file):
        raise UserError(f"--restore-file {args.restore_file}: no such file")
    else:
        check_checkpoint_container(args.restore_file, "--restore-file")


@exit_on_user_error
def cli_main(argv=None, trainer_class=BitFitTrainer) -> None:
    """Parse fairseq-train's options plus ``--bitfit*`` and train; ``trainer_class``
    lets tools such as the benchmark time the real loop with a BitFitTrainer subclass."""
    argv = sys.argv[1:] if argv is None else argv
    reject_conflicting_precision(argv)
    parser = options.get_training_parser()
    add_bitfit_args(parser)
    args = options.parse_args_and_arch(parser, input_args=argv)
    validate_bitfit_args(args)
    configure_precision(args, argv)
    configure_torchrun(args, argv)
    resolve_restore_file(args)

    with warnings.catch_warnings():
        # fairseq composes its config through hydra's deprecated APIs: noise for users.
        warnings.simplefilter("ignore")
        cfg = convert_namespace_to_omegaconf(args)
    attach_bitfit_config(cfg, args)

    # fairseq_cli.train.main builds the model, then the Trainer: ours freezes the
    # model in between, before the optimizer is created.
    fairseq_cli.train.Trainer = trainer_class
    distributed_utils.call_main(cfg, fairseq_cli.train.main)


if __name__ == "__main__":
    cli_main()
