"""The HTTP server (python -m fairseq_ext.tools.serve) on localhost, driven by a real HTTP client."""
import contextlib
import dataclasses
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import tiny
from fairseq_ext.core import delta_file as deltas
from fairseq_ext.plugin.predictor import MultiTaskPredictor

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

BEST_DELTA = f"checkpoint_best{deltas.DELTA_SUFFIX}"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def request(port, path, body=None):
    """(status, JSON body) of a GET, or of a POST when ``body`` is given."""
    data = None if body is None else json.dumps(body).encode()
    call = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                  headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(call, timeout=60) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def serve_command(base, dictionary, deltas_by_task, port):
    return [sys.executable, "-m", "fairseq_ext.tools.serve", "--base", str(base), "--dictionary", str(dictionary),
            *[arg for name, path in deltas_by_task.items() for arg in ("--delta", f"{name}={path}")],
            "--port", str(port), "--max-batch", "8", "--wait-ms", "20", "--max-inputs", "50"]


@contextlib.contextmanager
def running_server(command, port, log_path):
    """The server started with ``command`` on ``port``, once /health answers; stopped after the block."""
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, cwd=tiny.REPO, stdout=subprocess.DEVNULL, stderr=log,
                                   env=dict(os.environ, PYTHONPATH=str(tiny.REPO), OMP_NUM_THREADS="1"))
    try:
        for _ in range(240):
            if process.poll() is not None:
                raise AssertionError(f"the server exited {process.returncode}: {log_path.read_text()[-3000:]}")
            try:
                if request(port, "/health")[0] == 200:
                    break
            except OSError:
                time.sleep(0.5)
        else:
            raise AssertionError("the server did not answer /health within 2 minutes")
        yield process
    finally:
        process.terminate()
        process.wait(timeout=30)


@pytest.fixture(scope="module")
def server(tiny_runs, tiny_pretrained, tiny_data, tmp_path_factory):
    port = free_port()
    dictionary = tiny_data / "input0" / "dict.txt"
    folder = tmp_path_factory.mktemp("serve")
    # The ofa delta as a single-sentence GLUE task (CoLA's two classes), so pairs are refused for it.
    ofa = deltas.read_delta(tiny_runs / "ofa" / BEST_DELTA)
    dataclasses.replace(ofa, task={**ofa.task, "cfg": {**ofa.task_cfg, "glue_task": "CoLA"}}).save(folder / "cola.delta")
    task_deltas = {"ofa": tiny_runs / "ofa" / BEST_DELTA, "all": tiny_runs / "all" / BEST_DELTA,
                   "cola": folder / "cola.delta"}
    with running_server(serve_command(tiny_pretrained, dictionary, task_deltas, port), port, folder / "server.log"):
        predictor = MultiTaskPredictor(tiny_pretrained, dictionary=dictionary)
        for name, path in task_deltas.items():
            predictor.add_task(name, path)
        yield port, predictor


def test_health_lists_the_tasks(server):
    port, _ = server
    status, body = request(port, "/health")
    assert status == 200 and body["status"] == "ok" and set(body["tasks"]) == {"ofa", "all", "cola"}
    assert body["tasks"]["ofa"] == {"glue_task": None, "regression": False, "labels": ["0", "1"], "pair": None}
    assert body["tasks"]["cola"]["glue_task"] == "CoLA" and body["tasks"]["cola"]["pair"] is False


def test_concurrent_requests_for_different_tasks_get_predict_s_answers(server, tiny_data):
    port, predictor = server
    sentences = (tiny_data.parent / "raw" / "valid.input0").read_text().splitlines()[:24]
    requests = [("ofa" if index % 2 else "all", sentences[index:index + 3]) for index in range(0, 24, 3)]
    before = request(port, "/health")[1]["served"]
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:  # at once: the server mixes them in batches
        answers = list(pool.map(lambda job: request(port, "/predict", {"task": job[0], "inputs": job[1]}), requests))
    served = {key: value - before[key] for key, value in request(port, "/health")[1]["served"].items()}
    assert served["requests"] == len(requests) and served["examples"] == 24
    assert served["batches"] < served["requests"]  # requests for both tasks shared batches
    for (task, inputs), (status, body) in zip(requests, answers):
        assert status == 200 and body["task"] == task and len(body["predictions"]) == len(inputs)
        expected = predictor.predict(task, inputs)
        for got, want in zip(body["predictions"], expected):
            assert got["label"] == want.label
            assert torch.allclose(torch.tensor(got["logits"]), torch.tensor(want.logits), rtol=0, atol=1e-6)


@pytest.mark.parametrize("body, status, needle", [
    ({"task": "nope", "inputs": ["good"]}, 404, "no task 'nope'; loaded: ofa, all"),
    ({"task": "ofa", "inputs": []}, 422, "inputs: empty"),
    ({"task": "ofa", "inputs": [["a", "b", "c"]]}, 422, "at most 2 items"),
    ({"task": "cola", "inputs": [["a premise", "a hypothesis"]]}, 422, "takes single sentences"),
    ({"task": "ofa", "inputs": ["good"] * 51}, 413, "51 given, at most 50"),
    ({"task": "ofa"}, 422, "Field required"),
])
def test_bad_requests_get_a_clear_4xx_and_the_server_keeps_serving(server, body, status, needle):
    port, predictor = server
    got_status, got = request(port, "/predict", body)
    assert got_status == status and needle in json.dumps(got["detail"]), got
    ok_status, ok = request(port, "/predict", {"task": "ofa", "inputs": ["good w1 w2"]})
    assert ok_status == 200 and ok["predictions"][0]["label"] == predictor.predict("ofa", ["good w1 w2"])[0].label


def test_a_delta_for_another_base_is_refused_at_start(tiny_runs, tiny_pretrained, tiny_data, tmp_path):
    other = torch.load(tiny_pretrained, map_location="cpu", weights_only=False)
    name = next(n for n in other["model"] if n.endswith("fc1.weight"))  # a frozen weight
    other["model"][name] = other["model"][name] + 1
    torch.save(other, tmp_path / "other.pt")
    result = tiny.run(serve_command(tmp_path / "other.pt", tiny_data / "input0" / "dict.txt",
                                   {"ofa": tiny_runs / "ofa" / BEST_DELTA}, free_port())[1:], check=False,
                      timeout=120)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "is not the base" in lines[0], result.stderr
