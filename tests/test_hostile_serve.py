"""Hostile clients of the HTTP server: each gets a precise 4xx, and no other client's request fails.

A real server (``python -m fairseq_ext.tools.serve`` on 127.0.0.1, the tiny RoBERTa tasks)
answers the issue's reproductions over raw HTTP; the batcher's isolation and fairness are
checked in-process on the real predictor, with failures injected where no valid input can
cause one any more.
"""
import asyncio
import http.client
import json
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from test_serve import BEST_DELTA, free_port, request, running_server, serve_command

pytest.importorskip("fastapi")
from fairseq_ext.plugin.predictor import MultiTaskPredictor  # noqa: E402
from fairseq_ext.tools.serve import InputRejected, MixedBatcher  # noqa: E402
from fairseq_ext.tools.serve.limits import host_name  # noqa: E402

MAX_INPUTS = 50


def raw(port, body: bytes, host=None, method="POST", path="/predict", chunked=False):
    """(status, parsed JSON or None) of a request sent as given: bytes as they are, any Host."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        connection.putrequest(method, path, skip_host=True)
        connection.putheader("Host", host or f"127.0.0.1:{port}")
        connection.putheader("Content-Type", "application/json")
        if chunked:
            connection.putheader("Transfer-Encoding", "chunked")
            connection.endheaders()
            for start in range(0, len(body), 65536):
                piece = body[start:start + 65536]
                connection.send(f"{len(piece):x}\r\n".encode() + piece + b"\r\n")
            connection.send(b"0\r\n\r\n")
        else:
            connection.putheader("Content-Length", str(len(body)))
            connection.endheaders(body)
        response = connection.getresponse()
        content = response.read()
        return response.status, (json.loads(content) if content else None)
    finally:
        connection.close()


@pytest.fixture(scope="module")
def server(tiny_runs, tiny_pretrained, tiny_data, tmp_path_factory):
    port = free_port()
    dictionary = tiny_data / "input0" / "dict.txt"
    folder = tmp_path_factory.mktemp("hostile_serve")
    task_deltas = {"ofa": tiny_runs / "ofa" / BEST_DELTA, "all": tiny_runs / "all" / BEST_DELTA}
    command = serve_command(tiny_pretrained, dictionary, task_deltas, port) + ["--header-timeout-s", "1"]
    with running_server(command, port, folder / "server.log"):
        predictor = MultiTaskPredictor(tiny_pretrained, dictionary=dictionary)
        for name, path in task_deltas.items():
            predictor.add_task(name, path)
        yield port, predictor, folder / "server.log"


def good_answer_is_right(predictor, task, inputs, answer):
    status, body = answer
    assert status == 200, body
    expected = predictor.predict(task, inputs)
    assert body["task"] == task and len(body["predictions"]) == len(inputs)
    for got, want in zip(body["predictions"], expected):
        assert got["label"] == want.label
        assert torch.allclose(torch.tensor(got["logits"]), torch.tensor(want.logits), rtol=0, atol=1e-6)


def test_the_limits_follow_the_model_s_length(server):
    port, predictor, _ = server
    status, health = request(port, "/health")
    assert status == 200 and predictor.max_tokens("ofa") == 64
    assert health["limits"] == {"max_inputs": MAX_INPUTS, "max_input_chars": 32 * 64, "max_body_bytes": 256 * 32 * 64}


LIMIT_CHARS, LIMIT_BODY = 32 * 64, 256 * 32 * 64
HOSTILE = [  # (raw body, status, a fragment of detail)
    (b'{"task":"ofa","inputs":["\\ud800"]}', 422, "inputs[0]: not valid Unicode text (surrogates not allowed"),
    (b'{"task":"ofa","inputs":[["good w1","\\udfff bad"]]}', 422, "inputs[0][1]: not valid Unicode"),
    (b'{"task":"ofa","inputs":[NaN]}', 422, "Input should be a valid string"),
    (b'{"task":"ofa","inputs":["good", Infinity]}', 422, "Input should be a valid string"),
    (b'{"task":"ofa","inputs":[""]}', 422, "inputs[0]: empty text"),
    (b'{"task":"ofa","inputs":["good w1", " \\t\\n "]}', 422, "inputs[1]: empty text"),
    (json.dumps({"task": "ofa", "inputs": ["w1 " * 700]}).encode(), 413, f"at most {LIMIT_CHARS:,} a text"),
    (json.dumps({"task": "ofa", "inputs": ["good"] * 60}).encode(), 413, f"at most {MAX_INPUTS} a request"),
    (b'{"task":"ofa","inputs":["' + b"w" * LIMIT_BODY + b'"]}', 413, f"over {LIMIT_BODY:,} bytes"),
    (b'{"task":"ofa","inputs":', 422, "JSON decode error"),
    (b'{"task":"ofa","inputs":[{"__reduce__":"os.system"}]}', 422, "Input should be a valid"),
]


@pytest.mark.parametrize("body, status, needle", HOSTILE, ids=[str(i) for i in range(len(HOSTILE))])
def test_each_hostile_request_gets_a_precise_4xx(server, body, status, needle):
    port, predictor, _ = server
    got_status, got = raw(port, body)
    assert got_status == status and needle in json.dumps(got["detail"]), got
    good_answer_is_right(predictor, "ofa", ["good w1 w2"], request(port, "/predict", {"task": "ofa",
                                                                                       "inputs": ["good w1 w2"]}))


def test_a_body_over_the_limit_without_a_length_is_refused_as_it_arrives(server):
    port, _, _ = server
    status, got = raw(port, b'{"task":"ofa","inputs":["' + b"w" * LIMIT_BODY + b'"]}', chunked=True)
    assert status == 413 and f"over {LIMIT_BODY:,} bytes (--max-body-bytes)" in got["detail"]


def test_host_header_allow_list_and_head(server):
    port, _, _ = server
    body = json.dumps({"task": "ofa", "inputs": ["good"]}).encode()
    status, got = raw(port, body, host=f"rebound.attacker.example:{port}")
    assert status == 400 and "Host 'rebound.attacker.example" in got["detail"] and "--allowed-host" in got["detail"]
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", "127.0.0.1", f"[::1]:{port}"):
        assert raw(port, body, host=host)[0] == 200, host
    assert raw(port, b"", method="HEAD", path="/health") == (200, None)
    assert host_name("[::1]:80") == "::1" and host_name("a.example:80") == "a.example" and host_name("::1") == "::1"


def test_a_connection_that_never_finishes_its_headers_is_closed(server):
    port, predictor, _ = server
    with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
        slow.sendall(b"POST /predict HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n")
        # Meanwhile other clients are served.
        good_answer_is_right(predictor, "ofa", ["good w1"], request(port, "/predict", {"task": "ofa",
                                                                                        "inputs": ["good w1"]}))
        assert slow.recv(1024) == b""  # closed by the server (--header-timeout-s 1), well before the 30 s


def test_poison_clients_mixed_into_concurrent_good_clients(server, tiny_data):
    """40 good clients and 20 hostile ones at once: every good one gets its own right answer."""
    port, predictor, log = server
    sentences = (tiny_data.parent / "raw" / "valid.input0").read_text().splitlines()
    good = [("ofa" if index % 2 else "all", sentences[index % 40:index % 40 + 1 + index % 3]) for index in range(40)]
    poison = [HOSTILE[index % 7][0] for index in range(20)]
    jobs = [("good", job) for job in good]
    for index, body in enumerate(poison):
        jobs.insert(index * 3, ("poison", body))
    before = request(port, "/health")[1]["served"]

    def send(job):
        kind, payload = job
        if kind == "good":
            return request(port, "/predict", {"task": payload[0], "inputs": payload[1]})
        return raw(port, payload)

    with ThreadPoolExecutor(max_workers=len(jobs)) as pool:
        answers = list(pool.map(send, jobs))
    for (kind, payload), answer in zip(jobs, answers):
        if kind == "good":
            good_answer_is_right(predictor, payload[0], payload[1], answer)
        else:
            assert 400 <= answer[0] < 500, answer
    served = request(port, "/health")[1]["served"]
    assert served["requests"] - before["requests"] == len(good)
    assert "Traceback" not in log.read_text()


# ------------------------------------------------------------------ the batcher, in-process


@pytest.fixture(scope="module")
def predictor(tiny_runs, tiny_pretrained, tiny_data):
    predictor = MultiTaskPredictor(tiny_pretrained, dictionary=tiny_data / "input0" / "dict.txt", batch_size=8)
    predictor.add_task("ofa", tiny_runs / "ofa" / BEST_DELTA)
    predictor.add_task("all", tiny_runs / "all" / BEST_DELTA)
    return predictor


async def serve_all(batcher, requests):
    """Each (task, inputs) request through the batcher at once: its predictions, or the exception."""
    worker = asyncio.create_task(batcher.run())
    try:
        return await asyncio.gather(*(batcher.predict(task, inputs) for task, inputs in requests),
                                    return_exceptions=True)
    finally:
        worker.cancel()
        batcher.shutdown()


def test_a_batch_that_fails_fails_only_the_request_that_broke_it(predictor, monkeypatch):
    """A poison token no valid input carries any more (the lone surrogate did): the batch fails, each
    request is run alone, and only the poisoned one fails."""
    poison = predictor.dictionary.index("awful")
    logits = predictor.logits_mixed_encoded

    def breaks_on_poison(encoded):
        if any(bool((tokens == poison).any()) for _, tokens in encoded):
            raise TypeError("TextInputSequence must be str")
        return logits(encoded)

    monkeypatch.setattr(predictor, "logits_mixed_encoded", breaks_on_poison)
    requests = [("ofa", ["good w1", "nice w2"]), ("all", ["awful w3"]), ("all", ["fine w4"]), ("ofa", ["sad w5"])]
    results = asyncio.run(serve_all(MixedBatcher(predictor, max_batch=8, wait_s=0.05), requests))
    assert isinstance(results[1], TypeError)
    monkeypatch.undo()
    for (task, inputs), result in zip(requests, results):
        if task == "all" and inputs == ["awful w3"]:
            continue
        for got, want in zip(result, predictor.predict(task, inputs), strict=True):
            assert got.label == want.label and got.logits == pytest.approx(want.logits, abs=1e-6)


def test_an_input_the_tokenizer_refuses_fails_only_its_request(predictor, monkeypatch):
    encode = predictor.encode

    def refuses_ugly(task, examples):
        if any("ugly" in example for example in examples):
            raise TypeError("TextInputSequence must be str")
        return encode(task, examples)

    monkeypatch.setattr(predictor, "encode", refuses_ugly)
    requests = [("ofa", ["good w1"]), ("ofa", ["w1", "w2 ugly"]), ("all", ["bad w3"])]
    results = asyncio.run(serve_all(MixedBatcher(predictor, max_batch=8, wait_s=0.05), requests))
    assert isinstance(results[1], InputRejected) and str(results[1]).startswith("inputs[1]: cannot be tokenized")
    assert [p.label for p in results[0]] == [p.label for p in predictor.predict("ofa", ["good w1"])]
    assert [p.label for p in results[2]] == [p.label for p in predictor.predict("all", ["bad w3"])]


def test_a_large_request_shares_the_model_with_a_small_one(predictor, tiny_data):
    """Round-robin batches: a one-sentence request sent after a 200-input one runs in the first or
    second batch, not after the large one's 25; both get predict's answers."""
    sentences = (tiny_data.parent / "raw" / "valid.input0").read_text().splitlines()
    large = [sentences[index % len(sentences)] for index in range(200)]
    batches = []
    logits = predictor.logits_mixed_encoded

    def recording(encoded):
        batches.append([tokens for _, tokens in encoded])
        return logits(encoded)

    predictor.logits_mixed_encoded = recording
    try:
        results = asyncio.run(serve_all(MixedBatcher(predictor, max_batch=8, wait_s=0.0),
                                        [("ofa", large), ("all", ["nice w7 w8 w9"])]))
    finally:
        del predictor.logits_mixed_encoded
    (small_tokens,) = predictor.encode("all", ["nice w7 w8 w9"])
    first_with_small = next(number for number, batch in enumerate(batches)
                            if any(torch.equal(tokens, small_tokens) for tokens in batch))
    assert len(batches) >= 25 and first_with_small <= 1 and all(len(batch) <= 8 for batch in batches)
    assert [p.label for p in results[0]] == [p.label for p in predictor.predict("ofa", large)]
    assert results[1][0].logits == pytest.approx(predictor.predict("all", ["nice w7 w8 w9"])[0].logits, abs=1e-6)
