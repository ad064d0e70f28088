"""Write the synthetic coloured-shapes data set as webdataset shards.

python tools/make_synthetic_shards.py --out data/synthetic --num-samples 2048 --per-shard 256 --size 64
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from t2i_dist.data.synthetic import write_synthetic_shards  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="directory to create (must not hold shards yet)")
    parser.add_argument("--num-samples", type=int, default=2048)
    parser.add_argument("--per-shard", type=int, default=256)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.num_samples < 1 or args.per_shard < 1 or args.size < 8:
        parser.error("--num-samples and --per-shard must be >= 1 and --size >= 8")
    try:
        shards = write_synthetic_shards(args.out, args.num_samples, args.per_shard, args.size, args.seed)
    except FileExistsError as exc:
        parser.error(str(exc))
    print(f"wrote {args.num_samples} samples in {len(shards)} shards to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
