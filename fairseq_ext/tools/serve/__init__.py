"""Serve BitFit tasks over HTTP from one base model: requests for different tasks share batches.

    python -m fairseq_ext.tools.serve --base MODEL_DIR --delta cola=D1 --delta stsb=D2 [--host 127.0.0.1 --port 8000]

    POST /predict  {"task": "cola", "inputs": ["a sentence", ...]}          (pairs: ["first", "second"])
                   -> {"task": "cola", "predictions": [{"label": "1", "score": 0.93, "logits": [...],
                                                         "probabilities": [...]}, ...]}
    GET  /health   -> {"status": "ok", "base": ..., "tasks": {"cola": {"glue_task": "CoLA", ...}, ...},
                       "limits": {...}, "served": {"requests": R, "batches": B, "examples": E}}   (HEAD too)

Each request is checked whole before it joins a batch (``limits``: sizes, text, Host), then
tokenized on its own thread and run in batches that mix tasks (``MixedBatcher``): one
client's request cannot fail another's or hold the model for more than a batch.  An unknown
task is a 404; malformed or empty inputs a 422, over a limit a 413, a Host header of another
site a 400, each with the reason in ``detail``.  Deltas are read without pickle and
checked; a bad delta, one trained on another base, or one a mixed batch cannot serve, is
refused at start with one line and exit status 2.  Needs the ``serve`` extra (FastAPI, uvicorn).
"""
import argparse
import asyncio
import collections
import contextlib
import dataclasses
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import Deque, Dict, List, Optional, Sequence, Set, Tuple, Union

import torch

from ...core.errors import UserError, exit_on_user_error, one_line, quiet_cli_logging
from ...plugin.predictor import MultiTaskPredictor, Prediction
from ...plugin.predictor_options import add_predictor_arguments, parse_delta_options

try:
    import uvicorn
    from fastapi import FastAPI, HTTPException
    from fastapi.exceptions import RequestValidationError
    from pydantic import BaseModel

    from .limits import (BodyLimit, HostAllowList, Limits, check_texts, default_allowed_hosts,
                         header_timeout_protocol, render_validation_error)
except ImportError as missing:  # the optional extra
    _MISSING = missing.name
else:
    _MISSING = None

logger = logging.getLogger("fairseq_ext.tools.serve")


class InputRejected(Exception):
    """One input of a request the tokenizer could not take: the request's own fault (a 422)."""


@dataclasses.dataclass(eq=False)
class _Request:
    encoded: List[Tuple[str, torch.Tensor]]  # (task, token ids) per input
    future: "asyncio.Future"
    rows: List[Optional[torch.Tensor]]
    taken: int = 0  # inputs handed to batches so far


