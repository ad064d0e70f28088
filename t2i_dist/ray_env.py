"""What every driver that starts Ray work shares (training, precompute): connecting to Ray, and the
environment forwarded to workers, split into plain variables (Ray's runtime_env) and credentials (carried
inside the task, never logged)."""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator

from t2i_dist.config import URL_USERINFO, Config

# environment the workers need when the driver joins a remote cluster (their raylet's env is not ours)
FORWARDED_ENV_PREFIXES = ("AWS_", "MLFLOW_", "T2I_", "HF_", "S3_")
# forwarded variables whose value is a credential: they must not travel in Ray's runtime_env, which Ray's
# runtime-env agent writes to its log in full
SECRET_NAME_WORDS = ("SECRET", "TOKEN", "PASSWORD", "KEY", "CREDENTIAL")
LOOPBACK = "127.0.0.1"
# Ray's switch for multi-node clusters (named for the platforms where it is off by default)
SINGLE_NODE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def connect_ray(cfg: Config) -> None:
    import ray

    if ray.is_initialized():
        return
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=True)
        return
    needed = cfg.cluster.num_workers * cfg.cluster.cpus_per_worker + 1
    with single_node_on_loopback():
        # the dashboard serves Ray's State API, which Ray Train's placement-group cleaner polls every second
        # (without it, it warns every second and cannot clean up after a dead controller); loopback only
        ray.init(
            num_cpus=max(int(needed), os.cpu_count() or 1),
            include_dashboard=True,
            dashboard_host=LOOPBACK,
            _node_ip_address=LOOPBACK,
            logging_level=logging.WARNING,
        )
    # Ray Train's helper processes look the cluster up by address; other Ray instances on the machine
    # would otherwise make that lookup ambiguous
    os.environ["RAY_ADDRESS"] = ray.get_runtime_context().gcs_address


@contextlib.contextmanager
def single_node_on_loopback() -> Iterator[None]:
    """Make the Ray started inside a one-node cluster on loopback. Ray binds its metrics servers (the
    dashboard's, the agent's, the autoscaler's) to every interface unless the node's IP is loopback, and on
    Linux it turns a loopback `_node_ip_address` into the machine's outward IP, except when clusters are
    switched off (RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0, the default on macOS and Windows). Only for a Ray
    started here: a driver joining a cluster must register with an address the other nodes reach."""
    from ray._private import ray_constants

    previous = os.environ.get(SINGLE_NODE_ENV)
    os.environ[SINGLE_NODE_ENV] = "0"  # read when Ray is imported: by the processes this Ray starts
    ray_constants.ENABLE_RAY_CLUSTER = False  # this process may have imported Ray before
    try:
        yield
    finally:
        # the processes of this Ray have it; processes this one starts later (a multi-node `ray start`) must not
        if previous is None:
            os.environ.pop(SINGLE_NODE_ENV, None)
        else:
            os.environ[SINGLE_NODE_ENV] = previous


def _is_secret(name: str, value: str) -> bool:
    return any(w in name.upper() for w in SECRET_NAME_WORDS) or bool(URL_USERINFO.search(value))


def forwarded_env() -> dict[str, str]:
    """Forwarded variables that are not credentials (these go in Ray's runtime_env)."""
    return {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) and not _is_secret(k, v)}


class SecretEnv:
    """Credentials for the workers, carried inside the pickled training function (Ray's object store) rather
    than the runtime_env; printing it shows no value."""

    def __init__(self, values: dict[str, str]):
        self._values = dict(values)

    def __repr__(self) -> str:
        return f"SecretEnv({len(self._values)} values hidden)"

    __str__ = __repr__

    def apply(self) -> None:
        os.environ.update(self._values)


def forwarded_secrets() -> SecretEnv:
    return SecretEnv({k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES) and _is_secret(k, v)})
