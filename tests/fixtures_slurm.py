"""Shared by the launcher tests (Slurm, ray job submit): the tiny training run they submit, the check that it
reached MLflow, and a TCP relay that lets hosts in network namespaces reach a server on the host's loopback."""

from __future__ import annotations

import os
import socket
import sys
import threading
from pathlib import Path


def job_env() -> dict[str, str]:
    """sbatch and `ray start` pass the submitting environment on: this venv's python and ray come first."""
    venv_bin = str(Path(sys.executable).parent)
    return {"PATH": f"{venv_bin}:{os.environ['PATH']}"}


def tiny_training_args(tmp: Path, tracking_uri: str, experiment: str) -> list[str]:
    """Two one-CPU workers, two steps of the tiny config on synthetic shards made under tmp."""
    return [
        "--config", "ldm-tiny", "model.vae.train_config=null", "model.text.train_config=null",
        "run.max_steps=2", "run.log_every=1", f"run.name={experiment}",
        "cluster.num_workers=2", "cluster.cpus_per_worker=1",
        f"cluster.storage_path={tmp / 'runs'}",
        f"data.urls={tmp / 'data'}", "data.resolution=32",
        "data.synthesize.num_samples=256", "data.synthesize.samples_per_shard=128",
        f"tracking.uri={tracking_uri}", f"tracking.experiment={experiment}",
    ]  # fmt: skip


def assert_logged_training(mlflow_server, experiment: str) -> None:
    client = mlflow_server.client()
    exp = client.get_experiment_by_name(experiment)
    assert exp is not None, f"no MLflow experiment {experiment!r}"
    (run,) = client.search_runs([exp.experiment_id])
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in losses][-1] == 2, losses
    assert run.info.status == "FINISHED"


class TcpRelay:
    """Accepts on (host, port) and relays each connection to target: the nodes live in their own network
    namespaces and reach the host only through the bridge, while the MLflow server listens on loopback."""

    def __init__(self, host: str, target: tuple[str, int]) -> None:
        self.target = target
        self.server = socket.create_server((host, 0))
        self.address = self.server.getsockname()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.server.accept()
            except OSError:
                return  # closed
            upstream = socket.create_connection(self.target)
            for src, dst in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(src, dst), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.server.close()
