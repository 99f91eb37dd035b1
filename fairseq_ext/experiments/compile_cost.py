"""Does ``torch.compile`` pay for its compile time within a train.py run?

For each mode, train.py trains the same real GLUE task twice in one process, as the GLUE
runner starts it (length-grouped batches, the same seed, so the same batches in the same
order): eagerly, and with the model compiled in place (``nn.Module.compile``: parameter
names, checkpoints and deltas stay as they are) before its first update.  Each update is
timed on its own; with the batches paired, ``eager - compiled`` per update is what
compiling saved on that batch (negative while it compiles, and on any recompile later).

Reported per mode: the eager and compiled steady update (median of the second half),
the net seconds gained over the measured window, the steady saving per update, the
updates needed to pay back the window's deficit, and the runner's default run on that
task (its epochs × updates per epoch), so the verdict reads: pays within a typical run,
or not.  Validation is off in the window; a real run compiles its evaluation graph once
more on top.

    python -m fairseq_ext.experiments.compile_cost --glue-dir glue_data --task STS-B \\
        --modes bitfit-all full --updates 200 --output-dir outputs/compile_cost
"""
import gc
import itertools
import math
import statistics
import sys
from typing import List, Optional, Sequence

import torch

from ..core.errors import UserError, exit_on_user_error
from ..core.files import write_report
from ..core.timing_cli import glue_task, timing_parser
from ..training.glue_recipe import Recipe, default_recipe, train_command
from ..training.options import FULL
from ..training.timed_updates import TimingTask, check_train_py_modes, prepared_timing_task, train_timed

BACKENDS = ("inductor", "aot_eager", "eager")


def timed_updates(task: TimingTask, mode: str, recipe: Recipe, updates: int, compile_backend: Optional[str],
                  extra: Sequence[str]) -> List[float]:
    """Seconds of each of ``updates`` train.py updates; the model compiled first when ``compile_backend``."""
    def compile_model(trainer):
        trainer.model.compile(backend=compile_backend, dynamic=True)

    label = f"{mode}-{compile_backend or 'eager'}"
    argv = train_command(task.spec, task.model, task.data_dir, task.workdir / label, mode, recipe, recipe.lrs[0], 1,
                         task.train_rows, 1, list(extra), 128).args
    times = train_timed(argv, updates, compile_model if compile_backend else None)
    torch._dynamo.reset()
    return [update.seconds for update in times]


def compare(eager: Sequence[float], compiled: Sequence[float], run_updates: int) -> dict:
    """The paired comparison of one mode's two runs (seconds per update, the same batches in order)."""
    if len(eager) != len(compiled) or len(eager) < 4:
        raise UserError(f"expected two equal runs of at least 4 updates, got {len(eager)} and {len(compiled)}")
    saved = [e - c for e, c in zip(eager, compiled)]
    half = len(saved) // 2
    steady_saving = statistics.median(saved[half:])
    running = list(itertools.accumulate(saved))
    net = running[-1]
    if net >= 0:
        break_even: Optional[int] = next(i + 1 for i, total in enumerate(running) if total >= 0)
    elif steady_saving > 0:
        break_even = len(saved) + math.ceil(-net / steady_saving)
    else:
        break_even = None  # compiled is not faster once warm: it never pays back
    return {"updates": len(saved), "eager_steady_ms": round(1000 * statistics.median(eager[half:]), 1),
            "compiled_steady_ms": round(1000 * statistics.median(compiled[half:]), 1),
            "first_update_s": round(compiled[0], 1), "net_s": round(net, 1),
            "steady_saving_ms": round(1000 * steady_saving, 1), "break_even_updates": break_even,
            "run_updates": run_updates, "pays": break_even is not None and break_even <= run_updates}


def markdown(rows: List[dict]) -> str:
    lines = ["| task | mode | backend | eager update (ms) | compiled update (ms) | first compiled update (s) | "
             "net over the window (s) | steady saving (ms/update) | pays back after | runner's run | pays |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for row in rows:
        even = "never" if row["break_even_updates"] is None else f"{row['break_even_updates']:,} updates"
        lines.append(f"| {row['task']} | {row['mode']} | {row['backend']} | {row['eager_steady_ms']:.1f} | "
                     f"{row['compiled_steady_ms']:.1f} | {row['first_update_s']:.1f} | {row['net_s']:+.1f} | "
                     f"{row['steady_saving_ms']:+.1f} | {even} | {row['run_updates']:,} updates | "
                     f"{'yes' if row['pays'] else 'no'} |")
    return "\n".join(lines) + "\n"


def build_parser():
    parser = timing_parser("compile_cost", __doc__, ["bitfit-all", FULL])
    parser.add_argument("--updates", type=int, default=200, help="updates timed in each run")
    parser.add_argument("--backend", default="inductor", choices=BACKENDS,
                        help="torch.compile's backend (inductor: what a user gets by default)")
    return parser


@exit_on_user_error
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    glue_dir, spec = glue_task(args)
    check_train_py_modes(args.modes)  # any train.py mode: this compares train.py with itself
    if args.updates < 4:
        raise UserError("--updates: expected at least 4")
    rows = []
    with prepared_timing_task(glue_dir, spec, "compile-cost-") as task:
        for mode in args.modes:
            recipe = default_recipe(mode, spec.name, task.train_rows, task.model_params)
            runs = {}
            for backend in (None, args.backend):
                print(f"{spec.name} {mode}: {backend or 'eager'}, {args.updates} updates ...", file=sys.stderr,
                      flush=True)
                runs[backend] = timed_updates(task, mode, recipe, args.updates, backend, args.train_py_args.split())
                gc.collect()
            run_updates = recipe.epochs * math.ceil(task.train_rows / recipe.batch)
            rows.append({"task": spec.name, "mode": mode, "backend": args.backend, "threads": torch.get_num_threads(),
                         "train_py_args": args.train_py_args, **compare(runs[None], runs[args.backend], run_updates),
                         "eager_s": [round(s, 4) for s in runs[None]],
                         "compiled_s": [round(s, 4) for s in runs[args.backend]]})
    written = write_report(args.output_dir, "compile_cost", rows, markdown(rows))
    print(markdown(rows))
    print(written)


if __name__ == "__main__":
    main()
