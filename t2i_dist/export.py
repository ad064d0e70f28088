"""python -m t2i_dist.export --checkpoint PATH --out DIR

Writes the trained networks of a checkpoint as an artifact other configs load by path: a `vae` run as a
diffusers `save_pretrained` directory (`model.vae.pretrained: DIR`), a `clip` run as an open_clip checkpoint
file (`pretrained: DIR/open_clip_model.pt` of a text encoder or GALIP's CLIP).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from t2i_dist.engine.checkpoint import CheckpointError
from t2i_dist.engine.inference import load_plugin
from t2i_dist.models.registry import family


def export_checkpoint(checkpoint: str, out: str | Path) -> Path:
    """The artifact's path (what the family's export_hint field takes)."""
    plugin = load_plugin(checkpoint, "cpu")
    return plugin.export(Path(out))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m t2i_dist.export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="a checkpoint_* directory (local or s3://)")
    parser.add_argument("--out", required=True, help="directory to write the artifact into")
    args = parser.parse_args(argv)
    try:
        path = export_checkpoint(args.checkpoint, args.out)
    except (CheckpointError, FileNotFoundError, FileExistsError, NotImplementedError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from t2i_dist.engine.checkpoint import load_for_inference

    config, _ = load_for_inference(args.checkpoint)
    hint = family(config["model"]["family"]).export_hint
    print(f"[t2i_dist] wrote {path}" + (f"; use it as {hint}: {path}" if hint else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
