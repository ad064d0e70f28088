"""slurm/train.sbatch against real Slurm daemons (tools/slurm_local.py): one node, then two nodes in their own
network namespaces so Ray really spans two hosts. Each test trains the tiny config and checks the job's
state, its exit code and the metrics that reached the real MLflow server."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import uuid
from pathlib import Path

import psutil
import pytest

from tests.fixtures_slurm import TcpRelay, assert_logged_training, job_env, tiny_training_args
from tools.slurm_local import LocalSlurm, why_unavailable

ROOT = Path(__file__).resolve().parents[1]
TRAIN = ROOT / "slurm" / "train.sbatch"
TWO_NODE_SUBNET = "10.77.0"
JOB_TIMEOUT_S = 600

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def skip_unless_slurm(netns: bool = False) -> None:
    """Skip where this machine cannot host the daemons; under CI (CI=true) that is a failure: CI installs
    them (tools/ci/install_system_deps.sh) and runs as root, so a skip would only hide these tests."""
    reason = why_unavailable(netns)
    if reason and os.environ.get("CI") == "true":
        pytest.fail(f"local Slurm cluster unavailable under CI: {reason}")
    if reason:
        pytest.skip(f"local Slurm cluster unavailable: {reason}")


@pytest.fixture
def ray_tmpdir():
    """Node-local root for Ray's per-job directories: short (unix socket paths) and checked empty afterwards."""
    path = Path(tempfile.mkdtemp(prefix="t2i-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def run_job(cluster: LocalSlurm, tmp: Path, ray_tmp: Path, sbatch_args: list[str], script_args: list[str]):
    output = tmp / "job.out"
    env = {**job_env(), "T2I_RAY_TMPDIR": str(ray_tmp)}
    job_id = cluster.sbatch(f"--output={output}", *sbatch_args, str(TRAIN), *script_args, env=env, cwd=ROOT)
    info = cluster.wait_job(job_id, JOB_TIMEOUT_S)
    return info, output.read_text(errors="replace") if output.exists() else "(no job output)"


def assert_ray_stopped(ray_tmp: Path) -> None:
    """No process of the job's Ray nodes is left, and every node removed its temp directory."""
    left = [p.pid for p in psutil.process_iter(["cmdline"]) if str(ray_tmp) in " ".join(p.info["cmdline"] or [])]
    assert not left, f"Ray processes still running after the job: {left}"
    assert not list(ray_tmp.iterdir()), f"Ray temp directories left behind: {list(ray_tmp.iterdir())}"


@pytest.fixture(scope="module")
def one_node(tmp_path_factory):
    skip_unless_slurm()
    with LocalSlurm(tmp_path_factory.mktemp("slurm1"), num_nodes=1, cpus_per_node=2) as cluster:
        yield cluster


def test_gpu_count_and_ports_from_slurm_settings():
    def shell(snippet: str) -> str:
        out = subprocess.run(["bash", "-c", f"source {ROOT}/slurm/ray_cluster.sh; {snippet}"],
                             capture_output=True, text=True, check=True)  # fmt: skip
        return out.stdout.strip()

    assert shell("t2i_gpu_count ''") == "0"
    assert shell("t2i_gpu_count 4") == "4"
    assert shell("t2i_gpu_count a100:2") == "2"
    ports = shell(
        "for j in 41 42; do SLURM_JOB_ID=$j; t2i_assign_ports; echo $T2I_RAY_PORT_GCS $T2I_RAY_PORT_WORKER_MAX; done"
    )
    first, second = (tuple(map(int, line.split())) for line in ports.splitlines())
    assert first[1] < second[0], "consecutive jobs on one node must get disjoint port ranges"


def test_train_sbatch_on_one_node(one_node, mlflow_server, tmp_path, ray_tmpdir):
    experiment = f"slurm-1node-{uuid.uuid4().hex[:6]}"
    args = tiny_training_args(tmp_path, mlflow_server.uri, experiment)
    info, output = run_job(one_node, tmp_path, ray_tmpdir, ["--nodes=1", "--cpus-per-task=2"], args)
    assert info["JobState"] == "COMPLETED", output[-4000:]
    assert info["ExitCode"] == "0:0"
    assert "2 CPU(s) and 0 GPU(s) per node" in output
    assert_logged_training(mlflow_server, experiment)
    assert_ray_stopped(ray_tmpdir)


def test_train_sbatch_propagates_the_driver_exit_code(one_node, tmp_path, ray_tmpdir):
    bad_config = ["--config", "ldm-tiny", "run.max_stepz=2"]
    info, output = run_job(one_node, tmp_path, ray_tmpdir, ["--nodes=1", "--cpus-per-task=1"], bad_config)
    assert info["JobState"] == "FAILED", output[-4000:]
    assert info["ExitCode"] == "2:0", output[-4000:]
    assert "run.max_stepz" in output  # the driver's own message, not a launcher failure
    assert "driver exited with code 2; stopping Ray" in output
    assert_ray_stopped(ray_tmpdir)


def test_train_sbatch_across_two_nodes(tmp_path, mlflow_server, ray_tmpdir):
    skip_unless_slurm(netns=True)
    with LocalSlurm(tmp_path / "slurm", num_nodes=2, cpus_per_node=1, netns=True, subnet=TWO_NODE_SUBNET) as cluster:
        relay = TcpRelay(cluster.controller_address, ("127.0.0.1", mlflow_server.port))
        try:
            uri = f"http://{relay.address[0]}:{relay.address[1]}"
            experiment = f"slurm-2node-{uuid.uuid4().hex[:6]}"
            # One CPU per node and two one-CPU workers: Ray Train must place a worker on each node.
            args = tiny_training_args(tmp_path, uri, experiment)
            info, output = run_job(cluster, tmp_path, ray_tmpdir, ["--nodes=2", "--cpus-per-task=1"], args)
            assert_ray_stopped(ray_tmpdir)  # on both nodes, before the cluster's teardown would end them anyway
        finally:
            relay.close()
    assert info["JobState"] == "COMPLETED", output[-4000:]
    assert info["ExitCode"] == "0:0"
    assert f"Ray cluster up: 2 node(s) {TWO_NODE_SUBNET}.2 {TWO_NODE_SUBNET}.3" in output
    assert_logged_training(mlflow_server, experiment)
