"""Side-by-side measurement: candidates run alternately, round after round, and are compared per round.

A slow phase of a shared machine then hits every candidate of a round alike; the order is reversed every
other round so that no candidate always runs first (warm caches) or last.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass
class Samples:
    """One value per round for each candidate (a rate: higher is better)."""

    values: dict[str, list[float]] = field(default_factory=dict)

    def median(self, name: str) -> float:
        return statistics.median(self.values[name])

    def ratio(self, top: str, bottom: str) -> float:
        """Median over rounds of top/bottom measured in the same round."""
        return statistics.median(a / b for a, b in zip(self.values[top], self.values[bottom], strict=True) if b)

    def spread(self, top: str, bottom: str) -> tuple[float, float]:
        ratios = [a / b for a, b in zip(self.values[top], self.values[bottom], strict=True) if b]
        return min(ratios), max(ratios)

    @property
    def rounds(self) -> int:
        return min((len(v) for v in self.values.values()), default=0)


def side_by_side(candidates: dict[str, Callable[[], float]], rounds: int) -> Samples:
    """Call every candidate once per round (each call measures one segment and returns its rate)."""
    samples = Samples({name: [] for name in candidates})
    names = list(candidates)
    for r in range(rounds):
        for name in names if r % 2 == 0 else reversed(names):
            samples.values[name].append(candidates[name]())
    return samples
