"""Fan evaluation out: split the ordered items into K contiguous chunks, let each worker turn its chunk into a
Partial (sums), merge on the driver. Two transports share the worker code: Ray tasks (the CLI) and a
torch.distributed worker group (in-training evaluation, where every rank holds one chunk and the sums are
all-reduced). Because the result is a sum over items -- and per-image data is re-sorted by global index --
it does not depend on K.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from t2i_dist.config import S3Section
from t2i_dist.eval.metrics import Accumulator, MetricSpec, Partial
from t2i_dist.eval.sources import Item, read_images


class ImageProducer(Protocol):
    """Turns items into uint8 CHW images: by reading them, or by generating one per caption."""

    def batches(self, items: list[Item]) -> Iterator[tuple[list[Item], list[torch.Tensor], float]]:
        """Yields (items, images, seconds spent generating them)."""
        ...


@dataclass(frozen=True)
class ImageReader:
    resolution: int | None = None
    batch_size: int = 16
    s3: S3Section | None = None

    def batches(self, items: list[Item]) -> Iterator[tuple[list[Item], list[torch.Tensor], float]]:
        batch: list[tuple[Item, torch.Tensor]] = []
        for pair in read_images(items, self.resolution, self.s3):
            batch.append(pair)
            if len(batch) == self.batch_size:
                yield [it for it, _ in batch], [img for _, img in batch], 0.0
                batch = []
        if batch:
            yield [it for it, _ in batch], [img for _, img in batch], 0.0


def split_contiguous(items: list[Any], k: int) -> list[list[Any]]:
    """K chunks whose sizes differ by at most one, in order (the first n % k chunks get one more)."""
    if k < 1:
        raise ValueError(f"number of workers must be >= 1, got {k}")
    base, extra = divmod(len(items), k)
    chunks, start = [], 0
    for i in range(k):
        end = start + base + (1 if i < extra else 0)
        chunks.append(items[start:end])
        start = end
    return chunks


def evaluate_chunk(producer: ImageProducer, items: list[Item], spec: MetricSpec, total_items: int) -> Partial:
    """What one worker does with its chunk."""
    acc = Accumulator(spec, total_items)
    for batch_items, images, seconds in producer.batches(items):
        acc.update(batch_items, images)
        if seconds:
            acc.add_generation_time(seconds, len(images))
    return acc.result()


# ---------------------------------------------------------------------------------------------- Ray


def ensure_ray(address: str | None = None) -> None:
    """Join the cluster at `address` / RAY_ADDRESS, else start a local one; reuse an initialised session."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)
    else:
        ray.init(include_dashboard=False)


def fan_out_ray(
    producer: ImageProducer,
    items: list[Item],
    spec: MetricSpec,
    workers: int,
    *,
    num_cpus: float = 1,
    num_gpus: float = 0,
    address: str | None = None,
) -> Partial:
    import ray

    if not items:
        raise ValueError("nothing to evaluate: the item list is empty")
    ensure_ray(address)
    task = ray.remote(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=1)(evaluate_chunk)
    chunks = [chunk for chunk in split_contiguous(items, min(workers, len(items))) if chunk]
    spec_ref = ray.put(spec)
    refs = [task.remote(producer, chunk, spec_ref, len(items)) for chunk in chunks]
    return Partial.merge(ray.get(refs))


# ---------------------------------------------------------------------------------------------- torch.distributed


def _reduce_arrays(arrays: dict[str, np.ndarray], keys: list[str], group: Any) -> dict[str, np.ndarray]:
    """Sum the named arrays over ranks in one float64 all_reduce (exact for counts below 2**53)."""
    import torch.distributed as dist

    flat = torch.from_numpy(np.concatenate([np.asarray(arrays[k], np.float64).ravel() for k in keys]))
    if dist.get_backend(group) == "nccl":  # NCCL reduces GPU tensors only
        flat = flat.to(torch.device("cuda", torch.cuda.current_device()))
    dist.all_reduce(flat, group=group)
    flat = flat.cpu()
    out, offset = dict(arrays), 0
    for k in keys:
        size = np.asarray(arrays[k]).size
        dtype = np.asarray(arrays[k]).dtype
        values = flat[offset : offset + size].numpy().reshape(np.shape(arrays[k]))
        out[k] = np.rint(values).astype(dtype) if np.issubdtype(dtype, np.integer) else values
        offset += size
    return out


def all_reduce_partial(part: Partial, group: Any = None) -> Partial:
    """Sum a Partial over the ranks of a process group (unchanged without one: a world of one). Per-image
    features are dropped (KID is a CLI metric): gathering them would cost 8 KiB per image on every rank."""
    import torch.distributed as dist

    arrays = part.to_arrays()
    arrays.pop("features", None)
    arrays["indices"] = np.zeros(0, np.int64)
    if not (dist.is_available() and dist.is_initialized()):
        return Partial.from_arrays(arrays)
    return Partial.from_arrays(_reduce_arrays(arrays, [k for k in arrays if k != "indices"], group))
