"""Kubernetes manifests: every kustomization renders, and every document passes strict offline validation.

Core kinds are checked against the Kubernetes OpenAPI schemas (kubernetes-validate, strict), RayJob and
RayCluster against the KubeRay v1.7.0 CRD schema with unknown fields rejected, as the API server's strict
field validation would. Then the checks no schema knows: the entrypoint's config loads, the cluster has
room for the workers the config asks for, pods run as non-root, and no credential sits in a manifest.
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import ray
import yaml

from t2i_dist.config import resolve_config_path
from t2i_dist.models.registry import load_config

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "k8s"
# KubeRay's published CRDs (Apache-2.0, see SOURCE.md there), kept with the tests so validation never depends
# on what the machine happens to have
CRD_DIR = Path(__file__).resolve().parent / "schemas" / "kuberay-v1.7.0"
CRD_FILES = {"RayJob": "ray.io_rayjobs.yaml", "RayCluster": "ray.io_rayclusters.yaml"}
KUSTOMIZATIONS = sorted(p.parent for p in K8S.rglob("kustomization.yaml"))
OVERLAYS = [p for p in KUSTOMIZATIONS if p.parent.name == "overlays"]
SECRET_WORDS = re.compile(r"secret|password|token|access_key|credential", re.I)


# the pinned kubectl that tools/ci/install_system_deps.sh puts beside the venv's python
PINNED_KUBECTL = Path(sys.executable).parent / "kubectl"


@cache
def _kustomize_command() -> list[str]:
    # a failure, not a skip: without a renderer every manifest test below would silently not run
    if PINNED_KUBECTL.is_file():
        return [str(PINNED_KUBECTL), "kustomize"]
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    pytest.fail(
        f"no kustomize renderer: neither {PINNED_KUBECTL} nor `kustomize`/`kubectl` on PATH; "
        "run tools/ci/install_system_deps.sh (installs the pinned kubectl there)",
        pytrace=False,
    )


@cache
def render(directory: Path) -> list[dict[str, Any]]:
    out = subprocess.run([*_kustomize_command(), str(directory)], capture_output=True, text=True, check=False)
    assert out.returncode == 0, f"kustomize failed for {directory}:\n{out.stderr}"
    return [doc for doc in yaml.safe_load_all(out.stdout) if doc]


def _strict(schema: Any) -> Any:
    """Reject unknown fields wherever the schema lists properties and does not preserve unknown ones."""
    if isinstance(schema, dict):
        schema = {k: _strict(v) for k, v in schema.items()}
        if (
            "properties" in schema
            and "additionalProperties" not in schema
            and not schema.get("x-kubernetes-preserve-unknown-fields")
        ):
            schema["additionalProperties"] = False
        return schema
    if isinstance(schema, list):
        return [_strict(v) for v in schema]
    return schema


@cache
def crd_validator(kind: str, version: str) -> jsonschema.Draft4Validator:
    path = CRD_DIR / CRD_FILES[kind]
    crd = yaml.safe_load(path.read_text())
    (served,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    # OpenAPI v3.0 schemas are closest to JSON Schema draft 4 (boolean exclusiveMinimum and friends).
    return jsonschema.Draft4Validator(_strict(served["schema"]["openAPIV3Schema"]))


def validate(doc: dict[str, Any]) -> None:
    group, _, version = doc["apiVersion"].rpartition("/")
    if group == "ray.io":
        errors = sorted(crd_validator(doc["kind"], version).iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, "\n".join(f"{'.'.join(map(str, e.path))}: {e.message}" for e in errors)
    else:
        kubernetes_validate.validate(doc, kubernetes_validate.utils.latest_version(), strict=True)


def ray_resources(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [d for d in docs if d["kind"] in CRD_FILES]


def cluster_spec(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def ray_pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """The head's and every worker group's pod spec."""
    spec = cluster_spec(doc)
    return [group["template"]["spec"] for group in [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]]


def pod_specs(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Ray pods plus the RayJob's submitter pod."""
    submitter = doc["spec"].get("submitterPodTemplate") if doc["kind"] == "RayJob" else None
    return ray_pod_specs(doc) + ([submitter["spec"]] if submitter else [])


def entrypoint_config(entrypoint: str) -> tuple[str, list[str]]:
    words = shlex.split(entrypoint)
    assert words[:3] == ["python", "-m", "t2i_dist.train"], f"entrypoint must run t2i_dist.train: {entrypoint}"
    assert "--config" in words, f"entrypoint names no --config: {entrypoint}"
    at = words.index("--config")
    return words[at + 1], words[at + 2 :]


def quantity(value: str | int) -> float:
    text = str(value)
    return float(text[:-1]) / 1000 if text.endswith("m") else float(text)


# ------------------------------------------------------------------------------------------------ tests


def test_overlays_exist():
    assert {p.name for p in OVERLAYS} >= {"cpu-smoke", "gpu-multinode"}
    assert K8S / "interactive" in KUSTOMIZATIONS


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_every_document_validates_strictly(directory: Path):
    docs = render(directory)
    assert docs, f"{directory} renders nothing"
    for doc in docs:
        validate(doc)


