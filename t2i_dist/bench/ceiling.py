"""What parallel speed-up the machine allows right now: the same pure-compute work in 1 and in 2 Ray tasks of
one CPU and one thread each. Measured in the same rounds as the scaling benchmarks, it is the ceiling their
ratios should be read against on a shared machine (2.0 on two idle cores)."""

from __future__ import annotations

import time
from collections.abc import Callable

from t2i_dist.bench.context import BenchContext

WORK_UNITS = 2000  # 256x256 matmuls per task: a few seconds on one idle core


def compute(units: int) -> float:
    import torch

    torch.set_num_threads(1)
    a = torch.randn(256, 256)
    for _ in range(units):
        a = (a @ a).tanh()
    return float(a[0, 0])


def candidates(ctx: BenchContext) -> dict[str, Callable[[], float]]:
    """Two rates (work per second) for side_by_side: 'ceiling 1' and 'ceiling 2' tasks."""
    ray = ctx.ray()
    task = ray.remote(num_cpus=1)(compute)
    ray.get([task.remote(1) for _ in range(2)])  # start the worker processes

    def rate(tasks: int) -> float:
        start = time.perf_counter()
        ray.get([task.remote(WORK_UNITS) for _ in range(tasks)])
        return tasks * WORK_UNITS / (time.perf_counter() - start)

    return {"ceiling 1": lambda: rate(1), "ceiling 2": lambda: rate(2)}
