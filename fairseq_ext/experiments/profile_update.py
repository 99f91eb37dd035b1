"""Where one update's time goes: train.py against the grouped transformers loop, under torch.profiler.

For each mode, the two loops of ``speed_vs_hf`` that a user would pick (both with
length-grouped batches: train.py as the GLUE runner starts it, the transformers loop with
``LengthGroupedSampler`` and fused AdamW) train on the same real GLUE task and model.  After
``--warmup`` updates, the profiler records ``--updates`` whole loop iterations (loading the
batch, the update, everything between two updates).  Reported per update: the wall time, the
time inside each named scope (``forward``, ``backward``, ``optimizer``, and train.py's
``multiply-grads``, ``clip-grads``, ``reduce-grads``; the reference loop names its own
``forward``/``backward``/``optimizer`` alike), what falls outside them, the padded tokens,
the number of operator calls, and the operators with the most self time.

    python -m fairseq_ext.experiments.profile_update --glue-dir glue_data --task STS-B \\
        --modes bitfit-all full --output-dir outputs/profile_update
"""
import gc
import sys
import time
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Sequence

import torch
from torch.profiler import ProfilerActivity, profile

from ..core.errors import UserError, exit_on_user_error
from ..core.files import write_report
from ..core.glue_files import read_split
from ..core.timing_cli import glue_task, timing_parser
from ..plugin.models.pretrained import package_model_folder
from ..training.glue_recipe import LENGTH_GROUP_BATCHES, Recipe, train_command
from ..training.hf_reference_loop import ReferenceLoop, check_loop_modes
from ..training.main import cli_main
from ..training.options import BITFIT_PREFIX, FULL
from ..training.timed_updates import TimingTask, prepared_timing_task
from ..training.trainer import BitFitTrainer

SCOPES = ("forward", "backward", "reduce-grads", "multiply-grads", "clip-grads", "optimizer")
TOP_OPERATORS = 12


class ProfileWindow:
    """Starts the profiler after ``warmup`` updates and stops it ``updates`` later; the window's summary."""

    def __init__(self, warmup: int, updates: int):
        self.warmup, self.updates = warmup, updates
        self.done, self.tokens = 0, []
        self.profiler, self.started, self.seconds = None, None, None

    def after_update(self, padded_tokens: int) -> bool:
        """Call after each update; True once the window is over."""
        self.done += 1
        if self.warmup < self.done <= self.warmup + self.updates:
            self.tokens.append(padded_tokens)
        if self.done == self.warmup:
            self.profiler = profile(activities=[ProfilerActivity.CPU])
            self.profiler.__enter__()
            self.started = time.perf_counter()
        elif self.done == self.warmup + self.updates:
            self.seconds = time.perf_counter() - self.started
            self.profiler.__exit__(None, None, None)
        return self.done >= self.warmup + self.updates

    def summary(self) -> dict:
        if self.seconds is None:
            raise UserError(f"the run ended after {self.done} updates, before the profiled window's "
                            f"{self.warmup + self.updates}: lower --warmup or --updates")
        scopes: Dict[str, float] = defaultdict(float)
        operators: Dict[str, float] = defaultdict(float)
        calls = 0
        for event in self.profiler.events():
            if event.name in SCOPES:
                scopes[event.name] += event.cpu_time_total / 1000.0 / self.updates  # µs to ms per update
        for average in self.profiler.key_averages():
            if average.key.startswith("aten::"):
                calls += average.count
                operators[average.key] += average.self_cpu_time_total / 1000.0 / self.updates
        wall = self.seconds * 1000.0 / self.updates
        named = {name: round(scopes.get(name, 0.0), 1) for name in SCOPES}
        return {"update_ms": round(wall, 1), "scopes_ms": named,
                "outside_scopes_ms": round(wall - sum(named.values()), 1),
                "padded_tokens": round(sum(self.tokens) / len(self.tokens)),
                "aten_calls": round(calls / self.updates),
                "top_self_ms": {name: round(ms, 1) for name, ms in
                                sorted(operators.items(), key=lambda item: -item[1])[:TOP_OPERATORS]}}


