"""Faithful int8 on tiny random classifiers, against onnxruntime on the untransformed graph and transformers.

- the exact part of the transform (smoothing folded into V, or with smooth_with_mul applied by a Mul after a
  GELU shift folded into the biases; weight rows rescaled; nothing rounded) keeps the fp32 logits, for each
  architecture whose graph it reads;
- the quantized graph, in both recipes (the defaults: symmetric ranges, GELU outputs on a zero point that
  carries the shift; and smoothing by Mul with an asymmetric Q/K/V input), computes its products in
  onnxruntime's integer kernel, stays closer to fp32 than onnxruntime's own per-channel dynamic int8, and answers
  a text alone exactly as inside a batch (one scale per token: no other text enters a token's rounding).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnxruntime.quantization import QuantType, quantize_dynamic
from conftest import SENTENCES, make_tiny_classifier
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from layerprune import faithful_int8 as F
from layerprune.errors import LayerpruneError
from layerprune.onnx_export import export_onnx
from layerprune.runtime import OnnxClassifier

TEXTS = [text for text, _ in SENTENCES]
# Larger than the default 0.02, and random biases and LayerNorm parameters (initialised they are all 0 or 1):
# channels of different sizes, so smoothing scales differ from 1 by a lot and a fold that misses one shows.
INIT = 0.2


def exported(model_type: str, root: Path, minilm_dir: Path) -> tuple[Path, Path]:
    checkpoint = make_tiny_classifier(model_type, root / "ckpt", minilm_dir, initializer_range=INIT)
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint)
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(INIT * torch.randn(parameter.shape, generator=generator))
    model.save_pretrained(checkpoint)
    return checkpoint, export_onnx(checkpoint, root / "onnx").parent


def calibration(onnx_dir: Path) -> list[dict[str, np.ndarray]]:
    clf = OnnxClassifier(onnx_dir, threads=1)
    return [clf.encode(TEXTS[:6]), clf.encode(TEXTS[6:])]


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {i.name: feeds[i.name] for i in session.get_inputs()})[0]


def transformers_logits(checkpoint: Path, texts: list[str]) -> np.ndarray:
    model = AutoModelForSequenceClassification.from_pretrained(checkpoint).eval()
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    with torch.inference_mode():
        return model(**tokenizer(texts, padding=True, return_tensors="pt")).logits.numpy()


@pytest.mark.parametrize("model_type", ["bert", "roberta", "mpnet"])
@pytest.mark.parametrize("smooth_with_mul", [True, False])
def test_without_rounding_the_transform_keeps_the_fp32_logits(model_type: str, smooth_with_mul: bool,
                                                              tmp_path: Path, minilm_dir: Path) -> None:
    checkpoint, onnx_dir = exported(model_type, tmp_path, minilm_dir)
    fp32 = onnx.load(str(onnx_dir / "model.onnx"))
    batches = calibration(onnx_dir)
    # The transform must have something to get wrong: alpha 0.5 smooths every site, some into V, GELU shifted.
    untied = F.untie(fp32)
    sites = F.find_sites(untied)
    stats = F.site_statistics(untied, batches, sites)
    plans = [F.make_plan(untied, s, stats[s.tensor], 127, (0.5,)) for s in sites]
    assert any(site.value for site in sites), "no attention context was found to fold into V"
    assert any(plan.mode == "shift" for plan in plans), "no GELU output was found to shift"
    assert all(not np.allclose(plan.scales, 1.0, rtol=0.1) for plan in plans)

    prepared = F.faithful_int8(fp32, batches, alphas=(0.5,), quantize=False, smooth_with_mul=smooth_with_mul)
    inserted = sorted(n.op_type for n in prepared.graph.node if n.name.startswith("fi8_"))
    # 4 layers. With the Mul: one before Q/K/V, the feed-forward input and output each, and the shift before the
    # output's. Without: smoothing only goes where it folds into V, and a GELU's shift waits for its zero point.
    assert inserted == (["Add"] * 4 + ["Mul"] * 12 if smooth_with_mul else [])
    feeds = OnnxClassifier(onnx_dir, threads=1).encode(TEXTS)
    got = run(prepared, feeds)
    np.testing.assert_allclose(got, run(fp32, feeds), rtol=0, atol=1e-5)
    np.testing.assert_allclose(got, transformers_logits(checkpoint, TEXTS), rtol=0, atol=1e-5)


RECIPES = {"defaults": {}, "Mul and zero points": dict(smooth_with_mul=True, shared_zero_point=True)}


@pytest.fixture(scope="module", params=list(RECIPES))
def quantized(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path
              ) -> tuple[Path, onnx.ModelProto, str]:
    _, onnx_dir = exported("bert", tmp_path_factory.mktemp("faithful"), minilm_dir)
    model = F.faithful_int8(onnx.load(str(onnx_dir / "model.onnx")), calibration(onnx_dir), **RECIPES[request.param])
    return onnx_dir, model, request.param


def test_the_quantized_graph_runs_its_products_in_int8_closer_to_fp32_than_plain_int8(quantized,
                                                                                    tmp_path: Path) -> None:
    onnx_dir, model, recipe = quantized
    ops = [n.op_type for n in model.graph.node]
    # 4 layers: Q, K, V, attention output, feed-forward in and out each; the head's Gemms stay fp32.
    assert ops.count("MatMulIntegerToFloat") == 4 * 6
    initializers = {t.name for t in model.graph.initializer}
    fp32_products = [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in initializers]
    # Only the asymmetric Q/K/V input has the zero point's rank-1 correction (one per product it feeds).
    assert len(fp32_products) == (0 if recipe == "defaults" else 4 * 3)
    assert all(name.endswith("_corr") for name in fp32_products)
    # The reference: onnxruntime's own dynamic int8 (per-channel weights, one activation scale per tensor).
    quantize_dynamic(onnx_dir / "model.onnx", tmp_path / "plain.onnx", per_channel=True, weight_type=QuantType.QInt8)
    feeds = OnnxClassifier(onnx_dir, threads=1).encode(TEXTS)
    want = run(onnx.load(str(onnx_dir / "model.onnx")), feeds)
    error = np.abs(run(model, feeds) - want).max()
    assert error < np.abs(run(onnx.load(str(tmp_path / "plain.onnx")), feeds) - want).max()
    assert error <= 0.05 * np.abs(want).max()


def test_a_text_is_answered_alone_as_inside_a_batch(quantized) -> None:
    onnx_dir, model, _ = quantized
    clf = OnnxClassifier(onnx_dir, threads=1)
    together = run(model, clf.encode(TEXTS))  # one batch, padded to its longest text
    alone = np.concatenate([run(model, clf.encode([text])) for text in TEXTS])
    np.testing.assert_allclose(together, alone, rtol=0, atol=1e-6)


def test_a_graph_without_weights_to_quantize_is_refused() -> None:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 2])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 2])
    graph = onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y])
    with pytest.raises(LayerpruneError, match="no MatMul with a constant weight"):
        F.faithful_int8(onnx.helper.make_model(graph), [])


def weight_range(model: onnx.ModelProto) -> int:
    """The largest |integer| among the int8 weights of the integer products."""
    inits = {t.name: t for t in model.graph.initializer}
    return max(int(np.abs(onnx.numpy_helper.to_array(inits[n.input[1]])).max())
               for n in model.graph.node if n.op_type == "MatMulIntegerToFloat")


def test_reduce_range_gives_7_bit_weights(quantized) -> None:
    # onnxruntime's reduce_range for s8 weights: [-64, 64] (pair sums of u8 x s8 stay in int16 without VNNI).
    onnx_dir, model, recipe = quantized
    if recipe != "defaults":
        pytest.skip("one recipe suffices")
    assert weight_range(model) == 127
    narrow = F.faithful_int8(onnx.load(str(onnx_dir / "model.onnx")), calibration(onnx_dir), reduce_range=True,
                             alphas=(None,))
    assert weight_range(narrow) == 64
