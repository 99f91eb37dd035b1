"""Throughput of many BitFit tasks on one base: mixed-task batches against one task per batch.

    python -m fairseq_ext.experiments.serving_benchmark [--tasks 8] [--examples 512] [--batch-size 32] \\
        [--rounds 3] [--output-dir outputs/serving]

The embedded MiniLM is BitFit-trained once with train.py (``--bitfit-terms all``, two
updates on synthetic data), and its delta is copied into ``--tasks`` task deltas with
their bias and head values perturbed by task (throughput does not depend on the values).
One stream of synthetic sentences (random words of the model's vocabulary, 8 to 40 a
sentence) arrives interleaved, example i for task i mod N, and is predicted three ways:

* ``mixed``: windows of ``--batch-size`` arrivals, each one ``predict_mixed`` call;
* ``switching``: the same windows, cut into one batch per task, switching the model in place;
* ``single``: the same windows with every example for one task (no mixing: the upper bound).

Each window is predicted the three ways back to back, in a rotating order, and each way's
time is summed over the windows of a round, so a machine whose speed drifts over seconds
shifts all ways alike.  Reported: examples per second of each (the median of ``--rounds``
rounds), and the ratios mixed/single and mixed/switching as the median of each round's own.
"""
import argparse
import dataclasses
import datetime
import os
import platform
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Dict, List

import torch

from ..core.delta_file import read_delta
from ..core.errors import UserError, exit_on_user_error
from ..core.files import write_report
from ..plugin.models.model_dir import load_model_dir
from ..plugin.models.pretrained import default_model_dir
from ..plugin.predictor import MultiTaskPredictor
from ..training.options import TRAIN_COMMAND, mode_label
from ..training.synthetic import EMBEDDED_MODEL, model_setup, train_args, write_synthetic_data

WAYS = ("mixed", "switching", "single")


def trained_delta(workdir: Path, terms: str):
    """One short BitFit run of the embedded model with train.py; its delta."""
    model_args, dictionary, checkpoint = model_setup(EMBEDDED_MODEL, workdir)
    data = write_synthetic_data(workdir, dictionary, batch=8, seq_len=32, updates=2)
    command = [*TRAIN_COMMAND, *train_args(data, model_args, 8, "cpu", "fp32", mode_label("bitfit", terms)),
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


def predict_window(predictor: MultiTaskPredictor, way: str, window) -> None:
    """Predict one window of arrivals as a server would: one mixed batch, or a batch per task."""
    if way == "mixed":
        predictor.logits_mixed(window)
        return
    for task in dict.fromkeys(name for name, _ in window):  # single: one task; switching: each in turn
        predictor.logits(task, [example for name, example in window if name == task])


def measure(tasks: int, examples: int, batch_size: int, rounds: int) -> dict:
    if tasks < 1 or examples < 1 or batch_size < 1 or rounds < 1:
        raise UserError("--tasks, --examples, --batch-size and --rounds must be at least 1")
    folder = load_model_dir(default_model_dir())
    with tempfile.TemporaryDirectory(prefix="bitfit-serving-") as tmp:
        base_delta = trained_delta(Path(tmp), "all")
    predictor = MultiTaskPredictor(folder.path, batch_size=batch_size)
    for name, delta in task_deltas(base_delta, tasks).items():
        predictor.add_task(name, delta)
    sentences = synthetic_sentences(folder.bpe_args["wordpiece_vocab"], examples)
    interleaved = [(f"task{i % tasks}", sentence) for i, sentence in enumerate(sentences)]
    streams = {"mixed": interleaved, "switching": interleaved, "single": [("task0", s) for s in sentences]}
    starts = range(0, examples, batch_size)
    for way in WAYS:  # warm-up
        predict_window(predictor, way, streams[way][:batch_size])
    seconds = {way: [] for way in WAYS}
    for _ in range(rounds):
        spent = dict.fromkeys(WAYS, 0.0)
        for number, start in enumerate(starts):
            for way in WAYS[number % 3:] + WAYS[:number % 3]:
                started = time.perf_counter()
                predict_window(predictor, way, streams[way][start:start + batch_size])
                spent[way] += time.perf_counter() - started
        for way in WAYS:
            seconds[way].append(spent[way])
    rates = {way: examples / statistics.median(times) for way, times in seconds.items()}

    def paired(way, other):  # a rate ratio is the inverse time ratio, round by round
        return round(statistics.median(b / a for a, b in zip(seconds[way], seconds[other])), 3)

    return {"model": "all-MiniLM-L6-v2", "tasks": tasks, "selection": "all", "examples": examples,
            "batch_size": batch_size, "rounds": rounds, "threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {cpu_model()}",
            "examples_per_s": {way: round(rate, 1) for way, rate in rates.items()},
            "seconds_per_round": {way: [round(t, 3) for t in times] for way, times in seconds.items()},
            "mixed_over_single": paired("mixed", "single"),
            "mixed_over_switching": paired("mixed", "switching")}


def markdown(result: dict) -> str:
    rates = result["examples_per_s"]
    lines = [f"MiniLM, {result['tasks']} task deltas (`{result['selection']}`), {result['examples']} interleaved "
             f"examples, batch {result['batch_size']}, {result['threads']} torch threads, median of "
             f"{result['rounds']} rounds ({result['date']}, {result['machine']})",
             "",
             "| way | examples/s |",
             "|---|---:|"]
    lines += [f"| {way} | {rates[way]:,.1f} |" for way in WAYS]
    lines += ["", f"mixed / single: {result['mixed_over_single']:.2f}, mixed / switching: "
                  f"{result['mixed_over_switching']:.2f}× (medians of each round's ratio)"]
    return "\n".join(lines) + "\n"


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="serving_benchmark", description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-dir", default="outputs/serving")
    args = parser.parse_args(argv)
    result = measure(args.tasks, args.examples, args.batch_size, args.rounds)
    written = write_report(args.output_dir, "serving", result, markdown(result))
    print(markdown(result))
    print(written)


if __name__ == "__main__":
    main()
