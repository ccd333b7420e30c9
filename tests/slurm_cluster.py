"""A private Slurm cluster (munged + slurmctld + slurmd) under a temp dir, for integration tests.

Debian's ``slurmctld``, ``slurmd``, ``slurm-client`` and ``munge`` must be installed (``.ci/run`` installs them
when it runs as root). Every daemon gets its own ports, socket, state and log files under ``root``, so the
cluster never touches a system-wide Slurm or munge; ``stop()`` kills exactly the daemons it started.

Single node (default): one slurmd on this machine, named after the host. Several nodes: pass ``hosts``, a
``tests/netns.py`` ``Hosts`` made with ``attach_root=True``; slurmd ``n<i>`` then runs inside host i's network
namespace (``NodeAddr`` = its address), slurmctld stays in the root namespace and is reached at the root's address
on the segment (198.51.100.254). munge's socket is a path, so it is shared across the namespaces, like the files.
"""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

import psutil

BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")


def _which(name: str) -> Optional[str]:
    return shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/bin/{name}") if os.path.exists(p)), None)


def missing_binaries() -> List[str]:
    return [name for name in BINARIES if _which(name) is None]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class SlurmCluster:
    root: str
    cpus: int = 2  # per node
    hosts: Any = None  # multi-node: netns Hosts (attach_root=True); node i = slurmd -N n<i> inside host i
    controller_addr: str = "198.51.100.254"  # where nodes reach slurmctld (the root namespace on the segment)
    procs: Dict[str, subprocess.Popen] = field(default_factory=dict)

    @property
    def nodes(self) -> List[str]:
        if self.hosts is None:
            return [socket.gethostname().split(".")[0]]
        return [f"n{i}" for i in range(self.hosts.count)]

    @property
    def conf(self) -> str:
        return os.path.join(self.root, "slurm.conf")

    @property
    def env(self) -> Dict[str, str]:
        return {**os.environ, "SLURM_CONF": self.conf}

    def _write_conf(self) -> None:
        host = socket.gethostname().split(".")[0]
        r = self.root
        if self.hosts is None:
            controller, per_node = host, ""
            node_lines = [f"NodeName={host} CPUs={self.cpus} State=UNKNOWN"]
        else:  # every slurmd has its own spool, pid and log file (%n: its node name)
            controller, per_node = f"{host}({self.controller_addr})", "-%n"
            node_lines = [f"NodeName={name} NodeAddr={self.hosts.address(i)} CPUs={self.cpus} State=UNKNOWN"
                          for i, name in enumerate(self.nodes)]
        lines = [
            "ClusterName=marfltest", f"SlurmctldHost={controller}", f"SlurmctldPort={_free_port()}",
            f"SlurmdPort={_free_port()}", "AuthType=auth/munge", "CredType=cred/munge",
            f"AuthInfo=socket={r}/munge.sock", "SlurmUser=root", "SlurmdUser=root",
            f"StateSaveLocation={r}/state", f"SlurmdSpoolDir={r}/spool{per_node}",
            f"SlurmctldPidFile={r}/slurmctld.pid", f"SlurmdPidFile={r}/slurmd{per_node}.pid",
            f"SlurmctldLogFile={r}/slurmctld.log", f"SlurmdLogFile={r}/slurmd{per_node}.log",
            "ProctrackType=proctrack/linuxproc", "TaskPlugin=task/none", "SchedulerType=sched/backfill",
            "SelectType=select/cons_tres", "SelectTypeParameters=CR_Core", "ReturnToService=2",
            "MpiDefault=none", "JobAcctGatherType=jobacct_gather/none", "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none", "SlurmdTimeout=30", "InactiveLimit=0", "KillWait=15", "MinJobAge=300",
            "JobRequeue=1", "PlugStackConfig=/dev/null",
            *node_lines,
            f"PartitionName=debug Nodes={','.join(self.nodes)} Default=YES MaxTime=INFINITE State=UP OverSubscribe=NO",
        ]
        with open(self.conf, "w") as f:
            f.write("\n".join(lines) + "\n")

    def _start(self, name: str, cmd: List[str]) -> None:
        log = open(os.path.join(self.root, f"{name}.stdout"), "w")
        self.procs[name] = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=self.env,
                                            start_new_session=True)

    def start(self, timeout: float = 60.0) -> "SlurmCluster":
        spools = ["spool"] if self.hosts is None else [f"spool-{name}" for name in self.nodes]
        for sub in ("state", "munge", *spools):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        os.chmod(self.root, 0o755)
        key = os.path.join(self.root, "munge", "munge.key")
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
        os.chmod(key, 0o600)
        self._write_conf()
        r = self.root
        self._start("munged", [_which("munged"), "--foreground", "--force", f"--socket={r}/munge.sock",
                               f"--key-file={key}", f"--pid-file={r}/munged.pid", f"--log-file={r}/munged.log",
                               f"--seed-file={r}/munge/seed"])
        self._wait(lambda: os.path.exists(f"{r}/munge.sock"), timeout, "munged socket")
        self._start("slurmctld", [_which("slurmctld"), "-D", "-i", "-f", self.conf])
        if self.hosts is None:
            self._start("slurmd", [_which("slurmd"), "-D", "-f", self.conf])
        else:  # nsenter, not `ip netns exec`: that remounts /sys and hides /sys/fs/cgroup from slurmd
            for i, name in enumerate(self.nodes):
                self._start(f"slurmd-{name}", self.hosts.wrap(i, [_which("slurmd"), "-D", "-N", name, "-f", self.conf]))
        self._wait(self._nodes_idle, timeout, f"{len(self.nodes)} idle Slurm node(s)")
        return self

    def _nodes_idle(self) -> bool:
        out = subprocess.run([_which("sinfo") or "sinfo", "-h", "-N", "-o", "%N %t"], capture_output=True,
                             text=True, env=self.env)
        states = dict(line.split() for line in out.stdout.splitlines() if line.strip())
        return out.returncode == 0 and all(states.get(name, "").startswith("idle") for name in self.nodes)

    def _wait(self, check, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, proc in self.procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"{name} exited with {proc.returncode}: see {self.root}")
            if check():
                return
            time.sleep(0.5)
        raise RuntimeError(f"timed out waiting for {what}: see {self.root}")

    def sbatch(self, *args: str, cwd: str, timeout: float = 900) -> subprocess.CompletedProcess:
        return subprocess.run([_which("sbatch"), "--wait", "--parsable", *args], cwd=cwd, env=self.env,
                              capture_output=True, text=True, timeout=timeout)

    def _cancel_jobs(self, timeout: float = 60.0) -> None:
        """Cancel every job of this (private) cluster and wait until they are gone, so their steps end too."""
        if self.procs.get("slurmctld") is None or self.procs["slurmctld"].poll() is not None:
            return
        subprocess.run([_which("scancel") or "scancel", "--full", "--user", str(os.getuid())], env=self.env,
                       capture_output=True)
        deadline = time.time() + timeout
        while time.time() < deadline:
            out = subprocess.run([_which("squeue") or "squeue", "-h"], env=self.env, capture_output=True, text=True)
            if out.returncode != 0 or not out.stdout.strip():
                return
            time.sleep(1)

    def _leftover_pids(self):
        """Processes that belong to this cluster's jobs: their command line or environment names our files."""
        found = []
        for process in psutil.process_iter():
            if process.pid == os.getpid():
                continue
            try:
                cmdline, environ = "\0".join(process.cmdline()), process.environ()
            except psutil.Error:
                continue
            if self.root in cmdline or environ.get("SLURM_CONF") == self.conf:
                found.append(process.pid)
        return found

    def stop(self) -> None:
        """Cancel the jobs, stop the daemons this cluster started, then kill whatever of its jobs is left."""
        self._cancel_jobs()
        slurmds = [name for name in self.procs if name.startswith("slurmd")]
        for name in (*slurmds, "slurmctld", "munged"):
            proc = self.procs.get(name)
            if proc is None or proc.poll() is not None:
                continue
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        for pid in self._leftover_pids():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
