"""Alignment classifiers trained on first use, cached per data set under ~/.cache/t2i_dist.

The key is the shards' contents (size and sha1 of each local file, size and ETag of each stored object, in
source order), the training settings and the format version -- not how the path was spelled, so
'data/synthetic', './data/synthetic', its absolute path and a glob naming the same files share one file, and
rewritten shards get another.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
from pathlib import Path
from typing import BinaryIO

from t2i_dist.config import S3Section
from t2i_dist.eval.alignment import (
    FORMAT_VERSION,
    TrainSettings,
    check_reliable,
    load_classifier,
    save_classifier,
    train_classifier,
)
from t2i_dist.eval.sources import expand_source
from t2i_dist.storage import filesystem, is_remote

log = logging.getLogger(__name__)


def _sha1(f: BinaryIO) -> str:
    digest = hashlib.sha1()
    for block in iter(lambda: f.read(1 << 20), b""):
        digest.update(block)
    return digest.hexdigest()


def _content_tag(url: str, s3: S3Section | None) -> str:
    """Size and digest of one file: sha1 of its bytes locally, the object's ETag on a store."""
    if is_remote(url):
        fs, path = filesystem(url, s3 or S3Section())
        meta = fs.info(path)
        tag = str(meta.get("ETag") or meta.get("etag") or "").strip('"')
        if tag:
            return f"{meta.get('size')}:{tag}"
        with fs.open(path, "rb") as f:
            return f"{meta.get('size')}:{_sha1(f)}"
    with open(url, "rb") as f:
        return f"{os.fstat(f.fileno()).st_size}:{_sha1(f)}"


def classifier_key(shards: str | list[str], settings: TrainSettings | None = None, s3: S3Section | None = None) -> str:
    """Same shards (in the same order), same settings: same key, however the paths are spelled."""
    kind, urls = expand_source(shards, s3)
    if kind == "folder":  # loose images take their attributes from sidecar json files
        sidecars = [u.rsplit(".", 1)[0] + ".json" for u in urls]
        urls = [u for pair in zip(urls, sidecars, strict=True) for u in pair if is_remote(u) or os.path.isfile(u)]
    record = {
        "format": FORMAT_VERSION,
        "kind": kind,
        "content": [_content_tag(u, s3) for u in urls],
        "settings": dataclasses.asdict(settings or TrainSettings()),
    }
    return hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir() -> Path:
    """Where classifiers trained on first use are kept (read at call time: HOME may change)."""
    return Path.home() / ".cache" / "t2i_dist"


def default_classifier_path(
    shards: str | list[str], settings: TrainSettings | None = None, s3: S3Section | None = None
) -> Path:
    """Per-data-set cache location for a classifier trained on first use."""
    return cache_dir() / f"alignment-{classifier_key(shards, settings, s3)}.pt"


def ensure_classifier(
    path: str | None,
    shards: str | list[str],
    *,
    s3: S3Section | None = None,
    settings: TrainSettings | None = None,
) -> Path:
    """The configured classifier, else the cached one for these shards, trained now if missing. Either is
    refused (UnreliableClassifierError) below the accuracy bar; a refused one is never cached."""
    if path:
        load_classifier(path)
        return Path(path)
    target = default_classifier_path(shards, settings, s3)
    if target.is_file():
        log.info("alignment classifier for %r: %s (cached)", shards, target)
    else:
        net, info = train_classifier(shards, settings, s3=s3)
        check_reliable(info, f"the alignment classifier trained on {shards!r}")
        save_classifier(net, target, {**info, "shards": shards})
        log.info(
            "alignment classifier trained on %d samples in %.0f s (held-out accuracy %s): %s",
            info["train_samples"],
            info["seconds"],
            ", ".join(f"{a} {v:.2f}" for a, v in info["holdout_accuracy"].items()),
            target,
        )
    return target
