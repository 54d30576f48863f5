"""A layerprune bundle against the full original model in plain int8: does pruning earn its place?

One run, one CPU, the same sentences for every row (measured by `layerprune.compare`, as `make demo`'s summary is):
- full fp32: the bundle's source checkpoint (manifest `source_checkpoint`), all its layers, exported to ONNX
  (`onnx_export.export_onnx`);
- full int8: that export quantized as `optimum-cli onnxruntime quantize --PRESET --per_channel` does for this CPU:
  optimum's ORTQuantizer with this CPU's dynamic per-channel preset, no node kept in fp32 (`compare.plain_int8`);
- the bundle: what `layerprune export` chose (pruned, maybe optimized and int8, maybe with a fallback to the
  original), opened through the bundle's own gate (hashes, int8 CPU kind; a bundle that failed validation is
  measured too, and the header says so), served as the server serves it;
- with a fallback, a fourth row: the bundle's pruned graph alone, never served: how fast and how close to the
  original the cut is before the original answers its unsure texts; and a line below the table: what the
  fallback would serve with the full int8 model in the fp32 original's place (from the rows' answers).
Below the table: would the gate certify the full int8? The gate's own forecast (`validate.forecast`) on the
calibration sentences of the bundle's run, at its tolerance and the per-variant alpha of export's error budget
with --quantize int8: the rule an int8 candidate of the bundle passed or failed.

Every row runs on onnxruntime with the same session options (`runtime.OnnxClassifier`: CPU provider, intra-op
threads = this machine's cores, ORT_ENABLE_ALL) at the bundle's max length, tokenization included.

Sentences: the bundle task's holdout as validation cut it (`validate.calibration_and_holdout` with the manifest's
resample seed, validation.json's count), which the depth was not chosen on. The metric and the agreement with the
original (the checkpoint in PyTorch, as the gate runs it) are over the whole holdout at batch 32 (int8's dynamic
scales depend on a batch's rows; batch 32 is what validation uses). Speed: --n sentences at batch 32 and
--n-batch1 at batch 1 (the holdout repeated in order when it has fewer), every row and batch size once per round,
--rounds interleaved rounds after a warm-up, the median round reported, by the wall clock and per CPU-second of
this process (onnxruntime's threads included). Speed-up: sentences/s at batch 32 over the full int8 model's.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from layerprune.architectures import total_layers
from layerprune.artifacts import Manifest
from layerprune.compare import (
    ALONE, BATCH, BUNDLE, FULL_FP32, FULL_INT8, ROUNDS, SENTENCES, SENTENCES_BATCH1, Comparison, compare,
)
from layerprune.errors import LayerpruneError
from layerprune.fallback import cascade
from layerprune.files import CONFIG_FILE, DEFAULT_BUNDLE, MODEL_FILE
from layerprune.scoring import compute_metric, predictions

from .common import markdown_table
from .harness import Results

PREDICTIONS_FILE = "predictions.json"  # in --keep DIR, beside the full model's exports


@dataclass
class Row:
    name: str
    layers: int
    quantization: str
    size_mb: float


def model_mb(folder: Path, model_file: str = MODEL_FILE) -> float:
    """The ONNX graph and its external weights, if any (MB, 10^6 bytes)."""
    paths = [folder / model_file, folder / f"{model_file}_data"]
    return sum(p.stat().st_size for p in paths if p.is_file()) / 1e6


def layers_of(config_path: Path) -> int:
    """The encoder depth the model's config.json declares (the export writes the truncated one)."""
    return total_layers(json.loads(config_path.read_text()))


def benchmark(bundle: Path, n: int, n_batch1: int, rounds: int,
              keep: Path | None = None) -> tuple[Comparison, list[Row]]:
    """The rows (full fp32, full int8, the bundle, its pruned graph alone with a fallback) on the bundle's holdout,
    and what each is. keep: a folder to leave the full model's exports (fp32/, int8/) and every row's holdout
    predictions (predictions.json) in."""
    with tempfile.TemporaryDirectory(prefix="pruned-vs-int8-") as scratch:
        work = Path(keep) if keep is not None else Path(scratch)
        result = compare(bundle, work, n, n_batch1, rounds, (FULL_FP32, FULL_INT8, BUNDLE, ALONE))
        names = list(result.logits)
        rows = [describe(result, name, bundle, work) for name in names]
        if keep is not None:
            holdout, regression = result.texts.holdout, result.texts.task.is_regression
            (work / PREDICTIONS_FILE).write_text(json.dumps({
                "holdout": result.texts.holdout_name, "texts": holdout.texts, "pairs": holdout.pairs,
                "labels": holdout.labels.tolist(),
                "predictions": {name: predictions(result.logits[name], regression).tolist() for name in names},
            }, indent=1))
    for name, speed in result.speeds.items():
        print(f"  {name}: {speed.batch1:.1f}/s at batch 1, {speed.batch32:.1f}/s at batch {BATCH}",
              file=sys.stderr, flush=True)
    return result, rows


