"""Faults produced for real on real components (2 Ray Train workers, DeepSpeed, a moto S3 server, mlflow
servers), each followed by what the system promises. Four runs carry all faults, to keep fits few (every
run reads through 2 loader processes per worker, as real runs do):

- crash run (in-process driver): S3 shards with bad samples; the S3 server stopped ~10 s mid-run; one worker
  SIGKILLed while both are inside a checkpoint save; Ray Train restarts the group from the last checkpoint.
- preemption runs (`python -m t2i_dist.train` subprocesses): the MLflow server killed mid-run; SIGTERM to a
  worker stops the first launch with a checkpoint; the relaunch resumes, then SIGTERM to the driver stops it.
- grace run (subprocess): SIGTERM to the driver while the workers are stuck in a save; it stops itself after
  run.preemption_grace_s.
- NaN run (bf16): MLflow unreachable at start; non-finite gradients and losses injected until the run aborts.

Without Ray: mostly bad shards abort the real loop through data.max_skip_fraction.

Secrets are set to marker values for the first two and searched for in every artefact at the end.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
import torch

from t2i_dist.engine.checkpoint import CheckpointError, load_for_inference, verify_checkpoint
from t2i_dist.tracking import client_for, local_store_uri
from t2i_dist.train import main as train_main
from tests.dist_utils import run_distributed
from tests.faults_data import EXPECTED_REASONS, write_faulty_shards, write_mostly_bad_shards
from tests.faults_runs import (
    Disturbance,
    files_containing,
    history,
    last_step_printed,
    logged_steps,
    mlflow_texts,
    ray_logs_dir,
    save_marker,
    single_run,
    wait_for,
    worker_pid,
)
from tests.fixtures_mlflow import free_port, start_mlflow_server, stop_mlflow_server

pytestmark = pytest.mark.slow

UID = uuid.uuid4().hex[:10]
SECRETS = {  # marker values no run may write anywhere
    "AWS_ACCESS_KEY_ID": f"AKIAFAULTS{UID.upper()}",
    "AWS_SECRET_ACCESS_KEY": f"aws-secret-{UID}",
    "MLFLOW_TRACKING_TOKEN": f"mlflow-token-{UID}",
    "tracking password": f"uri-password-{UID}",
}
# the same model, data order and seed in every run, so their first steps can be compared
COMMON = [
    "model.vae.train_config=null",  # random frozen parts: no stage-0 training in this test
    "model.text.train_config=null",
    "cluster.num_workers=2",
    "deepspeed.micro_batch_size=8",
    "data.loader_workers=2",  # reader processes, as in real runs: killed ranks and SIGTERMs meet them too
    "data.resolution=32",
    "data.synthesize.enabled=false",
    "data.shuffle_buffer=8",
    "data.max_skip_fraction=0.2",
    "tracking.samples_per_prompt=1",
    "model.sampling.steps=2",
    "optim.warmup_steps=0",
    "optim.lr=0.002",
    "run.sample_every=0",
    "run.log_every=1",
    "run.seed=3",
    "run.deterministic=true",
]
SAME_FIRST_STEPS = 3
RAY_PREFIX = re.compile(r"^(\x1b\[\d+m)?\(\w+ pid=\d+")  # a line Ray forwards from a worker or actor
DRIVER_TIMEOUT_S = 900


def ckpt_dirs(run_dir: Path) -> dict[int, Path]:
    """Published checkpoints by step."""
    out = {}
    for path in sorted(run_dir.glob("checkpoint_*")):
        if path.is_dir() and (path / "trainer_state.json").is_file():
            out[json.loads((path / "trainer_state.json").read_text())["step"]] = path
    return out


@pytest.fixture(scope="module")
def faulty_shards(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    out = tmp_path_factory.mktemp("faulty") / "shards"
    return out, write_faulty_shards(out)


# ------------------------------------------------------------------------------------------------ crash run


@dataclass
class CrashRun:
    workdir: Path
    experiment: str
    bucket: str
    output: str
    partial_dirs: list[Path]
    moto_log_after_outage: str  # the S3 server's request log from its restart to the end of the run
    run_dir: Path = field(init=False)

    def __post_init__(self) -> None:
        self.run_dir = self.workdir / "runs" / "crash"


def bucket_read_logs(bucket: str) -> str:
    """The Ray workers' stderr logs that mention reads from `bucket`, joined (a worker's loader processes
    write to its log too)."""
    texts = (p.read_text(errors="replace") for p in ray_logs_dir().glob("worker-*.err"))
    return "\n".join(t for t in texts if f"s3://{bucket}/" in t)


def retried_reads(bucket: str) -> dict[str, int]:
    """Shard URL -> highest retry number of the failed reads of `bucket` the workers logged."""
    found: dict[str, int] = {}
    pattern = rf"reading (s3://{re.escape(bucket)}/\S+) failed at byte \d+ .*; retry (\d+)/\d+ in "
    for url, attempt in re.findall(pattern, bucket_read_logs(bucket)):
        found[url] = max(found.get(url, 0), int(attempt))
    return found


def objects_served(moto_log: str, bucket: str) -> set[str]:
    """Keys of `bucket` the S3 server answered a GET for (whole or ranged) in this part of its log."""
    pattern = rf'"(?:\x1b\[[\d;]*m)*GET /{re.escape(bucket)}/(\S+) HTTP/[\d.]+(?:\x1b\[[\d;]*m)*" 20[06] '
    return set(re.findall(pattern, moto_log))


@pytest.fixture(scope="module")
def crash_run(ray_cluster, mlflow_server, s3_server, faulty_shards, tmp_path_factory) -> Iterator[CrashRun]:
    workdir = tmp_path_factory.mktemp("crash")
    markers = workdir / "markers"
    markers.mkdir()
    bucket = f"faulty-{UID}"
    url = s3_server.upload_dir(faulty_shards[0], bucket, "shards")
    experiment = f"faults-{UID}-crash"
    overrides = [
        *COMMON,
        f"data.urls={url}/",
        "data.s3.retries=12",
        f"tracking.uri={mlflow_server.uri}",
        f"tracking.experiment={experiment}",
        "run.name=crash",
        "run.max_steps=12",
        "run.checkpoint_every=4",
        "run.keep_checkpoints=3",
        "run.max_failures=1",
    ]
    run_dir = workdir / "runs" / "crash"

    def storage_outage() -> int:
        # once the first checkpoint is published the run is mid-way; its next shard reads meet the outage
        wait_for(lambda: 4 in ckpt_dirs(run_dir), DRIVER_TIMEOUT_S, "the checkpoint of step 4")
        s3_server.stop()
        time.sleep(10)
        # stay down until a worker has retried: retries below our reader (botocore, s3fs) or a read-ahead
        # must not be able to hide the outage; 12 retries give the workers ~60 s
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: "retry 1/12" in bucket_read_logs(bucket), 40, "a worker retrying a read")
        restarted_at = s3_server.log_path.stat().st_size  # what the server logs from here on is after it
        s3_server.start()
        return restarted_at

    def kill_in_mid_save() -> list[Path]:
        # both ranks pause inside the save of step 8, before their manifests; rank 1 dies there
        paused = wait_for(
            lambda: save_marker(markers, 8, 1) and save_marker(markers, 8, 0),
            DRIVER_TIMEOUT_S,
            "both workers inside the save of step 8",
        )
        os.kill(paused["pid"], signal.SIGKILL)
        return [Path(save_marker(markers, 8, r)["directory"]) for r in (0, 1)]

    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        for name, value in {**s3_server.env(), **{k: v for k, v in SECRETS.items() if k.isupper()}}.items():
            mp.setenv(name, value)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        mp.setenv("T2I_FAULT_MARKER_DIR", str(markers))
        mp.setenv("T2I_FAULT_PAUSE_SAVE_STEP", "8")
        mp.setenv("T2I_FAULT_PAUSE_S", "600")
        outage = Disturbance(storage_outage)
        kill = Disturbance(kill_in_mid_save)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = train_main(["--config", "ldm-tiny", *overrides])
    print(out.getvalue())
    assert code == 0
    partial = kill.check()
    after_outage = s3_server.log_path.read_bytes()[outage.check() :].decode(errors="replace")
    yield CrashRun(workdir, experiment, bucket, out.getvalue(), partial, after_outage)
    for directory in partial:  # left in the workers' temp directory by the killed save
        shutil.rmtree(directory, ignore_errors=True)


def test_killed_worker_restarts_from_last_checkpoint_and_finishes(crash_run, mlflow_server):
    client = mlflow_server.client()
    run = single_run(client, crash_run.experiment)  # the restarted group kept logging to the same run
    steps = [s for s, _ in history(client, run.info.run_id, "loss")]
    rewinds = [(a, b) for a, b in zip(steps, steps[1:], strict=False) if b <= a]
    # the only step back is the restart: to just after the checkpoint of step 4, from at most step 8
    assert len(rewinds) == 1, steps
    ((before, after),) = rewinds
    assert after == 5 and 5 <= before <= 8, steps
    assert steps[-1] == 12 and set(steps) == set(range(1, 13))
    # the resume is exact: weights, optimizer, data position and random state come back, so the steps
    # trained twice (after the checkpoint, before the kill) give the same losses again
    losses = history(client, run.info.run_id, "loss")
    first_try, second_try = dict(losses[: steps.index(before) + 1]), dict(losses[steps.index(before) + 1 :])
    again = {s: first_try[s] for s in range(5, before + 1)}
    assert again == {s: second_try[s] for s in again}
    assert run.info.status == "FINISHED"


def test_no_checkpoint_is_lost_or_half_written(crash_run):
    published = ckpt_dirs(crash_run.run_dir)
    assert set(published) == {4, 8, 12}
    for step, path in published.items():
        assert verify_checkpoint(path)["step"] == step
    # what the killed save left behind is refused: rank 0 wrote all but its manifest, rank 1 less
    for directory in crash_run.partial_dirs:
        assert directory.is_dir()
        with pytest.raises(CheckpointError, match="missing"):
            verify_checkpoint(directory)
    # and sampling refuses it too, although rank 0 had written the weights and the config
    rank0 = crash_run.partial_dirs[0]
    assert (rank0 / "inference.pt").is_file() and (rank0 / "config.json").is_file()
    with pytest.raises(CheckpointError, match="incomplete"):
        load_for_inference(str(rank0))


def test_checkpoint_before_the_crash_loads_and_samples(crash_run):
    from t2i_dist.engine.inference import load_plugin

    plugin = load_plugin(str(ckpt_dirs(crash_run.run_dir)[4]), "cpu")
    images = plugin.sample(["a red circle"], [0], steps=2)
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_bad_samples_are_skipped_counted_by_reason_and_the_run_continues(crash_run, mlflow_server):
    client = mlflow_server.client()
    run = single_run(client, crash_run.experiment)
    metrics = run.data.metrics
    for reason in EXPECTED_REASONS:
        assert metrics.get(f"data/skipped/{reason}", 0) >= 1, f"no {reason} counted: {sorted(metrics)}"
    assert metrics["data/skipped"] == sum(v for k, v in metrics.items() if k.startswith("data/skipped/"))
    # reaching step 12 is the 'run continues'; no shard was given up during the storage outage
    assert "data/skipped/unreadable_shard" not in metrics


def test_storage_outage_is_retried_and_the_run_continues(crash_run, mlflow_server):
    bucket = crash_run.bucket
    # the workers met the outage: their reads from the bucket failed (only a stopped server refuses them)
    # and were retried, none of them up to the last of its 12 tries
    retried = retried_reads(bucket)
    assert retried, "no worker logged a failed, retried read from the bucket: the outage went unnoticed"
    assert max(retried.values()) < 12, retried
    # and recovered: every shard whose read was retried was served by the server after it came back, and
    # no read was given up (a shard given up is logged, and counted as unreadable_shard)
    served = objects_served(crash_run.moto_log_after_outage, bucket)
    assert {url.split(f"s3://{bucket}/", 1)[1] for url in retried} <= served, (sorted(retried), sorted(served))
    text = bucket_read_logs(bucket)
    assert f"cannot open shard s3://{bucket}/" not in text and f"reading shard s3://{bucket}/" not in text
    client = mlflow_server.client()
    run = single_run(client, crash_run.experiment)
    assert "data/skipped/unreadable_shard" not in run.data.metrics
    assert max(s for s, _ in history(client, run.info.run_id, "loss")) == 12  # the run went on to its end


# ------------------------------------------------------------------------------------------ preemption runs


@dataclass
class PreemptionRuns:
    workdir: Path
    experiment: str
    tracking: object
    first_log: Path
    second_log: Path
    first_stop_step: int
    second_stop_step: int
    steps_before_mlflow_died: list[int]


def launch(workdir: Path, log: Path, overrides: list[str], env: dict[str, str]) -> subprocess.Popen:
    with log.open("ab") as fh:
        return subprocess.Popen(
            [sys.executable, "-m", "t2i_dist.train", "--config", "ldm-tiny", *overrides],
            cwd=workdir,
            env=env,
            stdout=fh,
            stderr=subprocess.STDOUT,
        )


def finish(proc: subprocess.Popen, log: Path) -> str:
    try:
        proc.wait(DRIVER_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    text = log.read_text(errors="replace")
    assert proc.returncode == 0, text[-4000:]
    return text


@pytest.fixture(scope="module")
def preemption_runs(ray_cluster, faulty_shards, tmp_path_factory) -> Iterator[PreemptionRuns]:
    workdir = tmp_path_factory.mktemp("preempt")
    markers = workdir / "markers"
    markers.mkdir()
    root, port = workdir / "mlflow", free_port()
    experiment = f"faults-{UID}-preempt"
    uri = f"http://t2i:{SECRETS['tracking password']}@127.0.0.1:{port}"
    overrides = [
        *COMMON,
        f"data.urls={faulty_shards[0]}",
        f"tracking.uri={uri}",
        f"tracking.experiment={experiment}",
        "run.name=preempt",
        "run.max_steps=200",
        "run.checkpoint_every=1000",
        "run.max_failures=0",
        "run.preemption_grace_s=120",
        "run.preemption_poll_s=2",  # launch 2 stops through the driver's request file: look for it often
    ]
    env = {**os.environ, **{k: v for k, v in SECRETS.items() if k.isupper()}, "T2I_FAULT_MARKER_DIR": str(markers)}
    env.pop("MLFLOW_TRACKING_URI", None)
    first_log, second_log = workdir / "first.log", workdir / "second.log"
    server = start_mlflow_server(root, port)
    proc = None
    try:
        # launch 1: the MLflow server dies after a few logged steps; later SIGTERM reaches one worker
        proc = launch(workdir, first_log, overrides, env)
        client = server.client()
        before = wait_for(
            lambda: s if len(s := logged_steps(client, experiment)) >= SAME_FIRST_STEPS else None,
            DRIVER_TIMEOUT_S,
            "steps logged to MLflow",
        )
        stop_mlflow_server(server)
        down_at = last_step_printed(first_log)
        wait_for(lambda: last_step_printed(first_log) >= down_at + 3, DRIVER_TIMEOUT_S, "steps without MLflow")
        os.kill(worker_pid(markers, 1), signal.SIGTERM)
        first_stop = _preempted_step(finish(proc, first_log))

        # launch 2, with MLflow back: resumes, then SIGTERM reaches the driver
        server = start_mlflow_server(root, port)
        proc = launch(workdir, second_log, overrides, env)
        wait_for(lambda: last_step_printed(second_log) >= first_stop + 3, DRIVER_TIMEOUT_S, "resumed steps")
        proc.send_signal(signal.SIGTERM)
        second_stop = _preempted_step(finish(proc, second_log))
        yield PreemptionRuns(
            workdir, experiment, server, first_log, second_log, first_stop, second_stop, sorted(set(before))
        )
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        stop_mlflow_server(server)


def _preempted_step(output: str) -> int:
    for line in output.splitlines():
        if line.startswith("[t2i_dist] preempted at step "):
            return int(line.split()[4])
    raise AssertionError(f"no preemption checkpoint reported:\n{output[-4000:]}")


def test_sigterm_to_a_worker_checkpoints_and_exits_cleanly(preemption_runs):
    runs = preemption_runs
    first = runs.first_log.read_text()
    assert f"preempted at step {runs.first_stop_step} of 200: relaunch the same command to resume" in first
    published = ckpt_dirs(runs.workdir / "runs" / "preempt")
    assert verify_checkpoint(published[runs.first_stop_step])["step"] == runs.first_stop_step


def test_relaunch_resumes_and_sigterm_to_the_driver_checkpoints(preemption_runs):
    runs = preemption_runs
    second = runs.second_log.read_text()
    assert f"resumed from checkpoint at step {runs.first_stop_step}" in second
    assert "SIGTERM: asking the workers to checkpoint and stop" in second
    assert runs.second_stop_step > runs.first_stop_step
    published = ckpt_dirs(runs.workdir / "runs" / "preempt")
    assert set(published) == {runs.first_stop_step, runs.second_stop_step}
    assert verify_checkpoint(published[runs.second_stop_step])["step"] == runs.second_stop_step


def test_metrics_survive_a_dead_mlflow_server(preemption_runs):
    runs = preemption_runs
    client = runs.tracking.client()
    run = single_run(client, runs.experiment)  # the relaunch continued the same MLflow run
    in_mlflow = {s for s, _ in history(client, run.info.run_id, "loss")}
    # what could not be sent while the server was down was kept in a local file, and reported
    fallback = runs.workdir / "runs" / "preempt" / f"mlflow-unsent-{run.info.run_id}.jsonl"
    assert f"unsent tracking records were saved to {fallback}" in runs.first_log.read_text()
    unsent = [json.loads(line) for line in fallback.read_text().splitlines()]
    in_file = {r["payload"][1] for r in unsent if r["kind"] == "metrics" and "loss" in r["payload"][0]}
    assert in_file, "the fallback file holds no loss record"
    # nothing silently dropped: every step of both launches is in MLflow or in the fallback file
    assert in_mlflow | in_file == set(range(1, runs.second_stop_step + 1))
    assert set(runs.steps_before_mlflow_died) <= in_mlflow
    assert {s for s in in_mlflow if s > runs.first_stop_step} == set(
        range(runs.first_stop_step + 1, runs.second_stop_step + 1)
    )


def test_same_seed_gives_the_same_loss_curve(crash_run, preemption_runs, mlflow_server):
    """Two launches with the same config and seed on 2 CPU workers: the first steps' losses are identical."""
    crash_client, preempt_client = mlflow_server.client(), preemption_runs.tracking.client()
    a = history(crash_client, single_run(crash_client, crash_run.experiment).info.run_id, "loss")
    b = history(preempt_client, single_run(preempt_client, preemption_runs.experiment).info.run_id, "loss")
    first_a = dict(a[:SAME_FIRST_STEPS])
    first_b = {s: v for s, v in b if s <= SAME_FIRST_STEPS}
    assert list(first_a) == list(range(1, SAME_FIRST_STEPS + 1))
    assert first_a == first_b
    assert len(set(first_a.values())) == SAME_FIRST_STEPS  # real, changing values


