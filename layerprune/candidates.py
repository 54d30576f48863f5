"""The export candidates, with --quantize int8: the ways to export a depth, scored fastest first on the calibration
and agreement texts, and the first whose gate forecast passes kept (options.CANDIDATES); with --min-agreement, the
first whose agreement's lower bound clears it too (GateForecast.admissible).

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
int8 variant is scored at every share of options.SHARES and at every depth the walk passed, from the boundary
down while it passes (a fixed-sequence test of its own, like each share's walk), and the cheapest candidate that
passes is kept (layerprune.cost): int8 at a depth above the fp32 walk's may cost less a text than fp32 below.
"""

from __future__ import annotations

import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
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


@dataclass(frozen=True)
class DepthGraphs:
    """One depth's fp32 graphs, which its export candidates are made from (export.py makes them)."""

    depth: int
    folder: Path  # the bundle's graph, optimized as asked; the candidate kept there replaces its model file
    unoptimized: Path  # the folder of the graph before --optimize (`folder` without it): int8-faithful's start
    continuations: continuation.Continuations | None  # graph B made as each candidate is, where texts continue


@dataclass(frozen=True)
class Picked:
    candidates: list[ExportCandidate]  # every one scored, in order
    calibration: np.ndarray  # the kept one's own logits on the calibration texts
    kept: Candidate
    graphs: DepthGraphs  # of the kept one's depth, its model file now the kept candidate's


def pick_candidate(depths: list[int], walked: int, make: Callable[[int], DepthGraphs], heal: Examples | None,
                   task: TaskConfig, texts: ExportTexts, parts: EvalParts, max_length: int, opts: ExportOptions,
                   budget: ErrorBudget, cpu: str, work: Path, shares: tuple[float, ...] | None = None,
                   cost: Callable[[int, float], float] | None = None) -> Picked:
    """Score the export candidates and keep one: the int8 variants (quantized for the CPU kind `cpu`) at each of
    `depths` in turn, fastest first, then fp32 at the walk's depth `walked` and share (opts.fallback), whose
    forecast is the walk's own. `make(depth)` gives a depth's fp32 graphs (int8-faithful starts from the
    unoptimized one, calibrated on the texts `heal`); where they continue, each candidate is scored with the
    continuation made as it is. Without `cost`, the first whose forecast passes is kept.

    With --fallback auto (`cost(depth, share)`: the fp32 served cost a text), each int8 variant is scored at each
    of `shares`, and walks `depths` down as the depth walk does: a (variant, share) is scored at a depth only
    where it passed at every depth before (a fixed-sequence test, each step at the variant's error rate, so the
    depths need no share of the budget), and the walk stops where none is left. Of all that pass, the cheapest is
    kept: its cost scaled by its CPU time a text over the fp32 graph's at its depth. Scratch folders go in `work`."""
    labels: tuple[Candidate, ...] = ("int8", "int8-faithful") if heal is not None else ("int8",)
    alive = {label: tuple(shares or (opts.fallback,)) for label in labels}
    scored: list[_Scored] = []
    with tempfile.TemporaryDirectory(prefix=".candidates-", dir=work) as staging:
        for depth in depths:
            if not any(alive.values()):
                break  # every variant failed at some share above: none is scored further down
            graphs = make(depth)
            for label in (label for label in labels if alive[label]):
                rows = _int8(label, graphs, Path(staging) / f"{depth}-{label}", heal, task, texts, parts, max_length,
                             opts, budget.per_variant, cpu, alive[label])
                alive[label] = tuple(row.candidate.share for row in rows
                                     if row.candidate.forecast.admissible(opts.min_agreement))
                scored += rows
        graphs = make(walked)
        second = graphs.continuations.graph("fp32") if graphs.continuations else None
        scored += [_Scored("fp32", c, own, None, cpu_s) for c, own, cpu_s in score_candidate(
            "fp32", walked, graphs.folder, task, texts, parts, max_length, opts, budget.depth, second)]
        if cost is not None:
            _cost(scored, cost, make, parts, max_length, opts.batch_size)
        passing = [s for s in scored if s.candidate.forecast.admissible(opts.min_agreement)]
        if cost is None:
            chosen = passing[0] if passing else scored[-1]
        else:
            chosen = min(passing, key=lambda s: s.candidate.cost) if passing else scored[-1]
        chosen.candidate.chosen = True
        graphs = make(chosen.candidate.depth)
        if chosen.folder is not None:
            shutil.copy(chosen.folder / MODEL_FILE, graphs.folder / MODEL_FILE)
    return Picked([s.candidate for s in scored], chosen.calibration, chosen.label, graphs)


