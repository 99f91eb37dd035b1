"""train.py on synthetic data: the workloads of the benchmark and of the GPU check.

A two-class sentence-prediction task of random tokens, every batch exactly
batch x seq_len, on a named model: ``minilm`` (the embedded pretrained model) or
a registered fairseq arch with random init (``roberta_base``, ``bert_tiny``, ...).
An encoder-decoder arch (``transformer_wmt_en_de``, ``bart_base``, ...) gets a
translation task instead: random source and target sentences of seq_len tokens
each, one joined dictionary of WMT'16 en-de's size, ``--share-all-embeddings``.
A decoder-only ``transformer_lm`` arch (``transformer_lm_gpt2_small``, ...) gets
language modeling: a stream of random tokens in blocks of seq_len (``--sample-break-mode
none``), a dictionary of GPT-2's BPE size, ``--share-decoder-input-output-embed``.
The benchmark runs train.py end to end on ``write_synthetic_data``; the GPU check
steps a Trainer by hand (``build_trainer``) on one fixed batch.
"""
import tempfile
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
from fairseq import checkpoint_utils, tasks
from fairseq.data import Dictionary, FairseqDataset, indexed_dataset
from fairseq.distributed import utils as distributed_utils
from fairseq.models import ARCH_MODEL_NAME_REGISTRY, ARCH_MODEL_REGISTRY

from ..core.errors import UserError
from ..plugin.models.model_dir import load_model_dir
from ..plugin.models.pretrained import default_model_dir
from . import options
from .trainer import BitFitTrainer

EMBEDDED_MODEL = "minilm"
# Symbols besides fairseq's 4 specials; translation: fairseq's WMT'16 en-de joined BPE dictionary (32,768).
# language_model: fairseq's GPT-2 BPE dict.txt (RoBERTa's, without <mask>).
RANDOM_INIT_VOCAB = {"roberta": 50261, "bert": 30518, "translation": 32764, "language_model": 50260}
# fairseq models whose archs get the translation workload.
SEQ2SEQ_MODELS = ("transformer", "bart")
# fairseq models whose archs get the language-modeling workload.
LANGUAGE_MODELS = ("transformer_lm",)
SENTENCE_PREDICTION = ["--task", "sentence_prediction", "--criterion", "sentence_prediction", "--num-classes", "2",
                       "--max-positions", "512"]
TRANSLATION = ["--task", "translation", "--source-lang", "src", "--target-lang", "tgt",
               "--criterion", "label_smoothed_cross_entropy", "--label-smoothing", "0.1"]


def is_translation_workload(model: str) -> bool:
    """Whether the named model trains on the synthetic translation task (an encoder-decoder arch)."""
    return ARCH_MODEL_NAME_REGISTRY.get(model) in SEQ2SEQ_MODELS


def is_language_model_workload(model: str) -> bool:
    """Whether the named model trains on the synthetic language-modeling task (a decoder-only arch)."""
    return ARCH_MODEL_NAME_REGISTRY.get(model) in LANGUAGE_MODELS


def workload_args(model: str, seq_len: int) -> List[str]:
    """train.py's task and criterion options of the named model's synthetic workload."""
    if is_language_model_workload(model):
        return ["--task", "language_modeling", "--criterion", "cross_entropy", "--tokens-per-sample", str(seq_len),
                "--sample-break-mode", "none"]
    return TRANSLATION if is_translation_workload(model) else SENTENCE_PREDICTION


def model_setup(model: str, workdir: Path) -> Tuple[List[str], Path, Optional[str]]:
    """(train.py model args, dict.txt path, pretrained checkpoint or None) of a model name."""
    if model == EMBEDDED_MODEL:
        folder = load_model_dir(default_model_dir())
        return folder.arch_args(), Path(folder.dictionary), folder.checkpoint
    if model not in ARCH_MODEL_REGISTRY:
        raise UserError(f"--models {model}: neither '{EMBEDDED_MODEL}' nor a fairseq arch")
    if is_translation_workload(model):
        family, arch_args = "translation", ["--arch", model, "--share-all-embeddings"]
    elif is_language_model_workload(model):
        family, arch_args = "language_model", ["--arch", model, "--share-decoder-input-output-embed"]
    else:
        family, arch_args = ("bert" if model.startswith("bert") else "roberta"), ["--arch", model]
    size = 996 if model == "bert_tiny" else RANDOM_INIT_VOCAB[family]
    dictionary = workdir / "dict.txt"
    dictionary.write_text("".join(f"tok{i} 1\n" for i in range(size)))
    return arch_args, dictionary, None


