#!/bin/bash
# System packages the tests need: a real Slurm (slurm-wlm + munge) started by tools/slurm_local.py, and
# iproute2/util-linux for the two-node Slurm test in network namespaces. Idempotent: installs only what is
# missing, so a machine that already has everything is not touched (and needs no network).
set -euo pipefail

packages=(slurm-wlm munge iproute2 util-linux)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]} == 0)); then
  echo "system packages present: ${packages[*]}"
  exit 0
fi
if [[ $(id -u) -ne 0 ]]; then
  echo "missing ${missing[*]}; run as root: apt-get install ${missing[*]}" >&2
  exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# The packages' own services are not wanted (tests start their own daemons): keep dpkg from starting them.
policy=/usr/sbin/policy-rc.d
if [[ ! -e $policy ]]; then
  printf '#!/bin/sh\nexit 101\n' > "$policy"
  chmod +x "$policy"
  trap 'rm -f "$policy"' EXIT
fi
apt-get install -y -qq --no-install-recommends "${missing[@]}"
echo "installed ${missing[*]}"
