"""BLEU of BitFit against full fine-tuning on synthetic translation tasks, measured end to end.

The corpora are synthetic, and stated as such.  The "source language" has the words
s0..s{V-1}, the "target language" t0..t{V-1}; one fixed word-for-word lexicon (a random
permutation) translates between them.  Two mappings use it: ``monotone`` (word for word,
in order) and ``reversed`` (word for word, the order reversed).  Two settings:

- ``task-selection``: the model is pretrained on both mappings at once, each source sentence
  starting with a tag that names its mapping (``<monotone>``, ``<reversed>``); it is
  fine-tuned on reversed translations without the tag.  The skill is in the pretrained
  model; fine-tuning has to select it, the situation BitFit is meant for.
- ``new-word-order``: pretrained on monotone translations only, fine-tuned on reversed ones:
  a word order the pretrained model never produced.

For each setting a tiny transformer (2+2 layers, 64 dims, shared embeddings) is pretrained
with train.py, then fine-tuned in each mode (full, ``bitfit-all``, ``bitfit-ofa``,
``bitfit-none``: nothing trained, the pretrained model itself); each run's best checkpoint
(by validation loss) translates the test set with beam 4, and sacrebleu scores it.  BitFit
runs translate from the base plus their delta (``Seq2SeqPredictor``: every delta of a
setting on one base model in memory), full fine-tuning from its checkpoint (fairseq's hub).

    python -m fairseq_ext.experiments.seq2seq_bleu --output-dir outputs/seq2seq_bleu
"""
import argparse
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Sequence, Tuple

import sacrebleu

from ..core.delta_file import delta_path_for
from ..core.errors import UserError, exit_on_user_error
from ..core.files import write_report
from ..core.run_record import read_run_record
from ..plugin.seq2seq import Seq2SeqPredictor
from ..training.options import FULL, TRAIN_COMMAND, mode_flags

MAPPINGS = ("monotone", "reversed")


@dataclass(frozen=True)
class Setting:
    pretrain: Tuple[str, ...]  # the mappings of the pretraining corpus
    tagged: bool  # pretraining sources start with a tag naming their mapping
    finetune: str  # the mapping of the fine-tuning corpus (never tagged)


SETTINGS: Dict[str, Setting] = {
    "task-selection": Setting(pretrain=("monotone", "reversed"), tagged=True, finetune="reversed"),
    "new-word-order": Setting(pretrain=("monotone",), tagged=False, finetune="reversed"),
}
MODES = (FULL, "bitfit-all", "bitfit-ofa", "bitfit-none")
# A tiny transformer with every parameter role; --share-all-embeddings as in fairseq's WMT recipes.
ARCH = ["--arch", "transformer", "--encoder-layers", "2", "--decoder-layers", "2", "--encoder-embed-dim", "64",
        "--decoder-embed-dim", "64", "--encoder-ffn-embed-dim", "128", "--decoder-ffn-embed-dim", "128",
        "--encoder-attention-heads", "4", "--decoder-attention-heads", "4", "--share-all-embeddings"]
TRAINING = ["--task", "translation", "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1",
            "--optimizer", "adam", "--adam-betas", "(0.9,0.98)", "--batch-size", "64", "--cpu", "--num-workers", "0",
            "--seed", "1", "--log-format", "simple", "--log-interval", "100", "--no-epoch-checkpoints"]
BEAM = 4


def translation_pair(words: Sequence[int], lexicon: Sequence[int], mapping: str, tagged: bool) -> Tuple[str, str]:
    """One sentence pair: source words, and their translation by ``mapping`` (``MAPPINGS``)."""
    target = [f"t{lexicon[word]}" for word in words]
    if mapping == "reversed":
        target.reverse()
    source = [f"s{word}" for word in words]
    return " ".join(([f"<{mapping}>"] if tagged else []) + source), " ".join(target)


