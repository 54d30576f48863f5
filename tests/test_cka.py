"""Tests for layerprune.cka: properties of CKA, agreement between formulations, edge cases."""

from __future__ import annotations

import numpy as np
import pytest

from layerprune.cka import (
    MinibatchCKA,
    _choose_route,
    center_gram,
    cka,
    cka_matrix,
    feature_space_linear_cka,
    gram_linear,
    is_degenerate,
)

# Any warning (notably RuntimeWarning from 0/0) fails a test.
pytestmark = pytest.mark.filterwarnings("error")

ESTIMATORS = ["linear", "debiased"]


def _rng(seed: int = 0) -> np.random.Generator:
    return np.random.default_rng(seed)


def _orthogonal(rng: np.random.Generator, d: int) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(d, d)))
    return q * np.sign(np.diag(r))  # Haar-distributed


def _shared_signal_reps(
    rng: np.random.Generator, n: int, dims: list[int], noise: list[float], rank: int = 8
) -> list[np.ndarray]:
    """Representations that share a low-rank signal, with different amounts of noise."""
    signal = rng.normal(size=(n, rank))
    return [
        signal @ rng.normal(size=(rank, d)) + s * rng.normal(size=(n, d)) + rng.normal(size=d)
        for d, s in zip(dims, noise)
    ]


def _pairwise(reps: list[np.ndarray], debiased: bool) -> np.ndarray:
    k = len(reps)
    out = np.empty((k, k))
    for i in range(k):
        for j in range(k):
            out[i, j] = feature_space_linear_cka(reps[i], reps[j], debiased=debiased)
    return out


# --- hand-computed value ------------------------------------------------------


def test_hand_computed_4x2() -> None:
    # Column offsets are removed by centering, leaving
    #   Xc = [[1,0],[0,1],[-1,0],[0,-1]],   Yc = [[1,0],[0,2],[-1,0],[0,-2]].
    # Xc^T Xc = diag(2, 2)  -> ||.||_F = sqrt(8)
    # Yc^T Yc = diag(2, 8)  -> ||.||_F = sqrt(68)
    # Yc^T Xc = diag(2, 4)  -> ||.||_F^2 = 4 + 16 = 20
    # CKA = 20 / (sqrt(8) sqrt(68)) = 20 / sqrt(544) = 5 / sqrt(34) ~= 0.857493
    x = np.array([[1, 0], [0, 1], [-1, 0], [0, -1]], dtype=float) + [3.0, -1.0]
    y = np.array([[1, 0], [0, 2], [-1, 0], [0, -2]], dtype=float) + [10.0, 5.0]
    expected = 5 / np.sqrt(34)
    assert feature_space_linear_cka(x, y) == pytest.approx(expected, rel=1e-12)
    assert cka(gram_linear(x), gram_linear(y)) == pytest.approx(expected, rel=1e-12)
    assert cka_matrix([x, y])[0, 1] == pytest.approx(expected, rel=1e-12)


def test_center_gram_matches_definitions() -> None:
    rng = _rng(1)
    n = 9
    x, y = rng.normal(size=(n, 5)), rng.normal(size=(n, 3))
    k, l = gram_linear(x), gram_linear(y)
    h = np.eye(n) - np.ones((n, n)) / n
    np.testing.assert_allclose(center_gram(k), h @ k @ h, atol=1e-12)

    # Song et al. 2012, Theorem 2, written out: with zero-diagonal K~, L~,
    # n(n-3) HSIC_1 = tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1.
    kt, lt = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    one = np.ones(n)
    bracket = (
        np.trace(kt @ lt)
        + (one @ kt @ one) * (one @ lt @ one) / ((n - 1) * (n - 2))
        - 2 / (n - 2) * (one @ kt @ lt @ one)
    )
    inner = np.sum(center_gram(k, unbiased=True) * center_gram(l, unbiased=True))
    assert inner == pytest.approx(bracket, rel=1e-10)
    # The input is left untouched and asymmetric input is refused.
    assert np.array_equal(k, gram_linear(x))
    with pytest.raises(ValueError):
        center_gram(rng.normal(size=(4, 4)))


