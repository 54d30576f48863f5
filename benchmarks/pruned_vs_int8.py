"""A layerprune bundle against the full original model in plain int8: does pruning earn its place?

    python benchmarks/pruned_vs_int8.py BUNDLE [--n 512] [--n-batch1 128] [--out benchmarks/results/pruned_vs_int8.md]
                                        [--keep DIR]

One run, one CPU, the same sentences for three rows:
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
depend on a batch's rows; batch 32 is what validation uses). Speed: a warm-up first, then --n sentences at
batch 32 and --n-batch1 at batch 1, timed with time.perf_counter (the holdout repeated in order when it has
fewer). Speed-up: sentences/s at batch 32 over the full int8 model's.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # its sibling modules, run as a module too
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from layerprune.architectures import total_layers  # noqa: E402
from layerprune.artifacts import AnalysisReport, Manifest, load_artifact  # noqa: E402
from layerprune.bundle import open_bundle  # noqa: E402
from layerprune.cpu import cpu_kind  # noqa: E402
from layerprune.data import Examples  # noqa: E402
from layerprune.errors import LayerpruneError  # noqa: E402
from layerprune.fallback import cascade  # noqa: E402
from layerprune.files import CONFIG_FILE, MODEL_FILE, RESULTS_DIR  # noqa: E402
from layerprune.runtime import OnnxClassifier  # noqa: E402
from layerprune.scoring import compute_metric, predictions  # noqa: E402
from layerprune.validate import calibration_and_holdout  # noqa: E402
from provenance import provenance, publish, refuses_in_one_line  # noqa: E402

PRUNED_VS_INT8_RESULTS = "pruned_vs_int8.md"  # under files.RESULTS_DIR
PREDICTIONS_FILE = "predictions.json"  # in --keep DIR, beside the full model's exports
FULL_FP32, FULL_INT8, BUNDLE = "full fp32", "full int8", "bundle"
ALONE = "its pruned graph alone"  # a fallback bundle's pruned graph without the original: what it serves is BUNDLE
BATCH = 32
WARMUP_BATCH1 = 8  # sentences run one by one before the batch-1 timing


@dataclass
class Row:
    name: str
    layers: int
    quantization: str
    size_mb: float
    logits: np.ndarray  # on the holdout, at batch 32
    per_s_batch1: float
    per_s_batch32: float


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


def measure(model: OnnxClassifier, holdout: Examples, n: int, n_batch1: int) -> tuple[np.ndarray, float, float]:
    """Holdout logits at batch 32 (untimed; it doubles as the first warm-up), then sentences/s at batch 1 and 32."""
    logits = model.logits(holdout.texts, holdout.pairs, batch_size=BATCH)
    speeds = []
    for batch, count in ((1, n_batch1), (BATCH, n)):
        timed = cycled(holdout, count)
        warm = timed.head(WARMUP_BATCH1 if batch == 1 else BATCH)
        model.logits(warm.texts, warm.pairs, batch_size=batch)
        started = time.perf_counter()
        model.logits(timed.texts, timed.pairs, batch_size=batch)
        speeds.append(count / (time.perf_counter() - started))
    return logits, speeds[0], speeds[1]


def benchmark(bundle: Path, n: int, n_batch1: int, keep: Path | None = None) -> Result:
    """The three rows (full fp32, full int8, the bundle) on the bundle's holdout. keep: a folder to leave the
    full model's exports (fp32/, int8/) and every row's holdout predictions (predictions.json) in."""
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

        rows = []
        builds = [(FULL_FP32, fp32, "fp32"), (FULL_INT8, int8, int8_name), (BUNDLE, bundle, None),
                  *([(ALONE, bundle, None)] if manifest.fallback is not None else [])]
        for name, folder, quantization in builds:
            if name in (BUNDLE, ALONE):
                model_file, config_file = manifest.parts.model, manifest.parts.config
                quantization = ", ".join(filter(None, [manifest.optimize, manifest.quantization_config])) or "fp32"
                model = opened.classifier if name == BUNDLE else OnnxClassifier(
                    bundle, max_length=manifest.max_length, labels=manifest.labels, parts=manifest.parts, **session)
                if name == BUNDLE and manifest.fallback is not None:  # both graphs are served, and both counted below
                    quantization += f"; its least sure {manifest.fallback.share:.0%} on to the full fp32 model"
            else:
                model = OnnxClassifier(folder, max_length=manifest.max_length, labels=manifest.labels, **session)
                model_file, config_file = MODEL_FILE, CONFIG_FILE
            logits, per_s_1, per_s_32 = measure(model, holdout, n, n_batch1)
            size = model_mb(folder, model_file) + (model_mb(folder, manifest.parts.original)
                                                   if name == BUNDLE and manifest.parts.original else 0.0)
            rows.append(Row(name, layers_of(folder / config_file), quantization, size, logits, per_s_1, per_s_32))
            print(f"  {name}: {per_s_1:.1f}/s at batch 1, {per_s_32:.1f}/s at batch {BATCH}", file=sys.stderr,
                  flush=True)
            del model
        if keep is not None:
            (work / PREDICTIONS_FILE).write_text(json.dumps({
                "holdout": parts.holdout_name, "texts": holdout.texts, "pairs": holdout.pairs,
                "labels": holdout.labels.tolist(),
                "predictions": {r.name: predictions(r.logits, task.is_regression).tolist() for r in rows},
            }, indent=1))
    return Result(manifest, task.name, task.metric, task.is_regression, holdout, parts.holdout_name, threads,
                  int8_name, rows)


def table(result: Result, bundle: Path, n: int, n_batch1: int) -> str:
    import onnxruntime

    m, rows = result.manifest, result.rows
    reference = predictions(rows[0].logits, result.regression)
    int8_speed = next(r.per_s_batch32 for r in rows if r.name == FULL_INT8)
    gate = "passed" if m.servable else "FAILED (measured anyway)"
    lines = [
        f"# pruned vs plain int8: {bundle} ({m.model_type}, {m.depth} of {m.total_layers} layers, heal={m.heal}), "
        f"task {result.task_name}",
        "",
        f"{provenance()}; onnxruntime {onnxruntime.__version__}, CPU provider, {result.threads} intra-op threads, "
        "every row.",
        f"Source checkpoint: {m.source_checkpoint}; full int8: {result.int8_name} (optimum's dynamic int8 for this "
        f"CPU, no node kept in fp32). Bundle validation: {gate}.",
        f"Sentences: {result.holdout_name}, {len(result.holdout)} sentences ({result.metric} and agreement, batch "
        f"{BATCH}); speed after a warm-up over {n} sentences at batch {BATCH} and {n_batch1} at batch 1 (holdout "
        f"repeated in order), max length {m.max_length}, tokenization included.",
        "",
        f"| model | layers | quantization | model MB | sentences/s batch 1 | sentences/s batch {BATCH} "
        f"| {result.metric} | agreement with full fp32 | speed-up vs full int8 (batch {BATCH}) |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        value = compute_metric(result.metric, result.holdout.labels, r.logits, result.regression)
        agree = "n/a" if result.regression else \
            f"{100 * float(np.mean(predictions(r.logits, False) == reference)):.1f}%"
        lines.append(f"| {r.name} | {r.layers} | {r.quantization} | {r.size_mb:.1f} | {r.per_s_batch1:.1f} "
                     f"| {r.per_s_batch32:.1f} | {value:.4f} | {agree} | {r.per_s_batch32 / int8_speed:.2f}x |")
    if m.fallback is not None:
        lines += ["", _to_int8(result, reference)]
    return "\n".join(lines) + "\n"


def _to_int8(result: Result, reference: np.ndarray) -> str:
    """What the fallback would serve with the full int8 model in place of the fp32 original, from the rows'
    own answers: the pruned graph's where it is sure, the full int8 model's (run on whole batches) where not."""
    by_name = {r.name: r.logits for r in result.rows}
    served = cascade(by_name[ALONE], by_name[FULL_INT8], result.manifest.fallback.threshold)
    value = compute_metric(result.metric, result.holdout.labels, served, result.regression)
    agree = float(np.mean(predictions(served, False) == reference))
    return (f"Had the texts it is unsure of gone to the full int8 model instead (not served; the int8 row's "
            f"answers there): {result.metric} {value:.4f}, agreement with full fp32 {100 * agree:.1f}%.")


@refuses_in_one_line
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bundle", type=Path, help="a bundle folder written by `layerprune export`")
    parser.add_argument("--n", type=int, default=512, help=f"sentences timed at batch {BATCH}")
    parser.add_argument("--n-batch1", type=int, default=128, help="sentences timed at batch 1")
    parser.add_argument("--out", type=Path, default=ROOT / RESULTS_DIR / PRUNED_VS_INT8_RESULTS)
    parser.add_argument("--keep", type=Path, default=None, help="leave the full model's exports (fp32/, int8/) "
                        f"and every row's holdout predictions ({PREDICTIONS_FILE}) in this folder")
    args = parser.parse_args(argv)
    if args.n < 1 or args.n_batch1 < 1:
        raise LayerpruneError("--n and --n-batch1 must be at least 1")
    result = benchmark(args.bundle, args.n, args.n_batch1, args.keep)
    publish(table(result, args.bundle, args.n, args.n_batch1), args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
