"""The FastAPI app: text-embeddings-inference's wire API for a classifier (POST / and /predict, GET /info,
/health), /v1/classify, /v1/models, readiness and metrics. Routes are module-level functions (as TEI's router
and FastAPI's examples have them) that find the served model on `request.app.state.service`."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException

from layerprune.errors import LayerpruneError
from layerprune.runtime import TooManyTokens

from .batcher import Answer, MicroBatcher, Overloaded, TokenizerError, measure_run_overhead
from .guard import DOCS_STATIC, GuardMiddleware
from .metrics import Metrics
from .model import ServedModel
from .schemas import (
    STATUS,
    ApiError,
    ClassifyRequest,
    ClassifyResponse,
    ErrorResponse,
    Info,
    LabelScore,
    ModelList,
    PredictRequest,
    error_examples,
    error_response,
    validation_error,
    version,
)
from .settings import ServeSettings

log = logging.getLogger("layerprune.serve")


@dataclass
class Service:
    """What the routes share: the gated model, its batcher, settings and metrics, and readiness."""

    model: ServedModel
    settings: ServeSettings
    metrics: Metrics
    batcher: MicroBatcher
    ready: bool = False
    warmup: asyncio.Task | None = field(default=None, repr=False)

    @property
    def providers(self) -> list[str]:
        return list(self.model.classifier.session.get_providers())

    @property
    def compute_type(self) -> str:
        """TEI's x-compute-type header: where the model runs."""
        return "gpu" if self.providers[0] == "CUDAExecutionProvider" else "cpu"


def service(request: Request) -> Service:
    return request.app.state.service


# --- TEI routes ------------------------------------------------------------------------------------------

tei = APIRouter(tags=["Text Embeddings Inference"])


@tei.post("/", summary="Classify: TEI's default route for a classification model (same as /predict)",
          response_model=list[LabelScore] | list[list[LabelScore]], responses=error_examples(413, 422, 424, 429, 503))
@tei.post("/predict", summary="Classify (text-embeddings-inference's /predict)",
          response_model=list[LabelScore] | list[list[LabelScore]], responses=error_examples(413, 422, 424, 429, 503))
async def predict(req: PredictRequest, request: Request, svc: Service = Depends(service)) -> Response:
    """A text, a batch of texts, or pairs, as TEI takes them; each answer is every label with its score, best
    first. With `parameters` (the Hugging Face Inference API's form, which huggingface_hub's InferenceClient
    sends), top_k and function_to_apply apply and a single input is answered as a batch of one."""
    started = time.perf_counter()
    texts, pairs, single = req.sequences(svc.model.pair_input)
    truncate = svc.settings.auto_truncate if req.truncate is None else req.truncate
    answer = await _classify(request, svc, texts, pairs, truncate)
    scores = _scores(req, answer.logits, svc.model)
    top_k = req.parameters.top_k if req.parameters else None
    labels = svc.model.labels
    body = [[{"label": labels[j], "score": float(row[j])} for j in np.argsort(-row, kind="stable")[:top_k]]
            for row in scores]
    if single and req.parameters is None:
        body = body[0]
    return JSONResponse(body, headers=_timing_headers(svc, answer, texts, pairs, started))


@tei.get("/info", response_model=Info, summary="The served model (TEI's /info, with layerprune's fields)",
         responses=error_examples())
async def info(svc: Service = Depends(service)) -> Info:
    return Info.describe(svc.model, svc.settings, svc.providers, svc.batcher.run_overhead_tokens)


# --- layerprune routes ----------------------------------------------------------------------------------

api = APIRouter(tags=["layerprune"])


@api.post("/v1/classify", response_model=ClassifyResponse, summary="Classify texts or pairs",
          responses=error_examples(413, 422, 424, 429, 503))
async def classify(req: ClassifyRequest, request: Request, svc: Service = Depends(service)) -> Response:
    started = time.perf_counter()
    texts, pairs = req.sequences(svc.model.pair_input)
    answer = await _classify(request, svc, texts, pairs, req.truncate)
    scores = svc.model.scores(answer.logits, raw=req.raw_scores)
    labels, m = svc.model.labels, svc.model.manifest
    results = []
    for row in scores:
        best = int(np.argmax(row))
        results.append({"label": labels[best], "score": float(row[best]),
                        "scores": {label: float(s) for label, s in zip(labels, row)}})
    body = {"model": svc.model.model_id, "depth": m.depth, "total_layers": m.total_layers,
            "results": results}
    return JSONResponse(body, headers=_timing_headers(svc, answer, texts, pairs, started))


@api.get("/v1/models", response_model=ModelList, summary="The served bundle", responses=error_examples())
async def models(svc: Service = Depends(service)) -> Response:
    body: dict[str, Any] = {"object": "list", "data": [svc.model.info()]}
    if svc.model.warning:
        body["warning"] = svc.model.warning
    return JSONResponse(body)


