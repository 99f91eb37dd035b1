"""BitFit deltas: what one holds, and merging one into its base model.

    python -m fairseq_ext.tools.delta info D.delta.safetensors [--json]
    python -m fairseq_ext.tools.delta apply --base BASE.pt --delta D.delta.safetensors --out MERGED.pt
    python -m fairseq_ext.tools.delta migrate OLD.delta.safetensors --out NEW.delta.safetensors

Every command reads the delta with ``read_delta``, which refuses a corrupt or inconsistent
one in one line (``fairseq_ext.core.delta_checks``).  ``migrate`` rewrites a delta written
before deltas had a header checksum with one, once it passes those checks.

The file format is ``fairseq_ext.core.delta_file``; ``apply`` is
``fairseq_ext.plugin.deltas.apply_delta``.
"""
import argparse
import json
import os
from pathlib import Path

from ..core.bitfit import role_lines, tally_by_role
from ..core.delta_file import CLASSIFICATION, FORMAT_VERSION, Delta, plain_json, read_delta
from ..core.errors import exit_on_user_error, quiet_cli_logging
from ..core.files import check_output_file
from ..plugin.checkpoints import add_trust_checkpoint_argument
from ..plugin.deltas import apply_delta, model_options


def describe(delta: Delta) -> str:
    """A human-readable summary: sizes, selection, task, model, base and progress."""
    file_bytes = os.path.getsize(delta.path) if delta.path else 0
    tensor_bytes = sum(t.numel() * t.element_size() for t in delta.tensors.values())
    tally = tally_by_role({name: tensor.numel() for name, tensor in delta.tensors.items()})
    params = sum(count for _, count in tally.values())
    selection, task, base = delta.selection, delta.task_cfg, delta.base
    total = base["parameters"] + params
    if delta.is_seq2seq:
        task_line = (f"task: {delta.task_name}, {delta.source_lang} -> {delta.target_lang} (seq2seq: generate with "
                     "python -m fairseq_ext.tools.generate), no task heads")
        dictionary_line = (f"dictionaries: source {_dictionary(delta.source_dictionary)}, "
                           f"target {_dictionary(delta.target_dictionary)}")
    elif delta.kind != CLASSIFICATION:
        task_line = (f"task: {delta.task_name} ({delta.kind}: evaluate with python -m fairseq_ext.tools.eval_lm, "
                     "sample with python -m fairseq_ext.tools.generate), no task heads")
        dictionary_line = f"dictionary: {_dictionary(delta.source_dictionary)}"
    else:
        task_line = (f"task: {delta.task_name}" + (f" (GLUE {delta.glue_task})" if delta.glue_task else "")
                     + f", head {delta.head_name!r}, "
                     + ("regression" if delta.regression else f"{task.get('num_classes')} classes {delta.label_symbols}")
                     + f", init token {task.get('init_token')}, separator {task.get('separator_token')}, "
                     f"truncate to {delta.task.get('truncate_to')}")
        dictionary_line = f"dictionary: {_dictionary(delta.source_dictionary)}"
    return "\n".join([
        f"{delta.path}: BitFit delta (format {FORMAT_VERSION}), {file_bytes:,} bytes",
        f"tensors: {len(delta.tensors)}, {params:,} params, {tensor_bytes:,} bytes "
        f"({100.0 * params / max(total, 1):.4f}% of the model's {total:,} values), dtype {base['dtype']}",
        *role_lines(tally),
        f"selection: --bitfit-terms {selection['terms']}"
        + ("" if delta.kind != CLASSIFICATION else f", heads {'trained' if selection['train_heads'] else 'frozen'}")
        + (", delta-only run" if selection.get("delta_only") else ""),
        task_line,
        f"model: arch {delta.arch}, " + ", ".join(
            f"{key} {delta.model['args'][key]}" for key in model_options(delta)[1:] if key in delta.model["args"]),
        dictionary_line,
        f"base: {base['fingerprint']} over {base['tensors']} frozen tensors ({base['parameters']:,} params)",
        f"saved at: update {delta.progress.get('num_updates')}, epoch {delta.progress.get('epoch')}, "
        f"valid {delta.progress.get('valid_metric')} {delta.progress.get('valid_score')}",
    ])


def _dictionary(identity: dict) -> str:
    return f"{identity['size']} symbols, sha256 {identity['sha256'][:16]}..."


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fairseq_ext.tools.delta", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="print a delta's metadata and sizes")
    info.add_argument("delta", help="a .delta.safetensors file")
    info.add_argument("--json", action="store_true", help="print every metadata section as JSON")
    apply = commands.add_parser("apply", help="merge a delta into its base: a normal fairseq checkpoint")
    apply.add_argument("--base", required=True, help="the pretrained fairseq checkpoint the run started from "
                                                    "(e.g. a model folder's model.pt)")
    apply.add_argument("--delta", required=True, help="the .delta.safetensors file")
    apply.add_argument("--out", required=True, help="the merged checkpoint to write")
    apply.add_argument("--force", action="store_true", help="merge even if the base's fingerprint differs")
    add_trust_checkpoint_argument(apply)
    migrate = commands.add_parser("migrate", help="rewrite an older delta with a header checksum")
    migrate.add_argument("delta", help="a .delta.safetensors file")
    migrate.add_argument("--out", required=True, help="the delta to write (may be the same file)")
    return parser


@exit_on_user_error
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    quiet_cli_logging()
    if args.command == "info":
        delta = read_delta(args.delta)
        if args.json:
            sections = {section: getattr(delta, section) for section in Delta.SECTIONS}
            sections["tensors"] = {name: {"dtype": str(t.dtype)[6:], "shape": list(t.shape)}
                                   for name, t in delta.tensors.items()}
            print(json.dumps(sections, indent=2, default=plain_json))
        else:
            print(describe(delta))
        return
    if args.command == "migrate":
        check_output_file(Path(args.out), "--out")
        delta = read_delta(args.delta)  # checked as every reader checks it; the note says it had no checksum
        delta.save(args.out)
        print(f"wrote {args.out}: {args.delta} with a header checksum")
        return
    out = apply_delta(args.base, args.delta, args.out, force=args.force, trust_checkpoint=args.trust_checkpoint)
    print(f"wrote {out} ({os.path.getsize(out):,} bytes)")


if __name__ == "__main__":
    main()
