"""Sample grids for the config's fixed prompts every `run.sample_every` steps and at the end, with the
seconds per image and a per-prompt diversity figure (near 0: mode collapse)."""

from __future__ import annotations

import time

import torch

from t2i_dist.engine.components.base import Component, Loop, StepOutcome
from t2i_dist.images import png_bytes_of_grid, prompt_seeds


def prompt_diversity(images: torch.Tensor, per_prompt: int, num_prompts: int) -> float:
    """Mean pairwise L2 distance between images of the same prompt (images grouped by seed, then prompt);
    near 0 means the generator ignores its noise — mode collapse."""
    if per_prompt < 2:
        return float("nan")
    grouped = images.reshape(per_prompt, num_prompts, -1).transpose(0, 1)  # prompt, seed, pixels
    dists = torch.cdist(grouped.float(), grouped.float())
    n = per_prompt
    return float(dists.sum() / (num_prompts * n * (n - 1)))


class SampleGrids(Component):
    collective = True  # before_sampling runs on every rank (it may gather a partitioned network)

    def after_step(self, loop: Loop, outcome: StepOutcome) -> None:
        every = loop.cfg.run.sample_every
        if every and outcome.step % every == 0 and not outcome.stop:
            self.sample(loop)

    def finish(self, loop: Loop) -> None:
        every = loop.cfg.run.sample_every
        if not every or loop.step % every:
            self.sample(loop)

    def sample(self, loop: Loop) -> None:
        loop.plugin.before_sampling()
        if loop.rank != 0:
            return
        t = loop.cfg.tracking
        prompts, seeds = prompt_seeds(t.sample_prompts, t.samples_per_prompt, loop.cfg.run.seed)
        start = time.perf_counter()
        images = loop.plugin.sample(prompts, seeds)
        seconds = (time.perf_counter() - start) / len(prompts)
        diversity = prompt_diversity(images, t.samples_per_prompt, len(t.sample_prompts))
        loop.log_metrics({"sample/seconds_per_image": seconds, "sample/diversity": diversity}, loop.step)
        if loop.tracker:
            loop.tracker.log_image(
                png_bytes_of_grid(images, len(t.sample_prompts)), f"samples/step_{loop.step:06d}.png"
            )
