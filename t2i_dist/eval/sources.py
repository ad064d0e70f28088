"""Evaluation inputs as a deterministic, indexed list of items, so that K-way splits are exact.

A source is a folder of images (searched recursively, sorted by relative path; a sidecar `.txt`/`.json` with
the same stem gives caption/attributes), or webdataset tar shards (paths, brace patterns, globs, a folder of
`.tar` files, or s3:// URLs). Shards are indexed by reading tar headers, so an item records the byte range of
its image and workers read exactly their items with one seek each -- no worker streams shards it skips.
"""

from __future__ import annotations

import dataclasses
import glob
import io
import json
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from PIL import Image

from t2i_dist.config import S3Section
from t2i_dist.data.sources import SHARD_SUFFIXES, expand_urls
from t2i_dist.eval.inception import pil_to_uint8
from t2i_dist.storage import filesystem, is_remote

IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "ppm")
TEXT_EXTS = ("txt", "caption", "text")


class SourceError(ValueError):
    """An evaluation source is missing, empty or unreadable."""


@dataclass(frozen=True)
class Item:
    """One evaluation sample. `offset`/`size` locate the image bytes inside a shard (None: the whole file)."""

    index: int
    url: str
    key: str
    offset: int | None = None
    size: int | None = None
    caption: str | None = None
    attrs: dict[str, Any] = field(default_factory=dict, hash=False, compare=False)
    has_image: bool = True


def _open(url: str, s3: S3Section | None = None) -> Any:
    """A binary file object for a local path, file:// or s3:// URL (data.s3 settings for S3)."""
    fs, path = filesystem(url, s3 or S3Section())
    return fs.open(path, "rb")


def _image_files(url: str, s3: S3Section | None) -> list[str]:
    """Image files under a local folder or remote prefix, sorted by path, recursively."""
    if is_remote(url):
        fs, path = filesystem(url, s3 or S3Section())
        found = sorted(fs.find(path))
        found = [fs.unstrip_protocol(p) for p in found]
    else:
        local = url.removeprefix("file://")
        found = (
            sorted(glob.glob(os.path.join(glob.escape(local), "**", "*"), recursive=True))
            if os.path.isdir(local)
            else []
        )
    return [p for p in found if p.rsplit(".", 1)[-1].lower() in IMAGE_EXTS]


def expand_source(spec: str | list[str], s3: S3Section | None = None) -> tuple[str, list[str]]:
    """('shards' | 'folder', ordered shard URLs or image files). Shards resolve like data.urls
    (t2i_dist.data.sources.expand_urls); a folder or prefix without shards is read as loose images."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    shards: list[str] = []
    images: list[str] = []
    for part in specs:
        found = [u for u in expand_urls(part, s3) if u.endswith(SHARD_SUFFIXES)]
        if found:
            shards += found
            continue
        images += _image_files(part, s3)
        local = part.removeprefix("file://")
        if not images and not is_remote(part) and not os.path.exists(local) and not glob.has_magic(local):
            raise SourceError(f"evaluation source {part!r} does not exist (expected shards or an image folder)")
    if shards and images:
        raise SourceError(f"{spec!r} mixes tar shards and loose images; pass one kind per source")
    if not shards and not images:
        raise SourceError(f"{spec!r} holds no .tar shards and no images ({', '.join(IMAGE_EXTS)})")
    missing = [u for u in shards if not is_remote(u) and not os.path.isfile(u.removeprefix("file://"))]
    if missing:
        raise SourceError(f"{len(missing)} shard(s) of {spec!r} do not exist, e.g. {missing[0]!r}")
    # absolute local paths: workers (Ray tasks) do not share the driver's working directory
    urls = [u if is_remote(u) else os.path.abspath(u.removeprefix("file://")) for u in shards or images]
    return ("shards", urls) if shards else ("folder", urls)


def _split_name(name: str) -> tuple[str, str]:
    """webdataset's convention: key = path up to the first dot of the file name, ext = the rest."""
    directory, base = os.path.split(name)
    stem, _, ext = base.partition(".")
    return os.path.join(directory, stem), ext.lower()


def _read_member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> bytes:
    handle = tar.extractfile(member)
    return handle.read() if handle is not None else b""


