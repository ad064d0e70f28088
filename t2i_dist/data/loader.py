"""ShardLoader: the training loop's infinite, resumable iterable of Batch for one rank.

With data.loader_workers = 0 the single reader runs in-process; with W > 0 a torch DataLoader runs W readers
in worker processes. A DataLoader hands out batches round-robin over its workers, so the k-th batch comes
from reader k % W; the loader records each delivered batch's reader position and skip counts, and a resumed
loader rotates reader ids so that its first batch comes from reader (batches delivered) % W. A resume is
therefore exact (the same batches, in the same order) for any W, as long as the shards, seed, world size,
rank and loader_workers are unchanged. If they changed, the loader restarts every reader at the beginning
of the earliest saved epoch (a warning says so): each sample is still seen once per epoch from there on.

The loader draws nothing from the process's global torch RNG, which the checkpoint saves and restores for the
training's own draws (noise, timesteps): a DataLoader would otherwise draw its workers' base seed from it at
every `iter()`, and a resumed run, which starts its iterator after restoring that RNG, would draw different
random numbers from the first step after the resume on.
"""

from __future__ import annotations

import atexit
import hashlib
import logging
import signal
import weakref
from collections.abc import Iterator
from typing import Any

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from t2i_dist.batch import Batch
from t2i_dist.config import DataSection
from t2i_dist.data.decode import MAX_IMAGE_PIXELS
from t2i_dist.data.errors import DataError
from t2i_dist.data.sources import expand_urls
from t2i_dist.data.stream import Position, SkipCounter, StreamSpec, reader_batches

log = logging.getLogger(__name__)

STATE_VERSION = 1

# DataLoader iterators whose worker processes may still run (see _stop_live_workers)
_LIVE_ITERATORS: weakref.WeakSet[Any] = weakref.WeakSet()


@atexit.register
def _stop_live_workers() -> None:
    """Stop the readers of iterators still alive at interpreter exit (e.g. held by a traceback). Readers
    ignore SIGTERM, so multiprocessing's own exit handler, which terminates and then joins them, would wait
    forever; registered after it (this module imports torch.utils.data first), so it runs before it."""
    for outputs in list(_LIVE_ITERATORS):
        outputs._shutdown_workers()


def _unchanged(item: Any) -> Any:
    return item


class _Readers(IterableDataset):
    """Runs reader (DataLoader worker id + rotation) % W in each DataLoader worker process."""

    def __init__(
        self,
        spec: StreamSpec,
        positions: list[Position],
        counters: list[SkipCounter],
        signatures: list[str | None],
        rotation: int,
    ):
        self.spec = spec
        self.positions = positions
        self.counters = counters
        self.signatures = signatures
        self.rotation = rotation

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        if info is not None:
            # Slurm signals every process of a job: the training process decides when to stop, not its readers
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        num_workers = info.num_workers if info else 1
        reader = ((info.id if info else 0) + self.rotation) % num_workers
        torch.set_num_threads(1)  # decoding is per-sample work; threads would only compete with training
        outputs = reader_batches(
            self.spec, reader, num_workers, self.positions[reader], self.counters[reader], self.signatures[reader]
        )
        for out in outputs:
            yield {**out, "reader": reader}


