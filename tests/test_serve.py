"""The bundled HTTP server (serve/): gate, routes, batching, limits; a real uvicorn process on loopback
(parity with offline onnxruntime, concurrent load, fuzz, tampered bundles); Triton repository; Dockerfile."""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient

from conftest import SENTENCES, TINY_LAYERS, ServerProcess, free_port, make_tiny_classifier
from layerprune.analyze import AnalyzeOptions, analyze
from layerprune.export import ExportOptions, export_bundle
from layerprune.bundle import BundleError, sha256_file
from layerprune.data import task_from_files
from layerprune.errors import LayerpruneError
from layerprune.runtime import OnnxClassifier
from serve.app import create_app
from serve.main import main as serve_main
from serve.model import load_model
from serve.settings import ServeSettings, load_settings

ROOT = Path(__file__).resolve().parents[1]
FAST = dict(device="cpu", batch_size=8)
TEXTS = [t for t, _ in SENTENCES] + [f"honestly, {t}" for t, _ in SENTENCES]
LONG = " ".join(["wonderful"] * 400)  # > the tiny models' 160 positions


# --- bundles -----------------------------------------------------------------------------------------


def _bundle(root: Path, minilm_dir: Path, pair: bool) -> Path:
    model = make_tiny_classifier("bert", root / "model", minilm_dir)
    data = root / "data.csv"
    if pair:
        rows = [(t, f"so {t}", lab) for t, lab in SENTENCES] * 2
        data.write_text("text,text2,label\n" + "\n".join(f'"{a}","{b}",{c}' for a, b, c in rows) + "\n")
        task = task_from_files(data, "text", "label", text_pair_field="text2", train_file=data)
    else:
        rows = [(t, lab) for t, lab in SENTENCES] + [(f"honestly, {t}", lab) for t, lab in SENTENCES]
        data.write_text("text,label\n" + "\n".join(f'"{t}",{lab}' for t, lab in rows) + "\n")
        task = task_from_files(data, "text", "label", train_file=data)
    analyze(str(model), task, root / "run", AnalyzeOptions(**FAST))
    # tolerance 1.0: a random tiny model always passes, so the gate lets it through
    export_bundle(root / "run", root / "bundle", ExportOptions(keep_layers=2, heal="none", tolerance=1.0, **FAST))
    return root / "bundle"


@pytest.fixture(scope="module")
def bundle(minilm_dir, tmp_path_factory) -> Path:
    return _bundle(tmp_path_factory.mktemp("serve-single"), minilm_dir, pair=False)


@pytest.fixture(scope="module")
def pair_bundle(minilm_dir, tmp_path_factory) -> Path:
    return _bundle(tmp_path_factory.mktemp("serve-pair"), minilm_dir, pair=True)


def _failed_validation_copy(bundle: Path, out: Path) -> Path:
    """A bundle, consistently re-hashed, whose validation did not pass."""
    shutil.copytree(bundle, out)
    validation = json.loads((out / "validation.json").read_text())
    validation["passed"] = False
    (out / "validation.json").write_text(json.dumps(validation))
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"]["validation.json"] = sha256_file(out / "validation.json")
    manifest["servable"] = False
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


@pytest.fixture(scope="module")
def failed_bundle(bundle, tmp_path_factory) -> Path:
    return _failed_validation_copy(bundle, tmp_path_factory.mktemp("failed") / "bundle")


def _tampered_copy(bundle: Path, out: Path) -> Path:
    """A copy of `bundle` whose model.onnx gained one byte after export: its hash no longer matches."""
    shutil.copytree(bundle, out)
    with open(out / "model.onnx", "ab") as f:
        f.write(b"\0")
    return out


@pytest.fixture(scope="module")
def tampered_bundle(bundle, tmp_path_factory) -> Path:
    return _tampered_copy(bundle, tmp_path_factory.mktemp("tampered") / "bundle")


