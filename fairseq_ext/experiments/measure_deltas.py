"""Measure BitFit deltas: size against the full checkpoint, task switch time, prediction throughput.

    bash run_scripts/measure_deltas.sh [--glue-dir glue_data] [--out-dir outputs/deltas]
    python -m fairseq_ext.experiments.measure_deltas ...   (the same)

1. The embedded all-MiniLM-L6-v2, BitFit (--bitfit-terms ofa, head trained) for a
   few updates with train.py on CoLA and STS-B (a training subset): the sizes of
   checkpoint_best.pt and checkpoint_best.delta.safetensors.
2. RoBERTa-base, built in-process from fairseq's roberta_base arch with random
   weights and a 2-class head (sizes only; no pretrained weights are downloaded):
   the model's state dict saved with torch.save against its OFA delta.
3. MultiTaskPredictor on the MiniLM base with both deltas: the median time of a
   task switch, and sentences per second with batch 32 on CoLA's dev sentences.

Prints a Markdown table and writes OUT_DIR/measurements.json.
"""
import argparse
import json
import os
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch
from fairseq import checkpoint_utils
from fairseq.data import Dictionary

from ..core import bitfit
from ..core import delta_file as deltas
from ..core.glue_files import read_split
from ..core.glue_tasks import get_task_spec
from ..plugin.data.glue_prepare import prepare_task
from ..plugin.models.build import architecture_config, build_fairseq_model
from ..plugin.models.model_dir import load_model_dir
from ..plugin.models.pretrained import default_model_dir
from ..plugin.predictor import MultiTaskPredictor
from ..training.options import TRAIN_COMMAND, mode_flags

TASKS = {"cola": "CoLA", "stsb": "STS-B"}


def train_bitfit(model, glue_dir: Path, task: str, out_dir: Path, updates: int) -> Path:
    """Prepare a GLUE task (a training subset) and BitFit it with train.py; returns the save dir."""
    spec = get_task_spec(task)
    data = out_dir / "data" / spec.name
    prepare_task(spec, glue_dir, model, None, data, workers=1, train_subset=512)
    save_dir = out_dir / "runs" / spec.name
    if not (save_dir / "checkpoint_best.pt").is_file():
        command = [*TRAIN_COMMAND, str(data), "--task", "glue",
                   "--criterion", "glue_prediction", *model.arch_args(), "--restore-file", model.checkpoint,
                   "--reset-optimizer", "--reset-dataloader", "--reset-meters", "--max-seq-len", "128",
                   "--batch-size", "32", "--optimizer", "adam", "--lr", "1e-3", "--max-update", str(updates),
                   "--save-dir", str(save_dir), "--no-epoch-checkpoints",
                   "--best-checkpoint-metric", spec.primary_metric, "--maximize-best-checkpoint-metric",
                   "--valid-subset", ",".join(spec.valid_subsets), "--cpu", "--num-workers", "0",
                   "--log-format", "simple", *mode_flags("bitfit-ofa")]
        subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    return save_dir


def file_sizes(save_dir: Path) -> dict:
    full = (save_dir / "checkpoint_best.pt").stat().st_size
    delta = (save_dir / f"checkpoint_best{deltas.DELTA_SUFFIX}").stat().st_size
    return {"full_bytes": full, "delta_bytes": delta, "ratio": delta / full}


def roberta_base_sizes(like: deltas.Delta) -> dict:
    """roberta_base (random init) with a 2-class head: torch.save'd state dict vs its OFA delta file."""
    dictionary = Dictionary()
    for index in range(50261):  # RoBERTa's dict.txt plus <mask>: 50,265 symbols
        dictionary.add_symbol(str(index))
    dictionary.add_symbol("<mask>")
    model_cfg = architecture_config("roberta_base", arch="roberta_base", max_positions=512)
    model = build_fairseq_model(model_cfg, dictionary)
    model.register_classification_head("sentence_classification_head", num_classes=2)
    selection = bitfit.select(model, "ofa")
    # A real run leaves lm_head.layer_norm.bias frozen: unused in sentence classification.
    names = [name for name in selection.names if "lm_head" not in name]
    state = model.state_dict()
    started = time.perf_counter()
    frozen = deltas.frozen_base_tensors(state, names)
    fingerprint = deltas.tensors_fingerprint(frozen)
    fingerprint_s = time.perf_counter() - started
    delta = deltas.Delta(
        tensors={name: state[name] for name in names},
        selection={**like.selection, "trained": names},
        task={**like.task, "cfg": {**like.task_cfg, "glue_task": None, "num_classes": 2}},
        model={"arch": "roberta_base", "args": model_cfg, "namespace": True},
        dictionary=deltas.dictionary_identity(dictionary),
        base={"fingerprint": fingerprint, "dtype": "float32", "tensors": len(frozen),
              "parameters": sum(t.numel() for t in frozen.values())},
        progress=like.progress, training_cfg=like.training_cfg)
    with tempfile.TemporaryDirectory() as tmp:
        full_path, delta_path = Path(tmp) / "model.pt", Path(tmp) / f"model{deltas.DELTA_SUFFIX}"
        torch.save({"model": state}, full_path)
        delta.save(delta_path)
        sizes = {"full_bytes": full_path.stat().st_size, "delta_bytes": delta_path.stat().st_size}
    sizes.update(ratio=sizes["delta_bytes"] / sizes["full_bytes"], delta_params=sum(state[n].numel() for n in names),
                 model_params=sum(p.numel() for p in model.parameters()), fingerprint_seconds=fingerprint_s)
    return sizes


