"""DeepSpeed engines built from the config: ZeRO-3 partitions only the trained network, bf16 trains."""

from __future__ import annotations

import torch

from t2i_dist.models.registry import load_config
from tests.dist_utils import run_distributed


def _build(rank: int, world: int, overrides: list[str]):
    from t2i_dist.batch import Batch
    from t2i_dist.engine.build import build_training
    from t2i_dist.engine.precision import resolve_placement

    cfg = load_config("ldm-tiny", ["cluster.num_workers=2", "deepspeed.micro_batch_size=2", *overrides])
    built = build_training(cfg, resolve_placement(cfg), rank, world, with_loader=False)
    plugin, engines = built.plugin, built.engines
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
        "inference_shapes": {k: tuple(v.shape) for k, v in plugin.inference_state()["unet"].items()},
        "unpartitioned_shapes": _unpartitioned_unet_shapes(plugin),
    }


def _unpartitioned_unet_shapes(plugin) -> dict[str, tuple[int, ...]]:
    """The same UNet built outside DeepSpeed: what a complete gathered state must match."""
    from t2i_dist.models.ldm.plugin import build_unet

    unet = build_unet(plugin.m, plugin.latent_channels, plugin.latent_size, plugin.text_encoder.width)
    return {k: tuple(v.shape) for k, v in unet.state_dict().items()}


def test_zero3_partitions_only_the_unet():
    results = run_distributed(_zero3_layout, world=2)
    for r in results:
        assert r["all_unet_partitioned"]
        assert r["local_share"] < 0.6  # about half the UNet lives on each of the 2 ranks
        assert r["frozen_partitioned"] == 0 and r["frozen_full"]  # VAE and text encoder stay replicated
        assert r["losses_finite"]
        # gathered weights for sampling are complete: every key of the unpartitioned UNet, at full shape
        assert r["inference_shapes"] == r["unpartitioned_shapes"]


def _bf16(rank: int, world: int):
    results = {}
    for precision in ("bf16", "fp32"):
        plugin, engines, losses = _build(rank, world, ["deepspeed.zero_stage=2", f"deepspeed.precision={precision}"])
        moved = max(
            float((a.float() - b.to(a.dtype).float()).abs().max())  # init rounded as the engine holds it
            for a, b in zip(plugin.unet.parameters(), _initial_unet().parameters(), strict=True)
        )
        results[precision] = {
            "dtype": str(next(engines["unet"].module.parameters()).dtype),
            "losses": losses,
            "moved": moved,
        }
    return results


def _initial_unet():
    """The UNet's weights before any step: the builder seeds with run.seed before building the plug-in."""
    from t2i_dist.models.registry import build_plugin

    cfg = load_config("ldm-tiny")
    torch.manual_seed(cfg.run.seed)
    return build_plugin(cfg, torch.device("cpu")).unet


def test_bf16_zero2_trains_like_fp32():
    for r in run_distributed(_bf16, world=2):
        bf16, fp32 = r["bf16"], r["fp32"]
        assert bf16["dtype"] == "torch.bfloat16" and fp32["dtype"] == "torch.float32"
        assert bf16["moved"] > 0  # the optimizer updated the bf16 weights
        # same weights, batches and noise: bf16 rounding moves the losses by little
        assert torch.allclose(torch.tensor(bf16["losses"]), torch.tensor(fp32["losses"]), rtol=0.05), r


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
    write_checkpoint(
        d, engines, plugin, rank=rank, world_size=world, step=3, data_state={"rank": rank}, config={}, run_info={}
    )
    torch.distributed.barrier()
    verify_checkpoint(d)

    fresh, fresh_engines, _ = _build(rank, world, ["deepspeed.zero_stage=2", "run.seed=7"])
    state, data_state = restore_checkpoint(d, fresh_engines, fresh, rank=rank, world_size=world)
    return {
        "step": state["step"],
        "data_state": data_state,
        "ema_equal": all(torch.equal(a, b) for a, b in zip(ema_before, fresh.ema.shadow_params, strict=True)),
        "weights_equal": all(
            torch.equal(a, b.detach()) for a, b in zip(weights_before, fresh.unet.parameters(), strict=True)
        ),
        "global_steps": fresh_engines["unet"].engine.global_steps,
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
    return {
        "eager": eager_losses,
        "compiled": compiled_losses,
        "eager_keys": sorted(eager.inference_state()["unet"]),
        "compiled_keys": sorted(compiled.inference_state()["unet"]),
    }


def test_compiled_unet_trains_like_the_eager_one_and_saves_the_same_names():
    for r in run_distributed(_compiled_and_eager, world=1):  # one rank: the compile is the slow part
        # same weights, batches and noise: the compiled kernels change only the rounding
        assert torch.allclose(torch.tensor(r["compiled"]), torch.tensor(r["eager"]), rtol=1e-3, atol=1e-4), r
        assert r["compiled_keys"] == r["eager_keys"]  # checkpoints of compiled runs load anywhere
