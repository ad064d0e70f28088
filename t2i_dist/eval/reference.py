"""Cached statistics of real images, as .npz files in a local directory or under an s3:// prefix.

The cache key covers everything that changes the numbers: the ordered sample list (source URLs, keys and
count), the preparation resolution, the extractor (network sha1 + resize mode), the classifier head and the
alignment classifier. A different sample count or resize therefore never reuses a stale file.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
from collections.abc import Callable

import numpy as np

from t2i_dist.config import S3Section
from t2i_dist.eval.inception import digest_of
from t2i_dist.eval.metrics import MetricSpec, Partial
from t2i_dist.eval.sources import Item
from t2i_dist.storage import filesystem

log = logging.getLogger(__name__)


def _file_tag(path: str | None) -> str:
    if not path:
        return "none"
    from pathlib import Path

    return digest_of(Path(path), "sha1")[:12]


def reference_key(items: list[Item], spec: MetricSpec, dataset: str | None = None) -> str:
    """`<data set>-<resolution>px-n<count>-<extractor key>-<content hash>`."""
    listing = hashlib.sha1()
    for item in items:
        listing.update(f"{item.url}\0{item.key}\0".encode())
    content = json.dumps(
        {
            "items": listing.hexdigest(),
            "resolution": spec.resolution,
            "extractor": spec.extractor.key(),
            "head": _file_tag(spec.extractor.head_path),
            "alignment": _file_tag(spec.alignment_path),
            "clip": spec.clip.model_dump() if spec.clip else None,
            "is_splits": spec.is_splits,
            "features": spec.keep_features,
        },
        sort_keys=True,
    )
    name = dataset or _dataset_name(items)
    resolution = f"{spec.resolution}px" if spec.resolution else "native"
    digest = hashlib.sha1(content.encode()).hexdigest()[:12]
    return f"{name}-{resolution}-n{len(items)}-{spec.extractor.key()}-{digest}"


def _dataset_name(items: list[Item]) -> str:
    first = items[0].url.rstrip("/").rsplit("/", 2)
    stem = first[-2] if len(first) >= 2 else first[-1]
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in stem)[:40] or "data"


def cache_path(cache_dir: str, key: str) -> str:
    return cache_dir.rstrip("/") + f"/{key}.npz"


def load_reference(cache_dir: str, key: str) -> Partial | None:
    path = cache_path(cache_dir, key)
    fs, fs_path = filesystem(path, S3Section())
    if not fs.exists(fs_path):
        return None
    with fs.open(fs_path, "rb") as f, np.load(io.BytesIO(f.read())) as data:
        return Partial.from_arrays(dict(data))


def save_reference(cache_dir: str, key: str, part: Partial) -> str:
    """Write atomically where the filesystem allows (temporary name, then move)."""
    path = cache_path(cache_dir, key)
    fs, fs_path = filesystem(path, S3Section())
    buffer = io.BytesIO()
    np.savez(buffer, **part.to_arrays())  # type: ignore[arg-type]  # numpy stubs: **kwds could hit allow_pickle
    parent = fs_path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    tmp = fs_path + ".tmp"
    with fs.open(tmp, "wb") as f:
        f.write(buffer.getvalue())
    fs.mv(tmp, fs_path)
    return path


def cached_reference(
    items: list[Item],
    spec: MetricSpec,
    compute: Callable[[], Partial],
    cache_dir: str | None,
    dataset: str | None = None,
) -> tuple[Partial, str | None]:
    """(statistics, cache path or None): loaded when cached, else computed and stored."""
    if not cache_dir:
        return compute(), None
    key = reference_key(items, spec, dataset)
    part = load_reference(cache_dir, key)
    if part is not None:
        log.info("reference statistics loaded from %s", cache_path(cache_dir, key))
        return part, cache_path(cache_dir, key)
    part = compute()
    return part, save_reference(cache_dir, key, part)
