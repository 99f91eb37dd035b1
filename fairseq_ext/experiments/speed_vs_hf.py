"""Epochs of real GLUE data: train.py against the plain Hugging Face transformers loop, side by side.

For each mode (``full``, ``bitfit-all``, ...) one process trains, one after another on
the same machine, the same model (the embedded MiniLM unless --model), data, batch
size, learning-rate schedule and trainable set:

* ``transformers``: the loop a user would otherwise write (``training.hf_reference_loop``:
  random batches with dynamic padding, torch's default AdamW);
* ``transformers grouped``: the same loop at its best, the fair peer: transformers'
  ``LengthGroupedSampler`` (what Trainer's ``group_by_length=True`` uses) with the GLUE
  runner's megabatches of 50 batches, and torch's fused AdamW;
* ``train.py``: train.py with fairseq's random batches;
* ``train.py grouped``: train.py with length-grouped batches (``--group-by-length``, the
  GLUE runner's default);
* ``train.py grouped bf16 base``: the same with ``--bf16`` (frozen base in bf16, trained
  tensors and Adam's state in fp32), for BitFit modes where the GLUE runner picks it by
  default: a CPU with native bf16 (``--bf16-base auto``), or always (``on``).

An epoch's time runs from its first update's start to its last update's end (batches
and updates, no validation).  The report gives each epoch's time and dev metrics, the best
epoch's score, and each system's median epoch time over the random-batch transformers loop's
and over the grouped one's.  ``--recipe defaults`` trains each mode at the GLUE runner's
default recipe for the model and task (lr, batch, epochs, weight decay; every epoch, the best
one reported), and ``--train-subset`` on the runner's seeded sample of training rows: the
dev scores then compare train.py with the plain transformers loop at the table's settings.

    python -m fairseq_ext.experiments.speed_vs_hf --glue-dir glue_data --task STS-B --epochs 3 \\
        --modes full bitfit-all --output-dir outputs/speed_vs_hf
"""
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from ..core.errors import UserError, exit_on_user_error
from ..core.files import write_report
from ..core.glue_files import read_split
from ..core.progress import ConsoleProgress, format_duration
from ..core.run_record import RECORD_NAME, epoch_stats, read_run_record
from ..core.timing_cli import glue_task, timing_parser
from ..plugin.checkpoints import checkpoint_parameter_count
from ..plugin.data.glue_prepare import apply_train_subset, prepare_task
from ..plugin.models import hf_import
from ..plugin.models.model_dir import load_model_dir
from ..plugin.models.pretrained import default_model_dir, package_model_folder
from ..training.glue_recipe import LENGTH_GROUP_BATCHES, Recipe, default_recipe, train_command
from ..training.hf_reference_loop import ReferenceLoop, check_loop_modes
from ..training.main import cli_main
from ..training.launch import cpu_native_bf16
from ..training.options import BITFIT_PREFIX, FULL
from ..training.trainer import BitFitTrainer

SYSTEMS = ("transformers", "transformers grouped", "train.py", "train.py grouped")
PEER = "transformers grouped"  # what a transformers user runs at best: the speed claim's reference
BF16_BASE = "train.py grouped bf16 base"
TRAIN_SUBSET_SEED = 1  # the GLUE runner's (prepare_task's default)
FLAG_RECIPE = (("--epochs", int, 3), ("--batch", int, 32), ("--lr-full", float, 5e-5), ("--lr-bitfit", float, 1e-3))


