"""The bundle contract: the manifest carries what consumers need, and they read only it; it is
sealed, names only files inside the bundle, and agrees with the hashed files that say the same things.
The bundle is conftest's (shared with the serving tests); answers are checked against conftest.Reference."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import numpy as np
import onnx
import pytest

from layerprune.artifacts import MANIFEST_SCHEMA, Manifest, load_artifact
from layerprune.bundle import BundleError, open_bundle, seal_manifest, servable_bundle, verify_bundle
from layerprune.cli import main
from layerprune.errors import LayerpruneError
from layerprune.runtime import OnnxClassifier
from layerprune.serve.model import load_model
from layerprune.serve.triton import write_triton_repository
from conftest import ROOT, ServerProcess, by_label, reseal, serving, sha256


def _edited(bundle: Path, out: Path, config: dict | None = None, sealed: bool = True, **changes) -> Path:
    """A copy of `bundle` whose manifest.json has `changes`, and config.json `config` (re-hashed in the manifest);
    the manifest re-sealed by hand unless `sealed` is False."""
    shutil.copytree(bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    if config:
        path = out / manifest["parts"]["config"]
        path.write_text(json.dumps({**json.loads(path.read_text()), **config}))
        manifest["files"][manifest["parts"]["config"]] = sha256(path)
    manifest.update(changes)
    (out / "manifest.json").write_text(json.dumps(manifest))
    return reseal(out) if sealed else out


def test_manifest_names_labels_and_parts(bundle: Path) -> None:
    manifest = load_artifact(Manifest, bundle / "manifest.json")
    assert manifest.schema_version == MANIFEST_SCHEMA
    # conftest's bundle is fp32, as its graph shows: no integer products
    assert manifest.candidate == "fp32" and manifest.quantization_config is None
    assert not [n for n in onnx.load(str(bundle / "model.onnx")).graph.node if n.op_type == "MatMulInteger"]
    # The task's label names (from the CSV), resolved once at export, in output order.
    assert manifest.labels == ["negative", "positive"]
    parts = manifest.parts
    assert (parts.model, parts.validation, parts.analysis) == ("model.onnx", "validation.json", "analysis.json")
    named = [name for name in parts.model_dump().values() if name is not None]
    assert all(name in manifest.files and (bundle / name).is_file() for name in named), named


def test_server_and_triton_answer_with_the_manifests_labels(bundle: Path, reference, tmp_path: Path) -> None:
    """Labels named bad/good in the manifest and in config.json (the file they must agree with) are what every
    consumer answers with, for the same outputs in the same order (bad = output 0, good = output 1)."""
    renamed = _edited(bundle, tmp_path / "renamed", config={"id2label": {"0": "bad", "1": "good"}},
                      labels=["bad", "good"])
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
        ({"labels": ["a", "b", "c"], "config": {"id2label": {"0": "a", "1": "b", "2": "c"}}},
         "3 labels given for a model with 2 outputs"),
        ({"max_length": 64}, "validated at 160"),
        ({"parts": {"model": "other.onnx", "config": "config.json", "tokenizer": "tokenizer.json",
                    "validation": "validation.json", "depth": "depth.json", "analysis": "analysis.json"}},
         "names other.onnx as the bundle's model but lists no hash"),
        ({"labels": None}, "not a valid Manifest: labels: "),
        ({"schema_version": 2}, "re-run `layerprune export` to rebuild the bundle with this version"),
        ({"schema_version": 3}, "re-run `layerprune export` to rebuild the bundle with this version"),
        ({"candidate": "int8"}, "candidate 'int8' with quantization_config None: an int8 candidate names its "),
        ({"candidate": "int4"}, "not a valid Manifest: candidate: "),
    ],
    ids=["label-count", "max-length", "unhashed-part", "no-labels", "schema-v2", "schema-v3", "int8-without-config",
         "unknown-candidate"],
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
    assert MANIFEST_SCHEMA == 7
    v2 = _edited(bundle, tmp_path / "v2", schema_version=2)
    with pytest.raises(BundleError, match="manifest schema v2; this layerprune reads v7: re-run `layerprune export`"):
        verify_bundle(v2)
    v5 = _edited(bundle, tmp_path / "v5", schema_version=5, heal="distill")  # the top-layer heal as v5 named it
    with pytest.raises(BundleError, match="manifest schema v5; this layerprune reads v7: re-run `layerprune export`"):
        verify_bundle(v5)
    v6 = _edited(bundle, tmp_path / "v6", schema_version=6)
    v6_manifest = json.loads((v6 / "manifest.json").read_text())
    del v6_manifest["candidate"]  # v6 named no candidate
    (v6 / "manifest.json").write_text(json.dumps(v6_manifest))
    with pytest.raises(BundleError, match="manifest schema v6; this layerprune reads v7: re-run `layerprune export`"):
        verify_bundle(reseal(v6))
    old = _v3_manifest(bundle, tmp_path / "v3")
    for read in (verify_bundle, open_bundle, load_model):
        with pytest.raises(BundleError, match="manifest schema v3; this layerprune reads v7: re-run `layerprune export`"):
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
    return reseal(out)


def test_parts_with_other_names_are_opened_and_served(bundle: Path, reference, tmp_path: Path) -> None:
    """The runtime opens the files the manifest names, not the default names (the manifest is the one contract)."""
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


# --- one root of trust: the manifest's seal, paths inside the bundle, a manifest that agrees with its files ------


def _validate_cli(bundle: Path, capsys) -> tuple[int, str]:
    """`layerprune validate BUNDLE` in-process: its exit code and its stderr."""
    code = main(["validate", str(bundle), "--device", "cpu"])
    return code, capsys.readouterr().err


def _refused_everywhere(bundle: Path, capsys, message: str) -> None:
    """Refused by the gate (servable_bundle, which serve and Triton go through) and by `layerprune validate`, in
    one line that says `message`, exit code 2."""
    with pytest.raises(LayerpruneError, match=message):
        servable_bundle(bundle)
    code, err = _validate_cli(bundle, capsys)
    assert code == 2 and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1 and re.search(message, err), err


MANIFEST_EDITS = {  # what an edit of the manifest alone would make the server say or do
    "labels": {"labels": ["positive", "negative"]},  # every answer's label swapped
    "pair_input": {"pair_input": True},  # a single-text model fed pairs
    "depth": {"depth": -5},
    "total_layers": {"total_layers": 12},
}


@pytest.mark.parametrize("edit", MANIFEST_EDITS.values(), ids=MANIFEST_EDITS.keys())
def test_an_edited_manifest_breaks_its_seal(bundle: Path, tmp_path: Path, capsys, edit: dict) -> None:
    edited = _edited(bundle, tmp_path / "edited", sealed=False, **edit)
    _refused_everywhere(edited, capsys, r"manifest.json does not match manifest.json.sha256 \(altered after export\)")


@pytest.mark.parametrize(("edit", "disagrees"), [
    (MANIFEST_EDITS["labels"], r"says labels \['positive', 'negative'\] but config.json's id2label says "
                               r"\['negative', 'positive'\]"),
    (MANIFEST_EDITS["pair_input"], "says pair_input True but analysis.json's task says False"),
    (MANIFEST_EDITS["depth"], "says depth -5 but config.json's layer count says 2"),
    (MANIFEST_EDITS["total_layers"], "says total_layers 12 but analysis.json's total_layers says 4"),
], ids=MANIFEST_EDITS.keys())
def test_a_resealed_manifest_must_agree_with_its_hashed_files(bundle: Path, tmp_path: Path, capsys, edit: dict,
                                                             disagrees: str) -> None:
    """Whoever edits the manifest can seal it again (sha256sum), but what it says of the model is said by the hashed
    files too: config.json (written by transformers) and analysis.json (analyze's report, copied in)."""
    config = json.loads((bundle / "config.json").read_text())
    assert (config["id2label"], config["num_hidden_layers"]) == ({"0": "negative", "1": "positive"}, 2)
    edited = _edited(bundle, tmp_path / "edited", **edit)
    _refused_everywhere(edited, capsys, disagrees + ": the manifest was edited after export")


def _listing(bundle: Path, out: Path, name: str, target: Path, part: str | None = None) -> Path:
    """A copy of `bundle` whose manifest lists `name` (a path that reaches `target`, outside the bundle) with the
    true sha256 of `target`, as the bundle's `part` too when given; sealed again."""
    shutil.copytree(bundle, out)
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["files"][name] = sha256(target)
    if part:
        manifest["parts"][part] = name
    (out / "manifest.json").write_text(json.dumps(manifest))
    return reseal(out)


def test_paths_that_leave_the_bundle_are_refused(bundle: Path, tmp_path: Path, capsys) -> None:
    """A manifest entry is a relative POSIX path inside the bundle's folder: no '..', no absolute path, no link
    that leads out. Each outside file here has its true hash, so only the path gives it away."""
    outside = tmp_path / "outside.png"
    outside.write_bytes((bundle / "cka.png").read_bytes())
    climbing = "../" * len(Path(tmp_path / "x" / "bundle").resolve().parts) + str(outside.resolve())[1:]
    assert (tmp_path / "x" / "bundle" / climbing).resolve() == outside.resolve()
    refused = "is not a relative path inside the bundle"
    for folder, name, part in [("dotdot", climbing, None), ("absolute", str(outside.resolve()), None),
                               ("part", str(outside.resolve()), "cka_plot"), ("part-dotdot", climbing, "cka_plot")]:
        _refused_everywhere(_listing(bundle, tmp_path / folder / "bundle", name, outside, part), capsys, refused)
    linked = shutil.copytree(bundle, tmp_path / "linked")
    (linked / "cka.png").unlink()
    (linked / "cka.png").symlink_to(outside)  # the same bytes, outside the bundle
    _refused_everywhere(linked, capsys, "bundle file cka.png leads outside .*linked \\(a link\\)")


def test_a_link_inside_the_bundle_is_followed(bundle: Path, tmp_path: Path) -> None:
    copy = shutil.copytree(bundle, tmp_path / "copy")
    (copy / "plots").mkdir()
    (copy / "cka.png").rename(copy / "plots" / "cka.png")
    (copy / "cka.png").symlink_to(Path("plots") / "cka.png")
    manifest, _ = servable_bundle(copy)
    assert manifest.parts.cka_plot == "cka.png"


def test_the_seal_is_sha256sum_of_the_manifest(bundle: Path, tmp_path: Path) -> None:
    """The seal export wrote is what `sha256sum manifest.json` prints, and `sha256sum -c` accepts it."""
    assert (bundle / "manifest.json.sha256").read_text() == f"{sha256(bundle / 'manifest.json')}  manifest.json\n"
    done = subprocess.run(["sha256sum", "-c", "manifest.json.sha256"], cwd=bundle, capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "manifest.json: OK", done
    unsealed = shutil.copytree(bundle, tmp_path / "unsealed")
    (unsealed / "manifest.json.sha256").unlink()
    with pytest.raises(BundleError, match="has no manifest.json.sha256, the seal of its manifest: re-run `layerprune "
                                          "export`"):
        servable_bundle(unsealed)


def test_a_key_signs_the_manifest_and_only_signed_bundles_serve(bundle: Path, tmp_path: Path, monkeypatch,
                                                                 capsys) -> None:
    """With LAYERPRUNE_BUNDLE_KEY set, export signs the manifest (HMAC-SHA256, checked here with Python's hmac),
    and serve and validate take only bundles whose signature that key made: a manifest edited and re-sealed
    without the key is refused, even where its files would not catch the edit."""
    key = "a secret the user holds"
    monkeypatch.setenv("LAYERPRUNE_BUNDLE_KEY", key)
    signed = shutil.copytree(bundle, tmp_path / "signed")
    seal_manifest(signed)  # export's last step
    want = hmac.new(key.encode(), (signed / "manifest.json").read_bytes(), hashlib.sha256).hexdigest()
    assert (signed / "manifest.json.hmac").read_text().strip() == want
    assert servable_bundle(signed)[0].labels == ["negative", "positive"]
    _refused_everywhere(bundle, capsys, "is not signed, and LAYERPRUNE_BUNDLE_KEY is set")
    resealed = _edited(signed, tmp_path / "resealed", max_length=64)  # what only the validation report contradicts
    _refused_everywhere(resealed, capsys, "manifest.json.hmac is not the manifest's signature under the key")
    monkeypatch.setenv("LAYERPRUNE_BUNDLE_KEY", "another key")
    _refused_everywhere(signed, capsys, "manifest.json.hmac is not the manifest's signature under the key")
    monkeypatch.delenv("LAYERPRUNE_BUNDLE_KEY")
    assert servable_bundle(signed)[0].labels == ["negative", "positive"], "without a key the seal is checked"