class ShardLoader:
    """Iterable of Batch over data.urls for `rank` of `world_size`; infinite over epochs.

    Iterating again continues where the last delivered batch left off. `state_dict()`/`load_state_dict()`
    carry that position (epoch, index within it, batches delivered) and the skip counts across a restart.
    `shards` skips the URL expansion (pass what `preflight` returned); `pin_memory` is for CUDA training."""

    def __init__(
        self,
        data: DataSection,
        batch_size: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        *,
        shards: list[str] | None = None,
        max_pixels: int = MAX_IMAGE_PIXELS,
        pin_memory: bool = False,
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        shards = list(shards) if shards is not None else expand_urls(data.urls, data.s3)
        if not shards:
            raise DataError(f"no shards found for data.urls {data.urls!r}; run preflight(data) for details")
        self.num_workers = data.loader_workers
        # page-locked batches let the host-to-GPU copy (Batch.to, non_blocking) overlap the step
        self.pin_memory = pin_memory
        self.spec = StreamSpec(
            shards=shards,
            batch_size=batch_size,
            seed=seed,
            rank=rank,
            world_size=world_size,
            fmt=data.format,
            resolution=data.resolution,
            shuffle_buffer=data.shuffle_buffer,
            resampled=data.resampled,
            max_skip_fraction=data.max_skip_fraction,
            max_pixels=max_pixels,
            s3=data.s3,
        )
        readers = max(1, self.num_workers)
        self._positions = [Position() for _ in range(readers)]
        self._counters = [SkipCounter() for _ in range(readers)]
        self._signatures: list[str | None] = [None] * readers
        self._batches = 0
        # the DataLoader's own generator (workers' base seed), so that iterating never draws from the global
        # torch RNG; readers draw from their own seeded RNGs, this only fixes the workers' default seeds
        digest = hashlib.sha1(f"{seed}/loader/{rank}".encode()).digest()
        self._loader_seed = int.from_bytes(digest[:7], "big")

    # -- iteration ---------------------------------------------------------------------------------------
    def __iter__(self) -> Iterator[Batch]:
        outputs: Iterator[dict[str, Any]]
        if self.num_workers == 0:
            batches = reader_batches(self.spec, 0, 1, self._positions[0], self._counters[0], self._signatures[0])
            outputs = ({**out, "reader": 0} for out in batches)
        else:
            dataset = _Readers(
                self.spec, self._positions, self._counters, self._signatures, self._batches % self.num_workers
            )
            # in_order: the k-th batch is worker k's, which the rotation above relies on
            outputs = iter(
                DataLoader(
                    dataset,
                    batch_size=None,
                    num_workers=self.num_workers,
                    collate_fn=_unchanged,
                    prefetch_factor=2,
                    in_order=True,
                    pin_memory=self.pin_memory,
                    generator=torch.Generator().manual_seed(self._loader_seed),
                )
            )
            _LIVE_ITERATORS.add(outputs)
        try:
            for out in outputs:
                reader = out["reader"]
                self._positions[reader] = Position(**out["position"])
                self._counters[reader] = SkipCounter.from_dict(out["counter"])
                self._signatures[reader] = out["signature"]
                self._batches += 1
                yield Batch(captions=out["captions"], images=out["images"], latents=out["latents"], text=out["text"])
        finally:
            # stop worker processes now, not whenever a traceback holding this frame is collected
            shutdown = getattr(outputs, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()

    # -- counts ------------------------------------------------------------------------------------------
    def _total_counter(self) -> SkipCounter:
        total = SkipCounter()
        for counter in self._counters:
            total = total.merged(counter)
        return total

    def skip_counts(self) -> dict[str, int]:
        """Skipped samples by reason, over every reader, up to the last delivered batch."""
        return dict(self._total_counter().skipped)

    def seen_count(self) -> int:
        """Samples read (used and skipped), over every reader, up to the last delivered batch."""
        return self._total_counter().seen

    @property
    def epoch(self) -> int:
        return min(p.epoch for p in self._positions)

    # -- state -------------------------------------------------------------------------------------------
    def _identity(self) -> dict[str, Any]:
        digest = hashlib.sha1("\n".join(self.spec.shards).encode()).hexdigest()
        return {
            "shards_sha1": digest,
            "seed": self.spec.seed,
            "rank": self.spec.rank,
            "world_size": self.spec.world_size,
            "loader_workers": self.num_workers,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "version": STATE_VERSION,
            **self._identity(),
            "epoch": self.epoch,
            "batches": self._batches,
            "positions": [vars(p).copy() for p in self._positions],
            "counters": [c.to_dict() for c in self._counters],
            "signatures": list(self._signatures),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise DataError(f"data loader state version {state.get('version')} is not {STATE_VERSION}")
        counters = [SkipCounter.from_dict(c) for c in state["counters"]]
        self._batches = state["batches"]
        changed = {k: (state.get(k), v) for k, v in self._identity().items() if state.get(k) != v}
        if not changed:
            self._positions = [Position(**p) for p in state["positions"]]
            self._counters = counters
            # absent in states saved before it was kept: the first sample after the resume sets it
            self._signatures = list(state.get("signatures") or [None] * len(self._positions))
            return
        epoch = min(p["epoch"] for p in state["positions"])
        log.warning(
            "data loader settings changed since the saved state (%s); restarting at the beginning of epoch %d",
            ", ".join(f"{k}: {a} -> {b}" for k, (a, b) in changed.items()),
            epoch,
        )
        self._positions = [Position(epoch, 0) for _ in self._positions]
        self._counters = [SkipCounter() for _ in self._counters]
        self._signatures = [None] * len(self._positions)
        for counter in counters:
            self._counters[0] = self._counters[0].merged(counter)