def write_corpus(prefix: Path, mappings: Sequence[str], size: int, tagged: bool, lexicon: Sequence[int],
                 rng: random.Random, lengths: Tuple[int, int]) -> None:
    """PREFIX.src and PREFIX.tgt: ``size`` pairs, the mappings taking turns."""
    pairs = [translation_pair([rng.randrange(len(lexicon)) for _ in range(rng.randint(*lengths))], lexicon,
                              mappings[index % len(mappings)], tagged) for index in range(size)]
    for side, lines in zip(("src", "tgt"), zip(*pairs)):
        Path(f"{prefix}.{side}").write_text("\n".join(lines) + "\n", encoding="utf-8")


def make_data(root: Path, setting: Setting, pretrain_sizes: Sequence[int], finetune_sizes: Sequence[int],
              vocab: int = 40, lengths: Tuple[int, int] = (4, 10), joined: bool = True, seed: int = 0) -> Tuple[Path, Path]:
    """Binarized pretraining and fine-tuning data (train/valid/test sizes each) of a setting, language
    pair src-tgt, as fairseq-preprocess writes them; the fine-tuning data use the pretraining
    dictionaries (joined into one, or one per language).  Returns (pretraining, fine-tuning) folders."""
    rng = random.Random(seed)
    lexicon = list(range(vocab))
    rng.shuffle(lexicon)
    raw = root / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    folders = []
    for name, mappings, tagged, sizes in (("pretrain", setting.pretrain, setting.tagged, pretrain_sizes),
                                           ("finetune", (setting.finetune,), False, finetune_sizes)):
        for split, size in zip(("train", "valid", "test"), sizes):
            write_corpus(raw / f"{name}.{split}", mappings, size, tagged, lexicon, rng, lengths)
        destination = root / f"{name}-bin"
        dictionaries = (["--joined-dictionary"] if joined else []) if not folders else [
            "--srcdict", str(folders[0] / "dict.src.txt"), "--tgtdict", str(folders[0] / "dict.tgt.txt")]
        preprocess(["--source-lang", "src", "--target-lang", "tgt", *dictionaries,
                    *(arg for split in ("train", "valid", "test") for arg in (f"--{split}pref", str(raw / f"{name}.{split}"))),
                    "--destdir", str(destination)])
        folders.append(destination)
    return folders[0], folders[1]


def preprocess(args: Sequence[str]) -> None:
    """fairseq-preprocess, in a process of its own (it sets up logging and worker pools)."""
    result = subprocess.run([sys.executable, "-m", "fairseq_cli.preprocess", "--workers", "1", *args],
                            capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"fairseq-preprocess failed:\n{result.stderr[-3000:]}")


def train(args: Sequence[str], save_dir: Path) -> None:
    """train.py; its log is kept as SAVE_DIR/train.log."""
    save_dir.mkdir(parents=True, exist_ok=True)
    with open(save_dir / "train.log", "w") as log:
        result = subprocess.run([*TRAIN_COMMAND, *map(str, args), "--save-dir", str(save_dir)], stdout=log,
                                stderr=subprocess.STDOUT)
    if result.returncode != 0:
        raise RuntimeError(f"train.py failed (exit {result.returncode}); see {save_dir / 'train.log'}")


def test_set(data_raw: Path) -> Tuple[List[str], List[str]]:
    sources = (data_raw / "finetune.test.src").read_text(encoding="utf-8").splitlines()
    references = (data_raw / "finetune.test.tgt").read_text(encoding="utf-8").splitlines()
    return sources, references


def full_checkpoint_translations(checkpoint: Path, data: Path, sources: List[str]) -> List[str]:
    """A full checkpoint's translations through fairseq's hub interface (what fairseq-interactive does)."""
    from fairseq.models.transformer import TransformerModel

    hub = TransformerModel.from_pretrained(str(checkpoint.parent), checkpoint_file=checkpoint.name,
                                           data_name_or_path=str(data))
    return hub.translate(sources, beam=BEAM)


