"""The bundle contract (issue 9, item 2): the manifest carries what consumers need, and they read only it.
The bundle is conftest's (shared with the serving tests); answers are checked against conftest.Reference."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import pytest

from layerprune.artifacts import MANIFEST_SCHEMA, Manifest, load_artifact
from layerprune.bundle import BundleError, open_bundle, verify_bundle
from layerprune.errors import LayerpruneError
from layerprune.runtime import OnnxClassifier
from serve.model import load_model
from serve.triton import write_triton_repository
from conftest import ROOT, ServerProcess, by_label, serving, sha256


def _edited(bundle: Path, out: Path, **changes) -> Path:
    """A copy of `bundle` whose manifest.json has `changes` (the hashed files untouched)."""
    shutil.copytree(bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.update(changes)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_manifest_names_labels_and_parts(bundle: Path) -> None:
    manifest = load_artifact(Manifest, bundle / "manifest.json")
    assert manifest.schema_version == MANIFEST_SCHEMA
    # The task's label names (from the CSV), resolved once at export, in output order.
    assert manifest.labels == ["negative", "positive"]
    parts = manifest.parts
    assert (parts.model, parts.validation, parts.analysis) == ("model.onnx", "validation.json", "analysis.json")
    named = [name for name in parts.model_dump().values() if name is not None]
    assert all(name in manifest.files and (bundle / name).is_file() for name in named), named


def test_server_and_triton_answer_with_the_manifests_labels(bundle: Path, reference, tmp_path: Path) -> None:
    """config.json says negative/positive; a manifest that says otherwise is what every consumer uses, for the
    same outputs in the same order (bad = output 0, good = output 1)."""
    renamed = _edited(bundle, tmp_path / "renamed", labels=["bad", "good"])
    assert load_model(renamed).info()["labels"] == ["bad", "good"]
    assert open_bundle(renamed).classifier.labels == ["bad", "good"]
    model_dir = write_triton_repository(renamed, tmp_path / "triton")
    assert (model_dir / "labels.txt").read_text() == "bad\ngood\n"
    server = ServerProcess(renamed)
    try:
        url = server.wait_ready().url
        texts = ["a fine movie", "a dull, lifeless remake"]
        answer = httpx.post(f"{url}/predict", json={"inputs": texts, "raw_scores": True}, timeout=60).json()
    finally:
        server.stop()
    assert [sorted(d["label"] for d in row) for row in answer] == [["bad", "good"]] * 2
    np.testing.assert_allclose(by_label(answer, ["bad", "good"]), reference.logits(texts), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"labels": ["a", "b", "c"]}, "3 labels given for a model with 2 outputs"),
        ({"max_length": 64}, "validated at 160"),
        ({"parts": {"model": "other.onnx", "config": "config.json", "tokenizer": "tokenizer.json",
                    "validation": "validation.json", "depth": "depth.json", "analysis": "analysis.json"}},
         "names other.onnx as the bundle's model but lists no hash"),
        ({"labels": None}, "not a valid Manifest: labels: "),
        ({"schema_version": 2}, "re-run `layerprune export` to rebuild the bundle with this version"),
        ({"schema_version": 3}, "re-run `layerprune export` to rebuild the bundle with this version"),
    ],
    ids=["label-count", "max-length", "unhashed-part", "no-labels", "schema-v2", "schema-v3"],
)
def test_tampered_manifest_is_refused(bundle: Path, tmp_path: Path, changes: dict, message: str) -> None:
    edited = _edited(bundle, tmp_path / "edited", **changes)
    with pytest.raises(LayerpruneError, match=message):
        load_model(edited)
    with pytest.raises(LayerpruneError, match=message):
        write_triton_repository(edited, tmp_path / "triton")


@pytest.mark.parametrize(("built_for", "host", "served"), [
    ("avx512-vnni", "avx2", False), ("avx512-vnni", "avx512", False), ("avx512-vnni", "avx512-vnni", True),
    ("avx2", "avx512-vnni", True),
])
def test_int8_weights_serve_only_where_they_compute_as_validated(bundle: Path, tmp_path: Path, monkeypatch,
                                                                 built_for: str, host: str, served: bool) -> None:
    """8-bit weights (quantized on a VNNI host) saturate the int16 sums of other x86 kernels: measured on
    MiniLM, 30 of 2,112 predictions differ between AVX2 and VNNI (benchmarks/int8_cpus.py). Refused there."""
    monkeypatch.setattr("layerprune.cpu.cpu_kind", lambda *a: host)
    edited = _edited(bundle, tmp_path / "int8", quantize="int8", int8_cpu=built_for)
    if served:
        assert load_model(edited).info()["labels"] == ["negative", "positive"]
        return
    with pytest.raises(BundleError, match=f"int8 weights for {built_for} CPUs, which compute differently"):
        load_model(edited)
    with pytest.raises(BundleError, match="export it on this kind of host, or without --quantize int8"):
        open_bundle(edited)


def _v3_manifest(bundle: Path, out: Path) -> Path:
    """A copy of `bundle` whose manifest is as v3 wrote it: the depth under its old name, kept_layers."""
    edited = _edited(bundle, out, schema_version=3)
    manifest = json.loads((edited / "manifest.json").read_text())
    manifest["kept_layers"] = manifest.pop("depth")
    (edited / "manifest.json").write_text(json.dumps(manifest))
    return edited


def test_old_bundle_is_one_line_from_every_command(bundle: Path, tmp_path: Path) -> None:
    assert MANIFEST_SCHEMA == 5
    v2 = _edited(bundle, tmp_path / "v2", schema_version=2)
    with pytest.raises(BundleError, match="manifest schema v2; this layerprune reads v5: re-run `layerprune export`"):
        verify_bundle(v2)
    old = _v3_manifest(bundle, tmp_path / "v3")
    for read in (verify_bundle, open_bundle, load_model):
        with pytest.raises(BundleError, match="manifest schema v3; this layerprune reads v5: re-run `layerprune export`"):
            read(old)
    for argv in (["validate", str(old), "--device", "cpu"], ["serve", str(old)],
                 ["triton", str(old), str(tmp_path / "repo")]):
        done = subprocess.run([sys.executable, "-m", "layerprune.cli", *argv], cwd=ROOT, capture_output=True,
                              text=True, timeout=600)  # a hang guard, not a timing
        assert done.returncode != 0, argv
        assert "manifest schema v3" in done.stderr and "re-run `layerprune export`" in done.stderr, done.stderr
        assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1, done.stderr


def _renamed_parts(bundle: Path, out: Path, names: dict[str, str]) -> Path:
    """A copy of `bundle` whose parts (manifest `parts` key -> new file name) are renamed on disk, the
    manifest's parts and hashes rewritten to match: a consistent bundle with non-default file names."""
    shutil.copytree(bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    for part, name in names.items():
        old = manifest["parts"][part]
        (out / old).rename(out / name)
        manifest["parts"][part] = name
        manifest["files"][name] = manifest["files"].pop(old)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_parts_with_other_names_are_opened_and_served(bundle: Path, reference, tmp_path: Path) -> None:
    """The runtime opens the files the manifest names, not the default names (issue 9: one bundle contract)."""
    names = {"model": "graph.onnx", "config": "hf-config.json", "tokenizer": "wordpiece.json"}
    renamed = _renamed_parts(bundle, tmp_path / "renamed", names)
    assert not any((renamed / old).exists() for old in ("model.onnx", "config.json", "tokenizer.json"))
    with pytest.raises(LayerpruneError, match="has no model.onnx"):  # a bare folder read by the default names
        OnnxClassifier(renamed)
    opened = open_bundle(renamed)
    assert opened.classifier.model_path == renamed / "graph.onnx"
    texts = ["a fine movie", "a dull, lifeless remake"]
    want = reference.logits(texts)  # the original bundle's file: the same bytes as graph.onnx
    np.testing.assert_allclose(opened.classifier.logits(texts), want, rtol=0, atol=1e-4)
    with serving(renamed) as client:
        assert client.get("/info").json()["model_sha"] == sha256(renamed / "graph.onnx")
        answer = client.post("/predict", json={"inputs": texts, "raw_scores": True})
    assert answer.status_code == 200, answer.text
    np.testing.assert_allclose(by_label(answer.json(), reference.labels), want, rtol=0, atol=1e-4)
    onnx = (write_triton_repository(renamed, tmp_path / "triton") / "1" / "model.onnx").read_bytes()
    assert onnx == (renamed / "graph.onnx").read_bytes()
