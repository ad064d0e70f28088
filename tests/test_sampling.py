"""Sampling is a function of (prompt, seed): not of the other images in the batch, for every sampler; the
EMA and the raw weights are different models (--no-ema)."""

from __future__ import annotations

import pytest
import torch

from t2i_dist.models.registry import build_plugin, load_config


@pytest.fixture(scope="module")
def ldm():
    cfg = load_config("ldm-tiny", ["model.sampling.steps=3", "data.synthesize.enabled=false"])
    torch.manual_seed(0)
    plugin = build_plugin(cfg, torch.device("cpu"))
    raw = {k: v.detach().clone() for k, v in plugin.unet.state_dict().items()}
    ema = {k: v + 0.05 * torch.randn_like(v) for k, v in raw.items()}  # an EMA that differs from the raw weights
    return plugin, {"unet": raw, "unet_ema": ema}


@pytest.mark.parametrize("sampler", ["ddim", "dpm", "ddpm"])
def test_an_image_depends_on_its_prompt_and_seed_only(ldm, sampler):
    plugin, state = ldm
    plugin.load_inference_state(state)
    batch = plugin.sample(["a red circle", "a blue square", "a green triangle"], [5, 7, 9], sampler=sampler)
    alone = plugin.sample(["a blue square"], [7], sampler=sampler)
    again = plugin.sample(["a green triangle", "a blue square"], [9, 7], sampler=sampler)
    assert batch.shape == (3, 3, 32, 32) and 0 <= batch.min() and batch.max() <= 1
    torch.testing.assert_close(batch[1], alone[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(batch[1], again[1], atol=1e-5, rtol=0)
    assert not torch.allclose(batch[1], batch[2])  # other prompt and seed: another image
    other_seed = plugin.sample(["a blue square"], [8], sampler=sampler)
    assert not torch.allclose(alone[0], other_seed[0])


def test_no_ema_samples_the_raw_weights(ldm):
    plugin, state = ldm
    plugin.load_inference_state(state, use_ema=False)
    raw = plugin.sample(["a red circle"], [3])
    assert all(torch.equal(plugin.unet.state_dict()[k], v) for k, v in state["unet"].items())
    plugin.load_inference_state(state, use_ema=True)
    ema = plugin.sample(["a red circle"], [3])
    assert all(torch.equal(plugin.unet.state_dict()[k], v) for k, v in state["unet_ema"].items())
    assert not torch.allclose(raw, ema)