@api.get("/metrics", summary="Prometheus metrics", response_class=Response, responses=error_examples())
async def metrics(svc: Service = Depends(service)) -> Response:
    svc.metrics.queued_inputs.set(svc.batcher.queued_inputs)
    return Response(generate_latest(svc.metrics.registry), media_type=CONTENT_TYPE_LATEST)


# --- probes (no API key) ----------------------------------------------------------------------------------

probes = APIRouter(tags=["ops"])

UNHEALTHY = {503: {"model": ErrorResponse, "description": "still warming up",
                   "content": {"application/json": {"example": {"error": "unhealthy", "error_type": "Unhealthy"}}}}}


@probes.get("/health", summary="TEI's health: 200 once the model answers, 503 before", responses=UNHEALTHY)
@probes.get("/", summary="TEI's health on GET /", responses=UNHEALTHY, include_in_schema=False)
@probes.head("/health", include_in_schema=False)  # HEAD answers as GET does (TEI's router: axum's get())
@probes.head("/", include_in_schema=False)
async def health(svc: Service = Depends(service)) -> Response:
    if not svc.ready:
        return error_response(503, "unhealthy", "Unhealthy")
    return Response(status_code=200)


@probes.get("/healthz", summary="Alive")
@probes.head("/healthz", include_in_schema=False)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@probes.get("/readyz", summary="Model loaded and warmed up (503 until then)",
            responses={503: {"description": "warming up", "content": {"application/json": {
                "example": {"status": "warming up"}}}}})
@probes.head("/readyz", include_in_schema=False)
async def readyz(svc: Service = Depends(service)) -> Response:
    if not svc.ready:
        return JSONResponse({"status": "warming up"}, status_code=503)
    return JSONResponse({"status": "ready"})


# --- errors ------------------------------------------------------------------------------------------------


async def on_api_error(request: Request, exc: ApiError) -> Response:
    return error_response(exc.status, exc.message, exc.error_type, headers=exc.headers)


async def on_validation_error(request: Request, exc: RequestValidationError) -> Response:
    return validation_error(exc.errors())


async def on_http_error(request: Request, exc: StarletteHTTPException) -> Response:
    return error_response(exc.status_code, str(exc.detail), "Validation", headers=getattr(exc, "headers", None))


async def on_unexpected(request: Request, exc: Exception) -> Response:  # pragma: no cover - a bug
    log.exception("unexpected error on %s", request.url.path)
    return error_response(500, f"internal error: {type(exc).__name__}", "Backend")


# --- the app ------------------------------------------------------------------------------------------------


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    svc: Service = app.state.service
    await svc.batcher.start()
    if not svc.model.validated:
        log.warning("UNVALIDATED BUNDLE: %s", svc.model.warning)
    svc.warmup = asyncio.create_task(_warm_up(svc))
    try:
        yield
    finally:
        svc.ready = False
        svc.warmup.cancel()
        await svc.batcher.stop()


ROUTERS = (tei, api, probes)  # the routes, in the order they are matched
DOCS_PATHS = frozenset({"/docs", "/openapi.json", "/redoc"})  # FastAPI's own: the API description


def served_paths() -> frozenset[str]:
    """Every path a route answers on: the request metrics' route labels (any other path is 'other')."""
    return frozenset(route.path for router in ROUTERS for route in router.routes) | DOCS_PATHS


