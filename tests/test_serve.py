"""The bundled HTTP server (serve/): gate, routes, batching, limits; a real uvicorn process on loopback
(parity with the reference, concurrent load, fuzz, tampered bundles); Triton repository; Dockerfile. Every
answer is checked against conftest.Reference (transformers + optimum on the same ONNX file, itself checked
against the truncated PyTorch checkpoint below), never against the runtime the server uses."""

from __future__ import annotations

import json
import os
import random
import shlex
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import (LONG, SERVE_KEEP_LAYERS, TEXTS, TINY_LAYERS, Reference, by_label, free_port, make_client, serving,
                      truncated_checkpoint)
from layerprune.bundle import BundleError
from layerprune.errors import LayerpruneError
from layerprune.options import ExportOptions
from layerprune.serve.main import main as serve_main
from layerprune.serve.model import load_model
from layerprune.serve.settings import load_settings

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def pair_client(pair_bundle):
    with serving(pair_bundle) as c:
        yield c


# --- the bundle under test and the reference the server is checked against ---------------------------------------


def test_the_bundle_passed_the_gate_at_the_default_tolerance(bundle) -> None:
    """The fixture went through the real gate: the default tolerance, and a pass that its own numbers support."""
    validation = json.loads((bundle / "validation.json").read_text())
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert validation["tolerance"] == ExportOptions().tolerance == 0.01
    assert validation["delta"] == pytest.approx(validation["bundle"] - validation["original"], abs=1e-12)
    assert validation["passed"] is (validation["delta"] >= -validation["tolerance"]) is True
    assert manifest["servable"] is True and (manifest["depth"], manifest["total_layers"]) == (SERVE_KEEP_LAYERS, TINY_LAYERS)
    assert validation["n_examples"] == 12 and validation["max_abs_logit_diff_fp32"] < 1e-4


def test_reference_is_the_truncated_checkpoint(bundle, reference) -> None:
    """The reference (optimum on the ONNX file) against the truncated PyTorch checkpoint export wrote: logits
    within 1e-4 on every text, the long one cut at the manifest's 160 tokens included."""
    from transformers import AutoModelForSequenceClassification

    import torch

    torch_model = AutoModelForSequenceClassification.from_pretrained(truncated_checkpoint(bundle)).eval()
    assert torch_model.config.num_hidden_layers == SERVE_KEEP_LAYERS
    texts = [*TEXTS, LONG]
    with torch.inference_mode():
        want = torch_model(**{k: torch.from_numpy(v) for k, v in reference.encode(texts).items()}).logits.numpy()
    np.testing.assert_allclose(reference.logits(texts), want, rtol=0, atol=1e-4)
    assert reference.labels == load_model(bundle).labels == ["negative", "positive"]
    # The texts are told apart far beyond the tolerances used on them, and both labels occur.
    assert min(np.abs(want[i] - want[j]).max() for i in range(len(want)) for j in range(i)) > 1e-2
    assert set(want.argmax(1)) == {0, 1}


# --- torch-free ---------------------------------------------------------------------------------------


def test_serve_imports_no_torch() -> None:
    code = ("import sys, layerprune.serve.app, layerprune.serve.main, layerprune.serve.model, layerprune.serve.batcher, "
            "layerprune.serve.triton, layerprune.serve.settings; "
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
    c = make_client(bundle)  # no lifespan: nothing warmed up
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


def test_predict_tei_shapes(client, reference) -> None:
    one = client.post("/predict", json={"inputs": TEXTS[0]}).json()
    assert [set(d) for d in one] == [{"label", "score"}] * 2
    assert [(d["label"], pytest.approx(d["score"], abs=1e-5)) for d in one] == reference.ranked(TEXTS[0])
    batch = client.post("/predict", json={"inputs": TEXTS[:5]}).json()
    assert len(batch) == 5 and all(len(row) == 2 for row in batch)
    assert batch[0] == one
    for row, text in zip(batch, TEXTS[:5]):
        assert [(d["label"], pytest.approx(d["score"], abs=1e-5)) for d in row] == reference.ranked(text)
    raw = client.post("/predict", json={"inputs": TEXTS, "raw_scores": True}).json()
    np.testing.assert_allclose(by_label(raw, reference.labels), reference.logits(TEXTS), rtol=0, atol=1e-4)


def test_classify_route(client, reference, bundle) -> None:
    r = client.post("/v1/classify", json={"texts": TEXTS, "raw_scores": True}).json()
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert (r["depth"], r["total_layers"]) == (2, TINY_LAYERS) == (manifest["depth"], manifest["total_layers"])
    assert r["model"] == "model"
    expected = reference.logits(TEXTS)
    got = np.array([[res["scores"][name] for name in reference.labels] for res in r["results"]])
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-4)
    for res, want in zip(r["results"], expected):
        assert res["label"] == reference.labels[int(np.argmax(want))] and res["score"] == max(res["scores"].values())
    probs = client.post("/v1/classify", json={"texts": TEXTS[:4]}).json()["results"]
    for p, text in zip(probs, TEXTS[:4]):
        assert p["scores"] == {label: pytest.approx(score, abs=1e-5) for label, score in reference.ranked(text)}


