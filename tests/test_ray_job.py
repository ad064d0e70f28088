"""`ray job submit` against a running cluster, as the README shows it: cluster/local_head.sh starts a head with
token authentication on free ports, the job runs `python -m t2i_dist.train` from the uploaded working
directory, and its metrics reach the real MLflow server. The test stops the head itself, by its PID."""

from __future__ import annotations

import os
import subprocess
import uuid
from pathlib import Path

import psutil
import pytest
import ray
import yaml

from tests.fixtures_slurm import assert_logged_training, job_env, tiny_training_args

ROOT = Path(__file__).resolve().parents[1]
LOCAL_HEAD = ROOT / "cluster" / "local_head.sh"

pytestmark = pytest.mark.slow


def client_env(head_dir: Path) -> dict[str, str]:
    """The environment `local_head.sh env` prints, as a user would `eval` it."""
    out = subprocess.run([str(LOCAL_HEAD), "env", "--dir", str(head_dir)], capture_output=True, text=True, check=True)
    exports = dict(line.removeprefix("export ").split("=", 1) for line in out.stdout.splitlines())
    return {**os.environ, **job_env(), **exports}


@pytest.fixture(scope="module")
def local_head(tmp_path_factory):
    head_dir = tmp_path_factory.mktemp("ray-head")
    env = {**os.environ, **job_env()}
    start = subprocess.run([str(LOCAL_HEAD), "start", "--dir", str(head_dir), "--num-cpus", "2"],
                           capture_output=True, text=True, env=env, timeout=300, check=False)  # fmt: skip
    try:
        assert start.returncode == 0, start.stderr[-3000:]
        yield head_dir
    finally:
        subprocess.run([str(LOCAL_HEAD), "stop", "--dir", str(head_dir)], env=env, timeout=60, check=False)
        pid_file = head_dir / "head.pid"
        assert not pid_file.exists(), f"head still recorded as running: {pid_file.read_text()}"


def test_job_server_rejects_a_wrong_token(local_head):
    env = {**client_env(local_head), "RAY_AUTH_TOKEN": "not-the-cluster-token"}
    out = subprocess.run(["ray", "job", "list"], capture_output=True, text=True, env=env, timeout=120, check=False)
    assert out.returncode != 0
    assert "Invalid authentication token" in out.stdout + out.stderr


def test_dashboard_listens_on_loopback_only(local_head):
    port = int(client_env(local_head)["RAY_API_SERVER_ADDRESS"].rsplit(":", 1)[1])
    listening = [c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.laddr.port == port]
    assert listening and set(listening) <= {"127.0.0.1"}, listening


def test_ray_job_submit_trains_and_logs_to_mlflow(local_head, mlflow_server, tmp_path):
    experiment = f"ray-job-{uuid.uuid4().hex[:6]}"
    cmd = [
        "ray", "job", "submit", "--working-dir", ".", "--submission-id", experiment, "--",
        "python", "-m", "t2i_dist.train", *tiny_training_args(tmp_path, mlflow_server.uri, experiment),
    ]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=client_env(local_head), timeout=900,
                         check=False)  # fmt: skip
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-4000:]
    assert f"Job '{experiment}' succeeded" in log
    assert_logged_training(mlflow_server, experiment)


def test_gpu_cluster_config_passes_rays_own_checks():
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = yaml.safe_load((ROOT / "cluster" / "gpu-aws.yaml").read_text())
    validate_config(prepare_config(config))  # the checks `ray up` runs before it touches the cloud
    assert config["docker"]["image"].startswith(f"rayproject/ray:{ray.__version__}-")
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert starts.count("RAY_AUTH_MODE=token") == 2, "every node must start with token authentication"
    assert "--dashboard-host=127.0.0.1" in starts
