"""ONNX export of a (truncated) sequence-classification checkpoint, through optimum-onnx.

A bundle folder holds `model.onnx` (dynamic batch and sequence axes, one output: `logits`), the
checkpoint's `config.json` and its tokenizer files, `tokenizer.json` among them: the torch-free
`runtime` reads that with the `tokenizers` library. `optimize_onnx` and `quantize_onnx` rewrite
`model.onnx` in place, so a bundle always serves exactly one model file.

This module imports torch and optimum; the server never imports it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np

from .files import (
    CONFIG_FILE, MODEL_DATA_FILE, MODEL_FILE, OPTIMIZED_MODEL_FILE, QUANTIZED_MODEL_FILE, QUANTIZED_TYPED_MODEL_FILE,
    TOKENIZER_FILE, TYPED_MODEL_DATA_FILE, TYPED_MODEL_FILE,
)
from .cpu import cpu_kind
from .errors import LayerpruneError, ModelError, first_line
from .models import has_classification_head, load_config

if TYPE_CHECKING:
    from optimum.onnxruntime.configuration import QuantizationConfig

OptimizationLevel = Literal["O1", "O2", "O3"]
ORT_DOMAIN = "com.microsoft"  # the operator domain of onnxruntime's own (contrib) ops

# optimum maps all eight of models.ARCHITECTURES to onnxruntime's "bert" fusions (ORTConfigManager).
# Checked on the tiny models of tests/conftest.py (optimum 2.1, onnxruntime 1.32): O1, O2 and O3 run and
# keep parity for every type. At O2/O3 bert, roberta, xlm-roberta, distilbert, electra and albert get the
# fused Attention op; deberta-v2 (disentangled attention) and mpnet (relative position bias) keep their
# attention unfused and get only the SkipLayerNormalization and (Bias)Gelu fusions.


def export_onnx(checkpoint_dir: Path, out_dir: Path) -> Path:
    """Export `checkpoint_dir` to `out_dir/model.onnx` (fp32) with its config and tokenizer beside it.

    `out_dir` may exist and hold other files (a bundle under construction); only the exported files
    are written. The export goes to a temporary folder first, so a failure leaves no model.onnx.
    optimum's own validation is skipped: callers measure parity on real examples, which is stricter
    than optimum's random inputs and does not run the model twice more.
    """
    checkpoint_dir, out_dir = Path(checkpoint_dir), Path(out_dir)
    if not (checkpoint_dir / CONFIG_FILE).is_file():
        raise ModelError(f"{checkpoint_dir} is not a checkpoint directory (no config.json)")
    _, config = load_config(checkpoint_dir)  # refuses model types outside models.ARCHITECTURES
    if not has_classification_head(config):
        raise ModelError(f"{checkpoint_dir} has no sequence-classification head; only classifiers are exported")
    with _staging(out_dir, "export") as tmp, _quiet():
        from optimum.exporters.onnx import main_export

        try:
            main_export(
                str(checkpoint_dir), tmp, task="text-classification", framework="pt",
                library_name="transformers", dtype="fp32", device="cpu", do_validation=False,
                local_files_only=True,
            )
        except Exception as exc:  # optimum raises ValueError, KeyError, RuntimeError, torch errors ...
            raise ModelError(f"ONNX export of {checkpoint_dir} failed: {first_line(exc)}") from exc
        for name in (MODEL_FILE, CONFIG_FILE, TOKENIZER_FILE):
            if not (tmp / name).is_file():
                why = " (the runtime needs a fast tokenizer)" if name == TOKENIZER_FILE else ""
                raise ModelError(f"ONNX export of {checkpoint_dir} wrote no {name}{why}")
        if not (tmp / MODEL_DATA_FILE).exists():  # weights inside model.onnx: drop an older export's
            (out_dir / MODEL_DATA_FILE).unlink(missing_ok=True)
        _move_files(tmp, out_dir)
    return out_dir / MODEL_FILE


def optimize_onnx(onnx_dir: Path, level: OptimizationLevel) -> None:
    """Replace `onnx_dir/model.onnx` by onnxruntime's graph optimization at `level` (for CPU).

    O1: basic graph rewrites (constant folding, redundant nodes); O2: plus the transformer fusions
    (attention, skip-LayerNorm, bias-GELU); O3: plus the tanh GELU approximation, not exact for models
    with erf GELU (most BERTs): expect logits to move by more than O1/O2 do.
    """
    onnx_dir = Path(onnx_dir)
    _require_model(onnx_dir)
    with _staging(onnx_dir, "optimize") as tmp, _quiet():
        from optimum.onnxruntime import AutoOptimizationConfig, ORTOptimizer
        from optimum.onnxruntime.utils import ORTConfigManager

        model_type = _model_type(onnx_dir)
        if model_type not in ORTConfigManager._conf:
            raise LayerpruneError(f"onnxruntime has no graph optimization for model type '{model_type}'")
        try:
            config = AutoOptimizationConfig.with_optimization_level(level)
            ORTOptimizer.from_pretrained(onnx_dir, file_names=[MODEL_FILE]).optimize(config, tmp)
        except Exception as exc:
            raise LayerpruneError(f"onnxruntime {level} optimization failed: {first_line(exc)}") from exc
        _replace_model(tmp / OPTIMIZED_MODEL_FILE, onnx_dir)


def quantization_config(cpu: str | None = None) -> tuple[str, QuantizationConfig]:
    """optimum's dynamic int8 configuration for `cpu` (default: the CPU this runs on, see `cpu_kind`),
    with a short name for the manifest. Quantization targets the exporting machine's CPU family.

    All dynamic (activations quantized per batch as they come, no calibration data) with per-channel
    weights: per-tensor weights round too coarsely (docs/results.md, "int8").
    - AVX-512 with VNNI: optimum's `avx512` preset, u8 activations x s8 weights, 8-bit. VPDPBUSD sums the
      products into int32: nothing saturates.
    - AVX2, or AVX-512 without VNNI: u8 x s8 with 7-bit weights (reduce_range). Without VNNI onnxruntime's
      u8 x s8 kernel (VPMADDUBSW) sums pairs of products into saturating int16; 7-bit weights keep every
      pair sum in range (255 * 64 * 2 < 32767), which is onnxruntime's own advice for CPUs without VNNI.
      optimum's `avx2` preset avoids the saturation with u8 weights instead, whose kernel widens to int16
      first and is slower. 7-bit weights compute the same on every x86 kernel; 8-bit ones only on VNNI
      (see `cpu.serves_int8_of`).
    - aarch64 / arm64: optimum's `arm64` preset (u8 x s8; ARM's dot-product kernels do not saturate).
    - ppc64le: optimum's `ppc64le` preset.

    What each configuration costs against fp32, and what 8-bit weights do on a kernel without VNNI
    (benchmarks/int8_cpus.py, VNNI emulated exactly): docs/results.md, "int8".
    """
    from optimum.onnxruntime import AutoQuantizationConfig

    cpu = cpu or cpu_kind()
    if cpu == "avx512-vnni":
        return "avx512-vnni dynamic per-channel u8/s8", AutoQuantizationConfig.avx512(is_static=False, per_channel=True)
    if cpu in ("avx512", "avx2"):  # optimum's avx2 preset differs only in its u8 weights
        config = AutoQuantizationConfig.avx512(is_static=False, per_channel=True, reduce_range=True)
        return f"{cpu} dynamic per-channel u8/s8 7-bit", config
    if cpu == "arm64":
        return "arm64 dynamic per-channel u8/s8", AutoQuantizationConfig.arm64(is_static=False, per_channel=True)
    if cpu == "ppc64le":
        return "ppc64le dynamic per-channel u8/s8", AutoQuantizationConfig.ppc64le(is_static=False, per_channel=True)
    raise LayerpruneError(f"no int8 quantization preset for this CPU ({cpu}); optimum has avx512, avx2, arm64, ppc64le")


# The second matrix product of each layer's feed-forward block, per exporter naming: BERT-likes (BERT,
# RoBERTa, ELECTRA, MPNet, DeBERTa) 'output/dense', DistilBERT 'ffn/lin2', ALBERT 'ffn_output'.
FFN_OUTPUT = re.compile(r"/(?<!attention/)output/dense/|/ffn/lin2/|/ffn_output/")
IN_A_LAYER = re.compile(r"/layer\.\d+/|/albert_layers\.\d+/")  # else the embeddings' or the head's


FP32_KEPT = ", feed-forward outputs and head in fp32"  # ends the name of an int8 configuration that keeps nodes in fp32


def sensitive_nodes(onnx_dir: Path) -> list[str]:
    """The matrix products where int8 rounding moves predictions most: each layer's feed-forward output
    projection (its input, after GELU, has the outliers that a per-tensor activation scale rounds away;
    Bondarenko et al., 2021) and the head's (pooler and classifier: every product outside the layers).
    Keeping these in fp32 roughly halves int8's disagreement with fp32, more than keeping the last layer and
    head instead (docs/archive.md, "int8 variants on MiniLM, 5 layers"). The exporter names nodes after
    the PyTorch modules ('/bert/encoder/layer.4/output/dense/MatMul'), which is what this reads."""
    import onnx

    model = onnx.load(str(Path(onnx_dir) / MODEL_FILE), load_external_data=False)
    products = [n for n in model.graph.node if n.op_type in ("MatMul", "Gemm", "FusedMatMul")]
    kept = [n for n in products if FFN_OUTPUT.search(n.name) or not IN_A_LAYER.search(n.name)]
    # The quantizer rewrites a Gemm as a MatMul named "<gemm>_MatMul" + Add before it looks at exclusions.
    return [name for n in kept for name in ([n.name, f"{n.name}_MatMul"] if n.op_type == "Gemm" else [n.name])]


def quantize_onnx(onnx_dir: Path, keep_fp32: list[str] | None = None, cpu: str | None = None) -> str:
    """Replace `onnx_dir/model.onnx` by its dynamic int8 quantization for CPU kind `cpu` (default: this one),
    leaving the nodes named in `keep_fp32` in float; return the configuration's name. Quantized by
    `optimum_quantize`, as optimum-cli quantizes the same graph."""
    onnx_dir = Path(onnx_dir)
    _require_model(onnx_dir)
    name, config = quantization_config(cpu)
    if keep_fp32:
        config = dataclasses.replace(config, nodes_to_exclude=list(keep_fp32))
        name += FP32_KEPT
    with _staging(onnx_dir, "quantize") as tmp:
        try:
            quantized = optimum_quantize(onnx_dir, config, tmp)
        except Exception as exc:
            raise LayerpruneError(f"int8 quantization ({name}) failed: {first_line(exc)}") from exc
        _replace_model(quantized, onnx_dir)
    return name


def optimum_quantize(onnx_dir: Path, config: QuantizationConfig, save_dir: Path) -> Path:
    """`onnx_dir/model.onnx` quantized with `config` by optimum's ORTQuantizer into `save_dir`, as `optimum-cli
    onnxruntime quantize` quantizes it; returns the quantized graph's path (the folder's config and tokenizer
    files are written beside it).

    The graph is quantized as it is, unless it holds onnxruntime's own ops (domain com.microsoft: Attention,
    SkipLayerNormalization... after O2/O3). onnx's shape inference cannot type their outputs, and the quantizer
    then refuses the MatMuls behind them, so such a graph goes through onnxruntime's symbolic shape inference
    first, which records every tensor's type. Only there: the recorded types change how onnxruntime fuses the
    quantized graph when it loads it, so a plain graph typed first predicts a little differently from the same
    graph quantized by optimum-cli."""
    import onnx
    from optimum.onnxruntime import ORTQuantizer
    from transformers import AutoConfig

    onnx_dir, save_dir = Path(onnx_dir), Path(save_dir)
    source, quantized = onnx_dir / MODEL_FILE, save_dir / QUANTIZED_MODEL_FILE
    header = onnx.load(str(source), load_external_data=False)
    external = _uses_external_data(header)
    with _quiet():
        if any(node.domain == ORT_DOMAIN for node in header.graph.node):
            from onnxruntime.quantization.shape_inference import quant_pre_process

            typed = save_dir / TYPED_MODEL_FILE
            quant_pre_process(source, typed, skip_optimization=True, auto_merge=True,
                              save_as_external_data=external, all_tensors_to_one_file=True,
                              external_data_location=TYPED_MODEL_DATA_FILE)
            source, quantized = typed, save_dir / QUANTIZED_TYPED_MODEL_FILE
        ORTQuantizer(source, config=AutoConfig.from_pretrained(onnx_dir)).quantize(
            config, save_dir, use_external_data_format=external)
    return quantized


def faithful_config(cpu: str | None = None) -> tuple[str, bool]:
    """Faithful int8's configuration for CPU kind `cpu` (default: this one): its name for the manifest, and whether
    its weights are 7-bit (reduce_range). The weights' range is plain int8's for that CPU (7-bit on AVX2, 8-bit on
    VNNI), so the manifest's int8 CPU kind means the same for both."""
    cpu = cpu or cpu_kind()
    reduce_range = quantization_config(cpu)[1].reduce_range
    return f"{cpu} faithful per-token u8/s8" + (" 7-bit" if reduce_range else ""), reduce_range


def quantize_faithful(onnx_dir: Path, batches: list[dict[str, np.ndarray]], cpu: str | None = None) -> str:
    """Replace `onnx_dir/model.onnx` (fp32, before any O2/O3 fusion: the transform reads each MatMul and its bias
    Add) by its faithful int8 (layerprune.faithful_int8) for CPU kind `cpu` (default: this one), calibrated on
    `batches` (session feeds); return the configuration's name (`faithful_config`)."""
    import onnx
    from tqdm.auto import tqdm

    from .faithful_int8 import faithful_int8

    onnx_dir = Path(onnx_dir)
    _require_model(onnx_dir)
    name, reduce_range = faithful_config(cpu)
    model = onnx.load(str(onnx_dir / MODEL_FILE))
    # The bar counts the calibration pass; the GPTQ rounding and the smoothing search after it take minutes more.
    calibration = tqdm(batches, desc="faithful int8: calibration pass, then GPTQ and smoothing", unit="batch",
                       leave=False)
    quantized = faithful_int8(model, calibration, reduce_range=reduce_range)
    with _staging(onnx_dir, "faithful") as tmp:
        try:
            onnx.save(quantized, str(tmp / MODEL_FILE))
        except ValueError as exc:  # a protobuf over 2 GB
            raise LayerpruneError(f"int8 quantization ({name}) failed: {first_line(exc)}") from exc
        _replace_model(tmp / MODEL_FILE, onnx_dir)
    return name


def max_logit_difference(torch_logits: np.ndarray, onnx_logits: np.ndarray) -> float:
    """Parity of two runs on the same examples: the largest absolute difference of any logit."""
    a, b = np.asarray(torch_logits, dtype=np.float64), np.asarray(onnx_logits, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"logits of shapes {a.shape} and {b.shape} cannot be compared")
    return float(np.abs(a - b).max()) if a.size else 0.0


# --- helpers -------------------------------------------------------------------------------------


def _require_model(onnx_dir: Path) -> None:
    for name in (MODEL_FILE, CONFIG_FILE):
        if not (onnx_dir / name).is_file():
            raise LayerpruneError(f"{onnx_dir} holds no {name}; export it with export_onnx first")


def _model_type(onnx_dir: Path) -> str:
    return str(json.loads((onnx_dir / CONFIG_FILE).read_text()).get("model_type", "unknown"))


@contextlib.contextmanager
def _staging(parent: Path, what: str) -> Iterator[Path]:
    """A temporary folder inside `parent` (same filesystem: moves are renames), always removed."""
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{what}-tmp-", dir=parent))
    except OSError as exc:
        raise LayerpruneError(f"cannot write to {parent}: {exc.strerror}") from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_files(src: Path, dst: Path) -> None:
    """Move every file of the flat folder `src` into `dst`, replacing files of the same name."""
    for path in sorted(src.iterdir()):
        if path.is_file():
            os.replace(path, dst / path.name)


def _replace_model(new_model: Path, onnx_dir: Path) -> None:
    """Make `new_model` the folder's model.onnx; the tool's other outputs (config copies, ort_config.json)
    stay behind in the staging folder. A model with external weights (> 2 GB) is re-saved so that its
    data file is named after model.onnx, as optimum's loader expects."""
    if not new_model.is_file():
        raise LayerpruneError(f"onnxruntime wrote no {new_model.name}")
    import onnx

    header = onnx.load(str(new_model), load_external_data=False)
    old_data = onnx_dir / MODEL_DATA_FILE
    if not _uses_external_data(header):
        os.replace(new_model, onnx_dir / MODEL_FILE)
        old_data.unlink(missing_ok=True)
        return
    model = onnx.load(str(new_model))  # with its weights, from beside new_model
    staged = new_model.with_name(MODEL_FILE)
    onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=MODEL_DATA_FILE)
    os.replace(staged.with_name(MODEL_DATA_FILE), old_data)
    os.replace(staged, onnx_dir / MODEL_FILE)


def _uses_external_data(model) -> bool:
    import onnx

    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer)


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the export's chatter: tracer and deprecation warnings, optimum/transformers/onnxruntime
    info logs. Errors still raise; the levels are restored afterwards."""
    import transformers
    from optimum.utils import logging as optimum_logging

    loggers = [logging.getLogger(name) for name in ("optimum", "transformers", "torch.onnx", "onnxruntime")]
    loggers.append(logging.getLogger())  # onnxruntime's quantization tools log to the root logger
    levels = [lg.level for lg in loggers]
    tf_level, opt_level = transformers.logging.get_verbosity(), optimum_logging.get_verbosity()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for lg in loggers:
                lg.setLevel(logging.ERROR)
            transformers.logging.set_verbosity_error()
            optimum_logging.set_verbosity_error()
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)
        transformers.logging.set_verbosity(tf_level)
        optimum_logging.set_verbosity(opt_level)
