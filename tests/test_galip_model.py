"""GALIP's networks, configuration checks and sampling, in one process on the tiny CLIP."""

from __future__ import annotations

import pytest
import torch

from t2i_dist.config import ConfigError
from t2i_dist.models.base import parameter_counts
from t2i_dist.models.galip.losses import hinge_fake, hinge_real, ma_gp, mismatched
from t2i_dist.models.galip.plugin import GALIPPlugin
from t2i_dist.models.registry import load_config

TINY = [
    "deepspeed.micro_batch_size=4",
    "model.ngf=4",
    "model.ndf=4",
    "model.noise_dim=8",
    "model.bridge_channels=8",
    "model.bridge_mid_channels=4",
    "model.bridge_blocks=1",
]


def tiny_plugin(*overrides: str) -> GALIPPlugin:
    return GALIPPlugin(load_config("galip-tiny", [*TINY, *overrides]), torch.device("cpu"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["deepspeed.zero_stage=3"], "model.discriminator_zero_stage=2"),
        (["model.discriminator_zero_stage=3"], "model.discriminator_zero_stage"),
        (["data.format=latents"], "data.format=images"),
        (["data.resolution=48"], "power of two"),
        (["deepspeed.micro_batch_size=1"], "micro_batch_size must be >= 2"),
        (["model.feature_layers=[1, 4]"], "model.feature_layers [4] out of range"),
        (["model.prompt_blocks=[2, 1]"], "ascending"),
    ],
)
def test_bad_galip_settings_fail_at_validation(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config("galip-tiny", overrides)


def test_generator_may_use_zero3_when_the_discriminator_does_not():
    cfg = load_config("galip-tiny", ["deepspeed.zero_stage=3", "model.discriminator_zero_stage=2"])
    trainables = GALIPPlugin(cfg, torch.device("cpu")).trainables()
    assert list(trainables) == ["discriminator", "generator"]  # one engine each, D first
    assert trainables["discriminator"].zero_stage == 2 and trainables["generator"].zero_stage is None
    assert (trainables["discriminator"].lr, trainables["generator"].lr) == (4e-4, 1e-4)
    assert trainables["generator"].betas == (0.0, 0.9)


def test_study_config_is_the_paper_setting():
    m = load_config("study-galip-128").model
    assert m.clip.name == "ViT-B-32" and len(m.prompt_blocks) == 8 and m.feature_layers == [1, 4, 8]


def test_engines_hold_no_clip_weights():
    plugin = tiny_plugin()
    clip_ids = {id(p) for p in plugin.clip_model.parameters()}
    for trainable in plugin.trainables().values():
        assert not clip_ids & {id(p) for p in trainable.module.parameters()}
    frozen_ids = {id(p) for module in plugin.frozen().values() for p in module.parameters()}
    assert len(clip_ids - frozen_ids) == 1  # the frozen set is the whole CLIP but its unused logit scale
    counts = parameter_counts(plugin)
    assert counts["params/trainable"] == counts["params/discriminator"] + counts["params/generator"]
    assert (
        counts["params/total"] == counts["params/trainable"] + counts["params/clip_text"] + counts["params/clip_vision"]
    )


def test_vision_tower_reproduces_open_clip_image_embedding():
    plugin = tiny_plugin()
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        features, embedding = plugin.vision.encode(images, [1, 3], with_embedding=True)
        expected = plugin.clip_model.encode_image(plugin.vision.normalize(images))
    torch.testing.assert_close(embedding, expected)
    assert features.shape == (2, 2, plugin.vision.width, plugin.vision.grid, plugin.vision.grid)


@pytest.mark.parametrize("resolution", [32, 64])
def test_generator_trains_through_the_frozen_clip(resolution):
    plugin = tiny_plugin(f"data.resolution={resolution}")
    g = plugin.generator_net
    noise, sentence = torch.randn(2, 8), plugin.text_encoder(["a red circle", "a blue square"])["pooled"]
    images = g(noise, sentence, plugin.vision)
    assert images.shape == (2, 3, resolution, resolution)
    _, embedding = plugin.vision.encode(images, [1], with_embedding=True)
    embedding.sum().backward()
    # the bridge sits before the ViT: its gradient crossed every frozen block; the ViT itself stays untouched
    assert g.bridge.fc.weight.grad.abs().sum() > 0
    assert g.prompts.fc.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in plugin.clip_model.parameters())


def test_checkpointed_clip_blocks_give_the_same_gradients():
    grads = []
    for flag in ("false", "true"):
        torch.manual_seed(0)
        plugin = tiny_plugin(f"deepspeed.gradient_checkpointing={flag}")
        images = plugin.generator_net(torch.randn(2, 8), torch.randn(2, 64), plugin.vision)
        plugin.vision.encode(images, [1, 2], with_embedding=True)[1].square().sum().backward()
        grads.append(torch.cat([p.grad.flatten() for p in plugin.generator_net.parameters()]))
    torch.testing.assert_close(grads[0], grads[1])


