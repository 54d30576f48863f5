"""A layerprune bundle against the full original model in plain int8: does pruning earn its place?

One run, one CPU, the same sentences for every row:
- full fp32: the bundle's source checkpoint (manifest `source_checkpoint`), all its layers, exported to ONNX
  (`onnx_export.export_onnx`);
- full int8: that export quantized as `optimum-cli onnxruntime quantize` would for this CPU: optimum's dynamic
  int8 for `cpu.cpu_kind()` (`onnx_export.quantize_onnx`, no node kept in fp32);
- the bundle: what `layerprune export` chose (pruned, maybe optimized and int8, maybe with a fallback to the
  original), opened through the bundle's own gate (hashes, int8 CPU kind; a bundle that failed validation is
  measured too, and the header says so), served as the server serves it;
- with a fallback, a fourth row: the bundle's pruned graph alone, never served: how fast and how close to the
  original the cut is before the original answers its unsure texts; and a line below the table: what the
  fallback would serve with the full int8 model in the fp32 original's place (from the rows' answers).

Every row runs on onnxruntime with the same session options (`runtime.OnnxClassifier`: CPU provider, intra-op
threads = this machine's cores, ORT_ENABLE_ALL) at the bundle's max length, tokenization included.

Sentences: the bundle task's holdout (`validate.calibration_and_holdout` with the manifest's resample seed, as
`validate_bundle` cuts it; all of it, uncapped), which the depth was not chosen on. The metric and the
agreement with the full fp32 model's predictions are over the whole holdout at batch 32 (int8's dynamic scales
depend on a batch's rows; batch 32 is what validation uses). Speed: --n sentences at batch 32 and --n-batch1 at
batch 1 (the holdout repeated in order when it has fewer), every row and batch size once per round, --rounds
interleaved rounds after a warm-up, the median round reported. Speed-up: sentences/s at batch 32 over the full
int8 model's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from layerprune.architectures import total_layers
from layerprune.artifacts import AnalysisReport, Manifest, load_artifact
from layerprune.bundle import open_bundle
from layerprune.cpu import cpu_kind
from layerprune.data import Examples
from layerprune.errors import LayerpruneError
from layerprune.fallback import cascade
from layerprune.files import CONFIG_FILE, DEFAULT_BUNDLE, MODEL_FILE
from layerprune.runtime import OnnxClassifier
from layerprune.scoring import compute_metric, predictions
from layerprune.validate import calibration_and_holdout

from .common import markdown_table, timed_rounds
from .harness import Results

PREDICTIONS_FILE = "predictions.json"  # in --keep DIR, beside the full model's exports
FULL_FP32, FULL_INT8, BUNDLE = "full fp32", "full int8", "bundle"
ALONE = "its pruned graph alone"  # a fallback bundle's pruned graph without the original: what it serves is BUNDLE
BATCH = 32


@dataclass
class Row:
    name: str
    layers: int
    quantization: str
    size_mb: float
    logits: np.ndarray  # on the holdout, at batch 32
    per_s_batch1: float = float("nan")
    per_s_batch32: float = float("nan")


@dataclass
class Result:
    manifest: Manifest
    task_name: str
    metric: str
    regression: bool
    holdout: Examples
    holdout_name: str
    threads: int
    int8_name: str
    rows: list[Row]


def cycled(examples: Examples, n: int) -> Examples:
    """The first n examples, the list repeated in order when it is shorter."""
    return examples.select(np.arange(n) % len(examples))


def model_mb(folder: Path, model_file: str = MODEL_FILE) -> float:
    """The ONNX graph and its external weights, if any (MB, 10^6 bytes)."""
    paths = [folder / model_file, folder / f"{model_file}_data"]
    return sum(p.stat().st_size for p in paths if p.is_file()) / 1e6


def layers_of(config_path: Path) -> int:
    """The encoder depth the model's config.json declares (the export writes the truncated one)."""
    return total_layers(json.loads(config_path.read_text()))


