"""benchmarks/int8_cpus.py's VNNI emulator: exact integer products, and the same logits as onnxruntime's own
kernel wherever that kernel cannot saturate (7-bit weights)."""

from __future__ import annotations

import collections
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import SENTENCES, load_benchmark
from layerprune.onnx_export import export_onnx, max_logit_difference, quantize_onnx
from layerprune.runtime import OnnxClassifier

int8_cpus = load_benchmark("int8_cpus")

TEXTS = [text for text, _ in SENTENCES]


def op_counts(model: onnx.ModelProto) -> collections.Counter:
    return collections.Counter(node.op_type for node in model.graph.node)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def matmul_integer(a_shape: list[int], n: int, a_zp: np.ndarray | None, b_zp: np.ndarray | None) -> onnx.ModelProto:
    """One MatMulInteger: A (u8 input) x B (s8 input [K, N]), with the zero points given as initializers
    (None: the input left out, or given as '' when the other one follows)."""
    k = a_shape[-1]
    inputs = [helper.make_tensor_value_info("A", TensorProto.UINT8, a_shape),
              helper.make_tensor_value_info("B", TensorProto.INT8, [k, n])]
    initializers, names = [], ["A", "B"]
    for name, zp in (("a_zero_point", a_zp), ("b_zero_point", b_zp)):
        if zp is not None:
            initializers.append(numpy_helper.from_array(zp, name))
        names.append(name if zp is not None else "")
    while names[-1] == "":
        names.pop()
    node = helper.make_node("MatMulInteger", names, ["Y"], name="mmi")
    graph = helper.make_graph([node], "g", inputs, [helper.make_tensor_value_info("Y", TensorProto.INT32, None)],
                              initializer=initializers)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


@pytest.mark.parametrize(("a_shape", "a_zp", "b_zp"), [
    ([2, 3, 64], np.array(3, np.uint8), np.array([-1, 2, 0, 5, -7], np.int8)),  # per tensor x per channel
    ([4, 64], np.array([0, 9, 255, 1], np.uint8), np.array(-3, np.int8)),  # per row of A x per tensor
    ([4, 64], None, np.array([1, -2, 3, 0, 127], np.int8)),  # no a_zero_point: '' before b's
    ([2, 4, 64], None, None),  # no zero points at all
])
def test_emulated_matmul_integer_is_exact(a_shape, a_zp, b_zp) -> None:
    rng = np.random.default_rng(0)
    n = 5
    # Mostly extremes: 255 x 127 pairs sum to 64,770, past int16's 32,767 (what a non-VNNI kernel saturates).
    a = np.where(rng.random(a_shape) < 0.8, 255, rng.integers(0, 256, a_shape)).astype(np.uint8)
    b = np.where(rng.random((a_shape[-1], n)) < 0.8, 127, rng.integers(-128, 128, (a_shape[-1], n))).astype(np.int8)
    a_c = a.astype(np.int64) - (0 if a_zp is None else (a_zp[:, None] if a_zp.ndim == 1 else a_zp).astype(np.int64))
    b_c = b.astype(np.int64) - (0 if b_zp is None else b_zp.astype(np.int64))
    exact = a_c @ b_c

    model = matmul_integer(a_shape, n, a_zp, b_zp)
    emulated = int8_cpus.emulate_vnni(model)
    assert op_counts(emulated)["MatMulInteger"] == 0 and op_counts(model)["MatMulInteger"] == 1, "a copy"
    out = run(emulated, {"A": a, "B": b})
    assert out.dtype == np.int32
    np.testing.assert_array_equal(out, exact)


@pytest.fixture(scope="module")
def int8_7bit(tiny_models, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny BERT, dynamic int8 with per-channel 7-bit weights (the AVX2 configuration)."""
    bundle = export_onnx(tiny_models["bert"], tmp_path_factory.mktemp("int8") / "avx2").parent
    quantize_onnx(bundle, cpu="avx2")
    return bundle


def test_emulated_7_bit_model_matches_onnxruntime(int8_7bit: Path, tmp_path: Path) -> None:
    model = onnx.load(str(int8_7bit / "model.onnx"))
    assert op_counts(model)["MatMulInteger"] > 0
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    # weight products (B an initializer); attention's activation x activation products have dynamic zero points
    b_zero_points = [weights[n.input[3]] for n in model.graph.node if n.op_type == "MatMulInteger"
                     and n.input[1] in weights]
    assert b_zero_points and all(zp.ndim == 1 and zp.size > 1 for zp in b_zero_points), "per-channel weights"

    emulated_dir = shutil.copytree(int8_7bit, tmp_path / "emulated")
    emulated = int8_cpus.emulate_vnni(model)
    assert op_counts(emulated)["MatMulInteger"] == 0
    onnx.checker.check_model(emulated)
    onnx.save(emulated, str(emulated_dir / "model.onnx"))

    native = OnnxClassifier(int8_7bit).logits(TEXTS)
    exact = OnnxClassifier(emulated_dir).logits(TEXTS)
    # 7-bit weights never saturate: the same integers, only float rounding of the rescale may differ
    assert max_logit_difference(native, exact) <= 1e-5 * np.abs(native).max()
