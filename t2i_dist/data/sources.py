"""Resolving data.urls to shard URLs, and the driver-side check that they can be read."""

from __future__ import annotations

import glob
import logging
import os
from pathlib import Path

import braceexpand
import fsspec
from fsspec.spec import AbstractFileSystem

from t2i_dist.config import DataSection, S3Section
from t2i_dist.data.errors import DataError
from t2i_dist.data.synthetic import write_synthetic_shards
from t2i_dist.data.writing import existing_shards
from t2i_dist.storage import S3_PROTOCOLS, filesystem, is_remote, s3_endpoint

log = logging.getLogger(__name__)

SHARD_SUFFIXES = (".tar", ".tar.gz", ".tgz")
GLOB_CHARS = "*?["


def _as_list(urls: str | list[str]) -> list[str]:
    return [urls] if isinstance(urls, str) else list(urls)


def _is_shard_name(path: str) -> bool:
    return path.endswith(SHARD_SUFFIXES)


def _has_glob(path: str) -> bool:
    return any(c in path for c in GLOB_CHARS)


def _local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def _expand_local(path: str) -> list[str]:
    if _has_glob(path):
        return sorted(p for p in glob.glob(path) if os.path.isfile(p))
    if os.path.isdir(path):
        return sorted(str(p) for p in Path(path).iterdir() if _is_shard_name(p.name) and p.is_file())
    return [path]


def _expand_remote(url: str, s3: S3Section) -> list[str]:
    fs, path = filesystem(url, s3)
    if _has_glob(path):
        found = fs.glob(path)
    elif _is_shard_name(path):
        return [url]
    else:  # a bucket or prefix: the shards directly under it
        found = [p for p in fs.glob(path.rstrip("/") + "/*") if _is_shard_name(p)]
    return [fs.unstrip_protocol(p) for p in sorted(found)]


def expand_urls(urls: str | list[str], s3: S3Section | None = None) -> list[str]:
    """Shard URLs for brace patterns, directories (their *.tar), globs, file:// and s3:// buckets/prefixes/globs.

    Explicit names (and brace expansions) are returned without checking that they exist; `preflight` does."""
    s3 = s3 or S3Section()
    out: list[str] = []
    for item in _as_list(urls):
        for url in braceexpand.braceexpand(item):
            out.extend(_expand_remote(url, s3) if is_remote(url) else _expand_local(_local_path(url)))
    return list(dict.fromkeys(out))


# ------------------------------------------------------------------------------------------------ preflight


def preflight(data: DataSection) -> list[str]:
    """Resolve data.urls to shards and check they can be read, before any worker starts.

    Writes the synthetic data set first when data.synthesize is enabled and its directory holds no shards.
    Raises DataError naming the URL and the fix."""
    if data.synthesize.enabled:
        synthesize_if_missing(data)
    items = _as_list(data.urls)
    if not items:
        raise DataError("data.urls is empty: give shard paths, a directory, a brace pattern or an s3:// prefix")
    shards: list[str] = []
    for item in items:
        if is_remote(item):
            shards += _check_remote(item, data.s3)
        else:
            shards += _check_local(item)
    return list(dict.fromkeys(shards))


HOW_TO_GET_SHARDS = (
    "write shards there (tools/make_shards.py, tools/make_synthetic_shards.py) or set "
    "data.synthesize.enabled=true to generate a synthetic set"
)


def _check_local(item: str) -> list[str]:
    path = _local_path(item)
    if not (_has_glob(path) or "{" in path) and not os.path.exists(path):
        raise DataError(f"data.urls {item!r} does not exist: fix the path, or {HOW_TO_GET_SHARDS}")
    found = expand_urls(item)
    missing = [p for p in found if not os.path.isfile(p)]
    if missing:
        raise DataError(
            f"data.urls {item!r}: {len(missing)} shard(s) do not exist, e.g. {missing[0]!r}. Fix the pattern, "
            f"or {HOW_TO_GET_SHARDS}"
        )
    if not found:
        where = "the directory holds no *.tar" if os.path.isdir(path) else "nothing matches"
        raise DataError(f"no shards found for data.urls {item!r} ({where}): {HOW_TO_GET_SHARDS}")
    return found


def _probe_bucket(url: str, fs: AbstractFileSystem) -> None:
    """One small listing: its error answer tells a missing bucket, bad credentials or a dead endpoint apart
    (an empty glob result would not)."""
    if fsspec.core.split_protocol(url)[0] in S3_PROTOCOLS:
        fs.call_s3("list_objects_v2", Bucket=url.split("://", 1)[1].split("/", 1)[0], MaxKeys=1)


def _check_remote(item: str, s3: S3Section) -> list[str]:
    try:
        fs, _ = filesystem(item, s3)
        _probe_bucket(item, fs)
        found = expand_urls(item, s3)
        _check_remote_names_exist(item, fs, found)
    except DataError:
        raise
    except Exception as exc:  # noqa: BLE001 - classified into a readable message below
        raise explain_remote_error(item, exc, s3) from exc
    if not found:
        raise DataError(f"no shards (*.tar) found under {item!r}: upload shards there or fix data.urls")
    return found


