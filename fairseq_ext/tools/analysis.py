"""Analyses of BitFit runs, from their deltas.

    python -m fairseq_ext.tools.analysis bias-change --base MODEL_DIR --delta cola=D1 --delta stsb=D2 --out DIR

``bias-change`` writes the BitFit paper's Figure 1 for each delta: how far every bias
term (q, k, v, m1, ln1, m2, m3, ln2) moved from the pretrained base, per layer, as the
mean absolute change per entry.  DIR gets ``bias_change.md`` and ``bias_change.csv``
(the table) and ``bias_change.png`` (a heatmap, one panel per task).  Each delta must
come from a BitFit run on that base (its fingerprint is checked).
"""
import argparse
import sys
from pathlib import Path

from ..core.errors import UserError, exit_on_user_error, quiet_cli_logging
from ..plugin.analysis import BIAS_CHANGE_FILES, bias_change_tables, write_bias_change
from ..plugin.checkpoints import add_trust_checkpoint_argument
from ..plugin.predictor_options import parse_delta_options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fairseq_ext.tools.analysis", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    change = commands.add_parser("bias-change", help="how far each bias term moved from the base, per layer")
    change.add_argument("--base", required=True, help="the pretrained model folder (model.pt) or checkpoint")
    change.add_argument("--delta", action="append", required=True, metavar="TASK=PATH",
                        help="a task and its BitFit delta (repeatable: one panel per task)")
    change.add_argument("--out", required=True, help="folder for bias_change.md, .csv and .png")
    add_trust_checkpoint_argument(change)
    return parser


@exit_on_user_error
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    quiet_cli_logging()
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out}: is a file, not a folder")
    tables = bias_change_tables(args.base, parse_delta_options(args.delta), args.trust_checkpoint)
    write_bias_change(tables, out)
    print(f"written: {', '.join(str(out / name) for name in BIAS_CHANGE_FILES)}", file=sys.stderr)


if __name__ == "__main__":
    main()
