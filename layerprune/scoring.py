"""Task metrics computed from model outputs (scikit-learn and scipy do the math)."""

from __future__ import annotations

import numpy as np
from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef


def predictions(logits: np.ndarray, regression: bool) -> np.ndarray:
    """Class ids (argmax) for classifiers, the single output for regressors."""
    logits = np.asarray(logits)
    return logits[:, 0] if regression else logits.argmax(axis=-1)


def compute_metric(name: str, labels: np.ndarray, logits: np.ndarray, regression: bool = False) -> float:
    """The task metric of a model's outputs (see score_predictions)."""
    return score_predictions(name, labels, predictions(logits, regression))


def score_predictions(name: str, labels: np.ndarray, preds: np.ndarray) -> float:
    """The task metric as a fraction (accuracy 0.87, not 87): f1 is binary with label 1 as positive,
    as GLUE reports it for MRPC and QQP."""
    labels = np.asarray(labels)
    if name == "accuracy":
        return float(accuracy_score(labels, preds))
    if name == "f1":
        return float(f1_score(labels, preds, average="binary", zero_division=0))
    if name == "matthews":
        return float(matthews_corrcoef(labels, preds))
    if name in ("pearson", "spearman"):
        if np.ptp(preds) == 0 or np.ptp(labels) == 0:
            return 0.0  # a constant predictor has no correlation; scipy would warn and return NaN
        stat = pearsonr if name == "pearson" else spearmanr
        return float(stat(labels, preds)[0])
    raise ValueError(f"unknown metric '{name}'")
