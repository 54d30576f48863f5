"""What does continuing a text sent on save over restarting the original? A bundle exported with the top-layer heal
and `--fallback` sends its least sure texts on from its states at layer c through the original's layers above
(its continuation graph); without the continuation, they restart the whole original from their tokens.

On the bundle's holdout (--n texts, the holdout repeated in order when it has fewer), for each share of texts
sent on (--shares: the threshold is that quantile of the bundle's top-class probabilities on calibration, as
export sets it), the bundle runs its fallback both ways: continued (its continuation graph, as served) and
restarted (the original's graph as export builds it for a restart: optimized as the bundle, fp32; and, where
the bundle is int8, the original quantized under the bundle's int8 choice too). Both at batch 32, every row
once per round, --rounds interleaved rounds after a warm-up, the median round reported: sentences/s (wall) and
CPU ms a text (this process's CPU time, all threads). Layers a text: the bundle's depth plus, for the share
sent on, the original's layers above the cut (continued) or all of them (restarted). Agreement: with the
original's fp32 graph's predictions on the same texts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from layerprune.artifacts import AnalysisReport, Manifest, load_artifact
from layerprune.bundle import open_bundle
from layerprune.candidates import calibration_batches
from layerprune.data import Examples
from layerprune.errors import LayerpruneError
from layerprune.fallback import threshold
from layerprune.files import DEFAULT_BUNDLE
from layerprune.models import resolve_checkpoint
from layerprune.onnx_export import export_onnx, optimize_onnx, quantize_faithful, quantize_onnx
from layerprune.runtime import OnnxClassifier
from layerprune.validate import calibration_and_holdout

from .common import disagreement, listed, markdown_table, timed_rounds
from .harness import Results

BATCH = 32
HEADER = ["sent on (calibration)", "sent on (these texts)", "fallback", "layers a text", "sentences/s",
          "CPU ms a text", "speed vs restart", "agreement with the original"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--bundle", type=Path, default=DEFAULT_BUNDLE,
                        help="a bundle exported with the top-layer heal and --fallback")
    parser.add_argument("--run-dir", type=Path, help="export one first from this analysis, with export's defaults "
                        "and --keep-layers, the top-layer heal and a fallback, into a scratch folder (not --bundle)")
    parser.add_argument("--keep-layers", type=int, default=4, help="with --run-dir")
    parser.add_argument("--quantize", choices=["int8", "none"], default="int8",
                        help="with --run-dir: export's int8 candidates, as `make demo` exports, or fp32")
    parser.add_argument("--shares", type=listed(float), default=[5, 10, 20, 30], help="percent of texts sent on")
    parser.add_argument("--n", type=int, default=1024, help="texts timed a round")
    parser.add_argument("--rounds", type=int, default=3)


def run(args: argparse.Namespace, out: Results) -> int:
    if args.run_dir is None:
        return measure(Path(args.bundle), args, out)
    from layerprune.export import export_bundle
    from layerprune.options import ExportOptions

    with tempfile.TemporaryDirectory(prefix="cascade-bundle-") as scratch:
        opts = ExportOptions(keep_layers=args.keep_layers, heal="top", fallback=max(args.shares) / 100,
                             quantize=None if args.quantize == "none" else args.quantize)
        return measure(export_bundle(args.run_dir, Path(scratch) / "bundle", opts).bundle, args, out)


def measure(bundle: Path, args: argparse.Namespace, out: Results) -> int:
    """The table for the continuation bundle in `bundle`."""
    if not bundle.is_dir():
        raise LayerpruneError(f"{bundle} is not a bundle folder (run `layerprune export` first)")
    threads = os.cpu_count() or 1
    session = dict(providers=["CPUExecutionProvider"], threads=threads)
    opened = open_bundle(bundle, allow_unvalidated=True, **session)
    manifest, rule = opened.manifest, opened.manifest.fallback
    if rule is None or rule.continue_from is None:
        raise LayerpruneError(f"{bundle} does not continue the texts it sends on: export it with --fallback SHARE "
                              "and the top-layer heal (--heal top)")
    analysis = load_artifact(AnalysisReport, bundle / manifest.parts.analysis)
    glue_dir = Path(analysis.glue_dir) if analysis.glue_dir else None
    parts = calibration_and_holdout(analysis.task_config, glue_dir, None, manifest.resample_seed)
    texts = parts.holdout.select(np.arange(args.n) % len(parts.holdout))  # repeated in order where it is shorter
    alone = OnnxClassifier(bundle, max_length=manifest.max_length, labels=manifest.labels, parts=manifest.parts,
                           **session)
    own = alone.logits(parts.calibration.texts, parts.calibration.pairs, batch_size=BATCH)

    def runner(below: float, **second) -> OnnxClassifier:
        return OnnxClassifier(bundle, max_length=manifest.max_length, labels=manifest.labels, parts=manifest.parts,
                              below=below, **second, **session)

    with tempfile.TemporaryDirectory(prefix="cascade-") as scratch:
        restarts = _originals(resolve_checkpoint(manifest.source_checkpoint), Path(scratch), manifest,
                              parts.calibration)
        original = OnnxClassifier(restarts["fp32"].parent, max_length=manifest.max_length, **session).logits(
            texts.texts, texts.pairs, batch_size=BATCH)
        candidates, above = {}, {}
        for share in args.shares:
            below = threshold(own, share / 100)
            ways = {"continued": dict(continuation=bundle / manifest.parts.continuation),
                    **{f"restarted ({name})": dict(original=path) for name, path in restarts.items()}}
            for way, second in ways.items():
                candidates[(share, way)] = _timed(runner(below, **second), texts)
                above[(share, way)] = manifest.total_layers - (rule.continue_from if way == "continued" else 0)
        timings = timed_rounds(candidates, args.rounds)
    rows = []
    for (share, way), timing in timings.items():
        cpu, logits, sent = timing.results[len(timing.results) // 2]
        restart = timings[(share, next(w for w in ways if w.startswith("restarted")))].median
        layers = manifest.depth + sent / len(texts) * above[(share, way)]
        rows.append([f"{share:g}%", f"{sent / len(texts):.1%}", way, f"{layers:.2f}",
                     f"{len(texts) / timing.median:.0f}", f"{1000 * cpu / len(texts):.2f}",
                     f"{restart / timing.median:.2f}x", f"{1 - disagreement(original, logits):.2%}"])
    out.write(f"Continuing the texts sent on vs restarting the original: {bundle} ({manifest.depth} of "
              f"{manifest.total_layers} layers, continuing from layer {rule.continue_from}; "
              f"{manifest.quantization_config or 'fp32'})",
              f"{len(texts)} texts of {parts.holdout_name}, batch {BATCH}, {threads} intra-op threads, "
              f"{args.rounds} interleaved rounds after a warm-up, the median round. Speed vs restart: over the first "
              f"restart row of the same share.\n\n{markdown_table(HEADER, rows, 'rrlrrrrr')}")
    return 0


def _timed(model: OnnxClassifier, examples: Examples):
    """A call that runs `model` on `examples`: this process's CPU seconds, the logits and the texts sent on."""

    def call():
        started, sent = time.process_time(), model.sent_on
        logits = model.logits(examples.texts, examples.pairs, batch_size=BATCH)
        return time.process_time() - started, logits, model.sent_on - sent

    return call


def _originals(checkpoint: str, scratch: Path, manifest: Manifest, calibration: Examples) -> dict[str, Path]:
    """The original's graph as export builds it for a restart (optimized as the bundle, fp32), and where the bundle
    is int8, made as the bundle's int8 candidate too (faithful int8 from the unoptimized graph, calibrated here on
    the calibration texts, which the timed holdout texts never are)."""
    fp32 = scratch / "fp32"
    export_onnx(Path(checkpoint), fp32)
    unoptimized = Path(shutil.copytree(fp32, scratch / "unoptimized"))
    if manifest.optimize:
        optimize_onnx(fp32, manifest.optimize)
    graphs = {"fp32": fp32 / "model.onnx"}
    if manifest.candidate != "fp32":
        int8 = scratch / "int8"
        if manifest.candidate == "int8":
            quantize_onnx(Path(shutil.copytree(fp32, int8)), cpu=manifest.int8_cpu)
        else:
            batches = calibration_batches(unoptimized, calibration, manifest.max_length, BATCH)
            quantize_faithful(Path(shutil.copytree(unoptimized, int8)), batches, cpu=manifest.int8_cpu)
        graphs["int8 as the bundle"] = int8 / "model.onnx"
    return graphs
