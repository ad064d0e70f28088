"""python -m t2i_dist.study --config study-tiny|study-128|PATH

The whole study, one command: stage 0 (the frozen parts the runs' configs train themselves), every run of the
study (e.g. the LDM and GALIP), one evaluation of each under the same protocol, captions and seeds (logged to
the run in MLflow), then the report (training, size/speed and quality tables, sample grids of the same
prompts and seeds, loss and FID curves), written to the study's `report.out` and logged to MLflow.

It resumes: a finished stage is recorded in `<report.out>/study.json` with the digest of its settings and is
reused, not redone, while those settings are unchanged.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from t2i_dist.config import Config, ConfigError
from t2i_dist.engine.inference import UntrainedScope
from t2i_dist.models.registry import family, load_config


class Evaluation(BaseModel):
    model_config = ConfigDict(extra="forbid")
    protocol: str
    captions: str = Field(description="caption + image shards: the prompts, and the real images compared with")
    workers: int = Field(2, ge=0)
    extra_args: list[str] = Field(default_factory=list, description="more `t2i_dist.evaluate` flags")
    reference_cache: str | None = Field(
        None,
        description="directory or s3:// prefix for the real images' statistics, computed once for every "
        "evaluation of the study (default: <report.out>/reference)",
    )
    untrained_baselines: list[UntrainedScope] = Field(
        ["networks"],
        description="baselines each run is also evaluated as, what the trained figures are compared with: "
        "'networks' (its trained networks at their initial weights, frozen parts as trained) and/or 'system' "
        "(every part, stage 0's too, at its initial weights); [] for none",
    )
    diversity_seeds: int = Field(
        4, ge=0, description="seeds per report prompt for the diversity figure (0: none); near 0 means mode collapse"
    )


# floors name a result key (fid, alignment/colour, diversity, ...) with the least acceptable value, or with a
# suffix the most acceptable ratio to an untrained baseline's value: fid_vs_untrained (the 'networks'
# baseline) or fid_vs_untrained_system
VS_UNTRAINED = re.compile(rf"^(?P<metric>.+)_vs_untrained(?:_(?P<scope>{'|'.join(get_args(UntrainedScope))}))?$")


def ratio_floor(key: str) -> tuple[str, str] | None:
    """(metric, baseline scope) of a ratio floor's key; None for a plain least-value floor."""
    ratio = VS_UNTRAINED.match(key)
    return (ratio["metric"], ratio["scope"] or "networks") if ratio else None


class ReportSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")
    out: str
    prompts: list[str] | None = None
    seeds: int = Field(2, ge=1)


class Study(BaseModel):
    model_config = ConfigDict(extra="forbid")
    title: str
    runs: list[str] = Field(min_length=1, description="training configs (shipped names or paths)")
    overrides: dict[str, list[str]] = Field(default_factory=dict, description="per run: dotted overrides")
    evaluation: Evaluation
    report: ReportSettings
    floors: dict[str, dict[str, float]] = Field(
        default_factory=dict, description="per run name: result key -> floor; printed and reported, pass or miss"
    )


def shipped_studies() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("t2i_dist.studies").iterdir() if p.name.endswith(".yaml"))


def load_study(name_or_path: str) -> Study:
    path = Path(name_or_path)
    if not path.is_file():
        path = Path(str(resources.files("t2i_dist.studies") / f"{name_or_path}.yaml"))
    if not path.is_file():
        raise ConfigError(f"unknown study {name_or_path!r}: pass a YAML path or one of {', '.join(shipped_studies())}")
    try:
        return Study.model_validate(yaml.safe_load(path.read_text()) or {})
    except ValidationError as exc:
        raise ConfigError(f"invalid study {path}: {exc}") from None


