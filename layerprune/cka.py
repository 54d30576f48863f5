"""Centered kernel alignment (CKA) between layer representations: pure numerics.

Small numpy-only functions in the style of the demo that accompanies Kornblith et al.
(github.com/google-research/google-research/tree/master/representation_similarity).
Everything is computed in float64, whatever the input dtype.

References
----------
- Kornblith, Norouzi, Lee & Hinton 2019, "Similarity of Neural Network Representations
  Revisited", ICML (linear CKA, debiased CKA, and the demo this module follows).
- Song, Smola, Gretton, Bedo & Borgwardt 2012, "Feature Selection via Dependence
  Maximization", JMLR 13 (the unbiased HSIC estimator HSIC_1).
- Nguyen, Raghu & Kornblith 2021, "Do Wide and Deep Networks Learn the Same Things?",
  ICLR (minibatch CKA).
- Phang, Liu & Bowman 2021, "Fine-Tuned Transformers Show Clusters of Similar
  Representations Across Layers", BlackboxNLP (the use of CKA this package is after).
"""

from __future__ import annotations

from typing import Literal, Sequence

import numpy as np

__all__ = [
    "gram_linear",
    "center_gram",
    "cka",
    "feature_space_linear_cka",
    "is_degenerate",
    "cka_matrix",
    "MinibatchCKA",
]

# How CKA is estimated (`analyze --cka-estimator`, analysis.json's `cka_estimator`): linear and debiased by
# `cka_matrix`, minibatch by `MinibatchCKA`, whose sums run over batches of examples.
CkaEstimator = Literal["linear", "debiased", "minibatch"]
_Route = Literal["gram", "features"]

# A representation whose centered norm is below this fraction of its norm has no
# variance across examples worth the name (e.g. the CLS embedding before any layer).
_DEGENERATE_RTOL = 1e-6
_TINY = float(np.finfo(np.float64).tiny)
# Largest stack of centered Gram matrices (k * n^2 float64 values) cka_matrix will build.
_GRAM_STACK_MAX_BYTES = 1 << 30
# Largest X_i^T [X_i ... X_k] block the feature route holds at once.
_FEATURE_BLOCK_MAX_BYTES = 1 << 28
# The U-statistic HSIC_1 sums over 4-tuples of distinct examples.
_MIN_EXAMPLES_UNBIASED = 4


# ---------------------------------------------------------------------------
# Gram-space and feature-space CKA of one pair (the demo's functions)
# ---------------------------------------------------------------------------


def gram_linear(x: np.ndarray) -> np.ndarray:
    """Linear-kernel Gram matrix K = X X^T (Kornblith et al. 2019, Sec. 3).

    Args:
      x: (n, d) examples by features.

    Returns:
      (n, n) float64 Gram matrix.
    """
    x = _as_float64_2d(x, "x")
    return x @ x.T


def center_gram(gram: np.ndarray, unbiased: bool = False) -> np.ndarray:
    """Center a symmetric Gram matrix.

    Biased: H K H with H = I - (1/n) 1 1^T (Gretton et al. 2005; Kornblith et al. 2019,
    eq. 3). Unbiased: the centering of Song et al. 2012 as written in Kornblith's demo:
    zero the diagonal, then remove row/column means so that the Frobenius inner product
    of two such matrices equals n (n - 3) HSIC_1(K, L), the U-statistic estimator.

    Args:
      gram: (n, n) symmetric matrix.
      unbiased: use the U-statistic centering (needs n >= 4).

    Returns:
      A new (n, n) float64 matrix; `gram` is not modified.
    """
    gram = np.array(gram, dtype=np.float64, copy=True)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1]:
        raise ValueError(f"gram must be a square matrix, got shape {gram.shape}")
    if not np.all(np.isfinite(gram)):
        raise ValueError("gram contains non-finite values")
    if not np.allclose(gram, gram.T):
        raise ValueError("gram must be a symmetric matrix")
    n = gram.shape[0]
    if unbiased:
        if n < _MIN_EXAMPLES_UNBIASED:
            raise ValueError(f"unbiased centering needs at least 4 examples, got {n}")
        _unbiased_center_inplace(gram)
    elif n > 0:
        # H K H = K - 1 m^T - m 1^T + mean(K) 1 1^T, with m the column means.
        means = np.mean(gram, axis=0)
        means -= np.mean(means) / 2
        gram -= means[:, None]
        gram -= means[None, :]
    return gram


