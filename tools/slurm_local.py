"""A throwaway Slurm cluster on this machine, for testing the sbatch scripts against real daemons.

    python tools/slurm_local.py up --dir /tmp/t2i-slurm --nodes 2 --netns   # prints `export SLURM_CONF=...`
    python tools/slurm_local.py down --dir /tmp/t2i-slurm
    python tools/slurm_local.py check --netns                               # exit 2 with the reason if it cannot

Needs root and Debian's slurm-wlm + munge (tools/ci/install_system_deps.sh). It starts its own munged (own
key and socket), slurmctld and one slurmd per node, never touching a system Slurm or munge. Each slurmd runs
in its own PID namespace, so stopping a node ends every process its jobs left behind. With --netns each node
also gets its own network namespace on a bridge (addresses in a private test range, on interfaces created
here only), so a job really spans several hosts. Everything is stopped by PID; state is kept in DIR/state.json
so `down` works from another process.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

try:
    from t2i_dist.processes import free_port
except ImportError:  # `sudo python3 tools/slurm_local.py` outside the venv: the checkout's stdlib-only module
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from t2i_dist.processes import free_port

COMMANDS = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "srun", "scancel", "scontrol", "sinfo")
JOB_END_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL"}


class SlurmUnavailable(RuntimeError):
    """This machine cannot host the test cluster (not root, or Slurm/munge not installed)."""


def why_unavailable(netns: bool = False) -> str | None:
    """A reason to skip, or None when a local cluster can be started here."""
    if os.geteuid() != 0:
        return "starting Slurm daemons needs root"
    missing = [name for name in COMMANDS if not shutil.which(name)]
    if netns:
        missing += [name for name in ("ip", "nsenter", "unshare") if not shutil.which(name)]
    if missing:
        return f"missing {', '.join(missing)}: run tools/ci/install_system_deps.sh (slurm-wlm, munge, iproute2)"
    if netns:
        # a container may forbid new network namespaces or lack the bridge/veth drivers; try both in a
        # namespace of its own, which takes them away when it ends
        probe = "ip link add t2ibr type bridge && ip link add t2iv type veth peer name t2iw"
        out = subprocess.run(["unshare", "--net", "sh", "-c", probe], capture_output=True, text=True, check=False)
        if out.returncode != 0:
            return f"no network namespace support (unshare --net; bridge and veth links): {out.stderr.strip()}"
    return None


def run(*cmd: str, check: bool = True, **kwargs) -> subprocess.CompletedProcess:
    out = subprocess.run(cmd, capture_output=True, text=True, check=False, **kwargs)
    if check and out.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({out.returncode}): {out.stderr.strip() or out.stdout.strip()}")
    return out


@dataclass
class Node:
    name: str
    address: str
    netns: str | None = None  # name under /run/netns, when the node has its own network
    host_veth: str | None = None


@dataclass
class State:
    workdir: str
    nodes: list[Node]
    cpus_per_node: int
    bridge: str | None = None
    pids: dict[str, int] = field(default_factory=dict)  # role -> PID, stopped in reverse order

    def save(self) -> None:
        Path(self.workdir, "state.json").write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, workdir: Path) -> State:
        raw = json.loads((workdir / "state.json").read_text())
        raw["nodes"] = [Node(**n) for n in raw["nodes"]]
        return cls(**raw)


class LocalSlurm:
    """Start with `start()` (or as a context manager); `stop()` ends every process it started, by PID."""

    def __init__(
        self,
        workdir: Path,
        num_nodes: int = 1,
        cpus_per_node: int = 2,
        netns: bool = False,
        subnet: str = "10.77.0",
    ) -> None:
        self.workdir = Path(workdir).resolve()
        self.netns = netns
        self.subnet = subnet
        tag = f"{os.getpid() % 100000}"
        nodes = [
            Node(
                name=f"node{i}",
                address=f"{subnet}.{i + 1}" if netns else "127.0.0.1",
                netns=f"t2i-{tag}-node{i}" if netns else None,
                host_veth=f"t2iv{tag}n{i}" if netns else None,
            )
            for i in range(1, num_nodes + 1)
        ]
        self.state = State(str(self.workdir), nodes, cpus_per_node, bridge=f"t2ibr{tag}" if netns else None)

    # ------------------------------------------------------------------------------------------ public

    @property
    def conf(self) -> Path:
        return self.workdir / "slurm.conf"

    @property
    def env(self) -> dict[str, str]:
        """Environment for Slurm clients (sbatch, scontrol, squeue) talking to this cluster."""
        return {**os.environ, "SLURM_CONF": str(self.conf)}

    @property
    def controller_address(self) -> str:
        return f"{self.subnet}.1" if self.netns else "127.0.0.1"

    def start(self, timeout: float = 60) -> LocalSlurm:
        reason = why_unavailable(self.netns)
        if reason:
            raise SlurmUnavailable(reason)
        (self.workdir / "log").mkdir(parents=True, exist_ok=True)
        os.chmod(self.workdir, 0o700)  # munged refuses a key in a directory others can write
        self.state.save()
        try:
            self._start_munge()
            if self.netns:
                self._create_network()
            self._write_conf()
            self._spawn("slurmctld", ["slurmctld", "-D", "-c", "-f", str(self.conf)])
            for node in self.state.nodes:
                self._start_slurmd(node)
            self._wait_nodes_idle(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        stop(self.workdir)

    def sbatch(self, *args: str, env: dict[str, str] | None = None, cwd: Path | None = None) -> int:
        out = run("sbatch", "--parsable", *args, env={**self.env, **(env or {})}, cwd=cwd)
        return int(out.stdout.strip().split(";")[0])

    def job_info(self, job_id: int) -> dict[str, str]:
        out = run("scontrol", "show", "job", "-o", str(job_id), env=self.env).stdout
        return dict(item.split("=", 1) for item in out.split() if "=" in item)

    def wait_job(self, job_id: int, timeout: float) -> dict[str, str]:
        deadline = time.monotonic() + timeout
        while True:
            info = self.job_info(job_id)
            if info.get("JobState") in JOB_END_STATES:
                return info
            if time.monotonic() > deadline:
                run("scancel", str(job_id), env=self.env, check=False)
                raise TimeoutError(f"job {job_id} still {info.get('JobState')} after {timeout:.0f}s; cancelled")
            time.sleep(1)

    def logs(self) -> str:
        """Tails of the daemons' logs, for failure messages."""
        parts = []
        for log in sorted((self.workdir / "log").glob("*.log")):
            lines = log.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {log.name}\n" + "\n".join(lines))
        return "\n".join(parts)

    def __enter__(self) -> LocalSlurm:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------ steps

    def _spawn(self, role: str, cmd: list[str]) -> None:
        with open(self.workdir / "log" / f"{role}.out", "ab") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.state.pids[role] = proc.pid
        self.state.save()

    def _start_munge(self) -> None:
        munge = self.workdir / "munge"
        munge.mkdir(mode=0o700, exist_ok=True)
        key = munge / "munge.key"
        if not key.exists():
            run("mungekey", "--create", "--keyfile", str(key))
        self._spawn(
            "munged",
            [
                "munged", "--foreground", "--force",
                f"--socket={self.munge_socket}", f"--key-file={key}",
                f"--pid-file={munge / 'munged.pid'}", f"--seed-file={munge / 'munged.seed'}",
                f"--log-file={self.workdir / 'log' / 'munged.log'}",
            ],
        )  # fmt: skip
        _wait_for(lambda: self.munge_socket.exists(), 10, "munged did not create its socket")

    @property
    def munge_socket(self) -> Path:
        return self.workdir / "munge" / "munge.sock"

    def _create_network(self) -> None:
        existing = run("ip", "-o", "route", "show", "to", f"{self.subnet}.0/24").stdout.strip()
        if existing:
            raise RuntimeError(
                f"{self.subnet}.0/24 is already routed ({existing}); stop the cluster that uses it "
                f"(python tools/slurm_local.py down --dir DIR) or pass another subnet"
            )
        bridge = self.state.bridge
        assert bridge
        run("ip", "link", "add", bridge, "type", "bridge")
        self.state.save()
        run("ip", "addr", "add", f"{self.controller_address}/24", "dev", bridge)
        run("ip", "link", "set", bridge, "up")
        for node in self.state.nodes:
            assert node.netns and node.host_veth
            run("ip", "netns", "add", node.netns)
            self.state.save()
            run("ip", "link", "add", node.host_veth, "type", "veth", "peer", "name", "eth0", "netns", node.netns)
            run("ip", "link", "set", node.host_veth, "master", bridge, "up")
            inside = ["nsenter", f"--net=/run/netns/{node.netns}", "ip"]
            run(*inside, "addr", "add", f"{node.address}/24", "dev", "eth0")
            run(*inside, "link", "set", "eth0", "up")
            run(*inside, "link", "set", "lo", "up")

    def _write_conf(self) -> None:
        w = self.workdir
        cpus = self.state.cpus_per_node
        nodes = "\n".join(
            f"NodeName={n.name} NodeAddr={n.address} CPUs={cpus} RealMemory=4000 State=UNKNOWN"
            for n in self.state.nodes
        )
        (w / "state").mkdir(exist_ok=True)
        (w / "spool").mkdir(exist_ok=True)
        self.conf.write_text(
            f"""# written by tools/slurm_local.py for a throwaway test cluster
ClusterName=t2itest
SlurmctldHost={socket.gethostname()}({self.controller_address})
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={self.munge_socket}
StateSaveLocation={w / "state"}
SlurmdSpoolDir={w / "spool"}/%n
SlurmctldPidFile={w / "slurmctld.pid"}
SlurmdPidFile={w / "spool"}/slurmd-%n.pid
SlurmctldLogFile={w / "log" / "slurmctld.log"}
SlurmdLogFile={w / "log"}/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
KillWait=5
MinJobAge=600
SlurmctldTimeout=30
SlurmdTimeout=30
{nodes}
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO
"""
        )

    def _start_slurmd(self, node: Node) -> None:
        (self.workdir / "spool" / node.name).mkdir(exist_ok=True)
        slurmd = f"slurmd -D -N {node.name} -f {self.conf}"
        # bash as the namespace's init reaps whatever the jobs orphan; --kill-child takes the whole PID
        # namespace down when the unshare process is stopped.
        cmd = ["unshare", "--pid", "--fork", "--mount-proc", "--kill-child=SIGKILL", "bash", "-c", f"{slurmd} & wait"]
        if node.netns:
            cmd = ["nsenter", f"--net=/run/netns/{node.netns}", *cmd]
        self._spawn(f"slurmd-{node.name}", cmd)

    def _wait_nodes_idle(self, timeout: float) -> None:
        names = {n.name for n in self.state.nodes}

        def all_idle() -> bool:
            out = run("sinfo", "-h", "-N", "-o", "%N %t", env=self.env, check=False).stdout.split("\n")
            states = dict(line.split() for line in out if line.strip())
            return all(states.get(n, "").startswith("idle") for n in names)

        _wait_for(all_idle, timeout, f"nodes did not become idle:\n{self.logs()}")