def test_truncation(client, reference) -> None:
    r = client.post("/predict", json={"inputs": LONG, "raw_scores": True})
    assert r.status_code == 200
    assert len(reference.encode([LONG])["input_ids"][0]) == 160  # cut at the manifest's max length
    np.testing.assert_allclose(by_label([r.json()], reference.labels), reference.logits([LONG]), rtol=0, atol=1e-4)
    tokens = len(reference.tokenizer(LONG)["input_ids"])  # uncut
    for body, route, index in [({"inputs": LONG, "truncate": False}, "/predict", 0),
                               ({"texts": ["short", LONG], "truncate": False}, "/v1/classify", 1)]:
        r = client.post(route, json=body)
        assert r.status_code == 422 and r.json()["error_type"] == "Validation", r.text
        # The API's field, not the library's argument (truncation=True).
        assert r.json()["error"] == (f'input {index} has {tokens} tokens, the model takes at most 160; send '
                                     '"truncate": true to cut it'), r.text
    assert client.post("/predict", json={"inputs": "short", "truncate": False}).status_code == 200


def test_models_route(client, failed_bundle, caplog) -> None:
    info = client.get("/v1/models").json()
    model = info["data"][0]
    assert model["validated"] and model["warning"] is None and "warning" not in info
    assert model["validation"]["passed"] and (model["depth"], model["total_layers"]) == (2, TINY_LAYERS)
    assert (model["task"], model["source_checkpoint"], model["pair_input"]) == ("data", "model", False)
    with caplog.at_level("WARNING", logger="layerprune.serve"), serving(failed_bundle, allow_unvalidated=True) as c:
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
    # The limit is what a valid request can need: 64 inputs of 10,000 characters, each written as JSON's
    # longest spelling of a character (an astral one escaped as a surrogate pair, 12 bytes), and some slack.
    limit = client.app.state.settings.max_body_bytes(client.app.state.model.pair_input)
    worst = json.dumps({"inputs": ["\U0001f600" * 10_000] * 64}).encode()
    assert len(worst) == 64 * (10_000 * len(b"\\ud83d\\ude00") + 4) + 12 < limit == 64 * (12 * 10_000 + 64) + 65_536
    r = client.post("/predict", content=worst, headers={"content-type": "application/json"})
    assert r.status_code == 200 and len(r.json()) == 64, r.text[:300]
    r = client.post("/predict", content=b"x" * (limit + 1), headers={"content-type": "application/json"})
    assert r.status_code == 413 and "larger than" in r.json()["error"]
    assert client.get("/predict").status_code == 405
    assert client.get("/nowhere").status_code == 404


def test_overloaded_queue(bundle) -> None:
    with serving(bundle, max_queue=2) as c:
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
    with serving(bundle, max_wait_ms=50.0, max_batch_size=8) as c:
        with ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda t: c.post("/predict", json={"inputs": t}).status_code, TEXTS[:16]))
        assert results == [200] * 16
        text = c.get("/metrics").text
        count = float(next(line.split()[-1] for line in text.splitlines() if line.startswith("layerprune_batch_size_count")))
        assert count < 17  # 16 requests + warm-up in fewer runs than requests


