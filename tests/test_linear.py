"""Linear layers through oneDNN: the same products and gradients as torch's own F.linear, the same model."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn
from transformers import AutoModelForSequenceClassification

from layerprune import linear
from layerprune.linear import FastLinear, OneDnnLinear, fast_linears
from layerprune.models import load_classifier

needs_onednn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN")


def _product_and_gradients(fn, x, weight, bias):
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias) if t is not None]
    out = fn(*leaves, *([None] if bias is None else []))
    (out * torch.linspace(-1, 1, out.numel()).reshape(out.shape)).sum().backward()  # a gradient unlike y itself
    return [out.detach(), *(t.grad for t in leaves)]


@needs_onednn
@pytest.mark.parametrize("shape", [(7, 12), (3, 5, 12)], ids=["2-d", "3-d"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_onednn_product_and_gradients_match_torch(shape: tuple[int, ...], with_bias: bool) -> None:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=generator)
    weight, bias = torch.randn(9, 12, generator=generator), torch.randn(9, generator=generator) if with_bias else None
    ours = _product_and_gradients(OneDnnLinear.apply, x, weight, bias)
    theirs = _product_and_gradients(nn.functional.linear, x, weight, bias)
    assert len(ours) == len(theirs) == (4 if with_bias else 3)
    for a, b in zip(ours, theirs):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@needs_onednn
def test_a_swapped_model_computes_what_transformers_computes(tiny_models: dict[str, Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """load_classifier's model (every nn.Linear a FastLinear, forced onto oneDNN) against the same checkpoint
    loaded by transformers: logits, and the gradients of a loss through every layer."""
    monkeypatch.setattr(linear, "onednn_is_faster", lambda: True)
    calls = []
    monkeypatch.setattr(linear, "_onednn", lambda *args, original=linear._onednn: calls.append(1) or original(*args))
    ours, tokenizer = load_classifier(tiny_models["bert"], device="cpu")
    theirs = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"]).eval()
    linears = [m for m in ours.modules() if isinstance(m, nn.Linear)]
    assert linears and all(type(m) is FastLinear for m in linears)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    inputs = tokenizer(["a short test", "and a somewhat longer second one"], padding=True, return_tensors="pt")
    logits = [model(**inputs).logits for model in (ours, theirs)]
    assert calls, "the swapped model never ran oneDNN"
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-5, atol=1e-5)
    for out in logits:
        out.pow(2).sum().backward()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        if b.grad is not None:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_onnx_export_records_torch_s_own_product(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """An ONNX export as optimum runs it (torch.onnx.export, TorchScript) records a standard Gemm or MatMul,
    never the oneDNN op, and the graph computes what nn.Linear computes."""
    import onnx
    import onnxruntime

    monkeypatch.setattr(linear, "onednn_is_faster", lambda: True)
    layer = fast_linears(nn.Sequential(nn.Linear(4, 3))).eval()
    x = torch.randn(2, 4)
    torch.onnx.export(layer, (x,), tmp_path / "linear.onnx", dynamo=False, input_names=["x"])
    ops = {node.op_type for node in onnx.load(tmp_path / "linear.onnx").graph.node}
    assert ops & {"Gemm", "MatMul"} and all(op in ("Gemm", "MatMul", "Add") for op in ops), ops
    (out,) = onnxruntime.InferenceSession(tmp_path / "linear.onnx").run(None, {"x": x.numpy()})
    torch.testing.assert_close(torch.from_numpy(out), nn.functional.linear(x, layer[0].weight, layer[0].bias))


def test_without_onednn_torch_s_path_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: False)
    linear.onednn_is_faster.cache_clear()
    try:
        assert linear.onednn_is_faster() is False
    finally:
        linear.onednn_is_faster.cache_clear()



@needs_onednn
def test_linear_backend_switches_every_layer_and_restores_it(tiny_models: dict[str, Path],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Within linear_backend(model, "onednn") the oneDNN op runs though the probe says no, within "blas" it never
    runs; both compute what transformers computes on the same checkpoint, and the layers are FastLinear after."""
    monkeypatch.setattr(linear, "onednn_is_faster", lambda: False)
    calls = []
    monkeypatch.setattr(linear, "_onednn", lambda *args, original=linear._onednn: calls.append(1) or original(*args))
    ours, tokenizer = load_classifier(tiny_models["bert"], device="cpu")
    theirs = AutoModelForSequenceClassification.from_pretrained(tiny_models["bert"]).eval()
    inputs = tokenizer(["a short test", "and a somewhat longer second one"], padding=True, return_tensors="pt")
    expected = theirs(**inputs).logits.detach()
    for backend, runs_onednn in [("onednn", True), ("blas", False)]:
        calls.clear()
        with torch.no_grad(), linear.linear_backend(ours, backend) as model:
            torch.testing.assert_close(model(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        assert bool(calls) is runs_onednn, backend
    assert all(type(m) is FastLinear for m in ours.modules() if isinstance(m, nn.Linear))
