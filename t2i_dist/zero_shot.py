"""python -m t2i_dist.zero_shot --clip CLIP_WEIGHTS --captions SHARDS [--checkpoint CHECKPOINT_DIR]

Whether a CLIP tells colour and shape apart, zero-shot, on the synthetic shapes' real images, or on a
checkpoint's images for the same captions (t2i_dist.eval.clip_zero_shot). E.g. the study-tiny CLIP:

    python -m t2i_dist.zero_shot --clip runs/clip-tiny/export/open_clip_model.pt --captions data/synthetic-holdout
"""

from __future__ import annotations

import argparse
import json

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

    from t2i_dist.config import ClipConfig
    from t2i_dist.eval.clip_score import ClipScorer
    from t2i_dist.eval.inception import to_uint8
    from t2i_dist.eval.sources import list_items, read_images

    # the CLIP score's loading and preprocessing (the model's own size, mean and std), reused
    scorer = ClipScorer(ClipConfig(name=args.clip_model, pretrained=args.clip))
    items = list_items(args.captions, args.limit, need_captions=True, require_images=args.checkpoint is None)
    captions = [str(item.caption) for item in items]
    if args.checkpoint:
        from t2i_dist.engine.inference import load_plugin

        images = to_uint8(load_plugin(args.checkpoint).sample(captions, list(range(len(captions)))))
    else:
        images = torch.stack([image for _, image in read_images(items, scorer.size[0])])
    try:
        result = zero_shot_accuracy(scorer.image_embeddings, scorer.text_embeddings, images, captions)
    except ValueError as err:
        p.error(f"{args.captions}: {err}")
    source = args.checkpoint or "real images"
    print(" · ".join(f"{a} {r['accuracy']:.2f} of {r['judged']}" for a, r in result.items()), f"({source})")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
