"""Benchmark 4: per-rank bytes of model state (parameters, gradients, optimizer state) at ZeRO 0/1/2/3 on 2
gloo ranks, for the LDM and GALIP tiny configs and (full mode) the study's networks (study-ldm-128,
study-galip-128, random frozen weights), in fp32 (the CPU path) and bf16 (the GPU path). On tiny models the
fixed communication buffers weigh more than on real ones.

During a real training step through the real DeepSpeed engines, just before each optimizer step (the
second step, so the optimizer state exists), every tensor the engines hold is found by walking the module,
the client optimizer and DeepSpeed's optimizer wrapper, and counted once per storage:
  params     what the module's parameters (or, under ZeRO-3, their local partitions) occupy
  grads      .grad of parameters and of the optimizer's (master) parameters
  optimizer  the optimizer's own parameters when they are not the module's (fp32 master copies) and its state
  buffers    everything else DeepSpeed holds (reduced gradient partitions, communication buckets)
GALIP's discriminator cannot use ZeRO-3 (its gradient penalty needs the full weights); its "ZeRO-3" row
partitions the generator at stage 3 and the discriminator at stage 2.
"""

from __future__ import annotations

import os
import traceback
from typing import Any

import torch
from torch import nn

from t2i_dist.bench.context import BenchContext
from t2i_dist.bench.report import Row, unavailable
from t2i_dist.processes import free_port

BENCH = "4 memory"
GOAL = 0.55
CATEGORIES = ("params", "grads", "optimizer", "buffers")
WALK_DEPTH = 6
BATCH = 2
SIZES = ("tiny", "study")


class StateCounter:
    def __init__(self) -> None:
        self.seen: set[int] = set()
        self.bytes = dict.fromkeys(CATEGORIES, 0)
        self.visited: set[int] = set()

    def add(self, tensor: Any, category: str) -> None:
        if not isinstance(tensor, torch.Tensor) or tensor.device.type == "meta":
            return
        storage = tensor.untyped_storage()
        if storage.nbytes() == 0 or storage.data_ptr() in self.seen:
            return
        self.seen.add(storage.data_ptr())
        self.bytes[category] += storage.nbytes()

    def walk(self, obj: Any, depth: int = 0) -> None:
        """Tensors held by DeepSpeed / torch.optim objects (and their containers), as 'buffers'."""
        if depth > WALK_DEPTH or id(obj) in self.visited or isinstance(obj, nn.Module):
            return
        self.visited.add(id(obj))
        if isinstance(obj, torch.Tensor):
            self.add(obj, "buffers")
        elif isinstance(obj, dict):
            for value in list(obj.values()):
                self.walk(value, depth + 1)
        elif isinstance(obj, list | tuple | set):
            for value in list(obj):
                self.walk(value, depth + 1)
        elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
            for value in list(vars(obj).values()):
                self.walk(value, depth + 1)


def innermost_optimizer(optimizer: Any) -> torch.optim.Optimizer:
    while not isinstance(optimizer, torch.optim.Optimizer) or hasattr(optimizer, "optimizer"):
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def engine_state_bytes(engine: Any) -> dict[str, int]:
    counter = StateCounter()
    params = list(engine.module.parameters())
    for p in params:
        counter.add(p.data, "params")
        counter.add(getattr(p, "ds_tensor", None), "params")
    for p in params:
        counter.add(p.grad, "grads")
    inner = innermost_optimizer(engine.optimizer)
    for group in inner.param_groups:
        for p in group["params"]:
            counter.add(p, "optimizer")
            counter.add(p.grad, "grads")
    for state in inner.state.values():
        for value in state.values():
            counter.add(value, "optimizer")
    counter.walk(engine.optimizer)
    return counter.bytes


