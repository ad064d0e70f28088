"""The latent diffusion schedule and objective: samplers never clamp latents, Stable Diffusion's schedule by
default, the loss of each parameterisation (L1/L2, Min-SNR) and the training timestep draw."""

from __future__ import annotations

import logging
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from t2i_dist.batch import Batch
from t2i_dist.models.ldm.plugin import LDMPlugin
from t2i_dist.models.registry import build_plugin, load_config
from t2i_dist.models.vae import autoencoder as vae_lib

SAMPLERS = ["ddim", "ddpm", "dpm"]


def _plugin(*overrides: str) -> LDMPlugin:
    cfg = load_config("ldm-tiny", ["model.sampling.steps=3", "data.synthesize.enabled=false", *overrides])
    torch.manual_seed(0)
    plugin = build_plugin(cfg, torch.device("cpu"))
    assert isinstance(plugin, LDMPlugin)
    return plugin


@pytest.fixture(scope="module")
def ldm() -> LDMPlugin:
    return _plugin()


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def test_the_default_schedule_is_stable_diffusions(ldm):
    s = ldm.noise_scheduler
    assert s.betas[0].item() == pytest.approx(0.00085, rel=1e-4)
    assert s.betas[-1].item() == pytest.approx(0.012, rel=1e-4)
    assert s.config.beta_schedule == "scaled_linear" and s.config.steps_offset == 1
    assert s.config.clip_sample is False and s.config.thresholding is False
    handler = _Collect()
    diffusers_logger = logging.getLogger("diffusers")  # does not propagate to the root logger
    diffusers_logger.addHandler(handler)
    try:
        schedulers = {name: ldm.sampling_scheduler(name) for name in SAMPLERS}
    finally:
        diffusers_logger.removeHandler(handler)
    assert not handler.records, [r.getMessage() for r in handler.records]  # built at every sample call
    for name, sched in schedulers.items():
        assert sched.config.get("clip_sample", False) is False, name
        assert sched.config.thresholding is False, name
        assert sched.config.steps_offset == 1, name
        torch.testing.assert_close(sched.alphas_cumprod, s.alphas_cumprod)
    ddim = schedulers["ddim"]
    assert ddim.config.set_alpha_to_one is False
    assert ddim.final_alpha_cumprod.item() == pytest.approx(s.alphas_cumprod[0].item())