def cka(gram_x: np.ndarray, gram_y: np.ndarray, debiased: bool = False) -> float:
    """CKA from Gram matrices: <K_c, L_c>_F / (||K_c||_F ||L_c||_F).

    K_c is H K H (Kornblith et al. 2019, eq. 4) or, with `debiased`, the unbiased
    centering, which turns the ratio into HSIC_1(K, L) / sqrt(HSIC_1(K, K) HSIC_1(L, L))
    (Song et al. 2012; Kornblith et al. 2019, Appendix).

    Returns:
      The similarity, or nan when either centered Gram matrix is (numerically) zero,
      i.e. a representation without variance across examples, where CKA is 0/0.
    """
    gram_x = np.asarray(gram_x)
    gram_y = np.asarray(gram_y)
    if gram_x.shape != gram_y.shape:
        raise ValueError(f"Gram matrices differ in shape: {gram_x.shape} vs {gram_y.shape}")
    centered_x = center_gram(gram_x, unbiased=debiased)
    centered_y = center_gram(gram_y, unbiased=debiased)
    norm_x = float(np.linalg.norm(centered_x))
    norm_y = float(np.linalg.norm(centered_y))
    # A Gram matrix scales with the square of X, hence the squared tolerance.
    tol = _DEGENERATE_RTOL**2
    if norm_x <= tol * max(float(np.linalg.norm(gram_x)), _TINY) or norm_y <= tol * max(
        float(np.linalg.norm(gram_y)), _TINY
    ):
        return float("nan")
    # Normalize first so that the inner product cannot overflow.
    value = (centered_x / norm_x).ravel() @ (centered_y / norm_y).ravel()
    return _clip(float(value), debiased)


def feature_space_linear_cka(x: np.ndarray, y: np.ndarray, debiased: bool = False) -> float:
    """Linear CKA from features: ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F).

    X and Y are centered column-wise first (Kornblith et al. 2019, eq. 5). With
    `debiased`, every ||A^T B||_F^2 = tr(K L) is replaced by the U-statistic bracket
    (Song et al. 2012, Theorem 2, for centered features, as in Kornblith's demo)

        tr(K L) - n/(n-2) diag(K).diag(L) + tr(K) tr(L) / ((n-1)(n-2)),

    which is n (n - 3) HSIC_1(K, L) without forming the n x n matrices.

    Returns:
      The similarity, or nan when X or Y is degenerate (see `is_degenerate`).
    """
    x = _as_float64_2d(x, "x")
    y = _as_float64_2d(y, "y")
    if x.shape[0] != y.shape[0]:
        raise ValueError(f"x and y differ in examples: {x.shape[0]} vs {y.shape[0]}")
    n = x.shape[0]
    if debiased and n < _MIN_EXAMPLES_UNBIASED:
        raise ValueError(f"debiased CKA needs at least 4 examples, got {n}")
    x, degenerate_x = _center(x)
    y, degenerate_y = _center(y)
    if degenerate_x or degenerate_y:
        return float("nan")
    # CKA is scale invariant; unit Frobenius norm keeps the fourth powers far from overflow.
    x /= np.linalg.norm(x)
    y /= np.linalg.norm(y)

    hsic_xy = np.linalg.norm(x.T @ y) ** 2
    hsic_xx = np.linalg.norm(x.T @ x) ** 2
    hsic_yy = np.linalg.norm(y.T @ y) ** 2
    if debiased:
        rows_x = np.einsum("ij,ij->i", x, x)  # diag(K)
        rows_y = np.einsum("ij,ij->i", y, y)  # diag(L)
        hsic_xy = _debiased_bracket(hsic_xy, rows_x @ rows_y, rows_x.sum(), rows_y.sum(), n)
        hsic_xx = _debiased_bracket(hsic_xx, rows_x @ rows_x, rows_x.sum(), rows_x.sum(), n)
        hsic_yy = _debiased_bracket(hsic_yy, rows_y @ rows_y, rows_y.sum(), rows_y.sum(), n)
        if hsic_xx <= 0 or hsic_yy <= 0:
            return float("nan")
    return _clip(float(hsic_xy / np.sqrt(hsic_xx * hsic_yy)), debiased)


