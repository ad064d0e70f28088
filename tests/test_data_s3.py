"""Shards on a real moto S3 server: listing, preflight errors, streaming through s3fs, surviving an outage."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from itertools import islice

import pytest
import s3fs

from t2i_dist.config import DataSection
from t2i_dist.data.shards import DataError, ShardLoader, expand_urls, preflight
from t2i_dist.data.synthetic import write_synthetic_shards
from tests.fixtures_s3 import DUMMY_SECRET, S3Server, free_port


@pytest.fixture
def s3(s3_env: S3Server):
    # s3fs caches filesystems by their arguments, not by the AWS_* variables: start each test afresh
    s3fs.S3FileSystem.clear_instance_cache()
    yield s3_env
    s3fs.S3FileSystem.clear_instance_cache()


@pytest.fixture(scope="module")
def local_shards(tmp_path_factory) -> str:
    out = tmp_path_factory.mktemp("shards") / "synthetic"
    write_synthetic_shards(out, num_samples=48, samples_per_shard=12, image_size=32)
    return str(out)


@pytest.fixture
def bucket_url(s3: S3Server, local_shards: str) -> str:
    return s3.upload_dir(local_shards, "training", "synthetic/v1")


def cfg(urls: str, **overrides) -> DataSection:
    return DataSection(urls=urls, **{"loader_workers": 0, "shuffle_buffer": 8, **overrides})


def test_expand_lists_prefixes_patterns_and_globs(bucket_url):
    names = [f"{bucket_url}/shard-00000{i}.tar" for i in range(4)]
    assert expand_urls(bucket_url) == names
    assert expand_urls(bucket_url + "/") == names
    assert expand_urls(bucket_url + "/shard-{000001..000002}.tar") == names[1:3]
    assert expand_urls(bucket_url + "/*-00000[03].tar") == [names[0], names[3]]
    assert preflight(cfg(bucket_url)) == names


def test_streams_the_same_batches_as_from_disk(bucket_url, local_shards):
    # loader_workers=1 reads in a DataLoader process, which must register the s3:// opener itself
    from_s3 = list(islice(iter(ShardLoader(cfg(bucket_url, loader_workers=1), batch_size=8, seed=2)), 7))
    from_disk = list(islice(iter(ShardLoader(cfg(local_shards), batch_size=8, seed=2)), 7))
    assert [b.captions for b in from_s3] == [b.captions for b in from_disk]
    assert all((a.images == b.images).all() for a, b in zip(from_s3, from_disk, strict=True))


def test_preflight_names_a_missing_bucket_or_prefix(s3):
    s3.create_bucket("empty-bucket")
    with pytest.raises(DataError, match="bucket 'no-such-bucket' .* does not exist at http://127.0.0.1"):
        preflight(cfg("s3://no-such-bucket/shards"))
    with pytest.raises(DataError, match="no shards .* under 's3://empty-bucket/nothing'"):
        preflight(cfg("s3://empty-bucket/nothing"))


def test_preflight_names_missing_shards_of_a_pattern(bucket_url):
    with pytest.raises(
        DataError, match="2 shard\\(s\\) do not exist, e.g. 's3://training/synthetic/v1/shard-000004.tar'"
    ):
        preflight(cfg(bucket_url + "/shard-{000000..000005}.tar"))


def test_preflight_rejects_wrong_credentials(s3, bucket_url, monkeypatch):
    with s3.enforce_auth() as (key_id, secret):
        monkeypatch.setenv("AWS_ACCESS_KEY_ID", key_id)
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", secret)
        assert len(preflight(cfg(bucket_url))) == 4
        s3fs.S3FileSystem.clear_instance_cache()
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
        with pytest.raises(
            DataError, match="refused access to 's3://training/synthetic/v1'.*AWS_SECRET_ACCESS_KEY"
        ) as info:
            preflight(cfg(bucket_url))
    assert "not-the-secret" not in str(info.value) and secret not in str(info.value)


def test_preflight_names_an_unreachable_endpoint(s3):
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(DataError, match=f"cannot reach the S3 endpoint {dead} .*data.s3.endpoint_url"):
        preflight(cfg("s3://training/synthetic", s3={"endpoint_url": dead}))


class _RetryWatch(logging.Handler):
    """Collects the S3 reader's warnings and signals the first retry."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []
        self.first_retry = threading.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        self.messages.append(message)
        if "; retry " in message:
            self.first_retry.set()


