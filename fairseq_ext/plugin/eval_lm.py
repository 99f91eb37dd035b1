"""fairseq-eval-lm from a base language model plus a BitFit delta (``tools.eval_lm``'s work).

``eval_lm(argv)`` takes fairseq-eval-lm's command line plus ``--delta`` and returns fairseq's results
(``loss`` in base 2, ``perplexity``); the model for ``--path`` is built in memory from the base and the
delta (``plugin.language_models``), no merged checkpoint written.  Experiments call it directly.
"""
import ast
import warnings

from fairseq import options, utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from ..core.delta_file import read_delta
from ..core.errors import UserError, one_line
from .checkpoints import add_trust_checkpoint_argument, checked_path_option
from .language_models import LanguageModelPredictor, check_language_model
from .patches import ensemble_in_memory


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
    return checked_path_option(cfg.common_eval.path, "the checkpoint to evaluate (with --delta: its run's base)")


def model_overrides(cfg) -> dict:
    try:
        overrides = ast.literal_eval(cfg.common_eval.model_overrides)
    except (ValueError, SyntaxError):
        overrides = None
    if not isinstance(overrides, dict):
        raise UserError(f"--model-overrides {cfg.common_eval.model_overrides}: not a Python dict literal")
    return overrides


def eval_lm(argv):
    """Run fairseq-eval-lm on ``argv``; returns its results (``loss`` in base 2, ``perplexity``)."""
    argv = list(argv)
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
