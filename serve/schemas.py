"""Wire formats: request and response bodies, TEI's /info, and errors as TEI answers them
({"error": message, "error_type": type}, the status following the type)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, model_validator

from layerprune.artifacts import FallbackRule

if TYPE_CHECKING:
    from .model import ServedModel
    from .settings import ServeSettings

ErrorType = Literal["Validation", "Tokenizer", "Empty", "Overloaded", "Unhealthy", "Backend", "Unauthorized"]
# TEI's mapping of error type to status (router/src/http/server.rs, From<&ErrorType> for StatusCode).
STATUS: dict[str, int] = {"Unhealthy": 503, "Backend": 424, "Overloaded": 429, "Tokenizer": 422, "Validation": 422,
                          "Empty": 400, "Unauthorized": 401}
MAX_ERROR_CHARS = 300  # an error names the field and the problem; it never echoes the input
MAX_ERROR_DETAILS = 10


class ApiError(Exception):
    """An error answer: {"error": message, "error_type": type} as TEI answers."""

    def __init__(self, status: int, message: str, error_type: ErrorType = "Validation",
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.error_type, self.headers = status, message, error_type, headers


class ErrorResponse(BaseModel):
    error: str
    error_type: ErrorType


# Every status a route may answer, with an example body (as TEI's router documents them).
_EXAMPLES: dict[int, tuple[str, str, str]] = {
    400: ("an input is an empty string", "input 0 is empty: `inputs` cannot be empty", "Empty"),
    401: ("missing or wrong API key (when the server has one)",
          "missing or wrong API key: send 'Authorization: Bearer KEY'", "Unauthorized"),
    408: ("the body did not arrive in time", "the request body did not arrive within 30 s", "Validation"),
    413: ("payload too large", "the request body is larger than 7749632 bytes", "Validation"),
    415: ("the body is not JSON", "send the body as JSON with 'Content-Type: application/json' (got text/plain)",
          "Validation"),
    422: ("validation or tokenization error", "batch size 65 > maximum allowed batch size 64", "Validation"),
    424: ("the model failed", "inference failed: server is shutting down", "Backend"),
    429: ("overloaded: retry after Retry-After seconds", "4096 inputs are queued (max 4096); retry later", "Overloaded"),
    503: ("still warming up", "the model is still warming up; see /health", "Unhealthy"),
}
_ALWAYS = (401,)  # any route behind the API key
_BODY = (400, 408, 413, 415)  # any route with a body


def error_examples(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """FastAPI `responses=` for these statuses (plus the ones every route, or every route with a body, has)."""
    chosen = set(statuses) | set(_ALWAYS) | (set(_BODY) if statuses else set())
    return {
        code: {"model": ErrorResponse, "description": _EXAMPLES[code][0],
               "content": {"application/json": {"example": {"error": _EXAMPLES[code][1],
                                                            "error_type": _EXAMPLES[code][2]}}}}
        for code in sorted(chosen)
    }


def error_response(status: int, message: str, error_type: str, detail: Any = None,
                   headers: dict | None = None) -> JSONResponse:
    body: dict[str, Any] = {"error": clip(message), "error_type": error_type}
    if detail is not None:
        body["detail"] = detail
    return JSONResponse(body, status_code=status, headers=headers)


def validation_error(errors: list[dict]) -> JSONResponse:
    """pydantic's errors as one 422: the first named in `error`, up to ten in `detail`, never their input."""
    details = [_error_detail(e) for e in errors[:MAX_ERROR_DETAILS]]
    first = details[0] if details else {"loc": [], "msg": "invalid request", "type": ""}
    where = ".".join(p for p in first["loc"] if p != "body") or "body"
    message = "the body is not valid JSON" if first["type"] == "json_invalid" else f"{where}: {first['msg']}"
    return error_response(422, message, "Validation", detail=details)


def clip(text: str, limit: int = MAX_ERROR_CHARS) -> str:
    """At most `limit` characters, JSON-safe: lone surrogates (from a field name, say) become \\udXXX."""
    text = text if len(text) <= limit else text[:limit] + "..."
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def _error_detail(error: dict) -> dict[str, Any]:
    """A validation error as where + what, bounded: pydantic's "input" (the rejected value: NaN, a 5 MB
    string, a lone surrogate) is left out, so no answer repeats the payload or fails to serialize."""
    loc = [clip(str(p), 64) for p in error.get("loc", ())][:8]
    return {"loc": loc, "msg": clip(str(error.get("msg", ""))), "type": clip(str(error.get("type", "")), 64)}


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


