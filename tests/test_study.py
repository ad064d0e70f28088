"""The study command's plan: shipped studies validate against the training configs they name, bad input is
refused before anything trains, and a finished stage is reused only while its settings are unchanged."""

from __future__ import annotations

import pytest

from t2i_dist.config import ConfigError
from t2i_dist.models.registry import family, load_config
from t2i_dist.study import Ledger, load_study, main, shipped_studies


@pytest.mark.parametrize("name", shipped_studies())
def test_shipped_studies_name_valid_image_generator_configs(name):
    study = load_study(name)
    families = [load_config(run).model.family for run in study.runs]
    assert families == ["ldm", "galip"]
    assert all(family(f).generates_images for f in families)


def test_bad_studies_are_refused_with_the_reason(tmp_path, capsys):
    assert main(["--config", "no-such-study"]) == 2
    assert "unknown study 'no-such-study'" in capsys.readouterr().err
    bad = tmp_path / "bad.yaml"
    bad.write_text("title: x\nruns: [ldm-shapes]\nevaluation: {protocol: synthetic-tiny}\nreport: {out: r}\n")
    with pytest.raises(ConfigError, match="captions"):
        load_study(str(bad))
    only_vae = tmp_path / "vae.yaml"
    only_vae.write_text(
        "title: x\nruns: [vae-tiny]\nevaluation: {protocol: synthetic-tiny, captions: d}\n"
        f"report: {{out: {tmp_path / 'out'}}}\n"
    )
    assert main(["--config", str(only_vae)]) == 2
    assert "a study compares image generators" in capsys.readouterr().err


def test_a_finished_stage_is_reused_only_under_the_same_settings(tmp_path):
    ledger = Ledger(tmp_path / "study.json")
    ledger.put("train/ldm-tiny", "digest-a", {"checkpoint": "c1"})
    reread = Ledger(tmp_path / "study.json")  # a later invocation of the study
    assert reread.get("train/ldm-tiny", "digest-a") == {"checkpoint": "c1"}
    assert reread.get("train/ldm-tiny", "digest-b") is None  # changed settings: redone
    assert reread.get("train/galip-tiny", "digest-a") is None