@pytest.fixture(scope="module")
def offline(bundle) -> OnnxClassifier:
    clf = OnnxClassifier(bundle)
    clf.id2label = dict(enumerate(load_model(bundle).labels))  # the names the server answers with
    return clf


def _client(bundle: Path, **overrides) -> TestClient:
    settings = ServeSettings(**{"max_wait_ms": 1.0, **overrides})
    model = load_model(bundle, allow_unvalidated=settings.allow_unvalidated, threads=settings.threads)
    return TestClient(create_app(model, settings))


def _wait_ready(client: TestClient, tries: int = 3000) -> None:
    """Polls /readyz a bounded number of times (not a clock: a busy machine is slow, not wrong)."""
    for _ in range(tries):
        if client.get("/readyz").status_code == 200:
            return
        time.sleep(0.01)
    raise AssertionError(f"not ready after {tries} tries")


@contextmanager
def _serving(bundle: Path, **overrides) -> Iterator[TestClient]:
    """A client of the app serving `bundle`, started (lifespan run) and ready."""
    with _client(bundle, **overrides) as c:
        _wait_ready(c)
        yield c


@pytest.fixture(scope="module")
def client(bundle):
    with _serving(bundle) as c:
        yield c


@pytest.fixture(scope="module")
def pair_client(pair_bundle):
    with _serving(pair_bundle) as c:
        yield c


# --- torch-free ---------------------------------------------------------------------------------------


