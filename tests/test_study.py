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


def test_floors_compare_with_the_floor_or_with_the_untrained_baseline():
    from t2i_dist.study import floor_rows, floors_markdown

    results = {"ldm": {"fid": 100.0, "alignment/colour": 0.7}, "galip": {"fid": 300.0, "alignment/colour": 0.4}}
    baselines = {"networks": {"ldm": {"fid": 450.0}, "galip": {"fid": 450.0}}, "system": {"ldm": {"fid": 200.0}}}
    floors = {
        "ldm": {"alignment/colour": 0.6, "fid_vs_untrained": 0.25, "fid_vs_untrained_system": 0.25},
        "galip": {"alignment/colour": 0.5, "fid_vs_untrained": 0.25, "alignment/shape": 0.5},
    }
    rows = {(r["run"], r["key"]): r for r in floor_rows(results, baselines, floors)}
    assert rows["ldm", "alignment/colour"]["met"] and rows["ldm", "fid_vs_untrained"]["met"]
    assert rows["ldm", "fid_vs_untrained"]["value"] == pytest.approx(100 / 450)
    assert rows["ldm", "fid_vs_untrained_system"]["value"] == pytest.approx(100 / 200)  # its own baseline
    assert not rows["ldm", "fid_vs_untrained_system"]["met"]
    assert not rows["galip", "alignment/colour"]["met"] and not rows["galip", "fid_vs_untrained"]["met"]
    assert rows["galip", "alignment/shape"]["value"] is None and not rows["galip", "alignment/shape"]["met"]
    assert floor_rows(results, {}, {"ldm": {"fid_vs_untrained": 0.25}})[0]["met"] is False  # no baseline: not met
    assert "| galip | alignment/shape | n/a | >= 0.5 | NO |" in floors_markdown(list(rows.values()))


@pytest.mark.parametrize(
    ("floors", "message"),
    [
        ("{ldm-tiny: {fid: 1}}", "floors name runs ['ldm-tiny'] the study does not run (its runs are named ldm-shape"),
        ("{ldm-shapes: {fid_vs_untrained_system: 0.25}}", "add 'system' to evaluation.untrained_baselines"),
    ],
)
def test_bad_floors_are_refused_before_training(tmp_path, capsys, floors, message):
    study = tmp_path / "floors.yaml"
    study.write_text(
        "title: x\nruns: [ldm-shapes]\nevaluation: {protocol: synthetic-tiny, captions: d}\n"
        f"report: {{out: {tmp_path / 'out'}}}\nfloors: {floors}\n"
    )
    assert main(["--config", str(study)]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
