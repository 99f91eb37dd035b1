"""Export a BitFit result to Hugging Face transformers (or a PEFT adapter), checked by their forward pass.

    python -m fairseq_ext.tools.export_hf --base MODEL_DIR --delta D.delta.safetensors --out DIR
    python -m fairseq_ext.tools.export_hf --base MODEL_DIR --checkpoint checkpoint_best.pt --out DIR
    python -m fairseq_ext.tools.export_hf --base MODEL_DIR --delta D.delta.safetensors --format peft --out DIR
    python -m fairseq_ext.tools.export_hf --base MODEL_DIR --out DIR      # the encoder alone

DIR then loads with ``AutoModelForSequenceClassification.from_pretrained(DIR)`` and
``AutoTokenizer.from_pretrained(DIR)`` (a mean-pooled head, as the embedded MiniLM's: add
``trust_remote_code=True``), or, for ``--format peft``, with ``PeftModel.from_pretrained(base, DIR)``.
What is written and why: ``fairseq_ext.plugin.models.hf_export``.
"""
import argparse
import warnings

from ..core.errors import exit_on_user_error, quiet_cli_logging
from ..plugin.checkpoints import add_trust_checkpoint_argument
from ..plugin.models.hf_export import FORMATS, export


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fairseq_ext.tools.export_hf",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, metavar="MODEL_DIR",
                        help="the model folder the run started from (its tokenizer is exported too)")
    parser.add_argument("--delta", metavar="FILE", help="the run's delta (checkpoint_best.delta.safetensors)")
    parser.add_argument("--checkpoint", metavar="FILE", help="a full fine-tuned checkpoint instead of a delta")
    parser.add_argument("--out", required=True, metavar="DIR", help="a new (or empty) folder to write")
    parser.add_argument("--format", choices=FORMATS, default="hf",
                        help="hf: a transformers model folder (default); peft: a PEFT adapter (BEFT vectors and "
                             "modules_to_save) over the unmodified Hugging Face base")
    parser.add_argument("--force", action="store_true",
                        help="export even if --base is not the base the delta was trained from (a warning)")
    add_trust_checkpoint_argument(parser)
    args = parser.parse_args(argv)
    quiet_cli_logging()
    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()  # the export's own lines are its output
    transformers_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations inside transformers and PEFT
    export(args.base, args.out, delta=args.delta, checkpoint=args.checkpoint, fmt=args.format, force=args.force,
           trust_checkpoint=args.trust_checkpoint)


if __name__ == "__main__":
    main()
