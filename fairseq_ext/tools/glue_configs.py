"""Write train.py's hydra configs for GLUE: the GLUE runner's recipe, one YAML file per task.

    python -m fairseq_ext.tools.glue_configs --out configs/glue

writes ``<task>.yaml`` (BitFit, ``bitfit.bitfit_terms=all``) and ``<task>_full.yaml`` (full
fine-tuning, the comparison) for RoBERTa base/large on data prepared by
``python -m fairseq_ext.tools.glue_data prepare``, named as fairseq's
examples/roberta/config/finetuning files are (cola, mnli, mrpc, qnli, qqp, rte, sst_2, sts_b).
Each file holds only what differs from train.py's defaults (``hydra_form.config_of_command``)
in the very train.py command the GLUE runner would run (``glue_recipe.train_command``), so the
configs and the runner cannot drift apart; a test regenerates them and compares.
"""
import argparse
import math
from pathlib import Path
from typing import List

import yaml

from ..core.errors import exit_on_user_error
from ..core.files import write_text_atomically
from ..core.glue_tasks import TASKS
from ..plugin.models.model_dir import ModelDir
from ..training import glue_recipe, hydra_form

# GLUE's training-set sizes (rows of download_glue_data.py's train.tsv), which fix the schedule.
GLUE_TRAIN_ROWS = {"CoLA": 8551, "SST-2": 67349, "MRPC": 3668, "STS-B": 5749, "QQP": 363846,
                   "MNLI": 392702, "QNLI": 104743, "RTE": 2490}
# The model the configs are written for; model._name=roberta_large switches (same recipe rule).
ROBERTA_BASE = ModelDir(path="", checkpoint="???", dictionary="", arch="roberta_base", family="roberta",
                        bpe_args={}, pair_separator=True, pooling="first")
ROBERTA_PARAMS = 125_000_000
MAX_SEQ_LEN = 512  # RoBERTa's positions, as fairseq's configs (max_positions: 512)
BITFIT_MODE = "bitfit-all"
REQUIRED = "???"  # hydra's mark for a value the command line must give


def config_name(task: str, mode: str) -> str:
    name = task.lower().replace("-", "_")
    return name if mode != glue_recipe.FULL else f"{name}_full"


def recipe_command(task: str, mode: str) -> List[str]:
    spec, rows = TASKS[task], GLUE_TRAIN_ROWS[task]
    recipe = glue_recipe.default_recipe(mode, task, rows, ROBERTA_PARAMS)
    return glue_recipe.train_command(spec, ROBERTA_BASE, Path(REQUIRED), Path("checkpoints"), mode, recipe,
                                     recipe.lrs[0], 1, rows, 1, [], MAX_SEQ_LEN).args


def render(task: str, mode: str) -> str:
    command = recipe_command(task, mode)
    recipe = glue_recipe.default_recipe(mode, task, GLUE_TRAIN_ROWS[task], ROBERTA_PARAMS)
    what = "full fine-tuning (the comparison)" if mode == glue_recipe.FULL else "BitFit, every bias term"
    header = [
        "# @package _group_",
        f"# GLUE {task}, {what}: {recipe.rule}.",
        f"# Written by python -m fairseq_ext.tools.glue_configs from the GLUE runner's recipe "
        f"({GLUE_TRAIN_ROWS[task]:,} training rows,",
        f"# {math.ceil(GLUE_TRAIN_ROWS[task] / recipe.batch):,} updates an epoch). Set task.data (a folder of "
        "python -m fairseq_ext.tools.glue_data prepare)",
        "# and checkpoint.restore_file (the pretrained model.pt); model._name=roberta_large for RoBERTa-large.",
        "",
    ]
    config = hydra_form.config_of_command([str(arg) for arg in command])
    # The data and the pretrained checkpoint are the user's; their placeholders say so.
    config["task"]["data"] = REQUIRED
    config["checkpoint"]["restore_file"] = REQUIRED
    body = yaml.safe_dump(config, sort_keys=False, default_flow_style=False)
    return "\n".join(header) + body


def write_all(out_dir: Path) -> List[Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for task in GLUE_TRAIN_ROWS:
        for mode in (BITFIT_MODE, glue_recipe.FULL):
            path = out_dir / f"{config_name(task, mode)}.yaml"
            write_text_atomically(path, render(task, mode))
            written.append(path)
    return written


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m fairseq_ext.tools.glue_configs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("configs/glue"), help="the folder to write into")
    args = parser.parse_args(argv)
    for path in write_all(args.out):
        print(path)


if __name__ == "__main__":
    main()
