"""One reader's deterministic, resumable stream of batches.

A reader is one (rank, loader worker) pair. For every epoch it gets a seeded share of the shards (split by
rank, then by worker; by sample instead when there are fewer shards than readers), reads their samples,
shuffles them in a buffer seeded by (seed, epoch, rank, worker), decodes them and groups them into batches.
Its position is (epoch, number of shuffled items consumed in that epoch), so a resume re-reads tar bytes up
to the position but decodes no image before it. Unusable samples and unreadable shards are counted by
reason, never fatal, until their share exceeds data.max_skip_fraction.
"""

from __future__ import annotations

import logging
import random
import tarfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from itertools import count
from typing import Any, Literal

from webdataset.filters import shuffle
from webdataset.gopen import gopen
from webdataset.tariterators import group_by_keys, tar_file_iterator

from t2i_dist.config import S3Section
from t2i_dist.data.decode import SkipSample, collate, decode_sample, shape_signature
from t2i_dist.data.errors import DataError
from t2i_dist.storage import TRANSIENT_ERRORS, register_gopen

log = logging.getLogger(__name__)

# the skipped fraction is judged only after this many samples, so one early bad sample cannot abort a run
MIN_SAMPLES_FOR_SKIP_CHECK = 50
ERROR_KEY = "__error__"
END_OF_ARCHIVE_BYTES = 1024  # two zero blocks


@dataclass
class StreamSpec:
    """Everything a reader needs; plain data so it pickles into DataLoader worker processes."""

    shards: list[str]
    batch_size: int
    seed: int
    rank: int
    world_size: int
    fmt: Literal["images", "latents"]
    resolution: int
    shuffle_buffer: int
    resampled: bool
    max_skip_fraction: float
    max_pixels: int
    s3: S3Section


@dataclass
class Position:
    epoch: int = 0
    index: int = 0  # shuffled items of `epoch` already consumed


@dataclass
class SkipCounter:
    seen: int = 0
    skipped: Counter = field(default_factory=Counter)
    skipped_by_shard: Counter = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        return {"seen": self.seen, "skipped": dict(self.skipped), "skipped_by_shard": dict(self.skipped_by_shard)}

    @classmethod
    def from_dict(cls, state: dict[str, Any]) -> SkipCounter:
        return cls(state["seen"], Counter(state["skipped"]), Counter(state["skipped_by_shard"]))

    def merged(self, other: SkipCounter) -> SkipCounter:
        return SkipCounter(
            self.seen + other.seen, self.skipped + other.skipped, self.skipped_by_shard + other.skipped_by_shard
        )

    @property
    def total_skipped(self) -> int:
        return sum(self.skipped.values())


# ----------------------------------------------------------------------------------------- shard assignment


def _split(items: list[str], part: int, parts: int) -> tuple[list[str], tuple[int, int] | None]:
    """This part's shards, or all of them plus a (part, parts) sample filter when there are too few."""
    if parts == 1:
        return items, None
    if len(items) >= parts:
        return items[part::parts], None
    return items, (part, parts)


