"""The README's main command, as a newcomer runs it: `python -m t2i_dist.train` with no Ray address and no
MLflow URI, so the driver starts its own local Ray (every port on loopback), logs to the sqlite store under
./mlruns, evaluates inside the loop and prints its summary. A shortened default config keeps it short."""

from __future__ import annotations

import ipaddress
import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from t2i_dist.processes import stop_process_group

pytestmark = pytest.mark.slow

SHORT_DEFAULT = [
    "model.vae.train_config=null",  # random frozen parts: no stage-0 training in this test
    "model.text.train_config=null",
    "run.max_steps=4",
    "run.log_every=2",
    "run.sample_every=4",
    "run.checkpoint_every=4",
    "eval.every=4",
    "eval.num_samples=8",
    "data.synthesize.num_samples=64",
    "data.synthesize.samples_per_shard=32",
    "deepspeed.micro_batch_size=4",
    "model.sampling.steps=2",
    "tracking.samples_per_prompt=1",
]


# the training workers and their DataLoader reader processes (forked, holding the same sockets); Ray titles a
# worker actor's process after the method it runs, e.g. ray::execute._setup_torch_process_group (Ray Train's
# RayTrainWorker.execute) while torch's store starts
TRAINING_PROCESSES = ("ray::RayTrainWorker", "ray::execute.", "pt_data_worker")


def listeners(root: psutil.Process) -> set[tuple[str, str, int]]:
    """(process, address, port) of every listening socket of `root` and the processes under it: the driver
    and its Ray (GCS, raylet, dashboard and its agents, workers)."""
    found: set[tuple[str, str, int]] = set()
    try:
        children = root.children(recursive=True)
    except psutil.NoSuchProcess:
        return found
    for proc in [root, *children]:
        try:
            cmdline = proc.cmdline()
            name = "dashboard.py" if any("dashboard.py" in part for part in cmdline) else proc.name()
            found |= {
                (name, c.laddr.ip, c.laddr.port)
                for c in proc.net_connections(kind="inet")
                if c.status == psutil.CONN_LISTEN
            }
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def is_loopback(address: str) -> bool:
    ip = ipaddress.ip_address(address)
    mapped = getattr(ip, "ipv4_mapped", None)  # ::ffff:127.0.0.1, from a dual-stack socket
    return (mapped or ip).is_loopback


def test_main_command_starts_its_own_ray_on_loopback_and_tracks_to_sqlite(tmp_path, alignment_probe):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "MLFLOW_TRACKING_URI"))}
    env["T2I_LOG_LEVEL"] = "WARNING"
    # 64 synthetic samples are too few to train a trustworthy alignment classifier: the session's one
    overrides = [*SHORT_DEFAULT, f"eval.alignment_classifier={alignment_probe}"]
    proc = subprocess.Popen(
        [sys.executable, "-m", "t2i_dist.train", "--config", "ldm-tiny", *overrides],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen: set[tuple[str, str, int]] = set()
    deadline = time.monotonic() + 600
    try:
        while proc.poll() is None and time.monotonic() < deadline:
            seen |= listeners(psutil.Process(proc.pid))
            time.sleep(1)
        output, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        stop_process_group(proc)
    assert proc.returncode == 0, output[-4000:]

    assert {n for n, _, _ in seen} >= {"dashboard.py", "gcs_server", "raylet"}, sorted(seen)
    # the dashboard's HTTP server and its metrics server (which Ray binds to every interface unless the
    # node's IP is loopback), the agents', the GCS's and the workers' ports: none beyond loopback, but for
    # one: the training process group's store (torch.distributed's TCPStore, served by rank 0 and inherited
    # by its loader processes), which torch binds to every interface with no option to narrow it
    wide = sorted(a for a in seen if not is_loopback(a[1]))
    store = {port for name, _, port in wide if name.startswith(TRAINING_PROCESSES)}
    assert len(store) <= 1, f"more than the process group's store listens beyond loopback: {wide}"
    others = [a for a in wide if not a[0].startswith(TRAINING_PROCESSES)]
    assert not others, f"the driver's Ray listens beyond loopback: {others}"

    store = tmp_path / "mlruns" / "mlflow.db"
    assert store.is_file(), output[-2000:]
    uri = f"sqlite:///{store}"
    assert f"open the UI with: mlflow ui --backend-store-uri {uri} --host 127.0.0.1" in output
    assert "sample with: python -m t2i_dist.sample --checkpoint" in output
    assert "step 4/4" in output and "img/s" in output and "ETA" in output

    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    [run] = client.search_runs([client.get_experiment_by_name("t2i_dist").experiment_id])
    metrics = run.data.metrics
    assert {"loss", "img_per_s", "eval/fid", "eval/real/alignment"} <= set(metrics), sorted(metrics)
    assert metrics["eval/num_samples"] == 8  # the in-loop evaluation ran over all its captions
    assert sorted(Path(tmp_path, "runs", "ldm-tiny").glob("checkpoint_*"))