def digest(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class Ledger:
    """study.json: what each finished stage produced, under the digest of the settings that produced it."""

    def __init__(self, path: Path):
        self.path = path
        self.stages: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def get(self, stage: str, key: str) -> dict[str, Any] | None:
        entry = self.stages.get(stage)
        return entry["result"] if entry and entry.get("digest") == key else None

    def put(self, stage: str, key: str, result: dict[str, Any]) -> None:
        self.stages[stage] = {"digest": key, "result": result, "finished": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(self.path.name + ".tmp")
        tmp.write_text(json.dumps(self.stages, indent=2))
        tmp.replace(self.path)


def train_stage(cfg: Config, ledger: Ledger) -> dict[str, Any]:
    from t2i_dist.components import resolve_components
    from t2i_dist.train import run_training

    resolved = resolve_components(cfg, run_training)  # stage 0, reused when already trained
    key = digest(resolved.to_dict())
    done = ledger.get(f"train/{cfg.run.name}", key)
    if done:
        print(f"[t2i_dist] study: reusing the finished run '{cfg.run.name}' ({done['checkpoint']})")
        return done
    result = run_training(resolved)
    if not result.checkpoint or not result.run_info.get("mlflow_run_id"):
        raise ConfigError(f"run '{cfg.run.name}' finished without a checkpoint or an MLflow run: nothing to compare")
    record = {
        "checkpoint": result.checkpoint,
        "mlflow_run_id": result.run_info["mlflow_run_id"],
        "tracking_uri": result.run_info["tracking_uri"],
        "seconds": result.seconds,
    }
    ledger.put(f"train/{cfg.run.name}", key, record)
    return record


def evaluate_stage(
    name: str, trained: dict[str, Any], study: Study, ledger: Ledger, untrained: UntrainedScope | None = None
) -> dict[str, Any]:
    from t2i_dist.evaluate import build_parser, evaluate, log_to_mlflow

    e = study.evaluation
    args = build_parser().parse_args(
        [
            "--checkpoint", trained["checkpoint"],
            "--protocol", e.protocol,
            "--captions", e.captions,
            "--workers", str(e.workers),
            "--reference-cache", e.reference_cache or str(Path(study.report.out) / "reference"),
            *(["--untrained", untrained] if untrained else []),
            *e.extra_args,
        ]
    )  # fmt: skip
    what = f"the untrained ({untrained}) baseline of" if untrained else "the evaluation of"
    stage = {None: "evaluate", "networks": "evaluate-untrained", "system": "evaluate-untrained-system"}[untrained]
    stage = f"{stage}/{name}"
    settings = e.model_dump(exclude={"diversity_seeds", "untrained_baselines"})
    key = digest({"trained": trained, "evaluation": settings, "untrained": untrained})
    done = ledger.get(stage, key)
    if done:
        print(f"[t2i_dist] study: reusing {what} '{name}'")
        return done
    print(f"[t2i_dist] study: {what} '{name}' ({e.protocol}, captions {e.captions})")
    result = evaluate(args)
    if not untrained:  # the run's own metrics; the baseline lives in the study's files
        log_to_mlflow(result, trained["mlflow_run_id"], trained["tracking_uri"], step=0)
    ledger.put(stage, key, result)
    return result


def diversity(checkpoint: str, prompts: list[str], seeds: int) -> float:
    """Mean pairwise pixel distance between images of one prompt under different seeds (engine's
    sample/diversity on the report's prompts): near 0 means the generator ignores its noise."""
    from t2i_dist.engine.components.samples import prompt_diversity
    from t2i_dist.engine.inference import load_plugin

    plugin = load_plugin(checkpoint)
    images = plugin.sample([p for _ in range(seeds) for p in prompts], [s for s in range(seeds) for _ in prompts])
    return prompt_diversity(images, seeds, len(prompts))


Baselines = dict[str, dict[str, dict[str, Any]]]  # scope -> run -> result


def floor_rows(
    results: dict[str, dict[str, Any]], baselines: Baselines, floors: dict[str, dict[str, float]]
) -> list[dict[str, Any]]:
    """One row per (run, floor): the measured value, the floor, and whether it is met."""
    rows = []
    for name, wanted in floors.items():
        result = results.get(name)
        if result is None:
            raise ConfigError(f"floors name run {name!r}, which the study does not run ({', '.join(results)})")
        for key, floor in wanted.items():
            ratio = ratio_floor(key)
            if ratio:
                metric, scope = ratio
                base = baselines.get(scope, {}).get(name, {}).get(metric)
                measured = result.get(metric)
                value = measured / base if base and measured is not None else None
                met = value is not None and value <= floor
                rows.append({"run": name, "key": key, "value": value, "floor": floor, "met": met, "bound": "<="})
            else:
                value = result.get(key)
                met = value is not None and value >= floor
                rows.append({"run": name, "key": key, "value": value, "floor": floor, "met": met, "bound": ">="})
    return rows


def floors_markdown(rows: list[dict[str, Any]]) -> str:
    lines = ["| run | measure | value | floor | met |", "|---|---|---|---|---|"]
    for r in rows:
        value = "n/a" if r["value"] is None else f"{r['value']:.3g}"
        lines.append(
            f"| {r['run']} | {r['key']} | {value} | {r['bound']} {r['floor']:g} | {'yes' if r['met'] else 'NO'} |"
        )
    return "\n".join(lines) + "\n"


def run_study(study: Study, tracking_uri: str | None = None) -> tuple[Path, list[dict[str, Any]]]:
    out = Path(study.report.out)
    ledger = Ledger(out / "study.json")
    started = time.time()
    configs = []
    for run in study.runs:  # every config checked before anything trains
        overrides = list(study.overrides.get(run, []))
        if tracking_uri:
            overrides.append(f"tracking.uri={tracking_uri}")
        cfg = load_config(run, overrides)
        if not family(cfg.model.family).generates_images:
            raise ConfigError(f"study run {run!r} is a {cfg.model.family} config: a study compares image generators")
        configs.append(cfg)
    for wanted in study.floors.values():
        for key in wanted:
            ratio = ratio_floor(key)
            scope = ratio[1] if ratio else None
            if scope and scope not in study.evaluation.untrained_baselines:
                raise ConfigError(
                    f"floor {key!r} compares with the untrained {scope!r} baseline, which the study does not "
                    f"evaluate: add {scope!r} to evaluation.untrained_baselines"
                )
    unknown = sorted(set(study.floors) - {cfg.run.name for cfg in configs})
    if unknown:
        names = ", ".join(cfg.run.name for cfg in configs)
        raise ConfigError(f"floors name runs {unknown} the study does not run (its runs are named {names})")
    trained = {cfg.run.name: train_stage(cfg, ledger) for cfg in configs}
    e = study.evaluation
    results = {name: evaluate_stage(name, t, study, ledger) for name, t in trained.items()}
    baselines: Baselines = {
        scope: {name: evaluate_stage(name, t, study, ledger, untrained=scope) for name, t in trained.items()}
        for scope in e.untrained_baselines
    }
    if e.diversity_seeds >= 2:
        prompts = study.report.prompts or ["a red circle", "a blue square", "a green triangle", "a yellow circle"]
        for name, t in trained.items():
            results[name]["diversity"] = diversity(t["checkpoint"], prompts, e.diversity_seeds)
    from t2i_dist.eval.summary import summary_line

    for name, result in results.items():
        print(
            f"[t2i_dist] {name}: {summary_line(result)}"
            + (f" · diversity {result['diversity']:.3g}" if "diversity" in result else "")
        )
        for scope, by_run in baselines.items():
            print(f"[t2i_dist] {name} untrained ({scope}): {summary_line(by_run[name])}")
    rows = floor_rows(results, baselines, study.floors)
    from t2i_dist.report.cli import main as report_main

    argv = ["--runs", *(t["mlflow_run_id"] for t in trained.values())]
    argv += ["--checkpoints", *(t["checkpoint"] for t in trained.values())]
    argv += ["--tracking-uri", next(iter(trained.values()))["tracking_uri"], "--format", "md", "--out", str(out)]
    argv += ["--title", study.title, "--seeds", str(study.report.seeds)]
    if study.report.prompts:
        argv += ["--prompts", *study.report.prompts]
    if report_main(argv) != 0:
        raise ConfigError("the report could not be written (see above)")
    (out / "evaluation.json").write_text(
        json.dumps({"trained": results, "untrained": baselines, "floors": rows}, indent=2)
    )
    if rows:
        table = floors_markdown(rows)
        (out / "floors.md").write_text(table)
        with (out / "report.md").open("a") as report:
            report.write(f"\n## Floors\n\n{table}")
        missed = sum(not r["met"] for r in rows)
        print(f"[t2i_dist] study floors ({len(rows) - missed} of {len(rows)} met):\n{table}", end="")
    print(f"[t2i_dist] study finished in {time.time() - started:.0f}s: {out / 'report.md'}")
    return out, rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m t2i_dist.study", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    shipped = ", ".join(shipped_studies())
    parser.add_argument("--config", default="study-tiny", help=f"shipped study ({shipped}) or path")
    parser.add_argument("--tracking-uri", help="MLflow for every run of the study (default: the runs' configs)")
    parser.add_argument(
        "--require-floors", action="store_true", help="exit with status 3 when any of the study's floors is missed"
    )
    args = parser.parse_args(argv)
    from t2i_dist.launch import TrainingError

    try:
        study = load_study(args.config)
        _, rows = run_study(study, args.tracking_uri)
    except (ConfigError, TrainingError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, TrainingError) else 2
    missed = [f"{r['run']} {r['key']}" for r in rows if not r["met"]]
    if missed and args.require_floors:
        print(f"error: floors missed: {', '.join(missed)}", file=sys.stderr)
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