def write_dictionaries(data: Path, dictionary: Path) -> None:
    """The input0/ and label/ dictionaries of a two-class sentence_prediction data folder."""
    for sub, dict_text in (("input0", dictionary.read_text()), ("label", "0 1\n1 1\n")):
        (data / sub).mkdir(parents=True)
        (data / sub / "dict.txt").write_text(dict_text)


def train_args(data: Path, model_args: Sequence[str], batch: int, device: str, precision: str,
               mode: str, task_args: Sequence[str] = SENTENCE_PREDICTION) -> List[str]:
    """The train.py options every synthetic run shares: the task (``task_args``: two-class sentence
    prediction, or ``workload_args(model)``), Adam, and data loaded in the training process (as the
    GLUE runner's runs do): no loader processes."""
    return [str(data), *task_args, *model_args, "--batch-size", str(batch), "--num-workers", "0",
            "--optimizer", "adam", "--lr", "1e-4", "--seed", "1", *(["--cpu"] if device == "cpu" else []),
            *({"fp16": ["--fp16"], "bf16": ["--bf16"], "fp32": []}[precision]), *options.mode_flags(mode)]


def write_synthetic_data(workdir: Path, dictionary: Path, batch: int, seq_len: int, updates: int,
                         translation: bool = False, language_model: bool = False) -> Path:
    """A binarized sentence_prediction dataset of random tokens (what fairseq-preprocess writes), with
    ``translation`` a src-tgt translation dataset of random sentence pairs, with ``language_model`` one
    monolingual corpus (its blocks of seq_len tokens are the sequences).

    Every sequence is ``seq_len`` tokens ending in </s>, so every batch is batch x seq_len;
    there are enough for ``updates`` updates in one epoch, plus a one-batch valid split:
    BitFitTrainer probes it for unused biases, as in a user's run, and train.py
    validates on it once, after the last update.
    """
    data = workdir / "data"
    source = Dictionary.load(str(dictionary))
    generator = torch.Generator().manual_seed(1)
    if translation:
        return _write_translation_data(data, dictionary, source, generator, batch, seq_len, updates)
    if language_model:
        return _write_corpus(data, dictionary, source, generator, batch, seq_len, updates)
    write_dictionaries(data, dictionary)
    labels = Dictionary.load(str(data / "label" / "dict.txt"))
    for split, rows in (("train", batch * (updates + 1)), ("valid", batch)):
        tokens = indexed_dataset.make_builder(str(data / "input0" / f"{split}.bin"), "mmap", len(source))
        targets = indexed_dataset.make_builder(str(data / "label" / f"{split}.bin"), "mmap", len(labels))
        for _ in range(rows):
            sequence = torch.randint(source.nspecial, len(source), (seq_len,), generator=generator)
            sequence[-1] = source.eos()
            tokens.add_item(sequence)
            label = int(torch.randint(0, 2, (1,), generator=generator))
            targets.add_item(torch.tensor([labels.index(str(label)), labels.eos()]))
        tokens.finalize(str(data / "input0" / f"{split}.idx"))
        targets.finalize(str(data / "label" / f"{split}.idx"))
    return data


