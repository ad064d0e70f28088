"""A real moto S3 server on a free loopback port, for tests that read or write s3:// URLs.

The server runs as its own process group and is stopped by PID. `stop()`/`start()` take it down and bring it
back on the same port; moto keeps its objects in memory, so `start()` re-creates every bucket and re-uploads
every file that went through this fixture before returning.
"""

from __future__ import annotations

import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import boto3
import pytest

DUMMY_KEY_ID = "testing-key-id"
DUMMY_SECRET = "testing-secret"
REGION = "us-east-1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class S3Server:
    def __init__(self, log_dir: Path):
        self.port = free_port()
        self.log_path = log_dir / "moto_server.log"
        self.proc: subprocess.Popen | None = None
        # what was put through the fixture, replayed after a restart: bucket -> {key: local file}
        self._contents: dict[str, dict[str, Path]] = {}

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """AWS_* variables that point boto3/s3fs/pyarrow at this server (moto accepts any keys by default)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": DUMMY_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self, key_id: str = DUMMY_KEY_ID, secret: str = DUMMY_SECRET):
        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            region_name=REGION,
        )

    # -- process ---------------------------------------------------------------------------------------
    def start(self, timeout: float = 60.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        log = open(self.log_path, "ab")  # handed to the child; closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() signals the group, nothing else
        )
        self._log = log
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None:
                raise RuntimeError(f"moto server exited with {self.proc.returncode}; see {self.log_path}")
            if time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"moto server did not answer within {timeout}s; see {self.log_path}")
            time.sleep(0.1)
        self._restore()

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()
        self.proc = None

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.endpoint_url}/moto-api/data.json", timeout=1) as resp:
                return resp.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def _restore(self) -> None:
        client = self.client()
        for bucket, files in self._contents.items():
            client.create_bucket(Bucket=bucket)
            for key, path in files.items():
                client.upload_file(str(path), bucket, key)

    # -- contents --------------------------------------------------------------------------------------
    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        self._contents.setdefault(name, {})
        return f"s3://{name}"

    def upload_dir(self, local_dir: str | Path, bucket: str, prefix: str = "") -> str:
        """Upload the files directly inside `local_dir` to s3://bucket/prefix/ and return that URL."""
        if bucket not in self._contents:
            self.create_bucket(bucket)
        client = self.client()
        prefix = prefix.strip("/")
        for path in sorted(Path(local_dir).iterdir()):
            if path.is_file():
                key = f"{prefix}/{path.name}" if prefix else path.name
                client.upload_file(str(path), bucket, key)
                self._contents[bucket][key] = path
        return f"s3://{bucket}/{prefix}" if prefix else f"s3://{bucket}"

    @contextmanager
    def enforce_auth(self) -> Iterator[tuple[str, str]]:
        """Make the server check credentials (moto accepts anything by default); yields a valid key pair.

        moto serves a number of requests unauthenticated before enforcing; the IAM user is made within
        them, then enforcement starts with the next request and ends when the block exits."""
        self._set_unauthenticated_requests(3)
        iam = boto3.client(
            "iam",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=DUMMY_KEY_ID,
            aws_secret_access_key=DUMMY_SECRET,
            region_name=REGION,
        )
        user = f"reader-{secrets.token_hex(4)}"
        iam.create_user(UserName=user)
        iam.put_user_policy(
            UserName=user,
            PolicyName="all",
            PolicyDocument='{"Version":"2012-10-17","Statement":[{"Effect":"Allow","Action":"*","Resource":"*"}]}',
        )
        key = iam.create_access_key(UserName=user)["AccessKey"]
        try:
            yield key["AccessKeyId"], key["SecretAccessKey"]
        finally:
            self._set_unauthenticated_requests(float("inf"))

    def _set_unauthenticated_requests(self, count: float) -> None:
        body = str(count).encode()
        request = urllib.request.Request(
            f"{self.endpoint_url}/moto-api/reset-auth",
            data=body,
            method="POST",
            headers={"Content-Type": "text/plain"},  # a form content type would hide the body from moto
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            resp.read()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    server = S3Server(tmp_path_factory.mktemp("moto"))
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
