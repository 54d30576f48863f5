"""The Ray Serve deployment (serve/ray_app.py): started with one command on a local Ray instance, it serves the
same routes with the reference's answers (conftest.Reference: optimum on the same ONNX file) from 2 replicas,
and the same gate refuses a tampered bundle. Needs the `ray` extra: `make setup` installs it, and without it
a run that selects these tests fails at collection (conftest), it does not skip them."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import numpy as np
import pytest

from conftest import ROOT, TEXTS, ServerProcess, by_label, free_port
from layerprune.bundle import BundleError

pytestmark = [pytest.mark.slow, pytest.mark.ray]


def test_replica_runs_the_gate(tampered_bundle) -> None:
    from layerprune.serve.ray_app import Replica

    with pytest.raises(BundleError, match="model.onnx does not match"):
        Replica(str(tampered_bundle), {})


def test_ray_refuses_a_tampered_bundle_in_one_line(tampered_bundle) -> None:
    done = subprocess.run([sys.executable, "-m", "serve", str(tampered_bundle), "--ray", "--port", str(free_port())],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1, done.stderr
    assert lines[0].startswith("layerprune serve: error:") and "does not match its manifest hash" in lines[0]


def test_ray_serves_the_same_answers_from_two_replicas(bundle, reference) -> None:
    want = reference.logits(TEXTS)
    srv = ServerProcess(bundle, "--ray", "--replicas", "2", "--max-wait-ms", "2", RAY_DEDUP_LOGS="0")
    try:
        url = srv.wait_ready(timeout=300).url
        with httpx.Client(base_url=url, timeout=60) as http:
            got = http.post("/predict", json={"inputs": [[t] for t in TEXTS], "raw_scores": True}).json()
            root = http.post("/", json={"inputs": TEXTS[0]})
            info = http.get("/info").json()
            classify = http.post("/v1/classify", json={"texts": TEXTS[:2]})
        assert root.status_code == 200 and root.headers["x-inference-time"].isdigit()
        assert [(d["label"], d["score"]) for d in root.json()] == [
            (label, pytest.approx(score, abs=1e-5)) for label, score in reference.ranked(TEXTS[0])]
        assert classify.status_code == 200
        np.testing.assert_allclose(by_label(got, reference.labels), want, rtol=0, atol=1e-4)
        assert info["validated"] and info["model_type"]["classifier"]["id2label"] == {
            str(i): x for i, x in enumerate(reference.labels)}
        # the server is ready once one replica answers; on busy cores the second may still be starting
        deadline = time.monotonic() + 120
        while (running := _running_replicas()) < 2 and time.monotonic() < deadline:
            time.sleep(2)
        assert running == 2
    finally:
        log = srv.stop()
    assert "2 replica(s)" in log, log[-2000:]


def _running_replicas() -> int:
    """Replicas RUNNING in the deployment, asked of the Ray cluster the server started."""
    import ray
    from ray import serve

    ray.init(address="auto", include_dashboard=False, logging_level="ERROR")
    try:
        app = serve.status().applications["layerprune"]
        return app.deployments["layerprune"].replica_states.get("RUNNING", 0)
    finally:
        ray.shutdown()
