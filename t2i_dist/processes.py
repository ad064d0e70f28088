"""Child processes this project starts itself (test and benchmark servers, local daemons): a free loopback
port, and stopping a process by its own process group only."""

from __future__ import annotations

import os
import signal
import socket
import subprocess


def free_port() -> int:
    """A port free on 127.0.0.1 right now (the OS picks it). Another process may take it before it is bound:
    callers that start a server on it retry with a new port when the bind fails."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def stop_process_group(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    """SIGTERM to the process group of `proc` (started with start_new_session=True), SIGKILL after
    `timeout_s`; signals nothing outside that group."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout_s)
    except ProcessLookupError:
        pass