# ------------------------------------------------------------------------------------------- grace time-out

GRACE_S = 5


@dataclass
class GraceRun:
    workdir: Path
    log: Path
    exit_code: int
    seconds_after_sigterm: float
    workers_left: list[int]  # PIDs of the run's workers still alive a while after the driver exited


@pytest.fixture(scope="module")
def grace_run(ray_cluster, faulty_shards, tmp_path_factory) -> Iterator[GraceRun]:
    """A driver that gets SIGTERM while both workers are stuck inside a periodic save (paused for far
    longer than run.preemption_grace_s): they cannot checkpoint and stop in time."""
    workdir = tmp_path_factory.mktemp("grace")
    markers = workdir / "markers"
    markers.mkdir()
    overrides = [
        *COMMON,
        f"data.urls={faulty_shards[0]}",
        "run.name=grace",
        "run.max_steps=200",
        "run.checkpoint_every=2",  # step 2 is published; the save of step 4 never ends
        "run.max_failures=0",
        "eval.every=0",
        f"run.preemption_grace_s={GRACE_S}",
        "run.preemption_poll_s=1",
    ]
    env = {
        **os.environ,
        "T2I_FAULT_MARKER_DIR": str(markers),
        "T2I_FAULT_PAUSE_SAVE_STEP": "4",
        "T2I_FAULT_PAUSE_S": "600",
    }
    env.pop("MLFLOW_TRACKING_URI", None)  # the local store: this run needs no tracking server
    log = workdir / "driver.log"
    pids: list[int] = []
    proc = launch(workdir, log, overrides, env)

    def both_paused() -> bool:
        if proc.poll() is not None:
            tail = log.read_text(errors="replace")[-4000:]
            raise AssertionError(f"the driver exited ({proc.returncode}) before the save of step 4:\n{tail}")
        return bool(save_marker(markers, 4, 0) and save_marker(markers, 4, 1))

    try:
        wait_for(both_paused, DRIVER_TIMEOUT_S, "both workers inside the save of step 4")
        pids = [save_marker(markers, 4, r)["pid"] for r in (0, 1)]
        proc.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        try:
            proc.wait(GRACE_S + 120)
        except subprocess.TimeoutExpired:
            pass  # asserted on below: the driver did not stop itself
        seconds = time.monotonic() - sent
        code = proc.poll()
        # the driver's Ray job is over: Ray stops its workers (still inside their 600 s pause)
        with contextlib.suppress(TimeoutError):
            wait_for(lambda: not any(map(_alive, pids)), 60, "the workers to be stopped")
        yield GraceRun(workdir, log, -1 if code is None else code, seconds, [p for p in pids if _alive(p)])
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for pid in pids:  # the run's paused workers, should Ray have left them: they hold the cluster's CPUs
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def test_driver_stops_itself_when_the_workers_miss_the_grace_period(grace_run):
    text = grace_run.log.read_text(errors="replace")
    assert grace_run.exit_code != -1, (
        f"the driver was still running {grace_run.seconds_after_sigterm:.0f}s after SIGTERM"
    )
    assert f"SIGTERM: asking the workers to checkpoint and stop (run.preemption_grace_s={GRACE_S})" in text
    assert (
        f"the workers did not stop within run.preemption_grace_s={GRACE_S}; stopping the driver (the last "
        "periodic checkpoint is kept)" in text
    ), text[-4000:]
    run_dir = grace_run.workdir / "runs" / "grace"
    relaunch = "stopped by SIGTERM before the workers checkpointed; relaunch the same command to resume from"
    assert f"{relaunch} the last checkpoint under {run_dir}" in text, text[-4000:]
    # not a normal end: a failing exit code (128 + SIGTERM), no 'preempted at step' claim, no traceback
    assert grace_run.exit_code == 128 + signal.SIGTERM, text[-4000:]
    own = "\n".join(line for line in text.splitlines() if not RAY_PREFIX.match(line))  # not the actors' logs
    assert "preempted at step" not in own and "Traceback (most recent call last)" not in own, own[-4000:]
    # it waited the grace period, then stopped soon after it (not when the workers' 600 s pause ended)
    assert GRACE_S <= grace_run.seconds_after_sigterm <= GRACE_S + 60, grace_run.seconds_after_sigterm
    assert not grace_run.workers_left, f"workers left running after the driver stopped: {grace_run.workers_left}"