def test_serve_imports_no_torch() -> None:
    code = ("import sys, serve.app, serve.main, serve.model, serve.batcher, serve.triton, serve.settings; "
            "bad = [m for m in ('torch', 'transformers', 'datasets', 'layerprune.export', 'layerprune.onnx_export', "
            "'layerprune.analyze', 'layerprune.finetune', 'layerprune.data') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


# --- gate -----------------------------------------------------------------------------------------------


def test_gate_refuses_bad_bundles(tampered_bundle, failed_bundle, bundle, tmp_path) -> None:
    with pytest.raises(BundleError, match="model.onnx does not match"):
        load_model(tampered_bundle)
    with pytest.raises(BundleError, match="failed validation"):
        load_model(failed_bundle)
    missing = tmp_path / "missing"
    shutil.copytree(bundle, missing)
    (missing / "tokenizer.json").unlink()
    with pytest.raises(BundleError, match="tokenizer.json is missing"):
        load_model(missing)
    with pytest.raises(LayerpruneError, match="not a directory"):
        load_model(tmp_path / "nowhere")
    assert not load_model(failed_bundle, allow_unvalidated=True).validated


def test_main_prints_one_line_and_fails(failed_bundle, capsys) -> None:
    assert serve_main([str(failed_bundle), "--port", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("layerprune serve: error:") and "failed validation" in err[0]
    assert serve_main([str(failed_bundle), "--max-batch-size", "0"]) == 2
    assert "max_batch_size" in capsys.readouterr().err


# --- settings -------------------------------------------------------------------------------------------


def test_settings_precedence(tmp_path, monkeypatch) -> None:
    config = tmp_path / "serve.yaml"
    config.write_text("port: 9001\nmax_batch_size: 7\nmax_wait_ms: 3\n")
    monkeypatch.setenv("LAYERPRUNE_SERVE_MAX_BATCH_SIZE", "9")
    s = load_settings(config, max_wait_ms=4.0)
    assert (s.port, s.max_batch_size, s.max_wait_ms, s.host) == (9001, 9, 4.0, "127.0.0.1")
    config.write_text("nonsense: 1\n")
    with pytest.raises(LayerpruneError, match="nonsense"):
        load_settings(config)
    with pytest.raises(LayerpruneError, match="not found"):
        load_settings(tmp_path / "absent.yaml")
    shipped = load_settings(ROOT / "configs" / "serve.yaml")
    assert shipped.host == "127.0.0.1" and not shipped.allow_unvalidated


# --- routes (TestClient) --------------------------------------------------------------------------------


def test_not_ready_before_warm_up(bundle) -> None:
    c = _client(bundle)  # no lifespan: nothing warmed up
    assert c.get("/healthz").json() == {"status": "ok"}
    assert c.get("/readyz").status_code == 503
    r = c.post("/predict", json={"inputs": "hello"})
    assert r.status_code == 503 and r.json()["error_type"] == "Unhealthy"


def test_ops_routes(client) -> None:
    assert client.get("/healthz").status_code == 200
    assert client.get("/readyz").json() == {"status": "ready"}
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/predict", "/v1/classify", "/v1/models", "/healthz", "/readyz", "/metrics"} <= set(paths)


def test_predict_tei_shapes(client, offline) -> None:
    one = client.post("/predict", json={"inputs": TEXTS[0]}).json()
    assert [set(d) for d in one] == [{"label", "score"}] * 2
    assert one[0]["score"] >= one[1]["score"] and sum(d["score"] for d in one) == pytest.approx(1.0)
    batch = client.post("/predict", json={"inputs": TEXTS[:5]}).json()
    assert len(batch) == 5 and all(len(row) == 2 for row in batch)
    assert batch[0] == one
    raw = client.post("/predict", json={"inputs": TEXTS, "raw_scores": True}).json()
    expected = offline.logits(TEXTS)
    labels = offline.id2label
    for row, want in zip(raw, expected):
        got = {d["label"]: d["score"] for d in row}
        np.testing.assert_allclose([got[labels[i]] for i in range(len(labels))], want, atol=1e-4)


def test_classify_route(client, offline, bundle) -> None:
    r = client.post("/v1/classify", json={"texts": TEXTS, "raw_scores": True}).json()
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert (r["depth"], r["total_layers"]) == (2, TINY_LAYERS) == (manifest["depth"], manifest["total_layers"])
    assert r["model"] == "model"
    expected = offline.logits(TEXTS)
    for res, want in zip(r["results"], expected):
        scores = [res["scores"][offline.id2label[i]] for i in range(len(want))]
        np.testing.assert_allclose(scores, want, atol=1e-4)
        assert res["label"] == offline.id2label[int(np.argmax(want))] and res["score"] == max(scores)
    probs = client.post("/v1/classify", json={"texts": TEXTS[:2]}).json()["results"]
    assert all(sum(p["scores"].values()) == pytest.approx(1.0) for p in probs)


def test_truncation(client, offline) -> None:
    r = client.post("/predict", json={"inputs": LONG, "raw_scores": True})
    assert r.status_code == 200
    want = offline.logits([LONG])[0]
    got = {d["label"]: d["score"] for d in r.json()}
    np.testing.assert_allclose([got[offline.id2label[i]] for i in range(len(want))], want, atol=1e-4)
    for body, route in [({"inputs": LONG, "truncate": False}, "/predict"),
                        ({"texts": ["short", LONG], "truncate": False}, "/v1/classify")]:
        r = client.post(route, json=body)
        assert r.status_code == 422 and "tokens" in r.json()["error"], r.text
    assert client.post("/predict", json={"inputs": "short", "truncate": False}).status_code == 200


def test_models_route(client, failed_bundle, caplog) -> None:
    info = client.get("/v1/models").json()
    model = info["data"][0]
    assert model["validated"] and model["warning"] is None and "warning" not in info
    assert model["validation"]["passed"] and (model["depth"], model["total_layers"]) == (2, TINY_LAYERS)
    assert model["task"] and model["source_checkpoint"] and model["pair_input"] is False
    with caplog.at_level("WARNING", logger="layerprune.serve"), _serving(failed_bundle, allow_unvalidated=True) as c:
        for _ in range(2):
            body = c.get("/v1/models").json()
            assert body["data"][0]["validated"] is False and "allow-unvalidated" in body["data"][0]["warning"]
            assert "allow-unvalidated" in body["warning"]
    assert "UNVALIDATED" in caplog.text


@pytest.mark.parametrize(
    "route, body, status, words",
    [
        ("/predict", {"inputs": []}, 422, "empty"),
        ("/predict", {"inputs": ["x"] * 65}, 422, "batch size"),
        ("/predict", {"inputs": "x" * 10_001}, 422, "characters"),
        ("/predict", {"inputs": ""}, 400, "empty"),
        ("/predict", {"inputs": [["a"], ["b", "c"]]}, 422, "inputs[1]"),
        ("/predict", {"inputs": "a", "parameters": {"top_k": 0}}, 422, "top_k"),
        ("/predict", {"inputs": "a", "parameters": {"function_to_apply": "tanh"}}, 422, "function_to_apply"),
        ("/", {"inputs": []}, 422, "empty"),
        ("/predict", {"inputs": 5}, 422, "inputs"),
        ("/predict", {"inputs": [1, 2]}, 422, "inputs"),
        ("/predict", {"inputs": [["a", "b"]]}, 422, "single texts"),
        ("/predict", {"inputs": ["a", ["b", "c"]]}, 422, "mixes"),
        ("/predict", {"inputs": [[["a"]]]}, 422, "inputs"),
        ("/predict", {"inputs": "a", "truncate": "no"}, 422, "truncate"),
        ("/predict", {"inputs": "a", "truncation_direction": "left"}, 422, "truncation_direction"),
        ("/predict", {}, 422, "inputs"),
        ("/predict", [1, 2], 422, "body"),
        ("/v1/classify", {"texts": []}, 422, "empty"),
        ("/v1/classify", {"pairs": [["a", "b"]]}, 422, "single texts"),
        ("/v1/classify", {"texts": ["a"], "pairs": [["a", "b"]]}, 422, "exactly one"),
        ("/v1/classify", {}, 422, "exactly one"),
        ("/v1/classify", {"texts": "a"}, 422, "texts"),
        ("/v1/classify", {"texts": [None]}, 422, "texts"),
        ("/v1/classify", {"texts": ["a"], "extra": 1}, 422, "extra"),
        ("/v1/classify", {"texts": ["a"] * 65}, 422, "batch size"),
        ("/v1/classify", {"texts": ["a", ""]}, 400, "empty"),
    ],
)
def test_bad_input(client, route, body, status, words) -> None:
    r = client.post(route, json=body)
    assert r.status_code == status, r.text
    assert words in r.json()["error"], r.json()["error"]


def test_malformed_and_oversized_bodies(client) -> None:
    for raw in [b'{"inputs": ["a"', b"", b"\xff\xfe", b"null", b'"text"', b"[[[[[[[[[[]]]]]]]]]]"]:
        r = client.post("/predict", content=raw, headers={"content-type": "application/json"})
        assert r.status_code == 422, (raw, r.text)
        assert r.json()["error"]
    # Only JSON: a web page's "simple" cross-origin POST (text/plain, form) is refused before parsing.
    for content_type in ["text/plain", "application/x-www-form-urlencoded", "multipart/form-data; boundary=x",
                         "application/xml", None]:
        headers = {"content-type": content_type} if content_type else {}
        r = client.post("/predict", content=b'{"inputs": "not sent as JSON"}', headers=headers)
        assert r.status_code == 415 and "application/json" in r.json()["error"], (content_type, r.text)
    r = client.post("/predict", content=b'{"inputs": "fine"}', headers={"content-type": "application/json; charset=utf-8"})
    assert r.status_code == 200
    r = client.post("/predict", content=b"x" * (client.app.state.settings.max_body_bytes + 1),
                    headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]
    assert client.get("/predict").status_code == 405
    assert client.get("/nowhere").status_code == 404


def test_overloaded_queue(bundle) -> None:
    with _serving(bundle, max_queue=2) as c:
        r = c.post("/predict", json={"inputs": ["a", "b", "c"]})
        assert r.status_code == 429 and r.json()["error_type"] == "Overloaded"
        assert c.post("/predict", json={"inputs": ["a", "b"]}).status_code == 200


def test_metrics(client) -> None:
    client.post("/predict", json={"inputs": ["a", "b", "c"]})
    client.post("/predict", json={"inputs": []})
    text = client.get("/metrics").text
    assert 'layerprune_requests_total{method="POST",route="/predict",status="200"}' in text
    assert 'layerprune_requests_total{method="POST",route="/predict",status="422"}' in text
    assert "layerprune_request_seconds_bucket" in text and "layerprune_batch_size_bucket" in text
    assert "layerprune_queue_depth" in text


def test_micro_batches_group_requests(bundle) -> None:
    with _serving(bundle, max_wait_ms=50.0, max_batch_size=8) as c:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda t: c.post("/predict", json={"inputs": t}).status_code, TEXTS[:16]))
        assert results == [200] * 16
        text = c.get("/metrics").text
        count = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("layerprune_batch_size_count")))
        assert count < 17  # 16 requests + warm-up in fewer runs than requests