# --- basic properties --------------------------------------------------------


@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_matrix_symmetric_unit_diagonal_bounded(estimator: str) -> None:
    reps = _shared_signal_reps(_rng(2), 300, [20, 40, 10, 25], [0.3, 1.0, 3.0, 0.1])
    m = cka_matrix(reps, estimator)
    assert m.shape == (4, 4) and m.dtype == np.float64
    assert np.array_equal(m, m.T)
    assert np.all(np.diag(m) == 1.0)
    assert np.all(np.isfinite(m))
    lower = 0.0 if estimator == "linear" else -1.0
    assert np.all((m >= lower) & (m <= 1.0))


@pytest.mark.parametrize("debiased", [False, True])
def test_invariant_to_orthogonal_transform_and_isotropic_scaling(debiased: bool) -> None:
    rng = _rng(3)
    x, y = _shared_signal_reps(rng, 200, [15, 12], [0.5, 1.0])
    base = feature_space_linear_cka(x, y, debiased)
    rotated = feature_space_linear_cka(x @ _orthogonal(rng, 15), y @ _orthogonal(rng, 12), debiased)
    scaled = feature_space_linear_cka(7.5 * x, 0.01 * y, debiased)
    assert rotated == pytest.approx(base, abs=1e-10)
    assert scaled == pytest.approx(base, abs=1e-10)


def test_not_invariant_to_ill_conditioned_linear_map() -> None:
    rng = _rng(4)
    d = 10
    x = rng.normal(size=(500, d))
    y = x @ rng.normal(size=(d, d)) + 0.5 * rng.normal(size=(500, d))
    # Invertible, condition number 1e3.
    a = _orthogonal(rng, d) @ np.diag(np.logspace(0, 3, d)) @ _orthogonal(rng, d)
    assert np.linalg.cond(a) == pytest.approx(1e3, rel=1e-6)
    assert abs(feature_space_linear_cka(x @ a, y) - feature_space_linear_cka(x, y)) > 0.2


@pytest.mark.parametrize("debiased", [False, True])
def test_identical_reps_give_one(debiased: bool) -> None:
    x = _rng(5).normal(size=(50, 30))
    assert feature_space_linear_cka(x, x.copy(), debiased) == pytest.approx(1.0, abs=1e-12)
    assert cka(gram_linear(x), gram_linear(x), debiased) == pytest.approx(1.0, abs=1e-12)


def test_independent_reps_score_low() -> None:
    rng = _rng(6)
    # n >> d: linear CKA of independent representations is near 0.
    x, y = rng.normal(size=(2000, 10)), rng.normal(size=(2000, 10))
    assert feature_space_linear_cka(x, y) < 0.05
    # n << d: K ~= d I, so linear CKA is biased towards 1 (Kornblith et al. 2019); the
    # debiased estimator removes that bias and scores well below 1.
    x, y = rng.normal(size=(20, 1000)), rng.normal(size=(20, 1000))
    debiased = feature_space_linear_cka(x, y, debiased=True)
    assert abs(debiased) < 0.2
    assert feature_space_linear_cka(x, y) > debiased + 0.5


def test_debiased_close_to_linear_for_large_n() -> None:
    x, y = _shared_signal_reps(_rng(7), 5000, [50, 60], [0.5, 0.5], rank=5)
    linear = feature_space_linear_cka(x, y)
    debiased = feature_space_linear_cka(x, y, debiased=True)
    assert linear > 0.5
    assert debiased == pytest.approx(linear, abs=0.02)


# --- agreement between formulations and routes --------------------------------