def test_grace_time_out_keeps_the_last_good_checkpoint(grace_run):
    from t2i_dist.engine.inference import load_plugin

    published = ckpt_dirs(grace_run.workdir / "runs" / "grace")
    assert set(published) == {2}, "the save of step 4 never finished: only step 2's checkpoint is published"
    assert verify_checkpoint(published[2])["step"] == 2
    images = load_plugin(str(published[2]), "cpu").sample(["a red circle"], [0], steps=2)
    assert torch.isfinite(images).all()


# ------------------------------------------------------------------------------------------------- NaN run


@dataclass
class NanRun:
    workdir: Path
    exit_code: int
    output: str


@pytest.fixture(scope="module")
def nan_run(ray_cluster, faulty_shards, tmp_path_factory) -> NanRun:
    workdir = tmp_path_factory.mktemp("nan")
    dead_mlflow = f"http://127.0.0.1:{free_port()}"
    overrides = [
        *COMMON,
        f"data.urls={faulty_shards[0]}",
        f"tracking.uri={dead_mlflow}",
        "run.name=nan",
        "deepspeed.precision=bf16",
        "run.max_steps=20",
        "run.checkpoint_every=4",
        "run.max_nonfinite_steps=3",
        "run.max_failures=0",
    ]
    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(workdir)
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)
        # step 2: gradients overflow (DeepSpeed skips the update); 3, 6, 7, 8...: the loss is NaN
        mp.setenv("T2I_FAULT_NAN_GRAD_STEPS", "2")
        mp.setenv("T2I_FAULT_NAN_LOSS_STEPS", "3,6-20")
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
            code = train_main(["--config", "ldm-tiny", *overrides])
    print(out.getvalue())
    return NanRun(workdir, code, out.getvalue())