def is_degenerate(x: np.ndarray) -> bool:
    """True when X has (numerically) no variance across examples.

    That is ||X - 1 mean(X)||_F <= 1e-6 max(||X||_F, tiny), or X has fewer than 2 rows.
    CKA with such a representation is 0/0 (its centered Gram matrix is zero), e.g. the
    CLS position of the embedding layer, which is the same vector for every example.
    """
    return _center(_as_float64_2d(x, "x"))[1]


# ---------------------------------------------------------------------------
# All pairs at once
# ---------------------------------------------------------------------------


def cka_matrix(reps: Sequence[np.ndarray], estimator: CkaEstimator = "linear") -> np.ndarray:
    """CKA between every pair of representations, in one pass.

    Entry (i, j) is linear CKA (Kornblith et al. 2019, eq. 5) or, for "debiased",
    HSIC_1(K_i, K_j) / sqrt(HSIC_1(K_i, K_i) HSIC_1(K_j, K_j)) with the unbiased
    estimator of Song et al. 2012. Each representation is centered once; then all
    pairwise HSIC values come either from one product of the stacked centered Gram
    matrices or from the feature products ||X_i^T X_j||_F^2, whichever is cheaper for
    this n and these widths (the Gram stack is only built while it fits in 1 GiB).

    Args:
      reps: k arrays, reps[i] of shape (n, d_i), the same n for all (e.g. one per layer).
      estimator: "linear" (biased HSIC) or "debiased" (U-statistic HSIC, n >= 4); "minibatch" is
        `MinibatchCKA`'s, over batches.

    Returns:
      (k, k) symmetric float64 matrix. Rows and columns of degenerate representations
      (`is_degenerate`) are nan; the diagonal is otherwise exactly 1.0.
    """
    if estimator not in ("linear", "debiased"):
        raise ValueError(f"estimator must be 'linear' or 'debiased' (minibatch: MinibatchCKA), got {estimator!r}")
    debiased = estimator == "debiased"
    arrays = _check_reps(reps)
    if not arrays:
        return np.empty((0, 0), dtype=np.float64)
    n = arrays[0].shape[0]
    if debiased and n < _MIN_EXAMPLES_UNBIASED:
        raise ValueError(f"debiased CKA needs at least 4 examples, got {n}")
    hsic, degenerate = _pairwise_hsic(arrays, debiased=debiased, normalize=True)
    return _hsic_to_cka(hsic, ~degenerate, debiased)


class MinibatchCKA:
    """Minibatch CKA (Nguyen, Raghu & Kornblith 2021, eq. 3) over k representations.

        CKA_mb(i, j) = sum_b HSIC_1(K_ib, K_jb)
                       / sqrt(sum_b HSIC_1(K_ib, K_ib) * sum_b HSIC_1(K_jb, K_jb))

    with the unbiased HSIC_1 of Song et al. 2012 on each minibatch b. Only the (k, k)
    running sums are kept, so memory does not grow with the number of examples.
    Batches with fewer than 4 examples, where HSIC_1 is undefined, are skipped and
    counted in `skipped`. A representation that is degenerate within a batch adds 0.
    """

    def __init__(self, num_reps: int) -> None:
        if num_reps < 1:
            raise ValueError(f"num_reps must be positive, got {num_reps}")
        self.num_reps = int(num_reps)
        self.skipped = 0
        self._num_batches = 0
        self._hsic_sum = np.zeros((self.num_reps, self.num_reps), dtype=np.float64)

    def update(self, reps: Sequence[np.ndarray]) -> None:
        """Add one minibatch: `num_reps` arrays of shape (m, d_i), the same m for all."""
        if len(reps) != self.num_reps:
            raise ValueError(f"expected {self.num_reps} representations, got {len(reps)}")
        arrays = _check_reps(reps)
        m = arrays[0].shape[0]
        if m < _MIN_EXAMPLES_UNBIASED:
            self.skipped += 1
            return
        # No normalization here: the sums over batches must keep each batch's scale.
        bracket, _ = _pairwise_hsic(arrays, debiased=True, normalize=False)
        self._hsic_sum += bracket / (m * (m - 3))
        self._num_batches += 1

    @property
    def num_batches(self) -> int:
        """Minibatches accumulated so far (skipped ones not included)."""
        return self._num_batches

    def result(self) -> np.ndarray:
        """(k, k) float64 minibatch CKA; nan where undefined.

        Undefined: no batches yet, or a representation whose accumulated self-HSIC is
        <= 0 (degenerate in every batch).
        """
        if self._num_batches == 0:
            return np.full((self.num_reps, self.num_reps), np.nan)
        defined = np.diag(self._hsic_sum) > 0
        return _hsic_to_cka(self._hsic_sum, defined, debiased=True)


