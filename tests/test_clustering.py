"""Tests for layerprune.clustering: block recovery from synthetic CKA matrices."""

from __future__ import annotations

import numpy as np
import pytest

from layerprune import clustering
from layerprune.clustering import Blocks, _contiguous_labels, find_blocks

SEEDS = range(20)


def block_matrix(
    n_layers: int,
    starts: list[int],
    within: float = 0.9,
    across: float = 0.3,
    noise: float = 0.05,
    seed: int = 0,
) -> np.ndarray:
    """Synthetic CKA over layers 0..n_layers: blocks begin at ``starts`` (besides 0).

    Within-block entries ~``within``, across-block ~``across``, plus symmetric
    uniform noise in [-noise, noise]; diagonal 1.
    """
    n = n_layers + 1
    block = np.searchsorted(starts, np.arange(n), side="right")
    matrix = np.where(block[:, None] == block[None, :], within, across)
    rng = np.random.default_rng(seed)
    eps = rng.uniform(-noise, noise, size=(n, n))
    matrix = matrix + np.triu(eps, 1) + np.triu(eps, 1).T
    np.fill_diagonal(matrix, 1.0)
    return matrix


def assert_contiguous_increasing(labels: list[int | None], k: int) -> None:
    """Valid labels are 0..k-1, non-decreasing in layer order, each used exactly once as a run."""
    valid = [lab for lab in labels if lab is not None]
    assert valid[0] == 0
    assert all(b - a in (0, 1) for a, b in zip(valid, valid[1:]))
    assert valid[-1] == k - 1


@pytest.mark.parametrize("boundary", [3, 5, 8, 10])
@pytest.mark.parametrize("seed", SEEDS)
def test_two_blocks_boundary_recovered_by_eigengap(boundary: int, seed: int) -> None:
    blocks = find_blocks(block_matrix(12, [boundary], seed=seed))
    assert blocks.chosen_by == "eigengap"
    assert blocks.n_clusters == 2
    assert blocks.boundary == boundary
    assert blocks.labels == [0] * boundary + [1] * (13 - boundary)


@pytest.mark.parametrize("starts", [[4, 9], [3, 7], [6, 10], [3, 10]])
@pytest.mark.parametrize("seed", SEEDS)
def test_three_blocks_eigengap_picks_three(starts: list[int], seed: int) -> None:
    blocks = find_blocks(block_matrix(12, starts, seed=seed))
    assert blocks.n_clusters == 3
    assert blocks.boundary == starts[-1]
    assert_contiguous_increasing(blocks.labels, 3)
    assert blocks.labels.index(1) == starts[0]


def test_result_fields_and_eigenvalues() -> None:
    blocks = find_blocks(block_matrix(12, [5]), max_clusters=6)
    assert isinstance(blocks, Blocks)
    assert len(blocks.labels) == 13
    assert len(blocks.eigenvalues) == 7  # enough to show every gap considered
    assert blocks.eigenvalues == sorted(blocks.eigenvalues)
    assert blocks.eigenvalues[0] == pytest.approx(0.0, abs=1e-9)
    assert all(0.0 <= v <= 2.0 for v in blocks.eigenvalues)


@pytest.mark.parametrize("seed", range(5))
def test_deterministic_for_fixed_random_state(seed: int) -> None:
    matrix = block_matrix(12, [4, 9], noise=0.15, seed=seed)
    assert find_blocks(matrix, random_state=3) == find_blocks(matrix, random_state=3)


@pytest.mark.parametrize("seed", SEEDS)
def test_nan_layer_zero_excluded(seed: int) -> None:
    matrix = block_matrix(12, [8], seed=seed)
    matrix[0, :] = np.nan
    matrix[:, 0] = np.nan
    blocks = find_blocks(matrix)
    assert blocks.labels[0] is None
    assert blocks.labels[1:] == [0] * 7 + [1] * 5
    assert blocks.boundary == 8
    assert len(blocks.eigenvalues) == 7


def test_nan_layers_with_forced_k_and_first_valid_boundary() -> None:
    matrix = block_matrix(12, [5])
    matrix[[0, 1], :] = np.nan
    matrix[:, [0, 1]] = np.nan
    blocks = find_blocks(matrix, n_clusters=1)
    assert blocks.labels[:2] == [None, None]
    assert blocks.labels[2:] == [0] * 11
    assert blocks.boundary == 2


def test_all_nan_raises() -> None:
    with pytest.raises(ValueError, match="no valid layer"):
        find_blocks(np.full((4, 4), np.nan))


@pytest.mark.parametrize("k", [2, 3])
def test_forced_n_clusters_honoured(k: int) -> None:
    # A clear two-block matrix, but the user asks for k blocks.
    blocks = find_blocks(block_matrix(12, [6]), n_clusters=k)
    assert blocks.chosen_by == "user"
    assert blocks.n_clusters == k
    assert_contiguous_increasing(blocks.labels, k)
    assert len(set(blocks.labels)) == k


def test_forced_three_on_three_block_matrix() -> None:
    blocks = find_blocks(block_matrix(12, [4, 9]), n_clusters=3)
    assert blocks.labels == [0] * 4 + [1] * 5 + [2] * 4
    assert blocks.boundary == 9


