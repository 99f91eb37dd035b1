"""What each method costs at inference, measured: BitFit leaves the base's graph as it is (so does LoRA
once merged), adapters add layers that every forward pass runs.

    python -m fairseq_ext.experiments.inference_cost [--rounds 10] [--tasks 4] [--device cpu] \\
        [--output-dir outputs/inference_cost]

The embedded MiniLM is trained for two updates in each mode with train.py (the values do not change
the cost) and each delta is put on the base in memory.  One forward pass of the classifier
(``model(tokens, features_only=True, classification_head_name=...)``) is timed for each variant:

* ``base``: the pretrained model and a head (a head-only run's delta);
* ``bitfit``: BitFit ``all`` merged (the base's graph, other bias values);
* ``lora-merged`` and ``ia3-merged``: LoRA (r 8 on q, v) and IA3 folded into the weights;
* ``lora-unmerged`` and ``ia3-unmerged``: their layers kept beside the base (PEFT's modules);
* ``adapter``: bottleneck adapters of size 64 after each attention and FFN (never merged);

at batch 1 (latency) and at batch 32 (throughput), on sequences of ``--length`` tokens (128, the GLUE
runner's MAX_SEQ_LEN).  Each round times every variant once, in a rotating order, so a machine
whose speed drifts shifts them alike; each variant is reported as the median over rounds of its
time over the base's in the same round.

Serving ``--tasks`` tasks from one base: windows of 32 interleaved requests (task i mod N, synthetic
sentences of 8 to 40 words) through the predictor, for BitFit (one mixed-task batch per window:
each example gets its task's biases) and for LoRA (unmerged, one sub-batch per task, switched in
place: what mixing LoRA tasks costs), each against one task alone (the upper bound).
"""
import argparse
import datetime
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable, Dict, List

import torch

from ..core.errors import UserError, exit_on_user_error
from ..core.files import write_report
from ..plugin.deltas import merged_model
from ..plugin.models.model_dir import load_model_dir
from ..plugin.models.pretrained import default_model_dir
from ..plugin.predictor import MultiTaskPredictor
from ..training.synthetic_deltas import cpu_model, synthetic_sentences, task_deltas, trained_deltas

# variant -> (the run mode whose delta it serves, merged into the weights)
VARIANTS = {"base": ("head", True), "bitfit": ("bitfit-all", True), "lora-merged": ("lora", True),
            "lora-unmerged": ("lora", False), "ia3-merged": ("ia3", True), "ia3-unmerged": ("ia3", False),
            "adapter": ("adapter", False)}
SERVING = {"bitfit": "bitfit-all", "lora": "lora"}
BATCHES = {"latency": 1, "throughput": 32}


def _forward(model: torch.nn.Module, tokens: torch.Tensor) -> Callable[[], None]:
    head = next(iter(model.classification_heads))

    @torch.no_grad()
    def run():
        model(tokens, features_only=True, classification_head_name=head)
    return run


@torch.no_grad()
def _max_difference(model: torch.nn.Module, other: torch.nn.Module, tokens: torch.Tensor) -> float:
    """The largest difference between two variants' outputs: merging must not change what is computed."""
    head = next(iter(model.classification_heads))
    outputs = [m(tokens, features_only=True, classification_head_name=head)[0] for m in (model, other)]
    return float((outputs[0] - outputs[1]).abs().max())


