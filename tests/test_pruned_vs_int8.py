"""benchmarks/pruned_vs_int8.py on the tiny bundle (a 2-of-4-layer BERT): three rows on the bundle's holdout,
checked against references the benchmark does not compute (transformers' PyTorch forward of the original, the
int8 file's graph read with onnx, the manifest). No timing is asserted."""

from __future__ import annotations

import collections
import json
from pathlib import Path

import numpy as np
import onnx
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from conftest import load_benchmark
from layerprune.artifacts import AnalysisReport, load_artifact
from layerprune.cpu import cpu_model
from layerprune.validate import calibration_and_holdout

pruned_vs_int8 = load_benchmark("pruned_vs_int8")

INT8_OPS = {"MatMulInteger", "DynamicQuantizeLinear", "QLinearMatMul", "QLinearConv", "QLinearAdd"}


def table_rows(text: str) -> dict[str, list[str]]:
    """The markdown table's body rows by their first cell."""
    cells = [[c.strip() for c in line.strip().strip("|").split("|")] for line in text.splitlines()
             if line.startswith("| ") and not line.startswith("| model ")]
    return {row[0]: row for row in cells}


def test_bundle_against_the_full_model_in_fp32_and_plain_int8(bundle: Path, tmp_path: Path, capsys) -> None:
    out, keep = tmp_path / "pruned_vs_int8.md", tmp_path / "keep"
    assert pruned_vs_int8.main([str(bundle), "--n", "40", "--n-batch1", "8", "--out", str(out),
                                "--keep", str(keep)]) == 0
    printed = capsys.readouterr().out
    text = out.read_text()
    assert text in printed
    assert cpu_model() in text and "commit " in text

    manifest = json.loads((bundle / "manifest.json").read_text())
    rows = table_rows(text)
    assert list(rows) == ["full fp32", "full int8", "bundle"]
    assert rows["bundle"][1] == str(manifest["depth"]) == "2"
    assert rows["full fp32"][1] == rows["full int8"][1] == str(manifest["total_layers"]) == "4"
    assert rows["full fp32"][2] == "fp32" and "dynamic" in rows["full int8"][2]
    assert rows["full fp32"][7] == "100.0%"  # agreement of the reference with itself
    assert rows["full int8"][8] == "1.00x"

    # The sentences are the bundle task's holdout, as validation cuts it.
    analysis = load_artifact(AnalysisReport, bundle / "analysis.json")
    holdout = calibration_and_holdout(analysis.task_config, None, None, manifest["resample_seed"]).holdout
    kept = json.loads((keep / pruned_vs_int8.PREDICTIONS_FILE).read_text())
    assert kept["texts"] == holdout.texts and kept["labels"] == holdout.labels.tolist()

    # full fp32 = the original checkpoint: transformers' PyTorch forward predicts the same on every sentence.
    source = manifest["source_checkpoint"]
    model = AutoModelForSequenceClassification.from_pretrained(source).eval()
    encoded = AutoTokenizer.from_pretrained(source)(holdout.texts, truncation=True, max_length=manifest["max_length"],
                                                     padding=True, return_tensors="pt")
    with torch.no_grad():
        torch_preds = model(**encoded).logits.argmax(-1).numpy()
    assert kept["predictions"]["full fp32"] == torch_preds.tolist()
    accuracy = float(np.mean(torch_preds == holdout.labels))
    assert rows["full fp32"][6] == f"{accuracy:.4f}"
    agreement = np.mean(np.array(kept["predictions"]["bundle"]) == torch_preds)
    assert rows["bundle"][7] == f"{100 * agreement:.1f}%"

    # full int8 is really quantized (integer products), its fp32 source is not.
    ops = {name: collections.Counter(n.op_type for n in onnx.load(str(keep / name / "model.onnx")).graph.node)
           for name in ("fp32", "int8")}
    assert INT8_OPS & set(ops["int8"]) and not INT8_OPS & set(ops["fp32"])
    assert ops["int8"]["MatMulInteger"] > 0 and ops["int8"]["MatMul"] < ops["fp32"]["MatMul"]


