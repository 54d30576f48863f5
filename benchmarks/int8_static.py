"""Static int8 (activation ranges calibrated beforehand, QDQ) vs the dynamic int8 export uses, on this CPU.

    python benchmarks/int8_static.py --checkpoint lp-run/truncated --run-dir lp-run [--max-examples N]
                                     [--calibration-texts 256] [--out benchmarks/results/int8_static.md]

Issue 8 asked whether static int8 with calibration data keeps the metric better, or runs faster, than the
dynamic int8 export picks from (`onnx_export.quantization_config`). Every configuration is quantized by
optimum's ORTQuantizer from one fp32 ONNX export of the checkpoint, with this CPU's weight range (7-bit
without VNNI, see `quantization_config`), per-channel weights, "all int8" and "int8-safe"
(`sensitive_nodes` kept fp32). Static ranges come from optimum's MinMax calibration
over the task's first --calibration-texts train texts: texts the scored examples do not include.

Scored on the task's calibration + holdout examples (rt-polarity: 2,112 sentences) at the model's max
length: the metric, its delta and the disagreement vs fp32, and sentences per second (onnxruntime, batch
32, the threads of this CPU), each configuration run once after the others in one process.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from int8_cpus import examples_of, quantized_copy  # noqa: E402
from provenance import provenance, publish, refuses_in_one_line  # noqa: E402
from layerprune.export import load_analysis  # noqa: E402
from layerprune.cpu import cpu_kind  # noqa: E402
from layerprune.data import Examples, load_examples  # noqa: E402
from layerprune.files import (  # noqa: E402
    AUGMENTED_MODEL_FILE, DEFAULT_RUN_DIR, INT8_STATIC_RESULTS, MODEL_FILE, QUANTIZED_TYPED_MODEL_FILE,
    RESULTS_DIR, TRUNCATED_DIR, TYPED_MODEL_FILE,
)
from layerprune.onnx_export import (  # noqa: E402
    export_onnx, quantization_config, sensitive_nodes,
)
from layerprune.runtime import OnnxClassifier  # noqa: E402
from layerprune.scoring import compute_metric  # noqa: E402

# optimum's histogram calibrators (percentile, entropy) stop at a constant activation of these exports
# ("Too many bins for data range", onnxruntime 1.x): MinMax is the one that runs.
CALIBRATIONS = ("minmax",)


def static_copy(fp32: Path, dest: Path, texts: Examples, method: str, keep_fp32: list[str] | None,
                cpu: str) -> Path:
    """`fp32` quantized statically (QDQ, per-channel, CPU kind `cpu`'s weight range), activation ranges from
    optimum's `method` calibration over `texts`."""
    from datasets import Dataset
    from onnxruntime.quantization.shape_inference import quant_pre_process
    from optimum.onnxruntime import ORTQuantizer
    from optimum.onnxruntime.configuration import AutoCalibrationConfig
    from transformers import AutoConfig, AutoTokenizer

    shutil.copytree(fp32, dest)
    _, dynamic = quantization_config(cpu)
    config = dataclasses.replace(_static(dynamic), nodes_to_exclude=list(keep_fp32 or []))
    typed = dest / TYPED_MODEL_FILE
    quant_pre_process(dest / MODEL_FILE, typed, skip_optimization=True, auto_merge=True)
    quantizer = ORTQuantizer(typed, config=AutoConfig.from_pretrained(dest))
    inputs = OnnxClassifier(dest).input_names
    # one padded length for all: the histogram (percentile) calibrators stack every run's activations
    encoded = AutoTokenizer.from_pretrained(dest)(texts.texts, texts.pairs, truncation=True, padding="longest")
    dataset = Dataset.from_dict({k: v for k, v in encoded.items() if k in inputs})
    calibration = getattr(AutoCalibrationConfig, method)(dataset)
    with tempfile.TemporaryDirectory(prefix="augmented-") as tmp:
        ranges = quantizer.fit(dataset, calibration, onnx_augmented_model_name=Path(tmp) / AUGMENTED_MODEL_FILE,
                               operators_to_quantize=config.operators_to_quantize)
    quantizer.quantize(config, dest, calibration_tensors_range=ranges)
    os.replace(dest / QUANTIZED_TYPED_MODEL_FILE, dest / MODEL_FILE)
    typed.unlink()
    return dest


def _static(dynamic):
    """The dynamic configuration's weight settings, made static: QDQ, QLinear ops, u8 asymmetric activations,
    and the operators dynamic quantizes (MatMul, Gather, ...). optimum's static default quantizes every op
    QDQ knows, Where and LayerNormalization included: the additive attention mask (float32's minimum) then
    shares a range with real activations, and MPNet fell to chance (figures: see docs/results.md)."""
    from onnxruntime.quantization import QuantFormat, QuantizationMode
    from optimum.onnxruntime.configuration import ORT_DEFAULT_OPS_STATIC_QUANTIZATION_QDQ

    operators = [op for op in dynamic.operators_to_quantize if op in ORT_DEFAULT_OPS_STATIC_QUANTIZATION_QDQ]
    return dataclasses.replace(dynamic, is_static=True, format=QuantFormat.QDQ, mode=QuantizationMode.QLinearOps,
                               operators_to_quantize=operators)


def run(folder: Path, examples: Examples, max_length: int) -> tuple[np.ndarray, float]:
    """Logits of `examples` and sentences per second (one warm-up batch first)."""
    model = OnnxClassifier(folder, max_length=max_length)
    model.logits(examples.texts[:32], None if examples.pairs is None else examples.pairs[:32], batch_size=32)
    started = time.perf_counter()
    logits = model.logits(examples.texts, examples.pairs, batch_size=32)
    return logits, len(examples) / (time.perf_counter() - started)


@refuses_in_one_line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, default=ROOT / DEFAULT_RUN_DIR / TRUNCATED_DIR)
    parser.add_argument("--run-dir", type=Path, default=ROOT / DEFAULT_RUN_DIR)
    parser.add_argument("--max-examples", type=int)
    parser.add_argument("--calibration-texts", type=int, default=256)
    parser.add_argument("--out", type=Path, default=ROOT / RESULTS_DIR / INT8_STATIC_RESULTS)
    args = parser.parse_args(argv)
    task = load_analysis(args.run_dir).task_config
    examples = examples_of(task, args.max_examples)
    calibration_texts = load_examples(task, task.train_split).head(args.calibration_texts)

    rows = []
    with tempfile.TemporaryDirectory(prefix="int8-static-") as tmp:
        fp32 = export_onnx(args.checkpoint, Path(tmp) / "fp32").parent
        max_length = OnnxClassifier(fp32).max_length
        fp32_nodes = sensitive_nodes(fp32)
        cpu = cpu_kind()  # one weight range for every row, dynamic and static
        builds = [("fp32", lambda dest: shutil.copytree(fp32, dest))]
        for variant, excluded in (("all int8", None), ("int8-safe", fp32_nodes)):
            builds.append((f"dynamic, {variant}", lambda dest, e=excluded: quantized_copy(fp32, dest, cpu, e)))
            for method in CALIBRATIONS:
                builds.append((f"static QDQ {method}, {variant}",
                               lambda dest, m=method, e=excluded: static_copy(fp32, dest, calibration_texts, m, e, cpu)))
        for i, (name, build) in enumerate(builds):
            folder = Path(tmp) / f"candidate-{i}"
            build(folder)
            logits, speed = run(folder, examples, max_length)
            size = (folder / MODEL_FILE).stat().st_size / 1e6
            rows.append((name, logits, speed, size))
            print(f"  {name}: {compute_metric(task.metric, examples.labels, logits):.4f}, {speed:.1f}/s",
                  file=sys.stderr, flush=True)
            if name != "fp32":
                shutil.rmtree(folder)

    lines = [f"# static vs dynamic int8: {args.checkpoint}, task {task.name}, {len(examples)} examples, max length "
             f"{max_length}", "", f"{provenance()}; weights: "
             f"{quantization_config(cpu)[0]}; static ranges from {len(calibration_texts)} train texts", "",
             f"| configuration | {task.metric} | delta vs fp32 (points) | disagreement with fp32 | sentences/s "
             "| speed vs fp32 | model MB |", "|---|---|---|---|---|---|---|"]
    base_logits, base_speed = rows[0][1], rows[0][2]
    base = compute_metric(task.metric, examples.labels, base_logits)
    for name, logits, speed, size in rows:
        value = compute_metric(task.metric, examples.labels, logits)
        disagree = float((logits.argmax(1) != base_logits.argmax(1)).mean())
        lines.append(f"| {name} | {value:.4f} | {100 * (value - base):+.2f} | {100 * disagree:.2f}% | {speed:.1f} "
                     f"| {speed / base_speed:.2f}x | {size:.0f} |")
    publish("\n".join(lines), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