@contextmanager
def watching_retries() -> Iterator[_RetryWatch]:
    """The S3 reader's warnings, collected while the block runs."""
    watch = _RetryWatch()
    s3_log = logging.getLogger("t2i_dist.storage")
    s3_log.addHandler(watch)
    level = s3_log.level
    s3_log.setLevel(logging.WARNING)
    try:
        yield watch
    finally:
        s3_log.removeHandler(watch)
        s3_log.setLevel(level)


def test_outage_mid_stream_recovers_with_the_same_batches(s3, bucket_url, local_shards):
    """The server goes down between two shards and stays down until the reader has retried once; it then
    comes back (emptied, then refilled). The outage is tied to the retry, not to a clock, so retries inside
    botocore/s3fs cannot outlast it and hide it from the reader."""
    reference = list(islice(iter(ShardLoader(cfg(local_shards, shuffle_buffer=0), batch_size=4, seed=1)), 12))
    loader = ShardLoader(cfg(bucket_url, shuffle_buffer=0), batch_size=4, seed=1)
    stream = iter(loader)
    got = list(islice(stream, 2))  # 8 of the first shard's 12 samples; the next shard is opened later

    with watching_retries() as watch:
        s3.stop()
        restart = threading.Thread(target=lambda: (watch.first_retry.wait(60), time.sleep(0.5), s3.start()))
        restart.start()
        try:
            got += list(islice(stream, 10))
        finally:
            restart.join()

    assert watch.first_retry.is_set(), f"no read failed during the outage; warnings: {watch.messages}"
    assert [b.captions for b in got] == [b.captions for b in reference]
    assert loader.skip_counts() == {}
    assert any("retry 1/8" in m for m in watch.messages), watch.messages
    assert not any(DUMMY_SECRET in m for m in watch.messages)


def test_outage_inside_an_object_resumes_at_its_byte_offset(s3, tmp_path):
    """The server goes down in the middle of an object several s3fs blocks long: the read is retried and
    reopened at the byte where it stopped (a ranged request), and the bytes come out whole and in order."""
    import os
    import re

    from t2i_dist.config import S3Section
    from t2i_dist.storage import READ_BLOCK_BYTES, open_url

    folder = tmp_path / "big"
    folder.mkdir()
    blob = os.urandom(3 * READ_BLOCK_BYTES + 12345)
    (folder / "object.bin").write_bytes(blob)
    url = s3.upload_dir(folder, "large") + "/object.bin"
    with watching_retries() as watch:
        restart = threading.Thread(target=lambda: (watch.first_retry.wait(60), time.sleep(0.5), s3.start()))
        try:
            with open_url(url, s3=S3Section(retries=8)) as reader:
                head = reader.read(READ_BLOCK_BYTES + 100)  # inside the second block
                s3.stop()
                restart.start()
                tail = reader.read()
        finally:
            if restart.ident is not None:  # started
                restart.join()
    assert watch.first_retry.is_set(), f"no read failed during the outage; warnings: {watch.messages}"
    offsets = [int(m) for msg in watch.messages for m in re.findall(r"failed at byte (\d+)", msg)]
    assert offsets and all(len(head) <= o < len(blob) for o in offsets), offsets  # mid-object, not from 0
    assert head + tail == blob


def test_retries_exhausted_fail_the_read_with_the_url(s3, tmp_path):
    """A server that stays away: the configured number of retries, then the error reaches the caller."""
    from t2i_dist.config import S3Section
    from t2i_dist.storage import READ_BLOCK_BYTES, TRANSIENT_ERRORS, open_url

    folder = tmp_path / "gone"
    folder.mkdir()
    (folder / "object.bin").write_bytes(b"x" * (2 * READ_BLOCK_BYTES))
    url = s3.upload_dir(folder, "gone") + "/object.bin"
    with watching_retries() as watch:
        try:
            with open_url(url, s3=S3Section(retries=2)) as reader:
                reader.read(1024)
                s3.stop()
                started = time.monotonic()
                with pytest.raises(TRANSIENT_ERRORS):
                    reader.read()
                elapsed = time.monotonic() - started
        finally:
            s3.start()
    retries = [m for m in watch.messages if "; retry " in m]
    assert [m.split("; retry ")[1].split(" ")[0] for m in retries] == ["1/2", "2/2"], watch.messages
    assert all(url in m for m in retries)
    assert elapsed < 30  # backoff 0.25 s then 0.5 s, plus the failing requests themselves
