#!/usr/bin/env python3
"""fairseq-train with BitFit: every fairseq-train option, plus ``--bitfit``.

    python train.py DATA --task sentence_prediction ... --bitfit --bitfit-terms ofa
    torchrun --nproc_per_node 2 train.py DATA ... --bitfit
    python train.py [-m] --config-dir configs/glue --config-name rte task.data=... bitfit.bitfit_terms=all

The second form is fairseq-hydra-train's (config files, ``-m`` sweeps on hydra's launchers):
fairseq_ext/training/hydra_form.py.

The training loop is fairseq's own (``fairseq_cli.train.main``).  train.py adds the
BitFit options, the guards and fixes fairseq lacks (torchrun on CPU, bf16, safe
checkpoint loading, resuming a restarted fine-tuning run), and a Trainer that
freezes the model after it is built and before the optimizer exists.  Without
``--bitfit`` a run is fairseq-train's, number for number.  The steps:
fairseq_ext/training/main.py; the options: docs/training.md.
"""
from fairseq_ext.training.main import cli_main

if __name__ == "__main__":
    cli_main()
