"""One local Ray cluster for the whole test session (starting Ray is the slow part; tests share it)."""

from __future__ import annotations

import os

import pytest


@pytest.fixture(scope="session")
def ray_cluster():
    import ray

    if not ray.is_initialized():
        # 4 logical CPUs on a 2-core machine: two training workers plus the Train controller fit at once
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=True,
            runtime_env={"env_vars": {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}},
        )
    # Ray Train's helper processes and CLI subprocesses must find this cluster even when other Ray
    # instances run on the machine
    previous = os.environ.get("RAY_ADDRESS")
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
    yield ray
    ray.shutdown()
    if previous is None:
        os.environ.pop("RAY_ADDRESS", None)
    else:
        os.environ["RAY_ADDRESS"] = previous


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    """Run in a fresh directory so local stores (runs/, mlruns/) never leak between tests."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    os.environ.setdefault("T2I_LOG_LEVEL", "WARNING")
    return tmp_path
