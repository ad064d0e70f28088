"""Incomplete checkpoints are refused with a clear message and exit code 2, before anything is loaded or any
Ray worker starts: by the sampling CLI, and by --resume for local and s3:// checkpoints."""

from __future__ import annotations

import json

import torch

from t2i_dist.data.synthetic import write_synthetic_shards
from t2i_dist.sample import main as sample_main
from t2i_dist.train import main as train_main


def _partial_checkpoint(directory, world_size: int = 2):
    """What an interrupted save leaves: every file of rank 0, rank 1's manifest missing."""
    (directory / "manifest").mkdir(parents=True)
    (directory / "config.json").write_text("{}")
    torch.save({}, directory / "inference.pt")
    (directory / "trainer_state.json").write_text(json.dumps({"step": 4, "world_size": world_size}))
    files = {
        name: {"size": (directory / name).stat().st_size, "sha256": "0"}
        for name in ("config.json", "inference.pt", "trainer_state.json")
    }
    (directory / "manifest" / "rank0.json").write_text(json.dumps({"files": files}))
    return directory


def test_sample_refuses_an_incomplete_checkpoint(tmp_path, capsys):
    ckpt = tmp_path / "checkpoint_000004"
    ckpt.mkdir()
    (ckpt / "config.json").write_text("{}")
    torch.save({}, ckpt / "inference.pt")
    assert sample_main(["--checkpoint", str(ckpt), "--prompt", "a red circle", "--out", str(tmp_path / "x.png")]) == 2
    assert "manifest/rank0.json is missing" in capsys.readouterr().err
    assert not (tmp_path / "x.png").exists()


def test_resume_refuses_incomplete_local_and_s3_checkpoints(s3_env, tmp_path, workdir, capsys):
    shards = tmp_path / "shards"
    write_synthetic_shards(shards, 16, 16, 32, seed=0)
    common = [
        "--config",
        "ldm-tiny",
        "model.vae.train_config=null",  # random frozen parts: no stage-0 training in this test
        "model.text.train_config=null",
        f"data.urls={shards}",
        "data.synthesize.enabled=false",
        f"cluster.storage_path={tmp_path / 'runs'}",
    ]
    local = _partial_checkpoint(tmp_path / "checkpoint_000004")
    assert train_main([*common, "--resume", str(local)]) == 2
    assert "manifest of rank 1 is missing" in capsys.readouterr().err

    bucket = s3_env.create_bucket("ckpts")
    client = s3_env.client()
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        client.upload_file(str(path), "ckpts", f"run/checkpoint_000004/{path.relative_to(local)}")
    remote = f"{bucket}/run/checkpoint_000004"
    assert train_main([*common, "--resume", remote]) == 2
    assert "manifest of rank 1 is missing" in capsys.readouterr().err
    assert not (workdir / "mlruns").exists()  # refused before an MLflow run was made

    # a complete remote checkpoint passes the check; a truncated file in it does not
    (local / "manifest" / "rank1.json").write_text(json.dumps({"files": {}}))
    client.upload_file(str(local / "manifest" / "rank1.json"), "ckpts", "run/checkpoint_000004/manifest/rank1.json")
    from t2i_dist.engine.checkpoint import CheckpointError, verify_remote_checkpoint

    assert verify_remote_checkpoint(remote)["step"] == 4
    client.put_object(Bucket="ckpts", Key="run/checkpoint_000004/inference.pt", Body=b"x")
    try:
        verify_remote_checkpoint(remote)
    except CheckpointError as exc:
        assert "inference.pt is missing or truncated" in str(exc)
    else:
        raise AssertionError("a truncated remote file passed verification")


def _checkpoint(directory, step: int, world_size: int = 2):
    """A checkpoint with every rank's manifest (complete), at `step`."""
    _partial_checkpoint(directory, world_size)
    (directory / "trainer_state.json").write_text(json.dumps({"step": step, "world_size": world_size}))
    listed = json.loads((directory / "manifest" / "rank0.json").read_text())
    listed["files"]["trainer_state.json"]["size"] = (directory / "trainer_state.json").stat().st_size
    for rank in range(world_size):
        (directory / "manifest" / f"rank{rank}.json").write_text(json.dumps(listed))
    return directory


def test_a_restart_finds_the_newest_complete_checkpoint_of_the_run(s3_env, tmp_path):
    from t2i_dist.engine.checkpoint import newest_complete_checkpoint

    run = tmp_path / "run"
    _checkpoint(run / "checkpoint_2026-12-02_05-35-01.000000", step=4)
    _checkpoint(run / "checkpoint_2026-12-02_05-34-59.000000", step=2)
    _partial_checkpoint(run / "checkpoint_2026-12-02_05-35-09.000000")  # step 8's save, interrupted
    (run / "checkpoint_2026-12-02_05-35-09.000000" / "trainer_state.json").write_text('{"step": 8, "world_size": 2}')
    (run / "checkpoint_manager_snapshot.json").write_text("{}")
    assert newest_complete_checkpoint(str(run)) == str(run / "checkpoint_2026-12-02_05-35-01.000000")
    assert newest_complete_checkpoint(str(tmp_path / "no-run")) is None

    bucket = s3_env.create_bucket("restarts")
    client = s3_env.client()
    for path in sorted(p for p in run.rglob("*") if p.is_file()):
        client.upload_file(str(path), "restarts", f"runs/crash/{path.relative_to(run)}")
    found = newest_complete_checkpoint(f"{bucket}/runs/crash")
    assert found == f"{bucket}/runs/crash/checkpoint_2026-12-02_05-35-01.000000"
