"""uvicorn's httptools protocol (its C parser; a project dependency) with what uvicorn leaves open to a
hostile or careless client:

- a deadline for a request's head: a client that connects and sends nothing, or drips half a request
  line, holds a connection only that long;
- a byte limit on a request's head: httptools keeps a header being received in memory however long it
  grows (431, TEI's JSON body, and closed);
- the connection limit answered with TEI's JSON body (uvicorn's is plain text), and never in the way of
  the health probes, so idle sockets up to the limit cannot hide a healthy server from its orchestrator;
- a client that closes its connection with pipelined requests in flight: uvicorn tells only the last
  request it parsed, and the one running writes its answer to the closed uvloop transport (RuntimeError,
  "Exception in ASGI application"); here every request of the connection hears that the client left;
- a request the parser refuses gets TEI's JSON body too (uvicorn's is plain text).
"""

from __future__ import annotations

import asyncio
import json
from http import HTTPStatus
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from .schemas import error_response

# Answered even beyond the connection limit: cheap, and what an orchestrator decides a restart on.
PROBES = {"/", "/health", "/healthz", "/readyz"}


def hardened_protocol(*, head_timeout: float, max_head_bytes: int, max_connections: int) -> type[asyncio.Protocol]:
    """A protocol class for uvicorn.Config(http=...). Pass no limit_concurrency to uvicorn: the limit is here."""

    class Hardened(_Hardened):
        pass

    Hardened.head_timeout, Hardened.max_head_bytes, Hardened.max_connections = (head_timeout, max_head_bytes,
                                                                               max_connections)
    return Hardened


class _Hardened(HttpToolsProtocol):
    head_timeout: float
    max_head_bytes: int
    max_connections: int

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._app = self.app
        self._head_timer: asyncio.TimerHandle | None = None
        self._head_bytes: int | None = 0  # bytes of the head being received; None from its end to the next
        self._heads = 0  # heads begun on this connection
        self._cycles: list[RequestResponseCycle] = []  # requests of this connection not yet answered

    # --- the head: a deadline and a byte limit -------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def on_message_begin(self) -> None:  # the first byte of a request
        self._arm()
        self._head_bytes, self._heads = 0, self._heads + 1
        super().on_message_begin()

    def data_received(self, data: bytes) -> None:
        in_head, heads = self._head_bytes is not None, self._heads
        super().data_received(data)
        # Counted when the whole chunk went to one head: a head that began inside this chunk is counted from
        # the next, so a head is refused at most one read past the limit, and a body never counts.
        if in_head and self._head_bytes is not None and heads == self._heads:
            self._head_bytes += len(data)
            if self._head_bytes > self.max_head_bytes and not self.transport.is_closing():
                self._refuse(431, f"the request's head is larger than {self.max_head_bytes} bytes", "Validation")

    def on_headers_complete(self) -> None:
        self._disarm()
        self._head_bytes = None
        # The limit counts every connection, idle ones included (as uvicorn's): beyond it, only the probes.
        busy = len(self.connections) >= self.max_connections or len(self.tasks) >= self.max_connections
        self.app = self._over_limit if busy else self._app
        super().on_headers_complete()
        if self.cycle is not None and self.cycle not in self._cycles:
            self._cycles = [c for c in self._cycles if not c.response_complete] + [self.cycle]

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        for cycle in self._cycles:  # running or pipelined: none writes to the closed transport
            if not cycle.response_complete:
                cycle.disconnected = True
                cycle.message_event.set()
        self._cycles = []
        super().connection_lost(exc)

    def _arm(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(self.head_timeout, self._too_slow)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _too_slow(self) -> None:
        self._head_timer = None
        if self._head_bytes is not None and not self.transport.is_closing():
            self.transport.close()

    # --- answers made here, in TEI's JSON --------------------------------------------------------------------

    async def _over_limit(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["method"] in ("GET", "HEAD") and scope["path"] in PROBES:
            await self._app(scope, receive, send)
            return
        refusal = error_response(503, f"the server holds {self.max_connections} connections, its most; retry",
                                 "Unhealthy", headers={"Retry-After": "1", "Connection": "close"})
        await refusal(scope, receive, send)

    def send_400_response(self, msg: str) -> None:  # the parser refused the request (uvicorn's msg: plain text)
        self._refuse(400, "invalid HTTP request", "Validation")

    def _refuse(self, status: int, message: str, error_type: str) -> None:
        """Answer `status` with TEI's body and close: for what is refused before a request reaches the app."""
        body = json.dumps({"error": message, "error_type": error_type}).encode()
        head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}".encode()]
        head += [name + b": " + value for name, value in self.server_state.default_headers]
        head += [b"content-type: application/json", b"content-length: %d" % len(body), b"connection: close"]
        self.transport.write(b"\r\n".join(head) + b"\r\n\r\n" + body)
        self.transport.close()
