"""GLUE data for fairseq: prepare one task, or print what the tasks are.

    python -m fairseq_ext.tools.glue_data prepare --task CoLA --glue-dir glue_data --model-dir MODEL --out data/CoLA
    python -m fairseq_ext.tools.glue_data info [--task STS-B]

``prepare`` is ``fairseq_ext.plugin.data.glue_prepare.prepare_task``: the prepared
folder's layout and caching are described there.
"""
import argparse
import json
import logging
import os
import sys

from ..core.errors import exit_on_user_error
from ..core.glue_tasks import TASK_NAMES, TASKS, get_task_spec
from ..plugin.data.glue_prepare import prepare_task

logger = logging.getLogger("fairseq_ext.tools.glue_data")  # also when run as __main__


def _usable_cpus() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fairseq_ext.tools.glue_data", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)

    prepare = commands.add_parser("prepare", help="encode and binarize one GLUE task for fairseq")
    prepare.add_argument("--task", required=True, help=f"one of {', '.join(TASK_NAMES)} (case-insensitive)")
    prepare.add_argument("--glue-dir", required=True, help="the glue_data directory (holds CoLA/train.tsv, ...)")
    prepare.add_argument("--model-dir", required=True, help="pretrained model directory: its tokenizer and dict.txt")
    prepare.add_argument("--out", required=True, help="output directory (replaced as a whole when inputs change)")
    prepare.add_argument("--workers", type=int, default=_usable_cpus(), help="tokenizer processes (default: all CPUs)")
    prepare.add_argument(
        "--train-subset", type=int, metavar="N",
        help="keep N training rows, a seeded uniform sample kept in file order (for CPU runs); recorded in the manifest",
    )
    prepare.add_argument("--train-subset-seed", type=int, default=1, help="seed of --train-subset (default: 1)")

    info = commands.add_parser("info", help="print a task's classes, metrics and splits as JSON")
    info.add_argument("--task", help=f"one of {', '.join(TASK_NAMES)} (default: all of them)")
    return parser


@exit_on_user_error
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        specs = [get_task_spec(args.task)] if args.task else list(TASKS.values())
        summaries = [spec.summary() for spec in specs]
        print(json.dumps(summaries[0] if args.task else summaries, indent=2))
        return
    logging.basicConfig(
        format="%(asctime)s | %(levelname)s | %(name)s | %(message)s", level=logging.INFO, stream=sys.stderr, force=True
    )
    manifest = prepare_task(
        args.task, args.glue_dir, args.model_dir, None, args.out, args.workers,
        train_subset=args.train_subset, train_subset_seed=args.train_subset_seed,
    )
    for name, entry in manifest["splits"].items():
        skipped = ", ".join(f"{count} {reason}" for reason, count in entry["rows_skipped"].items()) or "none"
        logger.info(f"{name}: {entry['rows_written']}/{entry['rows_read']} rows written (skipped: {skipped})")


if __name__ == "__main__":
    main()
