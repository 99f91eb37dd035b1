"""Deltas of short train.py runs on synthetic data, and synthetic sentences: what the serving and
inference benchmarks serve (their speed does not depend on what the tensors learnt)."""
import dataclasses
import platform
import random
import subprocess
from pathlib import Path
from typing import Dict, List

import torch

from ..core.delta_file import Delta, read_delta
from .options import TRAIN_COMMAND
from .synthetic import EMBEDDED_MODEL, model_setup, train_args, write_synthetic_data


def trained_delta(workdir: Path, mode: str) -> Delta:
    """One short run of the embedded model in a run mode (``bitfit-all``, ``head``, ``lora``, ...) with
    train.py, two updates on synthetic data; its delta."""
    model_args, dictionary, checkpoint = model_setup(EMBEDDED_MODEL, workdir)
    data = write_synthetic_data(workdir, dictionary, batch=8, seq_len=32, updates=2)
    command = [*TRAIN_COMMAND, *train_args(data, model_args, 8, "cpu", "fp32", mode),
               "--restore-file", str(checkpoint), "--reset-optimizer", "--reset-dataloader", "--reset-meters",
               "--required-batch-size-multiple", "1", "--max-update", "2", "--save-dir", str(workdir / "run"),
               "--no-epoch-checkpoints", "--log-format", "simple"]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"train.py exited {result.returncode}:\n{result.stderr[-3000:]}")
    return read_delta(workdir / "run" / "checkpoint_best.delta.safetensors")


def task_deltas(delta, count: int) -> Dict[str, object]:
    """``count`` deltas like ``delta``, each with its own bias and head values."""
    deltas = {}
    for index in range(count):
        generator = torch.Generator().manual_seed(index)
        tensors = {name: tensor + 0.01 * torch.randn(tensor.shape, generator=generator)
                   for name, tensor in delta.tensors.items()}
        deltas[f"task{index}"] = dataclasses.replace(delta, tensors=tensors, path=f"{delta.path}#task{index}")
    return deltas


def cpu_model() -> str:
    """The CPU's model name, as Linux reports it."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def synthetic_sentences(vocab_file: str, count: int, seed: int = 1) -> List[str]:
    words = [word for word in Path(vocab_file).read_text(encoding="utf-8").split("\n")
             if word.isalpha() and not word.startswith("[")]
    rng = random.Random(seed)
    return [" ".join(rng.choices(words, k=rng.randint(8, 40))) for _ in range(count)]
