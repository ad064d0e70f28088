"""GPU-path bugs, caught on a CPU-only machine.

Device placement: the plug-ins run with the 'meta' device as their placement device, a device that differs from
the CPU where networks are built and where checkpoints are loaded from; every tensor a plug-in keeps (modules,
EMA shadows, the sampling UNet, the null-text cache) must be on it after set-up, restore and inference load.
(diffusers' EMA update uses _foreach_* ops, which do not check devices, so a direct check is the only one that
sees a shadow left behind.) The rest runs the real code paths: DeepSpeed engines on gloo, the ViT wrapper, the
Ray adapter with Ray Train's device mocked, config validation, the preemption poll, the loop's metric sums,
JPEG decoding and the evaluation CLI's device defaults.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import itertools
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

from t2i_dist.config import ConfigError
from t2i_dist.models.registry import build_plugin, load_config
from tests.dist_utils import run_distributed

OFFLINE = ["data.synthesize.enabled=false", "data.loader_workers=0"]
META = torch.device("meta")
CPU = torch.device("cpu")


class PlainEngine:
    """What a plug-in uses of its engine (models.base.TrainedEngine), without DeepSpeed; counts gathers."""

    partitioned = False

    def __init__(self, module: nn.Module):
        self.module = module
        self.gathers = 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)

    def backward_and_step(self, loss: torch.Tensor) -> bool:
        return True

    def gathered(self) -> contextlib.AbstractContextManager[None]:
        self.gathers += 1
        return contextlib.nullcontext()


def kept_tensors(plugin: Any) -> dict[str, torch.Tensor]:
    """Every tensor the plug-in holds: modules' parameters and buffers, EMA shadows, cached tensors."""
    from diffusers.training_utils import EMAModel

    out: dict[str, torch.Tensor] = {}
    for name, value in vars(plugin).items():
        if isinstance(value, nn.Module):
            for key, t in itertools.chain(value.named_parameters(), value.named_buffers()):
                out[f"{name}.{key}"] = t
        elif isinstance(value, EMAModel):
            out.update({f"{name}.shadow_params[{i}]": t for i, t in enumerate(value.shadow_params)})
        elif isinstance(value, torch.Tensor):
            out[name] = value
        elif isinstance(value, dict):
            out.update({f"{name}[{k}]": t for k, t in value.items() if isinstance(t, torch.Tensor)})
    return out


def assert_on(plugin: Any, device: torch.device, when: str) -> None:
    wrong = sorted(f"{k} ({t.device})" for k, t in kept_tensors(plugin).items() if t.device.type != device.type)
    assert not wrong, f"after {when}, {len(wrong)} tensors are not on {device}: {wrong[:5]}"


def ldm_states() -> tuple[Any, dict[str, Any], dict[str, Any]]:
    """An ldm-tiny config and, from a plug-in on the CPU, its resume state and its inference state (as a
    checkpoint on any machine gives them: CPU tensors)."""
    cfg = load_config("ldm-tiny", OFFLINE)
    torch.manual_seed(0)
    source = build_plugin(cfg, CPU)
    source.attach_engines({"unet": PlainEngine(source.unet)})
    source.after_optimizer_step(1)
    return cfg, source.state_dict(), source.inference_state()


# ------------------------------------------------------------------------------- 1. LDM EMA on the device


def test_ldm_ema_and_networks_stay_on_the_placement_device_through_setup_steps_and_restore():
    cfg, resume, _ = ldm_states()
    plugin = build_plugin(cfg, META)
    plugin.null_text()
    assert_on(plugin, META, "set-up")
    plugin.attach_engines({"unet": PlainEngine(plugin.unet)})
    plugin.after_optimizer_step(1)
    plugin.load_state_dict(resume)  # EMA shadows come back as CPU tensors from the checkpoint
    assert all(p.dtype == torch.float32 for p in plugin.ema.shadow_params)
    plugin.after_optimizer_step(2)
    plugin.sampling_unet()  # the training-time sampling copy of the EMA weights
    assert_on(plugin, META, "restore, EMA steps and a sample grid's UNet")


# --------------------------------------------------------------------- 2. inference load onto the device


@pytest.mark.filterwarnings("ignore:for .*copying from a non-meta parameter")  # meta tensors hold no values
def test_ldm_loaded_for_inference_samples_on_the_requested_device(monkeypatch):
    from t2i_dist.engine import inference

    cfg, _, state = ldm_states()
    monkeypatch.setattr(inference, "load_for_inference", lambda checkpoint: (cfg.to_dict(), state))
    plugin = inference.load_plugin("a-checkpoint", "meta")
    unet = plugin.sampling_unet()
    assert next(unet.parameters()).device == META
    plugin.null_text()
    assert_on(plugin, META, "load_plugin (sample, evaluate, report)")