def test_nonfinite_steps_are_skipped_counted_then_abort(nan_run):
    # the driver ends with a one-line reason and a failing exit code, not a traceback
    assert nan_run.exit_code == 1, "the run did not stop on repeated non-finite steps"
    error_lines = [line for line in nan_run.output.splitlines() if line.startswith("error: training failed:")]
    assert len(error_lines) == 1, nan_run.output[-3000:]
    assert "3 consecutive steps had a non-finite loss or gradient (run.max_nonfinite_steps=3)" in error_lines[0]
    # MLflow was down at start: the run went to the local store, with a warning, and trained
    assert "is unreachable; logging to the local store" in nan_run.output
    client = client_for(local_store_uri(nan_run.workdir))
    run = single_run(client, "t2i_dist")
    counts = dict(history(client, run.info.run_id, "nonfinite_steps"))
    # overflowing gradients (step 2) and NaN losses (3, then 6-8) are counted; 8 is the third in a row
    assert {s: counts[s] for s in (1, 2, 3, 4, 5, 6, 7, 8)} == {1: 0, 2: 1, 3: 2, 4: 2, 5: 2, 6: 3, 7: 4, 8: 5}
    assert max(counts) == 8


def test_abort_keeps_the_last_good_checkpoint(nan_run):
    published = ckpt_dirs(nan_run.workdir / "runs" / "nan")
    assert set(published) == {4}
    assert verify_checkpoint(published[4])["step"] == 4
    weights = torch.load(published[4] / "inference.pt", map_location="cpu", weights_only=False)
    tensors = list(_tensors(weights))
    assert tensors and all(torch.isfinite(t.float()).all() for t in tensors), "a skipped step changed weights"


