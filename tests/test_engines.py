"""DeepSpeed engines built from the config: ZeRO-3 partitions only the trained network, bf16 trains."""

from __future__ import annotations

import torch

from t2i_dist.config import load_config
from tests.dist_utils import run_distributed


def _build(rank: int, world: int, overrides: list[str]):
    from t2i_dist.engine.engines import build_engines
    from t2i_dist.engine.precision import resolve_placement
    from t2i_dist.models.base import Batch
    from t2i_dist.models.ldm import LDMPlugin

    cfg = load_config("ldm-tiny", ["cluster.num_workers=2", "deepspeed.micro_batch_size=2", *overrides])
    placement = resolve_placement(cfg)
    torch.manual_seed(0)
    plugin = LDMPlugin(cfg, placement.device, placement.dtype)
    engines = build_engines(cfg, placement, plugin.trainables())
    plugin.attach_engines(engines)
    torch.manual_seed(rank)
    batch = Batch(captions=["a red circle", "a blue square"], images=torch.rand(2, 3, 32, 32) * 2 - 1)
    losses = [float(plugin.train_step(batch, s)["loss"]) for s in range(3)]
    return plugin, engines, losses


def _zero3_layout(rank: int, world: int):
    plugin, engines, losses = _build(rank, world, ["deepspeed.zero_stage=3"])
    unet_params = list(plugin.unet.parameters())
    partitioned = [p for p in unet_params if hasattr(p, "ds_id")]
    local_unet = sum(p.ds_tensor.numel() for p in partitioned)
    full_unet = sum(p.ds_numel for p in partitioned)
    frozen = list(plugin.vae.parameters()) + list(plugin.text_encoder.parameters())
    return {
        "all_unet_partitioned": len(partitioned) == len(unet_params),
        "local_share": local_unet / full_unet,
        "frozen_partitioned": sum(hasattr(p, "ds_id") for p in frozen),
        "frozen_full": all(p.numel() > 0 for p in frozen),
        "losses_finite": all(torch.isfinite(torch.tensor(losses))),
        "inference_keys": len(plugin.inference_state()["unet"]),
    }


def test_zero3_partitions_only_the_unet():
    results = run_distributed(_zero3_layout, world=2)
    for r in results:
        assert r["all_unet_partitioned"]
        assert r["local_share"] < 0.6  # about half the UNet lives on each of the 2 ranks
        assert r["frozen_partitioned"] == 0 and r["frozen_full"]  # VAE and text encoder stay replicated
        assert r["losses_finite"]
        assert r["inference_keys"] > 0  # gathered weights for sampling are complete


def _bf16(rank: int, world: int):
    plugin, engines, losses = _build(rank, world, ["deepspeed.zero_stage=2", "deepspeed.precision=bf16"])
    return {"dtype": str(next(engines["unet"].module.parameters()).dtype), "losses": losses}


def test_bf16_zero2_trains():
    for r in run_distributed(_bf16, world=2):
        assert r["dtype"] == "torch.bfloat16"
        assert all(torch.isfinite(torch.tensor(r["losses"])))


def _save_and_restore(rank: int, world: int, directory: str):
    from pathlib import Path

    from t2i_dist.engine.checkpoint import restore_checkpoint, verify_checkpoint, write_checkpoint

    plugin, engines, _ = _build(rank, world, ["deepspeed.zero_stage=2"])
    plugin.after_optimizer_step(3)
    ema_before = [p.clone() for p in plugin.ema.shadow_params]
    torch.randn(3, generator=plugin.generator)  # this rank's noise stream has moved on from its seed
    generator_before = plugin.generator.get_state()
    weights_before = [p.detach().clone() for p in plugin.unet.parameters()]
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)  # a shared directory stands in for Ray's merged checkpoint here
    write_checkpoint(d, engines, plugin, rank=rank, world_size=world, step=3, data_state={"rank": rank},
                     config={}, run_info={})
    torch.distributed.barrier()
    verify_checkpoint(d)

    fresh, fresh_engines, _ = _build(rank, world, ["deepspeed.zero_stage=2", "run.seed=7"])
    state, data_state = restore_checkpoint(d, fresh_engines, fresh, rank=rank, world_size=world)
    return {
        "step": state["step"],
        "data_state": data_state,
        "ema_equal": all(torch.equal(a, b) for a, b in zip(ema_before, fresh.ema.shadow_params, strict=True)),
        "weights_equal": all(torch.equal(a, b.detach()) for a, b in
                             zip(weights_before, fresh.unet.parameters(), strict=True)),
        "global_steps": fresh_engines["unet"].global_steps,
        "generator_equal": torch.equal(generator_before, fresh.generator.get_state()),
    }


def test_checkpoint_restores_step_weights_ema_and_data_position(tmp_path):
    results = run_distributed(_save_and_restore, world=2, args=(str(tmp_path / "ckpt"),))
    for rank, r in enumerate(results):
        assert r["step"] == 3 and r["global_steps"] == 3
        assert r["data_state"] == {"rank": rank}
        assert r["ema_equal"] and r["weights_equal"]
        assert r["generator_equal"]  # each rank gets its own noise stream back, not rank 0's


def test_truncated_checkpoint_is_refused(tmp_path):
    import json

    import pytest

    from t2i_dist.engine.checkpoint import CheckpointError, verify_checkpoint

    d = tmp_path / "ckpt"
    (d / "manifest").mkdir(parents=True)
    (d / "weights.bin").write_bytes(b"x" * 100)
    (d / "trainer_state.json").write_text(json.dumps({"step": 1, "world_size": 2}))
    (d / "manifest" / "rank0.json").write_text(json.dumps({"files": {"weights.bin": {"size": 100, "sha256": "0"}}}))
    with pytest.raises(CheckpointError, match="rank 1 is missing"):
        verify_checkpoint(d)
    (d / "manifest" / "rank1.json").write_text(json.dumps({"files": {}}))
    with pytest.raises(CheckpointError, match="checksum"):
        verify_checkpoint(d)
    (d / "weights.bin").write_bytes(b"x" * 50)
    with pytest.raises(CheckpointError, match="truncated"):
        verify_checkpoint(d)


def _compiled_and_eager(rank: int, world: int):
    common = ["cluster.num_workers=1", "deepspeed.zero_stage=2", "deepspeed.gradient_checkpointing=false"]
    eager, _, eager_losses = _build(rank, world, common)
    compiled, _, compiled_losses = _build(rank, world, [*common, "deepspeed.compile=true"])
    return {"eager": eager_losses, "compiled": compiled_losses,
            "eager_keys": sorted(eager.inference_state()["unet"]),
            "compiled_keys": sorted(compiled.inference_state()["unet"])}


def test_compiled_unet_trains_like_the_eager_one_and_saves_the_same_names():
    for r in run_distributed(_compiled_and_eager, world=1):  # one rank: the compile is the slow part
        # same weights, batches and noise: the compiled kernels change only the rounding
        assert torch.allclose(torch.tensor(r["compiled"]), torch.tensor(r["eager"]), rtol=1e-3, atol=1e-4), r
        assert r["compiled_keys"] == r["eager_keys"]  # checkpoints of compiled runs load anywhere
