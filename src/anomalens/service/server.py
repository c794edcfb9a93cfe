"""Running the service with uvicorn, with the connection-level limits an unattended network needs.

uvicorn closes an idle keep-alive connection after ``timeout_keep_alive`` seconds, but holds a
connection that has not yet sent a complete request head for ever: one that sends nothing, or a
few header bytes now and then. :class:`GuardedH11Protocol` (uvicorn's h11 protocol, extended) closes
such a connection after ``header_timeout`` seconds with a 408, refuses connections past
``max_connections`` with a 503, and answers a malformed request with the service's JSON error shape.
A request head arriving in pieces is bounded by h11 (``h11_max_incomplete_event_size``, 16 KB: a
400); one arriving whole is bounded by :class:`~anomalens.service.guard.Guard` (431).
"""

from __future__ import annotations

import json
import os

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

#: largest request head (request line and headers), bytes
MAX_HEAD_BYTES = 16 * 1024


def raw_json_response(status: int, reason: str, message: str, extra: dict[str, str] | None = None) -> bytes:
    """A complete HTTP/1.1 JSON error response ``{"error": message}`` with ``Connection: close``, as bytes."""
    body = json.dumps({"error": message}).encode()
    head = [f"HTTP/1.1 {status} {reason}", "content-type: application/json", f"content-length: {len(body)}", "connection: close"]
    head += [f"{k}: {v}" for k, v in (extra or {}).items()]
    return ("\r\n".join(head) + "\r\n\r\n").encode("latin-1") + body


class GuardedH11Protocol(H11Protocol):
    """uvicorn's h11 protocol with a request-head timeout, a connection cap and JSON 400 answers.

    Class attributes (set on a subclass by :func:`serve`): ``header_timeout`` (seconds from the
    connection, or from the previous response, to a complete request head) and ``max_connections``.
    """

    header_timeout: float = 10.0
    max_connections: int = 256

    def connection_made(self, transport) -> None:  # type: ignore[override]
        self._head_timer = None
        super().connection_made(transport)
        if len(self.connections) > self.max_connections:
            transport.write(raw_json_response(503, "Service Unavailable", f"too many open connections (limit {self.max_connections}); retry later",
                                              {"retry-after": "1"}))
            transport.close()
            return
        self._arm_head_timer()

    def _arm_head_timer(self) -> None:
        self._disarm_head_timer()
        self._head_timer = self.loop.call_later(self.header_timeout, self._head_timeout)

    def _disarm_head_timer(self) -> None:
        if getattr(self, "_head_timer", None) is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timeout(self) -> None:
        self._head_timer = None
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self.transport.write(raw_json_response(408, "Request Timeout", f"no complete request head within {self.header_timeout:g} s"))
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if self.conn.their_state is not h11.IDLE:  # a complete head arrived: the body has its own deadline
            self._disarm_head_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.conn.their_state is h11.IDLE:
            self._arm_head_timer()  # the next request's head must arrive in time too

    def connection_lost(self, exc) -> None:
        self._disarm_head_timer()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        body = json.dumps({"error": f"malformed HTTP request ({msg.rstrip('.')})"}).encode()
        headers = [(b"content-type", b"application/json"), (b"connection", b"close")]
        try:
            for event in (h11.Response(status_code=400, headers=headers, reason=b"Bad Request"), h11.Data(data=body), h11.EndOfMessage()):
                self.transport.write(self.conn.send(event))
        except h11.LocalProtocolError:  # a response was already under way
            pass
        self.transport.close()


def serve(model_dirs: dict[str, str | os.PathLike], host: str = "127.0.0.1", port: int = 8000, *,
          header_timeout: float = 10.0, keep_alive_timeout: int = 5, max_connections: int = 256, **kwargs) -> None:
    """Run the service with uvicorn until interrupted.

    Args:
        model_dirs: name -> model directory (see :func:`anomalens.service.create_app`).
        host, port: where to listen.
        header_timeout: seconds a connection has to send a complete request head.
        keep_alive_timeout: seconds an idle keep-alive connection stays open.
        max_connections: open connections at most; more are answered 503 and closed.
        kwargs: passed to :func:`anomalens.service.create_app` (limits, API key, engine, ...).

    Raises:
        AnomalensError: from :func:`~anomalens.service.create_app` (a model cannot be loaded, ...).
    """
    import uvicorn

    from .app import create_app

    app = create_app(model_dirs, **kwargs)
    protocol = type("Protocol", (GuardedH11Protocol,), {"header_timeout": float(header_timeout), "max_connections": int(max_connections)})
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", http=protocol, timeout_keep_alive=int(keep_alive_timeout),
                            h11_max_incomplete_event_size=MAX_HEAD_BYTES, backlog=256, timeout_graceful_shutdown=10)
    uvicorn.Server(config).run()
