"""The fallback: the pruned model answers where it is sure, the original model where it is not.

A healed cut's disagreements with the original sit almost all among the texts it is least sure of
(docs/results.md, "The fallback to the original"). So a bundle exported with
`--fallback SHARE` also holds the original's graph, and a text whose top-class probability under the pruned model
is below a threshold takes the original's answer: a confidence cascade, the idea of early-exit models (DeeBERT,
Xin et al., 2020) with one exit at the cut and the full model behind it.

The threshold is the SHARE-quantile of the pruned model's top-class probabilities on the calibration texts: a
function of their inputs only (no labels, not the original's answers), so on unseen texts about SHARE of them
are sent on. Single-label classification only: a regression output has no top-class probability.

Pure numpy (scipy's softmax): the torch-free runtime routes each served batch with `unsure`.
"""

from __future__ import annotations

import numpy as np
from scipy.special import softmax


def confidence(logits: np.ndarray) -> np.ndarray:
    """Each row's top-class probability: max_k softmax(logits)_k."""
    return softmax(np.asarray(logits, dtype=np.float64), axis=-1).max(axis=-1)


def threshold(calibration: np.ndarray, share: float) -> float:
    """The top-class probability below which `share` of the pruned model's `calibration` logits fall (numpy's
    linear quantile)."""
    if not 0 < share < 1:
        raise ValueError(f"the share sent on must lie in (0, 1), got {share}")
    return float(np.quantile(confidence(calibration), share))


def unsure(logits: np.ndarray, below: float) -> np.ndarray:
    """The rows the original answers: top-class probability below `below`."""
    return confidence(logits) < below


def cascade(pruned: np.ndarray, original: np.ndarray, below: float) -> np.ndarray:
    """What is served for texts with pruned logits `pruned` and original logits `original`: the original's
    where the pruned model's top-class probability is below `below`, else the pruned model's."""
    return np.where(unsure(pruned, below)[:, None], original, pruned)