@dataclass
class _Scored:
    label: Candidate
    candidate: ExportCandidate
    calibration: np.ndarray  # its own logits on the calibration texts
    folder: Path | None  # where its graph was made (None: the depth's fp32 graph itself)
    cpu_s: float  # CPU seconds a text on the calibration texts


def _int8(label: Candidate, graphs: DepthGraphs, folder: Path, heal: Examples | None, task: TaskConfig,
          texts: ExportTexts, parts: EvalParts, max_length: int, opts: ExportOptions, alpha: float, cpu: str,
          shares: tuple[float, ...]) -> list[_Scored]:
    """An int8 variant of the depth's graph, made in `folder` with its continuation, scored at each of `shares`."""
    shutil.copytree(graphs.folder, folder)
    if label == "int8":
        name = onnx_export.quantize_onnx(folder, cpu=cpu)
        second = graphs.continuations.graph(label) if graphs.continuations else None
    else:
        batches = calibration_batches(graphs.unoptimized, heal, max_length, opts.batch_size)
        shutil.copy(graphs.unoptimized / MODEL_FILE, folder / MODEL_FILE)
        name = onnx_export.quantize_faithful(folder, batches, cpu=cpu)
        second = (graphs.continuations.graph(label, continuation.states_batches(graphs.unoptimized / MODEL_FILE,
                                                                                batches))
                  if graphs.continuations else None)
    return [_Scored(label, c, own, folder, cpu_s) for c, own, cpu_s in score_candidate(
        name, graphs.depth, folder, task, texts, parts, max_length, opts, alpha, second, shares)]


def _cost(scored: list[_Scored], cost: Callable[[int, float], float], make: Callable[[int], DepthGraphs],
          parts: EvalParts, max_length: int, batch_size: int) -> None:
    """Each candidate's served cost a text: the fp32 graphs' at its depth and share, scaled by its CPU time a text
    over the fp32 graph's at its depth (the walk's fp32 candidate's own; elsewhere timed here, on the same texts)."""
    fp32_s = {s.candidate.depth: s.cpu_s for s in scored if s.label == "fp32"}
    for s in scored:
        depth = s.candidate.depth
        if depth not in fp32_s:
            fp32_s[depth] = _own_logits(OnnxClassifier(make(depth).folder, max_length=max_length), parts,
                                        batch_size)[1]
        s.candidate.cost = round(cost(depth, s.candidate.share) * s.cpu_s / fp32_s[depth], 4)


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


def score_candidate(name: str, depth: int, folder: Path, task: TaskConfig, texts: ExportTexts, parts: EvalParts,
                    max_length: int, opts: ExportOptions, alpha: float, second: Path | None = None,
                    shares: tuple[float, ...] | None = None) -> list[tuple[ExportCandidate, np.ndarray, float]]:
    """A candidate graph of `depth` layers: its forecast as served at each share sent on of `shares` (default:
    opts.fallback's), at error rate `alpha`, with its own logits on the calibration texts and its CPU seconds a text
    there (this process's, onnxruntime's threads included). `second`: the continuation made as this candidate is,
    which answers the texts it sends on (else the original restarts)."""
    runner = OnnxClassifier(folder, max_length=max_length)
    own, cpu_s, rate = _own_logits(runner, parts, opts.batch_size)
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
        scored.append((ExportCandidate(name=name, depth=depth, metric=metric, forecast=prediction,
                                       sentences_per_s=round(rate, 1), share=share), own, cpu_s))
    return scored


def _own_logits(runner: OnnxClassifier, parts: EvalParts, batch_size: int) -> tuple[np.ndarray, float, float]:
    """A graph's logits on the calibration texts, its CPU seconds a text there and its sentences per second."""
    started, cpu_started = time.perf_counter(), time.process_time()
    own = runner.logits(parts.calibration.texts, parts.calibration.pairs, batch_size=batch_size)
    cpu_s = (time.process_time() - cpu_started) / len(parts.calibration)
    return own, cpu_s, len(parts.calibration) / (time.perf_counter() - started)


def onnx_logits(folder: Path, examples: Examples, max_length: int, batch_size: int) -> np.ndarray:
    """The fp32 or int8 graph in `folder` on `examples`, at the bundle's max length."""
    return OnnxClassifier(folder, max_length=max_length).logits(examples.texts, examples.pairs, batch_size=batch_size)