def test_strict_validation_rejects_unknown_fields():
    """The validator itself must catch a misspelt field, or the test above proves nothing."""
    job = next(d for d in render(K8S / "base") if d["kind"] == "RayJob")
    misspelt = copy.deepcopy(job)
    misspelt["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["envfrom"] = []
    with pytest.raises(AssertionError, match="envfrom"):
        validate(misspelt)
    config_map = next(d for d in render(K8S / "base") if d["kind"] == "ConfigMap")
    with pytest.raises(kubernetes_validate.ValidationError):
        validate({**config_map, "stringdata": {}})


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_ray_version_matches_the_installed_ray(directory: Path):
    # Ray refuses to join nodes (and clients) of another version.
    for doc in ray_resources(render(directory)):
        assert cluster_spec(doc)["rayVersion"] == ray.__version__


def test_dockerfile_uses_the_installed_ray_and_a_non_root_user():
    text = (K8S / "Dockerfile").read_text()
    base = re.search(r"^ARG RAY_IMAGE=rayproject/ray:(\S+)$", text, re.M)
    assert base, "k8s/Dockerfile must build FROM a rayproject/ray image named in ARG RAY_IMAGE"
    assert base.group(1).startswith(ray.__version__ + "-")
    users = re.findall(r"^USER (\S+)$", text, re.M)
    assert users and not users[-1].startswith(("0", "root"))


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_entrypoint_runs_train_with_a_shipped_config(overlay: Path):
    jobs = [d for d in render(overlay) if d["kind"] == "RayJob"]
    assert len(jobs) == 1
    name, overrides = entrypoint_config(jobs[0]["spec"]["entrypoint"])
    assert resolve_config_path(name).is_relative_to(ROOT / "t2i_dist" / "configs"), f"{name} is not shipped"
    load_config(name, overrides)  # the overrides must name real keys with valid values


@pytest.mark.parametrize("overlay", OVERLAYS, ids=lambda p: p.name)
def test_cluster_has_room_for_the_configured_workers(overlay: Path):
    job = next(d for d in render(overlay) if d["kind"] == "RayJob")
    cfg = load_config(*entrypoint_config(job["spec"]["entrypoint"]))
    spec = cluster_spec(job)
    groups = [spec["headGroupSpec"], *spec.get("workerGroupSpecs", [])]
    gpus = cpus = 0.0
    for group in groups:
        limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
        count = group.get("replicas", 1)
        gpus += count * quantity(limits.get("nvidia.com/gpu", 0))
        cpus += count * quantity(limits["cpu"])
    assert cpus >= cfg.cluster.num_workers * cfg.cluster.cpus_per_worker
    if cfg.cluster.use_gpu:
        assert gpus >= cfg.cluster.num_workers * cfg.cluster.gpus_per_worker
        assert not cfg.cluster.storage_path.startswith("/"), "several nodes need shared storage (s3://)"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_pods_are_locked_down_and_sized(directory: Path):
    for doc in ray_resources(render(directory)):
        for pod in pod_specs(doc):
            assert pod["securityContext"]["runAsNonRoot"] is True
            for container in pod["containers"]:
                assert container["securityContext"]["allowPrivilegeEscalation"] is False
                resources = container["resources"]
                assert resources["requests"] and resources["limits"], f"{container['name']} needs requests+limits"
                for key, limit in resources["limits"].items():
                    if key == "nvidia.com/gpu":  # extended resources cannot be overcommitted
                        assert resources["requests"][key] == limit


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_ray_pods_mount_memory_backed_shm(directory: Path):
    for doc in ray_resources(render(directory)):
        for pod in ray_pod_specs(doc):
            shm = [v for v in pod["volumes"] if v.get("emptyDir", {}).get("medium") == "Memory"]
            assert shm, "Ray pods need a memory-backed /dev/shm for the object store and data loader"
            mounts = {m["name"]: m["mountPath"] for m in pod["containers"][0]["volumeMounts"]}
            assert mounts[shm[0]["name"]] == "/dev/shm"


@pytest.mark.parametrize("directory", KUSTOMIZATIONS, ids=lambda p: str(p.relative_to(K8S)))
def test_settings_come_from_config_map_and_secret_without_credentials(directory: Path):
    docs = render(directory)
    assert not [d for d in docs if d["kind"] == "Secret"], "Secrets are created by the user, never rendered"
    config_maps = {d["metadata"]["name"]: d for d in docs if d["kind"] == "ConfigMap"}
    for cm in config_maps.values():
        assert not [k for k in cm.get("data", {}) if SECRET_WORDS.search(k)]
    for doc in ray_resources(docs):
        assert cluster_spec(doc)["authOptions"]["mode"] == "token"
        for pod in ray_pod_specs(doc):
            container = pod["containers"][0]
            literal = [e["name"] for e in container.get("env", []) if "value" in e and SECRET_WORDS.search(e["name"])]
            assert not literal, f"credentials as literal env values: {literal}"
            refs = container["envFrom"]
            cm_refs = [r["configMapRef"]["name"] for r in refs if "configMapRef" in r]
            assert cm_refs and all(name in config_maps for name in cm_refs), "ConfigMap not rendered alongside"
            assert "MLFLOW_TRACKING_URI" in config_maps[cm_refs[0]]["data"]
            assert [r for r in refs if "secretRef" in r], "S3 credentials must come from a Secret"
