"""A ``/dev/shm`` watchdog for the launcher.

Cluster nodes share a small ``/dev/shm``; torch and multiprocessing leave segments there when a process dies
without cleaning up. The watchdog samples usage, warns past a threshold and removes what *this run's* dead
processes left behind. Ownership is established by observation, never guessed from names alone: a segment
belongs to the run if a process of the run had it open or mapped when the watchdog looked, or if its name
carries a run process's pid (torch's ``torch_<pid>_…``). A segment is removed only when it is owned by the run,
belongs to our user and no live process has it open or mapped. Files of other users, other runs and live
processes are never touched.
"""
from __future__ import annotations

import logging
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Callable, Dict, Iterable, List, Optional, Set

import psutil

logger = logging.getLogger("mar_fl.shm")

SHM_DIR = "/dev/shm"
_PID_IN_NAME = re.compile(r"^torch_(\d+)_")


@dataclass
class ShmUsage:
    used_bytes: int
    total_bytes: int

    @property
    def fraction(self) -> float:
        return self.used_bytes / self.total_bytes if self.total_bytes else 0.0


def shm_usage(path: str = SHM_DIR) -> ShmUsage:
    st = os.statvfs(path)
    return ShmUsage(used_bytes=(st.f_blocks - st.f_bfree) * st.f_frsize, total_bytes=st.f_blocks * st.f_frsize)


def pid_alive(pid: int) -> bool:
    """The process exists and is not a zombie."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def open_shm_paths(pid: int, shm_dir: str = SHM_DIR) -> Set[str]:
    """Segments in ``shm_dir`` that process ``pid`` has open (fd) or mapped (mmap); empty if we may not look.

    Read from /proc directly: psutil's ``open_files`` skips unlinked files and its ``memory_maps`` parses the
    much larger ``smaps`` of every process on every sample."""
    prefix = shm_dir.rstrip("/") + "/"
    paths: Set[str] = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                target = os.readlink(f"/proc/{pid}/fd/{fd}")
            except OSError:
                continue
            if target.startswith(prefix):
                paths.add(target.split(" (deleted)")[0])
    except OSError:
        pass
    try:
        with open(f"/proc/{pid}/maps") as f:
            for line in f:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].startswith(prefix):
                    paths.add(parts[5].strip().split(" (deleted)")[0])
    except OSError:
        pass
    return paths


def descendant_pids(root: int) -> Set[int]:
    """Every process below ``root`` (peers, the forkserver, p2pd daemons); empty once ``root`` is gone."""
    try:
        return {child.pid for child in psutil.Process(root).children(recursive=True)}
    except psutil.Error:
        return set()


def peer_pids(launcher_pid: int) -> List[int]:
    """A launcher's peer processes: its descendants that have a ``p2pd`` child (the launcher's own is direct)."""
    parents = set()
    for pid in descendant_pids(launcher_pid):
        try:
            process = psutil.Process(pid)
            if process.name() == "p2pd":
                parents.add(process.ppid())
        except psutil.Error:
            continue
    return sorted(parents - {launcher_pid})


@dataclass
class ShmWatchdog:
    """Samples ``/dev/shm`` every ``interval`` seconds on a daemon thread (see the module docstring).

    ``run_pids`` returns the pids of the run's processes (launcher, peers, their helpers); dead ones may stay in
    the list — that is how their leftovers are recognised.
    """

    run_pids: Callable[[], Iterable[int]]
    warn_fraction: float = 0.8
    interval: float = 30.0
    shm_dir: str = SHM_DIR
    on_warning: Optional[Callable[[str], None]] = None
    owned: Dict[str, Set[int]] = field(default_factory=dict)  # segment -> run pids seen with it
    known_pids: Set[int] = field(default_factory=set)
    removed: List[str] = field(default_factory=list)
    last_usage: Optional[ShmUsage] = None
    _stop: threading.Event = field(default_factory=threading.Event, repr=False)
    _thread: Optional[threading.Thread] = field(default=None, repr=False)

    def _observe(self) -> None:
        self.known_pids |= set(self.run_pids())
        for pid in self.known_pids:
            if pid_alive(pid):
                for path in open_shm_paths(pid, self.shm_dir):
                    self.owned.setdefault(path, set()).add(pid)
        for name in os.listdir(self.shm_dir):
            match = _PID_IN_NAME.match(name)
            if match and int(match.group(1)) in self.known_pids:
                self.owned.setdefault(os.path.join(self.shm_dir, name), set()).add(int(match.group(1)))

    def _in_use(self) -> Set[str]:
        used: Set[str] = set()
        for pid in psutil.pids():
            if pid_alive(pid):
                used |= open_shm_paths(pid, self.shm_dir)
        return used

    def sweep(self) -> List[str]:
        """One sample: record ownership, warn on high usage, remove the run's orphaned segments."""
        self._observe()
        in_use = self._in_use()
        removed = []
        for path, owners in sorted(self.owned.items()):
            try:
                st = os.stat(path)
            except FileNotFoundError:
                self.owned.pop(path)
                continue
            if st.st_uid != os.getuid() or path in in_use or any(pid_alive(pid) for pid in owners):
                continue
            try:
                os.unlink(path)
            except OSError as e:
                logger.warning("could not remove %s: %s", path, e)
                continue
            self.owned.pop(path)
            removed.append(path)
        if removed:
            logger.info("/dev/shm watchdog removed %d segment(s) left by dead run processes", len(removed))
        self.removed += removed
        self._check_usage()
        return removed

    def _check_usage(self) -> None:
        self.last_usage = shm_usage(self.shm_dir)
        if self.last_usage.fraction >= self.warn_fraction:
            message = (f"/dev/shm is {100 * self.last_usage.fraction:.0f}% full "
                       f"({self.last_usage.used_bytes / 2**20:.0f} of {self.last_usage.total_bytes / 2**20:.0f} MiB)")
            logger.warning(message)
            if self.on_warning is not None:
                self.on_warning(message)

    def start(self) -> "ShmWatchdog":
        def loop():
            while not self._stop.wait(self.interval):
                try:
                    self.sweep()
                except Exception as e:  # noqa: BLE001 - the watchdog must never take the run down
                    logger.debug("shm watchdog: %r", e)

        self._thread = threading.Thread(target=loop, name="shm-watchdog", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> List[str]:
        """Stop sampling and remove everything the run created that no live process still uses."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            return self.sweep()
        except Exception as e:  # noqa: BLE001
            logger.debug("shm watchdog final sweep: %r", e)
            return []

    def metrics(self) -> Dict[str, float]:
        usage = self.last_usage
        return {} if usage is None else {"shm_used_mb": usage.used_bytes / 2**20, "shm_used_fraction": usage.fraction}
