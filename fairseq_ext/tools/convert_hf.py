"""Convert a Hugging Face BERT, RoBERTa or OPT folder into a fairseq model folder, offline.

    python -m fairseq_ext.tools.convert_hf SRC_DIR OUT_DIR [--pooling first|mean]

config.json's model_type picks the import: bert and roberta become encoders
(``fairseq_ext.plugin.models.hf_import``, one line per tensor and a summary), opt a
``transformer_lm`` language model (``fairseq_ext.plugin.models.hf_lm_import``, a summary
with the train.py options that build it).
"""
import argparse
import logging
import sys

from ..core.errors import exit_on_user_error
from ..plugin.models.bert import POOLING_CHOICES
from ..plugin.models.hf_lm_import import convert_hf_folder


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fairseq_ext.tools.convert_hf",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("src_dir", metavar="SRC_DIR", help="Hugging Face BERT, RoBERTa or OPT folder")
    parser.add_argument("out_dir", metavar="OUT_DIR", help="new folder for the fairseq model")
    parser.add_argument("--pooling", choices=POOLING_CHOICES,
                        help="classification-head pooling to record (default: mean if the folder has a "
                             "sentence-transformers 1_Pooling/config.json asking for it, else first)")
    args = parser.parse_args(argv)
    logging.basicConfig(format="%(levelname)s | %(name)s | %(message)s", level=logging.WARNING, stream=sys.stdout,
                        force=True)
    convert_hf_folder(args.src_dir, args.out_dir, pooling=args.pooling)


if __name__ == "__main__":
    main()