def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys) -> None:
    for bad in (tmp_path / "missing", tmp_path):  # no folder; a folder that is no bundle
        assert pruned_vs_int8.main([str(bad), "--out", str(tmp_path / "t.md")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("pruned_vs_int8: error: ") and "\n" not in err and "Traceback" not in err
    assert not (tmp_path / "t.md").exists()


def test_a_fallback_bundle_is_measured_as_served_and_its_pruned_graph_alone(bundle: Path, tmp_path: Path) -> None:
    """With a fallback, the bundle row is the cascade as served and a fourth row is the pruned graph alone: their
    predictions are those of optimum's run of the pruned graph, with the original's (transformers) for the
    rows below the manifest's threshold in the bundle row."""
    from scipy.special import softmax

    from conftest import SERVE_KEEP_LAYERS, Reference
    from layerprune.export import ExportOptions, export_bundle

    fb, out, keep = tmp_path / "fb", tmp_path / "t.md", tmp_path / "keep"
    manifest = export_bundle(bundle.parent / "run", fb, ExportOptions(
        keep_layers=SERVE_KEEP_LAYERS, heal="none", fallback=0.5, device="cpu", batch_size=8)).manifest
    assert pruned_vs_int8.main([str(fb), "--n", "16", "--n-batch1", "4", "--out", str(out), "--keep", str(keep)]) == 0
    rows = table_rows(out.read_text())
    assert list(rows) == ["full fp32", "full int8", "bundle", pruned_vs_int8.ALONE]
    assert rows[pruned_vs_int8.ALONE][1] == rows["bundle"][1] == str(SERVE_KEEP_LAYERS)
    kept = json.loads((keep / pruned_vs_int8.PREDICTIONS_FILE).read_text())
    pruned = Reference(fb).logits(kept["texts"])
    source = manifest.source_checkpoint
    encoded = AutoTokenizer.from_pretrained(source)(kept["texts"], padding=True, return_tensors="pt")
    with torch.no_grad():
        original = AutoModelForSequenceClassification.from_pretrained(source).eval()(**encoded).logits.numpy()
    sent = softmax(pruned, axis=-1).max(axis=-1) < manifest.fallback.threshold
    assert 0 < sent.sum() < len(sent)
    assert kept["predictions"][pruned_vs_int8.ALONE] == pruned.argmax(-1).tolist()
    assert kept["predictions"]["bundle"] == np.where(sent, original.argmax(-1), pruned.argmax(-1)).tolist()
    # The line on the full int8 model in the original's place: its answers on the unsure rows, the pruned graph's
    # on the rest, against full fp32 (transformers' answers).
    int8 = np.array(kept["predictions"]["full int8"])
    what_if = np.where(sent, int8, pruned.argmax(-1))
    line = next(x for x in out.read_text().splitlines() if x.startswith("Had the texts"))
    assert f"agreement with full fp32 {100 * np.mean(what_if == original.argmax(-1)):.1f}%" in line
    assert f"accuracy {np.mean(what_if == np.array(kept['labels'])):.4f}" in line


def test_the_int8_what_if_line_by_hand() -> None:
    """Four texts, two of them below the threshold: the line serves the full int8 model's answers there and the
    pruned graph's elsewhere, scored against full fp32 (worked out by hand; fp32's own answers would give 100%
    agreement and accuracy 0.75)."""
    from types import SimpleNamespace

    logits = {
        pruned_vs_int8.FULL_FP32: [[1, 0], [0, 1], [0, 1], [0, 1]],
        pruned_vs_int8.FULL_INT8: [[0, 1], [0, 1], [1, 0], [1, 0]],
        pruned_vs_int8.ALONE: [[2, 0], [0.1, 0], [0, 2], [0, 0.1]],  # top-class probability 0.88, 0.52, 0.88, 0.52
    }
    rows = [SimpleNamespace(name=name, logits=np.array(value, dtype=float)) for name, value in logits.items()]
    result = SimpleNamespace(rows=rows, manifest=SimpleNamespace(fallback=SimpleNamespace(threshold=0.8)),
                             metric="accuracy", regression=False,
                             holdout=SimpleNamespace(labels=np.array([0, 1, 1, 0])))
    line = pruned_vs_int8._to_int8(result, np.array([0, 1, 1, 1]))
    assert "accuracy 1.0000" in line and "agreement with full fp32 75.0%" in line
