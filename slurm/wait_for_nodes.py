"""Block until the Ray cluster at --address has --nodes alive nodes (used by ray_cluster.sh).

Exits 0 and prints the nodes' addresses once they are up, 1 with the last error after --timeout seconds.
"""

from __future__ import annotations

import argparse
import sys
import time

import ray


def alive_node_ips(address: str) -> list[str]:
    if not ray.is_initialized():
        ray.init(address=address, logging_level="ERROR", log_to_driver=False, configure_logging=False)
    return sorted(node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--address", required=True)
    parser.add_argument("--nodes", type=int, required=True)
    parser.add_argument("--timeout", type=float, default=300)
    args = parser.parse_args()
    deadline = time.monotonic() + args.timeout
    ips: list[str] = []
    problem = "no answer yet"
    while time.monotonic() < deadline:
        try:
            ips = alive_node_ips(args.address)
            if len(ips) >= args.nodes:
                print(f"[t2i_dist slurm] Ray cluster up: {len(ips)} node(s) {' '.join(ips)}", file=sys.stderr)
                return 0
            problem = f"{len(ips)} of {args.nodes} node(s) joined"
        except Exception as exc:  # noqa: BLE001 - the head may not be listening yet; retried until the deadline
            problem = f"{type(exc).__name__}: {exc}"
            ray.shutdown()
        time.sleep(2)
    print(
        f"[t2i_dist slurm] error: Ray cluster at {args.address} not ready after {args.timeout:.0f}s "
        f"({problem}); see the ray_node.sh output above",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main())