@pytest.mark.parametrize("debiased", [False, True])
def test_gram_and_feature_space_agree(debiased: bool) -> None:
    rng = _rng(8)
    for n, dx, dy in [(30, 5, 80), (100, 40, 40), (12, 3, 2)]:
        x, y = _shared_signal_reps(rng, n, [dx, dy], [0.7, 1.5], rank=2)
        gram_value = cka(gram_linear(x), gram_linear(y), debiased=debiased)
        assert gram_value == pytest.approx(
            feature_space_linear_cka(x, y, debiased=debiased), abs=1e-10
        )


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize(
    ("n", "dims", "route"),
    [
        (40, [300, 500, 200, 400], "gram"),  # n << d
        (600, [8, 12, 5, 16], "features"),  # n >> d
    ],
)
def test_cka_matrix_matches_pairwise_on_both_routes(
    estimator: str, n: int, dims: list[int], route: str
) -> None:
    assert _choose_route(n, dims) == route
    reps = _shared_signal_reps(_rng(9), n, dims, [0.2, 1.0, 2.0, 0.5], rank=3)
    reps[2] = reps[2].astype(np.float32)  # inputs may be float32
    m = cka_matrix(reps, estimator)
    np.testing.assert_allclose(m, _pairwise(reps, estimator == "debiased"), atol=1e-9)


def test_route_choice_respects_memory() -> None:
    # Gram stack of 13 x 20000^2 float64 (41 GB) is never built, however wide the reps.
    assert _choose_route(20000, [384] * 13) == "features"
    assert _choose_route(20000, [100000] * 13) == "features"
    assert _choose_route(2000, [768] * 13) == "gram"
    assert _choose_route(50000, [8] * 13) == "features"


# --- degenerate representations ------------------------------------------------


def test_is_degenerate() -> None:
    rng = _rng(10)
    row = rng.normal(size=(1, 64)).astype(np.float32)
    constant = np.repeat(row, 100, axis=0)  # like the CLS embedding at layer 0
    assert is_degenerate(constant)
    assert is_degenerate(constant + 1e-9 * rng.normal(size=constant.shape))
    assert is_degenerate(np.zeros((10, 4)))
    assert is_degenerate(rng.normal(size=(1, 5)))  # fewer than 2 rows
    assert is_degenerate(np.empty((10, 0)))
    assert not is_degenerate(rng.normal(size=(10, 4)))
    assert not is_degenerate(constant + 1e-3 * rng.normal(size=constant.shape))


@pytest.mark.parametrize("estimator", ESTIMATORS)
@pytest.mark.parametrize(("n", "d"), [(30, 200), (500, 6)])  # gram route, feature route
def test_degenerate_rep_gives_nan_row_without_warnings(estimator: str, n: int, d: int) -> None:
    rng = _rng(11)
    reps = _shared_signal_reps(rng, n, [d, d, d], [0.5, 1.0, 2.0], rank=3)
    reps.insert(0, np.repeat(rng.normal(size=(1, d)), n, axis=0))
    m = cka_matrix(reps, estimator)
    assert np.all(np.isnan(m[0])) and np.all(np.isnan(m[:, 0]))
    assert np.all(np.isfinite(m[1:, 1:]))
    assert np.all(np.diag(m)[1:] == 1.0)
    debiased = estimator == "debiased"
    assert np.isnan(feature_space_linear_cka(reps[0], reps[1], debiased))
    assert np.isnan(cka(gram_linear(reps[0]), gram_linear(reps[1]), debiased))


def test_all_degenerate_and_empty() -> None:
    const = np.ones((10, 3))
    assert np.all(np.isnan(cka_matrix([const, 2 * const])))
    assert cka_matrix([]).shape == (0, 0)


def test_invalid_input() -> None:
    rng = _rng(12)
    with pytest.raises(ValueError):
        cka_matrix([rng.normal(size=(10, 3)), rng.normal(size=(11, 3))])
    with pytest.raises(ValueError):
        cka_matrix([rng.normal(size=10)])
    with pytest.raises(ValueError):
        cka_matrix([np.full((10, 3), np.nan)])
    with pytest.raises(ValueError):
        cka_matrix([rng.normal(size=(3, 4))], estimator="debiased")  # HSIC_1 needs n >= 4
    with pytest.raises(ValueError):
        cka_matrix([rng.normal(size=(10, 4))], estimator="rbf")  # type: ignore[arg-type]


