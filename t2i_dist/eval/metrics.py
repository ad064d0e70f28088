"""What one worker accumulates over its share of images (a `Partial`), how partials merge, and the final
numbers computed once from the merged partials of the generated and the real set."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from t2i_dist.config import ClipConfig
from t2i_dist.eval.alignment import FEATURE_DIM as ALIGNMENT_DIM
from t2i_dist.eval.alignment import AlignmentCounts, AlignmentScorer, load_classifier
from t2i_dist.eval.clip_score import ClipScorer, clip_unavailable_reason
from t2i_dist.eval.inception import (
    FEATURE_DIM,
    NUM_CLASSES,
    ExtractorSpec,
    InceptionExtractor,
    same_size_runs,
)
from t2i_dist.eval.sources import Item
from t2i_dist.eval.stats import (
    ClassifierStats,
    FeatureStats,
    frechet_distance,
    inception_score,
    is_rank_deficient,
    kernel_inception_distance,
)


@dataclass(frozen=True)
class MetricSpec:
    """Which metrics to accumulate, and how images are prepared. Picklable: it travels to Ray workers."""

    extractor: ExtractorSpec = ExtractorSpec()
    resolution: int | None = None  # centre crop + resize of read images before anything else; None keeps size
    keep_features: bool = True  # per-image Inception features, for KID
    is_splits: int = 10
    clip: ClipConfig | None = None
    alignment_path: str | None = None
    device: str = "cpu"

    def check(self) -> None:
        """Load what the workers will load, on the driver first, so a bad file fails before any work."""
        self.extractor.check()
        if self.alignment_path:
            load_classifier(self.alignment_path)

    def unavailable(self) -> dict[str, str]:
        """Metrics that will not be computed, with the reason and the fix."""
        reasons: dict[str, str] = {}
        if not self.extractor.head_path:
            reasons["is"] = (
                "the bundled TorchScript Inception has no classifier head; set eval.inception_head_path "
                "(--inception-head) to a full Inception state dict (pytorch-fid's pt_inception-2015-12-05-6726825d.pth)"
            )
        clip_reason = clip_unavailable_reason(self.clip)
        if clip_reason:
            reasons["clip_score"] = clip_reason
        if not self.alignment_path:
            reasons["alignment"] = (
                "no alignment classifier (eval.alignment_classifier); it applies to the synthetic data set"
            )
        if not self.keep_features:
            reasons["kid"] = "per-image features were not kept"
        return reasons


@dataclass
class Partial:
    """Mergeable sums of one worker; `features`/`indices` are per-image (for KID), sorted by global index."""

    inception: FeatureStats = field(default_factory=lambda: FeatureStats(FEATURE_DIM))
    indices: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    features: np.ndarray | None = None
    classifier: ClassifierStats | None = None
    clip_sum: float = 0.0
    clip_count: int = 0
    alignment: AlignmentCounts | None = None
    alignment_stats: FeatureStats | None = None
    generation_seconds: float = 0.0
    generated: int = 0

    @property
    def count(self) -> int:
        return self.inception.count

    def __add__(self, other: Partial) -> Partial:
        indices = np.concatenate([self.indices, other.indices])
        order = np.argsort(indices, kind="stable")
        features = None
        if self.features is not None and other.features is not None:
            features = np.concatenate([self.features, other.features])[order]
        return Partial(
            self.inception + other.inception,
            indices[order],
            features,
            _add_optional(self.classifier, other.classifier),
            self.clip_sum + other.clip_sum,
            self.clip_count + other.clip_count,
            _add_optional(self.alignment, other.alignment),
            _add_optional(self.alignment_stats, other.alignment_stats),
            self.generation_seconds + other.generation_seconds,
            self.generated + other.generated,
        )

    @classmethod
    def merge(cls, parts: list[Partial]) -> Partial:
        if not parts:
            raise ValueError("no partial results to merge")
        out = parts[0]
        for part in parts[1:]:
            out = out + part
        return out

    # -- flat arrays: the reference cache (.npz) and all_reduce use them -------------------------------
    def to_arrays(self) -> dict[str, np.ndarray]:
        arrays = {f"inception/{k}": v for k, v in self.inception.to_arrays().items()}
        arrays["indices"] = self.indices
        if self.features is not None:
            arrays["features"] = self.features
        if self.classifier is not None:
            c = self.classifier
            arrays.update({"is/count": c.count, "is/prob_sum": c.prob_sum, "is/neg_entropy_sum": c.neg_entropy_sum})
        arrays["clip"] = np.array([self.clip_sum, self.clip_count], np.float64)
        if self.alignment is not None:
            arrays["alignment/counts"] = self.alignment.to_array()
        if self.alignment_stats is not None:
            arrays.update({f"alignment/{k}": v for k, v in self.alignment_stats.to_arrays().items()})
        arrays["generation"] = np.array([self.generation_seconds, self.generated], np.float64)
        return arrays

    @classmethod
    def from_arrays(cls, arrays: dict[str, np.ndarray]) -> Partial:
        part = cls(
            FeatureStats.from_arrays({k.split("/", 1)[1]: v for k, v in arrays.items() if k.startswith("inception/")})
        )
        part.indices = np.asarray(arrays["indices"], np.int64)
        part.features = arrays.get("features")
        if "is/count" in arrays:
            count, probs = arrays["is/count"], arrays["is/prob_sum"]
            part.classifier = ClassifierStats(len(count), probs.shape[1], count, probs, arrays["is/neg_entropy_sum"])
        part.clip_sum, clip_count = (float(v) for v in arrays["clip"])
        part.clip_count = int(clip_count)
        if "alignment/counts" in arrays:
            part.alignment = AlignmentCounts.from_array(arrays["alignment/counts"])
        if "alignment/total" in arrays:
            part.alignment_stats = FeatureStats.from_arrays(
                {
                    k.split("/", 1)[1]: v
                    for k, v in arrays.items()
                    if k.startswith("alignment/") and k != "alignment/counts"
                }
            )
        seconds, generated = (float(v) for v in arrays["generation"])
        part.generation_seconds, part.generated = seconds, int(generated)
        return part


def _add_optional(a: Any, b: Any) -> Any:
    if a is None:
        return b
    if b is None:
        return a
    return a + b


class Accumulator:
    """Runs the configured networks over batches of uint8 images and keeps a Partial."""

    def __init__(self, spec: MetricSpec, total_items: int):
        self.spec = spec
        self.total_items = total_items
        self.extractor = InceptionExtractor(spec.extractor, spec.device)
        self.clip = (
            ClipScorer(spec.clip, spec.device)
            if spec.clip is not None and clip_unavailable_reason(spec.clip) is None
            else None
        )
        self.aligner = AlignmentScorer(spec.alignment_path, spec.device) if spec.alignment_path else None
        self.partial = Partial(
            classifier=ClassifierStats(spec.is_splits, NUM_CLASSES) if self.extractor.head is not None else None,
            alignment=AlignmentCounts.empty() if self.aligner else None,
            alignment_stats=FeatureStats(ALIGNMENT_DIM) if self.aligner else None,
        )
        self._features: list[np.ndarray] = []
        self._indices: list[np.ndarray] = []

    def update(self, items: list[Item], images: list[torch.Tensor]) -> None:
        """`images`: uint8 CHW, one per item."""
        if len(items) != len(images):
            raise ValueError(f"{len(items)} items but {len(images)} images")
        if not items:
            return
        p = self.partial
        indices = np.array([it.index for it in items], np.int64)
        feats = self.extractor.features(images)
        p.inception.add(feats)
        self._indices.append(indices)
        if self.spec.keep_features:
            self._features.append(feats.astype(np.float32))
        if p.classifier is not None:
            p.classifier.add(self.extractor.class_probabilities(feats), indices, self.total_items)
        offset = 0
        for batch in same_size_runs(images):
            batch_items = items[offset : offset + len(batch)]
            offset += len(batch)
            if self.clip is not None:
                captions = [it.caption or "" for it in batch_items]
                scores = self.clip.scores(batch, captions)
                p.clip_sum += float(scores.double().sum())
                p.clip_count += len(batch)
            if self.aligner is not None:
                align_feats, counts = self.aligner.score(batch, batch_items)
                assert p.alignment_stats is not None and p.alignment is not None  # made with the aligner
                p.alignment_stats.add(align_feats)
                p.alignment = p.alignment + counts

    def add_generation_time(self, seconds: float, images: int) -> None:
        self.partial.generation_seconds += seconds
        self.partial.generated += images

    def result(self) -> Partial:
        p = self.partial
        if self._indices:
            p.indices = np.concatenate(self._indices)
        if self.spec.keep_features:
            p.features = np.concatenate(self._features) if self._features else np.zeros((0, FEATURE_DIM), np.float32)
        return p


class Timer:
    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.start


# ---------------------------------------------------------------------------------------------- final numbers


def set_metrics(part: Partial) -> dict[str, Any]:
    """Metrics of one image set on its own: IS, CLIP score, text alignment."""
    out: dict[str, Any] = {}
    if part.classifier is not None:
        out["is"], out["is_std"] = inception_score(part.classifier)
    if part.clip_count:
        out["clip_score"] = part.clip_sum / part.clip_count
    if part.alignment is not None:
        rates = part.alignment.rates()
        if "all" in rates:
            out["alignment"] = rates["all"]
        out.update({f"alignment/{k}": v for k, v in rates.items() if k != "all"})
    return out


def pair_metrics(
    fake: Partial,
    real: Partial,
    *,
    require_full_rank: bool = False,
    kid_subsets: int = 100,
    kid_subset_size: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """Distances between the generated and the real set: FID, KID, alignment-feature FID."""
    out: dict[str, Any] = {
        "fid": frechet_distance(fake.inception, real.inception, require_full_rank),
        "fid_rank_deficient": is_rank_deficient(fake.inception, real.inception),
    }
    if fake.features is not None and real.features is not None:
        out["kid"], out["kid_std"] = kernel_inception_distance(
            real.features, fake.features, kid_subsets, kid_subset_size, seed
        )
    if fake.alignment_stats is not None and real.alignment_stats is not None:
        out["alignment_fid"] = frechet_distance(fake.alignment_stats, real.alignment_stats)
    return out


def summarize(
    fake: Partial, real: Partial, spec: MetricSpec, extractor_identity: dict[str, str], **kwargs: Any
) -> dict[str, Any]:
    """One JSON-able record: the numbers, the sample counts and the extractor."""
    out = pair_metrics(fake, real, **kwargs)
    out.update(set_metrics(fake))
    real_only = set_metrics(real)
    if real_only:
        out["real"] = real_only
    out["num_fake"], out["num_real"] = fake.count, real.count
    if fake.generated:
        out["seconds_per_image"] = fake.generation_seconds / fake.generated
    out["extractor"] = extractor_identity
    unavailable = spec.unavailable()
    if unavailable:
        out["unavailable"] = unavailable
    return out