# ------------------------------------------------------- 3. a dropped micro-batch keeps accumulation in step


def _accumulation(rank: int, world: int, stage: int, accum: int) -> dict[str, Any]:
    import logging

    from t2i_dist.engine.engines import build_engine
    from t2i_dist.engine.precision import resolve_placement
    from t2i_dist.engine.zero import gathered
    from t2i_dist.models.base import Trainable

    logging.getLogger("DeepSpeed").setLevel(logging.ERROR)
    cfg = load_config(
        "ldm-tiny",
        [
            *OFFLINE,
            f"cluster.num_workers={world}",
            "deepspeed.micro_batch_size=2",
            f"deepspeed.grad_accum_steps={accum}",
            f"deepspeed.zero_stage={stage}",
        ],
    )
    torch.manual_seed(0)
    # 262k parameters: ZeRO-3 keeps tensors below 262 elements resident (norms, biases), partitions the weight
    module = nn.Sequential(nn.Linear(1024, 256), nn.LayerNorm(256), nn.Linear(256, 1))
    engine = build_engine(cfg, resolve_placement(cfg), Trainable(module, lr=0.01, betas=(0.9, 0.999)))
    params = list(engine.module.parameters())

    def weights() -> list[torch.Tensor]:
        with gathered(params):
            return [p.detach().float().clone() for p in params]

    log = []
    for step in range(1, 4):
        before, applied = weights(), []
        for micro in range(accum):
            x = torch.randn(2, 1024)
            if step == 2 and micro == 0 and rank == world - 1:
                x[0, 0] = float("nan")  # one rank's loss is NaN: every rank drops this micro-batch
            applied.append(engine.backward_and_step(engine(x).square().mean()))
        after = weights()
        log.append(
            {
                "applied": applied,
                "global_steps": engine.engine.global_steps,
                "micro_steps": engine.engine.micro_steps,
                "finite": all(torch.isfinite(w).all() for w in after),
                "moved": any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)),
            }
        )
    persist = {name: bool(getattr(p, "ds_persist", False)) for name, p in engine.module.named_parameters()}
    return {"log": log, "persist": persist}


@pytest.mark.parametrize("stage", [0, 2, 3])
def test_a_nonfinite_micro_batch_keeps_deepspeeds_accumulation_in_step_with_the_loop(stage):
    for r in run_distributed(_accumulation, world=2, args=(stage, 2)):
        for step, entry in enumerate(r["log"], start=1):
            # DeepSpeed's counters match the loop's: one optimizer step per loop step, on its boundary
            assert (entry["global_steps"], entry["micro_steps"]) == (step, 2 * step), (step, r["log"])
            assert entry["finite"] and entry["moved"], (step, entry)  # the good micro-batch still trains
        assert [e["applied"] for e in r["log"]] == [[True, True], [False, True], [True, True]]
        if stage == 3:
            # 6. small tensors stay resident (no gather per layer); the big weight is partitioned
            assert r["persist"] == {
                "0.weight": False,
                "0.bias": True,
                "1.weight": True,
                "1.bias": True,
                "2.weight": True,
                "2.bias": True,
            }, r["persist"]


def test_without_accumulation_a_nonfinite_loss_still_skips_the_whole_step():
    [r] = run_distributed(_accumulation, world=1, args=(2, 1))
    second = r["log"][1]
    assert second["applied"] == [False] and not second["moved"]  # no optimizer movement
    assert [e["global_steps"] for e in r["log"]] == [1, 1, 2]


# ------------------------------------------------------------------------- 4. batch-first CLIP transformer


def test_open_clip_bound_is_the_first_batch_first_release():
    pyproject = (Path(__file__).resolve().parents[1] / "pyproject.toml").read_text()
    assert '"open_clip_torch>=2.26",' in pyproject.split("dependencies = [", 1)[1].split("]", 1)[0]


def test_clip_vision_refuses_a_sequence_first_transformer():
    from t2i_dist.config import ClipConfig
    from t2i_dist.models.clip.encoders import load_clip
    from t2i_dist.models.galip.vision import ClipVision

    ClipVision(load_clip(ClipConfig()))  # open_clip >= 2.26: batch-first, accepted
    clip = load_clip(ClipConfig())
    clip.visual.transformer.batch_first = False  # what open_clip < 2.26 builds: (L, N, D) blocks
    for block in clip.visual.transformer.resblocks:
        block.attn.batch_first = False
    with pytest.raises(ValueError, match="batch-first.*open_clip_torch>=2.26"):
        ClipVision(clip)
    del clip.visual.transformer.batch_first  # older releases have no such attribute at all
    with pytest.raises(ValueError, match="batch-first"):
        ClipVision(clip)


