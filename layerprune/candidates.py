"""The export candidates at the chosen depth, with --quantize int8: the ways to export it, scored fastest first on
the calibration and agreement texts, and the first whose gate forecast passes kept (options.CANDIDATES); with
--min-agreement, the first whose agreement's lower bound clears it too (GateForecast.admissible).

1. int8: dynamic int8 for this CPU (onnx_export.quantize_onnx, layerprune/cpu.py);
2. int8-faithful: one activation scale per token and GPTQ weights (layerprune/faithful_int8.py), calibrated on
   heal texts (never the calibration, agreement or holdout texts its forecast and the gate score) and made from
   the graph before onnxruntime's O2/O3 fusions, which hide the MatMul + bias pattern it reads; with --optimize
   it stays as made (onnxruntime's session still applies its own graph optimizations when it loads it). Without
   heal texts (a task without a train split and no --heal-data) it is not a candidate;
3. fp32, the model as exported: the depth the walk already chose.

The two int8 variants share their part of the export's error budget (depth_search.error_budget); fp32 takes the
depth walk's, since its forecast is the walk's own. With --fallback, each is scored as served: the texts the
candidate is least sure of continue through the original's layers above the cut, made as the candidate is
(layerprune.continuation), or where the fallback restarts, the original answers them. With --fallback auto, each
int8 variant is scored at every share of options.SHARES, and the cheapest candidate that passes is kept
(layerprune.cost).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from . import continuation, onnx_export
from .artifacts import ExportCandidate
from .data import Examples
from .depth_search import ErrorBudget, ExportTexts
from .faithful_int8 import Feeds
from .fallback import threshold
from .files import MODEL_FILE
from .options import FAITHFUL_TEXTS, SEED, Candidate, ExportOptions
from .runtime import OnnxClassifier
from .scoring import compute_metric
from .tasks import TaskConfig
from .validate import EvalParts, forecast


def pick_candidate(bundle: Path, unoptimized: Path, heal: Examples | None, task: TaskConfig, texts: ExportTexts,
                   parts: EvalParts, max_length: int, opts: ExportOptions, budget: ErrorBudget, cpu: str,
                   graphs: continuation.Continuations | None = None, shares: tuple[float, ...] | None = None,
                   cost: Callable[[float], float] | None = None
                   ) -> tuple[list[ExportCandidate], np.ndarray, Candidate]:
    """Score the export candidates of the fp32 model in `bundle` fastest first, keep the first whose forecast passes
    in `bundle` (quantized for the CPU kind `cpu`), and report them all, with the kept one's logits on the
    calibration texts and its name. `unoptimized`: the folder of the bundle's fp32 graph before --optimize (the
    bundle itself without it), which int8-faithful starts from, calibrated on the texts `heal`. Where the bundle's
    graph continues (`graphs`), each candidate is scored with the continuation made as it is. With --fallback auto
    (`cost`: the fp32 bundle's served cost a text at a share sent on), each int8 variant is scored at each of
    `shares`, and of all that pass, fp32 at the walk's share (opts.fallback) among them, the cheapest is kept: its
    cost scaled by its CPU time a text over fp32's."""
    # each with its calibration logits, folder and CPU seconds a text
    scored: list[tuple[Candidate, ExportCandidate, np.ndarray, Path | None, float]] = []
    with tempfile.TemporaryDirectory(prefix=".candidates-", dir=bundle.parent) as staging:
        for label in ("int8", "int8-faithful") if heal is not None else ("int8",):
            folder = Path(staging) / label
            shutil.copytree(bundle, folder)
            if label == "int8":
                name = onnx_export.quantize_onnx(folder, cpu=cpu)
                second = graphs.graph(label) if graphs else None
            else:
                batches = calibration_batches(unoptimized, heal, max_length, opts.batch_size)
                shutil.copy(unoptimized / MODEL_FILE, folder / MODEL_FILE)
                name = onnx_export.quantize_faithful(folder, batches, cpu=cpu)
                second = (graphs.graph(label, continuation.states_batches(unoptimized / MODEL_FILE, batches))
                          if graphs else None)
            scored += [(label, c, own, folder, cpu_s) for c, own, cpu_s in score_candidate(
                name, folder, task, texts, parts, max_length, opts, budget.per_variant, second, shares)]
        second = graphs.graph("fp32") if graphs else None
        scored += [("fp32", c, own, None, cpu_s) for c, own, cpu_s in score_candidate(
            "fp32", bundle, task, texts, parts, max_length, opts, budget.depth, second)]
        passing = [s for s in scored if s[1].forecast.admissible(opts.min_agreement)]
        if cost is None:
            label, chosen, calibration, folder, _ = passing[0] if passing else scored[-1]
        else:
            fp32_s = scored[-1][4]
            for _, candidate, _, _, cpu_s in scored:
                candidate.cost = round(cost(candidate.share) * cpu_s / fp32_s, 4)
            label, chosen, calibration, folder, _ = min(passing, key=lambda s: s[1].cost) if passing else scored[-1]
        chosen.chosen = True
        if folder is not None:
            shutil.copy(folder / MODEL_FILE, bundle / MODEL_FILE)
    return [c for _, c, _, _, _ in scored], calibration, label


def calibration_batches(folder: Path, examples: Examples, max_length: int, batch_size: int) -> list[Feeds]:
    """Faithful int8's calibration feeds: at most FAITHFUL_TEXTS of `examples` (a seeded draw: a train split may be
    ordered by label), encoded as the runtime encodes them for the graph in `folder` at the bundle's max length,
    sorted by length, in batches of `batch_size`."""
    if len(examples) > FAITHFUL_TEXTS:
        examples = examples.select(np.sort(np.random.default_rng(SEED).choice(len(examples), FAITHFUL_TEXTS,
                                                                            replace=False)))
    runner = OnnxClassifier(folder, max_length=max_length)
    rows = sorted(runner.tokenize(examples.texts, examples.pairs), key=lambda row: len(row.ids))
    return [runner.pad(rows[start:start + batch_size]) for start in range(0, len(rows), batch_size)]


def score_candidate(name: str, folder: Path, task: TaskConfig, texts: ExportTexts, parts: EvalParts, max_length: int,
                    opts: ExportOptions, alpha: float, second: Path | None = None,
                    shares: tuple[float, ...] | None = None) -> list[tuple[ExportCandidate, np.ndarray, float]]:
    """A candidate graph's forecast as served at each share sent on of `shares` (default: opts.fallback's), at error
    rate `alpha`, with its own logits on the calibration texts and its CPU seconds a text there (this process's,
    onnxruntime's threads included). `second`: the continuation made as this candidate is, which answers the
    texts it sends on (else the original restarts)."""
    runner = OnnxClassifier(folder, max_length=max_length)
    started, cpu_started = time.perf_counter(), time.process_time()
    own = runner.logits(parts.calibration.texts, parts.calibration.pairs, batch_size=opts.batch_size)
    cpu_s = (time.process_time() - cpu_started) / len(parts.calibration)
    rate = len(parts.calibration) / (time.perf_counter() - started)
    own_agreement = None
    if texts.agreement is not None:
        examples = texts.agreement.examples
        own_agreement = runner.logits(examples.texts, examples.pairs, batch_size=opts.batch_size)
    scored = []
    for share in shares or (opts.fallback,):
        calibration, agreement = own, own_agreement
        if share and second is not None:  # scored as served: continued from this candidate's own states
            cascade = OnnxClassifier(folder, max_length=max_length, continuation=second,
                                     below=threshold(own, share))
            calibration = cascade.logits(parts.calibration.texts, parts.calibration.pairs, batch_size=opts.batch_size)
            if agreement is not None:
                agreement = cascade.logits(examples.texts, examples.pairs, batch_size=opts.batch_size)
        elif share:  # scored as served: the original answers the texts this candidate is least sure of
            calibration, agreement = texts.served(own, own_agreement, share)
        unlabeled = None if agreement is None else (texts.agreement.logits, agreement)
        prediction = forecast(task, parts.calibration.labels, texts.calibration.logits, calibration, opts.tolerance,
                              len(parts.holdout), unlabeled, alpha)
        metric = compute_metric(task.metric, parts.calibration.labels, calibration, regression=task.is_regression)
        scored.append((ExportCandidate(name=name, metric=metric, forecast=prediction, sentences_per_s=round(rate, 1),
                                       share=share), own, cpu_s))
    return scored


def onnx_logits(folder: Path, examples: Examples, max_length: int, batch_size: int) -> np.ndarray:
    """The fp32 or int8 graph in `folder` on `examples`, at the bundle's max length."""
    return OnnxClassifier(folder, max_length=max_length).logits(examples.texts, examples.pairs, batch_size=batch_size)
