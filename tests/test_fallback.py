"""benchmarks/fallback.py: the pruned model's answers, with the original's where it is least sure, checked on
logits made by hand (which texts are sent on, what is served, how often it differs from the original)."""

from __future__ import annotations

import numpy as np
import pytest

from conftest import load_benchmark

fallback = load_benchmark("fallback")


def two_class(p_positive: list[float]) -> np.ndarray:
    """Logits whose softmax gives these positive-class probabilities."""
    p = np.asarray(p_positive)
    return np.stack([np.zeros_like(p), np.log(p / (1 - p))], axis=1)


def test_the_least_sure_texts_take_the_originals_answer() -> None:
    # Calibration: the pruned model's top-class probabilities 0.55 to 0.99 (ten texts; quantile 20%: 0.64).
    calibration = two_class([0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9, 0.95, 0.99])
    # Test: five texts; the pruned model is unsure (0.52, 0.58) on the two where it disagrees with the original.
    pruned = two_class([0.52, 0.58, 0.9, 0.2, 0.97])
    original = two_class([0.3, 0.4, 0.8, 0.1, 0.9])
    none = fallback.fallback(calibration, pruned, original, 0.0)
    assert none.sent_on == 0 and none.disagreement == 2 / 5
    np.testing.assert_array_equal(none.served, pruned)

    some = fallback.fallback(calibration, pruned, original, 0.2)
    assert some.sent_on == 2 / 5 and some.disagreement == 0
    np.testing.assert_array_equal(some.served, np.concatenate([original[:2], pruned[2:]]))

    # At 75% the threshold is 0.8875 (numpy's linear quantile: 0.85 + 0.75 x 0.05): the text whose top class
    # has 0.8 goes too, though it agreed; 0.9 and 0.97 stay.
    most = fallback.fallback(calibration, pruned, original, 0.75)
    assert most.sent_on == 3 / 5 and most.disagreement == 0
    np.testing.assert_array_equal(most.served, np.stack([original[0], original[1], pruned[2], original[3], pruned[4]]))


def test_the_library_rule_by_hand() -> None:
    """layerprune.fallback, which export and the runtime serve by: the threshold is numpy's linear quantile of
    the top-class probabilities (computed here without scipy), the unsure rows are those strictly below it."""
    from layerprune.fallback import cascade, confidence, threshold, unsure

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
