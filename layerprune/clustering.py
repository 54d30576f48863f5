"""Split the layers of an encoder into contiguous blocks from their CKA matrix.

Phang, Liu & Bowman (2021) observe that, under CKA, the layers of a fine-tuned
Transformer encoder form an early block and a late block of mutually similar
representations. This module recovers those blocks with spectral clustering on
the layer-by-layer CKA matrix, picks the number of blocks with the eigengap
heuristic (unless the user fixes it), and reports where the last (late) block
starts: the candidate point from which the top layers are redundant.

Pure numerics: no I/O, no printing, no deep-learning framework.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
from scipy.sparse.csgraph import laplacian
from sklearn.cluster import spectral_clustering

__all__ = ["Blocks", "find_blocks"]

# Integer agreement counts are compared exactly; float tie-breaks need a tolerance
# so that rounding noise does not decide between equally good segmentations.
_SCORE_TOL = 1e-12


@dataclass(frozen=True)
class Blocks:
    """Contiguous blocks of layers found in a CKA matrix.

    Attributes:
        labels: One entry per layer index 0..L; ``None`` for layers excluded
            because their CKA is undefined (NaN). Block ids run 0..K-1, increase
            with depth, and each block is a contiguous run of valid layers.
        n_clusters: The number of blocks K actually used.
        boundary: Layer index (in the original 0..L indexing) where the last
            block starts; with K=1 it is the first valid layer.
        eigenvalues: Smallest eigenvalues of the symmetric normalized Laplacian
            of the affinity, ascending (what the eigengap was read from).
        chosen_by: ``"eigengap"`` if K came from the heuristic, ``"user"`` if
            it was passed in.
    """

    labels: list[int | None]
    n_clusters: int
    boundary: int
    eigenvalues: list[float]
    chosen_by: str


def find_blocks(
    cka: np.ndarray,
    n_clusters: int | None = None,
    max_clusters: int = 6,
    random_state: int = 0,
) -> Blocks:
    """Cluster layers 0..L into K contiguous blocks from a (L+1) x (L+1) CKA matrix.

    Layers with NaN CKA are excluded (label ``None``); everything else is
    computed on the remaining layers. K is ``n_clusters`` if given, otherwise
    the eigengap heuristic over 2..``max_clusters`` blocks. Spectral labels are
    then made contiguous in depth and numbered 0..K-1 from the bottom up.
    Deterministic for a fixed ``random_state``.

    Raises:
        ValueError: if the matrix is not square, has infinite entries, has no
            valid layer, or if ``n_clusters`` / ``max_clusters`` are out of range.
    """
    matrix = _check_matrix(cka)
    if max_clusters < 2:
        raise ValueError(f"max_clusters must be at least 2, got {max_clusters}")
    valid = _valid_layers(matrix)
    n_valid = len(valid)
    affinity = _affinity(matrix[np.ix_(valid, valid)])
    eigenvalues = _laplacian_eigenvalues(affinity)

    if n_clusters is None:
        k, chosen_by = _eigengap_k(eigenvalues, max_clusters), "eigengap"
    else:
        k, chosen_by = _check_n_clusters(n_clusters, n_valid), "user"

    spectral = _spectral_labels(affinity, k, random_state)
    segments = _contiguous_labels(spectral, k, affinity)

    labels: list[int | None] = [None] * matrix.shape[0]
    for layer, block in zip(valid, segments):
        labels[layer] = int(block)
    boundary = int(valid[int(np.argmax(segments == k - 1))])
    n_reported = min(n_valid, max(max_clusters, k) + 1)
    return Blocks(
        labels=labels,
        n_clusters=k,
        boundary=boundary,
        eigenvalues=[float(v) for v in eigenvalues[:n_reported]],
        chosen_by=chosen_by,
    )


def _check_matrix(cka: np.ndarray) -> np.ndarray:
    """Return ``cka`` as a float array after checking it is square and has no inf."""
    matrix = np.asarray(cka, dtype=float)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1] or matrix.shape[0] == 0:
        raise ValueError(f"CKA matrix must be square and non-empty, got shape {matrix.shape}")
    if np.isinf(matrix).any():
        raise ValueError("CKA matrix has infinite entries")
    return matrix


def _valid_layers(matrix: np.ndarray) -> np.ndarray:
    """Indices of the layers kept after dropping those with undefined (NaN) CKA.

    The usual case is a whole NaN row/column (e.g. layer 0 with constant CLS
    vectors). To cope with any NaN pattern, drop the layer with the most NaNs
    among the remaining ones (the shallowest on ties) until none are left.
    """
    keep = np.arange(matrix.shape[0])
    while True:
        nan_counts = np.isnan(matrix[np.ix_(keep, keep)]).sum(axis=1)
        if nan_counts.max() == 0:
            return keep
        keep = np.delete(keep, int(np.argmax(nan_counts)))
        if keep.size == 0:
            raise ValueError("CKA matrix has no valid layer: every layer has NaN entries")


def _affinity(sub: np.ndarray) -> np.ndarray:
    """Clip CKA to [0, 1] (debiased CKA can dip below 0) and symmetrise it."""
    clipped = np.clip(sub, 0.0, 1.0)
    return (clipped + clipped.T) / 2.0


def _laplacian_eigenvalues(affinity: np.ndarray) -> np.ndarray:
    """Ascending eigenvalues of the symmetric normalized Laplacian of ``affinity``."""
    lap = laplacian(affinity, normed=True)
    # They lie in [0, 2]; clipping only removes rounding noise such as -1e-16.
    return np.clip(np.sort(np.linalg.eigvalsh(lap)), 0.0, 2.0)


def _eigengap_k(eigenvalues: np.ndarray, max_clusters: int) -> int:
    """Pick K by the largest gap lambda_{k+1} - lambda_k, for k in 2..min(max_clusters, n-1).

    At least two blocks are sought, since the point is to find where the late
    block starts. One valid layer gives K=1; two give K=2 (one layer each).
    """
    n = len(eigenvalues)
    if n <= 2:
        return n
    candidates = np.arange(2, min(max_clusters, n - 1) + 1)
    # eigenvalues are 0-indexed, so lambda_k is eigenvalues[k - 1].
    gaps = eigenvalues[candidates] - eigenvalues[candidates - 1]
    return int(candidates[int(np.argmax(gaps))])


def _check_n_clusters(n_clusters: int, n_valid: int) -> int:
    """Validate a user-given K: an integer with 1 <= K <= number of valid layers."""
    if isinstance(n_clusters, bool) or not isinstance(n_clusters, (int, np.integer)):
        raise ValueError(f"n_clusters must be an integer, got {n_clusters!r}")
    if not 1 <= n_clusters <= n_valid:
        raise ValueError(
            f"n_clusters must be between 1 and the number of valid layers ({n_valid}), "
            f"got {n_clusters}"
        )
    return int(n_clusters)


def _spectral_labels(affinity: np.ndarray, k: int, random_state: int) -> np.ndarray:
    """Spectral clustering labels of the valid layers (not yet contiguous)."""
    n = affinity.shape[0]
    if k == 1:
        return np.zeros(n, dtype=int)
    if k == n:
        return np.arange(n)
    with warnings.catch_warnings():
        # Layers with zero affinity to all others disconnect the graph; the
        # clustering is still meaningful, and the eigenvalues show it.
        warnings.filterwarnings("ignore", message="Graph is not fully connected")
        labels = spectral_clustering(affinity, n_clusters=k, random_state=random_state)
    return np.asarray(labels, dtype=int)


def _contiguous_labels(
    spectral: np.ndarray, k: int, affinity: np.ndarray | None = None
) -> np.ndarray:
    """Turn spectral labels into K contiguous segments in depth, numbered 0..K-1.

    Why: spectral clustering ignores depth order and may interleave labels
    (e.g. [0, 0, 1, 0, 1, 1]), but pruning needs blocks that are runs of
    consecutive layers, in particular a single late block at the top.

    How: dynamic programming over segment boundaries picks the K-segment
    split that agrees with the most spectral labels (each segment counts the
    layers carrying its most common label). Ties go to the split with the
    higher mean within-segment affinity (averaged over layers: a layer's mean
    affinity to the members of its segment, itself included), then to the
    split found first by the scan (earlier boundaries), so the result is
    deterministic.
    """
    spectral = np.asarray(spectral, dtype=int)
    n = spectral.size
    if not 1 <= k <= n:
        raise ValueError(f"cannot split {n} layers into {k} contiguous segments")
    if affinity is None:
        affinity = np.eye(n)
    agree, cohesion = _segment_scores(spectral, affinity)
    starts = _best_starts(agree, cohesion, k)
    segments = np.zeros(n, dtype=int)
    for block, start in enumerate(starts):
        segments[start:] = block
    return segments


def _segment_scores(spectral: np.ndarray, affinity: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Scores of every candidate segment [i, j) (j exclusive).

    ``agree[i, j]``: how many labels in the segment equal its most common one.
    ``cohesion[i, j]``: sum of within-segment affinity divided by the segment
    size, so that summing over segments gives n times the layer-averaged mean
    within-segment affinity.
    """
    n = spectral.size
    agree = np.zeros((n + 1, n + 1), dtype=int)
    cohesion = np.zeros((n + 1, n + 1))
    for i in range(n):
        counts = np.zeros(int(spectral.max()) + 1, dtype=int)
        within = 0.0
        for j in range(i + 1, n + 1):
            counts[spectral[j - 1]] += 1
            # Add row/column of the new layer j-1 against layers i..j-1.
            within += 2.0 * affinity[j - 1, i : j - 1].sum() + affinity[j - 1, j - 1]
            agree[i, j] = counts.max()
            cohesion[i, j] = within / (j - i)
    return agree, cohesion


def _best_starts(agree: np.ndarray, cohesion: np.ndarray, k: int) -> list[int]:
    """Start index of each of the K segments maximising (agreement, cohesion) lexicographically."""
    n = agree.shape[0] - 1
    best_agree = np.full((k + 1, n + 1), -1, dtype=int)
    best_cohesion = np.full((k + 1, n + 1), -np.inf)
    back = np.zeros((k + 1, n + 1), dtype=int)
    best_agree[0, 0], best_cohesion[0, 0] = 0, 0.0
    for s in range(1, k + 1):
        for j in range(s, n - (k - s) + 1):
            for i in range(s - 1, j):
                if best_agree[s - 1, i] < 0:
                    continue
                a = best_agree[s - 1, i] + agree[i, j]
                c = best_cohesion[s - 1, i] + cohesion[i, j]
                if a > best_agree[s, j] or (
                    a == best_agree[s, j] and c > best_cohesion[s, j] + _SCORE_TOL
                ):
                    best_agree[s, j], best_cohesion[s, j], back[s, j] = a, c, i
    starts, j = [], n
    for s in range(k, 0, -1):
        j = int(back[s, j])
        starts.append(j)
    return starts[::-1]