def test_pair_model(pair_client, pair_reference) -> None:
    ref = pair_reference
    a, b = TEXTS[:6], [f"so {t}" for t in TEXTS[:6]]
    want = ref.logits(a, b)
    assert np.abs(want - ref.logits(a)).max() > 1e-2  # the second text matters: a server that drops it fails
    batch = pair_client.post("/predict", json={"inputs": [list(p) for p in zip(a, b)], "raw_scores": True}).json()
    one = pair_client.post("/predict", json={"inputs": [a[0], b[0]], "raw_scores": True}).json()
    assert one == batch[0]
    np.testing.assert_allclose(by_label(batch, ref.labels), want, rtol=0, atol=1e-4)
    r = pair_client.post("/v1/classify", json={"pairs": [list(p) for p in zip(a, b)], "raw_scores": True}).json()
    np.testing.assert_allclose([[x["scores"][name] for name in ref.labels] for x in r["results"]], want, rtol=0, atol=1e-4)
    assert pair_client.get("/v1/models").json()["data"][0]["pair_input"] is True
    for route, body, words in [("/predict", {"inputs": "one text"}, "pairs"),
                               ("/predict", {"inputs": ["a", "b", "c"]}, "pairs"),
                               ("/predict", {"inputs": [["a", "b", "c"]]}, "a pair is"),
                               ("/v1/classify", {"texts": ["a"]}, "pairs"),
                               ("/v1/classify", {"pairs": [["a"]]}, "pairs")]:
        r = pair_client.post(route, json=body)
        assert r.status_code == 422 and words in r.json()["error"], r.text


# --- a real server on loopback ---------------------------------------------------------------------------


def test_server_parity_with_reference(server, reference) -> None:
    want = reference.logits(TEXTS)
    with httpx.Client(base_url=server, timeout=30) as http:
        batch = http.post("/predict", json={"inputs": TEXTS, "raw_scores": True}).json()
        singles = [http.post("/v1/classify", json={"texts": [t], "raw_scores": True}).json() for t in TEXTS[:6]]
    np.testing.assert_allclose(by_label(batch, reference.labels), want, rtol=0, atol=1e-4)
    got1 = np.array([[s["results"][0]["scores"][name] for name in reference.labels] for s in singles])
    np.testing.assert_allclose(got1, want[:6], rtol=0, atol=1e-4)