class MixedBatcher:
    """Runs concurrent requests in batches that mix tasks, one batch at a time on one model thread.

    A request is tokenized on a tokenizer thread, ``max_batch`` inputs at a time, so other
    requests' chunks take turns with a large one's; it then joins the requests with inputs left,
    and each batch takes one input from each of them in turn (round-robin) until it holds
    ``max_batch``: a large request never holds the model for more than a batch while others wait.
    A batch closes ``wait_s`` after it could start, or as soon as it is full.  If a batch fails,
    each of its requests is run again alone, and only those that fail alone fail.
    """

    def __init__(self, predictor: MultiTaskPredictor, max_batch: int, wait_s: float):
        self.predictor, self.max_batch, self.wait_s = predictor, max_batch, wait_s
        self.tokenizer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")
        self.model_thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="model")  # the model: one thread
        self.waiting: Deque[_Request] = collections.deque()  # requests with inputs not yet in a batch
        self.arrived = asyncio.Event()
        self.served = {"requests": 0, "batches": 0, "examples": 0}

    async def predict(self, task: str, inputs: Sequence) -> List[Prediction]:
        loop = asyncio.get_running_loop()
        encoded = []
        for start in range(0, len(inputs), self.max_batch):
            chunk = inputs[start:start + self.max_batch]
            encoded += await loop.run_in_executor(self.tokenizer, self._encode, task, chunk, start)
        request = _Request(encoded, loop.create_future(), [None] * len(encoded))
        self.waiting.append(request)
        self.arrived.set()
        rows = await request.future
        self.served["requests"] += 1
        return [self.predictor.prediction(task, row) for row in rows]

    def _encode(self, task: str, chunk: Sequence, offset: int) -> List[Tuple[str, torch.Tensor]]:
        encoded = []
        for index, example in enumerate(chunk, start=offset):
            try:
                (tokens,) = self.predictor.encode(task, [example])
            except Exception as error:  # this input's text: only this request hears of it
                raise InputRejected(f"inputs[{index}]: cannot be tokenized: {type(error).__name__}: "
                                    f"{one_line(error)}") from None
            encoded.append((task, tokens))
        return encoded

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            await self.arrived.wait()
            deadline = loop.time() + self.wait_s
            while self._inputs_waiting() < self.max_batch and (left := deadline - loop.time()) > 0:
                self.arrived.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.arrived.wait(), left)
            batch = self._take_batch()
            if not self.waiting:
                self.arrived.clear()
            if batch:
                await self._run_batch(batch)

    def _inputs_waiting(self) -> int:
        return sum(len(request.encoded) - request.taken for request in self.waiting)

    def _take_batch(self) -> List[Tuple[_Request, int]]:
        batch = []
        while len(batch) < self.max_batch and self.waiting:
            request = self.waiting.popleft()
            if request.future.done():  # its client went away, or another of its inputs failed
                continue
            batch.append((request, request.taken))
            request.taken += 1
            if request.taken < len(request.encoded):
                self.waiting.append(request)  # to the back: the others take their turn first
        return batch

    async def _run_batch(self, batch: List[Tuple[_Request, int]]) -> None:
        loop = asyncio.get_running_loop()
        logits = self.predictor.logits_mixed_encoded
        try:
            rows = await loop.run_in_executor(self.model_thread, logits, [r.encoded[i] for r, i in batch])
            results = {request: [] for request, _ in batch}
            for (request, index), row in zip(batch, rows):
                results[request].append((index, row))
        except Exception as error:
            by_request: Dict[_Request, List[int]] = {}
            for request, index in batch:
                by_request.setdefault(request, []).append(index)
            if len(by_request) == 1:
                results = {request: error for request in by_request}
            else:  # which request's inputs failed it? each alone; the others are answered
                logger.warning(f"a batch of {len(by_request)} requests failed ({type(error).__name__}: "
                               f"{one_line(error)}); running each alone")
                results = {}
                for request, indices in by_request.items():
                    try:
                        alone = await loop.run_in_executor(self.model_thread, logits,
                                                           [request.encoded[i] for i in indices])
                        results[request] = list(zip(indices, alone))
                    except Exception as own_error:
                        results[request] = own_error
        self.served["batches"] += 1
        for request, result in results.items():
            if request.future.done():
                continue
            if isinstance(result, Exception):
                logger.error(f"a request failed: {type(result).__name__}: {one_line(result)}")
                request.future.set_exception(result)
                continue
            self.served["examples"] += len(result)
            for index, row in result:
                request.rows[index] = row
            if request.taken == len(request.encoded) and all(row is not None for row in request.rows):
                request.future.set_result(request.rows)

    def shutdown(self) -> None:
        self.tokenizer.shutdown(wait=False, cancel_futures=True)
        self.model_thread.shutdown(wait=False, cancel_futures=True)


def task_info(predictor: MultiTaskPredictor, name: str) -> dict:
    delta = predictor.delta(name)
    return {"glue_task": delta.glue_task, "regression": delta.regression, "labels": delta.label_symbols,
            "pair": predictor.takes_pairs(name)}


def model_limits(predictor: MultiTaskPredictor, max_inputs: int = 1024, max_input_chars: Optional[int] = None,
                 max_body_bytes: Optional[int] = None) -> "Limits":
    """The request limits, by default from the longest truncation of the tasks served (``limits``)."""
    lengths = [predictor.max_tokens(name) for name in predictor.tasks]
    max_tokens = max((length for length in lengths if length), default=512)
    return Limits.for_model(max_tokens, max_inputs, max_input_chars, max_body_bytes)