def time_train_py(spec, model, data_dir: Path, workdir: Path, mode: str, recipe: Recipe, grouped: bool,
                  train_rows: int, extra: Tuple[str, ...] = (), label: str = "train.py",
                  seed: int = 1) -> Tuple[List[dict], int]:
    """train.py in this process on prepared data; each epoch's update time and dev metrics, and the
    parameters it trained. Progress (updates, speed, ETA) goes to stderr under ``label``."""
    steps: List[tuple] = []  # (epoch, start, end) of every update
    save_dir = workdir / f"{mode}-{'grouped' if grouped else 'random'}{''.join(extra)}"
    command = train_command(spec, model, data_dir, save_dir, mode, recipe, recipe.lrs[0], seed, train_rows, 1,
                            list(extra), 128)
    progress = ConsoleProgress(label, command.total_updates, stream=sys.stderr)

    class EpochTimedTrainer(BitFitTrainer):
        def train_step(self, samples, raise_oom=False):
            start = time.perf_counter()
            output = super().train_step(samples, raise_oom)
            if self.cuda:
                torch.cuda.synchronize()  # the update's device work belongs to its time
            steps.append((self._epoch_of_update, start, time.perf_counter()))
            progress.update(len(steps), detail=f"epoch {self._epoch_of_update}/{recipe.epochs}")
            return output

        def begin_epoch(self, epoch):
            self._epoch_of_update = epoch
            return super().begin_epoch(epoch)

    argv = command.args
    if not grouped:
        argv[argv.index("--group-by-length") + 1] = "0"
    cli_main(argv + ["--no-save", "--log-interval", "1000"], trainer_class=EpochTimedTrainer)
    progress.close()
    record = read_run_record(save_dir / RECORD_NAME)
    dev = epoch_stats(record, "valid")
    epochs = []
    for epoch in sorted({e for e, _, _ in steps}):
        times = [(start, end) for e, start, end in steps if e == epoch]
        metrics = {k: round(float(v), 2) for k, v in dev.get(epoch, {}).items() if k in spec.metrics}
        epochs.append({"epoch": epoch, "seconds": round(times[-1][1] - times[0][0], 2), "updates": len(times),
                       "dev": metrics})
    return epochs, record["parameters"]["trainable"]


def time_transformers(spec, glue_dir: Path, hf_folder: Path, mode: str, recipe: Recipe, grouped: bool,
                      fp16: bool = False, train_subset: Optional[int] = None,
                      label: str = "transformers", seed: int = 1) -> Tuple[List[dict], int]:
    """The transformers loop; each epoch's update time and dev metrics, and the parameters it trained.
    Progress (updates, speed, ETA) goes to stderr under ``label``."""
    terms = FULL if mode == FULL else mode[len(BITFIT_PREFIX):]
    loop = ReferenceLoop(hf_folder, spec, terms, seed=seed, device="cuda" if torch.cuda.is_available() else "cpu",
                         amp=fp16)
    train_rows = read_split(spec.name, glue_dir, "train")
    apply_train_subset(train_rows, train_subset, TRAIN_SUBSET_SEED)  # the rows train.py's prepared data holds
    progress = ConsoleProgress(label, None, stream=sys.stderr)

    def on_step(done: int, total: int) -> None:
        progress.total = total
        progress.update(done)
    results = loop.train(train_rows, read_split(spec.name, glue_dir, "valid"),
                         recipe.epochs, recipe.batch, recipe.lrs[0], recipe.weight_decay, on_step=on_step,
                         grouped_batches=LENGTH_GROUP_BATCHES if grouped else 0, fused_adamw=grouped)
    progress.close()
    epochs = [{"epoch": r.epoch, "seconds": round(r.seconds, 2), "updates": r.updates,
               "dev": {k: v for k, v in r.dev.items() if k in spec.metrics}} for r in results]
    return epochs, loop.trainable


def markdown(rows: List[dict]) -> str:
    lines = ["| mode | system | trained params | epoch time (s), median | / transformers | / transformers grouped "
             "| updates / epoch | best dev (epoch) | dev metrics by epoch |",
             "|---|---|---:|---:|---:|---:|---:|---|---|"]
    for row in rows:
        dev = "; ".join(f"{e['epoch']}: " + ", ".join(f"{k} {v:.1f}" for k, v in e["dev"].items())
                        for e in row["epochs"])
        ratios = ["–" if row[key] is None else f"{row[key]:.2f}"
                  for key in ("ratio_to_transformers", "ratio_to_transformers_grouped")]
        best = row["best_dev"]
        best_text = "–" if best is None else f"{best['score']:.1f} ({best['epoch']})"
        lines.append(f"| {row['mode']} | {row['system']} | {row['trainable']:,} | {row['epoch_seconds']:.1f} "
                     f"| {' | '.join(ratios)} | {row['epochs'][0]['updates']} | {best_text} | {dev} |")
    return "\n".join(lines) + "\n"


