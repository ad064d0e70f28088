"""GALIP end to end through the shared loop: 2 Ray workers, D and G DeepSpeed engines, a real mlflow server,
checkpoint resume of both engines, and the sampling CLI on the result."""

from __future__ import annotations

import math
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch
from PIL import Image

from t2i_dist.data.synthetic import write_synthetic_shards
from t2i_dist.train import main as train_main

pytestmark = pytest.mark.slow

TINY = [
    "model.clip.train_config=null",  # random frozen CLIP: no stage-0 training in this test
    "cluster.num_workers=2",
    "deepspeed.micro_batch_size=4",
    "data.loader_workers=0",
    "data.resolution=32",
    "data.synthesize.enabled=false",
    "tracking.samples_per_prompt=2",
    "run.max_failures=0",
    "run.name=galip-e2e",
    "run.log_every=2",
    "run.checkpoint_every=4",
    "run.sample_every=4",
]
GALIP_METRICS = ("loss", "loss_d", "loss_g", "ma_gp", "d_real", "d_fake", "d_mismatch", "img_per_s", "sample/diversity")


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("galip-shards")
    write_synthetic_shards(out, num_samples=64, samples_per_shard=32, image_size=32, seed=0)
    return out


def engine_steps(checkpoint: Path) -> dict[str, int]:
    """Optimizer steps each DeepSpeed engine had taken when it wrote this checkpoint."""
    return {
        name: torch.load(
            checkpoint / name / "state" / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False
        )["global_steps"]
        for name in ("discriminator", "generator")
    }


def latest_checkpoint(run_dir: Path) -> Path:
    return max((p for p in run_dir.glob("checkpoint_*") if p.is_dir()), key=lambda p: p.stat().st_mtime)


def test_galip_trains_resumes_and_samples(ray_cluster, mlflow_server, shards, workdir):
    experiment = f"galip-{uuid.uuid4().hex[:6]}"  # the mlflow server is shared by the whole session
    common = [*TINY, f"data.urls={shards}", f"tracking.uri={mlflow_server.uri}", f"tracking.experiment={experiment}"]
    assert train_main(["--config", "galip-tiny", *common, "run.max_steps=4"]) == 0

    client = mlflow_server.client()
    [run] = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    for key in GALIP_METRICS:
        values = [m.value for m in client.get_metric_history(run.info.run_id, key)]
        assert values and all(math.isfinite(v) for v in values), (key, values)
    for key in ("loss_d", "loss_g"):
        history = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert [s for s, _ in history] == [2, 4] and history[0][1] != history[1][1], (key, history)
    assert 0 < run.data.metrics["params/trainable"] < run.data.metrics["params/total"]
    assert "samples/step_000004.png" in {a.path for a in client.list_artifacts(run.info.run_id, "samples")}
    assert engine_steps(latest_checkpoint(Path("runs/galip-e2e"))) == {"discriminator": 4, "generator": 4}

    # the relaunch resumes both engines at step 4: their own step counters continue from there
    assert train_main(["--config", "galip-tiny", *common, "run.max_steps=6"]) == 0
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss_d"))
    assert steps == [2, 4, 6]
    latest = latest_checkpoint(Path("runs/galip-e2e"))
    assert engine_steps(latest) == {"discriminator": 6, "generator": 6}

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
            "--prompt",
            "a blue square",
            "--num-per-prompt",
            "2",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert Image.open(out).size == (70, 70)  # 2 x 2 images of 32 px with 2 px padding
