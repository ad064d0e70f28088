"""What several benchmarks share, made once per invocation and torn down at the end: data sets, a one-rank
process group for in-process DeepSpeed engines, a Ray session, an S3 server."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from t2i_dist.config import Config
from t2i_dist.models.registry import load_config

STUDY_CONFIG = "study-ldm-128"
STUDY_MICRO_BATCH = 4
STUDY_SAMPLES = 32


@dataclass
class Sizes:
    rounds: int  # side-by-side rounds per comparison
    steps: int  # training steps per measured segment (benchmark 2)
    step_rounds: int  # benchmark 1: rounds of one step per variant (short segments follow the load closely)
    study_rounds: int  # benchmark 1 on the study's networks (full mode only)
    samples: int  # synthetic data set size
    per_shard: int
    fits: int  # Ray Train runs per worker count (scaling)
    fit_steps: int
    eval_images: int

    @classmethod
    def of(cls, quick: bool) -> Sizes:
        if quick:
            return cls(
                rounds=3,
                steps=3,
                step_rounds=12,
                study_rounds=0,
                samples=256,
                per_shard=64,
                fits=1,
                fit_steps=12,
                eval_images=32,
            )
        return cls(
            rounds=7,
            steps=6,
            step_rounds=40,
            study_rounds=10,
            samples=1024,
            per_shard=128,
            fits=3,
            fit_steps=60,
            eval_images=64,
        )


@dataclass
class BenchContext:
    quick: bool
    config: str  # the LDM config benchmarks 1-3 start from
    workdir: Path
    sizes: Sizes = field(init=False)
    notes: list[str] = field(default_factory=list)
    cache: dict[str, Any] = field(default_factory=dict)
    _closers: list[Any] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.sizes = Sizes.of(self.quick)
        self.workdir.mkdir(parents=True, exist_ok=True)

    def say(self, message: str) -> None:
        print(f"[bench] {message}", flush=True)

    def once(self, key: str, make):
        if key not in self.cache:
            self.cache[key] = make()
        return self.cache[key]

    def on_close(self, fn) -> None:
        self._closers.append(fn)

    def close(self) -> None:
        for fn in reversed(self._closers):
            try:
                fn()
            except Exception as exc:  # noqa: BLE001 - tear down the rest regardless
                self.say(f"teardown step failed: {type(exc).__name__}: {exc}")
        self._closers.clear()

    # -- configs and data --------------------------------------------------------------------------------
    def ldm_config(self, *overrides: str) -> Config:
        """The benchmark LDM config on the benchmark's image shards, one worker."""
        return load_config(
            self.config,
            [
                f"data.urls={self.image_shards()}",
                "data.format=images",
                "data.synthesize.enabled=false",
                "cluster.num_workers=1",
                *overrides,
            ],
        )

    def study_config(self, *overrides: str) -> Config:
        """The study's LDM (study-ldm-128) as one CPU process: its architecture with random frozen weights
        (no download), on 128 px benchmark shards, micro-batch STUDY_MICRO_BATCH."""
        res = load_config(STUDY_CONFIG).data.resolution
        return load_config(
            STUDY_CONFIG,
            [
                f"data.urls={self.image_shards(res, STUDY_SAMPLES)}",
                "data.format=images",
                "data.synthesize.enabled=false",
                "data.loader_workers=1",
                "data.shuffle_buffer=16",
                "model.vae.pretrained=null",
                "model.text.pretrained=null",
                "cluster.use_gpu=false",
                "cluster.num_workers=1",
                "cluster.cpus_per_worker=1",
                "cluster.gpus_per_worker=0",
                "cluster.threads_per_worker=1",
                f"deepspeed.micro_batch_size={STUDY_MICRO_BATCH}",
                *overrides,
            ],
        )

    def image_shards(self, resolution: int | None = None, samples: int | None = None) -> Path:
        res = resolution or load_config(self.config).data.resolution
        count = samples or self.sizes.samples

        def make() -> Path:
            from t2i_dist.data.synthetic import write_synthetic_shards

            out = self.workdir / f"images-{res}px-{count}"
            write_synthetic_shards(out, count, min(count, self.sizes.per_shard), res, seed=0)
            return out

        return self.once(f"image_shards/{res}/{count}", make)

    def latent_shards(self, cfg: Config | None = None) -> Path:
        """Latent shards of `cfg`'s image shards, encoded by its frozen VAE and text encoder (default: the
        benchmark LDM config)."""
        cfg = cfg or self.ldm_config()
        images = cfg.data.urls

        def make() -> Path:
            from t2i_dist.precompute import precompute

            out = self.workdir / f"latents-{cfg.run.name}"
            self.say(f"precomputing latents of {images} for {cfg.run.name} in this process")
            manifest = precompute(cfg, out, images=str(images), workers=0)
            # the encoding loop (read, decode, encode, write); start-up is paid once per run, not per sample
            self.cache[f"precompute_s_per_sample/{cfg.run.name}"] = manifest["encode_seconds"] / manifest["samples"]
            return out

        return self.once(f"latent_shards/{cfg.run.name}", make)

    # -- processes ---------------------------------------------------------------------------------------
    def process_group(self) -> None:
        """A one-rank gloo group, so DeepSpeed engines can live in this process."""

        def make() -> bool:
            import torch.distributed as dist

            from t2i_dist.processes import free_port

            if not dist.is_initialized():
                os.environ.update(
                    MASTER_ADDR="127.0.0.1",
                    MASTER_PORT=str(free_port()),
                    RANK="0",
                    WORLD_SIZE="1",
                    LOCAL_RANK="0",
                    LOCAL_WORLD_SIZE="1",
                )
                dist.init_process_group("gloo", rank=0, world_size=1)
                self.on_close(dist.destroy_process_group)
            for name in ("deepspeed", "DeepSpeed"):
                logging.getLogger(name).setLevel(logging.WARNING)
            return True

        self.once("process_group", make)

    def ray(self):
        def make():
            import ray

            if not ray.is_initialized():
                address = os.environ.get("RAY_ADDRESS")
                if address:
                    ray.init(address=address, logging_level=logging.WARNING)
                else:
                    # 4 logical CPUs: two 1-CPU training workers and Ray Train's controller fit at once
                    ray.init(
                        num_cpus=4,
                        include_dashboard=False,
                        logging_level=logging.WARNING,
                        runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}},
                    )
                    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address
                    self.on_close(lambda: (ray.shutdown(), os.environ.pop("RAY_ADDRESS", None)))
            return ray

        return self.once("ray", make)

    def s3(self):
        def make():
            from t2i_dist.testing.s3server import S3Server

            server = S3Server(self.workdir / "moto.log")
            server.start()
            self.on_close(server.stop)
            previous = {k: os.environ.get(k) for k in server.env()}
            os.environ.update(server.env())

            def restore() -> None:
                for k, v in previous.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v

            self.on_close(restore)
            return server

        return self.once("s3", make)
