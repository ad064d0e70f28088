"""Config loading, overrides and the messages bad input gets — all before anything starts."""

from __future__ import annotations

import subprocess
import sys

import pytest

from t2i_dist.config import ConfigError, shipped_configs
from t2i_dist.models.registry import load_config


def test_shipped_configs_validate():
    names = shipped_configs()
    assert {"ldm-tiny", "study-ldm-128", "galip-tiny", "study-galip-128"} <= set(names)
    for name in names:
        assert load_config(name).run.name


def test_overrides_are_typed_and_applied():
    cfg = load_config("ldm-tiny", ["deepspeed.zero_stage=3", "optim.betas=[0.9, 0.99]", "cluster.use_gpu=false"])
    assert cfg.deepspeed.zero_stage == 3
    assert cfg.optim.betas == (0.9, 0.99)


def test_path_config_and_base(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("base: ldm-tiny\nrun: {name: mine, max_steps: 7}\n")
    cfg = load_config(str(path))
    assert (cfg.run.name, cfg.run.max_steps, cfg.model.family) == ("mine", 7, "ldm")


def test_unknown_key_names_key_and_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config("ldm-tiny", ["deepspeed.zero_stgae=3"])
    text = str(err.value)
    assert "deepspeed.zero_stgae" in text and "did you mean 'deepspeed.zero_stage'" in text
    assert "micro_batch_size" in text  # lists what is allowed there


def test_bad_value_names_key_and_allowed_values():
    with pytest.raises(ConfigError) as err:
        load_config("ldm-tiny", ["deepspeed.zero_stage=5"])
    assert "deepspeed.zero_stage" in str(err.value) and "0, 1, 2 or 3" in str(err.value)
    with pytest.raises(ConfigError, match="model.prediction_type"):
        load_config("ldm-tiny", ["model.prediction_type=x0"])


def test_unknown_model_key_is_reported_inside_the_family():
    with pytest.raises(ConfigError, match="model.unet.block_out_chanels"):
        load_config("ldm-tiny", ["model.unet.block_out_chanels=[8]"])


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="nccl needs cluster.use_gpu"):
        load_config("ldm-tiny", ["cluster.backend=nccl"])
    with pytest.raises(ConfigError, match="divisible"):
        load_config("ldm-tiny", ["data.resolution=33"])


def test_unknown_config_name_lists_shipped():
    with pytest.raises(ConfigError, match="ldm-tiny"):
        load_config("no-such-config")


def test_cli_refuses_bad_config_before_starting_anything(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "t2i_dist.train", "--config", "ldm-tiny", "deepspeed.zero_stgae=3"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "unknown key 'deepspeed.zero_stgae'" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing was started or written


def test_cli_refuses_unreachable_shards(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "t2i_dist.train",
            "--config",
            "ldm-tiny",
            "data.urls=/nonexistent/shards",
            "data.synthesize.enabled=false",
        ],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "/nonexistent/shards" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_dry_run_prints_parameter_counts(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "t2i_dist.train", "--config", "study-ldm-128", "--dry-run"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert "params/trainable" in proc.stdout and "params/total" in proc.stdout