def best_dev(epochs: List[dict], spec) -> Optional[dict]:
    """The epoch with the best score on the task's primary metric (the earliest of equals), as the GLUE
    runner picks a run's best checkpoint; its score."""
    scored = [(e["dev"][spec.primary_metric], -e["epoch"]) for e in epochs if spec.primary_metric in e["dev"]]
    if not scored:
        return None
    score, negative_epoch = max(scored)
    return {"epoch": -negative_epoch, "metric": spec.primary_metric, "score": score}


def loop_recipe(args, mode: str, task: str, train_rows: int, model_params: int) -> Recipe:
    """What each system trains a mode with: the flags' settings, or the GLUE runner's default recipe (every
    epoch trained: the loops have no early stopping, and the best epoch is reported)."""
    if args.recipe == "defaults":
        recipe = default_recipe(mode, task, train_rows, model_params)
        return Recipe(recipe.lrs[:1], recipe.batch, recipe.epochs, recipe.weight_decay, None,
                      f"the GLUE runner's default: {recipe.rule}")
    lr = args.lr_full if mode == FULL else args.lr_bitfit
    return Recipe((lr,), args.batch, args.epochs, 0.0, None, "speed_vs_hf's flags")


def build_parser():
    parser = timing_parser("speed_vs_hf", __doc__, [FULL, "bitfit-all"])
    parser.add_argument("--model", default=None, help="a Hugging Face BERT/RoBERTa folder (imported for train.py); "
                        "default: the embedded MiniLM")
    parser.add_argument("--fp16", action="store_true", help="on a GPU: train.py --fp16, the transformers loop with "
                        "fp16 AMP (autocast and a gradient scaler)")
    parser.add_argument("--recipe", choices=("flags", "defaults"), default="flags",
                        help="flags: --epochs, --batch and --lr-* with no weight decay (the speed measurement); "
                        "defaults: each mode at the GLUE runner's default recipe for this model and task")
    for flag, kind, default in FLAG_RECIPE:
        parser.add_argument(flag, type=kind, default=None, help=f"with --recipe flags (default {default:g})")
    parser.add_argument("--train-subset", type=int, default=None, metavar="N",
                        help="train on the GLUE runner's seeded sample of N training rows (its TRAIN_SUBSET)")
    parser.add_argument("--systems", nargs="+", choices=SYSTEMS + (BF16_BASE,), default=None, metavar="SYSTEM",
                        help="the systems to train (default: all; the speed claim needs the peer, "
                        "'transformers grouped')")
    parser.add_argument("--seed", type=int, default=1, help="every system's seed (the head's initialisation, "
                        "the batches' order); the training rows of --train-subset stay the runner's sample")
    parser.add_argument("--bf16-base", choices=("auto", "on", "off"), default="auto",
                        help="the BitFit row with --bf16: auto where the CPU has native bf16, as the GLUE runner")
    return parser