def _tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)


# ----------------------------------------------------------------------------------------- no Ray needed


def test_bad_storage_fails_at_start_before_any_worker(s3_env, workdir, capsys, monkeypatch):
    base = ["--config", "ldm-tiny", *COMMON, "run.name=bad-storage"]
    assert train_main([*base, f"data.urls=s3://missing-{UID}/shards/"]) == 2
    err = capsys.readouterr().err
    assert f"bucket 'missing-{UID}' of data.urls" in err and "does not exist" in err

    url = s3_env.upload_dir(_tiny_shards(workdir), f"creds-{UID}", "s")
    with s3_env.enforce_auth():
        monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "wrong")
        assert train_main([*base, f"data.urls={url}/"]) == 2
    err = capsys.readouterr().err
    assert "refused access" in err and "AWS_SECRET_ACCESS_KEY" in err

    with pytest.raises(SystemExit, match=f"bucket 'runs-{UID}' is not reachable"):
        train_main([*base, f"data.urls={url}/", f"cluster.storage_path=s3://runs-{UID}/runs"])
    # nothing was started: no run directory, no tracking run
    assert not (workdir / "runs").exists() and not (workdir / "mlruns").exists()


def _tiny_shards(workdir: Path) -> Path:
    from t2i_dist.data.synthetic import write_synthetic_shards

    write_synthetic_shards(workdir / "tiny", num_samples=8, samples_per_shard=8, image_size=32)
    return workdir / "tiny"


