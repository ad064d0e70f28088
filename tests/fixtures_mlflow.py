"""A real `mlflow server` process (sqlite backend) on a free loopback port, in its own process group."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class MlflowServer:
    uri: str
    process: subprocess.Popen
    root: Path
    port: int

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)


def start_mlflow_server(root: Path, port: int | None = None, timeout_s: float = 90) -> MlflowServer:
    port = port or free_port()
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    cmd = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
    ]
    log = (root / "server.log").open("ab")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri = f"http://127.0.0.1:{port}"
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"mlflow server exited early; see {root / 'server.log'}")
        try:
            with urllib.request.urlopen(f"{uri}/health", timeout=2) as r:
                if r.status == 200:
                    return MlflowServer(uri, process, root, port)
        except OSError:
            time.sleep(0.5)
    stop_mlflow_server(MlflowServer(uri, process, root, port))
    raise RuntimeError(f"mlflow server did not answer within {timeout_s}s")


def stop_mlflow_server(server: MlflowServer) -> None:
    if server.process.poll() is None:
        os.killpg(server.process.pid, signal.SIGTERM)
        try:
            server.process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(server.process.pid, signal.SIGKILL)
            server.process.wait(5)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory):
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield server
    stop_mlflow_server(server)