def test_sampling_depends_only_on_prompt_and_seed_and_survives_a_reload():
    plugin = tiny_plugin()
    with torch.no_grad():  # make the weights non-trivial so the round trip is a real check
        for p in plugin.generator_net.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    a = plugin.sample(["a red circle", "a blue square", "a red circle"], [0, 0, 1])
    b = plugin.sample(["a red circle"], [0])
    assert a.shape == (3, 3, 32, 32) and a.dtype == torch.float32 and 0 <= a.min() and a.max() <= 1
    torch.testing.assert_close(a[0], b[0])  # independent of the other images in the batch
    assert not torch.equal(a[0], a[2])  # the seed matters
    state = plugin.inference_state()
    assert "clip" in state  # random CLIP weights travel with the checkpoint
    fresh = tiny_plugin("run.seed=7")  # different random init everywhere
    fresh.load_inference_state(state)
    torch.testing.assert_close(fresh.sample(["a red circle"], [0]), b)
    with pytest.raises(ValueError, match="no options"):
        plugin.sample(["x"], [0], steps=10)


def test_ma_gp_matches_its_closed_form_on_a_linear_critic():
    # score = <w, x> + <v, s> has gradient (w, v) everywhere: the penalty is k * ||(w, v)||^p exactly
    w, v = torch.randn(2, 3, 4, 4), torch.randn(5)
    features = torch.randn(6, 2, 3, 4, 4, requires_grad=True)
    sentence = torch.randn(6, 5, requires_grad=True)
    scores = (features * w).flatten(1).sum(1) + sentence @ v
    penalty = ma_gp(scores, features, sentence, k=2.0, p=6.0)
    expected = 2.0 * (w.square().sum() + v.square().sum()).sqrt() ** 6
    torch.testing.assert_close(penalty, expected)


def test_hinge_terms_and_mismatched_pairs():
    d = {"real": torch.tensor([2.0, 0.5]), "fake": torch.tensor([-2.0, 0.5])}
    assert float(hinge_real(d["real"])) == pytest.approx(0.25)  # only the 0.5 score is inside the margin
    assert float(hinge_fake(d["fake"])) == pytest.approx(0.75)
    sentence = torch.arange(6.0).view(3, 2)
    assert mismatched(sentence).tolist() == [[2.0, 3.0], [4.0, 5.0], [0.0, 1.0]]  # no sample keeps its own text


def test_diff_augment_moves_and_cuts_images_reproducibly_and_passes_gradients():
    from t2i_dist.models.galip.augment import cutout, diff_augment, translate

    images = torch.zeros(2, 3, 16, 16)
    images[:, :, 8, 8] = 1.0  # one bright pixel to follow
    shifted = translate(images, 0.25, torch.Generator().manual_seed(0))
    again = translate(images, 0.25, torch.Generator().manual_seed(0))
    assert torch.equal(shifted, again)
    for k in range(2):
        (y, x) = (shifted[k, 0] == 1).nonzero()[0].tolist()
        assert abs(y - 8) <= 4 and abs(x - 8) <= 4 and shifted[k].sum() == 3  # moved within range, not lost
    ones = torch.ones(4, 3, 16, 16)
    holes = cutout(ones, 0.5, torch.Generator().manual_seed(1))
    zeroed = (holes[:, 0] == 0).sum(dim=(1, 2))
    assert ((zeroed > 0) & (zeroed <= 9 * 9)).all()  # one square of side <= 8 (+1), clipped at the border
    assert torch.equal(holes[:, 0], holes[:, 2])  # the same hole in every channel
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    diff_augment(x, ["translation", "cutout"], 0.125, 0.5, torch.Generator().manual_seed(2)).sum().backward()
    assert x.grad is not None and 0 < x.grad.abs().sum() < x.numel()  # differentiable; cut pixels get none


def test_mode_seeking_spread_is_image_distance_over_noise_distance():
    from t2i_dist.models.galip.losses import image_spread

    images, noise = torch.zeros(2, 3, 4, 4), torch.zeros(2, 8)
    assert float(image_spread(images, images.clone(), noise, noise + 1)) == 0.0  # noise ignored: no spread
    assert float(image_spread(images, images + 0.5, noise, noise + 2)) == pytest.approx(0.25)
    assert float(image_spread(images, images + 0.5, noise, noise + 1)) == pytest.approx(0.5)


