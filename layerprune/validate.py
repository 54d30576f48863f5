"""validate: the exported bundle's task metric against the original checkpoint's, on held-out examples.

Calibration examples choose the depth; disjoint holdout examples validate the bundle. When the task has
a labelled test split beside its evaluation split, calibration = evaluation split and holdout = test;
otherwise the evaluation split is cut in two fixed halves (a seeded permutation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import bootstrap

from .artifacts import AnalysisReport, ValidationReport, load_artifact
from .bundle import verify_bundle
from .data import Examples, load_examples
from .errors import DataError
from .metrics import compute_metric, predictions, score_predictions
from .tasks import HubSource, TaskConfig

HALVES_SEED = 0
ANALYSIS_COPY = "analysis.json"


@dataclass(frozen=True)
class EvalParts:
    calibration: Examples
    holdout: Examples
    calibration_name: str
    holdout_name: str


def calibration_and_holdout(task: TaskConfig, glue_dir: Path | None, max_examples: int | None) -> EvalParts:
    """Disjoint calibration and holdout examples of a task, each capped at max_examples (first N)."""
    test_has_labels = "test" in task.splits and task.eval_split != "test" and not isinstance(task.source, HubSource)
    evaluation = load_examples(task, task.eval_split, glue_dir=glue_dir)
    if test_has_labels:
        parts = (evaluation, load_examples(task, "test", glue_dir=glue_dir))
        names = (f"{task.eval_split} split", "test split")
    else:
        if len(evaluation) < 4:
            raise DataError(f"the {task.eval_split} split has {len(evaluation)} examples; need 4 to calibrate and validate")
        order = np.random.default_rng(HALVES_SEED).permutation(len(evaluation))
        half = len(order) // 2
        parts = (evaluation.select(order[:half]), evaluation.select(order[half:]))
        names = (f"{task.eval_split} split, calibration half", f"{task.eval_split} split, holdout half")
    if max_examples is not None:
        parts = (parts[0].head(max_examples), parts[1].head(max_examples))
    return EvalParts(parts[0], parts[1], *names)


def paired_bootstrap_ci(
    labels: np.ndarray, original: np.ndarray, bundle: np.ndarray, metric: str, regression: bool,
    n_resamples: int = 2000, seed: int = 0,
) -> tuple[float, float]:
    """95% percentile interval of metric(bundle) - metric(original) over examples resampled in pairs."""

    def delta(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
        return score_predictions(metric, y, b) - score_predictions(metric, y, a)

    preds = (predictions(original, regression), predictions(bundle, regression))
    result = bootstrap(
        (np.asarray(labels), *preds), delta, paired=True, vectorized=False, n_resamples=n_resamples,
        confidence_level=0.95, method="percentile", rng=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    return float(low), float(high)


def compare(
    task: TaskConfig, holdout: Examples, holdout_name: str, original: np.ndarray, bundle: np.ndarray,
    tolerance: float, parity: float | None = None,
) -> ValidationReport:
    """The validation report for two sets of logits on the same holdout examples."""
    regression = task.is_regression
    before = compute_metric(task.metric, holdout.labels, original, regression)
    after = compute_metric(task.metric, holdout.labels, bundle, regression)
    low, high = paired_bootstrap_ci(holdout.labels, original, bundle, task.metric, regression)
    agreement = None if regression else float(np.mean(predictions(original, False) == predictions(bundle, False)))
    return ValidationReport(
        metric_name=task.metric, holdout=holdout_name, n_examples=len(holdout), original=before, bundle=after,
        delta=after - before, delta_ci95=(low, high), agreement=agreement, tolerance=tolerance,
        passed=after - before >= -tolerance, max_abs_logit_diff_fp32=parity,
    )


def validate_bundle(bundle_dir: Path, tolerance: float | None = None, device: str | None = None) -> ValidationReport:
    """Re-check a bundle from scratch: file hashes, then the original checkpoint and the bundle's ONNX
    model on the same holdout examples. Nothing in the bundle is changed."""
    from .hidden import predict_logits
    from .models import load_classifier
    from .runtime import OnnxClassifier

    manifest = verify_bundle(bundle_dir)
    analysis = load_artifact(AnalysisReport, Path(bundle_dir) / ANALYSIS_COPY)
    stored = load_artifact(ValidationReport, Path(bundle_dir) / "validation.json")
    task = analysis.task_config
    glue_dir = Path(analysis.glue_dir) if analysis.glue_dir else None
    parts = calibration_and_holdout(task, glue_dir, stored.n_examples)
    model, tokenizer = load_classifier(manifest.source_checkpoint, num_labels=task.num_labels, device=device)
    original = predict_logits(model, tokenizer, parts.holdout)
    bundle = OnnxClassifier(Path(bundle_dir)).logits(parts.holdout.texts, parts.holdout.pairs)
    tol = stored.tolerance if tolerance is None else tolerance
    return compare(task, parts.holdout, parts.holdout_name, original, bundle, tol, stored.max_abs_logit_diff_fp32)
