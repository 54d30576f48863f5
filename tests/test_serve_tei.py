"""text-embeddings-inference compatibility: TEI's own client (huggingface_hub's InferenceClient) against a real
uvicorn server, TEI's routes (POST /, GET /info, /health), batch form, status codes, error bodies and headers.
Scores are checked against transformers' text-classification pipeline on the same ONNX file (conftest.Reference).
The bundle, `client` and `server` are conftest's."""

from __future__ import annotations

import hashlib
import json

import onnxruntime as ort
import pytest

from conftest import TEXTS, make_client, serving

TIMING_HEADERS = ["x-compute-time", "x-tokenization-time", "x-queue-time", "x-inference-time", "x-total-time"]


def _approx(ranked: list[tuple[str, float]], abs: float = 1e-5) -> list:
    return [(label, pytest.approx(score, abs=abs)) for label, score in ranked]


@pytest.fixture
def hub(monkeypatch):
    """huggingface_hub allowed to reach this loopback server (the suite runs with HF_HUB_OFFLINE=1, which makes
    its HTTP session refuse every URL, a local one included); the hub itself stays unreachable."""
    import huggingface_hub as hub  # the test extra: missing, the test fails
    from huggingface_hub import constants
    from huggingface_hub.utils import reset_sessions

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    reset_sessions()
    yield hub
    monkeypatch.undo()
    reset_sessions()


# --- TEI's client against the real server -------------------------------------------------------------------


def test_inference_client_text_classification(hub, server, reference) -> None:
    tei = hub.InferenceClient(model=server, timeout=30)
    for text in TEXTS[:6]:
        want = reference.ranked(text)
        every = tei.text_classification(text)
        assert [(e.label, e.score) for e in every] == _approx(want)
        (top,) = tei.text_classification(text, top_k=1)
        assert [(top.label, top.score)] == _approx(want[:1])
    for text in TEXTS[:2]:
        raw = tei.text_classification(text, function_to_apply="none")
        assert [(e.label, e.score) for e in raw] == _approx(reference.ranked(text, function_to_apply="none"), 1e-4)


def test_inference_client_errors_are_tei_errors(hub, server) -> None:
    tei = hub.InferenceClient(model=server, timeout=30)
    with pytest.raises(hub.errors.HfHubHTTPError) as exc:
        tei.text_classification("")
    assert exc.value.response.status_code == 400
    assert exc.value.response.json()["error_type"] == "Empty"


def test_real_server_speaks_tei(server, reference) -> None:
    import httpx

    with httpx.Client(base_url=server, timeout=30) as http:
        assert http.get("/health").status_code == 200 and http.get("/").status_code == 200
        info = http.get("/info").json()
        assert info["model_type"]["classifier"]["id2label"] == {str(i): x for i, x in enumerate(reference.labels)}
        r = http.post("/", json={"inputs": [[t] for t in TEXTS[:6]]})
        assert r.status_code == 200
        assert all(h in r.headers and r.headers[h].isdigit() for h in TIMING_HEADERS), dict(r.headers)
        got = [[(d["label"], d["score"]) for d in row] for row in r.json()]
        assert got == [_approx(reference.ranked(text)) for text in TEXTS[:6]]


# --- routes (TestClient) --------------------------------------------------------------------------------------


def test_post_root_is_predict(client) -> None:
    for body in [{"inputs": TEXTS[0]}, {"inputs": [[TEXTS[0]], [TEXTS[1]]]}, {"inputs": TEXTS[:3], "raw_scores": True}]:
        assert client.post("/", json=body).json() == client.post("/predict", json=body).json()


def test_batch_forms(client) -> None:
    one = client.post("/predict", json={"inputs": TEXTS[0]}).json()
    assert isinstance(one[0], dict)  # a single input: one list of labels, as TEI
    tei_batch = client.post("/predict", json={"inputs": [[t] for t in TEXTS[:3]]}).json()
    strings = client.post("/predict", json={"inputs": TEXTS[:3]}).json()  # layerprune's batch of strings
    assert tei_batch == strings and len(tei_batch) == 3 and tei_batch[0] == one
    assert client.post("/predict", json={"inputs": [TEXTS[0]]}).json() == [one]
    top = client.post("/predict", json={"inputs": TEXTS[0], "parameters": {"top_k": 1}}).json()
    assert top == [one[:1]]  # with parameters: the Inference API's form, a batch of one