def create_app(predictor: MultiTaskPredictor, max_batch: int = 32, wait_ms: float = 5.0,
               limits: Optional["Limits"] = None, allowed_hosts: Optional[Set[str]] = None):
    """The FastAPI application serving ``predictor``'s tasks; ``allowed_hosts`` None: any Host header."""
    predictor.prepare_mixed()  # a task a mixed batch cannot serve is refused now, not at every request
    limits = limits or model_limits(predictor)

    class PredictRequest(BaseModel):
        task: str
        inputs: List[Union[str, Tuple[str, str]]]

    batcher, worker = None, None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        nonlocal batcher, worker
        batcher = MixedBatcher(predictor, max_batch, wait_ms / 1000.0)
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()
        batcher.shutdown()

    app = FastAPI(title="BitFit tasks", lifespan=lifespan)
    app.add_exception_handler(RequestValidationError, render_validation_error)
    app.add_middleware(BodyLimit, limit=limits.max_body_bytes)
    if allowed_hosts is not None:
        app.add_middleware(HostAllowList, allowed=allowed_hosts)  # added last: runs first

    @app.api_route("/health", methods=["GET", "HEAD"])
    async def health():
        alive = worker is not None and not worker.done()
        return {"status": "ok" if alive else "batcher stopped", "base": predictor.base_source,
                "tasks": {name: task_info(predictor, name) for name in predictor.tasks},
                "limits": dataclasses.asdict(limits), "served": batcher.served}

    @app.post("/predict")
    async def predict(request: PredictRequest):
        if request.task not in predictor.tasks:
            raise HTTPException(404, f"no task {request.task!r}; loaded: {', '.join(predictor.tasks)}")
        if not request.inputs:
            raise HTTPException(422, "inputs: empty; give one or more sentences, or [first, second] pairs")
        if len(request.inputs) > limits.max_inputs:
            raise HTTPException(413, f"inputs: {len(request.inputs)} given, at most {limits.max_inputs} a request "
                                     "(--max-inputs)")
        try:
            predictor.check(request.task, request.inputs)
        except UserError as error:
            raise HTTPException(422, str(error)) from None
        check_texts(request.inputs, limits)
        try:
            predictions = await batcher.predict(request.task, request.inputs)
        except InputRejected as error:
            raise HTTPException(422, str(error)) from None
        except Exception as error:  # failed alone (MixedBatcher): this request's own
            raise HTTPException(500, f"predicting this request failed: {type(error).__name__}: "
                                     f"{one_line(error)}") from None
        return {"task": request.task, "predictions": [dataclasses.asdict(prediction) for prediction in predictions]}

    return app


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m fairseq_ext.tools.serve", description=__doc__.split("\n\n")[0])
    add_predictor_arguments(parser, "the pretrained model folder (or a checkpoint with dict.txt)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--max-batch", type=int, default=32, help="examples per mixed batch (default: 32)")
    parser.add_argument("--wait-ms", type=float, default=5.0,
                        help="how long a batch waits for more requests after its first (default: 5)")
    parser.add_argument("--max-inputs", type=int, default=1024, help="inputs one request may send (default: 1024)")
    parser.add_argument("--max-input-chars", type=int,
                        help="characters of one text (default: 32 per token of the tasks' maximum length)")
    parser.add_argument("--max-body-bytes", type=int,
                        help="bytes of one request body (default: 256 times --max-input-chars)")
    parser.add_argument("--allowed-host", action="append", default=[], metavar="NAME",
                        help="a host name clients may use besides --host, localhost and IP addresses "
                             "(repeatable; '*': any)")
    parser.add_argument("--header-timeout-s", type=float, default=10.0,
                        help="close a connection whose request headers take longer (default: 10)")
    return parser


@exit_on_user_error(prog="serve.py")
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if _MISSING is not None:
        raise UserError(f"the server needs {_MISSING}: pip install -e '.[serve]' (FastAPI and uvicorn)")
    for flag, value, least in (("--max-batch", args.max_batch, 1), ("--max-inputs", args.max_inputs, 1),
                               ("--wait-ms", args.wait_ms, 0), ("--max-input-chars", args.max_input_chars, 1),
                               ("--max-body-bytes", args.max_body_bytes, 1),
                               ("--header-timeout-s", args.header_timeout_s, 0.1)):
        if value is not None and value < least:
            raise UserError(f"{flag} {value}: must be at least {least}")
    quiet_cli_logging()
    deltas = parse_delta_options(args.delta)
    predictor = MultiTaskPredictor(args.base, dictionary=args.dictionary, trust_checkpoint=args.trust_checkpoint,
                                   batch_size=args.max_batch, device=args.device)
    for name, path in deltas.items():
        predictor.add_task(name, path)
    limits = model_limits(predictor, args.max_inputs, args.max_input_chars, args.max_body_bytes)
    app = create_app(predictor, args.max_batch, args.wait_ms, limits,
                     default_allowed_hosts(args.host, args.allowed_host))
    print(f"serving {', '.join(predictor.tasks)} on http://{args.host}:{args.port} (limits: "
          f"{limits.max_inputs} inputs, {limits.max_input_chars:,} characters a text, "
          f"{limits.max_body_bytes:,} bytes a body)", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning",
                http=header_timeout_protocol(args.header_timeout_s))
