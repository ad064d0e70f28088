"""A real `mlflow server` process (sqlite backend) on a loopback port, in its own process group."""

from __future__ import annotations

import os
import subprocess
import sys
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from t2i_dist.processes import free_port, stop_process_group
from t2i_dist.testing.servers import start_server

__all__ = ["MlflowServer", "free_port", "mlflow_server", "start_mlflow_server", "stop_mlflow_server"]


@dataclass
class MlflowServer:
    uri: str
    process: subprocess.Popen
    root: Path
    port: int

    def client(self):
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def only_run_histories(self, experiment: str, keys: tuple[str, ...]) -> tuple[Any, dict[str, list[tuple]]]:
        """The one run of `experiment` and, per metric key, its (step, value) history in step order."""
        client = self.client()
        [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
        return run, {
            key: sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key)) for key in keys
        }


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


def start_mlflow_server(root: Path, port: int | None = None, timeout_s: float = 90) -> MlflowServer:
    """port=None takes a free port (a new one if the bind fails); a given port (a restart: runs hold URLs
    with it) is retried until timeout_s."""
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}

    def command(port: int) -> list[str]:
        return [
            sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
            "--backend-store-uri", f"sqlite:///{root}/mlflow.db", "--artifacts-destination", str(root / "artifacts"),
        ]  # fmt: skip

    process, port = start_server(
        command, _healthy, root / "server.log", port=port, timeout_s=timeout_s, env=env, name="mlflow server"
    )
    return MlflowServer(f"http://127.0.0.1:{port}", process, root, port)


def stop_mlflow_server(server: MlflowServer) -> None:
    stop_process_group(server.process, timeout_s=15)


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MlflowServer]:
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow"))
    yield server
    stop_mlflow_server(server)
