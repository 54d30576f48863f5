"""The FastAPI app: TEI-compatible /predict, /v1/classify, /v1/models, health, readiness, metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Literal

import numpy as np
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictStr, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from layerprune.errors import LayerpruneError

from .batcher import MicroBatcher, Overloaded
from .metrics import Metrics
from .model import ServedModel
from .settings import ServeSettings

log = logging.getLogger("layerprune.serve")

ErrorType = Literal["Validation", "Tokenizer", "Empty", "Overloaded", "Unhealthy", "Backend"]


class ApiError(Exception):
    """An error answer: {"error": message, "error_type": type} as TEI answers."""

    def __init__(self, status: int, message: str, error_type: ErrorType = "Validation") -> None:
        super().__init__(message)
        self.status, self.message, self.error_type = status, message, error_type


# --- request and response bodies -------------------------------------------------------------------

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

    app = FastAPI(
        title="layerprune serve",
        description=f"Text classification with the pruned ONNX bundle of {model.manifest.source_checkpoint} "
        f"({model.manifest.kept_layers} of {model.manifest.total_layers} layers, task {model.manifest.task}).",
        version=_version(),
        lifespan=lifespan,
    )
    app.state.model, app.state.settings, app.state.metrics, app.state.batcher = model, settings, metrics, batcher
    app.state.serve_state = state
    app.add_middleware(_GuardMiddleware, metrics=metrics, max_body=settings.max_body_bytes)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return _error(exc.status, exc.message, exc.error_type)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = jsonable_encoder(exc.errors(), custom_encoder={Exception: str, bytes: lambda b: b[:200].decode("utf-8", "replace")})
        first = errors[0] if errors else {"loc": [], "msg": "invalid request"}
        where = ".".join(str(p) for p in first.get("loc", []) if p != "body") or "body"
        message = f"{where}: {first.get('msg')}"
        if first.get("type") == "json_invalid":
            message = "the body is not valid JSON"
        return _error(422, message, "Validation", detail=errors)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return _error(exc.status_code, str(exc.detail), "Validation", headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:  # pragma: no cover - a bug
        log.exception("unexpected error on %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}", "Backend")

    async def classify(texts: list[str], pairs: list[str] | None, truncate: bool) -> np.ndarray:
        if not state["ready"]:
            raise ApiError(503, "the model is still warming up; see /readyz", "Unhealthy")
        _check_limits(texts, pairs, settings)
        # Tokenization and inference run in the batcher's worker thread, a whole batch at a time.
        try:
            return await batcher.submit(texts, pairs, truncate)
        except Overloaded as exc:
            raise ApiError(429, str(exc), "Overloaded") from None
        except LayerpruneError as exc:  # too long with truncate: false
            raise ApiError(413, str(exc), "Validation") from None
        except _TokenizerError as exc:
            raise ApiError(422, f"cannot tokenize the input: {exc}", "Tokenizer") from None

    @app.post(
        "/predict", response_model=list[LabelScore] | list[list[LabelScore]], tags=["TEI"],
        summary="Classify (text-embeddings-inference compatible)",
        responses={413: {"description": "too many inputs or an input too long"}, 422: {"description": "bad input"}},
    )
    async def predict(req: PredictRequest) -> Any:
        texts, pairs, single = _predict_inputs(req.inputs, model.pair_input)
        truncate = settings.auto_truncate if req.truncate is None else req.truncate
        scores = model.scores(await classify(texts, pairs, truncate), raw=req.raw_scores)
        labels = model.labels
        answers = [
            [{"label": labels[j], "score": float(row[j])} for j in np.argsort(-row, kind="stable")] for row in scores
        ]
        return answers[0] if single else answers

    @app.post("/v1/classify", response_model=ClassifyResponse, tags=["layerprune"], summary="Classify texts or pairs")
    async def classify_v1(req: ClassifyRequest) -> Any:
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
        scores = model.scores(await classify(texts, pairs, req.truncate), raw=req.raw_scores)
        labels = model.labels
        results = []
        for row in scores:
            best = int(np.argmax(row))
            results.append({"label": labels[best], "score": float(row[best]),
                            "scores": {label: float(s) for label, s in zip(labels, row)}})
        m = model.manifest
        return {"model": model.model_id, "kept_layers": m.kept_layers, "total_layers": m.total_layers, "results": results}

    @app.get("/v1/models", tags=["layerprune"], summary="The served bundle")
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

    @app.get("/metrics", tags=["ops"], summary="Prometheus metrics")
    async def prometheus() -> Response:
        metrics.queue_depth.set(batcher.depth)
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


# --- helpers ---------------------------------------------------------------------------------------


def _error(status: int, message: str, error_type: str, detail: Any = None, headers: dict | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": message, "error_type": error_type}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers)


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
    """Pure ASGI: request counts and latency by route and status; bodies over max_body refused (413)
    before they are parsed; POST bodies are read as JSON whatever their Content-Type."""

    def __init__(self, app: Any, metrics: Metrics, max_body: int) -> None:
        self.app, self.metrics, self.max_body = app, metrics, max_body

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
            if scope.get("method") in ("POST", "PUT", "PATCH"):
                body, too_big = await self._read_body(scope, receive)
                if too_big:
                    response = _error(413, f"the request body is larger than {self.max_body} bytes", "Validation")
                    await response(scope, receive, send_wrapper)
                    return
                receive = _replay(body, receive)
                # The body is parsed as JSON whatever Content-Type says (curl -d sends form-urlencoded).
                headers = [(k, v) for k, v in scope.get("headers", []) if k != b"content-type"]
                scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
            await self.app(scope, receive, send_wrapper)
        finally:
            self.metrics.requests.labels(route, scope.get("method", ""), str(status["code"])).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    async def _read_body(self, scope: dict, receive: Any) -> tuple[bytes, bool]:
        for key, value in scope.get("headers", []):
            if key == b"content-length":
                try:
                    if int(value) > self.max_body:
                        return b"", True
                except ValueError:
                    pass
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # disconnect
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body:
                return b"", True
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks), False


def _replay(body: bytes, receive: Any) -> Any:
    sent = {"done": False}

    async def replay() -> dict:
        if not sent["done"]:
            sent["done"] = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay
