"""The service's front door, an ASGI middleware: authentication, body limits, the scoring slots.

Every request passes :class:`Guard` before FastAPI sees it, so a rejected request costs no body
reading, no spooling to disk and no decoding. In order:

0. **431** -- request headers over 16 KB in all.
1. **401** -- with an API key set, every path but the open ones (``/health``, the web page, the API
   docs and ``/openapi.json``) needs ``Authorization: Bearer <key>`` (compared in constant time).
2. **415** -- a scoring request (``POST /predict``) that is not ``multipart/form-data``.
3. **413** -- a declared ``Content-Length`` over the body limit (answered before any byte is read);
   a body without one (``Transfer-Encoding: chunked``) is counted while it streams, and answered
   with 413 as soon as it passes the limit. **408** -- a body that has not fully arrived within
   ``body_timeout`` seconds of the request's headers.
4. **503** with ``Retry-After`` -- ``max_active`` scoring requests are running and ``max_queue``
   more are waiting for a slot, or a request waited ``queue_timeout`` seconds without getting one.
   Waiting costs nothing but the connection: no byte of the body is read before a slot is free.

Every answer is JSON ``{"error": "..."}``. Any response that starts before the request's body was
read to its end (a rejection, a multipart syntax error, ...) carries ``Connection: close``, so the
server closes the connection instead of reading and discarding the rest.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json

from starlette.datastructures import Headers
from starlette.exceptions import HTTPException

#: paths that stay open when an API key is set: liveness, the (data-free) web page, the API docs
OPEN_PATHS = ("/health", "/", "/docs", "/openapi.json")
OPEN_PREFIXES = ("/docs/",)
SCORING_PATHS = ("/predict",)


class BodyTooLarge(HTTPException):
    """413 raised from ``receive`` when the streamed body passes the limit (FastAPI re-raises
    HTTPExceptions from body parsing, so the app's handler answers it in the service's JSON shape)."""

    def __init__(self, limit_bytes: int):
        super().__init__(413, f"request body over the limit of {limit_bytes / 2**20:g} MB", headers={"Connection": "close"})


class BodyTimeout(HTTPException):
    """408 raised from ``receive`` when the body is still arriving ``seconds`` after the headers."""

    def __init__(self, seconds: float):
        super().__init__(408, f"the request body did not arrive within {seconds:g} s", headers={"Connection": "close"})


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


async def send_json_error(send, status: int, message: str, headers: dict[str, str] | None = None) -> None:
    """Send a complete JSON error response ``{"error": message}`` on an ASGI ``send``."""
    body = json.dumps({"error": message}).encode()
    raw = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw += [(k.lower().encode("latin-1"), str(v).encode("latin-1")) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body, "more_body": False})


class Guard:
    """ASGI middleware enforcing the limits described in the module docstring.

    Args:
        app: the ASGI app behind it.
        api_key: the bearer token every non-open path needs; None turns authentication off.
        max_body_bytes: the largest request body, in bytes (declared or streamed).
        max_active: how many scoring requests may run at once (receiving, decoding, scoring).
        body_timeout: seconds a request's body may take to arrive, counted from its headers.
        max_queue: scoring requests that may wait for a slot (first come, first served).
        queue_timeout: seconds a request waits for a slot before its 503.
        retry_after: seconds sent in ``Retry-After`` with a 503.
        max_head_bytes: the largest total of header names and values (431 past it; uvicorn's h11
            bounds only a head that arrives in pieces).
    """

    def __init__(self, app, *, api_key: str | None = None, max_body_bytes: int = 20 * 2**20, max_active: int = 4,
                 body_timeout: float = 60.0, retry_after: int = 1, max_head_bytes: int = 16 * 1024,
                 max_queue: int = 16, queue_timeout: float = 10.0):
        self.app = app
        self.key_digest = _digest(api_key) if api_key else None
        self.max_body = int(max_body_bytes)
        self.max_active = int(max_active)
        self.body_timeout = float(body_timeout)
        self.retry_after = int(retry_after)
        self.max_head = int(max_head_bytes)
        self.max_queue = int(max_queue)
        self.queue_timeout = float(queue_timeout)
        self.waiting = 0  # scoring requests waiting for a slot; only touched on the event loop's thread
        self.slots = asyncio.Semaphore(self.max_active)  # FIFO; binds to the running loop on first use

    def authorized(self, headers: Headers) -> bool:
        """True when the request carries the right bearer token (or no key is set)."""
        if self.key_digest is None:
            return True
        scheme, _, token = headers.get("authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(_digest(token.strip()), self.key_digest)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = Headers(scope=scope)
        path, method = scope["path"], scope["method"]
        length = headers.get("content-length")
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        has_body = chunked or (length is not None and length.strip() not in ("", "0"))
        close = {"Connection": "close"} if has_body else {}  # answered before reading: do not read the rest

        if sum(len(k) + len(v) + 4 for k, v in scope["headers"]) > self.max_head:
            return await send_json_error(send, 431, f"request headers over {self.max_head // 1024} KB", {"Connection": "close"})
        if not (path in OPEN_PATHS or path.startswith(OPEN_PREFIXES) or self.authorized(headers)):
            return await send_json_error(send, 401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                                         {"WWW-Authenticate": "Bearer", **close})
        scoring = method == "POST" and path in SCORING_PATHS
        if scoring:
            ctype = headers.get("content-type", "")
            if not ctype.lower().startswith("multipart/form-data"):
                return await send_json_error(send, 415, f"send images as multipart/form-data in the field 'files', not {ctype or 'no content type'}", close)
        if length is not None:
            if not length.strip().isdigit():
                return await send_json_error(send, 400, f"invalid Content-Length {length!r}", {"Connection": "close"})
            if int(length) > self.max_body:
                return await send_json_error(send, 413, f"request body over the limit of {self.max_body / 2**20:g} MB", close)
        if not scoring:
            return await self._run(scope, receive, send, has_body)
        if not await self._take_slot():
            return await send_json_error(
                send, 503, f"busy: {self.max_active} requests are being scored and {self.waiting} waiting; retry in {self.retry_after} s",
                {"Retry-After": str(self.retry_after), **close})
        try:
            await self._run(scope, receive, send, has_body)
        finally:
            self.slots.release()

    async def _take_slot(self) -> bool:
        """Take a scoring slot, waiting in line when all are busy; False when the line is full or the
        wait passed ``queue_timeout``."""
        if self.slots.locked() and self.waiting >= self.max_queue:
            return False
        self.waiting += 1
        try:
            await asyncio.wait_for(self.slots.acquire(), self.queue_timeout)
            return True
        except asyncio.TimeoutError:
            return False
        finally:
            self.waiting -= 1

    async def _run(self, scope, receive, send, has_body: bool) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.body_timeout
        state = {"bytes": 0, "done": not has_body, "started": False}

        async def limited_receive():
            if state["done"]:  # the body is in: later calls wait for a disconnect, with no deadline
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), max(1e-3, deadline - loop.time()))
            except asyncio.TimeoutError:
                raise BodyTimeout(self.body_timeout) from None
            if msg["type"] == "http.request":
                state["bytes"] += len(msg.get("body", b""))
                if state["bytes"] > self.max_body:
                    raise BodyTooLarge(self.max_body)
                state["done"] = not msg.get("more_body", False)
            else:
                state["done"] = True
            return msg

        async def watched_send(msg):
            if msg["type"] == "http.response.start":
                state["started"] = True
                if not state["done"]:  # answered before the whole body came: close rather than read the rest
                    names = {k.lower() for k, _ in msg.get("headers", [])}
                    if b"connection" not in names:
                        msg = {**msg, "headers": [*msg.get("headers", []), (b"connection", b"close")]}
            await send(msg)

        try:
            await self.app(scope, limited_receive, watched_send)
        except (BodyTooLarge, BodyTimeout) as exc:  # raised where no handler caught it
            if state["started"]:
                raise
            await send_json_error(send, exc.status_code, exc.detail, exc.headers)
