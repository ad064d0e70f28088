#!/usr/bin/env bash
# Builds the wheel directory that tools/gpu_check.sh installs from on a GPU machine without network.
#
#   tools/gpu_wheels.sh [DIR]        (default: $GPU_WHEELS, else outputs/gpu-wheels: git-ignored, pass it as `carry`)
#
# What goes in: our stack's runtime requirements that the GPU machine lacks, at the exact versions of this
# checkout's venv (.venv), as wheels for the machine's Python. The GPU machine is assumed to have torch (+ CUDA,
# triton, nvidia-*), numpy, pillow, pyyaml, safetensors, accelerate, transformers, torchmetrics, huggingface_hub
# and their dependencies; everything else our code imports is here, walked from these roots through the
# installed packages' requirements (Requires-Dist, markers evaluated for the target Python):
#   diffusers, open_clip_torch (+ ftfy, wcwidth, timm, regex), webdataset (+ braceexpand), deepspeed (built here
#   with `pip wheel --no-deps`: only an sdist exists; + hjson, py-cpuinfo, msgpack, einops, ninja, psutil,
#   pydantic, pydantic_core, annotated-types, typing-inspection, typing_extensions), huggingface_hub and its
#   requirements (diffusers needs huggingface-hub>=1.32; installed only where the machine's is older), the
#   torchvision that matches the GPU machine's torch (open_clip and t2i_dist.images import it) and setuptools
#   (to install t2i_dist itself offline). gpu_check.sh installs only those the machine does not already satisfy.
#
# Settings (environment):
#   GPU_PYTHON_VERSION  the GPU machine's Python (default 3.12): binary wheels (pydantic_core, msgpack, regex,
#                       torchvision, ...) are fetched for it, manylinux x86_64
#   GPU_TORCH           the GPU machine's torch version (default 2.11.0): torchvision 0.(minor+15).patch
#   GPU_TORCHVISION_INDEX  an index for torchvision matching that torch's CUDA major (default: PyPI's build), e.g.
#                       https://download.pytorch.org/whl/cu128
#   PYTHON              the venv whose versions are pinned (default .venv/bin/python)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-${GPU_WHEELS:-$root/outputs/gpu-wheels}}"
py="${PYTHON:-$root/.venv/bin/python}"
target_py="${GPU_PYTHON_VERSION:-3.12}"
gpu_torch="${GPU_TORCH:-2.11.0}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"

IFS=. read -r t_major t_minor t_patch <<<"${gpu_torch%%+*}"
torchvision="torchvision==0.$((t_minor + 15)).${t_patch:-0}"

# name==version for every distribution to ship, from our venv's metadata
"$py" - "$target_py" >"$out/requirements.txt" <<'EOF'
import sys
from importlib.metadata import PackageNotFoundError, distribution

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

target = sys.argv[1]
env = {**default_environment(), "python_version": target, "python_full_version": f"{target}.0",
       "sys_platform": "linux", "platform_system": "Linux", "platform_machine": "x86_64"}
ROOTS = ["diffusers", "open_clip_torch", "webdataset", "deepspeed", "pydantic", "setuptools"]
# on the GPU machine already (or handled apart: torchvision must match its torch, not ours)
PROVIDED = {canonicalize_name(n) for n in (
    "torch", "triton", "numpy", "pillow", "pyyaml", "safetensors", "accelerate", "transformers", "peft",
    "torchmetrics", "torchvision", "sympy", "mpmath", "networkx", "jinja2", "markupsafe", "setuptools-scm")}
seen: dict[str, str] = {}
todo = list(ROOTS)
while todo:
    name = canonicalize_name(todo.pop())
    if name in seen or name in PROVIDED or name.startswith(("nvidia-", "cuda-")):
        continue
    try:
        dist = distribution(name)
    except PackageNotFoundError:
        sys.exit(f"{name} is required but not installed in {sys.prefix}")
    seen[name] = dist.version
    for text in dist.requires or []:
        req = Requirement(text)
        if req.marker is None or req.marker.evaluate({**env, "extra": ""}):
            todo.append(req.name)
for name, version in sorted(seen.items()):
    print(f"{name}=={version}")
EOF

platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
           --platform manylinux_2_5_x86_64 --platform manylinux1_x86_64 --platform linux_x86_64)
binary=(--only-binary=:all: --python-version "$target_py" --implementation cp "${platforms[@]}")
pip_download() { "$py" -m pip download --quiet --no-deps --disable-pip-version-check -d "$out" "$@"; }

while read -r req; do
  name="${req%%==*}"
  if [[ "$name" == deepspeed ]]; then
    # an sdist only: built here, without compiled ops (DeepSpeed JIT-compiles an op when one is used)
    DS_BUILD_OPS=0 "$py" -m pip wheel --quiet --no-deps --disable-pip-version-check -w "$out" "$req"
  elif ! pip_download "${binary[@]}" "$req"; then
    echo "no wheel of $req for Python $target_py; building one here (pure Python only)" >&2
    "$py" -m pip wheel --quiet --no-deps --disable-pip-version-check -w "$out" "$req"
  fi
done <"$out/requirements.txt"

if [[ -n "${GPU_TORCHVISION_INDEX:-}" ]]; then
  pip_download "${binary[@]}" --index-url "$GPU_TORCHVISION_INDEX" "$torchvision"
else
  pip_download "${binary[@]}" "$torchvision"
fi
echo "$torchvision" >>"$out/requirements.txt"
echo "torch==${gpu_torch}  # not shipped: the GPU machine's own; torchvision above requires it" >"$out/TARGET"

count=$(find "$out" -maxdepth 1 -name '*.whl' | wc -l)
echo "[gpu_wheels] $count wheels for Python $target_py (torch $gpu_torch) in $out: $(du -sh "$out" | cut -f1)"
du -b "$out"/*.whl | sort -n | awk '{printf "  %8.1f KiB  %s\n", $1 / 1024, $2}' | sed "s|$out/||"
