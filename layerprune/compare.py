"""The comparison a user makes next: the bundle as served beside the full original in plain int8, what
`optimum-cli onnxruntime quantize --onnx_model FP32 --PRESET --per_channel` gives for this CPU, on the same sentences
in one run: sentences/s at batch 1 and at batch 32, the task metric and the agreement with the original on the
holdout, and whether the gate's forecast would certify that plain int8 by the rule the bundle passed.

`make demo`'s summary (demo.py) and benchmarks/pruned_vs_int8.py measure through here and show it their own way.
Every row runs on onnxruntime with the same session options (CPU provider, intra-op threads = this machine's
cores) at the bundle's max length, tokenization included. The original is the checkpoint in PyTorch, as the gate
runs it. This module imports torch and optimum (through onnx_export and models); the server never imports it.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .artifacts import AnalysisReport, DepthReport, GateForecast, Manifest, ValidationReport, load_artifact
from .bundle import open_bundle
from .cpu import cpu_kind
from .data import Examples
from .depth_search import error_budget
from .errors import LayerpruneError
from .files import MODEL_DATA_FILE, MODEL_FILE
from .options import BATCH_SIZE, ExportOptions
from .runtime import OnnxClassifier
from .scoring import compute_metric, predictions
from .tasks import TaskConfig
from .timing import timed_rounds
from .validate import calibration_and_holdout, forecast

FULL_FP32, FULL_INT8, BUNDLE = "full fp32", "full int8", "bundle"
ALONE = "its pruned graph alone"  # a fallback bundle's pruned graph without the original: what it serves is BUNDLE
ROWS = (FULL_INT8, BUNDLE)  # the comparison itself; FULL_FP32 and ALONE are there to be asked for
SENTENCES, SENTENCES_BATCH1, ROUNDS = 512, 128, 3  # timed at batch 32, at batch 1; interleaved rounds (`speeds`)
BATCH = BATCH_SIZE  # the metric and agreement at validation's batch: int8's dynamic scales depend on a batch's rows

# optimum's dynamic int8 preset for each CPU kind (cpu.cpu_kind): the name of its AutoQuantizationConfig method and
# of its optimum-cli flag alike, so the full model is quantized as a user on this CPU quantizes it.
OPTIMUM_PRESETS = {"avx512-vnni": "avx512_vnni", "avx512": "avx512", "avx2": "avx2", "arm64": "arm64",
                   "ppc64le": "ppc64le"}


def optimum_preset(cpu: str | None = None) -> str:
    """optimum's int8 preset for CPU kind `cpu` (default: this one)."""
    cpu = cpu or cpu_kind()
    if cpu not in OPTIMUM_PRESETS:
        raise LayerpruneError(f"optimum has no int8 preset for this CPU ({cpu}); it has "
                              f"{', '.join(OPTIMUM_PRESETS.values())}")
    return OPTIMUM_PRESETS[cpu]


def plain_int8(fp32: Path, out: Path, cpu: str | None = None) -> str:
    """The fp32 export in `fp32` (onnx_export.export_onnx) quantized into `out` as a user quantizes it without
    layerprune: optimum's ORTQuantizer with `AutoQuantizationConfig.PRESET(is_static=False, per_channel=True)`
    for CPU kind `cpu` (default: this one), on the export as it is, no node kept in fp32; the config and tokenizer
    beside it. `out` is replaced. Returns the configuration's name."""
    from optimum.onnxruntime import AutoQuantizationConfig

    from .onnx_export import optimum_quantize

    preset = optimum_preset(cpu)
    config = getattr(AutoQuantizationConfig, preset)(is_static=False, per_channel=True)
    fp32, out = Path(fp32), Path(out)
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".plain-int8-", dir=out.parent) as scratch:
        quantized = optimum_quantize(fp32, config, Path(scratch))
        shutil.copytree(fp32, out, ignore=shutil.ignore_patterns(MODEL_FILE, MODEL_DATA_FILE))
        os.replace(quantized, out / MODEL_FILE)
    return f"optimum {preset} dynamic per-channel"