def _run_until_the_skip_abort(rank: int, world: int, shards: str, root: str) -> dict:
    """The real loop (no Ray) with 2 loader processes over mostly bad shards, until it stops."""
    import multiprocessing

    from t2i_dist.data.errors import DataError
    from t2i_dist.engine.context import local_context
    from t2i_dist.engine.loop import TrainLoop
    from t2i_dist.models.registry import load_config

    cfg = load_config(
        "ldm-tiny",
        [*COMMON, "cluster.num_workers=1", f"data.urls={shards}", "run.max_steps=20", "run.checkpoint_every=1"],
    )
    loop = TrainLoop(cfg, local_context(cfg, root))
    # readers are forked, as from a Ray worker (this rank process was spawned, which it would pass on:
    # every reader would import torch again)
    multiprocessing.set_start_method("fork", force=True)
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        loop.run()
    except DataError as exc:
        error = str(exc)
    else:
        error = None
    # the loader's reader processes are stopped with the run, not left to a garbage collection or exit
    readers = [p.pid for p in psutil.Process().children(recursive=True) if p.pid not in before]
    return {"error": error, "step": loop.step, "readers_alive": [p for p in readers if _alive(p)]}


def test_mostly_bad_data_aborts_the_run_early_naming_the_fraction(tmp_path):
    from t2i_dist.data.stream import MIN_SAMPLES_FOR_SKIP_CHECK

    shards = tmp_path / "mostly-bad"
    write_mostly_bad_shards(shards)  # 1 good sample in every 16: fewer than a batch before the check
    root = tmp_path / "checkpoints"
    # a hung rank or reader process fails this inside run_distributed's deadline
    [out] = run_distributed(_run_until_the_skip_abort, world=1, args=(str(shards), str(root)), deadline_s=300)
    assert out["error"] is not None, f"the run trained {out['step']} steps on 94% bad samples without stopping"
    found = re.search(
        r"(\d+) of (\d+) samples skipped \((\d+)%\) on rank 0, loader worker [01], above data.max_skip_fraction=0.2\. "
        r"Reasons: (.+?)\. Worst shards: ",
        out["error"],
    )
    assert found, out["error"]
    skipped, seen, percent = map(int, found.groups()[:3])
    assert percent == round(100 * skipped / seen) and percent > 20
    assert {"undecodable_image", "missing_caption"} <= {r.split("=")[0] for r in found.group(4).split(", ")}
    # early: as soon as the fraction can be judged, before a first step (and its checkpoint)
    assert MIN_SAMPLES_FOR_SKIP_CHECK <= seen <= MIN_SAMPLES_FOR_SKIP_CHECK + 5, out["error"]
    assert out["step"] == 0 and not list(root.glob("checkpoint_*"))
    assert not out["readers_alive"], f"loader processes left running: {out['readers_alive']}"


