"""Dynamic int8 per x86 CPU kind: 7-bit weights (AVX2, AVX-512 without VNNI) vs 8-bit (AVX-512 VNNI).

The 8-bit configuration is only served on VNNI hosts (`cpu.serves_int8_of`), whose accuracy an AVX2 host cannot
measure natively: its u8 x s8 kernel saturates the int16 pair sums that 8-bit weights overflow. `emulate_vnni`
rewrites the graph's integer products into exact float64 ones, which is what a VNNI kernel computes, so both
configurations are scored here as their target CPUs would run them.

Examples: the run's task (`analysis.json`), calibration + holdout parts concatenated (rt-polarity: 2,112
sentences), or the first --max-examples of them. The checkpoint is exported to fp32 ONNX once; each
configuration (all int8; int8-safe: `sensitive_nodes` kept fp32) is quantized from it and scored twice:
natively on this host's onnxruntime and with `emulate_vnni`. All rows use the model's max length.

Static int8 (activation ranges calibrated beforehand, QDQ) is not measured here: it disagreed with fp32 two to
five times as often as dynamic int8 and ran slower (docs/results.md), so export does not try it.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from layerprune.candidates import onnx_logits
from layerprune.cpu import cpu_model
from layerprune.data import Examples
from layerprune.files import ANALYSIS_FILE, MODEL_FILE
from layerprune.onnx_export import export_onnx, max_logit_difference, quantize_onnx, sensitive_nodes
from layerprune.options import ExportOptions
from layerprune.runtime import OnnxClassifier
from layerprune.scoring import compute_metric

from .common import Run, markdown_table, read_run
from .harness import Results

CPUS = {"avx2": "7-bit", "avx512-vnni": "8-bit"}  # the two weight ranges quantization_config gives x86
VARIANTS = ("all int8", "int8-safe")
EMULATED = "emulated VNNI"


# --- the VNNI emulator ---------------------------------------------------------------------------


def emulate_vnni(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of `model` whose every MatMulInteger computes (A - a_zero_point) @ (B - b_zero_point) exactly.

    Each MatMulInteger (u8 activations x s8 weights, optional zero points, int32 output) becomes: Cast A and
    B to DOUBLE, subtract the zero points (cast to DOUBLE; a missing or empty zero point is 0), MatMul in
    DOUBLE, Cast to INT32. That equals what an AVX-512 VNNI kernel computes: VPDPBUSD adds u8 x s8 products
    straight into int32, so nothing saturates. The float64 product is exact: every |product| is below 2^16
    and the sums of a transformer's inner dimensions (K <= a few thousand) stay far below 2^53, so neither
    the products nor any summation order round. A host without VNNI computes something else for 8-bit
    weights (AVX2's VPMADDUBSW sums pairs of products into saturating int16), which is why 8-bit accuracy
    must be measured through this emulation there. For 7-bit weights both give the same integers.

    Zero points follow the ONNX spec: b_zero_point is a scalar or per column (shape [N], or [..., 1, N]),
    which broadcasts over B's last axis as is; a per-row a_zero_point of shape [M] is reshaped to [M, 1]
    (an N-D one is already [..., M, 1]). Nodes inside subgraphs (If, Loop) are not rewritten.
    """
    out = onnx.ModelProto()
    out.CopyFrom(model)
    ranks = _ranks(out)
    nodes = []
    for i, node in enumerate(out.graph.node):
        if node.op_type == "MatMulInteger" and node.domain in ("", "ai.onnx"):
            nodes.extend(_exact_matmul(node, f"{node.name or 'MatMulInteger'}_vnni{i}", ranks, out.graph))
        else:
            nodes.append(node)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    return out


def _exact_matmul(node: onnx.NodeProto, prefix: str, ranks: dict[str, int], graph: onnx.GraphProto):
    """The float64 nodes that replace one MatMulInteger (see emulate_vnni)."""
    a, b, a_zp, b_zp = (list(node.input) + ["", ""])[:4]
    nodes = []

    def as_double(name: str, tag: str) -> str:
        nodes.append(helper.make_node("Cast", [name], [f"{prefix}/{tag}"], to=TensorProto.DOUBLE))
        return f"{prefix}/{tag}"

    def centred(x: str, zp: str, tag: str, per_row: bool) -> str:
        x = as_double(x, tag)
        if not zp:
            return x
        per_row = per_row and ranks.get(zp) == 1  # [M] -> [M, 1]: one zero point per row of A
        zp = as_double(zp, f"{tag}_zero_point")
        if per_row:
            shape = f"{prefix}/row_shape"
            graph.initializer.append(numpy_helper.from_array(np.array([-1, 1], dtype=np.int64), shape))
            nodes.append(helper.make_node("Reshape", [zp, shape], [f"{zp}_rows"]))
            zp = f"{zp}_rows"
        nodes.append(helper.make_node("Sub", [x, zp], [f"{x}_centred"]))
        return f"{x}_centred"

    product = f"{prefix}/product"
    nodes.append(helper.make_node("MatMul", [centred(a, a_zp, "A", True), centred(b, b_zp, "B", False)], [product]))
    nodes.append(helper.make_node("Cast", [product], list(node.output), to=TensorProto.INT32))
    return nodes


def _ranks(model: onnx.ModelProto) -> dict[str, int]:
    """Tensor ranks the graph states or shape inference finds (initializers, inputs, value_info)."""
    ranks = {t.name: len(t.dims) for t in model.graph.initializer}
    try:
        graph = onnx.shape_inference.infer_shapes(model).graph
    except Exception:  # an op onnx cannot type: fall back to what the graph itself states
        graph = model.graph
    for info in [*graph.input, *graph.value_info, *graph.output]:
        if info.type.tensor_type.HasField("shape"):
            ranks.setdefault(info.name, len(info.type.tensor_type.shape.dim))
    return ranks


