"""Mergeable statistics of image features and the distances computed from them.

Every worker keeps sums (count, feature sum, sum of outer products) in float64; sums merge by addition in
any order, so FID over K workers equals FID over one worker up to float64 rounding.

Frechet distance: tr(sqrt(S1 S2)) is computed as the sum of square roots of the eigenvalues of the symmetric
PSD matrix sqrt(S1) S2 sqrt(S1) (float64 `eigh` calls), with round-off negatives clipped to zero, S1 being
the covariance of the smaller set (restricted to its range when N - 1 < d, which keeps small runs fast). This
stays exact for singular covariances: with N <= d samples a covariance has rank <= N - 1, and the distance is
still the Frechet distance of the two estimated Gaussians (no regularisation is added), but it is biased
upward and only comparable between runs at the same sample count. Such results carry `rank_deficient=True`;
`require_full_rank=True` (the study protocols) turns them into an error instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np


class InsufficientSamplesError(ValueError):
    """Too few samples for the requested statistic."""


@dataclass
class FeatureStats:
    """Sufficient statistics of a set of d-dimensional feature vectors, in float64."""

    dim: int
    count: int = 0
    total: np.ndarray = field(default=None)  # type: ignore[arg-type]  # None until __post_init__ fills it
    outer: np.ndarray = field(default=None)  # type: ignore[arg-type]  # None until __post_init__ fills it

    def __post_init__(self) -> None:
        if self.total is None:
            self.total = np.zeros(self.dim, np.float64)
        if self.outer is None:
            self.outer = np.zeros((self.dim, self.dim), np.float64)

    def add(self, features: np.ndarray) -> FeatureStats:
        feats = np.asarray(features, np.float64)
        if feats.ndim != 2 or feats.shape[1] != self.dim:
            raise ValueError(f"expected features of shape (n, {self.dim}), got {feats.shape}")
        self.count += feats.shape[0]
        self.total += feats.sum(axis=0)
        self.outer += feats.T @ feats
        return self

    def __add__(self, other: FeatureStats) -> FeatureStats:
        if other.dim != self.dim:
            raise ValueError(f"cannot merge statistics of dimension {self.dim} and {other.dim}")
        return FeatureStats(self.dim, self.count + other.count, self.total + other.total, self.outer + other.outer)

    @classmethod
    def merge(cls, parts: list[FeatureStats]) -> FeatureStats:
        if not parts:
            raise ValueError("no statistics to merge")
        out = FeatureStats(parts[0].dim)
        for part in parts:
            out = out + part
        return out

    def mean(self) -> np.ndarray:
        self._need(1)
        return self.total / self.count

    def covariance(self) -> np.ndarray:
        """Unbiased (N - 1) covariance, as numpy.cov and the reference FID code use."""
        self._need(2)
        mu = self.mean()
        cov = (self.outer - self.count * np.outer(mu, mu)) / (self.count - 1)
        return (cov + cov.T) / 2

    def _need(self, n: int) -> None:
        if self.count < n:
            raise InsufficientSamplesError(
                f"statistics hold {self.count} sample(s), at least {n} are needed; evaluate more images"
            )

    # -- persistence: the reference-statistics cache stores these arrays ------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        return {"count": np.asarray(self.count, np.int64), "total": self.total, "outer": self.outer}

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> FeatureStats:
        total = np.asarray(arrays["total"], np.float64)
        return cls(total.shape[0], int(arrays["count"]), total, np.asarray(arrays["outer"], np.float64))

    def save(self, path: str | Path) -> None:
        np.savez(path, **self.to_arrays())  # type: ignore[arg-type]  # numpy stubs: **kwds could hit allow_pickle

    @classmethod
    def load(cls, path: str | Path) -> FeatureStats:
        with np.load(path) as data:
            return cls.from_arrays(dict(data))


def _psd_root(cov: np.ndarray, rank_bound: int | None = None) -> np.ndarray:
    """R (d x r) with R R^T = cov over its numerically non-zero eigenvalues.

    With a rank bound r < d (N samples give rank <= N - 1), the range of `cov` is found from cov @ Omega
    (Omega: r + 8 fixed Gaussian columns) and only a small matrix is decomposed: exact for a matrix of that
    rank, and O(d^2 r) instead of a d x d eigendecomposition."""
    d = cov.shape[0]
    if rank_bound is not None and rank_bound + 8 < d:
        omega = np.random.default_rng(0).standard_normal((d, rank_bound + 8))
        basis, _ = np.linalg.qr(cov @ omega)
        small = basis.T @ cov @ basis
        eigvals, eigvecs = np.linalg.eigh((small + small.T) / 2)
        eigvecs = basis @ eigvecs
    else:
        eigvals, eigvecs = np.linalg.eigh(cov)
    top = eigvals.max(initial=0.0)
    keep = eigvals > max(top * d * np.finfo(np.float64).eps, 0.0)
    return eigvecs[:, keep] * np.sqrt(eigvals[keep])


def trace_sqrt_product(cov1: np.ndarray, cov2: np.ndarray, rank_bound: int | None = None) -> float:
    """tr(sqrt(S1 S2)) for PSD S1, S2: with S1 = R R^T, the non-zero eigenvalues of S1 S2 are those of the
    symmetric PSD R^T S2 R (r x r, r = rank of S1)."""
    root = _psd_root(cov1, rank_bound)
    if root.shape[1] == 0:
        return 0.0
    middle = root.T @ cov2 @ root
    inner = np.linalg.eigvalsh((middle + middle.T) / 2)
    return float(np.sqrt(np.clip(inner, 0, None)).sum())


def frechet_distance_gaussians(
    mu1: np.ndarray, cov1: np.ndarray, mu2: np.ndarray, cov2: np.ndarray, rank_bound: int | None = None
) -> float:
    """||mu1 - mu2||^2 + tr(S1) + tr(S2) - 2 tr(sqrt(S1 S2)), in float64; `rank_bound` bounds rank(S1)."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    cov1, cov2 = np.asarray(cov1, np.float64), np.asarray(cov2, np.float64)
    diff = mu1 - mu2
    value = float(diff @ diff + np.trace(cov1) + np.trace(cov2) - 2 * trace_sqrt_product(cov1, cov2, rank_bound))
    # a tiny negative is round-off of two identical distributions
    return max(value, 0.0)