def _shard_items(url: str, require_images: bool, s3: S3Section | None) -> Iterator[Item]:
    # "r:" (seekable, uncompressed) reads headers and skips data; .tar.gz shards need "r:*" (full read)
    mode: Literal["r:", "r:*"] = "r:" if url.endswith(".tar") else "r:*"
    with _open(url, s3) as raw, tarfile.open(fileobj=raw, mode=mode) as tar:
        current: dict[str, Any] | None = None

        def finish(sample: dict[str, Any] | None) -> Item | None:
            if sample is None:
                return None
            member = sample.get("image")
            if member is None:
                if require_images or not sample.get("caption"):
                    return None
                return Item(0, url, sample["key"], None, None, sample["caption"], sample.get("attrs", {}), False)
            return Item(
                0, url, sample["key"], member.offset_data, member.size, sample.get("caption"), sample.get("attrs", {})
            )

        for member in tar:
            if not member.isfile():
                continue
            key, ext = _split_name(member.name)
            if current is None or current["key"] != key:
                item = finish(current)
                if item is not None:
                    yield item
                current = {"key": key}
            if ext in IMAGE_EXTS and "image" not in current:
                current["image"] = member
            elif ext in TEXT_EXTS:
                current["caption"] = _read_member(tar, member).decode("utf-8").strip()
            elif ext == "json":
                meta = json.loads(_read_member(tar, member) or b"{}")
                current["attrs"] = meta if isinstance(meta, dict) else {}
                if "caption" not in current and isinstance(meta, dict) and isinstance(meta.get("caption"), str):
                    current["caption"] = meta["caption"]
        item = finish(current)
        if item is not None:
            yield item


def _sidecar(path: str, ext: str, s3: S3Section | None) -> str | None:
    candidate = path.rsplit(".", 1)[0] + "." + ext
    try:
        with _open(candidate, s3) as f:
            return f.read().decode("utf-8")
    except FileNotFoundError:
        return None


def list_items(
    spec: str | list[str],
    limit: int | None = None,
    *,
    need_captions: bool = False,
    require_images: bool = True,
    s3: S3Section | None = None,
) -> list[Item]:
    """The first `limit` items of a source, in source order, numbered 0..n-1. With require_images=False
    (captions for generation), shard samples with a caption but no image count too."""
    kind, urls = expand_source(spec, s3)
    items: list[Item] = []
    for url in urls:
        if limit is not None and len(items) >= limit:
            break
        if kind == "shards":
            try:
                for item in _shard_items(url, require_images, s3):
                    items.append(item)
                    if limit is not None and len(items) >= limit:
                        break
            except (tarfile.TarError, OSError) as exc:
                raise SourceError(f"cannot read shard {url}: {exc}") from exc
        else:
            caption = _sidecar(url, "txt", s3)
            attrs_text = _sidecar(url, "json", s3)
            attrs = json.loads(attrs_text) if attrs_text else {}
            items.append(Item(0, url, os.path.basename(url), None, None, caption.strip() if caption else None, attrs))
    if not items:
        what = "an image" if require_images else "an image or a caption"
        raise SourceError(f"{spec!r} holds no samples with {what}")
    items = [dataclasses.replace(it, index=i) for i, it in enumerate(items)]
    if need_captions:
        missing = [it for it in items if not it.caption]
        if missing:
            raise SourceError(
                f"{len(missing)} of {len(items)} samples in {spec!r} have no caption (.txt member or "
                f"json 'caption'), e.g. {missing[0].url}#{missing[0].key}"
            )
    return items


# ---------------------------------------------------------------------------------------------- reading


def center_crop_resize(image: Image.Image, resolution: int | None) -> Image.Image:
    """Square centre crop, then PIL bicubic (antialiased) to resolution x resolution; None keeps the image."""
    image = image.convert("RGB")
    if resolution is None:
        return image
    w, h = image.size
    side = min(w, h)
    if (w, h) != (side, side):
        left, top = (w - side) // 2, (h - side) // 2
        image = image.crop((left, top, left + side, top + side))
    if side != resolution:
        image = image.resize((resolution, resolution), resample=Image.Resampling.BICUBIC)
    return image


def read_images(
    items: list[Item], resolution: int | None, s3: S3Section | None = None
) -> Iterator[tuple[Item, torch.Tensor]]:
    """uint8 CHW images of `items`, opening each file or shard once."""
    handles: dict[str, Any] = {}
    try:
        for item in items:
            if not item.has_image:
                raise SourceError(f"{item.url}#{item.key} has a caption but no image")
            if item.offset is None:
                with _open(item.url, s3) as f:
                    data = f.read()
            else:
                handle = handles.get(item.url)
                if handle is None:
                    handle = handles[item.url] = _open(item.url, s3)
                handle.seek(item.offset)
                data = handle.read(item.size)
            try:
                image = Image.open(io.BytesIO(data))
                image.load()
            except OSError as exc:
                raise SourceError(f"cannot decode the image of {item.url}#{item.key}: {exc}") from exc
            yield item, pil_to_uint8(center_crop_resize(image, resolution))
    finally:
        for handle in handles.values():
            handle.close()