# ---------------------------------------------------------------------------
# Internals
# ---------------------------------------------------------------------------


def _as_float64_2d(x: np.ndarray, name: str) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2:
        raise ValueError(f"{name} must be 2-D (examples, features), got shape {x.shape}")
    if not np.all(np.isfinite(x)):
        raise ValueError(f"{name} contains non-finite values")
    return x


def _check_reps(reps: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Validate shapes and finiteness; keeps each array's dtype (cast later, once)."""
    arrays = [np.asarray(r) for r in reps]
    for i, a in enumerate(arrays):
        if a.ndim != 2:
            raise ValueError(f"representation {i} must be 2-D (examples, features), got {a.shape}")
        if not np.all(np.isfinite(a)):
            raise ValueError(f"representation {i} contains non-finite values")
    if arrays and len({a.shape[0] for a in arrays}) > 1:
        raise ValueError(f"representations differ in examples: {[a.shape[0] for a in arrays]}")
    return arrays


def _center(x: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, bool]:
    """Column-center X in float64 (into `out` if given) and flag degeneracy."""
    if out is None:
        out = np.array(x, dtype=np.float64, copy=True)
    else:
        out[...] = x
    if out.shape[0] < 2:
        return out, True
    norm = float(np.linalg.norm(out))
    out -= out.mean(axis=0, keepdims=True)
    return out, bool(np.linalg.norm(out) <= _DEGENERATE_RTOL * max(norm, _TINY))


def _unbiased_center_inplace(gram: np.ndarray) -> None:
    """Song et al. 2012 centering, as in Kornblith's demo (see `center_gram`)."""
    n = gram.shape[0]
    np.fill_diagonal(gram, 0)
    means = np.sum(gram, axis=0) / (n - 2)
    means -= np.sum(means) / (2 * (n - 1))
    gram -= means[:, None]
    gram -= means[None, :]
    np.fill_diagonal(gram, 0)


def _debiased_bracket(
    xty: np.ndarray | float,
    rows_dot: np.ndarray | float,
    sq_norm_x: np.ndarray | float,
    sq_norm_y: np.ndarray | float,
    n: int,
) -> np.ndarray | float:
    """n (n-3) HSIC_1 from feature-space terms of centered features (Kornblith's demo)."""
    return xty - n / (n - 2.0) * rows_dot + sq_norm_x * sq_norm_y / ((n - 1.0) * (n - 2.0))


def _choose_route(n: int, dims: Sequence[int]) -> _Route:
    """Pick the cheaper way to get all pairwise HSIC values.

    Gram route: k Grams (n^2 d_i / 2 multiply-adds each, symmetric) plus the (k x n^2)
    stack times its transpose (k^2 n^2 / 2). Feature route: X_i^T X_j for i <= j,
    n d_i d_j each. The Gram stack needs k n^2 float64 values, so it is ruled out past
    _GRAM_STACK_MAX_BYTES whatever the flop count.
    """
    k = len(dims)
    if k * n * n * 8 > _GRAM_STACK_MAX_BYTES:
        return "features"
    total = float(sum(dims))
    gram_cost = n * n * (total + k * k) / 2.0
    feature_cost = n * (total * total + sum(float(d) * d for d in dims)) / 2.0
    return "gram" if gram_cost < feature_cost else "features"


def _pairwise_hsic(
    arrays: Sequence[np.ndarray],
    debiased: bool,
    normalize: bool,
    route: _Route | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """All pairwise tr(K_i L_j) (linear) or n (n-3) HSIC_1 (debiased), plus degeneracy.

    Degenerate representations get all-zero rows and columns. With `normalize`, each
    centered representation is scaled to unit Frobenius norm first (CKA does not change;
    the values stay O(1)).
    """
    n = arrays[0].shape[0]
    dims = [a.shape[1] for a in arrays]
    if route is None:
        route = _choose_route(n, dims)
    if route == "gram":
        return _pairwise_hsic_gram(arrays, debiased, normalize)
    return _pairwise_hsic_features(arrays, debiased, normalize)


def _pairwise_hsic_gram(
    arrays: Sequence[np.ndarray], debiased: bool, normalize: bool
) -> tuple[np.ndarray, np.ndarray]:
    k = len(arrays)
    n = arrays[0].shape[0]
    degenerate = np.zeros(k, dtype=bool)
    stack = np.empty((k, n * n), dtype=np.float64)
    used: list[int] = []
    for i, a in enumerate(arrays):
        xc, degenerate[i] = _center(a)
        if degenerate[i]:
            continue
        if normalize:
            xc /= np.linalg.norm(xc)
        gram = stack[len(used)].reshape(n, n)
        # X_c X_c^T of centered features is already H K H.
        np.matmul(xc, xc.T, out=gram)
        if debiased:
            _unbiased_center_inplace(gram)
        used.append(i)
    hsic = np.zeros((k, k), dtype=np.float64)
    if used:
        block = stack[: len(used)]
        hsic[np.ix_(used, used)] = block @ block.T
    return hsic, degenerate


def _pairwise_hsic_features(
    arrays: Sequence[np.ndarray], debiased: bool, normalize: bool
) -> tuple[np.ndarray, np.ndarray]:
    k = len(arrays)
    n = arrays[0].shape[0]
    dims = [a.shape[1] for a in arrays]
    offsets = np.concatenate([[0], np.cumsum(dims)]).astype(int)
    # All centered features side by side, so X_i^T [X_i ... X_k] is one product.
    z = np.empty((n, int(offsets[-1])), dtype=np.float64)
    degenerate = np.zeros(k, dtype=bool)
    for i, a in enumerate(arrays):
        part = z[:, offsets[i] : offsets[i + 1]]
        _, degenerate[i] = _center(a, out=part)
        if degenerate[i]:
            part[...] = 0.0  # contributes exactly zero to every pair
        elif normalize:
            part /= np.linalg.norm(part)

    hsic = np.zeros((k, k), dtype=np.float64)
    for i in range(k):
        if degenerate[i] or dims[i] == 0:
            continue
        xi = z[:, offsets[i] : offsets[i + 1]]
        j = i
        while j < k:
            # Take as many right-hand representations as fit in the block budget.
            j_end = j + 1
            max_cols = max(_FEATURE_BLOCK_MAX_BYTES // (8 * dims[i]), 1)
            while j_end < k and offsets[j_end + 1] - offsets[j] <= max_cols:
                j_end += 1
            cross = xi.T @ z[:, offsets[j] : offsets[j_end]]
            col_sq = np.einsum("ij,ij->j", cross, cross)
            for jj in range(j, j_end):
                lo, hi = offsets[jj] - offsets[j], offsets[jj + 1] - offsets[j]
                hsic[i, jj] = hsic[jj, i] = col_sq[lo:hi].sum()
            j = j_end

    if debiased:
        rows = np.empty((k, n), dtype=np.float64)  # diag(K_i) for every i
        for i in range(k):
            part = z[:, offsets[i] : offsets[i + 1]]
            rows[i] = np.einsum("ij,ij->i", part, part)
        sq_norms = rows.sum(axis=1)  # tr(K_i)
        hsic = _debiased_bracket(hsic, rows @ rows.T, sq_norms[:, None], sq_norms[None, :], n)
        hsic[degenerate, :] = 0.0
        hsic[:, degenerate] = 0.0
    return hsic, degenerate


def _hsic_to_cka(hsic: np.ndarray, defined: np.ndarray, debiased: bool) -> np.ndarray:
    """HSIC_ij / sqrt(HSIC_ii HSIC_jj) on defined entries; nan set explicitly elsewhere."""
    k = hsic.shape[0]
    defined = defined & (np.diag(hsic) > 0)
    out = np.full((k, k), np.nan)
    idx = np.flatnonzero(defined)
    if idx.size:
        scale = 1.0 / np.sqrt(np.diag(hsic)[idx])
        sub = hsic[np.ix_(idx, idx)] * scale[:, None] * scale[None, :]
        sub = (sub + sub.T) / 2  # exact symmetry despite rounding
        sub = np.clip(sub, -1.0 if debiased else 0.0, 1.0)
        np.fill_diagonal(sub, 1.0)
        out[np.ix_(idx, idx)] = sub
    return out


def _clip(value: float, debiased: bool) -> float:
    """Linear CKA lies in [0, 1], debiased CKA in [-1, 1] (Cauchy-Schwarz); trim rounding."""
    return min(max(value, -1.0 if debiased else 0.0), 1.0)
