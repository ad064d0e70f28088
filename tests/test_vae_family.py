"""The `vae` family: ZeRO-3 training with every optional term through the real (Ray-free) loop, resume; and
vae-tiny end to end on Ray + DeepSpeed + MLflow, exported as a diffusers directory latent diffusion loads."""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import pytest
import torch

from tests.dist_utils import run_distributed

ZERO3 = [
    "cluster.num_workers=2",
    "deepspeed.zero_stage=3",
    "deepspeed.micro_batch_size=4",
    "data.loader_workers=0",
    "data.resolution=16",
    "data.synthesize.image_size=16",
    "data.synthesize.num_samples=32",
    "data.synthesize.samples_per_shard=16",
    "data.synthesize.holdout_samples=8",
    "eval.num_samples=8",
    "run.log_every=1",
    "run.checkpoint_every=3",
    "run.sample_every=0",
    "optim.warmup_steps=0",
    "model.perceptual_weight=0.1",
    "model.adversarial_weight=0.1",
    "model.adversarial_start=2",
    "model.ema_decay=0.9",
]


def _zero3_run(rank: int, world: int, overrides: list[str], root: str) -> dict:
    from t2i_dist.engine.context import local_context
    from t2i_dist.engine.loop import TrainLoop
    from t2i_dist.models.registry import load_config

    out: dict = {"logged": []}
    for max_steps in (3, 5):  # the second launch resumes from the step-3 checkpoint
        cfg = load_config("vae-tiny", [*overrides, f"run.max_steps={max_steps}"])
        loop = TrainLoop(cfg, local_context(cfg, root))
        loop.log_metrics = lambda m, step: out["logged"].append((step, dict(m)))
        if max_steps == 5:
            loop.restore()
            out["resumed_at"], out["restored_std"] = loop.step, loop.plugin.latent_std
        loop.run()
        out["partitioned"] = loop.plugin.engines["vae"].partitioned
    out["final_step"] = loop.step
    return out


def test_zero3_with_perceptual_adversarial_and_ema_trains_and_resumes(tmp_path):
    from t2i_dist.config import ConfigError
    from t2i_dist.data.shards import preflight
    from t2i_dist.models.registry import load_config

    with pytest.raises(ConfigError, match="perceptual_weights"):
        load_config("vae-tiny", ["model.perceptual_weight=0.1"])
    from torchvision.models.vgg import cfgs, make_layers

    vgg = tmp_path / "vgg16.pth"  # random weights in torchvision's layout ("features.N.*")
    torch.save({f"features.{k}": v for k, v in make_layers(cfgs["D"]).state_dict().items()}, vgg)
    overrides = [*ZERO3, f"data.urls={tmp_path / 'shards'}", f"model.perceptual_weights={vgg}"]
    preflight(load_config("vae-tiny", overrides).data)  # writes the shards and the held-out set
    [r0, r1] = run_distributed(_zero3_run, world=2, args=(overrides, str(tmp_path / "run")))
    assert r0["partitioned"] and r0["resumed_at"] == 3 and r0["final_step"] == 5
    steps = {}
    for step, metrics in r0["logged"]:
        steps.setdefault(step, {}).update(metrics)
    assert sorted(s for s, m in r0["logged"] if "loss" in m) == [1, 2, 3, 4, 5]
    for step in range(1, 6):
        m = steps[step]
        assert all(math.isfinite(m[k]) for k in ("loss", "loss_rec", "loss_kl", "loss_perceptual")), m
        assert ("loss_d" in m) == ("loss_g" in m) == (step >= 2), m  # the adversarial term from step 2 on
    held_out = sorted(s for s, m in r0["logged"] if "held_out/psnr" in m)
    assert held_out == [0, 3, 5]  # before training and at the end of each launch
    # the latent std measured at the checkpoint's step survives the resume: it sets the exported scaling factor
    assert r0["restored_std"] == pytest.approx(steps[3]["held_out/latent_std"])
    assert steps[0]["held_out/scaling_factor"] == pytest.approx(1 / steps[0]["held_out/latent_std"])
    assert r1["restored_std"] == r0["restored_std"]


E2E = [
    "cluster.num_workers=2",
    "deepspeed.micro_batch_size=8",
    "data.loader_workers=0",
    "data.synthesize.num_samples=256",
    "data.synthesize.samples_per_shard=128",
    "data.synthesize.holdout_samples=16",
    "eval.num_samples=16",
    "optim.warmup_steps=5",
    "run.max_failures=0",
    "run.name=vae-e2e",
    "run.log_every=10",
    "run.sample_every=15",
    "run.checkpoint_every=30",
    "run.max_steps=30",
]


@pytest.mark.slow
def test_vae_tiny_trains_on_ray_and_exports_what_latent_diffusion_loads(ray_cluster, mlflow_server, workdir):
    from safetensors.torch import load_file

    from t2i_dist.engine.checkpoint import load_for_inference
    from t2i_dist.export import main as export_main
    from t2i_dist.models.registry import build_plugin, load_config
    from t2i_dist.train import main as train_main

    experiment = f"vae-{uuid.uuid4().hex[:6]}"  # the mlflow server is shared by the whole session
    tracking = [f"tracking.uri={mlflow_server.uri}", f"tracking.experiment={experiment}"]
    assert train_main(["--config", "vae-tiny", *E2E, *tracking]) == 0  # synthesizes data/synthetic{,-holdout}

    run, history = mlflow_server.only_run_histories(
        experiment, ("held_out/psnr", "held_out/latent_std", "loss_rec", "loss_kl")
    )
    client = mlflow_server.client()
    psnr = history["held_out/psnr"]
    assert [s for s, _ in psnr] == [0, 15, 30] and psnr[-1][1] > psnr[0][1] + 3, psnr  # dB
    assert [s for s, _ in history["loss_rec"]] == [10, 20, 30]
    assert {a.path for a in client.list_artifacts(run.info.run_id, "held_out")} >= {"held_out/step_000030.png"}

    checkpoint = max(
        (p for p in Path("runs/vae-e2e").glob("checkpoint_*") if p.is_dir()), key=lambda p: p.stat().st_mtime
    )
    _, state = load_for_inference(str(checkpoint))
    measured = 1 / history["held_out/latent_std"][-1][1]
    assert state["scaling_factor"] == pytest.approx(measured, rel=1e-6)
    assert export_main(["--checkpoint", str(checkpoint), "--out", "exported/vae"]) == 0
    exported = load_file("exported/vae/diffusion_pytorch_model.safetensors")
    assert exported.keys() == state["vae"].keys()

    # any LDM config points at the directory: the weights and the scaling factor come from there
    ldm = build_plugin(load_config("ldm-tiny", ["model.vae.pretrained=exported/vae"]), torch.device("cpu"))
    assert ldm.latent_scale == pytest.approx(measured, rel=1e-6)
    assert ldm.latent_size == 8  # 32 px, factor 4
    loaded = ldm.vae.state_dict()
    assert all(torch.equal(loaded[k], v) and torch.equal(exported[k], v) for k, v in state["vae"].items())