def _write_translation_data(data: Path, dictionary: Path, vocabulary: Dictionary, generator: torch.Generator,
                            batch: int, seq_len: int, updates: int) -> Path:
    """Random sentence pairs, source and target of ``seq_len`` tokens each, one dictionary for both."""
    data.mkdir(parents=True)
    for side in ("src", "tgt"):
        (data / f"dict.{side}.txt").write_text(dictionary.read_text())
    for split, rows in (("train", batch * (updates + 1)), ("valid", batch)):
        builders = {side: indexed_dataset.make_builder(str(data / f"{split}.src-tgt.{side}.bin"), "mmap",
                                                       len(vocabulary)) for side in ("src", "tgt")}
        for _ in range(rows):
            for builder in builders.values():
                sequence = torch.randint(vocabulary.nspecial, len(vocabulary), (seq_len,), generator=generator)
                sequence[-1] = vocabulary.eos()
                builder.add_item(sequence)
        for side, builder in builders.items():
            builder.finalize(str(data / f"{split}.src-tgt.{side}.idx"))
    return data


def _write_corpus(data: Path, dictionary: Path, vocabulary: Dictionary, generator: torch.Generator,
                  batch: int, seq_len: int, updates: int) -> Path:
    """Random lines of ``seq_len`` tokens (the last one </s>) in language_modeling's layout."""
    data.mkdir(parents=True)
    (data / "dict.txt").write_text(dictionary.read_text())
    for split, rows in (("train", batch * (updates + 1)), ("valid", batch)):
        builder = indexed_dataset.make_builder(str(data / f"{split}.bin"), "mmap", len(vocabulary))
        for _ in range(rows):
            sequence = torch.randint(vocabulary.nspecial, len(vocabulary), (seq_len,), generator=generator)
            sequence[-1] = vocabulary.eos()
            builder.add_item(sequence)
        builder.finalize(str(data / f"{split}.idx"))
    return data


class FixedBatch(FairseqDataset):
    """Batch x seq_len random tokens with labels, always the same batch."""

    def __init__(self, batch: int, seq_len: int, vocab: int, bos: int, eos: int, seed: int = 1):
        generator = torch.Generator().manual_seed(seed)
        tokens = torch.randint(4, vocab, (batch, seq_len), generator=generator)
        tokens[:, 0], tokens[:, -1] = bos, eos
        self.sample = {
            "id": torch.arange(batch),
            "net_input": {"src_tokens": tokens, "src_lengths": torch.full((batch,), seq_len)},
            "target": torch.randint(0, 2, (batch,), generator=generator),
            "ntokens": batch * seq_len,
            "nsentences": batch,
        }

    def __len__(self):
        return int(self.sample["nsentences"])

    def __getitem__(self, index):
        return index

    def collater(self, indices):
        return self.sample


def build_trainer(model: str, mode: str, device: str, batch: int, seq_len: int, precision: str,
                  extra_args: Sequence[str] = (), distributed: bool = False) -> Tuple[BitFitTrainer, FixedBatch]:
    """train.py's model, criterion and BitFitTrainer for one (model, mode), and the fixed batch
    it probes and steps on.  ``extra_args`` are more train.py options; ``distributed`` joins
    the process group they describe first, as train.py's workers do."""
    with tempfile.TemporaryDirectory(prefix="bitfit-synthetic-") as tmp:  # the task reads its dictionaries at setup
        workdir = Path(tmp)
        model_args, dictionary, checkpoint = model_setup(model, workdir)
        write_dictionaries(workdir, dictionary)
        argv = [*train_args(workdir, model_args, batch, device, precision, mode), *extra_args]
        cfg = options.to_config(options.parse_args(argv))
        if distributed:
            if device == "cuda":
                torch.cuda.set_device(cfg.distributed_training.device_id)
            cfg.distributed_training.distributed_rank = distributed_utils.distributed_init(cfg)
        task = tasks.setup_task(cfg.task)
    fairseq_model = task.build_model(cfg.model)
    if checkpoint is not None:  # the pretrained weights, as --restore-file loads them
        state = checkpoint_utils.load_checkpoint_to_cpu(checkpoint)
        fairseq_model.load_state_dict(state["model"], strict=True, model_cfg=cfg.model)
    criterion = task.build_criterion(cfg.criterion)
    data = FixedBatch(batch, seq_len, len(task.source_dictionary), task.source_dictionary.bos(),
                      task.source_dictionary.eos())
    task.datasets["valid"] = data  # what BitFitTrainer probes for unused biases
    return BitFitTrainer(cfg, task, fairseq_model, criterion), data