def _wait_for(predicate, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise RuntimeError(message)
        time.sleep(0.5)


def _terminate(pid: int, sig: signal.Signals = signal.SIGTERM, grace: float = 10) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        return
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            finished, _ = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:  # not our child (stopped from another process): poll for existence
            finished = 0 if _alive(pid) else pid
        if finished:
            return
        time.sleep(0.2)
    try:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    except (ProcessLookupError, ChildProcessError):
        pass


def _alive(pid: int) -> bool:
    """Running (a zombie left for a parent that is gone counts as stopped)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def stop(workdir: Path) -> None:
    """Stop every daemon recorded in DIR/state.json by PID, then remove the interfaces and namespaces."""
    workdir = Path(workdir)
    if not (workdir / "state.json").exists():
        return
    state = State.load(workdir)
    for role, pid in reversed(list(state.pids.items())):
        # unshare blocks SIGTERM while it waits; SIGKILL on it takes the node's whole PID namespace down.
        _terminate(pid, signal.SIGKILL if role.startswith("slurmd-") else signal.SIGTERM)
    for node in state.nodes:
        if node.host_veth:
            run("ip", "link", "del", node.host_veth, check=False)
        if node.netns:
            run("ip", "netns", "del", node.netns, check=False)
    if state.bridge:
        run("ip", "link", "del", state.bridge, check=False)
    (workdir / "state.json").unlink()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start munged, slurmctld and the slurmd nodes")
    up.add_argument("--dir", type=Path, required=True)
    up.add_argument("--nodes", type=int, default=1)
    up.add_argument("--cpus-per-node", type=int, default=2)
    up.add_argument("--netns", action="store_true", help="one network namespace per node, on a bridge")
    down = sub.add_parser("down", help="stop everything `up` started in DIR")
    down.add_argument("--dir", type=Path, required=True)
    check = sub.add_parser("check", help="exit 2, saying why, if this machine cannot host the cluster")
    check.add_argument("--netns", action="store_true", help="also the network namespaces of `up --netns`")
    args = parser.parse_args(argv)
    if args.command == "down":
        stop(args.dir)
        return 0
    if args.command == "check":
        reason = why_unavailable(args.netns)
        print(
            f"cannot start a local Slurm: {reason}" if reason else "a local Slurm can start here",
            file=sys.stderr if reason else sys.stdout,
        )
        return 2 if reason else 0
    try:
        cluster = LocalSlurm(args.dir, args.nodes, args.cpus_per_node, args.netns).start()
    except SlurmUnavailable as exc:
        print(f"cannot start a local Slurm: {exc}", file=sys.stderr)
        return 2
    print(f"export SLURM_CONF={cluster.conf}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
