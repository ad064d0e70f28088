"""tools/make_shards.py: image folders and COCO captions to shards that the loader reads."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest
from PIL import Image

from t2i_dist.config import DataSection
from t2i_dist.data.shards import ShardLoader
from tests.test_data_synthetic import load_tool

make_shards = load_tool("make_shards")


def samples_in(out_dir: Path) -> list[dict[str, bytes]]:
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(out_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar.getmembers():
                key, ext = member.name.split(".", 1)
                samples.setdefault(f"{shard.name}/{key}", {})[ext] = tar.extractfile(member).read()
    return list(samples.values())


def save_image(path: Path, size: tuple[int, int], colour: tuple[int, int, int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_folder_with_sidecar_captions(tmp_path):
    images = tmp_path / "images"
    for i in range(5):
        save_image(images / f"img{i}.png", (40, 30), (50 * i, 0, 0))
        if i != 3:  # one image without a caption is skipped
            (images / f"img{i}.txt").write_text(f"picture number {i}\n")
    out = tmp_path / "out"
    assert make_shards.main(["folder", str(images), "--out", str(out), "--per-shard", "2"]) == 0
    samples = samples_in(out)
    assert len(list(out.glob("*.tar"))) == 2
    assert sorted(s["txt"].decode() for s in samples) == [f"picture number {i}" for i in (0, 1, 2, 4)]
    assert all(json.loads(s["json"])["caption"] == s["txt"].decode() for s in samples)


def test_folder_with_csv_and_jsonl_tables_and_resize(tmp_path):
    images = tmp_path / "images"
    save_image(images / "a.jpg", (200, 100), (0, 200, 0))
    save_image(images / "sub" / "b.png", (60, 90), (0, 0, 200))
    (tmp_path / "captions.csv").write_text('file,caption\na.jpg,"a green, wide field"\nsub/b.png,a blue tall box\n')
    (tmp_path / "captions.jsonl").write_text('{"file": "a.jpg", "caption": "green"}\n')

    out = tmp_path / "csv"
    make_shards.main(
        ["folder", str(images), "--captions", str(tmp_path / "captions.csv"), "--out", str(out), "--resize", "50"]
    )
    by_caption = {s["txt"].decode(): s for s in samples_in(out)}
    assert set(by_caption) == {"a green, wide field", "a blue tall box"}
    with Image.open(io.BytesIO(by_caption["a green, wide field"]["jpg"])) as img:
        assert img.size == (100, 50)  # shorter side reduced to 50, aspect kept
    with Image.open(io.BytesIO(by_caption["a blue tall box"]["png"])) as img:
        assert img.size == (50, 75)

    out = tmp_path / "jsonl"
    make_shards.main(["folder", str(images), "--captions", str(tmp_path / "captions.jsonl"), "--out", str(out)])
    assert [s["txt"] for s in samples_in(out)] == [b"green"]


def test_max_shard_bytes_splits_shards(tmp_path):
    images = tmp_path / "images"
    for i in range(6):
        save_image(images / f"{i}.png", (64, 64), (i * 40, 100, 100))
        (images / f"{i}.txt").write_text(f"image {i}")
    out = tmp_path / "out"
    one_sample = len((images / "0.png").read_bytes())
    make_shards.main(["folder", str(images), "--out", str(out), "--max-shard-bytes", str(one_sample * 1.5)])
    assert len(list(out.glob("*.tar"))) == 3  # a new shard starts once the current one passes the limit


def fake_coco(tmp_path: Path, num_images: int = 4, captions_per_image: int = 3) -> tuple[Path, Path]:
    images_dir = tmp_path / "val2014"
    images, annotations = [], []
    for i in range(num_images):
        name = f"COCO_val2014_{i + 100:012d}.jpg"
        save_image(images_dir / name, (64, 48), (60 * i, 80, 120))
        images.append({"id": i + 100, "file_name": name, "width": 64, "height": 48})
        for c in range(captions_per_image):
            # annotation ids out of order, to check that "first" means lowest id
            annotations.append({"id": 1000 * (c + 1) + i, "image_id": i + 100, "caption": f" image {i} caption {c} "})
    annotations.append({"id": 1, "image_id": 999, "caption": "no such image"})
    path = tmp_path / "captions_val2014.json"
    path.write_text(json.dumps({"info": {}, "images": images, "annotations": annotations[::-1]}))
    return path, images_dir


def test_coco_all_captions_first_caption_and_limit(tmp_path):
    annotations, images = fake_coco(tmp_path)
    common = ["coco", "--annotations", str(annotations), "--images", str(images)]

    make_shards.main([*common, "--out", str(tmp_path / "all")])
    assert len(samples_in(tmp_path / "all")) == 12

    make_shards.main([*common, "--out", str(tmp_path / "eval"), "--first-caption"])
    samples = samples_in(tmp_path / "eval")
    assert sorted(s["txt"].decode() for s in samples) == [f"image {i} caption 0" for i in range(4)]
    meta = json.loads(samples[0]["json"])
    assert meta["image_id"] == 100 and len(meta["captions"]) == 3

    make_shards.main([*common, "--out", str(tmp_path / "eval2"), "--first-caption", "--num-captions", "2"])
    assert len(samples_in(tmp_path / "eval2")) == 2

    # and the loader reads what was written
    loader = ShardLoader(DataSection(urls=str(tmp_path / "eval"), loader_workers=0, resolution=16), batch_size=4)
    batch = next(iter(loader))
    assert batch.images.shape == (4, 3, 16, 16) and sorted(batch.captions)[0] == "image 0 caption 0"


def test_refuses_empty_input(tmp_path, capsys):
    (tmp_path / "images").mkdir()
    with pytest.raises(SystemExit):
        make_shards.main(["folder", str(tmp_path / "images"), "--out", str(tmp_path / "out")])
    assert "no samples" in capsys.readouterr().err and not (tmp_path / "out").exists()
