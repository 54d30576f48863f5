"""export: analysis run directory -> validated ONNX bundle.

Choose the depth on calibration examples (one forward pass scores every depth: a model truncated at k
computes head(hidden_states[k])), truncate, optionally re-fit the head, export to ONNX through optimum,
optimize/quantize, then validate the bundle against the original checkpoint on disjoint holdout examples.
The bundle is built in a temporary folder and renamed into place.
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np

from . import export as onnx_export
from .analyze import ANALYSIS_FILE
from .artifacts import (
    AnalysisReport,
    DepthReport,
    DepthScore,
    Manifest,
    ValidationReport,
    atomic_dir,
    library_versions,
    load_artifact,
)
from .bundle import MANIFEST_FILE, VALIDATION_FILE, hash_files
from .data import load_examples
from .errors import LayerpruneError
from .hidden import make_batches, predict_logits
from .metrics import compute_metric
from .models import head_modules, load_classifier, num_layers
from .plots import plot_depths
from .prune import HeadFit, depth_logits, first_token_states, fit_head, load_head, truncate
from .runtime import OnnxClassifier
from .tasks import TaskConfig
from .validate import calibration_and_holdout, compare

BUNDLE_DIR = "bundle"
TRUNCATED_DIR = "truncated"


@dataclass(frozen=True)
class ExportOptions:
    keep_layers: int | Literal["auto"] = "auto"
    heal: Literal["head", "none"] | None = None  # default: head when the task has a train split
    optimize: Literal["O1", "O2", "O3"] | None = None
    quantize: Literal["int8"] | None = None
    tolerance: float = 0.01  # metric points as a fraction: 0.01 = 1 accuracy point
    sweep: bool = False  # score every depth, not only those auto probes
    max_examples: int | None = 2000  # per part: calibration and holdout
    heal_examples: int = 4000
    batch_size: int = 32
    max_length: int = 128
    device: str | None = None
    trust_remote_code: bool = False


@dataclass(frozen=True)
class ExportResult:
    bundle: Path
    manifest: Manifest
    validation: ValidationReport
    depth: DepthReport
    truncated_checkpoint: Path


def export_bundle(run_dir: Path, out: Path | None = None, opts: ExportOptions = ExportOptions()) -> ExportResult:
    """Build the bundle for the analysis in `run_dir` (default output: RUN_DIR/bundle)."""
    analysis = _load_analysis(run_dir)
    task, glue_dir = analysis.task_config, Path(analysis.glue_dir) if analysis.glue_dir else None
    heal = opts.heal or ("head" if task.train_split else "none")
    if heal == "head" and not task.train_split:
        raise LayerpruneError(f"--heal head needs a train split, and task '{task.name}' has none (--train-data)")
    model, tokenizer = load_classifier(
        analysis.model, num_labels=task.num_labels, device=opts.device, trust_remote_code=opts.trust_remote_code
    )
    total = num_layers(model.config)
    if opts.keep_layers != "auto" and not 1 <= opts.keep_layers <= total:
        raise LayerpruneError(f"--keep-layers must be between 1 and {total} for this model, got {opts.keep_layers}")
    parts = calibration_and_holdout(task, glue_dir, opts.max_examples)

    def features(examples) -> np.ndarray:
        batches = make_batches(tokenizer, examples, batch_size=opts.batch_size, max_length=opts.max_length)
        return first_token_states(model, batches, len(examples))

    original_holdout = predict_logits(model, tokenizer, parts.holdout, max_length=opts.max_length)

    calibration = features(parts.calibration)
    scorer = _DepthScorer(model, task, calibration, parts.calibration.labels)
    if heal == "head":
        train = load_examples(task, task.train_split, glue_dir=glue_dir).head(opts.heal_examples)
        scorer.heal_with(features(train), train.labels)
    depth = _choose_depth(scorer, analysis.boundary, total, opts)
    report = DepthReport(
        mode="auto" if opts.keep_layers == "auto" else "fixed", heal=heal, boundary=analysis.boundary,
        total_layers=total, chosen=depth, tolerance=opts.tolerance, full_metric=scorer.full,
        metric_name=task.metric, calibration=parts.calibration_name, n_calibration=len(parts.calibration),
        n_heal_train=scorer.n_train, probed=scorer.probed, scores=scorer.report(total, every=opts.sweep),
    )

    truncate(model, depth)
    if task.label_names:  # the bundle's config names its labels, whatever the checkpoint said
        model.config.id2label = dict(enumerate(task.label_names))
        model.config.label2id = {name: i for i, name in enumerate(task.label_names)}
    if heal == "head" and depth in scorer.fits:
        load_head(model, scorer.fits[depth].state)
    target = Path(out) if out is not None else Path(run_dir) / BUNDLE_DIR
    with tempfile.TemporaryDirectory(prefix="layerprune-truncated-") as scratch, atomic_dir(target, MANIFEST_FILE) as tmp:
        _save_checkpoint(model, tokenizer, Path(scratch))
        validation, quant_name = _write_model(model, tokenizer, Path(scratch), tmp, parts, original_holdout, task, opts)
        validation.save(tmp / VALIDATION_FILE)
        report.save(tmp / "depth.json")
        plot_depths(report, tmp / "depth.png")
        shutil.copy(Path(run_dir) / ANALYSIS_FILE, tmp / ANALYSIS_FILE)
        if (Path(run_dir) / "cka.png").is_file():
            shutil.copy(Path(run_dir) / "cka.png", tmp / "cka.png")
        manifest = Manifest(
            files=hash_files(tmp), source_checkpoint=analysis.model, task=task.name, metric_name=task.metric,
            labels=task.label_names, kept_layers=depth, total_layers=total, model_type=analysis.model_type,
            heal=heal, optimize=opts.optimize, quantize=opts.quantize, quantization_config=quant_name,
            servable=validation.passed, versions=library_versions(),
        )
        manifest.save(tmp / MANIFEST_FILE)
    # The truncated PyTorch checkpoint, for users who fine-tune or serve it further; not part of the bundle.
    with atomic_dir(Path(run_dir) / TRUNCATED_DIR, "config.json") as tmp:
        _save_checkpoint(model, tokenizer, tmp)
    return ExportResult(target, manifest, validation, report, Path(run_dir) / TRUNCATED_DIR)


def _save_checkpoint(model, tokenizer, path: Path) -> None:
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)


def _load_analysis(run_dir: Path) -> AnalysisReport:
    path = Path(run_dir) / ANALYSIS_FILE
    if not path.is_file():
        raise LayerpruneError(f"{run_dir} holds no {ANALYSIS_FILE}; run `layerprune analyze` first")
    return load_artifact(AnalysisReport, path)


def _write_model(model, tokenizer, torch_dir: Path, tmp: Path, parts, original_holdout, task: TaskConfig,
                 opts: ExportOptions) -> tuple[ValidationReport, str | None]:
    """ONNX export of the saved truncated checkpoint, fp32 parity, optimize/quantize, validation."""
    onnx_export.export_onnx(torch_dir, tmp)
    truncated = predict_logits(model, tokenizer, parts.holdout, max_length=opts.max_length)
    parity = onnx_export.max_logit_difference(truncated, _onnx_logits(tmp, parts.holdout, opts))
    if opts.optimize:
        onnx_export.optimize_onnx(tmp, opts.optimize)
    quant_name = onnx_export.quantize_onnx(tmp) if opts.quantize == "int8" else None
    served = _onnx_logits(tmp, parts.holdout, opts)
    validation = compare(task, parts.holdout, parts.holdout_name, original_holdout, served, opts.tolerance, parity)
    return validation, quant_name


def _onnx_logits(bundle: Path, examples, opts: ExportOptions) -> np.ndarray:
    runner = OnnxClassifier(bundle)
    return runner.logits(examples.texts, examples.pairs, batch_size=opts.batch_size, max_length=opts.max_length)


class _DepthScorer:
    """Calibration metric of every depth, with the fine-tuned head and (lazily) a re-fitted one."""

    def __init__(self, model, task: TaskConfig, features: np.ndarray, labels: np.ndarray) -> None:
        self.model, self.task, self.features, self.labels = model, task, features, labels
        self.raw = [self._metric(logits) for logits in depth_logits(model, features)]
        self.full = self.raw[-1]
        self.fits: dict[int, HeadFit] = {}
        self.healed: dict[int, float] = {}
        self.probed: list[int] = []
        self.train: tuple[np.ndarray, np.ndarray] | None = None
        self.n_train = 0

    def heal_with(self, train_features: np.ndarray, train_labels: np.ndarray) -> None:
        self.train = (train_features, train_labels)
        self.n_train = len(train_labels)

    def __call__(self, depth: int) -> float:
        """The metric auto compares: healed when healing (the full depth keeps its own head)."""
        if depth not in self.probed:
            self.probed.append(depth)
        if self.train is None or depth == len(self.raw) - 1:
            return self.raw[depth]
        if depth not in self.healed:
            self.healed[depth] = self._healed_metric(depth)
        return self.healed[depth]

    def _healed_metric(self, depth: int) -> float:
        features, labels = self.train
        fit = fit_head(self.model, features[depth], labels, regression=self.task.is_regression)
        self.fits[depth] = fit
        logits = _with_head(self.model, fit, lambda: depth_logits(self.model, self.features[depth : depth + 1]))
        return self._metric(logits[0])

    def _metric(self, logits: np.ndarray) -> float:
        return compute_metric(self.task.metric, self.labels, logits, regression=self.task.is_regression)

    def report(self, total: int, every: bool) -> list[DepthScore]:
        if every:
            for depth in range(1, total + 1):
                self(depth)
        return [DepthScore(depth=d, metric=self.raw[d], metric_healed=self.healed.get(d)) for d in range(1, total + 1)]


def _with_head(model, fit: HeadFit, compute: Callable[[], np.ndarray]) -> np.ndarray:
    """Run `compute` with a re-fitted head installed, then put the fine-tuned head back."""
    fine_tuned = {f"{name}.{key}": value.detach().clone()
                  for name, module in head_modules(model).items() for key, value in module.state_dict().items()}
    load_head(model, fit.state)
    try:
        return compute()
    finally:
        load_head(model, fine_tuned)


def _choose_depth(score: _DepthScorer, boundary: int, total: int, opts: ExportOptions) -> int:
    """Fixed N, or auto: from the CKA boundary, down while the calibration metric holds, up until it does."""
    if opts.keep_layers != "auto":
        score(opts.keep_layers)
        return opts.keep_layers
    holds = lambda depth: score(depth) >= score.full - opts.tolerance  # noqa: E731
    depth = min(max(boundary, 1), total)
    if holds(depth):
        while depth > 1 and holds(depth - 1):
            depth -= 1
    else:
        while depth < total and not holds(depth):
            depth += 1
    return depth
