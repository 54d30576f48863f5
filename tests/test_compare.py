"""layerprune.compare, the bundle beside the full model's plain int8, against references it does not compute:
optimum-cli's own quantization, hand computations on known logits, and validate.forecast called directly at the
error rate worked out by hand. (benchmarks/pruned_vs_int8.py runs it end to end: tests/test_benchmarks.py.)"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from transformers import AutoTokenizer

from conftest import SENTENCES
from layerprune.compare import Comparison, GateTexts, certify, optimum_preset, plain_int8
from layerprune.data import Examples
from layerprune.onnx_export import export_onnx
from layerprune.tasks import load_task

TEXTS = [text for text, _ in SENTENCES]


def run_graph(path: Path, tokenizer_dir: Path, texts: list[str]) -> np.ndarray:
    """onnxruntime on one graph file, fed the inputs it names from transformers' tokenizer."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    encoded = AutoTokenizer.from_pretrained(tokenizer_dir)(texts, padding=True, return_tensors="np")
    return session.run(None, {i.name: encoded[i.name].astype(np.int64) for i in session.get_inputs()})[0]


def test_plain_int8_is_what_optimum_cli_writes_for_this_cpu(tiny_models, tmp_path: Path) -> None:
    """The full model's plain int8 is `optimum-cli onnxruntime quantize --PRESET --per_channel` on the fp32 export,
    run as a user runs it: the same nodes, the same logits to the bit."""
    fp32 = tmp_path / "fp32"
    export_onnx(tiny_models["bert"], fp32)
    name = plain_int8(fp32, tmp_path / "int8")
    preset = optimum_preset()
    cli = subprocess.run([sys.executable, "-m", "optimum.commands.optimum_cli", "onnxruntime", "quantize",
                          "--onnx_model", str(fp32), f"--{preset}", "--per_channel", "-o", str(tmp_path / "cli")],
                         capture_output=True, text=True)
    assert cli.returncode == 0, cli.stderr[-2000:]
    ours, theirs = tmp_path / "int8" / "model.onnx", tmp_path / "cli" / "model_quantized.onnx"
    nodes = [[(n.op_type, n.name) for n in onnx.load(str(p)).graph.node] for p in (ours, theirs)]
    assert nodes[0] == nodes[1] and any(op == "MatMulInteger" for op, _ in nodes[0])
    np.testing.assert_array_equal(run_graph(ours, fp32, TEXTS), run_graph(theirs, fp32, TEXTS))
    assert preset in name and "per-channel" in name
    assert (tmp_path / "int8" / "tokenizer.json").is_file() and (tmp_path / "int8" / "config.json").is_file()


def texts_of(calibration: list[int], holdout: list[int]) -> GateTexts:
    """Gate texts with these labels on rt-polarity's task config, at a 1-point tolerance."""
    def examples(y: list[int]) -> Examples:
        return Examples(texts=[f"text {i}" for i in range(len(y))], pairs=None, labels=np.array(y))

    return GateTexts(load_task("rt-polarity"), examples(calibration), examples(holdout), "validation split",
                     "test split", 0.01)


def test_accuracy_and_agreement_by_hand() -> None:
    """Four holdout texts, labels 0 1 1 0; the original predicts 0 1 1 1, the row 0 1 0 0: the row is right on 3 of
    4 (0.75) and agrees with the original on the first two (0.5); the original is right on 3 of 4 too and agrees with
    itself on all."""
    original = np.array([[2, 0], [0, 1], [0, 3], [0, 1]], dtype=float)
    row = np.array([[1, 0], [0, 2], [1, 0], [5, 0]], dtype=float)
    texts = texts_of([0, 1], [0, 1, 1, 0])
    comparison = Comparison(None, texts, 2, "int8", original, {"row": row, "original": original}, {}, None)
    assert comparison.metric("row") == 0.75 and comparison.agreement("row") == 0.5
    assert comparison.metric("original") == 0.75 and comparison.agreement("original") == 1.0


@pytest.mark.parametrize("flips", [0, 40])
def test_the_verdict_on_plain_int8_is_validate_forecast_at_the_int8_variants_share(flips: int) -> None:
    """400 calibration texts, the candidate flipping the original's prediction on `flips` of them (0: certified; 40,
    10% of the texts: not), 400 holdout texts: certify is validate.forecast at alpha 5% / 2 / 2 = 1.25% (export's
    budget: half to the depth walk, the other half shared by its two int8 variants), and says so."""
    from layerprune.validate import forecast

    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, 400)
    original = np.eye(2)[np.where(rng.random(400) < 0.9, labels, 1 - labels)]
    flipped = np.arange(400) < flips
    candidate = np.where(flipped[:, None], original[:, ::-1], original)
    texts = texts_of(labels.tolist(), labels.tolist())
    verdict = certify(texts, original, candidate)
    assert verdict == forecast(texts.task, labels, original, candidate, 0.01, 400, None, 0.0125)
    assert verdict.passes == (flips == 0) and verdict.alpha == 0.0125
    comparison = Comparison(None, texts, 2, "int8", original, {}, {}, verdict)
    words = comparison.verdict()
    assert words.startswith(("yes: " if flips == 0 else "no: ") + "forecast on 400 sentences (validation split)")
    assert f"lower bound {100 * verdict.lower_bound:+.2f} against -1.00" in words
    assert f"disagreement {flips / 400:.2%}" in words