def test_local_scripts_bind_dashboards_to_loopback():
    repo = Path(__file__).resolve().parents[1]
    heads = [repo / "cluster" / "local_head.sh", repo / "slurm" / "ray_node.sh"]
    for script in heads:
        text = script.read_text()
        assert "--dashboard-host=127.0.0.1" in text and "0.0.0.0" not in text, script
    # the driver's own local Ray is checked by running it: tests/test_main_command.py


def test_no_secret_in_any_artefact(crash_run, preemption_runs, mlflow_server):
    secrets = list(SECRETS.values())
    leaks = files_containing(
        [
            crash_run.workdir,
            preemption_runs.workdir / "runs",
            preemption_runs.first_log,
            preemption_runs.second_log,
            ray_logs_dir(),
        ],
        secrets,
    )
    leaks += [f"crash driver output: {s}" for s in secrets if s in crash_run.output]
    for client, experiment in (
        (mlflow_server.client(), crash_run.experiment),
        (preemption_runs.tracking.client(), preemption_runs.experiment),
    ):
        run = single_run(client, experiment)
        for where, text in mlflow_texts(client, run.info.run_id).items():
            leaks += [f"MLflow {experiment} {where}: {s}" for s in secrets if s in text]
    assert not leaks, "secrets written out:\n" + "\n".join(leaks)
    # the tracking URI was used (same run continued) without its password
    params = (
        preemption_runs.tracking.client()
        .get_run(single_run(preemption_runs.tracking.client(), preemption_runs.experiment).info.run_id)
        .data.params
    )
    assert params["tracking.uri"].startswith("http://***@127.0.0.1:")
