"""End to end on a real local Ray cluster: 2 workers, real DeepSpeed engines, a real mlflow server."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from PIL import Image

from t2i_dist.data.synthetic import write_synthetic_shards
from t2i_dist.train import main as train_main

pytestmark = pytest.mark.slow

TINY = [
    "model.vae.train_config=null",  # random frozen parts: no stage-0 training in this test
    "model.text.train_config=null",
    "cluster.num_workers=2",
    "deepspeed.micro_batch_size=8",
    "data.loader_workers=0",
    "data.resolution=32",
    "data.synthesize.enabled=false",
    "tracking.samples_per_prompt=1",
    "model.sampling.steps=4",
    "run.max_failures=0",
    "optim.warmup_steps=0",
    "optim.lr=0.002",
]


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("shards")
    write_synthetic_shards(out, num_samples=256, samples_per_shard=64, image_size=32, seed=0)
    return out


def metric_steps(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def test_train_resume_and_sample(ray_cluster, mlflow_server, shards, workdir):
    experiment = f"e2e-{uuid.uuid4().hex[:6]}"  # the mlflow server is shared by the whole session
    common = [
        *TINY,
        f"data.urls={shards}",
        f"tracking.uri={mlflow_server.uri}",
        f"tracking.experiment={experiment}",
        "run.name=e2e",
        "run.log_every=5",
        "run.checkpoint_every=20",
        "run.sample_every=20",
    ]
    assert train_main(["--config", "ldm-tiny", *common, "run.max_steps=40"]) == 0

    client = mlflow_server.client()
    exp = client.get_experiment_by_name(experiment)
    [run] = client.search_runs([exp.experiment_id])
    losses = metric_steps(client, run.info.run_id, "loss")
    assert [s for s, _ in losses] == list(range(5, 41, 5))
    assert losses[-1][1] < 0.8 * losses[0][1], f"loss did not go down: {losses}"
    assert run.data.params["deepspeed.zero_stage"] == "2"
    assert "img_per_s" in run.data.metrics and "data_wait_fraction" in run.data.metrics
    assert run.data.metrics["params/trainable"] < run.data.metrics["params/total"]
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert {"samples/step_000020.png", "samples/step_000040.png"} <= artifacts
    checkpoints = sorted(p for p in Path("runs/e2e").glob("checkpoint_*") if p.is_dir())
    assert len(checkpoints) == 2

    # --resume starts a new run (own name, own MLflow run) from an explicit checkpoint, at its step; a relaunch
    # of the same run resuming its own MLflow run is test_faults' preemption relaunch
    latest = max(checkpoints, key=lambda p: json.loads((p / "trainer_state.json").read_text())["step"])
    assert json.loads((latest / "trainer_state.json").read_text())["step"] == 40
    fork = [*common[:-4], "run.name=e2e-fork", "run.log_every=5", "run.checkpoint_every=20", "run.sample_every=0"]
    assert train_main(["--config", "ldm-tiny", *fork, "run.max_steps=45", "--resume", str(latest)]) == 0
    forked = [r for r in client.search_runs([exp.experiment_id]) if r.info.run_id != run.info.run_id]
    assert [s for s, _ in metric_steps(client, forked[0].info.run_id, "loss")] == [45]
    out = workdir / "grid.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "t2i_dist.sample",
            "--checkpoint",
            str(latest),
            "--prompt",
            "a red circle",
            "--steps",
            "5",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (32, 32)


def test_zero3_streams_shards_and_checkpoints_on_s3(ray_cluster, s3_env, shards, workdir, capsys):
    """Shards streamed from a real S3 server through s3fs, checkpoints written back to it, ZeRO-3."""
    s3_env.create_bucket("t2i-runs")
    url = s3_env.upload_dir(shards, "t2i-data", "synthetic")
    overrides = [
        *TINY,
        f"data.urls={url}/",
        "cluster.storage_path=s3://t2i-runs/runs",
        "run.name=s3z3",
        "deepspeed.zero_stage=3",
        "run.max_steps=6",
        "run.log_every=3",
        "run.checkpoint_every=6",
        "run.sample_every=0",
    ]
    assert train_main(["--config", "ldm-tiny", *overrides]) == 0
    out = capsys.readouterr().out
    assert "last checkpoint: s3://t2i-runs/runs/s3z3/checkpoint_" in out

    keys = [o["Key"] for o in s3_env.client().list_objects_v2(Bucket="t2i-runs")["Contents"]]
    ckpt = sorted({k.split("/")[2] for k in keys if k.startswith("runs/s3z3/checkpoint_") and k.count("/") > 2})
    assert len(ckpt) == 1
    files = {k.split(f"{ckpt[0]}/", 1)[1] for k in keys if ckpt[0] in k}
    # both ranks' ZeRO-3 shards and manifests were merged into the one checkpoint
    assert {"manifest/rank0.json", "manifest/rank1.json", "inference.pt", "config.json"} <= files
    assert sum("zero_pp_rank_" in f for f in files) >= 2

    grid = workdir / "s3.png"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "t2i_dist.sample",
            "--checkpoint",
            f"s3://t2i-runs/runs/s3z3/{ckpt[0]}",
            "--prompt",
            "a red circle",
            "--prompt",
            "a blue square",
            "--steps",
            "3",
            "--out",
            str(grid),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert Image.open(grid).size == (2 * 32 + 3 * 2, 32 + 2 * 2)  # 2 images side by side, 2px padding