@pytest.mark.parametrize("bad", [0, -1, 14, 2.0, True])
def test_invalid_n_clusters_raises(bad: object) -> None:
    with pytest.raises(ValueError, match="n_clusters"):
        find_blocks(block_matrix(12, [5]), n_clusters=bad)  # type: ignore[arg-type]


def test_n_clusters_above_valid_count_raises() -> None:
    matrix = block_matrix(3, [2])
    matrix[0, :] = matrix[:, 0] = np.nan
    with pytest.raises(ValueError, match="valid layers \\(3\\)"):
        find_blocks(matrix, n_clusters=4)


@pytest.mark.parametrize(
    "bad", [np.ones((3, 4)), np.ones(3), np.array([[1.0, np.inf], [0.5, 1.0]])]
)
def test_bad_matrix_raises(bad: np.ndarray) -> None:
    with pytest.raises(ValueError):
        find_blocks(bad)


def test_max_clusters_below_two_raises() -> None:
    with pytest.raises(ValueError, match="max_clusters"):
        find_blocks(block_matrix(12, [5]), max_clusters=1)


def test_max_clusters_caps_eigengap() -> None:
    blocks = find_blocks(block_matrix(12, [3, 6, 9]), max_clusters=2)
    assert blocks.n_clusters == 2


def test_contiguity_helper_on_interleaved_labels() -> None:
    # Both [0,0|1,0,1,1] and [0,0,1,0|1,1] agree with 5 of 6 labels.
    assert _contiguous_labels(np.array([0, 0, 1, 0, 1, 1]), 2).tolist() == [0, 0, 1, 1, 1, 1]


def test_contiguity_tie_broken_by_affinity() -> None:
    labels = np.array([0, 0, 1, 0, 1, 1])
    # Layers 2-3 resemble 0-1: the early block should absorb them.
    early = block_matrix(5, [4], noise=0.0)
    assert _contiguous_labels(labels, 2, early).tolist() == [0, 0, 0, 0, 1, 1]
    # Layers 2-3 resemble 4-5: the late block should absorb them.
    late = block_matrix(5, [2], noise=0.0)
    assert _contiguous_labels(labels, 2, late).tolist() == [0, 0, 1, 1, 1, 1]


def test_contiguity_relabels_by_layer_order_and_keeps_clean_runs() -> None:
    assert _contiguous_labels(np.array([2, 2, 0, 0, 0, 1, 1]), 3).tolist() == [0, 0, 1, 1, 1, 2, 2]
    # Best split: [1,0,1,1 | 0,0,0,1] agrees with 6 of 8 labels.
    result = _contiguous_labels(np.array([1, 0, 1, 1, 0, 0, 0, 1]), 2)
    assert result.tolist() == [0, 0, 0, 0, 1, 1, 1, 1]


def test_contiguity_with_fewer_spectral_labels_than_k() -> None:
    result = _contiguous_labels(np.array([0, 0, 0, 0]), 4)
    assert result.tolist() == [0, 1, 2, 3]


def test_find_blocks_makes_interleaved_spectral_output_contiguous(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        clustering, "_spectral_labels", lambda affinity, k, rs: np.array([1, 1, 0, 1, 0, 0])
    )
    matrix = block_matrix(5, [4], noise=0.0)
    blocks = find_blocks(matrix, n_clusters=2)
    assert blocks.labels == [0, 0, 0, 0, 1, 1]
    assert blocks.boundary == 4


def test_one_valid_layer() -> None:
    blocks = find_blocks(np.array([[1.0]]))
    assert blocks == Blocks(
        labels=[0], n_clusters=1, boundary=0, eigenvalues=[0.0], chosen_by="eigengap"
    )
    matrix = np.full((3, 3), np.nan)
    matrix[2, 2] = 1.0
    blocks = find_blocks(matrix)
    assert blocks.labels == [None, None, 0]
    assert blocks.boundary == 2 and blocks.n_clusters == 1


def test_two_valid_layers() -> None:
    matrix = np.array([[1.0, 0.8], [0.8, 1.0]])
    blocks = find_blocks(matrix)
    assert blocks.n_clusters == 2 and blocks.labels == [0, 1] and blocks.boundary == 1
    forced = find_blocks(matrix, n_clusters=1)
    assert forced.labels == [0, 0] and forced.boundary == 0 and forced.chosen_by == "user"


def test_three_valid_layers() -> None:
    matrix = np.array([[1.0, 0.9, 0.2], [0.9, 1.0, 0.25], [0.2, 0.25, 1.0]])
    blocks = find_blocks(matrix)
    assert blocks.n_clusters == 2
    assert blocks.labels == [0, 0, 1]
    assert blocks.boundary == 2
    assert find_blocks(matrix, n_clusters=3).labels == [0, 1, 2]


@pytest.mark.parametrize("seed", SEEDS)
def test_negative_debiased_entries(seed: int) -> None:
    # Debiased CKA: unrelated layers hover around 0 and can go negative.
    matrix = block_matrix(12, [7], within=0.85, across=0.0, noise=0.1, seed=seed)
    assert (matrix < 0).any()
    blocks = find_blocks(matrix)
    assert blocks.n_clusters == 2
    assert blocks.boundary == 7


def test_asymmetric_input_is_symmetrised() -> None:
    matrix = block_matrix(12, [5])
    skewed = matrix.copy()
    skewed[np.triu_indices(13, 1)] += 0.02
    assert find_blocks(skewed).boundary == 5