def predictor_timings(model_path: str, runs: dict, glue_dir: Path, switches: int, batch_size: int) -> dict:
    started = time.perf_counter()
    predictor = MultiTaskPredictor(model_path, batch_size=batch_size)
    for name, save_dir in runs.items():
        predictor.add_task(name, save_dir / f"checkpoint_best{deltas.DELTA_SUFFIX}")
    load_s = time.perf_counter() - started

    names = list(runs)
    times = []
    for index in range(switches):
        started = time.perf_counter()
        predictor.use(names[index % len(names)])
        times.append(time.perf_counter() - started)

    sentences = [texts[0] for texts in read_split("CoLA", glue_dir, "valid").texts]
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    # On a shared machine, OpenMP threads waiting for a busy core can make more threads slower: try each count.
    sentences_per_second = {}
    for threads in sorted({1, cores}):
        torch.set_num_threads(threads)
        predictor.predict("cola", sentences[:64])  # warm-up
        rates = []
        for _ in range(3):
            started = time.perf_counter()
            predictor.predict("cola", sentences)
            rates.append(len(sentences) / (time.perf_counter() - started))
        sentences_per_second[threads] = statistics.median(rates)
    torch.set_num_threads(cores)
    return {"load_base_and_deltas_seconds": load_s, "switch_median_seconds": statistics.median(times),
            "switches": switches, "sentences": len(sentences), "batch_size": batch_size,
            "sentences_per_second_by_threads": sentences_per_second, "cpu_cores": cores,
            "load_average_1min": os.getloadavg()[0]}


def full_reload_seconds(checkpoint: Path) -> float:
    """For contrast: loading a full fine-tuned checkpoint the fairseq way."""
    started = time.perf_counter()
    checkpoint_utils.load_model_ensemble_and_task([str(checkpoint)])
    return time.perf_counter() - started


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--glue-dir", default=os.environ.get("GLUE_DIR", "glue_data"),
                        help="GLUE's glue_data folder with CoLA and STS-B (default: $GLUE_DIR, else ./glue_data)")
    parser.add_argument("--out-dir", default="outputs/deltas")
    parser.add_argument("--updates", type=int, default=20, help="BitFit updates per task (sizes do not depend on it)")
    parser.add_argument("--switches", type=int, default=2000)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--skip-roberta-base", action="store_true", help="skip the 500 MB RoBERTa-base file")
    args = parser.parse_args(argv)
    out_dir, glue_dir = Path(args.out_dir), Path(args.glue_dir)
    model = load_model_dir(default_model_dir())
    runs = {name: train_bitfit(model, glue_dir, task, out_dir, args.updates) for name, task in TASKS.items()}
    results = {"minilm": {TASKS[name]: file_sizes(save_dir) for name, save_dir in runs.items()}}
    if not args.skip_roberta_base:
        like = deltas.read_delta(runs["cola"] / f"checkpoint_best{deltas.DELTA_SUFFIX}")
        results["roberta_base_random_init"] = roberta_base_sizes(like)
    results["predictor"] = predictor_timings(model.path, runs, glue_dir, args.switches, args.batch_size)
    results["predictor"]["full_checkpoint_load_seconds"] = full_reload_seconds(runs["cola"] / "checkpoint_best.pt")

    print("| model | task | full checkpoint | delta | delta / full |")
    print("|---|---|---:|---:|---:|")
    for task, sizes in results["minilm"].items():
        print(f"| all-MiniLM-L6-v2 | {task} | {sizes['full_bytes']:,} B | {sizes['delta_bytes']:,} B | "
              f"{100 * sizes['ratio']:.2f}% |")
    if "roberta_base_random_init" in results:
        sizes = results["roberta_base_random_init"]
        print(f"| RoBERTa-base (random init, in-process) | 2 classes | {sizes['full_bytes']:,} B | "
              f"{sizes['delta_bytes']:,} B | {100 * sizes['ratio']:.2f}% |")
    timings = results["predictor"]
    print(f"\ntask switch (MiniLM, {len(runs)} tasks): median {1e6 * timings['switch_median_seconds']:.0f} us over "
          f"{timings['switches']} switches; loading a full checkpoint instead: "
          f"{timings['full_checkpoint_load_seconds']:.2f} s")
    rates = ", ".join(f"{rate:.0f} sentences/s with {threads} torch thread{'s' if threads > 1 else ''}"
                      for threads, rate in timings["sentences_per_second_by_threads"].items())
    print(f"throughput (MiniLM, CoLA dev, {timings['sentences']} sentences, batch {timings['batch_size']}, "
          f"{timings['cpu_cores']} CPU cores, load average {timings['load_average_1min']:.1f}): {rates}")
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "measurements.json").write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
