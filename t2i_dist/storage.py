"""Opening s3:// (and any other fsspec URL) for webdataset, with reads that outlast a short outage.

webdataset has no s3:// opener of its own, so one is registered in `webdataset.gopen.gopen_schemes`. Endpoint,
region and credentials come from the standard AWS variables (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID,
AWS_SECRET_ACCESS_KEY, AWS_DEFAULT_REGION) unless data.s3 sets endpoint_url/region/anon. Credentials are left
to botocore's own lookup, so they never pass through (or get logged by) this module.
"""

from __future__ import annotations

import io
import logging
import os
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import fsspec
from fsspec.spec import AbstractFileSystem
from webdataset.gopen import gopen_schemes

from t2i_dist.config import S3Section

log = logging.getLogger(__name__)

S3_PROTOCOLS = ("s3", "s3a")
RETRY_BASE_DELAY_S = 0.25
RETRY_MAX_DELAY_S = 8.0
READ_BLOCK_BYTES = 8 * 2**20


def _transient_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [OSError, TimeoutError, ConnectionError]
    try:
        from botocore.exceptions import BotoCoreError

        types.append(BotoCoreError)
    except ImportError:
        pass
    try:
        from aiohttp import ClientError

        types.append(ClientError)
    except ImportError:
        pass
    return tuple(types)


TRANSIENT_ERRORS = _transient_error_types()
# answers that are final on a first try; after the endpoint was unreachable they are retried as well,
# because a store that is coming back can answer before its objects are available again
DEFINITE_ERRORS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)


def is_remote(url: str) -> bool:
    protocol = fsspec.core.split_protocol(url)[0]
    return protocol not in (None, "file", "local")


def s3_endpoint(s3: S3Section) -> str | None:
    return s3.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def storage_options(url: str, s3: S3Section) -> dict[str, Any]:
    protocol = fsspec.core.split_protocol(url)[0]
    if protocol not in S3_PROTOCOLS:
        return {}
    options: dict[str, Any] = {
        "anon": s3.anon,
        # botocore retries little: this module's own backoff (data.s3.retries) covers longer outages
        "config_kwargs": {
            "retries": {"max_attempts": 2, "mode": "standard"},
            "connect_timeout": 10,
            "read_timeout": 60,
        },
    }
    endpoint = s3_endpoint(s3)
    if endpoint:
        options["endpoint_url"] = endpoint
    region = s3.region or os.environ.get("AWS_DEFAULT_REGION") or os.environ.get("AWS_REGION")
    if region:
        options["client_kwargs"] = {"region_name": region}
    return options


def filesystem(url: str, s3: S3Section) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem for `url` (configured from data.s3 for s3://) and the path within it."""
    return fsspec.core.url_to_fs(url, **storage_options(url, s3))


def retry_delay(attempt: int) -> float:
    return min(RETRY_BASE_DELAY_S * 2**attempt, RETRY_MAX_DELAY_S)


class RetryingReader(io.RawIOBase):
    """A sequential read stream that reopens at its offset after a failed read, with exponential backoff.

    `retries` failed attempts in a row are tolerated per read (8 give ~30 s): enough for a restarting
    server, short enough that a dead one still fails the shard in reasonable time."""

    def __init__(self, url: str, open_file: Callable[[], Any], retries: int):
        super().__init__()
        self.url = url
        self._open_file = open_file
        self._retries = retries
        self._file: Any = None
        self._offset = 0
        self._with_retries(lambda: None)  # open now, so a missing object fails here

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        data = self._with_retries(lambda: self._file.read(len(buffer)))
        buffer[: len(data)] = data
        self._offset += len(data)
        return len(data)

    def close(self) -> None:
        self._drop_file()
        super().close()

    def _with_retries(self, operation: Callable[[], Any]) -> Any:
        endpoint_failed = False
        for attempt in range(self._retries + 1):
            try:
                if self._file is None:
                    self._file = self._open_file()
                    if self._offset:
                        self._file.seek(self._offset)
                return operation()
            except TRANSIENT_ERRORS as exc:
                definite = isinstance(exc, DEFINITE_ERRORS)
                if attempt == self._retries or (definite and not endpoint_failed):
                    raise
                endpoint_failed = endpoint_failed or not definite
                delay = retry_delay(attempt)
                log.warning(
                    "reading %s failed at byte %d (%s: %s); retry %d/%d in %.2fs",
                    self.url,
                    self._offset,
                    type(exc).__name__,
                    exc,
                    attempt + 1,
                    self._retries,
                    delay,
                )
                self._drop_file()
                time.sleep(delay)
        raise AssertionError("unreachable")

    def _drop_file(self) -> None:
        if self._file is not None:
            try:
                self._file.close()
            except Exception:  # noqa: BLE001 - the connection is already broken; nothing to save
                pass
            self._file = None


def open_url(url: str, mode: str = "rb", bufsize: int = 8192, *, s3: S3Section | None = None, **_: Any) -> Any:
    """Open an fsspec URL; reads go through RetryingReader. Signature of a webdataset gopen handler."""
    s3 = s3 or S3Section()
    fs, path = filesystem(url, s3)
    if mode.startswith("w"):
        return fs.open(path, mode)
    opener = partial(fs.open, path, "rb", block_size=READ_BLOCK_BYTES, cache_type="readahead")
    return io.BufferedReader(RetryingReader(url, opener, s3.retries), buffer_size=max(bufsize, 64 * 1024))


def register_gopen(s3: S3Section | None = None) -> None:
    """Route s3:// and every scheme webdataset has no handler for through fsspec (this process only)."""
    handler = partial(open_url, s3=s3 or S3Section())
    for protocol in S3_PROTOCOLS:
        gopen_schemes[protocol] = handler
    gopen_schemes["__default__"] = handler
