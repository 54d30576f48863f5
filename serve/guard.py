"""The guard in front of every route (pure ASGI): request metrics, the API key, JSON-only bodies, the body's
size, the time it may take to arrive and how many objects parsing it can make, all before any body is
parsed."""

from __future__ import annotations

import asyncio
import secrets
import time
from typing import Any

from fastapi.responses import JSONResponse

from .metrics import Metrics
from .schemas import error_response

DOCS_STATIC = "/static-offline-docs"
# Reachable without the API key: probes (Docker HEALTHCHECK, orchestrators, TEI's GET / and /health) and the
# API description. POST / is TEI's predict route: it needs the key. Every other path needs it: a route is opened
# here, on purpose, never by default.
OPEN_PATHS = {"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
OPEN_GET = {"/", "/health"}
BODY_METHODS = {"POST", "PUT", "PATCH"}


def _open(path: str, method: str) -> bool:
    return path in OPEN_PATHS or path.startswith(DOCS_STATIC + "/") or (method in ("GET", "HEAD") and path in OPEN_GET)


class GuardMiddleware:
    """Pure ASGI, in front of everything: request counts and latency by route and status (known methods and
    routes only, so label sets stay bounded); then, before any body is read or parsed, the API key (401),
    Content-Type application/json on bodies (415: no "simple" cross-origin form or text/plain POST from a
    web page), no Content-Encoding (422), the body size (413) and the time its body may take to arrive (408);
    then, before it is parsed, that the body is UTF-8 and how many objects parsing it would make (422)."""

    def __init__(self, app: Any, metrics: Metrics, max_body: int, max_json_items: int, body_timeout: float,
                 api_key: str | None) -> None:
        self.app, self.metrics, self.max_body, self.max_json_items = app, metrics, max_body, max_json_items
        # Compared as bytes: ASGI headers are the bytes the client sent, and a key is sent as UTF-8.
        self.body_timeout, self.api_key = body_timeout, None if api_key is None else api_key.encode("utf-8")

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        route = self.metrics.route_label(scope.get("path", ""))
        status = {"code": 500, "started": False}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await send(message)

        try:
            await self._guarded(scope, receive, send_wrapper, status)
        except asyncio.CancelledError:
            # uvicorn cancels what still runs once its shutdown drain time is over (a body still arriving, a
            # request still queued). Raising on would log "Exception in ASGI application" with a traceback for
            # each; a draining server instead tells a client still waiting that it is going away.
            if not status["started"]:
                await _shutting_down()(scope, receive, send_wrapper)
        finally:
            method = Metrics.method_label(scope.get("method", ""))
            self.metrics.requests.labels(route, method, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    async def _guarded(self, scope: dict, receive: Any, send: Any, status: dict) -> None:
        """The checks on headers and body, then the app."""
        refusal = self._refusal(scope)
        if refusal is None and scope.get("method") in BODY_METHODS:
            try:
                body, too_big = await asyncio.wait_for(self._read_body(receive), self.body_timeout)
            except asyncio.TimeoutError:
                refusal = error_response(408, f"the request body did not arrive within {self.body_timeout:g} s",
                                         "Validation", headers={"Connection": "close"})
            else:
                if body is None:  # the client left before its body arrived: nothing to answer
                    status["code"] = 499
                    return
                if too_big:
                    refusal = error_response(413, f"the request body is larger than {self.max_body} bytes", "Validation",
                                             headers={"Connection": "close"})
                elif (problem := json_problem(body, self.max_json_items)) is not None:
                    refusal = error_response(422, problem, "Validation")
                receive = _replay(body, receive)
        if refusal is not None:
            await refusal(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _refusal(self, scope: dict) -> JSONResponse | None:
        """The answer to a request refused on its headers alone, or None."""
        headers = dict(scope.get("headers", []))  # the last of a repeated header: enough to refuse on
        path, method = scope.get("path", ""), scope.get("method", "")
        if self.api_key and method != "OPTIONS" and not _open(path, method):
            scheme, _, token = headers.get(b"authorization", b"").partition(b" ")
            if scheme.lower() != b"bearer" or not secrets.compare_digest(token.strip(b" \t"), self.api_key):
                return error_response(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "Unauthorized",
                              headers={"WWW-Authenticate": "Bearer", "Connection": "close"})
        if method not in BODY_METHODS:
            return None
        media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if media != b"application/json" and not (media.startswith(b"application/") and media.endswith(b"+json")):
            got = media.decode("latin-1")[:80] or "none"
            return error_response(415, f"send the body as JSON with 'Content-Type: application/json' (got {got})", "Validation",
                          headers={"Connection": "close"})
        encoding = headers.get(b"content-encoding", b"identity").strip().lower()
        if encoding != b"identity":
            return error_response(422, f"the body is {encoding.decode('latin-1')[:40]}-encoded; send the JSON as it is "
                                  "(no Content-Encoding)", "Validation", headers={"Connection": "close"})
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            return error_response(413, f"the request body is larger than {self.max_body} bytes", "Validation",
                          headers={"Connection": "close"})
        return None

    async def _read_body(self, receive: Any) -> tuple[bytes | None, bool]:
        """(body, too big); body None when the client disconnected first."""
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnect
                return None, False
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return b"", True
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks), False


def json_problem(body: bytes, max_items: int) -> str | None:
    """Why a JSON body is refused before it is parsed, or None: it is not UTF-8, or it holds more than
    `max_items` commas and opening brackets outside its strings. Those bound the objects a parser makes
    (a 7 MB list of empty lists is 1.9 million lists, over 20 times its size in memory) and how deep it
    nests; strings cost about their own size. Counted with bytes methods, so a long text costs no
    Python loop: escaped backslashes and quotes are taken out first, then every string ends at its
    next quote."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as exc:
        return f"the body is not UTF-8 (byte {exc.start})"
    plain = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    items = start = 0
    while True:
        quote = plain.find(b'"', start)
        end = len(plain) if quote < 0 else quote
        items += plain.count(b",", start, end) + plain.count(b"[", start, end) + plain.count(b"{", start, end)
        if items > max_items:
            return (f"the body holds more than {max_items} JSON values and containers; a request needs about "
                    "two per input")
        if quote < 0:
            return None
        start = plain.find(b'"', quote + 1) + 1
        if start == 0:  # a string that never ends: the parser says so
            return None


def _shutting_down() -> JSONResponse:
    return error_response(503, "the server is shutting down; retry", "Unhealthy",
                          headers={"Connection": "close", "Retry-After": "1"})


def _replay(body: bytes, receive: Any) -> Any:
    sent = {"done": False}

    async def replay() -> dict:
        if not sent["done"]:
            sent["done"] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
