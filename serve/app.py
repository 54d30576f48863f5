"""The FastAPI app: TEI-compatible /predict, /v1/classify, /v1/models, health, readiness, metrics."""

from __future__ import annotations

import asyncio
import logging
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from layerprune.errors import LayerpruneError

from .batcher import MicroBatcher, Overloaded
from .metrics import Metrics
from .model import ServedModel
from .settings import ServeSettings

log = logging.getLogger("layerprune.serve")

ErrorType = Literal["Validation", "Tokenizer", "Empty", "Overloaded", "Unhealthy", "Backend", "Unauthorized"]
MAX_ERROR_CHARS = 300  # an error names the field and the problem; it never echoes the input
MAX_ERROR_DETAILS = 10
DOCS_STATIC = "/static-offline-docs"
# Reachable without the API key: probes (Docker HEALTHCHECK, orchestrators) and the API description.
OPEN_PATHS = {"/healthz", "/readyz", "/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"}
BODY_METHODS = {"POST", "PUT", "PATCH"}


class ApiError(Exception):
    """An error answer: {"error": message, "error_type": type} as TEI answers."""

    def __init__(self, status: int, message: str, error_type: ErrorType = "Validation",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type, self.headers = status, message, error_type, headers


# --- request and response bodies -------------------------------------------------------------------


def _check_unicode(field: str, texts: Any) -> None:
    """Lone surrogates ("\\ud800" in JSON) are not text: no tokenizer or JSON answer can encode them."""
    if isinstance(texts, str):
        texts = [texts]
    for i, item in enumerate(texts or []):
        for text in [item] if isinstance(item, str) else item:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise ValueError(f"{field}[{i}] is not valid Unicode: a lone surrogate at character {exc.start}") from None


Sequence = StrictStr | list[StrictStr]


class PredictRequest(BaseModel):
    """TEI's /predict body."""

    inputs: StrictStr | list[Sequence] = Field(
        description='a text, a batch of texts, or sentence pairs [["premise", "hypothesis"], ...]; '
        'on a pair model a single pair may also be sent as ["premise", "hypothesis"]',
        examples=["a gorgeous, witty, seductive movie"],
    )
    truncate: StrictBool | None = Field(
        None, description="cut inputs to the model's max length; false: too long is a 413 (default: server's auto_truncate)"
    )
    truncation_direction: Literal["right", "Right"] = Field("right", description="only right truncation is supported")
    raw_scores: StrictBool = Field(False, description="logits instead of probabilities")

    @model_validator(mode="after")
    def _unicode(self) -> PredictRequest:
        _check_unicode("inputs", self.inputs)
        return self


class LabelScore(BaseModel):
    label: str
    score: float


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[StrictStr] | None = Field(None, description="single texts (single-text models)")
    pairs: list[tuple[StrictStr, StrictStr]] | None = Field(None, description="[text, text_pair] (pair models)")
    truncate: StrictBool = Field(True, description="cut inputs to the model's max length; false: too long is a 413")
    raw_scores: StrictBool = Field(False, description="logits instead of probabilities in score/scores")

    @model_validator(mode="after")
    def _one_of(self) -> ClassifyRequest:
        if (self.texts is None) == (self.pairs is None):
            raise ValueError("send exactly one of 'texts' and 'pairs'")
        _check_unicode("texts", self.texts)
        _check_unicode("pairs", self.pairs)
        return self


class Classification(BaseModel):
    label: str
    score: float
    scores: dict[str, float]


class ClassifyResponse(BaseModel):
    model: str
    kept_layers: int
    total_layers: int
    results: list[Classification]


# --- the app ---------------------------------------------------------------------------------------


def create_app(model: ServedModel, settings: ServeSettings) -> FastAPI:
    metrics = Metrics()
    clf = model.classifier
    batcher = MicroBatcher(
        clf.run, lambda texts, pairs, truncate: _tokenize(model, texts, pairs, truncate),
        int(getattr(clf, "_pad_id", 0)), max_batch_size=settings.max_batch_size,
        max_wait_s=settings.max_wait_ms / 1000.0, max_queue=settings.max_queue, metrics=metrics,
        max_length=clf.max_length, max_batch_tokens=settings.max_batch_tokens,
        max_queue_tokens=settings.max_queue_tokens,
    )
    state: dict[str, Any] = {"ready": False, "warmup": None}

    async def warm_up() -> None:
        texts, pairs = ["warm up"], (["warm up"] if model.pair_input else None)
        try:
            await batcher.submit(texts, pairs, True)
        except Exception:  # noqa: BLE001 - never ready then, and the log says why
            log.exception("warm-up inference failed; /readyz stays 503")
            return
        state["ready"] = True
        log.info("model warmed up and ready")

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        if not model.validated:
            log.warning("UNVALIDATED BUNDLE: %s", model.warning)
        state["warmup"] = asyncio.create_task(warm_up())
        try:
            yield
        finally:
            state["ready"] = False
            state["warmup"].cancel()
            await batcher.stop()

    app = _fastapi(
        title="layerprune serve",
        description=f"Text classification with the pruned ONNX bundle of {model.source_name} "
        f"({model.manifest.kept_layers} of {model.manifest.total_layers} layers, task {model.manifest.task}).",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.model, app.state.settings, app.state.metrics, app.state.batcher = model, settings, metrics, batcher
    app.state.serve_state = state
    if settings.cors_origins:  # off unless asked: a web page elsewhere must not reach a local server
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    app.add_middleware(_GuardMiddleware, metrics=metrics, max_body=settings.max_body_bytes,
                       body_timeout=settings.timeout_body_s, api_key=api_key)
    # Documents the bearer token in OpenAPI (the "Authorize" button); the guard middleware checks it.
    auth = [Depends(HTTPBearer(auto_error=False, description="the server's --api-key"))] if api_key else []

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.error_type, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = [_error_detail(e) for e in exc.errors()[:MAX_ERROR_DETAILS]]
        first = errors[0] if errors else {"loc": [], "msg": "invalid request", "type": ""}
        where = ".".join(p for p in first["loc"] if p != "body") or "body"
        message = "the body is not valid JSON" if first["type"] == "json_invalid" else f"{where}: {first['msg']}"
        return _error(422, message, "Validation", detail=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "Validation", headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # pragma: no cover - a bug
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}", "Backend")

    async def classify(request: Request, texts: list[str], pairs: list[str] | None, truncate: bool) -> np.ndarray:
        if not state["ready"]:
            raise ApiError(503, "the model is still warming up; see /readyz", "Unhealthy", {"Retry-After": "1"})
        _check_limits(texts, pairs, settings)
        # Tokenization and inference run in the batcher's worker thread, a whole batch at a time.
        try:
            return await _unless_client_leaves(request, batcher.submit(texts, pairs, truncate))
        except Overloaded as exc:
            raise ApiError(429, str(exc), "Overloaded", {"Retry-After": str(exc.retry_after)}) from None
        except LayerpruneError as exc:  # too long with truncate: false
            raise ApiError(413, str(exc), "Validation") from None
        except _TokenizerError as exc:
            raise ApiError(422, f"cannot tokenize the input: {exc}", "Tokenizer") from None

    @app.post(
        "/predict", response_model=list[LabelScore] | list[list[LabelScore]], tags=["TEI"],
        summary="Classify (text-embeddings-inference compatible)", dependencies=auth,
        responses={413: {"description": "too many inputs or an input too long"}, 422: {"description": "bad input"},
                   429: {"description": "queue full; retry after Retry-After seconds"}},
    )
    async def predict(req: PredictRequest, request: Request) -> Any:
        texts, pairs, single = _predict_inputs(req.inputs, model.pair_input)
        truncate = settings.auto_truncate if req.truncate is None else req.truncate
        scores = model.scores(await classify(request, texts, pairs, truncate), raw=req.raw_scores)
        labels = model.labels
        answers = [
            [{"label": labels[j], "score": float(row[j])} for j in np.argsort(-row, kind="stable")] for row in scores
        ]
        return answers[0] if single else answers

    @app.post("/v1/classify", response_model=ClassifyResponse, tags=["layerprune"], summary="Classify texts or pairs",
              dependencies=auth)
    async def classify_v1(req: ClassifyRequest, request: Request) -> Any:
        if req.pairs is not None:
            if not model.pair_input:
                raise ApiError(422, "this model classifies single texts: send 'texts', not 'pairs'")
            texts, pairs = [p[0] for p in req.pairs], [p[1] for p in req.pairs]
        else:
            if model.pair_input:
                raise ApiError(422, "this model classifies sentence pairs: send 'pairs' as [[text, text_pair], ...]")
            texts, pairs = list(req.texts or []), None
        if not texts:
            raise ApiError(422, "no inputs: the list is empty", "Empty")
        scores = model.scores(await classify(request, texts, pairs, req.truncate), raw=req.raw_scores)
        labels = model.labels
        results = []
        for row in scores:
            best = int(np.argmax(row))
            results.append({"label": labels[best], "score": float(row[best]),
                            "scores": {label: float(s) for label, s in zip(labels, row)}})
        m = model.manifest
        return {"model": model.model_id, "kept_layers": m.kept_layers, "total_layers": m.total_layers, "results": results}

    @app.get("/v1/models", tags=["layerprune"], summary="The served bundle", dependencies=auth)
    async def models() -> Any:
        body: dict[str, Any] = {"object": "list", "data": [model.info()]}
        if model.warning:
            body["warning"] = model.warning
        return body

    @app.get("/healthz", tags=["ops"], summary="Alive")
    async def healthz() -> Any:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"], summary="Model loaded and warmed up (503 until then)")
    async def readyz() -> Any:
        if not state["ready"]:
            return JSONResponse({"status": "warming up"}, status_code=503)
        return {"status": "ready"}

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics", dependencies=auth)
    async def prometheus() -> Response:
        metrics.queue_depth.set(batcher.depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


# --- helpers ---------------------------------------------------------------------------------------


def _error(status: int, message: str, error_type: str, detail: Any = None, headers: dict | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": _clip(message), "error_type": error_type}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers)


def _clip(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """At most `limit` characters, JSON-safe: lone surrogates (from a field name, say) become \\udXXX."""
    text = text if len(text) <= limit else text[:limit] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _error_detail(error: dict) -> dict[str, Any]:
    """A validation error as where + what, bounded: pydantic's "input" (the rejected value: NaN, a 5 MB
    string, a lone surrogate) is left out, so no answer repeats the payload or fails to serialize."""
    loc = [_clip(str(p), 64) for p in error.get("loc", ())][:8]
    return {"loc": loc, "msg": _clip(str(error.get("msg", ""))), "type": _clip(str(error.get("type", "")), 64)}


def _fastapi(**kwargs: Any) -> FastAPI:
    """FastAPI whose /docs and /redoc load their scripts from this server (fastapi-offline's packaged
    copies), so they work on an offline host; the CDN pages when that package is missing."""
    try:
        from fastapi_offline import FastAPIOffline
    except ImportError:
        log.warning("fastapi-offline is not installed: /docs loads its scripts from a CDN")
        return FastAPI(**kwargs)
    return FastAPIOffline(static_url=DOCS_STATIC, **kwargs)


async def _unless_client_leaves(request: Request, work: Any) -> Any:
    """Await `work`, but cancel it when the client disconnects first (uvicorn does not cancel a handler
    whose client left): queued inputs of a gone client are then never run."""
    task = asyncio.ensure_future(work)
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, gone}, return_when=asyncio.FIRST_COMPLETED)
    except asyncio.CancelledError:  # the handler itself is cancelled (shutdown past its drain time)
        task.cancel()
        raise
    finally:
        gone.cancel()
    if not task.done():
        task.cancel()
        raise ApiError(499, "the client closed the connection", "Validation")  # nobody reads it
    return task.result()


async def _disconnected(request: Request) -> None:
    """Returns once the client is gone. The body is read already, so receive() only waits for that."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _predict_inputs(inputs: str | list, pair_model: bool) -> tuple[list[str], list[str] | None, bool]:
    """(texts, pairs or None, single) from TEI's `inputs`. As in TEI, ["a", "b"] is one pair on a pair
    model; on a single-text model it is a batch of two texts."""
    if isinstance(inputs, str):
        if pair_model:
            raise ApiError(422, 'this model classifies sentence pairs: send ["premise", "hypothesis"] or a list of them')
        return [inputs], None, True
    if not inputs:
        raise ApiError(422, "`inputs` cannot be empty", "Empty")
    if all(isinstance(x, str) for x in inputs):
        if not pair_model:
            return list(inputs), None, False
        if len(inputs) == 2:
            return [inputs[0]], [inputs[1]], True
        raise ApiError(422, 'this model classifies sentence pairs: send [["premise", "hypothesis"], ...]')
    if all(isinstance(x, list) for x in inputs):
        bad = next((i for i, x in enumerate(inputs) if len(x) != 2), None)
        if not pair_model:
            raise ApiError(422, "this model classifies single texts: send a string or a list of strings, not pairs")
        if bad is not None:
            raise ApiError(422, f"inputs[{bad}] has {len(inputs[bad])} texts; a pair is [text, text_pair]")
        return [x[0] for x in inputs], [x[1] for x in inputs], False
    raise ApiError(422, "`inputs` mixes texts and pairs; send a list of strings or a list of [text, text_pair]")


def _check_limits(texts: list[str], pairs: list[str] | None, settings: ServeSettings) -> None:
    if len(texts) > settings.max_inputs_per_request:
        raise ApiError(413, f"batch size {len(texts)} > maximum allowed batch size {settings.max_inputs_per_request}")
    for i, text in enumerate(texts + (pairs or [])):
        if len(text) > settings.max_chars_per_input:
            which = f"input {i}" if i < len(texts) else f"text_pair of input {i - len(texts)}"
            raise ApiError(413, f"{which} has {len(text)} characters; the maximum is {settings.max_chars_per_input}")


class _TokenizerError(Exception):
    """The tokenizer could not read an input."""


def _tokenize(model: ServedModel, texts: list[str], pairs: list[str] | None, truncate: bool) -> list[dict[str, np.ndarray]]:
    """Unpadded int64 token rows, one per input (runs in the batcher's worker thread)."""
    clf = model.classifier
    try:
        enc = clf.encode(texts, pairs, truncation=truncate)
    except LayerpruneError:
        raise
    except Exception as exc:  # noqa: BLE001 - tokenizers raises plain Exceptions on odd input
        raise _TokenizerError(str(exc).splitlines()[0] if str(exc) else type(exc).__name__) from None
    if "attention_mask" not in enc:  # no mask to read lengths from: one input at a time
        return [{k: v[0] for k, v in clf.encode([t], None if pairs is None else [pairs[i]], truncation=truncate).items()}
                for i, t in enumerate(texts)]
    lengths = enc["attention_mask"].sum(axis=1)
    return [{name: np.ascontiguousarray(arr[i, :n]) for name, arr in enc.items()} for i, n in enumerate(lengths)]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("layerprune")
    except Exception:  # noqa: BLE001
        return "0"


class _GuardMiddleware:
    """Pure ASGI, in front of everything: request counts and latency by route and status (known methods and
    routes only, so label sets stay bounded); then, before any body is read or parsed, the API key (401),
    Content-Type application/json on bodies (415: no "simple" cross-origin form or text/plain POST from a
    web page), the body size (413) and the time its body may take to arrive (408)."""

    def __init__(self, app: Any, metrics: Metrics, max_body: int, body_timeout: float, api_key: str | None) -> None:
        self.app, self.metrics, self.max_body = app, metrics, max_body
        self.body_timeout, self.api_key = body_timeout, api_key

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        route = Metrics.route_label(scope.get("path", ""))
        status = {"code": 500}

        async def send_wrapper(message: dict) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is None and scope.get("method") in BODY_METHODS:
                try:
                    body, too_big = await asyncio.wait_for(self._read_body(receive), self.body_timeout)
                except asyncio.TimeoutError:
                    refusal = _error(408, f"the request body did not arrive within {self.body_timeout:g} s",
                                     "Validation", headers={"Connection": "close"})
                else:
                    if body is None:  # the client left before its body arrived: nothing to answer
                        status["code"] = 499
                        return
                    if too_big:
                        refusal = _error(413, f"the request body is larger than {self.max_body} bytes", "Validation",
                                         headers={"Connection": "close"})
                    receive = _replay(body, receive)
            if refusal is not None:
                await refusal(scope, receive, send_wrapper)
                return
            await self.app(scope, receive, send_wrapper)
        finally:
            method = Metrics.method_label(scope.get("method", ""))
            self.metrics.requests.labels(route, method, str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    def _refusal(self, scope: dict) -> JSONResponse | None:
        """The answer to a request refused on its headers alone, or None."""
        headers = dict(scope.get("headers", []))  # the last of a repeated header: enough to refuse on
        path, method = scope.get("path", ""), scope.get("method", "")
        if self.api_key and method != "OPTIONS" and path not in OPEN_PATHS and not path.startswith(DOCS_STATIC + "/"):
            scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
            if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), self.api_key.encode()):
                return _error(401, "missing or wrong API key: send 'Authorization: Bearer KEY'", "Unauthorized",
                              headers={"WWW-Authenticate": "Bearer", "Connection": "close"})
        if method not in BODY_METHODS:
            return None
        media = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
        if media != b"application/json" and not (media.startswith(b"application/") and media.endswith(b"+json")):
            got = media.decode("latin-1")[:80] or "none"
            return _error(415, f"send the body as JSON with 'Content-Type: application/json' (got {got})", "Validation",
                          headers={"Connection": "close"})
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_body:
            return _error(413, f"the request body is larger than {self.max_body} bytes", "Validation",
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


def _replay(body: bytes, receive: Any) -> Any:
    sent = {"done": False}

    async def replay() -> dict:
        if not sent["done"]:
            sent["done"] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
