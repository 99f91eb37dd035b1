"""Domain adaptation of a small decoder-only LM: full fine-tuning, BitFit all, BitFit ofa, frozen.

No pretrained LM is reachable offline, so the experiment makes its own: a transformer_lm pretrained
with train.py on one text domain, then adapted to a second with each mode; it reports the second
domain's dev perplexity (and the first's, after adapting), the trained parameters and the training
cost.  Corpora are plain text files, one sentence per line:

    python -m fairseq_ext.experiments.lm_adaptation --pretrain-train A.train --pretrain-valid A.valid \\
        --adapt-train B.train --adapt-valid B.valid --output-dir outputs/lm_adaptation
    python -m fairseq_ext.experiments.lm_adaptation --glue-dir glue_data --output-dir outputs/lm_adaptation
      (the corpora from GLUE files: SST-2's movie-review sentences, then STS-B's sentences)

Text is lowercased and split into words and punctuation; one word dictionary (the --vocab most
frequent words of both training files, the rest <unk>) serves both domains, as a pretrained model's
vocabulary would.  Results: OUTPUT_DIR/results.json and results.md.
"""
import argparse
import csv
import json
import re
import time
from pathlib import Path

from ..core.errors import UserError, exit_on_user_error
from ..core.run_record import read_run_record

MODES = {"full": [], "bitfit-all": ["--bitfit", "--bitfit-terms", "all"],
         "bitfit-ofa": ["--bitfit", "--bitfit-terms", "ofa"]}
WORD = re.compile(r"\w+|[^\w\s]")


def tokenize(line: str) -> str:
    return " ".join(WORD.findall(line.lower()))


def glue_corpora(glue_dir: Path, out: Path) -> dict:
    """SST-2 sentences (domain A: movie reviews) and STS-B sentences (domain B: captions, news, forums)."""
    def column(path: Path, names):
        if not path.is_file():
            raise UserError(f"--glue-dir {glue_dir}: no {path.relative_to(glue_dir)}")
        with open(path, newline="", encoding="utf-8") as handle:
            rows = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
            return [row[name] for row in rows for name in names]
    files = {"pretrain_train": column(glue_dir / "SST-2" / "train.tsv", ["sentence"]),
             "pretrain_valid": column(glue_dir / "SST-2" / "dev.tsv", ["sentence"]),
             "adapt_train": column(glue_dir / "STS-B" / "train.tsv", ["sentence1", "sentence2"]),
             "adapt_valid": column(glue_dir / "STS-B" / "dev.tsv", ["sentence1", "sentence2"])}
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, lines in files.items():
        paths[name] = out / f"{name}.txt"
        paths[name].write_text("\n".join(lines) + "\n", encoding="utf-8")
    return paths


def prepare(corpora: dict, out: Path, vocab: int) -> dict:
    """Tokenized text, one dictionary from both training files, and each domain binarized with it."""
    from fairseq import options
    from fairseq_cli import preprocess

    text = out / "text"
    text.mkdir(parents=True, exist_ok=True)
    for name, path in corpora.items():
        if not Path(path).is_file():
            raise UserError(f"--{name.replace('_', '-')} {path}: no such file")
        lines = [tokenize(line) for line in Path(path).read_text(encoding="utf-8").splitlines()]
        (text / name).write_text("\n".join(line for line in lines if line) + "\n", encoding="utf-8")
    (text / "joint_train").write_text((text / "pretrain_train").read_text() + (text / "adapt_train").read_text())

    def binarize(*args):
        parser = options.get_preprocessing_parser()
        preprocess.main(parser.parse_args(["--only-source", "--workers", "1", *map(str, args)]))

    binarize("--trainpref", text / "joint_train", "--destdir", out / "dict", "--nwordssrc", vocab, "--dict-only")
    data = {}
    for domain in ("pretrain", "adapt"):
        data[domain] = out / f"{domain}-bin"
        binarize("--trainpref", text / f"{domain}_train", "--validpref", text / f"{domain}_valid",
                 "--srcdict", out / "dict" / "dict.txt", "--destdir", data[domain])
    return data


def lm_options(args) -> list:
    return ["--task", "language_modeling", "--arch", "transformer_lm", "--decoder-layers", str(args.layers),
            "--decoder-embed-dim", str(args.dim), "--decoder-input-dim", str(args.dim),
            "--decoder-output-dim", str(args.dim), "--decoder-ffn-embed-dim", str(4 * args.dim),
            "--decoder-attention-heads", str(args.heads), "--share-decoder-input-output-embed",
            "--tokens-per-sample", str(args.tokens_per_sample), "--sample-break-mode", "none",
            "--batch-size", str(args.batch_size), "--optimizer", "adam", "--adam-betas", "(0.9,0.98)",
            "--clip-norm", "1.0", "--no-epoch-checkpoints", "--cpu", "--num-workers", "0", "--seed", str(args.seed),
            "--log-format", "simple", "--log-interval", "50"]


def train(argv: list, log: Path) -> float:
    """One train.py run; its wall time in seconds."""
    import subprocess
    import sys

    started = time.monotonic()
    with open(log, "w") as handle:
        status = subprocess.run([sys.executable, "-m", "fairseq_ext.training.main", *map(str, argv)],
                                stdout=handle, stderr=subprocess.STDOUT).returncode
    if status != 0:
        raise UserError(f"train.py failed (exit {status}); see {log}")
    return time.monotonic() - started