def benchmark(bundle: Path, n: int, n_batch1: int, rounds: int, keep: Path | None = None) -> Result:
    """The rows (full fp32, full int8, the bundle, its pruned graph alone with a fallback) on the bundle's
    holdout. keep: a folder to leave the full model's exports (fp32/, int8/) and every row's holdout predictions
    (predictions.json) in."""
    from layerprune.models import resolve_checkpoint
    from layerprune.onnx_export import export_onnx, quantize_onnx

    bundle = Path(bundle)
    if not bundle.is_dir():
        raise LayerpruneError(f"{bundle} is not a bundle folder (run `layerprune export` first)")
    threads = os.cpu_count() or 1
    session = dict(providers=["CPUExecutionProvider"], threads=threads)
    opened = open_bundle(bundle, allow_unvalidated=True, **session)
    manifest = opened.manifest
    analysis = load_artifact(AnalysisReport, bundle / manifest.parts.analysis)
    task = analysis.task_config
    glue_dir = Path(analysis.glue_dir) if analysis.glue_dir else None
    parts = calibration_and_holdout(task, glue_dir, None, manifest.resample_seed)
    holdout = parts.holdout
    checkpoint = Path(resolve_checkpoint(manifest.source_checkpoint))
    print(f"{len(holdout)} holdout sentences of {task.name}; exporting {checkpoint} (fp32, then int8 for "
          f"{cpu_kind()})", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="pruned-vs-int8-") as scratch:
        work = Path(keep) if keep is not None else Path(scratch)
        fp32, int8 = work / "fp32", work / "int8"
        for folder in (fp32, int8):
            if folder.exists():
                shutil.rmtree(folder)
        export_onnx(checkpoint, fp32)
        shutil.copytree(fp32, int8)
        int8_name = quantize_onnx(int8, None, cpu=cpu_kind())

        rows, models = [], {}
        builds = [(FULL_FP32, fp32, "fp32"), (FULL_INT8, int8, int8_name), (BUNDLE, bundle, None),
                  *([(ALONE, bundle, None)] if manifest.fallback is not None else [])]
        for name, folder, quantization in builds:
            if name in (BUNDLE, ALONE):
                model_file, config_file = manifest.parts.model, manifest.parts.config
                quantization = ", ".join(filter(None, [manifest.optimize, manifest.quantization_config])) or "fp32"
                model = opened.classifier if name == BUNDLE else OnnxClassifier(
                    bundle, max_length=manifest.max_length, labels=manifest.labels, parts=manifest.parts, **session)
                if name == BUNDLE and manifest.fallback is not None:  # both graphs are served, and both counted below
                    quantization += _fallback_words(manifest)
            else:
                model = OnnxClassifier(folder, max_length=manifest.max_length, labels=manifest.labels, **session)
                model_file, config_file = MODEL_FILE, CONFIG_FILE
            logits = model.logits(holdout.texts, holdout.pairs, batch_size=BATCH)
            second = manifest.parts.continuation or manifest.parts.original
            size = model_mb(folder, model_file) + (model_mb(folder, second) if name == BUNDLE and second else 0.0)
            rows.append(Row(name, layers_of(folder / config_file), quantization, size, logits))
            models[name] = model
        speeds(rows, models, holdout, n, n_batch1, rounds)
        if keep is not None:
            (work / PREDICTIONS_FILE).write_text(json.dumps({
                "holdout": parts.holdout_name, "texts": holdout.texts, "pairs": holdout.pairs,
                "labels": holdout.labels.tolist(),
                "predictions": {r.name: predictions(r.logits, task.is_regression).tolist() for r in rows},
            }, indent=1))
    return Result(manifest, task.name, task.metric, task.is_regression, holdout, parts.holdout_name, threads,
                  int8_name, rows)


def _fallback_words(manifest: Manifest) -> str:
    """How the bundle's fallback answers the texts it sends on, for the quantization column."""
    rule = manifest.fallback
    if rule.continue_from is None:
        return f"; its least sure {rule.share:.0%} on to the full fp32 model"
    return (f"; its least sure {rule.share:.0%} continued from layer {rule.continue_from} through the full model's "
            f"layers above ({manifest.quantization_config or 'fp32'})")


def speeds(rows: list[Row], models: dict[str, OnnxClassifier], holdout: Examples, n: int, n_batch1: int,
           rounds: int) -> None:
    """Every row's sentences/s at batch 1 and at batch 32, timed in interleaved rounds (the median round)."""
    sets = {1: cycled(holdout, n_batch1), BATCH: cycled(holdout, n)}

    def call(model: OnnxClassifier, batch: int, examples: Examples):
        return lambda: model.logits(examples.texts, examples.pairs, batch_size=batch)

    candidates = {(r.name, b): call(models[r.name], b, s) for r in rows for b, s in sets.items()}
    warm_up = {(r.name, b): call(models[r.name], b, s.head(min(len(s), BATCH))) for r in rows for b, s in sets.items()}
    timings = timed_rounds(candidates, rounds, warm_up)
    for r in rows:
        r.per_s_batch1 = len(sets[1]) / timings[(r.name, 1)].median
        r.per_s_batch32 = len(sets[BATCH]) / timings[(r.name, BATCH)].median
        print(f"  {r.name}: {r.per_s_batch1:.1f}/s at batch 1, {r.per_s_batch32:.1f}/s at batch {BATCH}",
              file=sys.stderr, flush=True)


def table(result: Result, bundle: Path, n: int, n_batch1: int, rounds: int) -> tuple[str, str]:
    """The title and the body: what was measured, the table, and with a fallback the int8 line."""
    m, rows = result.manifest, result.rows
    reference = predictions(rows[0].logits, result.regression)
    int8_speed = next(r.per_s_batch32 for r in rows if r.name == FULL_INT8)
    gate = "passed" if m.servable else "FAILED (measured anyway)"
    header = ["model", "layers", "quantization", "model MB", "sentences/s batch 1", f"sentences/s batch {BATCH}",
              result.metric, "agreement with full fp32", f"speed-up vs full int8 (batch {BATCH})"]
    cells = []
    for r in rows:
        value = compute_metric(result.metric, result.holdout.labels, r.logits, result.regression)
        agree = "n/a" if result.regression else \
            f"{100 * float(np.mean(predictions(r.logits, False) == reference)):.1f}%"
        cells.append([r.name, r.layers, r.quantization, f"{r.size_mb:.1f}", f"{r.per_s_batch1:.1f}",
                      f"{r.per_s_batch32:.1f}", f"{value:.4f}", agree, f"{r.per_s_batch32 / int8_speed:.2f}x"])
    lines = [
        f"onnxruntime, CPU provider, {result.threads} intra-op threads, every row. Source checkpoint: "
        f"{m.source_checkpoint}; full int8: {result.int8_name} (optimum's dynamic int8 for this CPU, no node kept "
        f"in fp32). Bundle validation: {gate}.",
        f"Sentences: {result.holdout_name}, {len(result.holdout)} sentences ({result.metric} and agreement, batch "
        f"{BATCH}); speed: {n} sentences at batch {BATCH} and {n_batch1} at batch 1 (holdout repeated in order), "
        f"the median of {rounds} interleaved rounds after a warm-up, max length {m.max_length}, tokenization "
        "included.",
        "",
        markdown_table(header, cells, "lrlrrrrrr"),
    ]
    if m.fallback is not None:
        lines += ["", _to_int8(result, reference)]
    title = (f"pruned vs plain int8: {bundle} ({m.model_type}, {m.depth} of {m.total_layers} layers, heal={m.heal}), "
             f"task {result.task_name}")
    return title, "\n".join(lines)


def _to_int8(result: Result, reference: np.ndarray) -> str:
    """What the fallback would serve with the full int8 model in place of the fp32 original, from the rows'
    own answers: the pruned graph's where it is sure, the full int8 model's (run on whole batches) where not."""
    by_name = {r.name: r.logits for r in result.rows}
    served = cascade(by_name[ALONE], by_name[FULL_INT8], result.manifest.fallback.threshold)
    value = compute_metric(result.metric, result.holdout.labels, served, result.regression)
    agree = float(np.mean(predictions(served, False) == reference))
    return (f"Had the texts it is unsure of gone to the full int8 model instead (not served; the int8 row's "
            f"answers there): {result.metric} {value:.4f}, agreement with full fp32 {100 * agree:.1f}%.")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE, help="a bundle folder `layerprune export` wrote")
    parser.add_argument("--n", type=int, default=512, help=f"sentences timed at batch {BATCH}")
    parser.add_argument("--n-batch1", type=int, default=128, help="sentences timed at batch 1")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved timing rounds (the median is reported)")
    parser.add_argument("--keep", type=Path, default=None, help="leave the full model's exports (fp32/, int8/) "
                        f"and every row's holdout predictions ({PREDICTIONS_FILE}) in this folder")


def run(args: argparse.Namespace, out: Results) -> int:
    if min(args.n, args.n_batch1, args.rounds) < 1:
        raise LayerpruneError("--n, --n-batch1 and --rounds must be at least 1")
    result = benchmark(args.bundle, args.n, args.n_batch1, args.rounds, args.keep)
    out.write(*table(result, args.bundle, args.n, args.n_batch1, args.rounds))
    return 0