# ---------------------------------------------------------------------- 5. the worker's device under Ray


def test_ray_workers_train_on_ray_trains_device_not_cuda_local_rank(monkeypatch):
    import ray.train
    import ray.train.torch

    from t2i_dist.engine import ray_worker
    from t2i_dist.engine.precision import Placement

    class Context:
        def get_local_rank(self) -> int:
            return 0

        def get_world_rank(self) -> int:
            return 1

        def get_world_size(self) -> int:
            return 2

    seen = {}

    def prepare_process(cfg, local_rank, device=None):
        seen.update(local_rank=local_rank, device=device)
        return Placement(device or torch.device("cuda", local_rank), "nccl", "bf16", "test")

    monkeypatch.setattr(ray.train, "get_context", lambda: Context())
    monkeypatch.setattr(ray.train.torch, "get_device", lambda: torch.device("cuda", 3))
    monkeypatch.setattr(ray_worker, "prepare_process", prepare_process)
    cfg = load_config("ldm-tiny", [*OFFLINE, "cluster.use_gpu=true"])
    ctx = ray_worker.ray_context(cfg, {})
    assert seen["device"] == torch.device("cuda", 3) and ctx.device == torch.device("cuda", 3)
    assert (ctx.rank, ctx.world_size, ctx.local_rank) == (1, 2, 0)


@pytest.mark.parametrize("gpus", ["0.5", "2"])
def test_a_gpu_share_other_than_one_per_worker_is_refused_with_the_fix(gpus):
    with pytest.raises(ConfigError, match=r"cluster.gpus_per_worker=1.*cluster.num_workers"):
        load_config("ldm-tiny", ["cluster.use_gpu=true", f"cluster.gpus_per_worker={gpus}"])
    load_config("ldm-tiny", ["cluster.use_gpu=false", f"cluster.gpus_per_worker={gpus}"])  # unused on CPUs


# -------------------------------------------------------------------------------- 6. EMA every N steps


def test_ema_every_n_steps_gathers_once_and_uses_decay_to_the_n():
    from diffusers.training_utils import EMAModel

    cfg = load_config("ldm-tiny", [*OFFLINE, "model.ema_every=3"])
    assert load_config("ldm-tiny", OFFLINE).model.ema_every == 1  # default: every step, as before
    torch.manual_seed(0)
    plugin = build_plugin(cfg, CPU)
    engine = PlainEngine(plugin.unet)
    plugin.attach_engines({"unet": engine})
    reference = EMAModel(plugin.unet.parameters(), decay=cfg.model.ema_decay)  # its decay schedule
    start = [s.clone() for s in plugin.ema.shadow_params]
    for step in range(1, 4):
        with torch.no_grad():
            for p in plugin.unet.parameters():
                p.add_(0.01)
        plugin.after_optimizer_step(step)
    assert engine.gathers == 1 and plugin.ema.optimization_step == 3
    decay = reference.get_decay(3) ** 3
    assert plugin.ema.cur_decay_value == pytest.approx(decay)
    for s0, s, p in zip(start, plugin.ema.shadow_params, plugin.unet.parameters(), strict=True):
        torch.testing.assert_close(s, decay * s0 + (1 - decay) * p.detach())
    for step in range(4, 7):
        plugin.after_optimizer_step(step)
    assert engine.gathers == 2 and plugin.ema.optimization_step == 6


# ----------------------------------------------------------------- 7. stalls: poll, metric sums, JPEG draft


def test_the_preemption_request_is_polled_at_the_configured_interval(tmp_path, monkeypatch):
    from t2i_dist.engine.components import preemption

    cfg = load_config("ldm-tiny", OFFLINE)
    assert cfg.run.preemption_poll_s == 30
    cfg = load_config("ldm-tiny", [*OFFLINE, "run.preemption_poll_s=5"])
    request = tmp_path / "preemption_request"
    ctx = argparse.Namespace(run_info={"preemption_request": str(request)})
    loop = argparse.Namespace(cfg=cfg, ctx=ctx, rank=0)
    now = [100.0]
    monkeypatch.setattr(preemption.time, "monotonic", lambda: now[0])
    component = preemption.Preemption(loop)
    assert component.flags(loop) == {"stop": False, "poll_drain": False}
    request.write_text("stop")
    now[0] = 104.0
    assert component.flags(loop) == {"stop": False, "poll_drain": False}  # not looked at again yet
    now[0] = 105.5
    assert component.flags(loop) == {"stop": True, "poll_drain": True}


