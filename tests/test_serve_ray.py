"""The Ray Serve deployment (serve/ray_app.py): started with one command on a local Ray instance, it serves the
same routes with the same answers from 2 replicas, and the same gate refuses a tampered bundle."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import SENTENCES, ServerProcess, free_port
from layerprune.bundle import BundleError
from test_serve import ROOT, _bundle, _tampered_copy

ray = pytest.importorskip("ray", reason="Ray Serve is an optional extra: pip install 'layerprune[ray]'")
pytestmark = pytest.mark.slow
TEXTS = [t for t, _ in SENTENCES]


@pytest.fixture(scope="module")
def bundle(minilm_dir, tmp_path_factory) -> Path:
    return _bundle(tmp_path_factory.mktemp("ray"), minilm_dir, pair=False)


@pytest.fixture(scope="module")
def tampered(bundle, tmp_path_factory) -> Path:
    return _tampered_copy(bundle, tmp_path_factory.mktemp("ray-tampered") / "bundle")


def test_replica_runs_the_gate(tampered) -> None:
    from serve.ray_app import Replica

    with pytest.raises(BundleError, match="model.onnx does not match"):
        Replica(str(tampered), {})


def test_ray_refuses_a_tampered_bundle_in_one_line(tampered) -> None:
    done = subprocess.run([sys.executable, "-m", "serve", str(tampered), "--ray", "--port", str(free_port())],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("layerprune serve: error:") and "does not match its manifest hash" in lines[0]


def test_ray_serves_the_same_answers_from_two_replicas(bundle) -> None:
    from serve.model import load_model

    model = load_model(bundle)
    want = model.classifier.logits(TEXTS)
    srv = ServerProcess(bundle, "--ray", "--replicas", "2", "--max-wait-ms", "2", RAY_DEDUP_LOGS="0")
    try:
        url = srv.wait_ready(timeout=300).url
        with httpx.Client(base_url=url, timeout=60) as http:
            got = http.post("/predict", json={"inputs": [[t] for t in TEXTS], "raw_scores": True}).json()
            root = http.post("/", json={"inputs": TEXTS[0]})
            info = http.get("/info").json()
            classify = http.post("/v1/classify", json={"texts": TEXTS[:2]})
        assert root.status_code == 200 and root.headers["x-inference-time"].isdigit()
        assert classify.status_code == 200
        labels = model.labels
        logits = np.array([[{d["label"]: d["score"] for d in row}[x] for x in labels] for row in got])
        np.testing.assert_allclose(logits, want, atol=1e-4)
        assert info["validated"] and info["model_type"]["classifier"]["id2label"] == {str(i): x for i, x in enumerate(labels)}
        assert _running_replicas() == 2
    finally:
        log = srv.stop()
    assert "2 replica(s)" in log, log[-2000:]


def _running_replicas() -> int:
    """Replicas RUNNING in the deployment, asked of the Ray cluster the server started."""
    from ray import serve

    ray.init(address="auto", include_dashboard=False, logging_level="ERROR")
    try:
        app = serve.status().applications["layerprune"]
        return app.deployments["layerprune"].replica_states.get("RUNNING", 0)
    finally:
        ray.shutdown()
