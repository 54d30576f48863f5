"""torch's fp32 Linear layers through oneDNN, where that is measured faster than the BLAS torch calls.

On CPU, torch runs `nn.Linear` (aten::addmm) through MKL's sgemm, and the linear layers are almost all of an
encoder's time there. On AMD EPYC, MKL takes a slower path than oneDNN, which torch also ships (its mkldnn ops,
used by torch.compile): the original's pass and the heals ran much faster through it (docs/results.md, "The speed
of export: oneDNN"). So the models layerprune loads run their linear layers through oneDNN, forward
and backward, wherever a probe at first use finds it faster than torch's own path and equal to it in result;
elsewhere (a CPU where MKL is as fast, CUDA, other dtypes, a trace for ONNX export) `nn.Linear` runs as it
always does.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Literal

import torch
from torch import nn

PROBE_SHAPE = (1024, 768, 3072)  # rows x inputs x outputs: a batch of 32 sentences through a BERT-base FFN
PROBE_RUNS = 5
FASTER_BY = 1.2  # oneDNN's margin over torch's path before layerprune takes it


def _onednn(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x W^T + b by oneDNN (torch's mkldnn linear op, which flattens leading dimensions as F.linear does)."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


class OneDnnLinear(torch.autograd.Function):
    """y = x W^T + b, with its gradients dx = dy W, dW = dy^T x, db = sum(dy), each product by oneDNN."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        return _onednn(x, weight, bias)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        rows = grad.reshape(-1, grad.shape[-1])
        dx = _onednn(grad, weight.t().contiguous(), None) if ctx.needs_input_grad[0] else None
        dw = (_onednn(rows.t().contiguous(), x.reshape(-1, x.shape[-1]).t().contiguous(), None)
              if ctx.needs_input_grad[1] else None)
        db = rows.sum(0) if ctx.needs_input_grad[2] else None  # (False for no bias)
        return dx, dw, db


class FastLinear(nn.Linear):
    """An nn.Linear (same parameters, same state dict) that runs through oneDNN where `onednn_is_faster()`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if _takes(x, self.weight) and self.through_onednn():
            return OneDnnLinear.apply(x, self.weight, self.bias)
        return super().forward(x)

    @staticmethod
    def through_onednn() -> bool:
        return onednn_is_faster()


class OneDnnLayer(FastLinear):
    """A FastLinear that takes oneDNN whatever the probe says (where `_takes` lets it: fp32 on CPU, no trace)."""

    @staticmethod
    def through_onednn() -> bool:
        return True


Backend = Literal["blas", "onednn"]
_BACKEND_LAYERS: dict[str, type[nn.Linear]] = {"blas": nn.Linear, "onednn": OneDnnLayer}


@contextmanager
def linear_backend(model: nn.Module, backend: Backend) -> Iterator[nn.Module]:
    """Within the block, `model`'s linear layers run through `backend`: torch's BLAS (plain nn.Linear) or oneDNN,
    whatever `onednn_is_faster()` says on this CPU; afterwards each is of its class before the block again. A
    class swap, as `fast_linears`: weights and state dict are untouched. Yields `model`."""
    swapped = {m: type(m) for m in model.modules() if type(m) in (nn.Linear, FastLinear, OneDnnLayer)}
    for layer in swapped:
        layer.__class__ = _BACKEND_LAYERS[backend]
    try:
        yield model
    finally:
        for layer, kind in swapped.items():
            layer.__class__ = kind


def _takes(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Plain fp32 CPU tensors, outside a trace or compile (where the exported graph must hold nn.Linear's ops)."""
    tracing = torch.jit.is_tracing() or torch.onnx.is_in_onnx_export() or torch.compiler.is_compiling()
    return (not tracing and x.device.type == "cpu" and weight.device.type == "cpu" and x.numel() > 0
            and x.dtype == weight.dtype == torch.float32)


def fast_linears(model: nn.Module) -> nn.Module:
    """Make every plain nn.Linear of `model` a FastLinear, in place (a class swap: weights, state dict, hooks and
    `isinstance(m, nn.Linear)` stay as they were); returns `model`."""
    for module in model.modules():
        if type(module) is nn.Linear:
            module.__class__ = FastLinear
    return model


@functools.cache
def onednn_is_faster() -> bool:
    """Whether this torch's oneDNN linear op exists, matches F.linear on a layer-sized product (forward and
    backward), and runs it at least FASTER_BY times faster than F.linear; measured once per process."""
    if not torch.backends.mkldnn.is_available():
        return False
    x, weight, bias = probe_inputs()
    try:  # (first asked for inside a forward pass, often under inference_mode: the probe needs gradients)
        with torch.inference_mode(False), torch.enable_grad():
            ours, theirs = _run(OneDnnLinear.apply, x, weight, bias), _run(nn.functional.linear, x, weight, bias)
    except RuntimeError:  # a torch built without the op, or one that takes other arguments
        return False
    if not all((a - b).abs().max() <= 1e-4 * b.abs().max() for a, b in zip(ours, theirs)):  # fp32 rounding only
        return False
    blas, onednn = (best_seconds(fn, x, weight, bias) for fn in (nn.functional.linear, OneDnnLinear.apply))
    return blas >= FASTER_BY * onednn


def probe_inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The probe's input, weight and bias: PROBE_SHAPE's product, seeded, so every measurement of it is of the
    same numbers."""
    rows, inputs, outputs = PROBE_SHAPE
    generator = torch.Generator().manual_seed(0)
    shapes = ((rows, inputs), (outputs, inputs), (outputs,))
    x, weight, bias = (torch.randn(*shape, generator=generator) for shape in shapes)
    return x, weight, bias


def _run(linear, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The product and the gradients of sum(y^2) with respect to x, weight and bias."""
    leaves = [t.clone().requires_grad_() for t in (x, weight, bias)]
    out = linear(*leaves)
    out.pow(2).sum().backward()
    return (out.detach(), *(t.grad for t in leaves))


def best_seconds(linear, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> float:
    """The best of PROBE_RUNS forward passes (after one to warm up), in seconds."""
    times = []
    with torch.inference_mode():
        for _ in range(PROBE_RUNS + 1):
            started = time.perf_counter()
            linear(x, weight, bias)
            times.append(time.perf_counter() - started)
    return min(times[1:])