def _real_providers(client) -> list[str]:
    """The providers of the onnxruntime session that runs the requests (on a GPU host, CUDA first)."""
    return list(client.app.state.model.classifier.session.get_providers())


def test_info(client, bundle) -> None:
    info = client.get("/info").json()
    settings = client.app.state.settings
    manifest = json.loads((bundle / "manifest.json").read_text())
    tei_fields = {"model_id", "model_sha", "model_dtype", "served_model_name", "model_type", "max_concurrent_requests",
                  "max_input_length", "max_batch_tokens", "max_batch_requests", "max_client_batch_size",
                  "auto_truncate", "tokenization_workers", "version", "sha", "docker_label"}
    assert tei_fields <= set(info)
    assert info["model_type"] == {"classifier": {"id2label": {"0": "negative", "1": "positive"},
                                                 "label2id": {"negative": 0, "positive": 1}}}
    assert info["max_input_length"] == manifest["max_length"] == 160  # the tiny model's positions
    assert info["max_client_batch_size"] == settings.max_inputs_per_request == 64
    assert info["model_sha"] == hashlib.sha256((bundle / "model.onnx").read_bytes()).hexdigest()
    providers = _real_providers(client)
    assert info["providers"] == providers and providers[-1] == "CPUExecutionProvider"
    assert set(providers) <= set(ort.get_available_providers())
    assert info["validated"] is True
    assert (info["depth"], info["pair_input"]) == (2, False)
    assert info["model_id"] == "model"  # the checkpoint's folder name, never a local path


def test_health_before_and_after_warm_up(bundle, client) -> None:
    cold = make_client(bundle)  # no lifespan: never warmed up
    r = cold.get("/health")
    assert r.status_code == 503 and r.json() == {"error": "unhealthy", "error_type": "Unhealthy"}
    r = cold.post("/", json={"inputs": "hi"})
    assert r.status_code == 503 and r.json()["error_type"] == "Unhealthy"
    assert client.get("/health").status_code == 200


def test_timing_headers(client, reference) -> None:
    r = client.post("/predict", json={"inputs": TEXTS[:4]})
    h = r.headers
    assert all(h[name].isdigit() for name in TIMING_HEADERS)
    assert int(h["x-total-time"]) >= int(h["x-inference-time"])
    expected_type = "gpu" if _real_providers(client)[0] == "CUDAExecutionProvider" else "cpu"
    assert h["x-compute-type"] == expected_type and int(h["x-compute-characters"]) == sum(map(len, TEXTS[:4]))
    # real tokens, special tokens included, no padding: what transformers' tokenizer makes of them
    assert int(h["x-compute-tokens"]) == sum(len(ids) for ids in reference.tokenizer(TEXTS[:4])["input_ids"])


@pytest.mark.parametrize("body, status, error_type", [
    ({"inputs": ""}, 400, "Empty"),
    ({"inputs": []}, 422, "Validation"),
    ({"inputs": ["x"] * 65}, 422, "Validation"),
    ({"inputs": " ".join(["wonderful"] * 400), "truncate": False}, 422, "Validation"),
    ({"inputs": 5}, 422, "Validation"),
])
def test_tei_status_and_error_body(client, body, status, error_type) -> None:
    r = client.post("/", json=body)
    assert r.status_code == status, r.text
    assert r.json()["error_type"] == error_type and r.json()["error"]


def test_backend_failure_is_424(bundle, monkeypatch) -> None:
    with serving(bundle) as c:

        def broken(encoding):
            raise RuntimeError("onnxruntime exploded")

        monkeypatch.setattr(c.app.state.model.classifier, "run", broken)
        r = c.post("/predict", json={"inputs": "a"})
        assert r.status_code == 424 and r.json()["error_type"] == "Backend", r.text


def test_openapi_lists_every_status_with_an_example(client) -> None:
    paths = client.get("/openapi.json").json()["paths"]
    for path, method, codes in [("/", "post", {"200", "400", "413", "422", "424", "429", "503"}),
                                ("/predict", "post", {"200", "400", "413", "422", "424", "429", "503"}),
                                ("/v1/classify", "post", {"200", "400", "413", "422", "424", "429", "503"}),
                                ("/info", "get", {"200"}), ("/health", "get", {"200", "503"})]:
        responses = paths[path][method]["responses"]
        assert codes <= set(responses), (path, set(responses))
        for code in codes - {"200"}:
            example = responses[code]["content"]["application/json"]["example"]
            assert {"error", "error_type"} == set(example), (path, code)
