"""Start a server process on a loopback port, retrying when the port turns out to be taken.

A port from free_port() is only free when it is picked: another process can take it before the server binds
it, and a port a stopped server held can be taken before the server comes back. Such a server exits early
(its bind fails); these tries are what keeps that from failing a test.
"""

from __future__ import annotations

import socket
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

from t2i_dist.processes import free_port, stop_process_group

NEW_PORT_TRIES = 5
SAME_PORT_RETRY_S = 0.5


def accepts(port: int) -> bool:
    """Something listens on 127.0.0.1:port (then a server started on it would fail to bind)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def start_server(
    command: Callable[[int], list[str]],
    answers: Callable[[int], bool],
    log_path: Path,
    *,
    port: int | None = None,
    timeout_s: float = 60.0,
    env: dict[str, str] | None = None,
    name: str = "server",
) -> tuple[subprocess.Popen, int]:
    """Run `command(port)` in its own process group (output appended to log_path) until `answers(port)`;
    returns the process and its port.

    port=None: each try takes a new free_port(), NEW_PORT_TRIES tries. A given port (callers already hold
    URLs with it, e.g. a restart) is retried until timeout_s instead of being swapped for another."""
    deadline = time.monotonic() + timeout_s
    tries: list[str] = []
    while True:
        use = port or free_port()
        if accepts(use):  # taken: whatever answers there must not pass for our server
            tries.append(f"port {use} in use")
        else:
            with open(log_path, "ab") as log:  # the child keeps its own descriptor
                proc = subprocess.Popen(
                    command(use),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    stdin=subprocess.DEVNULL,
                    env=env,
                    start_new_session=True,
                )
            while proc.poll() is None:
                if answers(use):
                    return proc, use
                if time.monotonic() > deadline:
                    stop_process_group(proc)
                    raise RuntimeError(f"{name} did not answer on port {use} within {timeout_s:.0f}s; see {log_path}")
                time.sleep(0.1)
            tries.append(f"exited with {proc.returncode} on port {use}")
        if (port is None and len(tries) >= NEW_PORT_TRIES) or time.monotonic() > deadline:
            raise RuntimeError(f"{name} did not start in {len(tries)} tries (last: {tries[-1]}); see {log_path}")
        if port is not None:
            time.sleep(SAME_PORT_RETRY_S)
