"""Run a function on N gloo ranks in fresh processes (for engine-level tests that need no Ray)."""

from __future__ import annotations

import os
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from t2i_dist.processes import free_port

# all ranks together: a hung rank must fail the test well inside pytest's 900 s per-test timeout
DEADLINE_S = 480.0
# once one rank failed, the others may wait forever in a collective it never joins
AFTER_FAILURE_S = 30.0


def _entry(rank: int, world: int, port: int, fn, args, results):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    import torch
    import torch.distributed as dist

    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        results[rank] = ("ok", fn(rank, world, *args))
    except BaseException:  # noqa: BLE001 - reported to the parent
        results[rank] = ("error", traceback.format_exc())
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _join(procs: list, results: Any, deadline_s: float) -> list[int]:
    """Wait for every rank until the deadline, then kill the rest; returns the ranks that were killed."""
    deadline = time.monotonic() + deadline_s
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        failed = any(v[0] == "error" for v in results.values()) or any(p.exitcode not in (None, 0) for p in procs)
        if failed:
            deadline = min(deadline, time.monotonic() + AFTER_FAILURE_S)
        time.sleep(0.2)
    hung = [rank for rank, p in enumerate(procs) if p.is_alive()]
    for rank in hung:
        procs[rank].kill()
    for p in procs:
        p.join()
    return hung


def run_distributed(fn: Callable[..., Any], world: int = 2, args: tuple = (), deadline_s: float = DEADLINE_S) -> list:
    """fn(rank, world, *args) on `world` ranks; returns each rank's (picklable) result or raises."""
    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        port = free_port()
        procs = [ctx.Process(target=_entry, args=(r, world, port, fn, args, results)) for r in range(world)]
        for p in procs:
            p.start()
        hung = _join(procs, results, deadline_s)
        out = dict(results)
    errors = [f"rank {r}:\n{v[1]}" for r, v in sorted(out.items()) if v[0] == "error"]
    if hung:
        errors.append(
            f"rank(s) {', '.join(map(str, hung))} hung: still running at the deadline ({deadline_s:.0f} s "
            f"for the run, {AFTER_FAILURE_S:.0f} s once another rank had failed), killed"
        )
    dead = [r for r, p in enumerate(procs) if r not in out and r not in hung]
    if dead:
        errors.append(
            f"rank(s) {', '.join(map(str, dead))} died without a result "
            f"(exit codes {[procs[r].exitcode for r in dead]})"
        )
    if errors:
        raise AssertionError("distributed run failed:\n" + "\n".join(errors))
    return [out[r][1] for r in range(world)]
