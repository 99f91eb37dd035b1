"""Deltas of short train.py runs on synthetic data, and synthetic sentences: what the serving and
inference benchmarks serve (their speed does not depend on what the tensors learnt)."""
import dataclasses
import platform
import random
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Sequence

import torch

from ..core.delta_file import Delta, read_delta
from .synthetic import EMBEDDED_MODEL, model_setup, train_args, write_synthetic_data


def trained_delta(workdir: Path, mode: str) -> Delta:
    """One short run of the embedded model in a run mode (``bitfit-all``, ``head``, ``lora``, ...) with
    train.py, two updates on synthetic data; its delta."""
    return trained_deltas(workdir, [mode])[mode]


def trained_deltas(workdir: Path, modes: Sequence[str]) -> Dict[str, Delta]:
    """``trained_delta`` for each of ``modes``, their runs one after another in one child process (one
    interpreter start for all of them: train.py's entry point trains again in the same process, as a
    hydra sweep's jobs do); each mode's run in ``workdir/mode``."""
    result = subprocess.run([sys.executable, "-m", __name__, str(workdir), *modes], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"train.py exited {result.returncode}:\n{result.stderr[-3000:]}")
    return {mode: read_delta(Path(workdir) / mode / "run" / "checkpoint_best.delta.safetensors") for mode in modes}


def _train_modes(workdir: Path, modes: Sequence[str]) -> None:
    from .main import cli_main

    model_args, dictionary, checkpoint = model_setup(EMBEDDED_MODEL, workdir)
    for mode in modes:
        data = write_synthetic_data(workdir / mode, dictionary, batch=8, seq_len=32, updates=2)
        cli_main([*train_args(data, model_args, 8, "cpu", "fp32", mode),
                  "--restore-file", str(checkpoint), "--reset-optimizer", "--reset-dataloader", "--reset-meters",
                  "--required-batch-size-multiple", "1", "--max-update", "2", "--save-dir",
                  str(workdir / mode / "run"), "--no-epoch-checkpoints", "--log-format", "simple"])


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


if __name__ == "__main__":  # trained_deltas' child: WORKDIR MODE...
    _train_modes(Path(sys.argv[1]), sys.argv[2:])