# --- the benchmark -------------------------------------------------------------------------------


@dataclass
class Row:
    configuration: str
    kernel: str
    logits: np.ndarray


def examples_of(run: Run, max_examples: int | None) -> Examples:
    """The task's calibration and holdout examples, concatenated (what export sees), or the first N."""
    parts = run.parts()
    both = parts.calibration.concat(parts.holdout)
    return both if max_examples is None else both.head(max_examples)


def logits_of(folder: Path, examples: Examples, max_length: int) -> np.ndarray:
    return onnx_logits(folder, examples, max_length, ExportOptions.batch_size)  # as export scores its candidates


def quantized_copy(fp32: Path, dest: Path, cpu: str, keep_fp32: list[str] | None) -> Path:
    shutil.copytree(fp32, dest)
    quantize_onnx(dest, keep_fp32, cpu=cpu)
    return dest


def emulated_copy(folder: Path, dest: Path) -> Path:
    """`folder` (a bundle) with its model.onnx run through emulate_vnni."""
    shutil.copytree(folder, dest)
    onnx.save(emulate_vnni(onnx.load(str(dest / MODEL_FILE))), str(dest / MODEL_FILE))
    return dest


def score(examples: Examples, checkpoint: Path, metric: str) -> tuple[list[Row], int]:
    """fp32 and every configuration x kernel; also returns the max length used."""
    with tempfile.TemporaryDirectory(prefix="int8-cpus-") as tmp:
        fp32 = export_onnx(checkpoint, Path(tmp) / "fp32").parent
        max_length = OnnxClassifier(fp32).max_length  # model_max_length: what export validates at
        fp32_nodes = sensitive_nodes(fp32)
        rows = [Row("fp32", f"native {cpu_model()}", logits_of(fp32, examples, max_length))]
        _progress(rows[-1], examples, metric)
        for cpu, bits in CPUS.items():
            for variant in VARIANTS:
                name = f"{cpu} {bits}, {variant}"
                folder = quantized_copy(fp32, Path(tmp) / name, cpu, fp32_nodes if variant == "int8-safe" else None)
                rows.append(Row(name, f"native {cpu_model()}", logits_of(folder, examples, max_length)))
                _progress(rows[-1], examples, metric)
                emulated = emulated_copy(folder, Path(tmp) / f"{name} vnni")
                rows.append(Row(name, EMULATED, logits_of(emulated, examples, max_length)))
                _progress(rows[-1], examples, metric)
                shutil.rmtree(folder)
                shutil.rmtree(emulated)
    return rows, max_length


def _progress(row: Row, examples: Examples, metric: str) -> None:
    value = compute_metric(metric, examples.labels, row.logits)
    print(f"  {row.configuration} / {row.kernel}: {metric} {value:.4f}", file=sys.stderr, flush=True)


def table(rows: list[Row], labels: np.ndarray, metric: str) -> str:
    """The markdown table: every row against the first (fp32)."""
    reference = rows[0].logits
    base = compute_metric(metric, labels, reference)
    header = ["configuration", "kernel", metric, "delta vs fp32 (points)", "disagreement with fp32",
              "max abs logit diff vs fp32"]
    cells = []
    for row in rows:
        value = compute_metric(metric, labels, row.logits)
        disagree = float((row.logits.argmax(1) != reference.argmax(1)).mean())
        cells.append([row.configuration, row.kernel, f"{value:.4f}", f"{100 * (value - base):+.2f}",
                      f"{100 * disagree:.2f}%", f"{max_logit_difference(reference, row.logits):.4f}"])
    return markdown_table(header, cells, "llrrrr")


def kernel_checks(rows: list[Row]) -> list[str]:
    """Native vs emulated per configuration: equal for 7-bit weights (a check of the emulator itself),
    apart for 8-bit ones on a host without VNNI (the int16 saturation)."""
    lines = []
    for native, emulated in zip(rows[1::2], rows[2::2]):
        diff = max_logit_difference(native.logits, emulated.logits)
        flips = int((native.logits.argmax(1) != emulated.logits.argmax(1)).sum())
        lines.append(f"- {native.configuration}: native vs emulated VNNI, max abs logit diff {diff:.2e}, "
                     f"{flips} of {len(native.logits)} predictions differ")
    return lines


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--checkpoint", type=Path, required=True, help="the (truncated) checkpoint to export")
    parser.add_argument("--run-dir", type=Path, required=True, help=f"a run folder with {ANALYSIS_FILE}")
    parser.add_argument("--max-examples", type=int, default=None)


def run(args: argparse.Namespace, out: Results) -> int:
    run_dir = read_run(args.run_dir)
    task = run_dir.task
    examples = examples_of(run_dir, args.max_examples)
    print(f"{len(examples)} {task.name} examples; exporting {args.checkpoint}", file=sys.stderr, flush=True)
    rows, max_length = score(examples, args.checkpoint, task.metric)
    body = [f"{len(examples):,} sentences (calibration + holdout), max length {max_length}. '{EMULATED}': the same "
            "model with `emulate_vnni` (exact int32 products, what a VNNI host computes).", "",
            table(rows, examples.labels, task.metric), "", *kernel_checks(rows)]
    out.write(f"dynamic int8 per CPU kind: {args.checkpoint} ({run_dir.analysis.model_type}), {task.name}",
              "\n".join(body))
    return 0
