"""The synthetic data set: deterministic pixels, captions that match what is drawn, atomic shard writing."""

from __future__ import annotations

import importlib.util
import json
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest

from t2i_dist.data.synthetic import (
    COLOURS,
    POSITIONS,
    render_sample,
    synthetic_samples,
    write_synthetic_shards,
)
from t2i_dist.data.writing import write_shards

ROOT = Path(__file__).resolve().parents[1]


def load_tool(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_render_is_deterministic_and_seeded():
    first, attrs = render_sample(7, 32, seed=3)
    again, attrs_again = render_sample(7, 32, seed=3)
    assert first.size == (32, 32) and first.mode == "RGB"
    assert np.array_equal(np.asarray(first), np.asarray(again)) and attrs == attrs_again
    others = [np.asarray(render_sample(7, 32, seed=s)[0]) for s in range(4, 8)]
    assert any(not np.array_equal(np.asarray(first), o) for o in others)


def test_caption_names_what_is_drawn():
    for index in range(40):
        image, attrs = render_sample(index, 64)
        caption = attrs["caption"]
        assert attrs["colour"] in caption and attrs["shape"] in caption
        assert {"size", "position", "objects"} <= set(attrs)
        # the named colour is present where the object is: compare with the pixel at the object's centre
        obj = attrs["objects"][0]
        fx, fy = POSITIONS[obj["position"]]
        dx, dy = obj["offset"]
        if obj["shape"] == "triangle":
            fy += 0.05  # a triangle's centroid sits below its bounding-box centre
        pixel = np.asarray(image)[int((fy + dy) * 64), int((fx + dx) * 64)].astype(int)
        assert np.abs(pixel - np.array(COLOURS[obj["colour"]])).max() < 30, (caption, pixel)


def test_two_object_captions_state_a_relation():
    two = [a for a in (render_sample(i, 32)[1] for i in range(200)) if len(a["objects"]) == 2]
    assert two, "some samples show two objects"
    for attrs in two:
        assert attrs["relation"] in attrs["caption"]
        assert attrs["objects"][0]["colour"] in attrs["caption"].split(attrs["relation"])[0]


def test_shards_are_byte_identical_across_runs(tmp_path):
    a = write_synthetic_shards(tmp_path / "a", 20, 8, 32, seed=1)
    b = write_synthetic_shards(tmp_path / "b", 20, 8, 32, seed=1)
    assert [Path(p).name for p in a] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert [Path(p).read_bytes() for p in a] == [Path(p).read_bytes() for p in b]
    with tarfile.open(a[0]) as tar:
        names = tar.getnames()
        meta = json.loads(tar.extractfile("00000000.json").read())
        caption = tar.extractfile("00000000.txt").read().decode()
    assert names[:3] == ["00000000.json", "00000000.png", "00000000.txt"] and len(names) == 24
    assert meta["caption"] == caption


def test_interrupted_write_leaves_no_shards(tmp_path):
    def failing():
        yield from synthetic_samples(10, 32)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_shards(failing(), tmp_path / "out", samples_per_shard=4)
    assert list(tmp_path.iterdir()) == []  # neither the target nor the temporary directory is left


def test_refuses_to_mix_with_existing_shards(tmp_path):
    write_synthetic_shards(tmp_path / "set", 4, 4, 16)
    with pytest.raises(FileExistsError, match="already holds shards"):
        write_synthetic_shards(tmp_path / "set", 4, 4, 16)


def test_cli_writes_shards(tmp_path, capsys):
    tool = load_tool("make_synthetic_shards")
    assert tool.main(["--out", str(tmp_path / "s"), "--num-samples", "10", "--per-shard", "4", "--size", "16"]) == 0
    assert sorted(p.name for p in (tmp_path / "s").iterdir()) == [f"shard-00000{i}.tar" for i in range(3)]
    assert "wrote 10 samples in 3 shards" in capsys.readouterr().out