def test_server_concurrent_load(server, reference) -> None:
    want = {t: row for t, row in zip(TEXTS, reference.logits(TEXTS))}
    labels = reference.labels
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
    import onnx
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2  # the test extra: missing, the test fails

    from layerprune.serve.triton import write_triton_repository

    model_dir = write_triton_repository(bundle, tmp_path / "repo", "lp-model", 16, max_queue_delay_us=2000)
    assert model_dir == tmp_path / "repo" / "lp-model"
    # Triton's own schema: unknown fields or wrong types make Parse raise
    config = text_format.Parse((model_dir / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())
    assert (config.name, config.platform, config.max_batch_size) == ("lp-model", "onnxruntime_onnx", 16)
    graph = onnx.load(str(bundle / "model.onnx"), load_external_data=False).graph
    assert [i.name for i in config.input] == [i.name for i in graph.input]
    assert {i.name for i in graph.input} == {"input_ids", "attention_mask", "token_type_ids"}
    for i in config.input:
        assert i.data_type == model_config_pb2.TYPE_INT64 and list(i.dims) == [-1]
    (out,) = config.output
    assert out.name == graph.output[0].name == "logits"
    assert out.data_type == model_config_pb2.TYPE_FP32 and list(out.dims) == [2]
    assert out.label_filename == "labels.txt"
    labels = (model_dir / "labels.txt").read_text().splitlines()
    id2label = json.loads((bundle / "config.json").read_text())["id2label"]
    assert labels == [id2label[str(i)] for i in range(len(id2label))] == ["negative", "positive"]
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
    code = ("import json, sys, layerprune.serve.app, layerprune.serve.main, layerprune.serve.triton; "
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


def test_dockerfile_cmd_and_healthcheck_run(bundle, reference) -> None:
    d = _dockerfile()
    cmd = json.loads(d["CMD"][-1])
    assert cmd[:3] == ["python", "-m", "layerprune.serve"] and cmd[3] == "/app/bundle"
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
        assert [(d["label"], pytest.approx(d["score"], abs=1e-5)) for d in r.json()] == reference.ranked("fine"), r.text
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

from layerprune.serve.ray_app import run_ray
from layerprune.serve.settings import ServeSettings
sys.exit(run_ray(Path(sys.argv[1]), ServeSettings(replicas=2)))
"""


def test_ray_a_stop_during_deployment_shuts_ray_down_after_it(bundle) -> None:
    """SIGTERM while serve.run deploys (the tests stop the server as soon as it answers): the stop handler is
    installed before the deployment starts, so Ray is shut down after it, not left running."""
    done = subprocess.run([sys.executable, "-c", _STOPPED_WHILE_DEPLOYING, str(bundle)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert "2 replica(s)" in done.stderr
    assert done.stdout.split() == ["serve.shutdown", "ray.shutdown"]


def test_a_fallback_bundle_is_served_as_it_was_validated(bundle, tmp_path) -> None:
    """A bundle exported with --fallback 0.5: the server answers with the pruned graph where it is sure and with
    the original where it is not, as a cascade made here from optimum's run of the pruned graph (Reference) and
    transformers' run of the original predicts; /info names the rule, /metrics counts the texts sent on."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from layerprune.export import export_bundle
    from layerprune.serve.triton import write_triton_repository

    result = export_bundle(bundle.parent / "run", tmp_path / "fb", ExportOptions(
        keep_layers=SERVE_KEEP_LAYERS, heal="none", fallback=0.5, device="cpu", batch_size=8))
    assert 0 < result.validation.sent_on < 1  # (on 12 texts the toy original is no better: served unvalidated)
    pruned = Reference(tmp_path / "fb").logits(TEXTS)
    checkpoint = bundle.parent / "model"
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    with torch.no_grad():
        original = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()(
            **tokenizer(TEXTS, padding=True, return_tensors="pt")).logits.numpy()
    _served_as_a_cascade(tmp_path / "fb", result.manifest, pruned, original)
    with pytest.raises(LayerpruneError, match="a Triton model serves one graph"):
        write_triton_repository(tmp_path / "fb", tmp_path / "repo", allow_unvalidated=True)


def test_a_continuation_bundle_is_served_as_it_was_validated(bundle, tmp_path) -> None:
    """A bundle exported with the top-layer heal and --fallback 0.5: the server answers with the pruned graph where
    it is sure, and where it is not with the original's answer, computed from the pruned graph's states at layer 1
    on through the original's layers above; checked against transformers' runs of the truncated checkpoint and the
    original. /info says where the fallback continues from."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from layerprune.export import export_bundle

    run = shutil.copytree(bundle.parent / "run", tmp_path / "run", ignore=shutil.ignore_patterns("truncated"))
    result = export_bundle(run, tmp_path / "cont", ExportOptions(
        keep_layers=SERVE_KEEP_LAYERS, heal="top", fallback=0.5, device="cpu", batch_size=8))
    assert result.manifest.fallback.continue_from == SERVE_KEEP_LAYERS - 1

    def logits(checkpoint):
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        with torch.no_grad():
            return AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()(
                **tokenizer(TEXTS, padding=True, return_tensors="pt")).logits.numpy()

    _served_as_a_cascade(tmp_path / "cont", result.manifest, logits(result.truncated_checkpoint),
                         logits(bundle.parent / "model"))


def _served_as_a_cascade(folder: Path, manifest, pruned: np.ndarray, original: np.ndarray) -> None:
    """The server on the fallback bundle in `folder` answers TEXTS with the `original` logits where the `pruned`
    ones are below the manifest's threshold, else with those; /metrics counts the texts sent on, /info names the
    rule."""
    from scipy.special import softmax

    sent = softmax(pruned, axis=-1).max(axis=-1) < manifest.fallback.threshold
    assert 0 < sent.sum() < len(TEXTS), "some texts go on, some do not"
    with serving(folder, allow_unvalidated=True) as c:
        before = _sent_on(c)  # the warm-up's text counts too
        raw = c.post("/predict", json={"inputs": TEXTS, "raw_scores": True}).json()
        np.testing.assert_allclose(by_label(raw, manifest.labels), np.where(sent[:, None], original, pruned),
                                   rtol=0, atol=1e-4)
        assert _sent_on(c) - before == sent.sum()
        assert c.get("/info").json()["fallback"] == manifest.fallback.model_dump()


def _sent_on(client) -> float:
    line = next(x for x in client.get("/metrics").text.splitlines() if x.startswith("layerprune_fallback_inputs_total"))
    return float(line.split()[-1])
