"""A real moto S3 server on a loopback port, for tests and benchmarks that read or write s3:// URLs.

The server runs in its own process group and is stopped through it. `stop()`/`start()` take it down and bring
it back on the same port (callers keep env() and endpoint_url across an outage); moto keeps its objects in
memory, so `start()` re-creates every bucket and re-uploads every file that went through this object before
it returns.
"""

from __future__ import annotations

import secrets
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from t2i_dist.processes import stop_process_group
from t2i_dist.testing.servers import start_server

DUMMY_KEY_ID = "testing-key-id"
DUMMY_SECRET = "testing-secret"
REGION = "us-east-1"


class S3Server:
    def __init__(self, log_path: Path):
        self.log_path = log_path
        self.port: int | None = None  # set by the first start(), kept by later ones
        self.proc: subprocess.Popen | None = None
        # what was put through this object, replayed after a restart: bucket -> {key: local file}
        self._contents: dict[str, dict[str, Path]] = {}

    @property
    def endpoint_url(self) -> str:
        if self.port is None:
            raise RuntimeError("the S3 server has not been started")
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict[str, str]:
        """AWS_* variables that point boto3/s3fs/pyarrow at this server (moto accepts any keys by default)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": DUMMY_KEY_ID,
            "AWS_SECRET_ACCESS_KEY": DUMMY_SECRET,
            "AWS_DEFAULT_REGION": REGION,
        }

    def client(self, key_id: str = DUMMY_KEY_ID, secret: str = DUMMY_SECRET, service: str = "s3") -> Any:
        import boto3  # a test/bench dependency (moto[server]), not one of the package's

        return boto3.client(
            service,
            endpoint_url=self.endpoint_url,
            aws_access_key_id=key_id,
            aws_secret_access_key=secret,
            region_name=REGION,
        )

    # -- process ---------------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout: float = 60.0) -> None:
        """Start the server (a no-op while it runs) and replay the contents. Only the first start may pick
        another port after a failed bind; a restart retries its port for up to `timeout` seconds."""
        if self.running:
            return
        self.stop()  # a server that died by itself
        self.proc, self.port = start_server(
            lambda port: [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            self._answers, self.log_path, port=self.port, timeout_s=timeout, name="moto server",
        )  # fmt: skip
        self._restore()

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc, timeout_s=10)
            self.proc = None

    def _answers(self, port: int) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/data.json", timeout=1) as resp:
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
        iam = self.client(service="iam")
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
        request = urllib.request.Request(
            f"{self.endpoint_url}/moto-api/reset-auth",
            data=str(count).encode(),
            method="POST",
            headers={"Content-Type": "text/plain"},  # a form content type would hide the body from moto
        )
        with urllib.request.urlopen(request, timeout=10) as resp:
            resp.read()
