"""Serve BitFit tasks over HTTP from one base model: requests for different tasks share batches.

    python -m fairseq_ext.tools.serve --base MODEL_DIR --delta cola=D1 --delta stsb=D2 [--host 127.0.0.1 --port 8000]

    POST /predict  {"task": "cola", "inputs": ["a sentence", ...]}          (pairs: ["first", "second"])
                   -> {"task": "cola", "predictions": [{"label": "1", "score": 0.93, "logits": [...],
                                                         "probabilities": [...]}, ...]}
    GET  /health   -> {"status": "ok", "base": ..., "tasks": {"cola": {"glue_task": "CoLA", ...}, ...},
                       "served": {"requests": R, "batches": B, "examples": E}}

Requests wait in one queue; a batch closes once it holds ``--max-batch`` examples, or
``--wait-ms`` after the batcher took its first request, and runs as one
``MultiTaskPredictor.predict_mixed`` call: every task's examples in the same forward
passes.  An unknown task is a 404; malformed or empty inputs, or more than
``--max-inputs``, a 422, with the reason in ``detail``.  Deltas are read without pickle;
a delta trained on another base, or one a mixed batch cannot serve, is refused at start
with one line and exit status 2.  Needs the ``serve`` extra (FastAPI, uvicorn).
"""
import argparse
import asyncio
import contextlib
import dataclasses
import logging
import sys
from concurrent.futures import ThreadPoolExecutor
from typing import List, Sequence, Tuple, Union

from ..core.errors import UserError, exit_on_user_error, quiet_cli_logging
from ..plugin.predictor import MultiTaskPredictor, Prediction, add_predictor_arguments, parse_delta_options

try:
    import uvicorn
    from fastapi import FastAPI, HTTPException
    from pydantic import BaseModel
except ImportError as missing:  # the optional extra
    _MISSING = missing.name
else:
    _MISSING = None

logger = logging.getLogger("fairseq_ext.tools.serve")


class MixedBatcher:
    """Collects concurrent requests into batches that mix tasks, run one at a time off the event loop."""

    def __init__(self, predictor: MultiTaskPredictor, max_batch: int, wait_s: float):
        self.predictor, self.max_batch, self.wait_s = predictor, max_batch, wait_s
        self.queue: "asyncio.Queue" = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1)  # the predictor's model is used by one thread
        self.served = {"requests": 0, "batches": 0, "examples": 0}

    async def predict(self, task: str, inputs: Sequence) -> List[Prediction]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(([(task, example) for example in inputs], future))
        return await future

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            pending = [await self.queue.get()]
            size, deadline = len(pending[0][0]), loop.time() + self.wait_s
            while size < self.max_batch and (left := deadline - loop.time()) > 0:
                try:
                    pending.append(await asyncio.wait_for(self.queue.get(), left))
                except asyncio.TimeoutError:
                    break
                size += len(pending[-1][0])
            pending = [(items, future) for items, future in pending if not future.done()]  # cancelled: gone
            items = [item for request_items, _ in pending for item in request_items]
            if not items:
                continue
            try:
                predictions = await loop.run_in_executor(self.executor, self.predictor.predict_mixed, items)
            except Exception as error:  # every request of the batch learns why; the batcher goes on
                logger.exception("a batch failed")
                for _, future in pending:
                    if not future.done():
                        future.set_exception(error)
                continue
            self.served["requests"] += len(pending)
            self.served["batches"] += 1
            self.served["examples"] += len(items)
            start = 0
            for request_items, future in pending:
                if not future.done():
                    future.set_result(predictions[start:start + len(request_items)])
                start += len(request_items)


def task_info(predictor: MultiTaskPredictor, name: str) -> dict:
    delta = predictor.delta(name)
    return {"glue_task": delta.glue_task, "regression": delta.regression, "labels": delta.label_symbols,
            "pair": predictor.takes_pairs(name)}


def create_app(predictor: MultiTaskPredictor, max_batch: int = 32, wait_ms: float = 5.0, max_inputs: int = 1024):
    """The FastAPI application serving ``predictor``'s tasks."""
    predictor.prepare_mixed()  # a task a mixed batch cannot serve is refused now, not at every request

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
        batcher.executor.shutdown(wait=False)

    app = FastAPI(title="BitFit tasks", lifespan=lifespan)

    @app.get("/health")
    async def health():
        alive = worker is not None and not worker.done()
        return {"status": "ok" if alive else "batcher stopped", "base": predictor.base_source,
                "tasks": {name: task_info(predictor, name) for name in predictor.tasks}, "served": batcher.served}

    @app.post("/predict")
    async def predict(request: PredictRequest):
        if request.task not in predictor.tasks:
            raise HTTPException(404, f"no task {request.task!r}; loaded: {', '.join(predictor.tasks)}")
        if not request.inputs:
            raise HTTPException(422, "inputs: empty; give one or more sentences, or [first, second] pairs")
        if len(request.inputs) > max_inputs:
            raise HTTPException(422, f"inputs: {len(request.inputs)} given, at most {max_inputs} a request "
                                     "(--max-inputs)")
        try:
            predictor.check(request.task, request.inputs)
        except UserError as error:
            raise HTTPException(422, str(error)) from None
        try:
            predictions = await batcher.predict(request.task, request.inputs)
        except Exception as error:
            raise HTTPException(500, f"the batch failed: {type(error).__name__}: {error}") from None
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
    return parser


@exit_on_user_error
def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    if _MISSING is not None:
        raise UserError(f"the server needs {_MISSING}: pip install -e '.[serve]' (FastAPI and uvicorn)")
    if args.max_batch < 1 or args.max_inputs < 1 or args.wait_ms < 0:
        raise UserError("--max-batch and --max-inputs must be at least 1, --wait-ms at least 0")
    quiet_cli_logging()
    deltas = parse_delta_options(args.delta)
    predictor = MultiTaskPredictor(args.base, dictionary=args.dictionary, trust_checkpoint=args.trust_checkpoint,
                                   batch_size=args.max_batch, device=args.device)
    for name, path in deltas.items():
        predictor.add_task(name, path)
    app = create_app(predictor, args.max_batch, args.wait_ms, args.max_inputs)
    print(f"serving {', '.join(predictor.tasks)} on http://{args.host}:{args.port}", file=sys.stderr, flush=True)
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
