#!/usr/bin/env bash
# The two entry points of the README; each does its own set-up.
#   tools/t2i.sh train [train args...]   train the embedded default (stage 0: tiny VAE + CLIP, then the tiny LDM; local Ray)
#   tools/t2i.sh test  [pytest args...]  run the test suite (installs a pinned kubectl; Slurm/munge through apt when root)
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cmd="${1:-}"; shift || true
"$root/tools/setup.sh"
venv="${T2I_VENV:-$root/.venv}"
export PATH="$venv/bin:$PATH"
case "$cmd" in
  train)
    cd "$root"
    exec python -m t2i_dist.train "$@"
    ;;
  test)
    if [[ -x "$root/tools/ci/install_system_deps.sh" ]]; then
      "$root/tools/ci/install_system_deps.sh"
    fi
    cd "$root"
    exec python -m pytest "$@"
    ;;
  *)
    echo "usage: tools/t2i.sh train|test [args...]" >&2
    exit 2
    ;;
esac
