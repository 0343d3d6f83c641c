"""PatchCore's greedy k-center coreset: the pruned selection returns exactly the plain farthest-point loop's indices."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oodscope.imagead import coreset
from oodscope.imagead.coreset import greedy_coreset, project


def plain_greedy(x: torch.Tensor, n_select: int, first: int) -> np.ndarray:
    """Roth et al. 2022, Alg. 1 written out: every step one full pass over all points, ties to the lowest index."""
    nearest = torch.full((len(x),), float("inf"))
    chosen = [first]
    for _ in range(n_select - 1):
        nearest = torch.minimum(nearest, ((x - x[chosen[-1]]) ** 2).sum(1))
        candidates = nearest.clone()
        candidates[chosen] = -float("inf")  # argmax over M - M_C
        chosen.append(int(torch.argmax(candidates)))
    return np.array(chosen)


def exact_greedy(points: np.ndarray, n_select: int, first: int) -> np.ndarray:
    """The same loop on integer points in exact int64 arithmetic (no round-off at all)."""
    nearest = np.full(len(points), np.iinfo(np.int64).max)
    chosen = [first]
    for _ in range(n_select - 1):
        nearest = np.minimum(nearest, ((points - points[chosen[-1]]) ** 2).sum(1))
        candidates = nearest.copy()
        candidates[chosen] = -1
        chosen.append(int(np.argmax(candidates)))
    return np.array(chosen)


def clustered(rng, n=3000, dim=16, n_clusters=25, offset=0.0):
    """Gaussian clusters of different sizes and spreads, plus exact duplicates of some points."""
    centres = rng.normal(scale=10.0, size=(n_clusters, dim)) + offset
    label = rng.integers(0, n_clusters, n)
    spread = rng.uniform(0.05, 2.0, n_clusters)[label, None]
    x = centres[label] + spread * rng.normal(size=(n, dim))
    x[rng.integers(0, n, 200)] = x[rng.integers(0, n, 200)]  # duplicates
    return x.astype(np.float32)


def first_pick(n: int, seed: int) -> int:
    return int(np.random.default_rng(seed).integers(n))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_same_indices_as_the_plain_loop_on_clusters(seed):
    x = clustered(np.random.default_rng(seed))
    picks = greedy_coreset(x, 400, projection_dim=None, seed=seed)
    assert picks.tolist() == plain_greedy(torch.from_numpy(x), 400, first_pick(len(x), seed)).tolist()


def test_same_indices_after_the_projection_and_far_from_the_origin():
    # offset 1e3 with spreads down to 0.05: the centre bounds' round-off allowance is large, pruning must stay safe
    x = clustered(np.random.default_rng(7), dim=48, offset=1e3)
    picks = greedy_coreset(x, 300, projection_dim=12, seed=5)
    projected = project(x, 12, seed=5)
    assert projected.shape == (len(x), 12)
    assert picks.tolist() == plain_greedy(projected, 300, first_pick(len(x), 5)).tolist()


@pytest.mark.parametrize("seed", [0, 1])
def test_ties_and_duplicates_match_exact_integer_arithmetic(seed):
    # 2,000 points on a 6^3 grid: 216 distinct positions, many exact distance ties; 250 picks go past the
    # distinct positions, so the last picks are duplicates at distance 0 (never an already selected point)
    points = np.random.default_rng(seed).integers(0, 6, size=(2000, 3))
    picks = greedy_coreset(points.astype(np.float32), 250, projection_dim=None, seed=seed)
    assert picks.tolist() == exact_greedy(points, 250, first_pick(len(points), seed)).tolist()
    assert len(set(picks.tolist())) == 250
    assert len({tuple(p) for p in points[picks[:216]]}) == 216  # every distinct position before any repeat


def test_all_points_and_one_point():
    x = clustered(np.random.default_rng(3), n=200, dim=4)
    every = greedy_coreset(x, 10_000, projection_dim=None, seed=0)
    assert sorted(every.tolist()) == list(range(200))
    assert every.tolist() == plain_greedy(torch.from_numpy(x), 200, first_pick(200, 0)).tolist()
    assert greedy_coreset(x, 1, projection_dim=None, seed=4).tolist() == [first_pick(200, 4)]


def test_exact_distances_only_for_the_patches_that_can_come_closer(monkeypatch):
    x = clustered(np.random.default_rng(0), n=4000, n_clusters=60)
    rows = []
    original = coreset.squared_distances
    monkeypatch.setattr(coreset, "squared_distances", lambda a, c: rows.append(len(a)) or original(a, c))
    greedy_coreset(x, 400, projection_dim=None, seed=0)
    assert sum(rows) < 0.25 * 400 * len(x)  # the plain loop computes 400 x 4,000 distances


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_same_indices_with_either_matrix_product_precision(monkeypatch, dtype):
    monkeypatch.setattr(coreset, "filter_precision", lambda device: (dtype, coreset.ETA[dtype]))
    x = clustered(np.random.default_rng(4), dim=32, offset=50.0)
    picks = greedy_coreset(x, 300, projection_dim=None, seed=1)
    assert picks.tolist() == plain_greedy(torch.from_numpy(x), 300, first_pick(len(x), 1)).tolist()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("offset,scale", [(0.0, 1.0), (1e3, 1e-2), (-5.0, 1e4)])
def test_lower_bound_never_exceeds_the_exact_distance(monkeypatch, dtype, offset, scale):
    monkeypatch.setattr(coreset, "filter_precision", lambda device: (dtype, coreset.ETA[dtype]))
    x = torch.from_numpy(clustered(np.random.default_rng(5), n=2000, dim=64, offset=offset) * scale)
    selection = coreset._Selection(x, 0)
    selection._new_batch(7)
    for c in selection.candidates.tolist():
        bound = selection.lower_bound(c)
        exact = ((x.double() - x[c].double()) ** 2).sum(1)  # float64 reference
        assert bool((bound.double() <= exact).all())
        assert float(torch.median(exact - bound.double())) < 0.1 * float(torch.median(exact))  # and it is tight


def test_bad_banks_are_refused():
    with pytest.raises(ValueError, match="NaN or inf"):
        greedy_coreset(np.array([[0.0, 1.0], [np.nan, 0.0]]), 1, projection_dim=None)
    with pytest.raises(ValueError, match=r"non-empty \(N, D\)"):
        greedy_coreset(np.zeros((0, 3)), 1, projection_dim=None)
    with pytest.raises(ValueError, match=r"non-empty \(N, D\)"):
        greedy_coreset(np.zeros(5), 1, projection_dim=None)
    with pytest.raises(ValueError, match="rescale"):
        greedy_coreset(np.array([[0.0, 3e38], [0.0, -3e38]], dtype=np.float32), 2, projection_dim=None)
