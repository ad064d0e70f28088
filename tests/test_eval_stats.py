"""Sufficient statistics, Frechet distance, KID and IS against direct computations."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg

from t2i_dist.eval.stats import (
    ClassifierStats,
    FeatureStats,
    InsufficientSamplesError,
    frechet_distance,
    inception_score,
    is_rank_deficient,
    kernel_inception_distance,
)


def _direct_fid(x: np.ndarray, y: np.ndarray) -> float:
    """FID in the sample space: tr sqrt(S1 S2) = nuclear norm of Xc Yc^T / sqrt((n1-1)(n2-1))."""
    xc, yc = x - x.mean(0), y - y.mean(0)
    cross = np.linalg.svd(xc @ yc.T, compute_uv=False).sum() / np.sqrt((len(x) - 1) * (len(y) - 1))
    c1, c2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    return float(((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * cross)


@pytest.fixture(scope="module")
def sets() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    x = rng.gamma(2.0, 0.3, size=(300, 32))
    y = rng.gamma(2.2, 0.35, size=(250, 32)) + 0.05
    return x, y


def test_merged_statistics_equal_statistics_of_the_union(sets):
    x, _ = sets
    whole = FeatureStats(32).add(x)
    merged = FeatureStats.merge(
        [FeatureStats(32).add(x[:100]), FeatureStats(32).add(x[100:170]), FeatureStats(32).add(x[170:])]
    )
    assert merged.count == 300
    np.testing.assert_allclose(merged.mean(), x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(merged.covariance(), np.cov(x, rowvar=False), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(merged.covariance(), whole.covariance(), rtol=1e-12, atol=1e-15)


def test_frechet_distance_matches_scipy_sqrtm_at_full_rank(sets):
    x, y = sets
    fid = frechet_distance(FeatureStats(32).add(x), FeatureStats(32).add(y))
    c1, c2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    root = scipy.linalg.sqrtm(c1 @ c2).real
    expected = ((x.mean(0) - y.mean(0)) ** 2).sum() + np.trace(c1 + c2 - 2 * root)
    assert fid == pytest.approx(expected, rel=1e-9)
    assert fid == pytest.approx(_direct_fid(x, y), rel=1e-9)


def test_rank_deficient_fid_is_exact_and_flagged(sets):
    x, y = sets
    a, b = FeatureStats(32).add(x[:10]), FeatureStats(32).add(y[:20])  # ranks 9 and 19 < 32
    assert is_rank_deficient(a, b)
    assert frechet_distance(a, b) == pytest.approx(_direct_fid(x[:10], y[:20]), rel=1e-9)
    with pytest.raises(InsufficientSamplesError, match="singular covariance"):
        frechet_distance(a, b, require_full_rank=True)


def test_fid_of_a_set_with_itself_is_zero(sets):
    x, _ = sets
    stats = FeatureStats(32).add(x[:12])
    assert frechet_distance(stats, stats) == pytest.approx(0.0, abs=1e-10)


def test_too_few_samples_and_mismatched_dimensions_are_errors(sets):
    x, _ = sets
    one = FeatureStats(32).add(x[:1])
    with pytest.raises(InsufficientSamplesError, match="at least 2"):
        frechet_distance(one, FeatureStats(32).add(x))
    with pytest.raises(ValueError, match="dimensions differ"):
        frechet_distance(FeatureStats(16).add(x[:, :16]), FeatureStats(32).add(x))
    with pytest.raises(ValueError, match="shape"):
        FeatureStats(32).add(x[:, :16])


def test_statistics_round_trip_through_npz(tmp_path, sets):
    x, _ = sets
    stats = FeatureStats(32).add(x)
    stats.save(tmp_path / "s.npz")
    back = FeatureStats.load(tmp_path / "s.npz")
    assert back.count == stats.count
    np.testing.assert_array_equal(back.outer, stats.outer)


def test_kid_is_near_zero_for_one_distribution_and_positive_for_two(sets):
    x, y = sets
    rng = np.random.default_rng(1)
    same = kernel_inception_distance(x[:150], x[150:], subsets=20, subset_size=100)
    different = kernel_inception_distance(x, y, subsets=20, subset_size=100)
    assert abs(same[0]) < different[0] / 10
    assert different[0] > 0
    # deterministic for a seed
    assert kernel_inception_distance(x, y, 5, 50, seed=3) == kernel_inception_distance(x, y, 5, 50, seed=3)
    with pytest.raises(InsufficientSamplesError):
        kernel_inception_distance(x[:1], rng.random((5, 32)))


def _reference_inception_score(probs: np.ndarray, splits: int) -> tuple[float, float]:
    """The original code's loop: split i is rows [i*N//s, (i+1)*N//s), mean KL to the split marginal."""
    scores = []
    n = len(probs)
    for i in range(splits):
        part = probs[i * n // splits : (i + 1) * n // splits]
        py = part.mean(0, keepdims=True)
        scores.append(np.exp((part * (np.log(part) - np.log(py))).sum(1).mean()))
    return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_from_merged_split_sums_matches_the_reference_loop():
    rng = np.random.default_rng(2)
    logits = rng.normal(size=(105, 7)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    idx = np.arange(105)
    whole = ClassifierStats(10, 7).add(probs, idx, 105)
    parts = ClassifierStats(10, 7).add(probs[:37], idx[:37], 105) + ClassifierStats(10, 7).add(
        probs[37:], idx[37:], 105
    )
    expected = _reference_inception_score(probs, 10)
    assert inception_score(whole) == pytest.approx(expected, rel=1e-10)
    assert inception_score(parts) == pytest.approx(expected, rel=1e-10)
    with pytest.raises(InsufficientSamplesError, match="10 splits"):
        inception_score(ClassifierStats(10, 7).add(probs[:5], idx[:5], 5))