def run_setting(name: str, root: Path, args) -> List[dict]:
    setting = SETTINGS[name]
    pretrain_data, finetune_data = make_data(root, setting, (args.pretrain_size, 500, 500),
                                             (args.finetune_size, 200, args.test_size), seed=args.seed)
    base_dir = root / "pretrained"
    train([pretrain_data, *ARCH, *TRAINING, "--lr", "3e-3", "--lr-scheduler", "inverse_sqrt",
           "--warmup-updates", "200", "--max-update", args.pretrain_updates], base_dir)
    base = base_dir / "checkpoint_last.pt"
    sources, references = test_set(root / "raw")
    predictor = Seq2SeqPredictor(base, data=finetune_data)
    rows = []
    for mode in args.modes:
        run_dir = root / mode
        lr = args.lr_full if mode == FULL else args.lr_bitfit
        start = time.monotonic()
        train([finetune_data, *ARCH, *TRAINING, "--lr", lr, "--max-update", args.finetune_updates,
               "--restore-file", base, "--reset-optimizer", "--reset-dataloader", "--reset-meters",
               *mode_flags(mode)], run_dir)
        seconds = time.monotonic() - start
        best = run_dir / "checkpoint_best.pt"
        if mode == FULL:
            hypotheses = full_checkpoint_translations(best, finetune_data, sources)
        else:
            predictor.add_task(mode, delta_path_for(best))
            hypotheses = predictor.translate(mode, sources, beam=BEAM)
        bleu = sacrebleu.corpus_bleu(hypotheses, [references])
        record = read_run_record(run_dir / "run_record.json")
        rows.append({"setting": name, "mode": mode, "lr": float(lr), "trainable": record["parameters"]["trainable"],
                     "total": record["parameters"]["total"], "bleu": round(bleu.score, 2), "sacrebleu": str(bleu),
                     "finetune_s": round(seconds, 1), "test_sentences": len(sources)})
        print(f"{name:>15} {mode:<12} BLEU {bleu.score:6.2f}  ({rows[-1]['trainable']:,} trained)", flush=True)
    return rows


def markdown(rows: List[dict]) -> str:
    lines = ["| setting | mode | trainable / total | lr | BLEU |", "|---|---|---:|---:|---:|"]
    for row in rows:
        lr = f"{row['lr']:g}" if row["trainable"] else "–"  # nothing trained: the pretrained model
        lines.append(f"| {row['setting']} | {row['mode']} | {row['trainable']:,} / {row['total']:,} "
                     f"({100 * row['trainable'] / row['total']:.2f}%) | {lr} | {row['bleu']:.2f} |")
    return "\n".join(lines) + "\n"


def build_parser():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), help="full or bitfit-<any --bitfit-terms>")
    parser.add_argument("--pretrain-updates", type=int, default=2500)
    parser.add_argument("--finetune-updates", type=int, default=500)
    parser.add_argument("--pretrain-size", type=int, default=20000, help="pretraining sentence pairs")
    parser.add_argument("--finetune-size", type=int, default=2000, help="fine-tuning sentence pairs")
    parser.add_argument("--test-size", type=int, default=500)
    parser.add_argument("--lr-full", default="5e-4")
    parser.add_argument("--lr-bitfit", default="5e-3")
    parser.add_argument("--seed", type=int, default=0, help="the corpora's seed (the lexicon and sentences)")
    parser.add_argument("--output-dir", default="outputs/seq2seq_bleu")
    return parser


@exit_on_user_error
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    for mode in args.modes:
        if mode != FULL and not mode.startswith("bitfit-"):
            raise UserError(f"--modes {mode}: full or bitfit-<terms> (bitfit-none: nothing trained)")
        mode_flags(mode)
    output = Path(args.output_dir)
    for name in args.settings:
        if (output / "runs" / name).exists():
            raise UserError(f"--output-dir {output}: runs/{name} exists from an earlier measurement; "
                            "remove it or choose another --output-dir")
    rows = []
    for name in args.settings:
        rows += run_setting(name, output / "runs" / name, args)
    print(markdown(rows))
    print(write_report(output, "seq2seq_bleu", rows, markdown(rows)))


if __name__ == "__main__":
    main()
