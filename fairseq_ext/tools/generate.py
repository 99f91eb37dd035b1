"""fairseq-generate (and fairseq-interactive) from a base model plus a BitFit delta: seq2seq or language model.

    python -m fairseq_ext.tools.generate DATA --path BASE.pt --delta D.delta.safetensors [fairseq-generate options]
    python -m fairseq_ext.tools.generate --interactive DATA --path BASE.pt --delta D.delta.safetensors < input.txt

This is fairseq's own generation (``fairseq_cli.generate``, or ``fairseq_cli.interactive`` with
``--interactive``) with every one of its options (--beam, --lenpen, --max-len-b, --nbest,
--gen-subset, --scoring sacrebleu, --results-path, --model-overrides...); its model is built in
memory from --path (the checkpoint the BitFit run started from) and --delta, with no merged
checkpoint written (``fairseq_ext.plugin.seq2seq``).  DATA's dictionaries and the languages must
be the delta's run's.  A language-model delta (``--task language_modeling``) samples continuations
of the prompts given to --interactive (or of DATA's --gen-subset) with fairseq's generation options for
language models (--sampling, --sampling-topk, --sampling-topp, --temperature, --beam 1, --max-len-b...);
its model is built the same way (``fairseq_ext.plugin.language_models``).  Without --delta it is fairseq-generate with this package's safe
checkpoint loading (a merged checkpoint from ``fairseq_ext.tools.delta apply``, for instance).
"""
import ast
import sys
import warnings

from fairseq import options, tasks, utils
from fairseq.dataclass.utils import convert_namespace_to_omegaconf

from ..core.delta_file import read_delta
from ..core.errors import UserError, exit_on_user_error, one_line
from ..plugin import patches
from ..plugin.checkpoints import add_trust_checkpoint_argument, checked_path_option
from ..plugin.language_models import LanguageModelPredictor, check_language_model_task
from ..plugin.seq2seq import Seq2SeqPredictor, check_generates
from ..plugin.task_families import LANGUAGE_MODEL

INTERACTIVE = "--interactive"


def build_parser(interactive: bool):
    """fairseq-generate's parser (fairseq-interactive's with ``interactive``), plus --delta."""
    parser = options.get_generation_parser(interactive=interactive)
    parser.prog = "python -m fairseq_ext.tools.generate" + (f" {INTERACTIVE}" if interactive else "")
    group = parser.add_argument_group("BitFit delta")
    group.add_argument("--delta", metavar="FILE",
                       help="a seq2seq or language-model BitFit delta (.delta.safetensors) of a run that started from --path: "
                            "generate from --path with the delta's tensors, no merged checkpoint written")
    add_trust_checkpoint_argument(group, flag="--path")
    return parser


def setup_task(cfg):
    """The task fairseq's generation will set up from the same options: its dictionaries and languages."""
    try:
        return tasks.setup_task(cfg.task)
    except Exception as error:  # fairseq raises bare Exceptions (an ambiguous language pair), and file errors
        raise UserError(f"{cfg.task.data}: cannot set up task {cfg.task._name}: {one_line(error)}") from None


@exit_on_user_error
def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    interactive = INTERACTIVE in argv
    argv = [arg for arg in argv if arg != INTERACTIVE]
    args = options.parse_args_and_arch(build_parser(interactive), input_args=argv)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # fairseq composes its config through hydra's deprecated APIs
        cfg = convert_namespace_to_omegaconf(args)
    checked_path_option(cfg.common_eval.path, "the checkpoint to generate from (with --delta: its run's base)")
    paths = utils.split_paths(cfg.common_eval.path)
    if interactive:
        import fairseq_cli.interactive as fairseq_generation
    else:
        import fairseq_cli.generate as fairseq_generation
    if args.delta is None:
        fairseq_generation.main(cfg)
        return
    if len(paths) != 1:
        raise UserError(f"--path {cfg.common_eval.path}: with --delta, one base checkpoint (no ensemble)")
    delta = read_delta(args.delta)
    if delta.kind != LANGUAGE_MODEL:
        check_generates(delta, f"--delta {args.delta}")
    try:
        model_overrides = ast.literal_eval(cfg.common_eval.model_overrides)
    except (ValueError, SyntaxError):
        raise UserError(f"--model-overrides {cfg.common_eval.model_overrides}: not a Python dict literal") from None
    if delta.kind == LANGUAGE_MODEL:
        sample_language_model(cfg, args, delta, paths[0], model_overrides, fairseq_generation)
        return
    predictor = Seq2SeqPredictor(paths[0], task=setup_task(cfg), trust_checkpoint=args.trust_checkpoint,
                                 model_overrides=model_overrides, base_flag="--path")
    predictor.add_task(args.delta, delta)
    predictor.use(args.delta)
    # fairseq's own loop runs with the model built above for --path (its overrides applied, its task's
    # dictionaries checked), and the run's config as the checkpoint's.
    with patches.models_in_memory({paths[0]: lambda overrides, task: ([predictor.model], predictor.cfg)}):
        fairseq_generation.main(cfg)


def sample_language_model(cfg, args, delta, path, model_overrides, fairseq_generation) -> None:
    """fairseq's generation loop on base + a language-model delta.  The model is built where fairseq
    loads its checkpoint, after it seeded its RNG, drawing the random init as fairseq's loading does:
    sampling with --seed draws what fairseq draws from the merged checkpoint."""
    source = f"--delta {args.delta}"
    check_language_model_task(setup_task(cfg), delta, source)  # bad input stops before fairseq starts

    def load(overrides, task):
        predictor = LanguageModelPredictor(path, task=task, trust_checkpoint=args.trust_checkpoint,
                                           model_overrides=model_overrides, base_flag="--path",
                                           draw_init_as_fairseq=True)
        predictor.add_task(args.delta, delta)
        predictor.use(args.delta)
        return [predictor.model], predictor.cfg

    with patches.models_in_memory({path: load}):
        fairseq_generation.main(cfg)

if __name__ == "__main__":
    main()