def _check_remote_names_exist(item: str, fs: AbstractFileSystem, found: list[str]) -> None:
    """Explicitly named shards (brace patterns, .tar URLs) are checked with one listing per directory."""
    if not found:
        return
    listed: dict[str, set[str]] = {}
    missing = []
    for url in found:
        path = fs._strip_protocol(url)
        parent = path.rsplit("/", 1)[0]
        if parent not in listed:
            listed[parent] = set(fs.ls(parent, detail=False))
        if path not in listed[parent]:
            missing.append(url)
    if missing:
        raise DataError(
            f"data.urls {item!r}: {len(missing)} shard(s) do not exist, e.g. {missing[0]!r}. "
            "Upload them or fix the pattern"
        )


def _error_code(exc: BaseException) -> str:
    for candidate in (exc, exc.__cause__, exc.__context__):
        response = getattr(candidate, "response", None)
        if isinstance(response, dict):
            return str(response.get("Error", {}).get("Code", ""))
    return ""


def explain_remote_error(url: str, exc: BaseException, s3: S3Section) -> DataError:
    endpoint = s3_endpoint(s3) or "the default AWS endpoint"
    bucket = url.split("://", 1)[-1].split("/", 1)[0]
    code = _error_code(exc)
    text = str(exc)
    kind = type(exc).__name__
    if code == "NoSuchBucket" or "bucket does not exist" in text.lower():
        return DataError(
            f"bucket {bucket!r} of data.urls {url!r} does not exist at {endpoint}: create it and upload the "
            "shards, or fix data.urls (or data.s3.endpoint_url / AWS_ENDPOINT_URL if it lives elsewhere)"
        )
    if kind == "NoCredentialsError":
        return DataError(
            f"no AWS credentials found to read {url!r}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, "
            "or data.s3.anon=true for a public bucket"
        )
    if isinstance(exc, PermissionError) or code in ("AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return DataError(
            f"{endpoint} refused access to {url!r} ({text}): check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY "
            "and the bucket policy, or set data.s3.anon=true for a public bucket"
        )
    if "connect" in kind.lower() or "connect" in text.lower() or isinstance(exc, TimeoutError | ConnectionError):
        return DataError(
            f"cannot reach the S3 endpoint {endpoint} to read {url!r} ({kind}): start the server or fix "
            "data.s3.endpoint_url / AWS_ENDPOINT_URL"
        )
    if isinstance(exc, FileNotFoundError):
        return DataError(f"{url!r} not found at {endpoint}: upload the shards or fix data.urls")
    return DataError(f"cannot list {url!r} at {endpoint}: {kind}: {text}")


# ------------------------------------------------------------------------------------------------ synthesis


def synthesis_directory(urls: str | list[str]) -> Path:
    """The local directory data.synthesize writes to: data.urls itself, or the directory of its pattern."""
    items = _as_list(urls)
    if len(items) != 1 or is_remote(items[0]):
        raise DataError(
            f"data.synthesize.enabled writes shards to one local directory, but data.urls is {urls!r}: "
            "point data.urls at a local directory (or a pattern inside one), or disable data.synthesize"
        )
    path = _local_path(items[0])
    if _has_glob(path) or "{" in path or _is_shard_name(path):
        path = os.path.dirname(path) or "."
    if _has_glob(path) or "{" in path:
        raise DataError(f"data.urls {urls!r}: data.synthesize needs a pattern whose directory part is plain")
    return Path(path)


HOLDOUT_SEED = 1  # training shards are rendered with seed 0: another seed gives other images and captions


def holdout_directory(data: DataSection) -> Path:
    directory = synthesis_directory(data.urls)
    return directory.with_name(directory.name + "-holdout")


def synthesize_if_missing(data: DataSection) -> list[str]:
    directory = synthesis_directory(data.urls)
    cfg = data.synthesize
    holdout = holdout_directory(data)
    if cfg.holdout_samples and not existing_shards(holdout):
        log.info("writing %d held-out synthetic samples to %s", cfg.holdout_samples, holdout)
        write_synthetic_shards(holdout, cfg.holdout_samples, cfg.samples_per_shard, cfg.image_size, HOLDOUT_SEED)
    if existing_shards(directory):
        return [str(p) for p in existing_shards(directory)]
    log.info("writing %d synthetic samples (%d px) to %s", cfg.num_samples, cfg.image_size, directory)
    return write_synthetic_shards(directory, cfg.num_samples, cfg.samples_per_shard, cfg.image_size)


def held_out_source(data: DataSection, captions: str | None) -> tuple[str | list[str], bool]:
    """(where held-out images come from, whether they are really held out): `captions` (eval.captions), else
    the synthetic hold-out set, else the training shards themselves."""
    if captions:
        return captions, True
    if data.synthesize.enabled and data.synthesize.holdout_samples:
        return str(holdout_directory(data)), True
    return data.urls, False