def measure_before_step(engine: Any, name: str, snapshots: dict[str, dict[str, int]]) -> None:
    """Count the engine's tensors each time its optimizer step is about to run (gradients are complete and
    the optimizer state exists): the moment all model states are held at once."""
    original = engine.step

    def counted_step(*args: Any, **kwargs: Any) -> Any:
        snapshots[name] = engine_state_bytes(engine)
        return original(*args, **kwargs)

    engine.step = counted_step


def _batch(family: str, size: int, resolution: int):
    from t2i_dist.batch import Batch

    captions = ["a red circle", "a small blue square on the left"] * (size // 2)
    return Batch(captions=captions, images=torch.rand(size, 3, resolution, resolution) * 2 - 1)


def overrides_for(family: str, size: str) -> tuple[str, list[str]]:
    """(config name, overrides): the tiny config, or the study's networks with random frozen weights (no
    download) on CPU; model-state bytes do not depend on the batch or (for the LDM) the image size."""
    if size == "tiny":
        return f"{family}-tiny", []
    frozen = (
        ["model.vae.pretrained=null", "model.text.pretrained=null", "data.resolution=64"]
        if family == "ldm"
        else ["model.clip.pretrained=null"]
    )
    return f"study-{family}-128", [
        *frozen,
        "cluster.use_gpu=false",
        "cluster.gpus_per_worker=0",
        "cluster.cpus_per_worker=1",
        "cluster.threads_per_worker=1",
    ]


def measure(family: str, precision: str, stage: int, size: str = "tiny") -> dict[str, int]:
    import gc

    import t2i_dist.dist
    from t2i_dist.engine.build import build_training
    from t2i_dist.engine.precision import resolve_placement
    from t2i_dist.models.registry import load_config

    name, overrides = overrides_for(family, size)
    overrides += [
        "cluster.num_workers=2",
        f"deepspeed.micro_batch_size={BATCH}",
        f"deepspeed.precision={precision}",
        f"deepspeed.zero_stage={stage}",
        "data.synthesize.enabled=false",
    ]
    if family == "galip" and stage == 3:
        overrides.append("model.discriminator_zero_stage=2")
    cfg = load_config(name, overrides)
    placement = resolve_placement(cfg)
    built = build_training(cfg, placement, t2i_dist.dist.rank(), t2i_dist.dist.world_size(), with_loader=False)
    plugin, engines = built.plugin, {name: net.engine for name, net in built.engines.items()}
    snapshots: dict[str, dict[str, int]] = {}
    for name, engine in engines.items():
        measure_before_step(engine, name, snapshots)
    batch = _batch(family, BATCH, cfg.data.resolution)
    plugin.train_step(batch, 1)  # the first step creates the optimizer state
    plugin.train_step(batch, 2)  # measured: every model state exists between backward and step
    totals = dict.fromkeys(CATEGORIES, 0)
    for snapshot in snapshots.values():
        for k, v in snapshot.items():
            totals[k] += v
    totals["numel"] = sum(getattr(p, "ds_numel", p.numel()) for e in engines.values() for p in e.module.parameters())
    for engine in engines.values():
        if hasattr(engine, "destroy"):
            engine.destroy()
    del plugin, engines, built
    gc.collect()
    return totals


def rank_main(rank: int, world: int, port: int, jobs: list[tuple[str, str, str, int]], results: Any) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        OMP_NUM_THREADS="1",
    )
    import logging

    import torch.distributed as dist

    for name in ("deepspeed", "DeepSpeed", ""):
        logging.getLogger(name).setLevel(logging.WARNING)
    torch.set_num_threads(1)
    out: dict[str, Any] = {}
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world)
        for size, family, precision, stage in jobs:
            key = f"{size}/{family}/{precision}/{stage}"
            try:
                out[key] = measure(family, precision, stage, size)
            except Exception as exc:  # noqa: BLE001 - one configuration failing leaves the others
                out[key] = {"error": f"{type(exc).__name__}: {exc}", "trace": traceback.format_exc()}
            dist.barrier()
    finally:
        results[rank] = out
        if dist.is_initialized():
            dist.destroy_process_group()