# --- a base-size layer stack, against plain formulas --------------------------------------------------------


def _reference_linear_cka(x: np.ndarray, y: np.ndarray) -> float:
    """Feature-space linear CKA in float64 (Kornblith et al. 2019, eq. 5): ||Yc^T Xc||_F^2 / (||Xc^T Xc|| ||Yc^T Yc||)."""
    xc, yc = (a.astype(np.float64) - a.astype(np.float64).mean(0) for a in (x, y))
    return float(np.linalg.norm(yc.T @ xc) ** 2 / (np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)))


def _reference_hsic1(k: np.ndarray, l: np.ndarray) -> float:
    """Unbiased HSIC as Song et al. (2012) write it, diagonals zeroed, no centering matrix:
    [tr(K~L~) + 1'K~1 1'L~1 / ((n-1)(n-2)) - 2/(n-2) 1'K~L~1] / (n(n-3))."""
    n = len(k)
    k, l = k - np.diag(np.diag(k)), l - np.diag(np.diag(l))
    return float((np.sum(k * l) + k.sum() * l.sum() / ((n - 1) * (n - 2)) - 2 / (n - 2) * (k.sum(0) @ l.sum(1)))
                 / (n * (n - 3)))


def test_layer_stack_in_float32_matches_float64_formulas() -> None:
    # 13 layers of a base-size encoder on 1000 examples, float32 as they come off a model.
    reps = [r.astype(np.float32) for r in _shared_signal_reps(_rng(13), 1000, [768] * 13, list(np.linspace(0.2, 3, 13)))]
    linear, debiased = cka_matrix(reps, "linear"), cka_matrix(reps, "debiased")
    assert linear.shape == debiased.shape == (13, 13)
    grams = {i: reps[i].astype(np.float64) @ reps[i].astype(np.float64).T for i in (0, 5, 6, 12)}
    for i, j in [(0, 12), (5, 6), (0, 5)]:
        assert linear[i, j] == pytest.approx(_reference_linear_cka(reps[i], reps[j]), abs=1e-5)
        hsic = _reference_hsic1(grams[i], grams[j])
        expected = hsic / np.sqrt(_reference_hsic1(grams[i], grams[i]) * _reference_hsic1(grams[j], grams[j]))
        assert debiased[i, j] == pytest.approx(expected, abs=1e-5)
    assert linear[5, 6] > linear[0, 12], "similar noise levels are more alike than distant ones"


# --- minibatch CKA ---------------------------------------------------------------


def test_minibatch_close_to_exact() -> None:
    reps = _shared_signal_reps(_rng(14), 4000, [64, 96, 32], [0.5, 1.0, 2.0])
    mb = MinibatchCKA(3)
    for start in range(0, 4000, 200):
        mb.update([r[start : start + 200] for r in reps])
    assert mb.num_batches == 20 and mb.skipped == 0
    result = mb.result()
    assert np.array_equal(result, result.T) and np.all(np.diag(result) == 1.0)
    np.testing.assert_allclose(result, cka_matrix(reps, "linear"), atol=0.03)
    np.testing.assert_allclose(result, cka_matrix(reps, "debiased"), atol=0.03)


def test_minibatch_single_batch_equals_debiased() -> None:
    reps = _shared_signal_reps(_rng(15), 150, [20, 30], [0.5, 2.0])
    mb = MinibatchCKA(2)
    mb.update(reps)
    np.testing.assert_allclose(mb.result(), cka_matrix(reps, "debiased"), atol=1e-10)