def _timed(run: Callable[[], None]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def _paired_ratios(seconds: Dict[str, List[float]], reference: str) -> Dict[str, float]:
    """Each way's median over rounds of its time over ``reference``'s in the same round."""
    return {way: round(statistics.median(t / r for t, r in zip(times, seconds[reference])), 3)
            for way, times in seconds.items()}


def _rounds(runs: Dict[str, Callable[[], None]], rounds: int) -> Dict[str, List[float]]:
    names = list(runs)
    for run in runs.values():  # warm-up: allocator, thread pool, first-call paths
        run()
    seconds = {name: [] for name in names}
    for number in range(rounds):
        shift = number % len(names)
        for name in names[shift:] + names[:shift]:
            seconds[name].append(_timed(runs[name]))
    return seconds


def measure(rounds: int, tasks: int, length: int, device: str) -> dict:
    if rounds < 1 or tasks < 1 or length < 3:
        raise UserError("--rounds and --tasks must be at least 1, --length at least 3")
    folder = load_model_dir(default_model_dir())
    with tempfile.TemporaryDirectory(prefix="bitfit-inference-") as tmp:
        deltas = trained_deltas(Path(tmp), list(dict.fromkeys(mode for mode, _ in VARIANTS.values())))
    models = {}
    for variant, (mode, merge) in VARIANTS.items():
        model, _ = merged_model(folder.checkpoint, deltas[mode], merge=merge)
        models[variant] = model.float().to(device).eval()
    generator = torch.Generator().manual_seed(1)
    vocabulary = models["base"].encoder.sentence_encoder.embed_tokens.num_embeddings
    result = {"model": "all-MiniLM-L6-v2", "device": device, "length": length, "rounds": rounds,
              "threads": torch.get_num_threads(), "date": datetime.date.today().isoformat(),
              "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {cpu_model()}", "forward": {}}
    for kind, batch in BATCHES.items():
        tokens = torch.randint(4, vocabulary, (batch, length), generator=generator).to(device)
        if kind == "throughput":
            result["merged_vs_unmerged_max_abs"] = {
                method: _max_difference(models[f"{method}-merged"], models[f"{method}-unmerged"], tokens)
                for method in ("lora", "ia3")}
        seconds = _rounds({variant: _forward(model, tokens) for variant, model in models.items()}, rounds)
        result["forward"][kind] = {"batch": batch, "ms_median": {v: round(1000 * statistics.median(t), 2)
                                                                 for v, t in seconds.items()},
                                   "over_base": _paired_ratios(seconds, "base")}
    result["serving"] = _serving(folder, deltas, tasks, rounds)
    return result


def _serving(folder, deltas: dict, tasks: int, rounds: int, window: int = 32) -> dict:
    """Interleaved requests for ``tasks`` tasks: mixed windows against one task alone, BitFit and LoRA."""
    sentences = synthetic_sentences(folder.bpe_args["wordpiece_vocab"], window * 4)
    runs = {}
    for method, mode in SERVING.items():
        predictor = MultiTaskPredictor(folder.path, batch_size=window)
        for name, delta in task_deltas(deltas[mode], tasks).items():
            predictor.add_task(name, delta)
        interleaved = [(f"task{i % tasks}", s) for i, s in enumerate(sentences)]
        encoded = [(name, predictor.encode(name, [text])[0]) for name, text in interleaved]
        alone = [("task0", ids) for _, ids in encoded]

        def windows(items, predictor=predictor):
            return lambda: [predictor.logits_mixed_encoded(items[i:i + window]) for i in range(0, len(items), window)]
        runs[f"{method}-mixed"], runs[f"{method}-one-task"] = windows(encoded), windows(alone)
    seconds = _rounds(runs, rounds)
    examples = len(sentences)
    return {"tasks": tasks, "window": window, "examples": examples,
            "examples_per_s": {way: round(examples / statistics.median(t), 1) for way, t in seconds.items()},
            "mixed_over_one_task": {method: round(statistics.median(
                m / o for m, o in zip(seconds[f"{method}-mixed"], seconds[f"{method}-one-task"])), 3)
                for method in SERVING}}


def markdown(result: dict) -> str:
    lines = [f"{result['model']} on {result['device']} ({result['machine']}, {result['threads']} torch threads), "
             f"{result['date']}: one forward pass of the classifier on {result['length']}-token sequences, "
             f"median of {result['rounds']} rounds; each ratio is the median of the round-by-round time over "
             "the base's.", "",
             "| variant | " + " | ".join(f"{kind} (batch {v['batch']}) ms | / base" for kind, v in
                                         result["forward"].items()) + " |",
             "|---|" + "---:|---:|" * len(result["forward"])]
    for variant in VARIANTS:
        cells = [f"{v['ms_median'][variant]:.1f} | {v['over_base'][variant]:.3f}" for v in result["forward"].values()]
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    differences = ", ".join(f"{method} {value:.1e}" for method, value in result["merged_vs_unmerged_max_abs"].items())
    lines += ["", f"Merged against unmerged, the largest difference in the outputs: {differences}."]
    serving = result["serving"]
    lines += ["", f"Serving {serving['tasks']} tasks from one base, windows of {serving['window']} interleaved "
                  f"requests ({serving['examples']} examples), against the same windows all for one task:", "",
              "| method | mixed-task examples/s | one-task examples/s | mixed / one task (time) |", "|---|---:|---:|---:|"]
    for method in SERVING:
        rates = serving["examples_per_s"]
        lines.append(f"| {method} | {rates[f'{method}-mixed']} | {rates[f'{method}-one-task']} | "
                     f"{serving['mixed_over_one_task'][method]:.3f} |")
    return "\n".join(lines) + "\n"


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tasks", type=int, default=4, help="tasks served from one base (default 4)")
    parser.add_argument("--length", type=int, default=128, help="tokens per sequence (default 128)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--output-dir", type=Path, default=Path("outputs/inference_cost"))
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is visible")
    result = measure(args.rounds, args.tasks, args.length, args.device)
    report = markdown(result)
    write_report(args.output_dir, "inference_cost", result, report)
    print(report, end="")


if __name__ == "__main__":
    main()