def test_pair_model(pair_client, pair_bundle) -> None:
    offline = OnnxClassifier(pair_bundle)
    offline.id2label = dict(enumerate(load_model(pair_bundle).labels))
    a, b = [t for t, _ in SENTENCES[:4]], [f"so {t}" for t, _ in SENTENCES[:4]]
    want = offline.logits(a, b)
    batch = pair_client.post("/predict", json={"inputs": [list(p) for p in zip(a, b)], "raw_scores": True}).json()
    one = pair_client.post("/predict", json={"inputs": [a[0], b[0]], "raw_scores": True}).json()
    assert one == batch[0]
    for row, w in zip(batch, want):
        got = {d["label"]: d["score"] for d in row}
        np.testing.assert_allclose([got[offline.id2label[i]] for i in range(len(w))], w, atol=1e-4)
    r = pair_client.post("/v1/classify", json={"pairs": [list(p) for p in zip(a, b)], "raw_scores": True}).json()
    np.testing.assert_allclose([[x["scores"][offline.id2label[i]] for i in range(2)] for x in r["results"]], want, atol=1e-4)
    assert pair_client.get("/v1/models").json()["data"][0]["pair_input"] is True
    for route, body, words in [("/predict", {"inputs": "one text"}, "pairs"),
                               ("/predict", {"inputs": ["a", "b", "c"]}, "pairs"),
                               ("/predict", {"inputs": [["a", "b", "c"]]}, "a pair is"),
                               ("/v1/classify", {"texts": ["a"]}, "pairs"),
                               ("/v1/classify", {"pairs": [["a"]]}, "pairs")]:
        r = pair_client.post(route, json=body)
        assert r.status_code == 422 and words in r.json()["error"], r.text


