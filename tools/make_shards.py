"""Convert captioned images to webdataset shards (keys: jpg or png, txt, json).

An image folder, captions in a sidecar <name>.txt per image or in a CSV/JSONL with columns file,caption:
    python tools/make_shards.py folder photos/ --out shards/photos [--captions captions.csv]

COCO captions (e.g. captions_val2014.json) and its image directory; one sample per (image, caption) pair, or
with --first-caption one per image (evaluation shards), optionally limited to --num-captions N:
    python tools/make_shards.py coco --annotations captions_val2014.json --images val2014/ \\
        --out shards/coco-val --first-caption --num-captions 5000

Common options: --per-shard N, --max-shard-bytes B, --resize S (shorter side down to S pixels).
Shards appear in --out only when all are written.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import random
import sys
from collections import Counter, defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from t2i_dist.data.writing import write_shards  # noqa: E402

IMAGE_SUFFIXES = {".jpg": "jpg", ".jpeg": "jpg", ".png": "png", ".webp": "webp"}


@dataclass
class Item:
    image: Path
    caption: str
    meta: dict


def image_bytes(path: Path, resize: int | None) -> tuple[str, bytes]:
    """(webdataset key, bytes): the file as is, or re-encoded with its shorter side reduced to `resize`."""
    key = IMAGE_SUFFIXES[path.suffix.lower()]
    if resize is None:
        return key, path.read_bytes()
    with Image.open(path) as image:
        image = image.convert("RGB")
        scale = resize / min(image.size)
        if scale < 1:
            image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.LANCZOS)
        buf = io.BytesIO()
        if key == "jpg":
            image.save(buf, format="JPEG", quality=95)
        else:
            key = "png"
            image.save(buf, format="PNG")
    return key, buf.getvalue()


def to_samples(items: Iterator[Item], resize: int | None, problems: Counter) -> Iterator[dict]:
    for index, item in enumerate(items):
        try:
            key, data = image_bytes(item.image, resize)
        except (OSError, ValueError, Image.DecompressionBombError) as exc:
            print(f"skipping {item.image}: {exc}", file=sys.stderr)
            problems["unreadable image"] += 1
            continue
        meta = {**item.meta, "caption": item.caption}
        yield {"__key__": f"{index:09d}", key: data, "txt": item.caption, "json": json.dumps(meta)}


# -------------------------------------------------------------------------------------------------- folder


def read_caption_table(path: Path) -> dict[str, str]:
    """file -> caption from a CSV (header with file,caption) or a JSONL ({"file": ..., "caption": ...})."""
    rows: list[dict]
    if path.suffix.lower() == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    else:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    if rows and not {"file", "caption"} <= set(rows[0]):
        raise SystemExit(f"{path}: needs columns 'file' and 'caption', found {sorted(rows[0])}")
    return {str(row["file"]): str(row["caption"]) for row in rows}


def folder_items(images_dir: Path, captions_file: Path | None, problems: Counter) -> Iterator[Item]:
    table = read_caption_table(captions_file) if captions_file else None
    for path in sorted(p for p in images_dir.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()):
        name = path.relative_to(images_dir).as_posix()
        if table is not None:
            caption = table.get(name, table.get(path.name, ""))
        else:
            sidecar = path.with_suffix(".txt")
            caption = sidecar.read_text(encoding="utf-8") if sidecar.is_file() else ""
        caption = caption.strip()
        if not caption:
            problems["no caption"] += 1
            continue
        yield Item(path, caption, {"file": name})


# ---------------------------------------------------------------------------------------------------- coco


def coco_items(
    annotations: Path,
    images_dir: Path,
    first_caption: bool,
    num_captions: int | None,
    seed: int,
    problems: Counter,
) -> list[Item]:
    data = json.loads(annotations.read_text())
    files = {img["id"]: img["file_name"] for img in data["images"]}
    captions: dict[int, list[tuple[int, str]]] = defaultdict(list)
    for ann in data["annotations"]:
        captions[ann["image_id"]].append((ann["id"], ann["caption"].strip()))
    items = []
    for image_id in sorted(captions):
        if image_id not in files:
            problems["annotation without image entry"] += 1
            continue
        path = images_dir / files[image_id]
        if not path.is_file():
            problems["missing image file"] += 1
            continue
        ordered = [c for _, c in sorted(captions[image_id]) if c]
        meta = {"image_id": image_id, "file": files[image_id], "captions": ordered}
        chosen = ordered[:1] if first_caption else ordered
        items += [Item(path, caption, meta) for caption in chosen]
    if num_captions is not None and num_captions < len(items):
        keep = sorted(random.Random(seed).sample(range(len(items)), num_captions))
        items = [items[i] for i in keep]
    return items


# ---------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True)
    folder = sub.add_parser("folder", help="image folder with sidecar .txt captions or a caption table")
    folder.add_argument("images", type=Path)
    folder.add_argument("--captions", type=Path, help="CSV or JSONL with file,caption (file relative to images)")
    coco = sub.add_parser("coco", help="COCO captions JSON + image directory")
    coco.add_argument("--annotations", type=Path, required=True)
    coco.add_argument("--images", type=Path, required=True)
    coco.add_argument("--first-caption", action="store_true", help="one sample per image, its first caption")
    coco.add_argument("--num-captions", type=int, help="keep N samples, chosen at random with --seed")
    coco.add_argument("--seed", type=int, default=0)
    for p in (folder, coco):
        p.add_argument("--out", type=Path, required=True, help="directory to create (must not hold shards yet)")
        p.add_argument("--per-shard", type=int, default=1000, help="samples per shard")
        p.add_argument("--max-shard-bytes", type=float, default=1e9, help="start a new shard past this size")
        p.add_argument("--resize", type=int, help="reduce the shorter side to this many pixels")
    args = parser.parse_args(argv)

    problems: Counter = Counter()
    if args.source == "folder":
        if not args.images.is_dir():
            parser.error(f"{args.images} is not a directory")
        items: Iterator[Item] | list[Item] = folder_items(args.images, args.captions, problems)
    else:
        if not args.annotations.is_file() or not args.images.is_dir():
            parser.error("--annotations must be a file and --images a directory")
        items = coco_items(args.annotations, args.images, args.first_caption, args.num_captions, args.seed, problems)
    written = Counter()

    def counted(samples: Iterator[dict]) -> Iterator[dict]:
        for sample in samples:
            written["samples"] += 1
            yield sample

    try:
        shards = write_shards(
            counted(to_samples(iter(items), args.resize, problems)), args.out, args.per_shard, args.max_shard_bytes
        )
    except (FileExistsError, ValueError) as exc:
        parser.error(f"{exc}; skipped: {dict(problems)}")
    skipped = ", ".join(f"{n} {why}" for why, n in problems.items()) or "none"
    print(f"wrote {written['samples']} samples in {len(shards)} shards to {args.out}; skipped: {skipped}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