def _fail(message: str) -> ApiError:
    return ApiError(422, message, "Validation")


# --- /predict and / ---------------------------------------------------------------------------------------


class Parameters(BaseModel):
    """The Hugging Face Inference API's text-classification parameters (huggingface_hub's InferenceClient
    sends them); TEI ignores them, layerprune applies them."""

    top_k: StrictInt | None = Field(None, ge=1, le=2**31 - 1, description="answer only the k best labels")
    function_to_apply: Literal["softmax", "sigmoid", "none"] | None = Field(
        None, description="scores as softmax, sigmoid or raw logits (default: the model's, as raw_scores=false)")


class PredictRequest(BaseModel):
    """TEI's /predict body."""

    inputs: StrictStr | list[StrictStr | list[StrictStr]] = Field(
        description='a text; a batch as TEI sends it, [["a"], ["b"]]; pairs [["premise", "hypothesis"], ...] (one '
        'pair: ["premise", "hypothesis"]). layerprune also takes ["a", "b"] as a batch on a single-text model.',
        examples=["a gorgeous, witty, seductive movie", [["a gorgeous movie"], ["a dull remake"]]],
    )
    truncate: StrictBool | None = Field(
        None, description="cut inputs to the model's max length; false: too long is a 422 (default: server's auto_truncate)"
    )
    truncation_direction: Literal["right", "Right"] = Field("right", description="only right truncation is supported")
    raw_scores: StrictBool = Field(False, description="logits instead of probabilities")
    parameters: Parameters | None = Field(
        None, description="the Inference API's form: top_k, function_to_apply; a single input is then answered as "
        "a batch of one, as that API (and huggingface_hub's InferenceClient) expects")

    @model_validator(mode="after")
    def _unicode(self) -> PredictRequest:
        _check_unicode("inputs", self.inputs)
        return self

    def sequences(self, pair_model: bool) -> tuple[list[str], list[str] | None, bool]:
        """(texts, pairs or None, single). As TEI: a string is one text, ["a", "b"] one pair on a pair model,
        [["a"], ["b"]] a batch of texts, [["a", "b"], ...] a batch of pairs. Unlike TEI, a list of strings is a
        batch of texts on a single-text model (TEI reads ["a"] as one text and ["a", "b"] as a pair)."""
        inputs = self.inputs
        if isinstance(inputs, str):
            if pair_model:
                raise _fail('this model classifies sentence pairs: send ["premise", "hypothesis"] or a list of them')
            return [inputs], None, True
        if not inputs:
            raise _fail("`inputs` cannot be empty")
        if all(isinstance(x, str) for x in inputs):
            if not pair_model:
                return list(inputs), None, False
            if len(inputs) == 2:
                return [inputs[0]], [inputs[1]], True
            raise _fail('this model classifies sentence pairs: send [["premise", "hypothesis"], ...]')
        if not all(isinstance(x, list) for x in inputs):
            raise _fail("`inputs` mixes texts and lists; send a list of strings or a list of lists")
        return _sequences_batch(inputs, pair_model)


def _sequences_batch(inputs: list, pair_model: bool) -> tuple[list[str], list[str] | None, bool]:
    """TEI's batch form: [["a"], ["b"]] on a single-text model, [["a", "b"], ...] on a pair model."""
    want = 2 if pair_model else 1
    bad = next((i for i, x in enumerate(inputs) if len(x) != want), None)
    if bad is not None and not pair_model:
        if len(inputs[bad]) == 2:
            raise _fail(f"inputs[{bad}] is a pair, but this model classifies single texts: send a string, "
                        "[[text], ...] or a list of strings")
        raise _fail(f"inputs[{bad}] has {len(inputs[bad])} texts; an input of this model is [text]")
    if bad is not None:
        raise _fail(f"inputs[{bad}] has {len(inputs[bad])} texts; a pair is [text, text_pair]")
    if pair_model:
        return [x[0] for x in inputs], [x[1] for x in inputs], False
    return [x[0] for x in inputs], None, False


class LabelScore(BaseModel):
    label: str
    score: float


# --- /v1/classify ---------------------------------------------------------------------------------------


class ClassifyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")

    texts: list[StrictStr] | None = Field(None, description="single texts (single-text models)")
    pairs: list[tuple[StrictStr, StrictStr]] | None = Field(None, description="[text, text_pair] (pair models)")
    truncate: StrictBool = Field(True, description="cut inputs to the model's max length; false: too long is a 422")
    raw_scores: StrictBool = Field(False, description="logits instead of probabilities in score/scores")

    @model_validator(mode="after")
    def _one_of(self) -> ClassifyRequest:
        if (self.texts is None) == (self.pairs is None):
            raise ValueError("send exactly one of 'texts' and 'pairs'")
        _check_unicode("texts", self.texts)
        _check_unicode("pairs", self.pairs)
        return self

    def sequences(self, pair_model: bool) -> tuple[list[str], list[str] | None]:
        if self.pairs is not None:
            if not pair_model:
                raise _fail("this model classifies single texts: send 'texts', not 'pairs'")
            texts, pairs = [p[0] for p in self.pairs], [p[1] for p in self.pairs]
        else:
            if pair_model:
                raise _fail("this model classifies sentence pairs: send 'pairs' as [[text, text_pair], ...]")
            texts, pairs = list(self.texts or []), None
        if not texts:
            raise _fail("no inputs: the list is empty")
        return texts, pairs


class Classification(BaseModel):
    label: str
    score: float
    scores: dict[str, float]


class ClassifyResponse(BaseModel):
    model: str
    depth: int = Field(description="encoder layers kept, of total_layers")
    total_layers: int
    results: list[Classification]


class ModelList(BaseModel):
    object: Literal["list"]
    data: list[dict[str, Any]]
    warning: str | None = None


# --- /info ------------------------------------------------------------------------------------------------


class ClassifierModel(BaseModel):
    id2label: dict[str, str]
    label2id: dict[str, int]


class ModelType(BaseModel):
    classifier: ClassifierModel


class Info(BaseModel):
    """TEI's /info (router/src/lib.rs `Info`), then what layerprune adds."""

    model_id: str = Field(examples=["minilm-rt"])
    model_sha: str | None = Field(description="sha256 of the served model.onnx (TEI: the hub revision)")
    model_dtype: str = Field(examples=["int8", "float32"])
    served_model_name: str
    model_type: ModelType
    max_concurrent_requests: int
    max_input_length: int
    max_batch_tokens: int
    max_batch_requests: int | None
    max_client_batch_size: int
    auto_truncate: bool
    tokenization_workers: int
    version: str
    sha: str | None = None
    docker_label: str | None = None
    # layerprune
    pair_input: bool
    depth: int = Field(description="encoder layers kept, of total_layers")
    total_layers: int
    fallback: FallbackRule | None = Field(description="texts the pruned model is least sure of go to the original "
                                                      "model: the share of calibration texts and the threshold")
    validated: bool
    providers: list[str] = Field(description="onnxruntime execution providers, the one that runs first")
    max_chars_per_input: int
    run_overhead_tokens: float = Field(description="a run's fixed cost in padded tokens, for length-aware runs")

    @classmethod
    def describe(cls, model: ServedModel, settings: ServeSettings, providers: list[str], overhead: float) -> Info:
        labels, m = model.labels, model.manifest
        return cls(
            model_id=model.source_name, model_sha=m.files.get(m.parts.model), model_dtype=m.quantize or "float32",
            served_model_name=model.model_id,
            model_type=ModelType(classifier=ClassifierModel(id2label={str(i): x for i, x in enumerate(labels)},
                                                            label2id={x: i for i, x in enumerate(labels)})),
            max_concurrent_requests=settings.max_connections, max_input_length=model.classifier.max_length,
            max_batch_tokens=settings.max_batch_tokens, max_batch_requests=settings.max_batch_size,
            max_client_batch_size=settings.max_inputs_per_request, auto_truncate=settings.auto_truncate,
            tokenization_workers=1, version=version(), pair_input=model.pair_input, depth=m.depth,
            total_layers=m.total_layers, fallback=m.fallback, validated=model.validated, providers=providers,
            max_chars_per_input=settings.max_chars_per_input, run_overhead_tokens=round(overhead, 1),
        )


def version() -> str:
    """layerprune's installed version (TEI's /info `version`)."""
    try:
        from importlib.metadata import version as dist_version

        return dist_version("layerprune")
    except Exception:  # noqa: BLE001 - not installed: a source checkout
        return "0"