# --- a real server on loopback ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server(bundle):
    srv = ServerProcess(bundle, "--max-wait-ms", "2")
    try:
        yield srv.wait_ready().url
    finally:
        srv.stop()
    srv.assert_no_traceback()  # after every test on it, fuzz included: nothing it was sent crashed a handler


def test_server_parity_with_offline(server, offline) -> None:
    want = offline.logits(TEXTS)
    with httpx.Client(base_url=server, timeout=30) as http:
        batch = http.post("/predict", json={"inputs": TEXTS, "raw_scores": True}).json()
        singles = [http.post("/v1/classify", json={"texts": [t], "raw_scores": True}).json() for t in TEXTS[:6]]
    labels = [offline.id2label[i] for i in range(offline.num_labels)]
    got = np.array([[{d["label"]: d["score"] for d in row}[name] for name in labels] for row in batch])
    np.testing.assert_allclose(got, want, atol=1e-4)
    got1 = np.array([[s["results"][0]["scores"][name] for name in labels] for s in singles])
    np.testing.assert_allclose(got1, want[:6], atol=1e-4)


def test_server_concurrent_load(server, offline) -> None:
    want = {t: row for t, row in zip(TEXTS, offline.logits(TEXTS))}
    labels = [offline.id2label[i] for i in range(offline.num_labels)]
    threads, per_thread = 8, 40  # bounded by count; httpx's timeout bounds a stuck request
    errors: list[str] = []

    def client(seed: int) -> int:
        rng, done = random.Random(seed), 0
        with httpx.Client(base_url=server, timeout=60) as http:
            for _ in range(per_thread):
                texts = rng.sample(TEXTS, rng.randint(1, 4))
                r = http.post("/predict", json={"inputs": texts, "raw_scores": True})
                if r.status_code != 200:
                    errors.append(f"{r.status_code} {r.text}")
                    continue
                for t, row in zip(texts, r.json()):
                    got = {d["label"]: d["score"] for d in row}
                    if not np.allclose([got[n] for n in labels], want[t], atol=1e-4):
                        errors.append(f"wrong logits for {t!r}")
                done += 1
        return done

    with ThreadPoolExecutor(threads) as pool:
        done = sum(pool.map(client, range(threads)))
    assert not errors, errors[:5]
    assert done == threads * per_thread, f"{done} of {threads * per_thread} requests answered 200"
    metrics = httpx.get(f"{server}/metrics").text
    assert 'route="/predict",status="200"' in metrics


