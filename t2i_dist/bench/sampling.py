"""Benchmark 6: seconds per image, GALIP (one generator pass) vs LDM (DDIM 50 steps with classifier-free
guidance, i.e. 100 UNet evaluations, then the VAE decoder), alternating, on random weights (speed does not
depend on them). The tiny configs always; the study configs (128 px, study-size networks) in the full run.
The reference study reports ~1 s vs ~5 s per image."""

from __future__ import annotations

import time

import torch

from t2i_dist.bench.context import BenchContext
from t2i_dist.bench.report import Row, ratio_row, unavailable
from t2i_dist.bench.timing import side_by_side
from t2i_dist.config import Config
from t2i_dist.models.registry import load_config

BENCH = "6 sampling"
PROMPTS = [
    "a red circle",
    "a small blue square on the left",
    "a large green triangle at the top",
    "a yellow circle at the bottom right",
]


def offline(name: str) -> Config:
    """A shipped config with every pretrained weight replaced by random ones of the same architecture."""
    return load_config(name, ["data.synthesize.enabled=false"]).with_random_weights()


def build(name: str):
    from t2i_dist.models.registry import build_plugin

    cfg = offline(name)
    torch.manual_seed(cfg.run.seed)
    return build_plugin(cfg, torch.device("cpu"))


def images_per_s(plugin, prompts: list[str], **options) -> float:
    start = time.perf_counter()
    plugin.sample(prompts, list(range(len(prompts))), **options)
    return len(prompts) / (time.perf_counter() - start)


def compare(ctx: BenchContext, ldm_name: str, galip_name: str) -> Row:
    try:
        galip = build(galip_name)
    except Exception as exc:  # noqa: BLE001 - reported as a row
        return unavailable(BENCH, f"LDM / GALIP seconds per image ({ldm_name})", f"GALIP: {exc}")
    ldm = build(ldm_name)
    tiny = ldm_name.endswith("tiny")
    prompts = PROMPTS if tiny else PROMPTS[:1]
    candidates = {
        "ldm": lambda: images_per_s(ldm, prompts, sampler="ddim", steps=50, guidance=4.0),
        "galip": lambda: images_per_s(galip, prompts),
    }
    for measure in candidates.values():
        measure()  # warm-up
    rounds = ctx.sizes.rounds if tiny else 2
    ctx.say(f"{BENCH}: {ldm_name} vs {galip_name}, {rounds} rounds of {len(prompts)} image(s)")
    s = side_by_side(candidates, rounds)
    detail = (
        f"{ldm_name} vs {galip_name}, batch of {len(prompts)}, 1 thread; median s/image LDM "
        f"{1 / s.median('ldm'):.3f}, GALIP {1 / s.median('galip'):.4f}; study: ~5 s vs ~1 s (5x)"
    )
    size = "tiny, 32 px" if tiny else "study networks, 128 px"
    return ratio_row(
        BENCH,
        f"LDM / GALIP seconds per image ({size})",
        s.ratio("galip", "ldm"),
        None,
        detail,
        s.spread("galip", "ldm"),
    )


def run(ctx: BenchContext) -> list[Row]:
    pairs = [("ldm-tiny", "galip-tiny")] + ([] if ctx.quick else [("study-ldm-128", "study-galip-128")])
    return [compare(ctx, ldm_name, galip_name) for ldm_name, galip_name in pairs]
