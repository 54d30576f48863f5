"""benchmarks/int8_static.py's static int8 build: QDQ with calibrated ranges, the int8-safe nodes left in float,
and a model that still classifies."""

from __future__ import annotations

import collections
from pathlib import Path

import numpy as np
import onnx

from conftest import SENTENCES, load_benchmark
from layerprune.cpu import cpu_kind
from layerprune.data import Examples
from layerprune.onnx_export import export_onnx, sensitive_nodes
from layerprune.runtime import OnnxClassifier

int8_static = load_benchmark("int8_static")

TEXTS = [text for text, _ in SENTENCES]


def test_static_int8_is_qdq_with_calibrated_ranges_and_keeps_the_sensitive_nodes_in_float(tiny_models, tmp_path: Path) -> None:
    fp32 = export_onnx(tiny_models["bert"], tmp_path / "fp32").parent
    keep = sensitive_nodes(fp32)
    calibration = Examples(TEXTS[:8], None, np.zeros(8, dtype=np.int64))
    static = int8_static.static_copy(fp32, tmp_path / "static", calibration, "minmax", keep, cpu_kind())

    model = onnx.load(str(static / "model.onnx"))
    ops = collections.Counter(node.op_type for node in model.graph.node)
    assert ops["QuantizeLinear"] > 0 and ops["DequantizeLinear"] > 0
    produced_by = {out: node.op_type for node in model.graph.node for out in node.output}
    products = {node.name: node for node in model.graph.node if node.op_type == "MatMul"}
    kept = [products[name] for name in keep if name in products]
    quantized = [node for name, node in products.items() if name not in keep]
    assert kept and quantized
    # QDQ: a quantized product reads dequantized tensors; one kept in float reads none.
    assert all(any(produced_by.get(i) == "DequantizeLinear" for i in node.input) for node in quantized)
    assert not any(produced_by.get(i) == "DequantizeLinear" for node in kept for i in node.input)

    before = OnnxClassifier(fp32).logits(TEXTS, None, batch_size=8)
    after = OnnxClassifier(static).logits(TEXTS, None, batch_size=8)
    assert after.shape == before.shape and np.isfinite(after).all()
    assert not np.array_equal(after, before)  # the ranges were applied: rounding moves the logits
    assert np.abs(after - before).max() < 0.5 * np.abs(before).max() + 0.5  # and it still computes the model
