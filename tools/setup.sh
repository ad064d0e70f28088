#!/usr/bin/env bash
# Creates .venv and installs t2i_dist with its test extras; re-runs only when pyproject.toml changed.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="${T2I_VENV:-$root/.venv}"
python="${PYTHON:-python3}"
stamp="$venv/.t2i-installed"
want="$(sha1sum "$root/pyproject.toml" | cut -d' ' -f1)"
if [[ -f "$stamp" && "$(cat "$stamp")" == "$want" ]]; then
  exit 0
fi
echo "[setup] installing t2i_dist into $venv (first time: several minutes)" >&2
[[ -x "$venv/bin/python" ]] || "$python" -m venv "$venv"
"$venv/bin/python" -m pip install --quiet --upgrade pip
# torch/torchvision first, pinned: the CUDA build from the local wheel store runs on CPUs too
"$venv/bin/python" -m pip install --quiet "torch==2.14.1" "torchvision==0.29.1"
"$venv/bin/python" -m pip install --quiet -e "$root[test]"
echo "$want" > "$stamp"
