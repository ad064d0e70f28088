"""GALIP's objectives: hinge adversarial loss with mismatched-text negatives, the matching-aware gradient
penalty (MA-GP) and the CLIP text-image similarity term of the generator.

How the discriminator runs under DeepSpeed: `torch.autograd.grad(create_graph=True)` on the output of
`engine(...)` fails at every ZeRO stage (the engine's output hooks take it for a bare tensor.backward()), so
the penalty's forward uses the engine's raw module while the other terms go through the engine itself, whose
forward also resets the per-step gradient-hook state ZeRO keeps. One `engine.backward(loss)` then reduces the
gradients of all terms, including the penalty's second-order ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

ScoreFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]  # features, sentence, pixels


def hinge_real(scores: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 - scores.float()).mean()


def hinge_fake(scores: torch.Tensor) -> torch.Tensor:
    return F.relu(1.0 + scores.float()).mean()


def mismatched(sentence: torch.Tensor) -> torch.Tensor:
    """Each sample paired with the next sample's sentence vector (the batch rotated by one)."""
    return torch.roll(sentence, shifts=-1, dims=0)


def ma_gp(
    scores: torch.Tensor,
    features: torch.Tensor,
    sentence: torch.Tensor,
    k: float,
    p: float,
    pixels: torch.Tensor | None = None,
) -> torch.Tensor:
    """k * mean(||d score / d (features, sentence[, pixels])||_2 ** p) on real, matching pairs; differentiable
    (the gradient is built with create_graph) so its own gradient reaches the discriminator's weights."""
    inputs = (features, sentence) if pixels is None else (features, sentence, pixels)
    grads = torch.autograd.grad(scores.sum(), inputs, create_graph=True)
    flat = torch.cat([g.float().flatten(1) for g in grads], dim=1)
    return k * flat.norm(dim=1).pow(p).mean()


@dataclass
class DiscriminatorTerms:
    loss: torch.Tensor
    penalty: torch.Tensor
    real: torch.Tensor  # mean score of real, matching pairs
    fake: torch.Tensor
    mismatch: torch.Tensor

    def metrics(self) -> dict[str, torch.Tensor]:
        return {
            "loss_d": self.loss.detach(),
            "ma_gp": self.penalty.detach(),
            "d_real": self.real.detach(),
            "d_fake": self.fake.detach(),
            "d_mismatch": self.mismatch.detach(),
        }


def discriminator_loss(
    engine_forward: ScoreFn,
    raw_forward: ScoreFn,
    real: torch.Tensor,
    fake: torch.Tensor,
    sentence: torch.Tensor,
    k: float,
    p: float,
    real_pixels: torch.Tensor | None = None,
    fake_pixels: torch.Tensor | None = None,
    penalize: bool = True,
) -> DiscriminatorTerms:
    """D loss = hinge(real) + (hinge(fake) + hinge(real with mismatched text)) / 2 + MA-GP.

    `engine_forward` is the DeepSpeed engine call, `raw_forward` its module (for the penalty's double
    backward); both score CLIP features (B, layers, width, g, g) against sentence vectors (B, D), and the
    images CLIP read when the discriminator has a pixel branch (then both pixel arguments are given).
    `penalize=False` leaves MA-GP out (a lazy-regularisation step): the real, matching pairs are then scored
    in the engine's one forward with the others."""
    if (real_pixels is None) != (fake_pixels is None):
        raise ValueError("give the pixels of both real and fake images, or of neither")
    n = real.shape[0]
    real, sentence = real.detach(), sentence.detach()
    pixels = None if real_pixels is None or fake_pixels is None else (fake_pixels.detach(), real_pixels.detach())
    if not penalize:
        scores = engine_forward(
            torch.cat([fake.detach(), real, real]),
            torch.cat([sentence, mismatched(sentence), sentence]),
            None if pixels is None else torch.cat([*pixels, pixels[1]]),
        )
        d_fake, d_mismatch, d_real = scores[:n], scores[n : 2 * n], scores[2 * n :]
        loss = hinge_real(d_real) + (hinge_fake(d_fake) + hinge_fake(d_mismatch)) / 2
        zero = torch.zeros((), device=loss.device)
        return DiscriminatorTerms(loss, zero, d_real.float().mean(), d_fake.float().mean(), d_mismatch.float().mean())
    both_pixels = None if pixels is None else torch.cat(pixels)
    real_pixels_in = None if pixels is None else pixels[1].clone().requires_grad_(True)
    scores = engine_forward(torch.cat([fake.detach(), real]), torch.cat([sentence, mismatched(sentence)]), both_pixels)
    d_fake, d_mismatch = scores[:n], scores[n:]
    real_in = real.clone().requires_grad_(True)
    sentence_in = sentence.clone().requires_grad_(True)
    d_real = raw_forward(real_in, sentence_in, real_pixels_in)
    penalty = ma_gp(d_real, real_in, sentence_in, k, p, pixels=real_pixels_in)
    loss = hinge_real(d_real) + (hinge_fake(d_fake) + hinge_fake(d_mismatch)) / 2 + penalty
    return DiscriminatorTerms(loss, penalty, d_real.float().mean(), d_fake.float().mean(), d_mismatch.float().mean())


def score_without_weight_grads(
    module: nn.Module, features: torch.Tensor, sentence: torch.Tensor, pixels: torch.Tensor | None = None
) -> torch.Tensor:
    """Discriminator scores that pass gradients to the inputs only: the generator's step must neither touch
    the discriminator's gradients nor fire its engine's reduction hooks."""
    detached = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, detached, (features, sentence, pixels))


def clip_similarity(image_embedding: torch.Tensor, sentence: torch.Tensor) -> torch.Tensor:
    return F.cosine_similarity(image_embedding.float(), sentence.float(), dim=-1).mean()


def generator_loss(
    scores: torch.Tensor, image_embedding: torch.Tensor, sentence: torch.Tensor, clip_weight: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """G loss = -mean D score - clip_weight * cos(CLIP image embedding, sentence); returns (loss, similarity)."""
    similarity = clip_similarity(image_embedding, sentence)
    return -scores.float().mean() - clip_weight * similarity, similarity


def image_spread(
    images: torch.Tensor, twins: torch.Tensor, noise: torch.Tensor, twin_noise: torch.Tensor
) -> torch.Tensor:
    """Mode seeking (Mao et al., CVPR 2019): mean |image - twin| over mean |noise - twin noise|, for images of
    the same captions; the generator minimises its inverse, so other noise must give other images."""
    return (images.float() - twins.float()).abs().mean() / (noise.float() - twin_noise.float()).abs().mean()