def epoch_assignment(
    spec: StreamSpec, epoch: int, worker: int, num_workers: int
) -> tuple[list[str], list[tuple[int, int]]]:
    """(shard URLs, sample filters) of one reader for one epoch; the filters keep item i if i % n == k,
    applied in order (rank level, then worker level)."""
    if spec.resampled:
        rng = random.Random(f"{spec.seed}/resample/{epoch}/{spec.rank}/{worker}")
        draws = max(1, -(-len(spec.shards) // (spec.world_size * num_workers)))
        return rng.choices(spec.shards, k=draws), []
    order = list(spec.shards)
    random.Random(f"{spec.seed}/shards/{epoch}").shuffle(order)  # same order on every rank
    filters = []
    urls, rank_filter = _split(order, spec.rank, spec.world_size)
    if rank_filter:
        filters.append(rank_filter)
        # every rank reads all shards; workers must then split by sample too, to stay disjoint
        if num_workers > 1:
            filters.append((worker, num_workers))
        return urls, filters
    urls, worker_filter = _split(urls, worker, num_workers)
    return urls, [worker_filter] if worker_filter else []


# --------------------------------------------------------------------------------------------- raw items


class _TailKeeper:
    """Passes reads through and keeps the last bytes, to check a tar's end-of-archive blocks afterwards."""

    def __init__(self, stream: Any, url: str):
        self.stream = stream
        self.url = url
        self.tail = b""

    def __str__(self) -> str:  # webdataset names the stream in its error messages
        return self.url

    def read(self, size: int = -1) -> bytes:
        data = self.stream.read(size)
        self.tail = (self.tail + data)[-END_OF_ARCHIVE_BYTES:]
        return data

    def ends_properly(self) -> bool:
        while self.read(1 << 16):  # the record padding after the end blocks
            pass
        return self.tail == bytes(END_OF_ARCHIVE_BYTES)


def shard_items(url: str) -> Iterator[dict[str, Any]]:
    """Samples of one shard (bytes per key); a shard that cannot be read or parsed ends with an error item.

    tarfile takes a shard cut at a header as a complete archive, so an uncompressed shard must also end
    with the two zero blocks that close every tar archive."""
    try:
        stream = gopen(url, "rb")
    except TRANSIENT_ERRORS as exc:
        log.warning("cannot open shard %s: %s: %s", url, type(exc).__name__, exc)
        yield {"__url__": url, ERROR_KEY: "unreadable_shard"}
        return
    try:
        source = _TailKeeper(stream, url)
        files = ({**f, "__url__": url} for f in tar_file_iterator(source))
        yield from group_by_keys(files)
        if url.endswith(".tar") and not source.ends_properly():
            raise tarfile.ReadError("the archive ends without its end-of-archive blocks")
    except (tarfile.TarError, EOFError, ValueError) as exc:
        log.warning("shard %s is truncated or corrupt: %s", url, exc)
        yield {"__url__": url, ERROR_KEY: "corrupt_tar"}
    except TRANSIENT_ERRORS as exc:
        log.warning("reading shard %s failed: %s: %s", url, type(exc).__name__, exc)
        yield {"__url__": url, ERROR_KEY: "unreadable_shard"}
    finally:
        stream.close()


def _keep_every(items: Iterator[dict[str, Any]], part: int, parts: int) -> Iterator[dict[str, Any]]:
    for i, item in enumerate(items):
        if i % parts == part:
            yield item


def epoch_items(spec: StreamSpec, epoch: int, worker: int, num_workers: int) -> Iterator[dict[str, Any]]:
    urls, filters = epoch_assignment(spec, epoch, worker, num_workers)
    items: Iterator[dict[str, Any]] = (item for url in urls for item in shard_items(url))
    for part, parts in filters:
        items = _keep_every(items, part, parts)
    if spec.shuffle_buffer > 1:
        rng = random.Random(f"{spec.seed}/samples/{epoch}/{spec.rank}/{worker}")
        items = shuffle(spec.shuffle_buffer, spec.shuffle_buffer, rng=rng)(items)
    return items


# ------------------------------------------------------------------------------------------------ batches


def _check_skips(counter: SkipCounter, spec: StreamSpec, worker: int) -> None:
    if counter.seen < MIN_SAMPLES_FOR_SKIP_CHECK:
        return
    fraction = counter.total_skipped / counter.seen
    if fraction <= spec.max_skip_fraction:
        return
    reasons = ", ".join(f"{k}={v}" for k, v in counter.skipped.most_common())
    worst = ", ".join(f"{url} ({n} skipped)" for url, n in counter.skipped_by_shard.most_common(3))
    raise DataError(
        f"{counter.total_skipped} of {counter.seen} samples skipped ({fraction:.0%}) on rank {spec.rank}, loader "
        f"worker {worker}, above data.max_skip_fraction={spec.max_skip_fraction}. Reasons: {reasons}. "
        f"Worst shards: {worst}. Fix or remove those shards (tools/make_shards.py rewrites an image folder "
        "or COCO set), or raise data.max_skip_fraction"
    )


def reader_batches(
    spec: StreamSpec,
    worker: int,
    num_workers: int,
    start: Position,
    counter: SkipCounter,
    signature: str | None = None,
) -> Iterator[dict[str, Any]]:
    """Infinite batches of one reader, from `start`. Each is the collated batch plus `position` (where the
    next batch starts) and `counter` (cumulative skip counts), both as plain dicts, and `signature` (the
    shapes every sample must have: the reader's first usable sample's, carried across a resume so that the
    same samples are skipped as `shape_mismatch`; a string, to survive the JSON checkpoint)."""
    register_gopen(spec.s3)  # per process: DataLoader workers start without it
    pending = []
    for epoch in count(start.epoch):
        first = start.index if epoch == start.epoch else 0
        items_in_epoch = usable_in_epoch = 0
        for index, item in enumerate(epoch_items(spec, epoch, worker, num_workers), start=1):
            items_in_epoch += 1
            if index <= first:
                continue  # fast-forward: consumed before the resume, not decoded again
            counter.seen += 1
            try:
                if ERROR_KEY in item:
                    raise SkipSample(item[ERROR_KEY])
                decoded = decode_sample(item, spec.fmt, spec.resolution, spec.max_pixels)
                shapes = repr(shape_signature(decoded))
                signature = signature or shapes
                if shapes != signature:
                    raise SkipSample("shape_mismatch")
            except SkipSample as skip:
                counter.skipped[skip.reason] += 1
                counter.skipped_by_shard[item.get("__url__", "?")] += 1
                _check_skips(counter, spec, worker)
                continue
            usable_in_epoch += 1
            pending.append(decoded)
            if len(pending) == spec.batch_size:
                yield {
                    **collate(pending),
                    "position": asdict(Position(epoch, index)),
                    "counter": counter.to_dict(),
                    "signature": signature,
                }
                pending = []
        if items_in_epoch == 0 or (items_in_epoch > first and usable_in_epoch == 0):
            raise DataError(
                f"no usable sample in epoch {epoch} on rank {spec.rank}, loader worker {worker} "
                f"({items_in_epoch} read, skip counts {dict(counter.skipped)}): check data.urls "
                f"({len(spec.shards)} shards, e.g. {spec.shards[0]!r})"
            )
