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
import ast
import os
import sys
import warnings

from fairseq import options, utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from ..core.delta_file import read_delta
from ..core.errors import UserError, exit_on_user_error, one_line
from ..plugin.checkpoints import add_trust_checkpoint_argument, check_checkpoint_container
from ..plugin.language_models import LanguageModelPredictor, check_language_model, ensemble_in_memory


def build_parser():
    """fairseq-eval-lm's parser, plus --delta."""
    parser = options.get_eval_lm_parser()
    parser.prog = "python -m fairseq_ext.tools.eval_lm"
    group = parser.add_argument_group("BitFit delta")
    group.add_argument("--delta", metavar="FILE",
                       help="a language-model BitFit delta (.delta.safetensors) of a run that started from --path: "
                            "evaluate --path with the delta's tensors, no merged checkpoint written")
    add_trust_checkpoint_argument(group, flag="--path")
    return parser


def base_path(cfg) -> str:
    """--path, checked: one whole checkpoint file."""
    if cfg.common_eval.path is None:
        raise UserError("--path: required: the checkpoint to evaluate (with --delta: its run's base)")
    paths = utils.split_paths(cfg.common_eval.path)
    for path in paths:
        if not os.path.isfile(path):
            raise UserError(f"--path {path}: no such file")
        check_checkpoint_container(path, "--path")
    return cfg.common_eval.path


def model_overrides(cfg) -> dict:
    try:
        overrides = ast.literal_eval(cfg.common_eval.model_overrides)
    except (ValueError, SyntaxError):
        overrides = None
    if not isinstance(overrides, dict):
        raise UserError(f"--model-overrides {cfg.common_eval.model_overrides}: not a Python dict literal")
    return overrides


@exit_on_user_error
def main(argv=None):
    """Run fairseq-eval-lm; returns its results (``loss`` in base 2, ``perplexity``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = options.parse_args_and_arch(build_parser(), input_args=argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fairseq composes its config through hydra's deprecated APIs
        cfg = convert_namespace_to_omegaconf(args)
    path = base_path(cfg)
    if args.delta is None:
        return evaluate(cfg)
    if len(utils.split_paths(path)) != 1:
        raise UserError(f"--path {path}: with --delta, one base checkpoint (no ensemble)")
    delta = read_delta(args.delta)
    check_language_model(delta, f"--delta {args.delta}")
    overrides = model_overrides(cfg)

    def load(arg_overrides, task):
        # fairseq-eval-lm set up the task from DATA (its --context-window already applied): the
        # predictor checks DATA's dictionary against the delta's and builds the model for it.
        predictor = LanguageModelPredictor(path, task=task, trust_checkpoint=args.trust_checkpoint,
                                           model_overrides={**overrides, **(arg_overrides or {})},
                                           base_flag="--path", draw_init_as_fairseq=True)
        predictor.add_task(args.delta, delta)
        predictor.use(args.delta)
        return [predictor.model], predictor.cfg, task

    with ensemble_in_memory(path, load):
        return evaluate(cfg)


def evaluate(cfg):
    """fairseq-eval-lm's main; a --gen-subset DATA lacks is one line, not fairseq's traceback."""
    import fairseq_cli.eval_lm as fairseq_eval_lm

    try:
        return fairseq_eval_lm.main(cfg)
    except FileNotFoundError as error:
        raise UserError(f"--gen-subset {cfg.dataset.gen_subset}: {one_line(error)}") from None


if __name__ == "__main__":
    main()
