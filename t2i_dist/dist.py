"""Cross-rank helpers: agreement flags, reductions and gathers every rank must enter together, and the
communication backend for a device. Each works in a single process too (no process group: a no-op)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if initialized() else 1


def rank_seed(seed: int, rank: int) -> int:
    """The seed of one rank's own random stream (noise, dropout, data order): the run seed, apart per rank."""
    return seed * 1000 + rank


def backend_for(configured: str, use_gpu: bool) -> str:
    """torch.distributed backend: the configured one, or nccl on GPUs and gloo on CPUs for `auto`."""
    return configured if configured != "auto" else ("nccl" if use_gpu else "gloo")


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """Element-wise OR of per-rank flags, in one tiny all-reduce, so every rank takes the same branch."""
    t = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    if initialized():
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [v > 0 for v in t.tolist()]


def all_finite(value: torch.Tensor) -> bool:
    """True when `value` is finite on every rank (one all-reduce)."""
    finite = torch.isfinite(value.detach()).all().to(torch.float32).reshape(1)
    if initialized():
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)
    return bool(finite.item() >= 1)


def mean_across_ranks(values: dict[str, float], device: torch.device) -> dict[str, float]:
    if not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64, device=device)
    if initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist(), strict=True))


def sum_counts_across_ranks(counts: dict[str, int]) -> dict[str, int]:
    """Per-key sums over ranks (ranks meet different bad samples, so their keys differ)."""
    gathered: list[dict[str, int] | None] = [None] * world_size()
    if initialized():
        dist.all_gather_object(gathered, counts)
    else:
        gathered = [counts]
    total: dict[str, int] = {}
    for part in gathered:
        for k, v in (part or {}).items():
            total[k] = total.get(k, 0) + v
    return dict(sorted(total.items()))