def test_metric_sums_stay_on_the_device_until_the_step_ends(monkeypatch):
    from t2i_dist.engine.loop import NonFiniteGuard, TrainLoop

    class Plugin:
        def __init__(self) -> None:
            self.calls = 0

        def train_step(self, batch: Any, step: int) -> dict[str, torch.Tensor]:
            self.calls += 1
            return {"loss": torch.tensor(float(self.calls)), "loss_g": torch.tensor(2.0), "d_real": torch.tensor(0.5)}

        def after_optimizer_step(self, step: int) -> None:
            pass

    class Batch:
        def to(self, device: torch.device) -> Batch:
            return self

    loop = TrainLoop.__new__(TrainLoop)
    loop.cfg = load_config("ldm-tiny", [*OFFLINE, "deepspeed.grad_accum_steps=4"])
    loop.plugin, loop.engines, loop.components, loop.device, loop.step = Plugin(), {}, [], CPU, 0
    loop.nonfinite = NonFiniteGuard(3)
    syncs: list[str] = []

    def counted(name: str) -> Any:  # a device-to-host read: a GPU stall
        original = getattr(torch.Tensor, name)

        def read(self: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
            syncs.append(name)
            return original(self, *args, **kwargs)

        return read

    for name in ("item", "tolist", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, counted(name))
    outcome = loop.train_one_step(itertools.repeat(Batch()))
    monkeypatch.undo()
    assert outcome.metrics == {"loss": 2.5, "loss_g": 2.0, "d_real": 0.5}
    assert all(isinstance(v, float) for v in outcome.metrics.values())
    # one transfer for the metrics, one for the step's agreement flags: not one per metric per micro-batch
    assert len(syncs) <= 2, syncs


def test_jpegs_are_decoded_at_reduced_size_when_the_target_is_small(monkeypatch):
    from PIL import Image, ImageOps, JpegImagePlugin

    from t2i_dist.data.decode import decode_image

    buffer = io.BytesIO()
    image = Image.linear_gradient("L").resize((1024, 768)).convert("RGB")
    image.save(buffer, format="JPEG", quality=95)
    drafts = []
    original = JpegImagePlugin.JpegImageFile.draft

    def draft(self: Any, mode: str, size: tuple[int, int]) -> Any:
        drafts.append((mode, size, self.size))
        return original(self, mode, size)

    monkeypatch.setattr(JpegImagePlugin.JpegImageFile, "draft", draft)
    decoded = decode_image(buffer.getvalue(), 64, 8192 * 8192)
    assert drafts == [("RGB", (64, 64), (1024, 768))]
    monkeypatch.undo()
    assert decoded.shape == (3, 64, 64)
    with Image.open(io.BytesIO(buffer.getvalue())) as full:
        reference = ImageOps.fit(full.convert("RGB"), (64, 64), Image.Resampling.BICUBIC)
    expected = torch.from_numpy(np.asarray(reference).copy()).permute(2, 0, 1).float() / 127.5 - 1
    assert (decoded - expected).abs().mean() < 0.02  # the same picture as a full decode


# ------------------------------------------------------------------------------ 8. evaluation's devices


@pytest.mark.parametrize(
    ("argv", "cluster_gpus", "cuda", "expected"),
    [
        (["--workers", "0"], 0, False, ("cpu", 0)),
        (["--workers", "0"], 0, True, ("cuda", 0)),
        (["--workers", "2"], 4, False, ("cuda", 1)),  # a CPU driver, GPU workers
        (["--workers", "2"], 0, True, ("cpu", 0)),
        (["--workers", "2", "--device", "cuda"], 0, False, ("cuda", 1)),
        (["--workers", "2", "--gpus-per-worker", "0.5"], 0, False, ("cuda", 0.5)),
        (["--workers", "2", "--device", "cpu"], 4, False, ("cpu", 0)),
    ],
)
def test_evaluation_defaults_to_the_gpu_where_the_workers_have_one(monkeypatch, argv, cluster_gpus, cuda, expected):
    from t2i_dist import evaluate

    monkeypatch.setattr(evaluate, "cluster_gpus", lambda address: cluster_gpus)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    args = evaluate.build_parser().parse_args(argv)
    evaluate.resolve_devices(args)
    assert (args.device, args.gpus_per_worker) == expected


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--workers", "2", "--device", "cuda", "--gpus-per-worker", "0"], "--gpus-per-worker 0.*no GPU"),
        (["--workers", "2", "--device", "cpu", "--gpus-per-worker", "1"], "--device cpu.*--gpus-per-worker 1"),
        (["--workers", "0", "--device", "cuda"], "no CUDA device"),
    ],
)
def test_evaluation_refuses_contradictory_device_flags(monkeypatch, argv, message):
    from t2i_dist import evaluate

    monkeypatch.setattr(evaluate, "cluster_gpus", lambda address: 4)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    args = evaluate.build_parser().parse_args(argv)
    with pytest.raises(SystemExit, match=message):
        evaluate.resolve_devices(args)