@dataclass(frozen=True)
class GateTexts:
    """A bundle's sentences as its export and its validation cut them (validate.calibration_and_holdout with the
    manifest's resample seed): the calibration examples its candidates were scored on (depth.json's count) and
    the holdout it was validated on (validation.json's count), which the bundle never saw."""

    task: TaskConfig
    calibration: Examples
    holdout: Examples
    calibration_name: str
    holdout_name: str
    tolerance: float  # the export's, which validation kept


def gate_texts(bundle: Path, manifest: Manifest) -> GateTexts:
    """The calibration and holdout examples of the run that exported `bundle`."""
    analysis = load_artifact(AnalysisReport, bundle / manifest.parts.analysis)
    depth = load_artifact(DepthReport, bundle / manifest.parts.depth)
    validation = load_artifact(ValidationReport, bundle / manifest.parts.validation)
    task = analysis.task_config
    parts = calibration_and_holdout(task, Path(analysis.glue_dir) if analysis.glue_dir else None, None,
                                    manifest.resample_seed)
    return GateTexts(task, parts.calibration.head(depth.n_calibration), parts.holdout.head(validation.n_examples),
                     parts.calibration_name, parts.holdout_name, validation.tolerance)


def certify(texts: GateTexts, original: np.ndarray, candidate: np.ndarray) -> GateForecast:
    """The gate's forecast for a candidate's logits on the calibration examples, made as export makes it for an int8
    variant (candidates.score_candidate): against the original's logits there, at the export's tolerance, with the
    holdout's size, at the per-variant error rate of export's budget with --quantize int8 --fallback 0 at its
    default alpha (depth_search.error_budget). Export's agreement texts (--heal-data) are not read again: where
    export had them its forecasts saw more texts than this one."""
    # the full model sends nothing on: one share, so the int8 variants' part of alpha is not split over a grid
    opts = dataclasses.replace(ExportOptions(), tolerance=texts.tolerance, quantize="int8", fallback=0.0)
    return forecast(texts.task, texts.calibration.labels, original, candidate, texts.tolerance, len(texts.holdout),
                    None, error_budget(opts).per_variant)


def cycled(examples: Examples, n: int) -> Examples:
    """The first n examples, the list repeated in order when it is shorter."""
    return examples.select(np.arange(n) % len(examples))


@dataclass(frozen=True)
class Speed:
    """Sentences/s of one row in the median of interleaved rounds, by the wall clock and per CPU-second of this
    process (onnxruntime's threads included)."""

    batch1: float
    batch32: float
    cpu_batch1: float
    cpu_batch32: float


def speeds(models: dict[str, OnnxClassifier], examples: Examples, n: int, n_batch1: int,
           rounds: int) -> dict[str, Speed]:
    """Every model's sentences/s on n of `examples` at batch 32 and n_batch1 at batch 1 (cycled), every model and
    batch size once a round, `rounds` interleaved rounds after a warm-up on a batch's worth."""
    sets = {1: cycled(examples, n_batch1), BATCH: cycled(examples, n)}

    def call(model: OnnxClassifier, batch: int, chosen: Examples):
        return lambda: model.logits(chosen.texts, chosen.pairs, batch_size=batch)

    candidates = {(name, b): call(m, b, s) for name, m in models.items() for b, s in sets.items()}
    warm_up = {(name, b): call(m, b, s.head(min(len(s), BATCH))) for name, m in models.items() for b, s in sets.items()}
    timings = timed_rounds(candidates, rounds, warm_up)
    return {name: Speed(*(len(sets[b]) / timings[(name, b)].median for b in sets),
                        *(len(sets[b]) / max(timings[(name, b)].cpu_median, 1e-9) for b in sets))
            for name in models}


