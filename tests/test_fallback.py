"""layerprune.fallback, which export and the runtime serve by, checked by hand: the threshold is numpy's linear
quantile of the top-class probabilities (computed here without scipy), the unsure rows are those strictly below it."""

from __future__ import annotations

import numpy as np
import pytest

from layerprune.fallback import cascade, confidence, threshold, unsure


def two_class(p_positive: list[float]) -> np.ndarray:
    """Logits whose softmax gives these positive-class probabilities."""
    p = np.asarray(p_positive)
    return np.stack([np.zeros_like(p), np.log(p / (1 - p))], axis=1)


def test_the_library_rule_by_hand() -> None:
    calibration = two_class([0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99])
    assert threshold(calibration, 0.2) == pytest.approx(0.64)  # 0.6 + 0.8 x 0.05
    three = np.log(np.array([[0.2, 0.5, 0.3], [0.6, 0.3, 0.1]]))
    np.testing.assert_allclose(confidence(three), [0.5, 0.6])
    pruned, original = two_class([0.3, 0.62, 0.64, 0.9]), two_class([0.9, 0.9, 0.9, 0.9])
    np.testing.assert_array_equal(unsure(pruned, 0.64), [False, True, False, False])  # 0.3 is 0.7 sure of class 0
    np.testing.assert_array_equal(cascade(pruned, original, 0.64), np.stack([pruned[0], original[1], pruned[2], pruned[3]]))
    for bad in (0.0, 1.0):
        with pytest.raises(ValueError, match="share"):
            threshold(calibration, bad)