def test_ma_gp_counts_the_pixel_gradient_when_the_critic_reads_pixels():
    w, v, u = torch.randn(2, 3, 4, 4), torch.randn(5), torch.randn(3, 8, 8)
    features = torch.randn(6, 2, 3, 4, 4, requires_grad=True)
    sentence = torch.randn(6, 5, requires_grad=True)
    pixels = torch.randn(6, 3, 8, 8, requires_grad=True)
    scores = (features * w).flatten(1).sum(1) + sentence @ v + (pixels * u).flatten(1).sum(1)
    penalty = ma_gp(scores, features, sentence, k=2.0, p=6.0, pixels=pixels)
    expected = 2.0 * (w.square().sum() + v.square().sum() + u.square().sum()).sqrt() ** 6
    torch.testing.assert_close(penalty, expected)


def test_pixel_branch_discriminator_reads_the_pixels_and_passes_them_gradients():
    from t2i_dist.models.galip.config import GALIPConfig
    from t2i_dist.models.galip.discriminator import MateDiscriminator
    from t2i_dist.models.galip.losses import discriminator_loss

    torch.manual_seed(0)
    net = MateDiscriminator(GALIPConfig(ndf=4, feature_layers=[0, 1], pixel_branch=True), 8, 4, 6, resolution=32)
    features, sentence = torch.randn(3, 2, 8, 4, 4), torch.randn(3, 6)
    pixels = torch.randn(3, 3, 32, 32, requires_grad=True)
    scores = net(features, sentence, pixels)
    assert not torch.allclose(scores, net(features, sentence, pixels.detach().flip(-1)))  # pixels change scores
    scores.sum().backward()
    assert pixels.grad is not None and pixels.grad.abs().sum() > 0  # the generator gets a pixel gradient
    with pytest.raises(ValueError, match="pixel branch"):
        net(features, sentence)
    with pytest.raises(ValueError, match="both real and fake"):
        discriminator_loss(net, net, features, features, sentence, 2.0, 6.0, real_pixels=pixels)
    # 224 px CLIP grid 7 on 128 px images: pooled to the grid
    wide = MateDiscriminator(GALIPConfig(ndf=4, feature_layers=[0, 1], pixel_branch=True), 8, 7, 6, resolution=128)
    assert wide(torch.randn(2, 2, 8, 7, 7), torch.randn(2, 6), torch.randn(2, 3, 128, 128)).shape == (2,)


def test_projection_discriminator_adds_the_pooled_feature_sentence_product():
    from t2i_dist.models.galip.discriminator import QualityAssessor

    torch.manual_seed(0)
    plain = QualityAssessor(8, 6, 4, grid=4)
    projected = QualityAssessor(8, 6, 4, grid=4, projection=True)
    projected.load_state_dict(plain.state_dict(), strict=False)  # the same convolutions, plus the projection
    features, sentence = torch.randn(3, 8, 4, 4), torch.randn(3, 6)
    pooled = torch.nn.functional.leaky_relu(features, 0.2).mean(dim=(2, 3))
    expected = plain(features, sentence) + (pooled * (sentence @ projected.project.weight.T)).sum(dim=1)
    torch.testing.assert_close(projected(features, sentence), expected)
    # the projection reads the sentence: a mismatched one changes the score beyond the concatenation path
    other = torch.roll(sentence, 1, 0)
    assert not torch.allclose(projected(features, other) - plain(features, other), expected - plain(features, sentence))


def test_a_lazy_regularisation_step_is_the_penalised_step_without_the_penalty():
    from t2i_dist.models.galip.config import GALIPConfig
    from t2i_dist.models.galip.discriminator import MateDiscriminator
    from t2i_dist.models.galip.losses import discriminator_loss

    torch.manual_seed(0)
    net = MateDiscriminator(GALIPConfig(ndf=4, feature_layers=[0, 1], pixel_branch=True), 8, 4, 6, resolution=32)
    real, fake = torch.randn(3, 2, 8, 4, 4), torch.randn(3, 2, 8, 4, 4)
    sentence, real_px, fake_px = torch.randn(3, 6), torch.randn(3, 3, 32, 32), torch.randn(3, 3, 32, 32)
    full = discriminator_loss(net, net, real, fake, sentence, 2.0, 6.0, real_px, fake_px)
    lazy = discriminator_loss(net, net, real, fake, sentence, 2.0, 6.0, real_px, fake_px, penalize=False)
    assert float(full.penalty) > 0 and float(lazy.penalty) == 0
    for name in ("real", "fake", "mismatch"):  # the same scores, taken in one forward instead of two
        torch.testing.assert_close(getattr(lazy, name), getattr(full, name))
    torch.testing.assert_close(lazy.loss, full.loss - full.penalty)
    lazy.loss.backward()
    assert all(p.grad is not None for p in net.parameters() if p.requires_grad)  # D still learns on that step
