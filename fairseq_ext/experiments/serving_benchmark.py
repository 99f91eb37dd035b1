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

``--load`` (``run_scripts/serving_load.sh``) measures the HTTP server instead: it starts
``python -m fairseq_ext.tools.serve`` on 127.0.0.1 with two task deltas (``--delta`` ones, or
two made as above), then ``--clients`` closed-loop clients send one-sentence requests for
``--seconds`` (throughput, p50/p99 latency, errors), then one request of the largest size the
limits admit is sent and one-sentence requests are timed one after another while it is in
flight.  The server's resident memory is read before and after.  Everything ends within
``--seconds`` plus the server's start and the large request.
"""
import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import json
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..core.errors import UserError, exit_on_user_error
from ..core.files import write_report
from ..plugin.models.model_dir import load_model_dir
from ..plugin.models.pretrained import default_model_dir
from ..plugin.predictor import MultiTaskPredictor
from ..plugin.predictor_options import parse_delta_options
from ..training.synthetic_deltas import cpu_model, synthetic_sentences, task_deltas, trained_delta

WAYS = ("mixed", "switching", "single")
GLUE_TOKENS = 128  # the GLUE runner's MAX_SEQ_LEN: where its deltas truncate


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
        base_delta = trained_delta(Path(tmp), "bitfit-all")
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


# --------------------------------------------------------------------------- the server under load


def _post(port: int, body: dict, timeout: float = 120.0):
    """(HTTP status, seconds) of one POST /predict to the server on 127.0.0.1."""
    call = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=json.dumps(body).encode(),
                                  headers={"Content-Type": "application/json"})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(call, timeout=timeout) as response:
            response.read()
            status = response.status
    except urllib.error.HTTPError as error:
        status = error.code
    except OSError:
        status = 0  # no answer at all
    return status, time.perf_counter() - started


def _resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def _percentile(values: List[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))] if ordered else float("nan")


def _start_server(base: str, deltas: Dict[str, str], log_path: Path):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "fairseq_ext.tools.serve", "--base", base, "--host", "127.0.0.1",
               "--port", str(port), *[arg for name, path in deltas.items() for arg in ("--delta", f"{name}={path}")]]
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log)
    for _ in range(600):  # up to 5 minutes to load the model
        if process.poll() is not None:
            raise RuntimeError(f"the server exited {process.returncode}: {log_path.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                return process, port, json.loads(response.read())
        except OSError:
            time.sleep(0.5)
    process.kill()
    raise RuntimeError("the server did not answer /health within 5 minutes")


def measure_load(clients: int, seconds: float, deltas: Optional[Dict[str, str]] = None) -> dict:
    if clients < 1 or seconds <= 0:
        raise UserError("--clients must be at least 1 and --seconds above 0")
    folder = load_model_dir(default_model_dir())
    sentences = synthetic_sentences(folder.bpe_args["wordpiece_vocab"], 256)
    with tempfile.TemporaryDirectory(prefix="bitfit-serving-load-") as tmp:
        tmp = Path(tmp)
        if not deltas:
            deltas = {}
            for name, delta in task_deltas(trained_delta(tmp, "bitfit-all"), 2).items():
                # Truncated at 128 tokens, as the GLUE runner's deltas are (MAX_SEQ_LEN), not at the model's 512.
                delta = dataclasses.replace(delta, task={**delta.task, "truncate_to": GLUE_TOKENS})
                delta.save(tmp / f"{name}.delta.safetensors")
                deltas[name] = str(tmp / f"{name}.delta.safetensors")
        process, port, health = _start_server(folder.path, deltas, tmp / "server.log")
        try:
            tasks = list(health["tasks"])
            for sentence in sentences[:8]:  # warm-up
                _post(port, {"task": tasks[0], "inputs": [sentence]})
            memory_before = _resident_mb(process.pid)
            deadline = time.monotonic() + seconds
            latencies, statuses, lock = [], {}, threading.Lock()

            def client(number: int) -> None:
                sent = number
                while time.monotonic() < deadline:
                    task = tasks[sent % len(tasks)]
                    status, took = _post(port, {"task": task, "inputs": [sentences[sent % len(sentences)]]})
                    with lock:
                        statuses[status] = statuses.get(status, 0) + 1
                        if status == 200:
                            latencies.append(took)
                    sent += clients

            started = time.perf_counter()
            with ThreadPoolExecutor(max_workers=clients) as pool:
                list(pool.map(client, range(clients)))
            elapsed = time.perf_counter() - started
            memory_after_load = _resident_mb(process.pid)
            large = _largest_request(health["limits"], sentences, tasks[0])
            idle = [_post(port, {"task": tasks[1], "inputs": [sentences[3]]})[1] for _ in range(5)]
            outcome = {}
            big = threading.Thread(target=lambda: outcome.update(large=_post(port, large, timeout=600)))
            big.start()
            time.sleep(0.5)  # the large request is being read and tokenized
            during = []
            while big.is_alive() and len(during) < 200:
                status, took = _post(port, {"task": tasks[1], "inputs": [sentences[len(during) % 64]]})
                if big.is_alive():
                    during.append((status, took))
            big.join()
            memory_after = _resident_mb(process.pid)
        finally:
            process.terminate()
            process.wait(timeout=30)
    answered = sum(statuses.values())
    return {"model": "all-MiniLM-L6-v2", "tasks": tasks, "clients": clients, "seconds": round(elapsed, 1),
            "date": datetime.date.today().isoformat(),
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {cpu_model()}",
            "limits": health["limits"], "requests": answered, "requests_per_s": round(answered / elapsed, 1),
            "statuses": {str(code): count for code, count in sorted(statuses.items())},
            "errors": answered - statuses.get(200, 0),
            "latency_ms": {"p50": round(1000 * _percentile(latencies, 0.5), 1),
                           "p99": round(1000 * _percentile(latencies, 0.99), 1),
                           "max": round(1000 * max(latencies, default=float("nan")), 1)},
            "resident_mb": {"before": memory_before, "after_load": memory_after_load, "after": memory_after},
            "large_request": {"inputs": len(large["inputs"]), "characters_each": len(large["inputs"][0]),
                              "status": outcome["large"][0], "seconds": round(outcome["large"][1], 2)},
            "one_sentence_ms": {"idle_median": round(1000 * statistics.median(idle), 1),
                                "during_large_requests": len(during),
                                "during_large_median": round(1000 * statistics.median(t for _, t in during), 1)
                                if during else None,
                                "during_large_max": round(1000 * max(t for _, t in during), 1) if during else None,
                                "during_large_errors": sum(1 for status, _ in during if status != 200)}}


def _largest_request(limits: dict, sentences: List[str], task: str) -> dict:
    """As many inputs as the limits admit, each as long as the body limit leaves room for."""
    count = limits["max_inputs"]
    chars = min(limits["max_input_chars"], (limits["max_body_bytes"] - 64) // count - 4)
    words = " ".join(sentences).encode("ascii", "ignore").decode()  # one JSON byte a character
    text = (words + " ") * (1 + chars // max(1, len(words)))
    return {"task": task, "inputs": [text[:chars].strip() or "w"] * count}


def load_markdown(result: dict) -> str:
    latency, memory, large, during = (result["latency_ms"], result["resident_mb"], result["large_request"],
                                      result["one_sentence_ms"])
    return "\n".join([
        f"Server under load: MiniLM, tasks {', '.join(result['tasks'])}, {result['clients']} closed-loop clients "
        f"for {result['seconds']} s ({result['date']}, {result['machine']})",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| requests (one sentence each) | {result['requests']:,} |",
        f"| throughput | {result['requests_per_s']:,.1f} requests/s |",
        f"| latency p50 / p99 / max | {latency['p50']} / {latency['p99']} / {latency['max']} ms |",
        f"| errors | {result['errors']} (statuses {result['statuses']}) |",
        f"| server memory before / after load / after the large request | {memory['before']} / "
        f"{memory['after_load']} / {memory['after']} MB |",
        f"| largest request ({large['inputs']} inputs of {large['characters_each']:,} characters) | "
        f"{large['seconds']} s, status {large['status']} |",
        f"| one sentence, idle (median) | {during['idle_median']} ms |",
        f"| one sentence while the largest request runs: median / max ({during['during_large_requests']} sent, "
        f"{during['during_large_errors']} errors) | {during['during_large_median']} / {during['during_large_max']} ms |",
    ]) + "\n"


@exit_on_user_error
def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--examples", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--output-dir", default="outputs/serving")
    parser.add_argument("--load", action="store_true", help="measure the HTTP server under load instead")
    parser.add_argument("--clients", type=int, default=16, help="--load: concurrent clients (default: 16)")
    parser.add_argument("--seconds", type=float, default=30.0, help="--load: how long they send (default: 30)")
    parser.add_argument("--delta", action="append", metavar="TASK=PATH",
                        help="--load: serve these deltas (default: two made from a short BitFit run)")
    args = parser.parse_args(argv)
    if args.load:
        deltas = parse_delta_options(args.delta or [])
        result = measure_load(args.clients, args.seconds, deltas)
        text = load_markdown(result)
        written = write_report(args.output_dir, "serving_load", result, text)
    else:
        result = measure(args.tasks, args.examples, args.batch_size, args.rounds)
        text = markdown(result)
        written = write_report(args.output_dir, "serving", result, text)
    print(text)
    print(written)


if __name__ == "__main__":
    main()