def describe(result: Comparison, name: str, bundle: Path, work: Path) -> Row:
    """A row's depth, quantization and size, from its files."""
    m = result.manifest
    if name == FULL_FP32:
        return Row(name, layers_of(work / "fp32" / CONFIG_FILE), "fp32", model_mb(work / "fp32"))
    if name == FULL_INT8:
        return Row(name, layers_of(work / "int8" / CONFIG_FILE), result.int8_name, model_mb(work / "int8"))
    quantization = ", ".join(filter(None, [m.optimize, m.quantization_config])) or "fp32"
    size = model_mb(bundle, m.parts.model)
    second = m.parts.continuation or m.parts.original
    if name == BUNDLE and m.fallback is not None:  # both graphs are served, and both counted
        quantization += _fallback_words(m)
        size += model_mb(bundle, second) if second else 0.0
    return Row(name, layers_of(bundle / m.parts.config), quantization, size)


def _fallback_words(manifest: Manifest) -> str:
    """How the bundle's fallback answers the texts it sends on, for the quantization column."""
    rule = manifest.fallback
    if rule.continue_from is None:
        return f"; its least sure {rule.share:.0%} on to the full fp32 model"
    return (f"; its least sure {rule.share:.0%} continued from layer {rule.continue_from} through the full model's "
            f"layers above ({manifest.quantization_config or 'fp32'})")


def table(result: Comparison, rows: list[Row], bundle: Path, n: int, n_batch1: int, rounds: int) -> tuple[str, str]:
    """The title and the body: what was measured, the table, whether the gate would certify the full int8, and with
    a fallback the int8 line."""
    m, texts = result.manifest, result.texts
    metric, holdout = texts.task.metric, texts.holdout
    int8_speed = result.speeds[FULL_INT8].batch32
    gate = "passed" if m.servable else "FAILED (measured anyway)"
    header = ["model", "layers", "quantization", "model MB", "sentences/s batch 1", f"sentences/s batch {BATCH}",
              "sentences/CPU-s batch 1", f"sentences/CPU-s batch {BATCH}", metric, "agreement with the original",
              f"speed-up vs full int8 (batch {BATCH})"]
    cells = []
    for r in rows:
        speed, agree = result.speeds[r.name], result.agreement(r.name)
        cells.append([r.name, r.layers, r.quantization, f"{r.size_mb:.1f}", f"{speed.batch1:.1f}",
                      f"{speed.batch32:.1f}", f"{speed.cpu_batch1:.1f}", f"{speed.cpu_batch32:.1f}",
                      f"{result.metric(r.name):.4f}", "n/a" if agree is None else f"{100 * agree:.1f}%",
                      f"{speed.batch32 / int8_speed:.2f}x"])
    lines = [
        f"onnxruntime, CPU provider, {result.threads} intra-op threads, every row. Source checkpoint: "
        f"{m.source_checkpoint}; full int8: {result.int8_name} (what `optimum-cli onnxruntime quantize` gives for "
        f"this CPU, no node kept in fp32). Bundle validation: {gate}.",
        f"Sentences: {texts.holdout_name}, {len(holdout)} sentences ({metric} and agreement with the original in "
        f"PyTorch, batch {BATCH}); speed: {n} sentences at batch {BATCH} and {n_batch1} at batch 1 (holdout "
        f"repeated in order), the median of {rounds} interleaved rounds after a warm-up, max length {m.max_length}, "
        "tokenization included; CPU-s: this process's CPU time, onnxruntime's threads included.",
        "",
        markdown_table(header, cells, "lrlrrrrrrrr"),
        "",
        f"Would the gate certify the full int8? {result.verdict()}.",
    ]
    if m.fallback is not None:
        lines += ["", _to_int8(result)]
    title = (f"pruned vs plain int8: {bundle} ({m.model_type}, {m.depth} of {m.total_layers} layers, heal={m.heal}), "
             f"task {texts.task.name}")
    return title, "\n".join(lines)


def _to_int8(result: Comparison) -> str:
    """What the fallback would serve with the full int8 model in place of the fp32 original, from the rows'
    own answers: the pruned graph's where it is sure, the full int8 model's (run on whole batches) where not."""
    task = result.texts.task
    served = cascade(result.logits[ALONE], result.logits[FULL_INT8], result.manifest.fallback.threshold)
    value = compute_metric(task.metric, result.texts.holdout.labels, served, task.is_regression)
    agree = float(np.mean(predictions(served, False) == predictions(result.original, False)))
    return (f"Had the texts it is unsure of gone to the full int8 model instead (not served; the int8 row's "
            f"answers there): {task.metric} {value:.4f}, agreement with the original {100 * agree:.1f}%.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="a bundle folder `layerprune export` wrote")
    parser.add_argument("--n", type=int, default=SENTENCES, help=f"sentences timed at batch {BATCH}")
    parser.add_argument("--n-batch1", type=int, default=SENTENCES_BATCH1, help="sentences timed at batch 1")
    parser.add_argument("--rounds", type=int, default=ROUNDS, help="interleaved timing rounds (the median is reported)")
    parser.add_argument("--keep", type=Path, default=None, help="leave the full model's exports (fp32/, int8/) "
                        f"and every row's holdout predictions ({PREDICTIONS_FILE}) in this folder")


def run(args: argparse.Namespace, out: Results) -> int:
    if min(args.n, args.n_batch1, args.rounds) < 1:
        raise LayerpruneError("--n, --n-batch1 and --rounds must be at least 1")
    result, rows = benchmark(args.bundle, args.n, args.n_batch1, args.rounds, args.keep)
    out.write(*table(result, rows, args.bundle, args.n, args.n_batch1, args.rounds))
    return 0