@dataclass
class Comparison:
    """The rows asked for, on the bundle's holdout, and the gate's forecast for the full model's plain int8."""

    manifest: Manifest
    texts: GateTexts
    threads: int
    int8_name: str  # the full model's plain int8 configuration
    original: np.ndarray  # the original's logits (PyTorch) on the holdout
    logits: dict[str, np.ndarray]  # each row's on the holdout, at batch 32
    speeds: dict[str, Speed]
    forecast: GateForecast  # would the gate certify the full model's plain int8?

    def metric(self, name: str) -> float:
        """A row's task metric on the holdout."""
        task = self.texts.task
        return compute_metric(task.metric, self.texts.holdout.labels, self.logits[name], task.is_regression)

    def agreement(self, name: str) -> float | None:
        """The share of the holdout on which a row predicts what the original predicts (None: regression)."""
        if self.texts.task.is_regression:
            return None
        return float(np.mean(predictions(self.logits[name], False) == predictions(self.original, False)))

    def verdict(self) -> str:
        """Would the gate certify the full model's plain int8: yes or no, with its forecast's numbers."""
        f, texts = self.forecast, self.texts
        words = (f"{'yes' if f.passes else 'no'}: forecast on {f.n_agreement} sentences ({texts.calibration_name}) at "
                 f"alpha {f.alpha:.2%}, delta {100 * f.delta:+.2f} points, lower bound {100 * f.lower_bound:+.2f} "
                 f"against -{100 * texts.tolerance:.2f}")
        if f.disagreement is not None:
            words += f"; disagreement {f.disagreement:.2%} (upper bound {f.disagreement_upper:.2%})"
        return words


def compare(bundle: Path, work: Path, n: int = SENTENCES, n_batch1: int = SENTENCES_BATCH1, rounds: int = ROUNDS,
            rows: Sequence[str] = ROWS) -> Comparison:
    """Measure `rows` (of FULL_FP32, FULL_INT8, BUNDLE, and ALONE where the bundle has a fallback) on the bundle's
    holdout, and ask the gate's forecast whether it would certify the full model's plain int8.

    bundle: the bundle's folder, opened through its gate (a bundle that failed validation is measured too).
    work: where the full model's exports go (work/fp32, work/int8: replaced).
    n, n_batch1, rounds: the speed's sentences at batch 32 and at batch 1, and its interleaved rounds (`speeds`).
    """
    from .hidden import predict_logits
    from .models import load_classifier, resolve_checkpoint
    from .onnx_export import export_onnx

    bundle, work = Path(bundle), Path(work)
    if not bundle.is_dir():
        raise LayerpruneError(f"{bundle} is not a bundle folder (run `layerprune export` first)")
    threads = os.cpu_count() or 1
    session = dict(providers=["CPUExecutionProvider"], threads=threads)
    opened = open_bundle(bundle, allow_unvalidated=True, **session)
    manifest = opened.manifest
    rows = [name for name in rows if name != ALONE or manifest.fallback is not None]
    texts = gate_texts(bundle, manifest)
    checkpoint = resolve_checkpoint(manifest.source_checkpoint)
    fp32, int8 = work / "fp32", work / "int8"
    shutil.rmtree(fp32, ignore_errors=True)
    export_onnx(Path(checkpoint), fp32)
    int8_name = plain_int8(fp32, int8)

    def onnx(folder: Path) -> OnnxClassifier:
        return OnnxClassifier(folder, max_length=manifest.max_length, labels=manifest.labels, **session)

    models = {FULL_FP32: lambda: onnx(fp32), FULL_INT8: lambda: onnx(int8), BUNDLE: lambda: opened.classifier,
              ALONE: lambda: OnnxClassifier(bundle, max_length=manifest.max_length, labels=manifest.labels,
                                            parts=manifest.parts, **session)}
    measured = {name: models[name]() for name in rows}
    int8_model = measured.get(FULL_INT8) or models[FULL_INT8]()

    model, tokenizer = load_classifier(checkpoint, num_labels=texts.task.num_labels, device="cpu")
    original = {part: predict_logits(model, tokenizer, examples, batch_size=BATCH, max_length=manifest.max_length)
                for part, examples in (("calibration", texts.calibration), ("holdout", texts.holdout))}
    del model
    calibration = int8_model.logits(texts.calibration.texts, texts.calibration.pairs, batch_size=BATCH)
    holdout = texts.holdout
    logits = {name: m.logits(holdout.texts, holdout.pairs, batch_size=BATCH) for name, m in measured.items()}
    return Comparison(manifest, texts, threads, int8_name, original["holdout"], logits,
                      speeds(measured, holdout, n, n_batch1, rounds),
                      certify(texts, original["calibration"], calibration))
