"""fairseq-eval-lm from a base language model plus a BitFit delta: perplexity, no merged checkpoint.

    python -m fairseq_ext.tools.eval_lm DATA --path BASE.pt --delta D.delta.safetensors [fairseq-eval-lm options]

This is fairseq's own evaluation (``fairseq_cli.eval_lm``) with every one of its options
(--gen-subset, --context-window, --tokens-per-sample, --sample-break-mode, --max-tokens, --batch-size,
--output-word-probs, --output-word-stats, --softmax-batch, --model-overrides, --cpu...); its model is
built in memory from --path (the checkpoint the BitFit run started from) and --delta, with no merged
checkpoint written (``fairseq_ext.plugin.language_models``).  DATA's dict.txt must be the delta's run's.
Without --delta it is fairseq-eval-lm with this package's safe checkpoint loading (a merged
checkpoint from ``fairseq_ext.tools.delta apply``, a full fine-tuning run's, or the base itself).
"""
import sys

from ..core.errors import exit_on_user_error
from ..plugin.eval_lm import eval_lm


@exit_on_user_error
def main(argv=None):
    """Run fairseq-eval-lm with --delta; returns its results (``loss`` in base 2, ``perplexity``)."""
    return eval_lm(sys.argv[1:] if argv is None else argv)


if __name__ == "__main__":
    main()