def profile_train_py(task: TimingTask, mode: str, recipe: Recipe, window: ProfileWindow, extra: Sequence[str]) -> dict:
    class ProfiledTrainer(BitFitTrainer):
        def train_step(self, samples, raise_oom=False):
            output = super().train_step(samples, raise_oom)
            window.after_update(int(samples[0]["net_input"]["src_tokens"].numel()))
            return output

    argv = train_command(task.spec, task.model, task.data_dir, task.workdir / mode, mode, recipe, recipe.lrs[0], 1,
                         task.train_rows, 1, list(extra), 128).args
    cli_main(argv + ["--no-save", "--disable-validation", "--log-interval", "1000",
                     "--max-update", str(window.warmup + window.updates)], trainer_class=ProfiledTrainer)
    return window.summary()


class _WindowOver(Exception):
    pass


def profile_transformers(spec, glue_dir: Path, mode: str, recipe: Recipe, window: ProfileWindow) -> dict:
    loop = ReferenceLoop(package_model_folder(), spec, FULL if mode == FULL else mode[len(BITFIT_PREFIX):])
    collate, shapes = loop.collate, []

    def collate_and_count(examples):
        batch = collate(examples)
        shapes.append(int(batch["input_ids"].numel()))
        return batch

    def on_step(done, total):
        if window.after_update(shapes[-1]):
            raise _WindowOver

    loop.collate = collate_and_count
    try:
        loop.train(read_split(spec.name, glue_dir, "train"), read_split(spec.name, glue_dir, "valid"),
                   recipe.epochs, recipe.batch, recipe.lrs[0], recipe.weight_decay, on_step=on_step,
                   grouped_batches=LENGTH_GROUP_BATCHES, fused_adamw=True)
    except _WindowOver:
        pass
    return window.summary()


def markdown(rows: List[dict]) -> str:
    lines = ["| mode | system | update (ms) | " + " | ".join(SCOPES) + " | outside | padded tokens | aten calls |",
             "|---|---|" + "---:|" * (len(SCOPES) + 4)]
    for row in rows:
        scopes = " | ".join(f"{row['scopes_ms'][name]:.1f}" for name in SCOPES)
        lines.append(f"| {row['mode']} | {row['system']} | {row['update_ms']:.1f} | {scopes} | "
                     f"{row['outside_scopes_ms']:.1f} | {row['padded_tokens']:,} | {row['aten_calls']:,} |")
    lines.append("")
    for row in rows:
        top = ", ".join(f"{name[6:]} {ms:.1f}" for name, ms in row["top_self_ms"].items())
        lines.append(f"- {row['mode']}, {row['system']}: self ms per update: {top}")
    return "\n".join(lines) + "\n"


def build_parser():
    parser = timing_parser("profile_update", __doc__, ["bitfit-all", FULL])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--updates", type=int, default=20)
    return parser


@exit_on_user_error
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    glue_dir, spec = glue_task(args)
    check_loop_modes(args.modes)
    if args.warmup < 1 or args.updates < 1:
        raise UserError("--warmup and --updates: expected positive integers")
    rows = []
    with prepared_timing_task(glue_dir, spec, "profile-update-") as task:
        for mode in args.modes:
            recipe = Recipe((5e-5 if mode == FULL else 1e-3,), args.batch, 1, 0.0, None, "profile_update")
            for system in ("transformers grouped", "train.py grouped"):
                print(f"{spec.name} {mode}: {system} ...", file=sys.stderr, flush=True)
                window = ProfileWindow(args.warmup, args.updates)
                if system == "train.py grouped":
                    summary = profile_train_py(task, mode, recipe, window, args.train_py_args.split())
                else:
                    summary = profile_transformers(spec, glue_dir, mode, recipe, window)
                rows.append({"task": spec.name, "mode": mode, "system": system, "threads": torch.get_num_threads(),
                             "train_py_args": args.train_py_args, **summary})
                gc.collect()
    written = write_report(args.output_dir, "profile_update", rows, markdown(rows))
    print(markdown(rows))
    print(written)


if __name__ == "__main__":
    main()
