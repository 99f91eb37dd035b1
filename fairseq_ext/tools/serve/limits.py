"""What the HTTP server (``fairseq_ext.tools.serve``) refuses before any work: the limits on a
request, the text an input must be, the Host header, slow headers, and 422 bodies that render.

Defaults follow the model's maximum length (``max_tokens``: the longest truncation of the
served tasks), since tokens past it are cut anyway:

* ``--max-input-chars`` (default ``CHARS_PER_TOKEN`` × max tokens: 4,096 for 128 tokens): a
  text longer than that is a 413; text that long is far past the truncation already;
* ``--max-body-bytes`` (default 256 × the input limit, 1 MiB for 128 tokens: 32 pairs of
  maximum-length texts at 4 bytes a character): a larger body is a 413 before it is parsed.

Each is a one-line ``detail`` that names the limit and its option.
"""
import asyncio
import ipaddress
import json
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence, Set

import h11
from fastapi import HTTPException
from fastapi.exceptions import RequestValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse
from uvicorn.protocols.http.h11_impl import H11Protocol

CHARS_PER_TOKEN = 32  # far above English wordpieces (about 4 to 5 characters each, spaces included)
BODY_INPUTS = 256  # the default body holds 256 texts of maximum length at 1 byte a character


@dataclass(frozen=True)
class Limits:
    max_inputs: int  # inputs one request may send
    max_input_chars: int  # characters of one text (each sentence of a pair)
    max_body_bytes: int  # bytes of one request body

    @classmethod
    def for_model(cls, max_tokens: int, max_inputs: int = 1024, max_input_chars: Optional[int] = None,
                  max_body_bytes: Optional[int] = None) -> "Limits":
        chars = max_input_chars or CHARS_PER_TOKEN * max_tokens
        return cls(max_inputs, chars, max_body_bytes or BODY_INPUTS * chars)


def check_texts(inputs: Sequence, limits: Limits) -> None:
    """Every text of ``inputs`` (sentences, or [first, second] pairs) is one the tokenizer takes:
    non-empty, valid Unicode (a JSON ``\\ud800`` escape gives a lone surrogate), within the limit.
    An HTTPException (413 or 422) naming the input otherwise."""
    for index, example in enumerate(inputs):
        texts = (example,) if isinstance(example, str) else tuple(example)
        for part, text in enumerate(texts):
            where = f"inputs[{index}]" + (f"[{part}]" if len(texts) > 1 else "")
            if len(text) > limits.max_input_chars:
                raise HTTPException(413, f"{where}: {len(text):,} characters; at most {limits.max_input_chars:,} "
                                         "a text (--max-input-chars)")
            if not text.strip():
                raise HTTPException(422, f"{where}: empty text; the predict command line refuses it too")
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as error:
                raise HTTPException(422, f"{where}: not valid Unicode text ({error.reason}: "
                                         f"{text[error.start]!r} at character {error.start})") from None


async def render_validation_error(request: Request, error: RequestValidationError) -> JSONResponse:
    """FastAPI's 422 without the offending values: a NaN in the request (which Python's JSON reads)
    cannot be rendered as JSON, and a huge input need not be sent back."""
    detail = [{key: value for key, value in item.items() if key in ("loc", "msg", "type")}
              for item in error.errors()]
    return JSONResponse({"detail": json.loads(json.dumps(detail, default=str))}, status_code=422)


# A body over the limit is read on and dropped up to this many times the limit before the 413, so the
# client, still sending, gets its answer instead of a connection reset; beyond it the connection closes.
DRAIN_FACTOR = 8


class BodyLimit:
    """ASGI middleware: a request body over ``limit`` bytes is a 413, never parsed or kept (declared in
    Content-Length or not); within it, the body is handed on whole."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            if declared.isdigit() and int(declared) <= DRAIN_FACTOR * self.limit:
                await self._drain(receive, 0)
            return await self._too_large(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client went away
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > self.limit:
                if more:
                    await self._drain(receive, size)
                return await self._too_large(send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()
            replayed = True
            return {"type": "http.request", "body": b"".join(chunks), "more_body": False}

        await self.app(scope, replay, send)

    async def _drain(self, receive, size: int) -> None:
        """Read and drop the rest of a body, up to DRAIN_FACTOR times the limit."""
        more = True
        while more and size <= DRAIN_FACTOR * self.limit:
            message = await receive()
            if message["type"] != "http.request":
                return
            size += len(message.get("body", b""))
            more = message.get("more_body", False)

    async def _too_large(self, send):
        body = json.dumps({"detail": f"request body over {self.limit:,} bytes (--max-body-bytes)"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})


def host_name(host_header: str) -> str:
    """``example.com:8000`` -> ``example.com``; ``[::1]:8000`` -> ``::1``."""
    if host_header.startswith("["):
        return host_header[1:].split("]", 1)[0]
    return host_header.rsplit(":", 1)[0] if host_header.count(":") == 1 else host_header


def is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
    except ValueError:
        return False
    return True


def default_allowed_hosts(bound_host: str, extra: Iterable[str] = ()) -> Set[str]:
    """The names a Host header may carry: the bound address, localhost, and ``--allowed-host`` ones."""
    return {name.lower() for name in (bound_host, "localhost", *extra)}


class HostAllowList:
    """ASGI middleware: a Host header naming another host is a 400.  A web page on another site
    whose name an attacker re-points at this machine (DNS rebinding) sends its own name; IP
    literals are always allowed (rebinding needs a name); ``*`` allows any."""

    def __init__(self, app, allowed: Set[str]):
        self.app, self.allowed = app, {name.lower() for name in allowed}

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and "*" not in self.allowed:
            header = dict(scope["headers"]).get(b"host", b"").decode("latin-1")
            name = host_name(header).lower()
            if not (is_ip_literal(name) or name in self.allowed):
                body = json.dumps({"detail": f"Host {header!r} is not served here; allowed: "
                                             f"{', '.join(sorted(self.allowed))} and IP addresses "
                                             "(--allowed-host)"}).encode()
                await send({"type": "http.response.start", "status": 400,
                            "headers": [(b"content-type", b"application/json")]})
                await send({"type": "http.response.body", "body": body})
                return
        await self.app(scope, receive, send)


def header_timeout_protocol(seconds: float):
    """uvicorn's h11 protocol, closing a connection whose request headers are not complete within
    ``seconds`` of it opening, or of its previous response (uvicorn's keep-alive timer restarts
    with every byte, so a client trickling header bytes holds a connection for ever)."""

    class HeaderTimeoutProtocol(H11Protocol):
        _header_timer: Optional[asyncio.TimerHandle] = None

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_header_timer()

        def on_response_complete(self):
            super().on_response_complete()
            self._arm_header_timer()

        def handle_events(self):
            super().handle_events()
            if self.conn.their_state is not h11.IDLE and self._header_timer is not None:
                self._header_timer.cancel()  # the request's headers are in
                self._header_timer = None

        def connection_lost(self, exc):
            if self._header_timer is not None:
                self._header_timer.cancel()
            super().connection_lost(exc)

        def _arm_header_timer(self):
            if self._header_timer is not None:
                self._header_timer.cancel()
            self._header_timer = self.loop.call_later(seconds, self._headers_too_slow)

        def _headers_too_slow(self):
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and not self.transport.is_closing():
                self.transport.close()

    return HeaderTimeoutProtocol
