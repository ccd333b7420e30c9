"""Separate "hosts" for multi-host tests: network namespaces from ``../shared/netns`` (see its README).

Also used by ``bench/bench_aggregation.py --hosts K`` (so this module must not import ``conftest``).

Each test gets its own set (a unique name prefix and state file), so tests and manual runs never share or
remove each other's namespaces; ``down`` stops whatever is still running inside (by the kit's own pid list)
and removes exactly what ``up`` made. Needs root and ``ip netns``; otherwise the tests skip and say why.
"""
from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from typing import Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # not conftest's: the bench imports this too
KIT = os.environ.get("MARFL_NETNS_KIT", os.path.join(ROOT, "..", "shared", "netns"))
SUBNET = "198.51.100"


def unavailable_reason() -> Optional[str]:
    """Why namespaces cannot be made here (None: they can)."""
    if not os.path.isfile(os.path.join(KIT, "up.sh")):
        return f"the network-namespace kit is missing at {KIT}"
    if os.geteuid() != 0:
        return "network namespaces need root (CI runs as root)"
    if shutil.which("ip") is None:
        return "iproute2 ('ip') is not installed"
    probe = f"mfltest-probe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"'ip netns add' is not permitted here: {made.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


@dataclass
class Hosts:
    """``count`` hosts named ``{prefix}0..``; host i has address ``198.51.100.{i+1}``."""

    count: int
    prefix: str
    state: str
    env: Dict[str, str]

    def address(self, i: int) -> str:
        return f"{SUBNET}.{i + 1}"

    def namespace(self, i: int) -> str:
        return f"{self.prefix}{i}"

    def wrap(self, i: int, cmd: List[str]) -> List[str]:
        """``cmd`` run inside host ``i``'s network stack (nsenter keeps cgroups visible, for slurmd)."""
        return ["nsenter", f"--net=/run/netns/{self.namespace(i)}", *cmd]

    def down(self) -> None:
        subprocess.run(["bash", os.path.join(KIT, "down.sh"), "--kill"], env=self.env, capture_output=True,
                       timeout=120)


def up(count: int, *, tag: str, rate: Optional[str] = None, delay_ms: Optional[int] = None,
       attach_root: bool = False) -> Hosts:
    prefix = f"m{tag}{os.getpid() % 100000}h"
    state = f"/tmp/{prefix}.state"
    env = {**os.environ, "MFL_PREFIX": prefix, "MFL_STATE": state}
    for key, value in (("MFL_RATE", rate), ("MFL_DELAY_MS", delay_ms), ("MFL_HOST", "1" if attach_root else None)):
        env.pop(key, None)
        if value is not None:
            env[key] = str(value)
    hosts = Hosts(count=count, prefix=prefix, state=state, env=env)
    made = subprocess.run(["bash", os.path.join(KIT, "up.sh"), str(count)], env=env, capture_output=True,
                          text=True, timeout=180)
    if made.returncode != 0:
        hosts.down()
        raise RuntimeError(f"netns up.sh failed: {made.stderr[-2000:]}")
    return hosts


def namespaces_left(prefix: str) -> List[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return [line.split()[0] for line in out.splitlines() if line.startswith(prefix)]