def perplexity(data: Path, path: Path, args, delta: Path = None) -> float:
    """Dev perplexity with tools.eval_lm (base plus delta, or a checkpoint), blocks of --tokens-per-sample."""
    from ..plugin.eval_lm import eval_lm

    argv = [str(data), "--path", str(path), "--gen-subset", "valid", "--cpu", "--tokens-per-sample",
            str(args.tokens_per_sample), "--max-tokens", "8192", "--num-workers", "0", "--log-format", "none"]
    if delta is not None:
        argv += ["--delta", str(delta)]
    return float(eval_lm(argv)["perplexity"])


def run(args) -> dict:
    out = Path(args.output_dir)
    if args.glue_dir:
        corpora = glue_corpora(Path(args.glue_dir), out / "corpora")
    else:
        corpora = {name: getattr(args, name) for name in ("pretrain_train", "pretrain_valid", "adapt_train",
                                                          "adapt_valid")}
        if not all(corpora.values()):
            raise UserError("--pretrain-train, --pretrain-valid, --adapt-train and --adapt-valid are required "
                            "(or --glue-dir)")
    data = prepare(corpora, out, args.vocab)
    base_dir = out / "pretrained"
    base = base_dir / "checkpoint_last.pt"
    rows = {}
    if not base.is_file():
        seconds = train([data["pretrain"], *lm_options(args), "--lr", args.pretrain_lr, "--warmup-updates", 100,
                         "--lr-scheduler", "inverse_sqrt", "--max-update", args.pretrain_updates,
                         "--save-dir", base_dir], out / "pretrain.log")
        rows["pretraining"] = {"seconds": round(seconds, 1), "updates": args.pretrain_updates}
    frozen = {"adapt_dev_ppl": perplexity(data["adapt"], base, args),
              "pretrain_dev_ppl": perplexity(data["pretrain"], base, args), "trained_params": 0, "seconds": 0.0}
    rows["frozen"] = frozen
    for mode, flags in MODES.items():
        save_dir = out / mode
        lr = args.full_lr if mode == "full" else args.bitfit_lr
        seconds = train([data["adapt"], *lm_options(args), "--lr", lr, "--max-update", args.adapt_updates,
                         "--restore-file", base, "--reset-optimizer", "--reset-dataloader", "--reset-meters",
                         "--validate-interval-updates", args.adapt_updates // 4,
                         "--save-interval-updates", args.adapt_updates // 4, "--keep-interval-updates", 1,
                         "--save-dir", save_dir, *flags], out / f"{mode}.log")
        record = read_run_record(save_dir / "run_record.json")
        best = save_dir / "checkpoint_best.pt"
        delta = save_dir / "checkpoint_best.delta.safetensors"
        use_delta = mode != "full"
        rows[mode] = {
            "adapt_dev_ppl": perplexity(data["adapt"], base if use_delta else best, args, delta if use_delta else None),
            "pretrain_dev_ppl": perplexity(data["pretrain"], base if use_delta else best, args,
                                           delta if use_delta else None),
            "trained_params": record["parameters"]["trainable"], "all_params": record["parameters"]["total"],
            "seconds": round(seconds, 1), "updates": args.adapt_updates, "lr": lr,
            "stored_bytes": (delta if use_delta else best).stat().st_size,
        }
    results = {"settings": {key: value for key, value in vars(args).items()}, "corpora": {k: str(v) for k, v in corpora.items()},
               "rows": rows}
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(render(results))
    return results


def render(results: dict) -> str:
    rows = results["rows"]
    lines = ["| mode | trained params | adapt-domain dev ppl | pretrain-domain dev ppl | train time (s) | stored |",
             "|---|---:|---:|---:|---:|---:|"]
    for mode in ("frozen", *MODES):
        row = rows[mode]
        stored = f"{row['stored_bytes']:,} B" if "stored_bytes" in row else "0 (the base)"
        lines.append(f"| {mode} | {row['trained_params']:,} | {row['adapt_dev_ppl']:.1f} | {row['pretrain_dev_ppl']:.1f} "
                     f"| {row['seconds']:.0f} | {stored} |")
    return "\n".join(lines) + "\n"


@exit_on_user_error
def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for name in ("pretrain-train", "pretrain-valid", "adapt-train", "adapt-valid"):
        parser.add_argument(f"--{name}", metavar="FILE")
    parser.add_argument("--glue-dir", help="take the corpora from GLUE's SST-2 (pretraining) and STS-B (adaptation)")
    parser.add_argument("--output-dir", default="outputs/lm_adaptation")
    parser.add_argument("--vocab", type=int, default=12000)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--tokens-per-sample", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--pretrain-updates", type=int, default=1500)
    parser.add_argument("--pretrain-lr", type=float, default=1e-3)
    parser.add_argument("--adapt-updates", type=int, default=400)
    parser.add_argument("--full-lr", type=float, default=3e-4)
    parser.add_argument("--bitfit-lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)
    print(render(run(args)), end="")


if __name__ == "__main__":
    main()