def _random_json(rng: random.Random, depth: int = 0):
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 2**70, 3.5, float("1e308")])
    if kind == 3:
        return "".join(rng.choice("ab \u00e9\u4e2d\U0001f600\x00\n\"\\") for _ in range(rng.choice([0, 1, 5, 300])))
    if kind == 4:
        return "word " * rng.choice([1, 50, 3000])
    if kind == 5:
        return rng.choice(["", "x" * 10_001])
    if kind == 6:
        return [_random_json(rng, depth + 1) for _ in range(rng.choice([0, 1, 2, 3, 70]))]
    if kind == 7:
        keys = ["inputs", "texts", "pairs", "truncate", "raw_scores", "truncation_direction", "junk"]
        return {rng.choice(keys): _random_json(rng, depth + 1) for _ in range(rng.randint(0, 4))}
    return [[_random_json(rng, depth + 1), _random_json(rng, depth + 1)]]


def _fuzz_body(rng: random.Random) -> tuple[str, bytes]:
    route = rng.choice(["/predict", "/v1/classify"])
    roll = rng.random()
    if roll < 0.15:  # broken JSON
        text = json.dumps({"inputs": ["a", "b"], "texts": ["c"]})
        cut = rng.randrange(len(text))
        return route, (text[:cut] + rng.choice(["", "}", "]", "\x00", "\ud800"])).encode("utf-8", "surrogatepass")
    if roll < 0.6:  # plausible keys, wrong values
        key = "inputs" if route == "/predict" else rng.choice(["texts", "pairs"])
        body = {key: _random_json(rng)}
        if rng.random() < 0.3:
            body[rng.choice(["truncate", "raw_scores"])] = _random_json(rng)
        if rng.random() < 0.3:  # bad options on otherwise good input
            body = {key: ["fine"] if key != "pairs" else [["a", "b"]], "truncate": rng.choice(["yes", 1, None, []])}
    else:
        body = _random_json(rng)
    return route, json.dumps(body, allow_nan=True).encode()


def test_server_fuzz_gives_only_4xx(server) -> None:
    rng = random.Random(2014)
    statuses: dict[int, int] = {}
    with httpx.Client(base_url=server, timeout=60) as http:  # 300 requests, each bounded by the timeout
        for _ in range(300):
            route, body = _fuzz_body(rng)
            r = http.post(route, content=body, headers={"content-type": "application/json"})
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            assert r.status_code < 500, (route, body[:300], r.text)
            if r.status_code >= 400:
                assert r.json()["error"], r.text
        assert http.get("/readyz").status_code == 200
    assert sum(n for s, n in statuses.items() if 400 <= s < 500) > 200, statuses


