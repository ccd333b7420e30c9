#!/usr/bin/env python3
"""Plant a stale /dev/shm segment of a dead "run" process and watch the watchdog remove it (keeps a foreign one).

    .venv/bin/python bench/shm_watchdog_demo.py
"""
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from shared_memory_handling import ShmWatchdog

HOLD = "import sys, time; f = open(sys.argv[1], 'w'); f.write('x' * (1 << 20)); f.flush(); time.sleep(600)"
peer = subprocess.Popen([sys.executable, "-c", HOLD, "/dev/shm/psm_marfl_demo_run"])    # a "peer" of the run
other = "/dev/shm/psm_marfl_demo_other_run"
open(other, "w").write("y")                                                            # nobody of ours
time.sleep(1)
dog = ShmWatchdog(run_pids=lambda: [os.getpid(), peer.pid], warn_fraction=0.8)
print("sweep while the peer lives:", dog.sweep(), "| owned:", sorted(dog.owned))
peer.kill()
peer.wait()
print("peer SIGKILLed; segment still there:", os.path.exists("/dev/shm/psm_marfl_demo_run"))
print("sweep after its death:", dog.sweep())
print("other run's segment kept:", os.path.exists(other), "| usage:", dog.metrics())
os.unlink(other)