@exit_on_user_error
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    glue_dir, spec = glue_task(args)
    check_loop_modes(args.modes)
    for flag, _, default in FLAG_RECIPE:
        name = flag[2:].replace("-", "_")
        if args.recipe == "defaults" and getattr(args, name) is not None:
            raise UserError(f"{flag}: not with --recipe defaults, whose recipe sets it")
        setattr(args, name, default if getattr(args, name) is None else getattr(args, name))
    if args.epochs < 1:
        raise UserError(f"--epochs {args.epochs}: expected a positive integer")
    if args.train_subset is not None and args.train_subset < 1:
        raise UserError(f"--train-subset {args.train_subset}: expected a positive integer")
    args.systems = set(args.systems or SYSTEMS + (BF16_BASE,))
    if args.fp16 and not torch.cuda.is_available():
        raise UserError("--fp16 needs a CUDA device (on CPU, --bf16-base gives BitFit its bf16 row)")
    rows: List[dict] = []
    with tempfile.TemporaryDirectory(prefix="speed-vs-hf-") as tmp:
        workdir = Path(tmp)
        hf_folder = Path(args.model) if args.model else package_model_folder()
        model = load_model_dir(hf_import.convert(hf_folder, workdir / "model", report=None) if args.model
                               else default_model_dir())
        precision = ("--fp16",) if args.fp16 else ()
        manifest = prepare_task(spec, glue_dir, model, model.dictionary, workdir / "data", 1,
                                train_subset=args.train_subset, train_subset_seed=TRAIN_SUBSET_SEED)
        train_rows = manifest["splits"]["train"]["rows_written"]
        for mode in args.modes:
            recipe = loop_recipe(args, mode, spec.name, train_rows, checkpoint_parameter_count(model.checkpoint))
            lr = recipe.lrs[0]
            print(f"{spec.name} {mode}: lr {lr:g}, batch {recipe.batch}, {recipe.epochs} epochs, weight decay "
                  f"{recipe.weight_decay:g}, seed {args.seed}, {train_rows:,} training rows ({recipe.rule})",
                  file=sys.stderr, flush=True)
            by_system: Dict[str, List[dict]] = {}
            trained: Dict[str, int] = {}
            bf16_row = mode != FULL and not torch.cuda.is_available() and (
                args.bf16_base == "on" or (args.bf16_base == "auto" and cpu_native_bf16() is not None))
            for system in [name for name in SYSTEMS + ((BF16_BASE,) if bf16_row else ()) if name in args.systems]:
                start = time.time()
                label = f"{spec.name} {mode} {system}"
                print(f"{label}: {recipe.epochs} epochs ...", file=sys.stderr, flush=True)
                if system in ("transformers", PEER):
                    by_system[system], trained[system] = time_transformers(
                        spec, glue_dir, hf_folder, mode, recipe, system == PEER, args.fp16, args.train_subset, label,
                        args.seed)
                else:
                    by_system[system], trained[system] = time_train_py(
                        spec, model, workdir / "data", workdir, mode, recipe, "grouped" in system, train_rows,
                        (("--bf16",) if system == BF16_BASE else precision) + tuple(args.train_py_args.split()), label,
                        args.seed)
                gc.collect()
                print(f"  done in {format_duration(time.time() - start)}: "
                      + json.dumps(by_system[system]), file=sys.stderr, flush=True)
            medians = {system: statistics.median(e["seconds"] for e in epochs) for system, epochs in by_system.items()}
            for system, epochs in by_system.items():
                median = medians[system]
                rows.append({"task": spec.name, "mode": mode, "system": system, "batch": recipe.batch, "lr": lr,
                             "weight_decay": recipe.weight_decay, "train_rows": train_rows, "recipe": recipe.rule,
                             "seed": args.seed,
                             "trainable": trained[system], "epoch_seconds": round(median, 2), "epochs": epochs,
                             "best_dev": best_dev(epochs, spec),
                             "train_py_args": args.train_py_args if system.startswith("train.py") else "",
                             "ratio_to_transformers": None if "transformers" not in medians or system == "transformers"
                             else round(median / medians["transformers"], 3),
                             "ratio_to_transformers_grouped": None if system == PEER or PEER not in medians
                             else round(median / medians[PEER], 3),
                             "threads": torch.get_num_threads()})
    written = write_report(args.output_dir, "speed_vs_hf", rows, markdown(rows))
    print(markdown(rows))
    print(written)


if __name__ == "__main__":
    main()
