"""The command line every side-by-side timing script on one real GLUE task shares (speed_vs_hf,
profile_update, compile_cost): where GLUE is, the task, the modes, train.py's extra arguments and
the report's folder; each script adds its own options."""
import argparse
from pathlib import Path
from typing import Sequence, Tuple

from .glue_files import check_glue_dir
from .glue_tasks import get_task_spec


def timing_parser(name: str, doc: str, modes: Sequence[str]) -> argparse.ArgumentParser:
    """The shared flags; ``name`` gives the default output folder (errors name the file, as argparse does)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--glue-dir", default="glue_data")
    parser.add_argument("--task", default="STS-B")
    parser.add_argument("--modes", nargs="+", default=list(modes))
    parser.add_argument("--train-py-args", default="", help="extra train.py arguments for its runs, one string: "
                        "--train-py-args=--bf16 (or --fused-adam, ...)")
    parser.add_argument("--output-dir", default=f"outputs/{name}")
    return parser


def glue_task(args: argparse.Namespace) -> Tuple[Path, object]:
    """The checked GLUE folder and the task's spec: one line and exit 2 for either's bad value."""
    return check_glue_dir(args.glue_dir), get_task_spec(args.task)
