#!/usr/bin/env python3
"""Identical training in many processes on one core, with glibc's default malloc settings and with the ones
``mar_fl.py`` gives its peers (``configure_peer_environment``: freed blocks kept for reuse).

    python bench/bench_training_spread.py --procs 32 --steps 40 --core 1

Each process is pinned to ``--core``, builds the MNIST CNN of ``ml_tasks`` shape (conv 32, conv 64, fc 128),
waits for a common start line, then runs ``--steps`` momentum-SGD steps on one fixed random batch of 32. Printed
per setting: the wall seconds and the CPU seconds of the training (min / median / max over the processes) and the
page faults the training took (median). Under a fair scheduler the wall time follows the CPU time, so any spread
in CPU time for the same work is a spread in when peers finish training, which a round waits for.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

WORKER = r"""
import os, resource, sys, time
import torch
os.sched_setaffinity(0, {int(sys.argv[1])})
torch.set_num_threads(1)
torch.manual_seed(0)
nn = torch.nn
model = nn.Sequential(nn.Conv2d(1, 32, 3), nn.ReLU(), nn.Conv2d(32, 64, 3), nn.ReLU(), nn.MaxPool2d(2),
                      nn.Flatten(), nn.Linear(9216, 128), nn.ReLU(), nn.Linear(128, 10))
opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
x, y = torch.randn(32, 1, 28, 28), torch.randint(0, 10, (32,))
while not os.path.exists(sys.argv[3]):
    time.sleep(0.01)
faults, wall, cpu = resource.getrusage(resource.RUSAGE_SELF).ru_minflt, time.time(), time.thread_time()
for _ in range(int(sys.argv[2])):
    opt.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()
print(time.time() - wall, time.thread_time() - cpu, resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults)
"""


def run(env: dict, args) -> list:
    with tempfile.TemporaryDirectory() as tmp:
        go = os.path.join(tmp, "go")
        procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(args.core), str(args.steps), go],
                                  env=env, stdout=subprocess.PIPE, text=True) for _ in range(args.procs)]
        time.sleep(args.settle)  # every process imported torch and waits at the start line
        open(go, "w").close()
        return [tuple(float(v) for v in p.communicate()[0].split()) for p in procs]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--procs", type=int, default=32)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--core", type=int, default=0)
    p.add_argument("--settle", type=float, default=15.0, help="seconds for the processes to start")
    args = p.parse_args()
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from mar_fl import configure_peer_environment

    for key in [k for k in os.environ if k.startswith("MALLOC_")]:
        del os.environ[key]
    base = dict(os.environ)
    configure_peer_environment()  # the settings mar_fl.py gives its peers
    tuned = {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")}
    for name, env in (("glibc defaults", base), ("mar_fl " + " ".join(f"{k}={v}" for k, v in tuned.items()),
                                                   {**base, **tuned})):
        rows = run(env, args)
        wall, cpu, faults = (sorted(r[i] for r in rows) for i in range(3))
        print(f"{name}:\n  wall {wall[0]:.2f} / {statistics.median(wall):.2f} / {wall[-1]:.2f} s, "
              f"CPU {cpu[0]:.3f} / {statistics.median(cpu):.3f} / {cpu[-1]:.3f} s, "
              f"page faults {statistics.median(faults):,.0f} (min / median / max over {len(rows)} processes)")


if __name__ == "__main__":
    main()
