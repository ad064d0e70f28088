"""Stage 0: a config whose frozen VAE and text encoder name a `train_config` gets them trained first (each a
run of its own, through the real loop), exported, loaded as `pretrained`, and reused while unchanged."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

from t2i_dist.config import ConfigError
from tests.dist_utils import run_distributed

STEPS = 6


def _train_in_process(rank: int, world: int, cfg_dict: dict, root: str) -> tuple[str, dict]:
    """One real run of the loop without Ray (rank 0 of a one-process group): its last checkpoint."""
    from t2i_dist.engine.context import local_context
    from t2i_dist.engine.loop import TrainLoop
    from t2i_dist.models.registry import validate_config

    cfg = validate_config(cfg_dict)
    ctx = local_context(cfg, root)
    loop = TrainLoop(cfg, ctx)
    loop.run()
    return str(ctx.sink.checkpoints()[-1]), dict(loop.last_metrics)


def in_process_trainer(workdir: Path, calls: list[str]):
    from t2i_dist.launch import TrainResult

    def train(cfg):
        calls.append(cfg.run.name)
        root = workdir / "runs" / cfg.run.name
        [(checkpoint, metrics)] = run_distributed(_train_in_process, world=1, args=(cfg.to_dict(), str(root)))
        return TrainResult(checkpoint, str(root), {}, 1.0, metrics)

    return train


def component_yaml(path: Path, base: str, shards: Path, holdout: Path, **model) -> str:
    path.write_text(
        yaml.safe_dump(
            {
                "base": base,
                "run": {"max_steps": STEPS, "sample_every": 0, "checkpoint_every": STEPS, "name": path.stem},
                "cluster": {"num_workers": 1, "storage_path": str(path.parent / "runs")},
                "data": {"urls": str(shards), "synthesize": {"enabled": False}, "loader_workers": 0},
                "deepspeed": {"micro_batch_size": 8},
                "eval": {"captions": str(holdout), "num_samples": 16},
                **({"model": model} if model else {}),
            }
        )
    )
    return str(path)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> tuple[Path, Path]:
    from t2i_dist.data.synthetic import write_synthetic_shards

    root = tmp_path_factory.mktemp("components")
    write_synthetic_shards(root / "train", num_samples=64, samples_per_shard=32, image_size=32, seed=0)
    write_synthetic_shards(root / "holdout", num_samples=16, samples_per_shard=16, image_size=32, seed=1)
    return root / "train", root / "holdout"


def test_components_are_trained_once_loaded_as_pretrained_and_a_changed_config_is_refused(tmp_path, data):
    from t2i_dist.components import resolve_components
    from t2i_dist.models.registry import build_plugin, load_config

    shards, holdout = data
    vae_cfg = component_yaml(tmp_path / "vae-small.yaml", "vae-tiny", shards, holdout)
    clip_cfg = component_yaml(tmp_path / "clip-small.yaml", "clip-tiny", shards, holdout)
    ldm = load_config(
        "ldm-tiny",
        [f"model.vae.train_config={vae_cfg}", f"model.text.train_config={clip_cfg}", f"data.urls={shards}"],
    )
    calls: list[str] = []
    resolved = resolve_components(ldm, in_process_trainer(tmp_path, calls))
    assert calls == ["vae-small", "clip-small"]
    vae_export = tmp_path / "runs" / "vae-small" / "export"
    assert resolved.model.vae.pretrained == str(vae_export) and resolved.model.vae.train_config is None
    assert resolved.model.text.pretrained == str(tmp_path / "runs" / "clip-small" / "export" / "open_clip_model.pt")

    # the LDM is built on the trained parts: weights as exported, latents scaled by the measured factor
    torch.manual_seed(0)
    plugin = build_plugin(resolved, torch.device("cpu"))
    record = yaml.safe_load((vae_export / "component.json").read_text())
    assert plugin.latent_scale == pytest.approx(record["metrics"]["held_out/scaling_factor"])
    random_ldm = build_plugin(load_config("ldm-tiny", ["model.vae.train_config=null"]), torch.device("cpu"))
    assert not torch.equal(next(plugin.vae.parameters()), next(random_ldm.vae.parameters()))

    # unchanged: reused without training
    again = resolve_components(ldm, in_process_trainer(tmp_path, calls))
    assert calls == ["vae-small", "clip-small"] and again.model.vae.pretrained == resolved.model.vae.pretrained

    # changed: refused before anything trains, naming the run directory and the fix
    component_yaml(tmp_path / "vae-small.yaml", "vae-tiny", shards, holdout, kl_weight=1e-3)
    with pytest.raises(ConfigError, match=r"vae-small run trained from another version.*another run.name"):
        resolve_components(ldm, in_process_trainer(tmp_path, calls))
    assert calls == ["vae-small", "clip-small"]


def test_a_component_config_of_the_wrong_family_is_refused_early(tmp_path, data):
    from t2i_dist.components import resolve_components
    from t2i_dist.models.registry import load_config

    shards, holdout = data
    clip_cfg = component_yaml(tmp_path / "clip-small.yaml", "clip-tiny", shards, holdout)
    ldm = load_config("ldm-tiny", [f"model.vae.train_config={clip_cfg}", "model.text.train_config=null"])
    with pytest.raises(ConfigError, match=r"model.vae.train_config=.* is a clip config; model.vae needs a vae one"):
        resolve_components(ldm, in_process_trainer(tmp_path, []))