@pytest.mark.parametrize("sampler", SAMPLERS)
def test_sampling_does_not_clamp_latents(ldm, sampler, monkeypatch):
    """A UNet whose noise prediction implies x0 = 3 everywhere: the latents reaching the decoder are ~3, not
    clamped to [-1, 1] (clip_sample) by any sampler."""
    alphas = ldm.noise_scheduler.alphas_cumprod

    def unet(x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> Any:
        a = alphas[int(t)]
        return SimpleNamespace(sample=(x - a.sqrt() * 3.0) / (1 - a).sqrt())

    decoded: list[torch.Tensor] = []
    decode = vae_lib.decode

    def record(vae: Any, latents: torch.Tensor, scale: float) -> torch.Tensor:
        decoded.append(latents.clone())
        return decode(vae, latents, scale)

    monkeypatch.setattr(vae_lib, "decode", record)
    monkeypatch.setattr(ldm, "_sampling_unet", unet)
    ldm.sample(["a red circle", "a blue square"], [1, 2], sampler=sampler, steps=4)
    latents = torch.cat(decoded)
    assert latents.abs().max() > 2
    torch.testing.assert_close(latents, torch.full_like(latents, 3.0), atol=0.3, rtol=0)


class _RecordingEngine:
    """A stand-in engine: a fixed function of its input for the UNet (the loss arithmetic is under test, not the
    network), recording what one step computed instead of stepping."""

    def __init__(self) -> None:
        self.seen: dict[str, torch.Tensor] = {}
        self.losses: list[torch.Tensor] = []

    def __call__(self, noisy: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor) -> Any:
        pred = 0.5 * noisy + 0.01 * timesteps.view(-1, 1, 1, 1)
        self.seen = {"noisy": noisy.clone(), "t": timesteps.clone(), "pred": pred.clone()}
        return SimpleNamespace(sample=pred)

    def backward_and_step(self, loss: torch.Tensor) -> None:
        self.losses.append(loss.detach())


def _one_step(plugin: LDMPlugin, latents: torch.Tensor, seed: int = 3) -> tuple[float, dict[str, torch.Tensor]]:
    engine = _RecordingEngine()
    plugin.attach_engines({"unet": engine})  # type: ignore[dict-item]
    torch.manual_seed(seed)
    loss = plugin.train_step(Batch(captions=["a"] * len(latents), latents=latents), step=1)["loss"]
    assert engine.losses and float(engine.losses[0]) == float(loss)
    return float(loss), engine.seen


@pytest.mark.parametrize(
    "prediction_type, loss, gamma",
    [
        ("sample", "l1", None),
        ("sample", "l2", 5.0),
        ("sample", "l1", 5.0),
        ("epsilon", "l2", 5.0),
        ("epsilon", "l1", None),
        ("v_prediction", "l2", 5.0),
    ],
)
def test_the_loss_is_the_hand_computed_one(prediction_type, loss, gamma):
    overrides = [f"model.prediction_type={prediction_type}", f"model.loss={loss}", "model.caption_dropout=0"]
    if gamma is not None:
        overrides.append(f"model.min_snr_gamma={gamma}")
    plugin = _plugin(*overrides)
    g = torch.Generator().manual_seed(0)
    # clean latents far from the N(0, 1) noise, so a noise target would give another loss
    shape = (6, plugin.latent_channels, plugin.latent_size, plugin.latent_size)
    x0 = 2.0 + 0.1 * torch.randn(shape, generator=g)
    got, seen = _one_step(plugin, x0)
    a = plugin.noise_scheduler.alphas_cumprod[seen["t"]].view(-1, 1, 1, 1)
    noise = (seen["noisy"] - a.sqrt() * x0) / (1 - a).sqrt()  # what add_noise added
    target = {"sample": x0, "epsilon": noise, "v_prediction": a.sqrt() * noise - (1 - a).sqrt() * x0}
    err = seen["pred"] - target[prediction_type]
    per_sample = (err.abs() if loss == "l1" else err.square()).mean(dim=(1, 2, 3))
    if gamma is not None:
        snr = (a / (1 - a)).flatten()
        x0_weight = snr.clamp(max=gamma)
        per_sample = (
            per_sample
            * {"sample": x0_weight, "epsilon": x0_weight / snr, "v_prediction": x0_weight / (snr + 1)}[prediction_type]
        )
    assert got == pytest.approx(per_sample.mean().item(), rel=1e-5)


def test_the_uniform_draw_is_todays_and_low_noise_bias_skews_it_towards_zero():
    plugin = _plugin()
    torch.manual_seed(11)
    uniform = plugin.draw_timesteps(4096, torch.device("cpu"))
    torch.manual_seed(11)
    assert torch.equal(uniform, torch.randint(0, 1000, (4096,)))
    # a training step takes its timesteps from that draw of the global RNG
    x0 = torch.zeros(2, plugin.latent_channels, plugin.latent_size, plugin.latent_size)
    _, seen = _one_step(plugin, x0, seed=5)
    torch.manual_seed(5)
    assert torch.equal(seen["t"], torch.randint(0, 1000, (2,)))

    biased = _plugin("model.low_noise_bias=1.0")
    torch.manual_seed(11)
    skewed = biased.draw_timesteps(4096, torch.device("cpu"))
    assert skewed.dtype == torch.long and 0 <= skewed.min() and skewed.max() <= 999
    assert uniform.float().mean() == pytest.approx(500, abs=25)
    assert skewed.float().mean() == pytest.approx(1000 / 3, abs=25)  # E[u**2] = 1/3
    assert (skewed < 100).float().mean() > 2 * (uniform < 100).float().mean()
