"""validate: the exported bundle's task metric against the original checkpoint's, on held-out examples.

Calibration examples choose the depth; disjoint holdout examples validate the bundle. When the task has
a labelled test split beside its evaluation split, calibration = evaluation split and holdout = test;
otherwise the evaluation split is cut in two fixed halves (a seeded permutation).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from scipy.stats import binomtest, bootstrap

from .artifacts import AnalysisReport, GateForecast, ValidationReport, load_artifact
from .bundle import open_bundle
from .data import Examples, load_examples
from .errors import DataError
from .options import ALPHA
from .scoring import compute_metric, predictions, score_predictions
from .tasks import TaskConfig

HALVES_SEED = 0


@dataclass(frozen=True)
class EvalParts:
    calibration: Examples
    holdout: Examples
    calibration_name: str
    holdout_name: str


def calibration_and_holdout(
    task: TaskConfig, glue_dir: Path | None, max_examples: int | None, resample_seed: int | None = None
) -> EvalParts:
    """Disjoint calibration and holdout examples of a task, each capped at max_examples (first N).

    resample_seed: pool both parts and cut them anew with this seed (benchmarks repeat an export over
    several such resamples to see how often the gate agrees with the choice).
    """
    test_has_labels = "test" in task.splits and task.eval_split != "test" and task.source.labelled_test
    evaluation = load_examples(task, task.eval_split, glue_dir=glue_dir)
    if test_has_labels and resample_seed is not None:
        pooled = evaluation.concat(load_examples(task, "test", glue_dir=glue_dir))
        order = np.random.default_rng(resample_seed).permutation(len(pooled))
        half = len(order) // 2
        parts = (pooled.select(order[:half]), pooled.select(order[half:]))
        names = (f"{task.eval_split} + test, resample {resample_seed}, first half",
                 f"{task.eval_split} + test, resample {resample_seed}, second half")
    elif test_has_labels:
        parts = (evaluation, load_examples(task, "test", glue_dir=glue_dir))
        names = (f"{task.eval_split} split", "test split")
    else:
        if len(evaluation) < 4:
            raise DataError(f"the {task.eval_split} split has {len(evaluation)} examples; need 4 to calibrate and validate")
        order = np.random.default_rng(HALVES_SEED if resample_seed is None else resample_seed).permutation(len(evaluation))
        half = len(order) // 2
        parts = (evaluation.select(order[:half]), evaluation.select(order[half:]))
        names = (f"{task.eval_split} split, calibration half", f"{task.eval_split} split, holdout half")
    if max_examples is not None:
        parts = (parts[0].head(max_examples), parts[1].head(max_examples))
    return EvalParts(parts[0], parts[1], *names)


def paired_bootstrap(
    labels: np.ndarray, original: np.ndarray, candidate: np.ndarray, metric: str, regression: bool,
    n_resamples: int = 2000, seed: int = 0,
) -> tuple[float, float, float]:
    """95% percentile interval and standard error of metric(candidate) - metric(original) over examples
    resampled in pairs: (low, high, se)."""

    def delta(y: np.ndarray, a: np.ndarray, b: np.ndarray) -> float:
        return score_predictions(metric, y, b) - score_predictions(metric, y, a)

    preds = (predictions(original, regression), predictions(candidate, regression))
    result = bootstrap(
        (np.asarray(labels), *preds), delta, paired=True, vectorized=False, n_resamples=n_resamples,
        confidence_level=0.95, method="percentile", rng=np.random.default_rng(seed),
    )
    low, high = result.confidence_interval
    return float(low), float(high), float(result.standard_error)




def z_for(alpha: float) -> float:
    """The one-sided normal quantile for error rate `alpha` (1.645 at 5%, 1.96 at 2.5%)."""
    from scipy.stats import norm

    return float(norm.ppf(1 - alpha))


def forecast(
    task: TaskConfig, labels: np.ndarray, original: np.ndarray, candidate: np.ndarray, tolerance: float,
    n_holdout: int, unlabeled: tuple[np.ndarray, np.ndarray] | None = None, alpha: float = ALPHA,
) -> GateForecast:
    """Will the holdout gate (holdout delta >= -tolerance) pass this candidate? Two ways to say yes, each
    wrong at most `alpha` of the time (one-sided; z = the normal quantile, 1.645 at alpha 5%):

    - labelled: the calibration delta minus z standard errors of the *holdout* delta still clears the
      tolerance. The holdout delta's error combines the calibration's own (paired bootstrap, se_c) and the
      holdout's sampling noise (se_c * sqrt(n_c / n_h)): lower = delta_c - z * se_c * sqrt(1 + n_c / n_h).
    - agreement (classification): on any examples |accuracy delta| <= the share of differing predictions,
      which needs no labels. Its upper bound d+ over calibration plus unlabeled in-domain texts (Wilson),
      plus the holdout's sampling noise on it, below the tolerance: d+ + z * sqrt(d+ / n_h) <= tolerance.
      (Accuracy only: other metrics are not bounded by the disagreement.)
    `unlabeled`: (original, candidate) logits of unlabeled in-domain texts.
    """
    regression = task.is_regression
    before = compute_metric(task.metric, labels, original, regression)
    after = compute_metric(task.metric, labels, candidate, regression)
    _, _, se = paired_bootstrap(labels, original, candidate, task.metric, regression)
    z = z_for(alpha)
    lower = (after - before) - z * se * float(np.sqrt(1 + len(labels) / max(n_holdout, 1)))
    d = d_up = agree_low = None
    n_texts = len(labels)
    agreement_bounds_delta = False
    if not regression:
        a, b = [predictions(original, False)], [predictions(candidate, False)]
        if unlabeled is not None:
            a.append(predictions(unlabeled[0], False))
            b.append(predictions(unlabeled[1], False))
        differ = np.concatenate(a) != np.concatenate(b)
        n_texts = len(differ)
        d = float(differ.mean())
        d_up = _wilson_upper(int(differ.sum()), n_texts, z)
        agree_low = agreement_lower_bound(int((~differ).sum()), n_texts)
        agreement_bounds_delta = task.metric == "accuracy" and d_up + z * np.sqrt(d_up / max(n_holdout, 1)) <= tolerance
    return GateForecast(
        delta=after - before, delta_sd=se, alpha=alpha, lower_bound=lower, disagreement=d, disagreement_upper=d_up,
        agreement_lower=agree_low, n_agreement=n_texts, passes=bool(lower >= -tolerance or agreement_bounds_delta),
    )


def certifiable_disagreement(tolerance: float, alpha: float, n_calibration: int, n_holdout: int) -> float:
    """The share of calibration texts a candidate may disagree with the original on and still pass the
    labelled forecast, when its calibration delta is zero: only disagreements move the delta, so its standard
    error is about sqrt(d / n_c), and delta - z * se * sqrt(1 + n_c / n_h) >= -tolerance gives
    d <= n_c * (tolerance / (z * sqrt(1 + n_c / n_h)))^2."""
    if tolerance <= 0:
        return 0.0
    return float(n_calibration * (tolerance / (z_for(alpha) * np.sqrt(1 + n_calibration / max(n_holdout, 1)))) ** 2)


def _wilson_upper(k: int, n: int, z: float) -> float:
    """One-sided upper bound of a binomial proportion k/n (Wilson score interval)."""
    if n == 0:
        return 1.0
    p = k / n
    centre = p + z * z / (2 * n)
    spread = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return float(min(1.0, (centre + spread) / (1 + z * z / n)))


def compare(
    task: TaskConfig, holdout: Examples, holdout_name: str, original: np.ndarray, served: np.ndarray,
    tolerance: float, max_length: int, parity: float | None = None, sent_on: float | None = None,
) -> ValidationReport:
    """The validation report for two sets of logits on the same holdout examples: the original's and the bundle's
    as served (`served`); `sent_on`: the share of them the bundle's fallback sent on to the original (None: the
    bundle has none)."""
    regression = task.is_regression
    before = compute_metric(task.metric, holdout.labels, original, regression)
    after = compute_metric(task.metric, holdout.labels, served, regression)
    low, high, _ = paired_bootstrap(holdout.labels, original, served, task.metric, regression)
    same = None if regression else int(np.sum(predictions(original, False) == predictions(served, False)))
    agreement = None if same is None else same / len(holdout)
    lower = None if same is None else agreement_lower_bound(same, len(holdout))
    return ValidationReport(
        metric_name=task.metric, holdout=holdout_name, n_examples=len(holdout), original=before, bundle=after,
        delta=after - before, delta_ci95=(low, high), agreement=agreement, agreement_lower95=lower,
        tolerance=tolerance, passed=after - before >= -tolerance, max_abs_logit_diff_fp32=parity,
        max_length=max_length, sent_on=sent_on,
    )


def agreement_lower_bound(agree: int, n: int, confidence: float = 0.95) -> float:
    """One-sided lower confidence bound of a share of agreeing predictions (`agree` of `n`): the lower end of the
    Wilson score interval (Wilson 1927), which stays inside [0, 1] and keeps its coverage near 100% agreement,
    where the normal interval does not. One-sided at `confidence` is the two-sided interval at 2*confidence - 1."""
    return float(binomtest(agree, n).proportion_ci(confidence_level=2 * confidence - 1, method="wilson").low)


def validate_bundle(bundle_dir: Path, tolerance: float | None = None, device: str | None = None) -> ValidationReport:
    """Re-check a bundle from scratch: file hashes and the bundle's own model and tokenizer first (they
    take a second), then the original checkpoint and the bundle on the same holdout examples, both at the
    manifest's max length. Nothing in the bundle is changed.

    bundle_dir: the bundle's folder (export's output); a bundle the gate refused is re-checked too.
    tolerance: the largest allowed metric drop, as a fraction (default: the one the bundle was validated at).
    device: where the original checkpoint runs (default: transformers' choice); the bundle runs on onnxruntime.
    Returns the new validation report (not written). Raises LayerpruneError (one line) for a bundle that is
    altered or unreadable."""
    from .hidden import predict_logits
    from .models import load_classifier

    opened = open_bundle(Path(bundle_dir), allow_unvalidated=True)  # a failed bundle is re-checked too
    manifest, runner = opened.manifest, opened.classifier
    analysis = load_artifact(AnalysisReport, Path(bundle_dir) / manifest.parts.analysis)
    stored = load_artifact(ValidationReport, Path(bundle_dir) / manifest.parts.validation)
    task = analysis.task_config
    glue_dir = Path(analysis.glue_dir) if analysis.glue_dir else None
    parts = calibration_and_holdout(task, glue_dir, stored.n_examples, manifest.resample_seed)
    model, tokenizer = load_classifier(manifest.source_checkpoint, num_labels=task.num_labels, device=device)
    original = predict_logits(model, tokenizer, parts.holdout, max_length=manifest.max_length)
    served = runner.logits(parts.holdout.texts, parts.holdout.pairs)
    tol = stored.tolerance if tolerance is None else tolerance
    sent_on = runner.sent_on / len(parts.holdout) if runner.fallback is not None else None
    return compare(task, parts.holdout, parts.holdout_name, original, served, tol, manifest.max_length,
                   stored.max_abs_logit_diff_fp32, sent_on)
