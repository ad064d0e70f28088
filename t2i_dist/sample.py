"""python -m t2i_dist.sample --checkpoint PATH --prompt "..." [--prompt ...] [--sampler ddim|dpm|ddpm --steps N
--guidance G --seed S --num-per-prompt K --out FILE.png]

Writes one PNG grid: a row per seed, a column per prompt. Works for every model family (GALIP ignores the
diffusion sampler options: it generates in one forward pass).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from t2i_dist.engine.checkpoint import CheckpointError
from t2i_dist.engine.inference import load_plugin, sample_options
from t2i_dist.images import prompt_seeds, save_png, to_pil_grid
from t2i_dist.models.registry import family


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m t2i_dist.sample", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint_* directory (local or s3://)")
    parser.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    parser.add_argument("--sampler", choices=["ddim", "dpm", "ddpm"], default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-per-prompt", type=int, default=1)
    parser.add_argument("--no-ema", action="store_true", help="LDM: use the raw instead of the EMA weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", default="samples.png")
    args = parser.parse_args(argv)
    try:
        plugin = load_plugin(args.checkpoint, args.device, use_ema=not args.no_ema)
    except (CheckpointError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not family(plugin.cfg.model.family).generates_images:
        print(
            f"error: {args.checkpoint} is a {plugin.cfg.model.family} checkpoint, which generates no images from "
            "captions; export it with python -m t2i_dist.export",
            file=sys.stderr,
        )
        return 2
    prompts, seeds = prompt_seeds(args.prompt, args.num_per_prompt, args.seed)
    options = sample_options(
        plugin.cfg.model.family, {"sampler": args.sampler, "steps": args.steps, "guidance": args.guidance}
    )
    start = time.perf_counter()
    images = plugin.sample(prompts, seeds, **options)
    seconds = (time.perf_counter() - start) / len(prompts)
    out = save_png(to_pil_grid(images, nrow=len(args.prompt)), args.out)
    print(f"[t2i_dist] wrote {out} ({len(prompts)} images of {images.shape[-1]}px, {seconds:.2f}s per image)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
