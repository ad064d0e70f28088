"""python -m t2i_dist.zero_shot --clip CLIP_WEIGHTS --captions SHARDS [--checkpoint CHECKPOINT_DIR]

Whether a CLIP tells colour and shape apart, zero-shot, on the synthetic shapes' real images, or on a
checkpoint's images for the same captions (t2i_dist.eval.clip_zero_shot). E.g. the study-tiny CLIP:

    python -m t2i_dist.zero_shot --clip runs/clip-tiny/export/open_clip_model.pt --captions data/synthetic-holdout
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from t2i_dist.eval.clip_zero_shot import zero_shot_accuracy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clip", required=True, help="open_clip weights file (a clip-family export) or open_clip tag")
    p.add_argument("--clip-model", default="t2i-tiny-clip", help="open_clip architecture")
    p.add_argument("--captions", required=True, nargs="+", help="synthetic shards: captions (and real images)")
    p.add_argument("--checkpoint", help="judge this checkpoint's images for the captions instead of the real ones")
    p.add_argument("--limit", type=int, default=256)
    args = p.parse_args(argv)

    import open_clip

    from t2i_dist.config import ClipConfig
    from t2i_dist.eval.sources import list_items, read_images
    from t2i_dist.models.clip.encoders import load_clip, tokenizer_for

    cfg = ClipConfig(name=args.clip_model, pretrained=args.clip)
    model: Any = load_clip(cfg)  # open_clip's CLIP: encode_image / encode_text / visual.image_size
    tokenize = tokenizer_for(cfg)
    items = list_items(args.captions, args.limit, need_captions=True, require_images=args.checkpoint is None)
    captions = [str(item.caption) for item in items]
    image_size = model.visual.image_size
    size = int(image_size[0] if isinstance(image_size, tuple | list) else image_size)
    if args.checkpoint:
        from t2i_dist.engine.inference import load_plugin

        images = load_plugin(args.checkpoint).sample(captions, list(range(len(captions)))).float()
    else:
        images = torch.stack([image for _, image in read_images(items, size)]).float() / 255
    images = torch.nn.functional.interpolate(images, size=size, mode="bicubic") if images.shape[-1] != size else images
    mean = torch.tensor(open_clip.OPENAI_DATASET_MEAN)[:, None, None]
    std = torch.tensor(open_clip.OPENAI_DATASET_STD)[:, None, None]
    try:
        result = zero_shot_accuracy(
            lambda x: model.encode_image((x.clamp(0, 1) - mean) / std),
            lambda t: model.encode_text(tokenize(t)),
            images,
            captions,
        )
    except ValueError as err:
        p.error(f"{args.captions}: {err}")
    source = args.checkpoint or "real images"
    print(" · ".join(f"{a} {r['accuracy']:.2f} of {r['judged']}" for a, r in result.items()), f"({source})")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
