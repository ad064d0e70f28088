"""Families come from the registry: a family defined inside tests/ validates, trains through the real
(Ray-free) loop with DeepSpeed, checkpoints, resumes and samples, with no edit outside its own file."""

from __future__ import annotations

import pytest

from t2i_dist.config import ConfigError
from t2i_dist.models import registry
from tests import family_example
from tests.dist_utils import run_distributed

DENOISER = [
    "model={family: denoiser}",
    "data.resolution=16",
    "cluster.num_workers=1",
    "deepspeed.micro_batch_size=4",
    "data.loader_workers=0",
    "data.synthesize.enabled=false",
    "optim.lr=0.03",
    "optim.warmup_steps=20",  # the schedule these 6 steps were written for (ldm-tiny's own warms up over 50)
    "run.log_every=2",
    "run.sample_every=0",
    "tracking.samples_per_prompt=1",
]


@pytest.fixture
def denoiser_registered():
    registry.register(family_example.SPEC)
    yield
    registry.unregister("denoiser")


def test_an_unregistered_family_is_refused_with_the_known_names():
    known = "clip, galip, ldm, vae"
    with pytest.raises(ConfigError, match=rf"unknown model.family 'denoiser'; registered families: {known}"):
        registry.load_config("ldm-tiny", ["model={family: denoiser}"])


def test_a_registered_family_gets_its_own_schema_and_key_hints(denoiser_registered):
    cfg = registry.load_config("ldm-tiny", [*DENOISER, "model.width=4"])
    assert isinstance(cfg.model, family_example.DenoiserConfig) and cfg.model.width == 4
    with pytest.raises(ConfigError, match=r"unknown key 'model.widht' \(did you mean 'model.width'\?\)"):
        registry.load_config("ldm-tiny", [*DENOISER, "model.widht=4"])
    # the shipped families still validate next to it
    assert registry.load_config("galip-tiny").model.family == "galip"


def _train_resume_sample(rank: int, world: int, workdir: str, shards: str) -> dict:
    import torch

    from t2i_dist.engine.context import local_context
    from t2i_dist.engine.inference import load_plugin
    from t2i_dist.engine.loop import TrainLoop
    from t2i_dist.models import registry
    from tests import family_example

    registry.register(family_example.SPEC)  # a fresh process: the test registers its family itself
    common = [*DENOISER, f"data.urls={shards}", "run.checkpoint_every=3"]
    cfg = registry.load_config("ldm-tiny", [*common, "run.max_steps=6"])
    ctx = local_context(cfg, f"{workdir}/checkpoints")
    loop = TrainLoop(cfg, ctx)
    losses: list[float] = []
    loop.log_metrics = lambda metrics, step: losses.append(metrics["loss"]) if "loss" in metrics else None
    loop.run()
    first = [p.name for p in ctx.sink.checkpoints()]

    resumed_cfg = registry.load_config("ldm-tiny", [*common, "run.max_steps=8"])
    resumed = TrainLoop(resumed_cfg, local_context(resumed_cfg, f"{workdir}/checkpoints"))
    resumed.restore()
    resumed_at = resumed.step
    resumed.run()

    plugin = load_plugin(str(ctx.sink.checkpoints()[-1]), "cpu")
    images = plugin.sample(["a red circle", "a red circle"], [3, 3])
    other = plugin.sample(["a red circle"], [4])
    return {
        "losses": losses,
        "checkpoints": first,
        "resumed_at": resumed_at,
        "final_step": resumed.step,
        "shape": tuple(images.shape),
        "same_seed_same_image": bool(torch.equal(images[0], images[1])),
        "other_seed_differs": not torch.equal(images[0], other[0]),
        "family": type(plugin).__name__,
    }


def test_a_family_from_tests_trains_checkpoints_resumes_and_samples(tmp_path):
    from t2i_dist.data.synthetic import write_synthetic_shards

    shards = tmp_path / "shards"
    write_synthetic_shards(shards, num_samples=64, samples_per_shard=32, image_size=16, seed=0)
    [r] = run_distributed(_train_resume_sample, world=1, args=(str(tmp_path), str(shards)))
    assert r["family"] == "DenoiserPlugin"
    assert len(r["losses"]) == 3 and r["losses"][-1] < 0.7 * r["losses"][0], r["losses"]  # it learns
    assert r["checkpoints"] == ["checkpoint_000003", "checkpoint_000006"]
    assert r["resumed_at"] == 6 and r["final_step"] == 8
    assert r["shape"] == (2, 3, 16, 16)
    assert r["same_seed_same_image"] and r["other_seed_differs"]