def is_rank_deficient(a: FeatureStats, b: FeatureStats) -> bool:
    return min(a.count, b.count) <= a.dim


def frechet_distance(a: FeatureStats, b: FeatureStats, require_full_rank: bool = False) -> float:
    if a.dim != b.dim:
        raise ValueError(f"feature dimensions differ: {a.dim} vs {b.dim} (statistics from different extractors?)")
    if require_full_rank and is_rank_deficient(a, b):
        raise InsufficientSamplesError(
            f"FID with {min(a.count, b.count)} samples in a set is computed from a singular covariance "
            f"(rank <= N-1 < {a.dim} feature dimensions); evaluate more than {a.dim} images per set, "
            "or drop the full-rank requirement to accept a biased small-sample FID"
        )
    # decompose the covariance of the smaller set: its rank bounds the work of the second eigh
    small, large = (a, b) if a.count <= b.count else (b, a)
    return frechet_distance_gaussians(
        small.mean(), small.covariance(), large.mean(), large.covariance(), rank_bound=small.count - 1
    )


# ---------------------------------------------------------------------------------------------- KID


def kernel_inception_distance(
    real: np.ndarray, fake: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """Unbiased MMD^2 with the cubic polynomial kernel (x.y/d + 1)^3 (Binkowski et al. 2018), averaged over
    random subsets; the subset size shrinks to the smaller set when that has fewer samples."""
    real, fake = np.asarray(real, np.float64), np.asarray(fake, np.float64)
    m = min(subset_size, real.shape[0], fake.shape[0])
    if m < 2:
        raise InsufficientSamplesError(f"KID needs at least 2 samples per set, got {min(len(real), len(fake))}")
    d = real.shape[1]
    rng = np.random.default_rng(seed)
    values = np.empty(subsets)
    for i in range(subsets):
        x = fake[rng.choice(fake.shape[0], m, replace=False)]
        y = real[rng.choice(real.shape[0], m, replace=False)]
        kxx = (x @ x.T / d + 1) ** 3
        kyy = (y @ y.T / d + 1) ** 3
        kxy = (x @ y.T / d + 1) ** 3
        off_diag = (kxx.sum() - np.trace(kxx) + kyy.sum() - np.trace(kyy)) / (m * (m - 1))
        values[i] = off_diag - 2 * kxy.mean()
    return float(values.mean()), float(values.std())


# ---------------------------------------------------------------------------------------------- IS


@dataclass
class ClassifierStats:
    """Per-split sums for the Inception Score: count, sum of class probabilities, sum of sum(p log p).

    Samples are assigned to splits by their global index (contiguous blocks, as the reference code splits
    its ordered array), so the sums merge exactly across workers."""

    splits: int
    num_classes: int
    count: np.ndarray = field(default=None)  # type: ignore[arg-type]  # None until __post_init__ fills it
    prob_sum: np.ndarray = field(default=None)  # type: ignore[arg-type]  # None until __post_init__ fills it
    neg_entropy_sum: np.ndarray = field(default=None)  # type: ignore[arg-type]  # None until __post_init__ fills it

    def __post_init__(self) -> None:
        if self.count is None:
            self.count = np.zeros(self.splits, np.int64)
        if self.prob_sum is None:
            self.prob_sum = np.zeros((self.splits, self.num_classes), np.float64)
        if self.neg_entropy_sum is None:
            self.neg_entropy_sum = np.zeros(self.splits, np.float64)

    def add(self, probs: np.ndarray, global_indices: np.ndarray, total_items: int) -> ClassifierStats:
        probs = np.asarray(probs, np.float64)
        # the reference code's split i holds indices [i*N//s, (i+1)*N//s)
        split_of = ((np.asarray(global_indices) + 1) * self.splits + total_items - 1) // total_items - 1
        plogp = np.where(probs > 0, probs * np.log(np.where(probs > 0, probs, 1)), 0).sum(axis=1)
        np.add.at(self.count, split_of, 1)
        np.add.at(self.prob_sum, split_of, probs)
        np.add.at(self.neg_entropy_sum, split_of, plogp)
        return self

    def __add__(self, other: ClassifierStats) -> ClassifierStats:
        return ClassifierStats(
            self.splits,
            self.num_classes,
            self.count + other.count,
            self.prob_sum + other.prob_sum,
            self.neg_entropy_sum + other.neg_entropy_sum,
        )


def inception_score(stats: ClassifierStats) -> tuple[float, float]:
    """exp(E_x KL(p(y|x) || p(y))) per split; mean and std over splits.

    E_x KL = E_x[sum p log p] - sum p(y) log p(y), with p(y) the split's mean prediction."""
    if (stats.count < 1).any():
        raise InsufficientSamplesError(
            f"Inception Score with {stats.splits} splits needs at least {stats.splits} samples, "
            f"got {int(stats.count.sum())}"
        )
    marginal = stats.prob_sum / stats.count[:, None]
    marginal_plogp = np.where(marginal > 0, marginal * np.log(np.where(marginal > 0, marginal, 1)), 0).sum(axis=1)
    scores = np.exp(stats.neg_entropy_sum / stats.count - marginal_plogp)
    return float(scores.mean()), float(scores.std())