@pytest.mark.parametrize("which", ["tampered", "failed"])
def test_server_refuses_bad_bundle(which, tampered_bundle, failed_bundle) -> None:
    bad = tampered_bundle if which == "tampered" else failed_bundle
    done = subprocess.run([sys.executable, "-m", "serve", str(bad), "--port", str(free_port())], cwd=ROOT,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert ("does not match its manifest hash" if which == "tampered" else "failed validation") in lines[0]


# --- Triton model repository -----------------------------------------------------------------------------


def test_triton_repository(bundle, failed_bundle, tmp_path) -> None:
    model_config_pb2 = pytest.importorskip("tritonclient.grpc.model_config_pb2", reason="install tritonclient[grpc]")
    from google.protobuf import text_format

    from serve.triton import write_triton_repository

    model_dir = write_triton_repository(bundle, tmp_path / "repo", "lp-model", 16, max_queue_delay_us=2000)
    assert model_dir == tmp_path / "repo" / "lp-model"
    # Triton's own schema: unknown fields or wrong types make Parse raise
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.platform, config.max_batch_size) == ("lp-model", "onnxruntime_onnx", 16)
    session = OnnxClassifier(bundle).session
    graph_inputs = [i.name for i in session.get_inputs()]
    assert [i.name for i in config.input] == graph_inputs
    for i in config.input:
        assert i.data_type == model_config_pb2.TYPE_INT64 and list(i.dims) == [-1]
    (out,) = config.output
    assert out.name == session.get_outputs()[0].name == "logits"
    assert out.data_type == model_config_pb2.TYPE_FP32 and list(out.dims) == [2]
    assert out.label_filename == "labels.txt"
    labels = (model_dir / "labels.txt").read_text().splitlines()
    assert labels == load_model(bundle).labels == ["negative", "positive"]
    assert list(config.dynamic_batching.preferred_batch_size) == [4, 8, 16]
    assert config.dynamic_batching.max_queue_delay_microseconds == 2000
    assert (model_dir / "1" / "model.onnx").read_bytes() == (bundle / "model.onnx").read_bytes()
    assert config.version_policy.specific.versions == [1]
    with pytest.raises(LayerpruneError, match="refusing to overwrite"):
        write_triton_repository(bundle, tmp_path / "repo", "lp-model")
    with pytest.raises(BundleError, match="failed validation"):
        write_triton_repository(failed_bundle, tmp_path / "repo2")
    write_triton_repository(failed_bundle, tmp_path / "repo3", allow_unvalidated=True, kind="KIND_CPU")
    with pytest.raises(LayerpruneError, match="preferred"):
        write_triton_repository(bundle, tmp_path / "repo4", max_batch_size=8, preferred_batch_sizes=[16])
    with pytest.raises(LayerpruneError, match="model name"):
        write_triton_repository(bundle, tmp_path / "repo5", model_name="../x")


# --- Dockerfile ---------------------------------------------------------------------------------------------


def _dockerfile() -> dict[str, list[str]]:
    """Instructions of the Dockerfile (continuation lines joined), by keyword."""
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            key, _, rest = line.strip().partition(" ")
            out.setdefault(key.upper(), []).append(rest.strip())
    return out


def test_dockerfile_installs_what_serving_imports() -> None:
    d = _dockerfile()
    assert d["FROM"][0].startswith("python:3.11-slim")
    assert d["USER"] and d["USER"][-1] not in ("root", "0")
    assert d["EXPOSE"] == ["8080"] and any("BUNDLE=lp-run/bundle" in a for a in d["ARG"])
    installs = " ".join(r for r in d["RUN"] if "pip install" in r)
    assert "torch" not in installs and "transformers" not in installs and "--no-deps ." in installs
    pinned = {shlex.split(x)[0].split("==")[0].lower().replace("_", "-") for x in shlex.split(installs) if "==" in x}
    code = ("import json, sys, serve.app, serve.main, serve.triton; "
            "from importlib.metadata import packages_distributions as p; d = p(); "
            "print(json.dumps(sorted({x for m in list(sys.modules) for x in d.get(m.split('.')[0], [])})))")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True)
    needed = {n.lower().replace("_", "-") for n in json.loads(done.stdout)} - {"layerprune"}
    # dependencies of the pinned packages come with them; what serve imports directly must be pinned
    direct = {"numpy", "onnxruntime", "tokenizers", "pydantic", "pydantic-settings", "pyyaml", "fastapi",
              "starlette", "uvicorn", "prometheus-client"}
    assert direct <= pinned, direct - pinned
    assert not {"torch", "transformers", "datasets"} & needed, needed