def create_app(model: ServedModel, settings: ServeSettings) -> FastAPI:
    metrics = Metrics(served_paths())
    clf = model.classifier
    batcher = MicroBatcher(clf, settings, metrics, max_length=clf.max_length)
    app = _fastapi(
        title="layerprune serve", version=version(), lifespan=lifespan,
        description=f"Text classification with the pruned ONNX bundle of {model.source_name} ({model.manifest.depth}"
        f" of {model.manifest.total_layers} layers, task {model.manifest.task}), on text-embeddings-inference's API.",
    )
    app.state.service = Service(model, settings, metrics, batcher)
    app.state.model, app.state.settings, app.state.metrics, app.state.batcher = model, settings, metrics, batcher
    for kind, handler in [(ApiError, on_api_error), (RequestValidationError, on_validation_error),
                          (StarletteHTTPException, on_http_error), (Exception, on_unexpected)]:
        app.add_exception_handler(kind, handler)
    if settings.cors_origins:  # off unless asked: a web page elsewhere must not reach a local server
        app.add_middleware(CORSMiddleware, allow_origins=settings.cors_origins, allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    api_key = settings.api_key.get_secret_value() if settings.api_key else None
    app.add_middleware(GuardMiddleware, metrics=metrics, max_body=settings.max_body_bytes(model.pair_input),
                       max_json_items=settings.max_json_items, body_timeout=settings.timeout_body_s, api_key=api_key)
    # Documents the bearer token in OpenAPI (the "Authorize" button); the guard middleware checks it.
    auth = [Depends(HTTPBearer(auto_error=False, description="the server's --api-key"))] if api_key else []
    for router in ROUTERS:
        app.include_router(router, dependencies=[] if router is probes else auth)
    return app


# --- helpers -------------------------------------------------------------------------------------------------


async def _warm_up(svc: Service) -> None:
    """One inference through the batcher; then, unless configured, the fixed cost of a run (for plan_runs)."""
    texts, pairs = ["warm up"], (["warm up"] if svc.model.pair_input else None)
    try:
        await svc.batcher.submit(texts, pairs, True)
        if svc.settings.run_overhead_tokens is None:
            loop = asyncio.get_running_loop()
            overhead = await loop.run_in_executor(None, measure_run_overhead, svc.model.classifier)
            svc.batcher.run_overhead_tokens = overhead
    except Exception:  # noqa: BLE001 - never ready then, and the log says why
        log.exception("warm-up inference failed; /readyz stays 503")
        return
    svc.ready = True
    log.info("model warmed up and ready on %s; a run's fixed cost ~%.0f padded tokens", svc.providers[0],
             svc.batcher.run_overhead_tokens)


async def _classify(request: Request, svc: Service, texts: list[str], pairs: list[str] | None, truncate: bool) -> Answer:
    if not svc.ready:
        raise ApiError(503, "the model is still warming up; see /health", "Unhealthy", {"Retry-After": "1"})
    _check_limits(texts, pairs, svc.settings)
    # Tokenization and inference run in the batcher's worker thread, a micro-batch at a time.
    try:
        return await _unless_client_leaves(request, svc.batcher.submit(texts, pairs, truncate))
    except Overloaded as exc:
        raise ApiError(429, str(exc), "Overloaded", {"Retry-After": str(exc.retry_after)}) from None
    except TooManyTokens as exc:  # too long with truncate: false (TEI: a validation error)
        raise ApiError(422, f"input {exc.index} has {exc.tokens} tokens, the model takes at most {exc.limit}; "
                       'send "truncate": true to cut it') from None
    except LayerpruneError as exc:
        raise ApiError(422, str(exc), "Validation") from None
    except TokenizerError as exc:
        raise ApiError(422, f"cannot tokenize the input: {exc}", "Tokenizer") from None
    except RuntimeError as exc:  # the batcher stopped (shutting down) or the model failed
        raise ApiError(424, f"inference failed: {exc}", "Backend") from None


def _scores(req: PredictRequest, logits: np.ndarray, model: ServedModel) -> np.ndarray:
    """raw_scores as TEI; the Inference API's function_to_apply ('softmax', 'sigmoid', 'none') when sent."""
    fn = req.parameters.function_to_apply if req.parameters else None
    if fn == "none":
        return np.asarray(logits, dtype=np.float64)
    if fn == "sigmoid":
        return 1.0 / (1.0 + np.exp(-np.asarray(logits, dtype=np.float64)))
    if fn == "softmax":
        x = np.asarray(logits, dtype=np.float64)
        x = np.exp(x - x.max(axis=-1, keepdims=True))
        return x / x.sum(axis=-1, keepdims=True)
    return model.scores(logits, raw=req.raw_scores)


def _check_limits(texts: list[str], pairs: list[str] | None, settings: ServeSettings) -> None:
    """TEI's limits, as TEI answers them: 422 Validation for too many inputs or characters, 400 Empty for an
    empty text."""
    if len(texts) > settings.max_inputs_per_request:
        raise ApiError(422, f"batch size {len(texts)} > maximum allowed batch size {settings.max_inputs_per_request}")
    for i, text in enumerate(texts + (pairs or [])):
        which = f"input {i}" if i < len(texts) else f"text_pair of input {i - len(texts)}"
        if len(text) > settings.max_chars_per_input:
            raise ApiError(422, f"{which} has {len(text)} characters; the maximum is {settings.max_chars_per_input}")
        if not text:
            raise ApiError(STATUS["Empty"], f"{which} is empty: `inputs` cannot be empty", "Empty")


def _timing_headers(svc: Service, answer: Answer, texts: list[str], pairs: list[str] | None,
                    started: float) -> dict[str, str]:
    """TEI's response headers: times in whole milliseconds, characters and tokens computed."""
    total = str(int((time.perf_counter() - started) * 1000))
    chars = sum(map(len, texts)) + sum(map(len, pairs or []))
    return {
        "x-compute-type": svc.compute_type, "x-compute-time": total, "x-total-time": total,
        "x-compute-characters": str(chars), "x-compute-tokens": str(answer.tokens),
        "x-tokenization-time": str(int(answer.tokenization_s * 1000)), "x-queue-time": str(int(answer.queue_s * 1000)),
        "x-inference-time": str(int(answer.inference_s * 1000)),
    }


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
