"""The moto S3 server (t2i_dist.testing.s3server) as session fixtures, for tests that read or write s3:// URLs.

The server is one process group for the whole session; a test may stop() and start() it (an outage): it comes
back on the same port with every bucket and file that went through it.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from t2i_dist.processes import free_port
from t2i_dist.testing.s3server import DUMMY_KEY_ID, DUMMY_SECRET, REGION, S3Server

__all__ = ["DUMMY_KEY_ID", "DUMMY_SECRET", "REGION", "S3Server", "free_port", "s3_env", "s3_server"]


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("moto") / "moto_server.log")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3_env(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> S3Server:
    """The server, with its AWS_* variables set in os.environ for the test."""
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server