def test_minibatch_uneven_batches_match_formula() -> None:
    # Each batch must contribute HSIC_1 = <K~, L~> / (m (m - 3)), not the unscaled
    # bracket <K~, L~>; with batch sizes 10 and 120 that differ in how x and y relate,
    # the two give clearly different answers.
    rng = _rng(18)
    mb = MinibatchCKA(2)
    hsic = np.zeros(3)  # sums of HSIC_1 for (x, y), (x, x), (y, y)
    bracket = np.zeros(3)
    for m, noise in [(10, 0.1), (120, 3.0)]:
        x = rng.normal(size=(m, 6))
        y = x @ rng.normal(size=(6, 4)) + noise * rng.normal(size=(m, 4))
        mb.update([x, y])
        kx = center_gram(gram_linear(x), unbiased=True)
        ky = center_gram(gram_linear(y), unbiased=True)
        terms = np.array([np.sum(kx * ky), np.sum(kx * kx), np.sum(ky * ky)])
        hsic += terms / (m * (m - 3))
        bracket += terms
    expected = hsic[0] / np.sqrt(hsic[1] * hsic[2])
    unscaled = bracket[0] / np.sqrt(bracket[1] * bracket[2])
    assert mb.result()[0, 1] == pytest.approx(expected, rel=1e-10)
    assert abs(expected - unscaled) > 0.01


def test_minibatch_memory_is_flat() -> None:
    rng = _rng(16)

    def state_sizes(mb: MinibatchCKA) -> dict[str, int]:
        return {k: v.nbytes for k, v in vars(mb).items() if isinstance(v, np.ndarray)}

    mb = MinibatchCKA(4)
    sizes = []
    for total in (10, 100):
        while mb.num_batches < total:
            mb.update([rng.normal(size=(16, d)) for d in (3, 5, 7, 9)])
        sizes.append(state_sizes(mb))
    assert sizes[0] == sizes[1]
    assert sum(sizes[1].values()) <= 4 * 4 * 8 + 64  # (k, k) float64, little else


def test_minibatch_degenerate_skipped_and_empty() -> None:
    rng = _rng(17)
    mb = MinibatchCKA(3)
    assert np.all(np.isnan(mb.result()))  # no batches yet
    for _ in range(5):
        x = rng.normal(size=(32, 10))
        const = np.repeat(rng.normal(size=(1, 8)), 32, axis=0)
        mb.update([const, x, x @ rng.normal(size=(10, 6))])
    mb.update([rng.normal(size=(3, d)) for d in (8, 10, 6)])  # too small for HSIC_1
    assert mb.num_batches == 5 and mb.skipped == 1
    result = mb.result()
    assert np.all(np.isnan(result[0])) and np.all(np.isnan(result[:, 0]))
    assert np.all(np.isfinite(result[1:, 1:]))
    assert np.all(np.diag(result)[1:] == 1.0)
    with pytest.raises(ValueError):
        mb.update([rng.normal(size=(32, 4))] * 2)  # wrong number of representations


# --- the published values of Kornblith et al.'s demo ---------------------------------------------------------


def test_published_demo_values_on_every_route(monkeypatch) -> None:
    """Google's representation_similarity demo: np.random.seed(1337); X = randn(100, 10); Y = randn(100, 10) + X
    gives linear CKA 0.55761 and debiased CKA 0.51346, by Gram matrices, by features, and in cka_matrix
    through both of its routes."""
    from layerprune import cka as cka_module

    np.random.seed(1337)
    x = np.random.randn(100, 10)
    y = np.random.randn(100, 10) + x
    for debiased, published in ((False, 0.55761), (True, 0.51346)):
        assert cka_module.cka(cka_module.gram_linear(x), cka_module.gram_linear(y), debiased=debiased) == \
            pytest.approx(published, abs=5e-6)
        assert cka_module.feature_space_linear_cka(x, y, debiased=debiased) == pytest.approx(published, abs=5e-6)
        for route in ("gram", "features"):
            monkeypatch.setattr(cka_module, "_choose_route", lambda n, dims, route=route: route)
            matrix = cka_module.cka_matrix([x, y], "debiased" if debiased else "linear")
            assert matrix[0, 1] == pytest.approx(published, abs=5e-6), route
        monkeypatch.undo()
    # One minibatch of all 100 examples is the debiased estimator itself.
    batch = cka_module.MinibatchCKA(2)
    batch.update([x, y])
    assert batch.result()[0, 1] == pytest.approx(0.51346, abs=5e-6)
