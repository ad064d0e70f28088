"""A shard set with the data faults a real crawl has: a truncated shard, an undecodable image, empty and
missing captions and an image too large to decode, among good synthetic samples."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from PIL import Image

from t2i_dist.data.synthetic import png_bytes, synthetic_samples
from t2i_dist.data.writing import write_shards

PER_SHARD = 16
GOOD_SHARDS = 6
# reason each injected sample is counted under (data/skipped/<reason>)
EXPECTED_REASONS = {"corrupt_tar", "undecodable_image", "missing_caption", "too_large"}


def huge_png(width: int = 20000, height: int = 20000) -> bytes:
    """A small file whose header announces a 400-megapixel image (a decompression bomb): a 1x1 PNG with its
    IHDR size rewritten and the checksum fixed, so decoders see a well-formed file."""
    data = bytearray(png_bytes(Image.new("RGB", (1, 1), (9, 9, 9))))
    ihdr = data.index(b"IHDR")
    data[ihdr + 4 : ihdr + 12] = struct.pack(">II", width, height)
    body = bytes(data[ihdr : ihdr + 4 + 13])
    data[ihdr + 17 : ihdr + 21] = struct.pack(">I", zlib.crc32(body))
    return bytes(data)


def write_faulty_shards(out_dir: Path, seed: int = 0) -> dict[str, str]:
    """Write the set into out_dir; returns {'mixed': path, 'truncated': path} of the two bad shards."""
    samples = list(synthetic_samples(GOOD_SHARDS * PER_SHARD + 2 * PER_SHARD, 32, seed))
    good, rest = samples[: GOOD_SHARDS * PER_SHARD], samples[GOOD_SHARDS * PER_SHARD :]
    mixed_good, cut_good = rest[: PER_SHARD - 4], rest[PER_SHARD - 4 :][:PER_SHARD]
    png = mixed_good[0]["png"]
    bad = [
        {"__key__": "undecodable", "png": b"\x89PNG\r\n\x1a\n but the rest is noise", "txt": "broken bytes"},
        {"__key__": "empty-caption", "png": png, "txt": "  "},
        {"__key__": "no-caption", "png": png},
        {"__key__": "huge", "png": huge_png(), "txt": "a huge picture"},
    ]
    mixed = mixed_good[:4] + bad + mixed_good[4:]
    paths = write_shards(good + mixed, out_dir, PER_SHARD)
    # the last shard, cut half way through (inside a member, not at a header boundary)
    cut = Path(write_shards(cut_good, out_dir.parent / f"{out_dir.name}-cut", PER_SHARD)[0])
    truncated = out_dir / f"shard-{len(paths):06d}.tar"
    raw = cut.read_bytes()
    truncated.write_bytes(raw[: len(raw) // 2 + 700])
    return {"mixed": paths[-1], "truncated": str(truncated)}


def write_mostly_bad_shards(out_dir: Path, shards: int = 8, good_per_shard: int = 1, seed: int = 0) -> list[str]:
    """Shards where all but `good_per_shard` of every PER_SHARD samples are bad (undecodable images and
    missing captions, alternately): far above any sane data.max_skip_fraction."""
    good = list(synthetic_samples(shards * good_per_shard, 32, seed))
    samples = []
    for s in range(shards):
        samples += good[s * good_per_shard : (s + 1) * good_per_shard]
        for i in range(PER_SHARD - good_per_shard):
            key = f"bad-{s:02d}-{i:02d}"
            if i % 2:
                samples.append({"__key__": key, "png": good[0]["png"]})
            else:
                samples.append({"__key__": key, "png": b"\x89PNG\r\n\x1a\n noise", "txt": "broken bytes"})
    return write_shards(samples, out_dir, PER_SHARD)