def _wait_http_ready(url: str, proc: subprocess.Popen, tries: int = 600) -> None:
    """/readyz answers 200 once warmed up (the healthcheck only says alive); polled a bounded number of times."""
    for _ in range(tries):
        assert proc.poll() is None, proc.stderr.read()
        try:
            if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"{url} not ready after {tries} tries")


def test_dockerfile_cmd_and_healthcheck_run(bundle, offline) -> None:
    d = _dockerfile()
    cmd = json.loads(d["CMD"][-1])
    assert cmd[:3] == ["python", "-m", "serve"] and cmd[3] == "/app/bundle"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"  # explicit inside the container
    health = d["HEALTHCHECK"][0]
    health_cmd = json.loads(health[health.index("CMD") + 3:].strip())
    assert "/healthz" in health_cmd[-1] and "curl" not in health
    # Run both here, on loopback (this machine binds 127.0.0.1 only), with the test bundle.
    port = free_port()
    env = {**os.environ, "LAYERPRUNE_SERVE_PORT": str(port)}
    local = [sys.executable if a == "python" else str(bundle) if a == "/app/bundle" else "127.0.0.1" if a == "0.0.0.0"
             else a for a in cmd]
    proc = subprocess.Popen(local, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(300):  # a count of tries, not a clock
            probe = subprocess.run([sys.executable if a == "python" else a for a in health_cmd], env=env, capture_output=True,
                                   timeout=30)
            if probe.returncode == 0:
                break
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.2)
        else:
            raise AssertionError("healthcheck never passed")
        _wait_http_ready(f"http://127.0.0.1:{port}", proc)
        r = httpx.post(f"http://127.0.0.1:{port}/predict", json={"inputs": "fine"}, timeout=60)
        assert r.status_code == 200, r.text
        assert sorted(d["label"] for d in r.json()) == sorted(offline.id2label.values()), r.text  # both labels
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


# Ray replaced by stand-ins whose serve.run is interrupted by SIGTERM, as a stop during deployment is.
_STOPPED_WHILE_DEPLOYING = """
import os, signal, sys, types
from pathlib import Path

fake = types.SimpleNamespace(
    start=lambda **_: None, ingress=lambda: (lambda cls: cls),
    deployment=lambda *_, **__: types.SimpleNamespace(bind=lambda *_: None),
    run=lambda *_, **__: os.kill(os.getpid(), signal.SIGTERM), shutdown=lambda: print("serve.shutdown"))
ray = types.ModuleType("ray")
ray.serve, ray.init, ray.shutdown = fake, lambda **_: None, lambda: print("ray.shutdown")
sys.modules.update({"ray": ray, "ray.serve": fake})

from serve.ray_app import run_ray
from serve.settings import ServeSettings
sys.exit(run_ray(Path(sys.argv[1]), ServeSettings(replicas=2)))
"""


def test_ray_a_stop_during_deployment_shuts_ray_down_after_it(bundle) -> None:
    """SIGTERM while serve.run deploys (the tests stop the server as soon as it answers) used to kill the
    process before its stop handler existed: no 'replica(s)' line, Ray never shut down."""
    done = subprocess.run([sys.executable, "-c", _STOPPED_WHILE_DEPLOYING, str(bundle)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "2 replica(s)" in done.stderr
    assert done.stdout.split() == ["serve.shutdown", "ray.shutdown"]