def run_ranks(jobs: list[tuple[str, str, str, int]], world: int = 2) -> list[dict[str, Any]]:
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Manager() as manager:
        results = manager.dict()
        port = free_port()
        procs = [ctx.Process(target=rank_main, args=(r, world, port, jobs, results)) for r in range(world)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(1800)
        out = dict(results)
    if len(out) != world:
        raise RuntimeError("a rank died without reporting (see its output above)")
    return [out[r] for r in range(world)]


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


def run(ctx: BenchContext) -> list[Row]:
    families = ["ldm"]
    rows: list[Row] = []
    try:
        import t2i_dist.models.galip.plugin  # noqa: F401

        families.append("galip")
    except Exception as exc:  # noqa: BLE001 - reported as a row
        rows.append(unavailable(BENCH, "GALIP ZeRO-3 / ZeRO-0 bytes per rank", f"GALIP is not importable: {exc}"))
    precisions = ["fp32"] if ctx.quick else ["fp32", "bf16"]
    sizes = SIZES[:1] if ctx.quick else SIZES
    jobs = [(z, f, p, s) for z in sizes for f in families for p in precisions for s in (0, 1, 2, 3)]
    ctx.say(f"{BENCH}: {len(jobs)} engine set-ups on 2 gloo ranks")
    per_rank = run_ranks(jobs)
    for size in sizes:
        for family in families:
            for precision in precisions:
                rows += _rows(ctx, per_rank, size, family, precision)
    return rows


def _rows(ctx: BenchContext, per_rank: list[dict[str, Any]], size: str, family: str, precision: str) -> list[Row]:
    results = {s: per_rank[0][f"{size}/{family}/{precision}/{s}"] for s in (0, 1, 2, 3)}
    failed = {s: r["error"] for s, r in results.items() if "error" in r}
    label = f"{overrides_for(family, size)[0]} {precision}"
    if failed:
        for r in results.values():
            if "error" in r:
                print(r["trace"])
        return [unavailable(BENCH, f"{label}: ZeRO-3 / ZeRO-0 bytes per rank", f"failed: {failed}")]
    total = {s: sum(r[c] for c in CATEGORIES) for s, r in results.items()}
    ratio = total[3] / total[0]
    breakdown = "; ".join(
        f"ZeRO-{s}: {_mib(total[s])} (" + ", ".join(f"{c} {_mib(r[c])}" for c in CATEGORIES) + ")"
        for s, r in results.items()
    )
    why = (
        " DeepSpeed's ZeRO optimizers keep an fp32 master partition even when the model trains in fp32, "
        "which plain ZeRO-0 AdamW does not: 2.5 of 4 units at best on 2 ranks (0.625x)."
        if precision == "fp32"
        else ""
    )
    if family == "galip":
        why += " Mate-D stays at ZeRO-2 (the MA-GP double backward needs its full weights)."
    rows = [
        Row(
            BENCH,
            f"{label}: ZeRO-3 / ZeRO-0 bytes per rank",
            f"{ratio:.2f}x",
            f"<= {GOAL}x",
            "met" if ratio <= GOAL else "missed",
            f"{results[0]['numel'] / 1e6:.2f}M trained parameters; rank 0 of 2; {breakdown}.{why}",
        ),
        Row(
            BENCH,
            f"{label}: ZeRO-1 / ZeRO-2 vs ZeRO-0 bytes per rank",
            f"{total[1] / total[0]:.2f}x / {total[2] / total[0]:.2f}x",
        ),
    ]
    other = per_rank[1][f"{size}/{family}/{precision}/3"]
    if "error" not in other and abs(sum(other[c] for c in CATEGORIES) - total[3]) > 0.05 * total[3]:
        ctx.notes.append(
            f"{label} ZeRO-3: rank 1 holds {_mib(sum(other[c] for c in CATEGORIES))}, rank 0 "
            f"{_mib(total[3])} (uneven partitions)"
        )
    return rows
