"""Predict with BitFit deltas on one base model, from files.

    python -m fairseq_ext.tools.predict --base MODEL_DIR --delta cola=D1.safetensors --delta rte=D2.safetensors \\
        --task cola --input glue/CoLA/test.tsv --output CoLA.tsv

GLUE test files (``index`` + text columns, for a delta of the glue task or a
--task named like a GLUE task) give GLUE leaderboard files; plain text (one
sentence a line, or two tab-separated) gives ``prediction<TAB>score...`` lines:
the label and the class probabilities in class order, or the regression value.
The model side is ``fairseq_ext.plugin.predictor.MultiTaskPredictor``.
"""
import argparse
import sys
from pathlib import Path
from typing import List, Sequence, Tuple

import numpy as np

from ..core.delta_file import read_delta
from ..core.errors import UserError, exit_on_user_error, quiet_cli_logging
from ..core.files import check_output_file, write_text_atomically
from ..core.glue_files import read_tsv, write_leaderboard_tsv
from ..plugin.predictor import MultiTaskPredictor, Prediction
from ..plugin.predictor_options import (add_predictor_arguments, check_task_delta, glue_spec_for, parse_delta_options,
                                        usable_device)


def read_glue_tsv(spec, path: Path) -> Tuple[List[str], List[Tuple[str, ...]]]:
    """(GLUE ids, texts) of a GLUE test file; the columns are checked against the task's."""
    tests = spec.test_splits
    split = next((s for s in tests if s.file_name == path.name), tests[0])
    rows = read_tsv(spec, split, path)  # header and columns checked, errors name file:line
    return rows.indices, rows.texts


def read_lines(path: Path) -> List[Tuple[str, ...]]:
    """One example a line: a sentence, or two tab-separated sentences (every line alike)."""
    lines = _read_text(path).split("\n")
    if lines and lines[-1] == "":
        lines.pop()
    if not lines:
        raise UserError(f"{path}: empty file, expected one sentence (or two tab-separated) a line")
    examples, width = [], None
    for number, line in enumerate(lines, start=1):
        fields = tuple(line[:-1].split("\t") if line.endswith("\r") else line.split("\t"))
        if len(fields) > 2:
            raise UserError(f"{path}:{number}: {len(fields)} tab-separated fields; expected a sentence or a pair")
        if width is not None and len(fields) != width:
            raise UserError(f"{path}:{number}: {len(fields)} sentences, but line 1 has {width}")
        if not all(field.strip() for field in fields):
            raise UserError(f"{path}:{number}: empty sentence")
        width = len(fields)
        examples.append(fields)
    return examples


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise UserError(f"{path}: not UTF-8 text ({error.reason} at byte {error.start})") from None
    except OSError as error:
        raise UserError(f"--input {path}: cannot read: {error.strerror}") from None


def looks_like_glue_tsv(spec, path: Path) -> bool:
    """A first line naming the task's columns is a GLUE header."""
    first_line = _read_text(path).split("\n", 1)[0].rstrip("\r")
    header = set(first_line.split("\t"))
    return bool(header & {spec.test_index_column, *spec.text_columns})


def format_lines(predictions: Sequence[Prediction]) -> str:
    lines = []
    for prediction in predictions:
        if prediction.probabilities is None:
            lines.append(f"{prediction.score:.6f}")
        else:
            lines.append("\t".join([prediction.label] + [f"{p:.6f}" for p in prediction.probabilities]))
    return "".join(line + "\n" for line in lines)


# --------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fairseq_ext.tools.predict", description=__doc__.split("\n\n")[0])
    add_predictor_arguments(parser, "the pretrained model folder (model.pt, dict.txt, tokenizer), or a fairseq "
                            "checkpoint with dict.txt beside it (then, unless it is a model folder's model.pt, "
                            "inputs are pre-tokenized text)")
    parser.add_argument("--task", required=True, help="the task to predict (one of the --delta names)")
    parser.add_argument("--input", required=True, help="a GLUE test TSV, or one sentence (or two tab-separated) a line")
    parser.add_argument("--output", required=True, help="GLUE leaderboard TSV, or prediction<TAB>score... lines")
    parser.add_argument("--input-format", choices=("auto", "glue", "lines"), default="auto",
                        help="auto: a GLUE TSV when the task is a GLUE task and the first line is its header")
    parser.add_argument("--batch-size", type=int, default=32)
    return parser


@exit_on_user_error
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    quiet_cli_logging()
    deltas = parse_delta_options(args.delta)
    if args.task not in deltas:
        raise UserError(f"--task {args.task}: no --delta for it (given: {', '.join(deltas)})")
    input_path, output_path = Path(args.input), Path(args.output)
    if not input_path.is_file():
        raise UserError(f"--input {input_path}: no such file")
    if output_path.exists() and output_path.resolve() == input_path.resolve():
        raise UserError(f"--output {output_path} is the --input file")
    check_output_file(output_path, "--output")
    usable_device(args.device)
    loaded = {name: read_delta(path) for name, path in deltas.items()}
    for name, delta in loaded.items():  # a mislabelled delta is the delta's fault, not the input's: say so first
        check_task_delta(name, delta)

    # Read (and check) the input before the model is loaded: bad input fails fast.
    spec = glue_spec_for(args.task, loaded[args.task])
    glue_input = args.input_format == "glue" or (
        args.input_format == "auto" and spec is not None and looks_like_glue_tsv(spec, input_path))
    if glue_input:
        if spec is None:
            raise UserError(f"--input-format glue: --task {args.task} is not a GLUE task")
        indices, examples = read_glue_tsv(spec, input_path)
    else:
        examples = read_lines(input_path)

    predictor = MultiTaskPredictor(args.base, dictionary=args.dictionary, trust_checkpoint=args.trust_checkpoint,
                                   batch_size=args.batch_size, device=args.device)
    for name, delta in loaded.items():
        predictor.add_task(name, delta)
    predictions = predictor.predict(args.task, examples)
    if glue_input:
        values = [p.score if p.probabilities is None else spec.labels.index(p.label) for p in predictions]
        write_leaderboard_tsv(spec, indices, np.asarray(values), output_path)
    else:
        write_text_atomically(output_path, format_lines(predictions))
    print(f"wrote {len(predictions)} predictions of task {args.task} to {output_path}", file=sys.stderr)


if __name__ == "__main__":
    main()
