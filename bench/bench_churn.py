#!/usr/bin/env python3
"""Churn benchmark: SIGKILL some peers of a real run and compare round times before and after.

    python bench/bench_churn.py [--np 8 --gs 2 --gk 3 --ni 3 --rounds 20 --kill 2 --after 5] [--json]

Runs ``mar_fl.py`` (MNIST, ``--data-dir``), kills ``--kill`` peer processes once round ``--after`` is reported, and
prints the median round time before the kill, in the round of the kill and the next one (one matchmaking wait per
group that still expected the dead), and from two rounds after it on; plus timed-out and failed steps per phase.
Tested rounds are left out of the medians (evaluation time is not averaging time): use ``--tf`` > rounds.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from shared_memory_handling import peer_pids  # noqa: E402 - after the sys.path line


def read_rows(path: str):
    try:
        with open(path) as f:
            return [json.loads(line) for line in f if line.endswith("\n")]
    except FileNotFoundError:
        return []


def phase(rows, lo, hi):
    chosen = [r for r in rows if lo <= r["round"] <= hi]
    return {"rounds": f"{lo}-{hi}", "median_round_seconds": statistics.median(r["round_seconds"] for r in chosen),
            "median_aggregation_seconds": statistics.median(r["aggregation_seconds"] for r in chosen),
            "timed_out_steps": sum(r["timed_out_steps"] for r in chosen),
            "failed_steps": sum(r["failed_steps"] for r in chosen)} if chosen else None


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--np", type=int, default=8)
    p.add_argument("--gs", type=int, default=2)
    p.add_argument("--gk", type=int, default=3)
    p.add_argument("--ni", type=int, default=3)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--kill", type=int, default=2)
    p.add_argument("--after", type=int, default=5)
    p.add_argument("--matchmaking-timeout", type=float, default=60.0)
    p.add_argument("--data-dir", default=os.path.join(ROOT, "..", "shared", "data"))
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    run_dir = os.path.join(tempfile.mkdtemp(prefix="churn-"), "run")
    cmd = [sys.executable, os.path.join(ROOT, "mar_fl.py"), "--np", str(args.np), "--gs", str(args.gs), "--gk",
           str(args.gk), "--ni", str(args.ni), "--rounds", str(args.rounds), "--tf", str(args.rounds + 1),
           "-sd", "1", "--data-dir", args.data_dir, "--run-dir", run_dir, "--wandb", "disabled",
           "--matchmaking-timeout", str(args.matchmaking_timeout)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = os.path.join(run_dir, "metrics.jsonl")
    while proc.poll() is None and len(read_rows(metrics)) < args.after:
        time.sleep(0.2)
    for pid in peer_pids(proc.pid)[-args.kill:]:
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    rows = read_rows(metrics)
    death = next((r["round"] for r in rows if r["participating_peers"] < args.np), None)
    if death is None:
        sys.exit(f"no round lost a peer; see {run_dir}")
    result = {"np": args.np, "killed": args.kill, "death_round": death, "exit_code": proc.returncode,
              "before": phase(rows, 2, death - 1), "during": phase(rows, death, death + 1),
              "after": phase(rows, death + 2, args.rounds), "run_dir": run_dir}
    if args.json:
        print(json.dumps(result))
        return
    print(f"N = {args.np}, {args.kill} peers SIGKILLed after round {args.after} (first round without them: {death}),"
          f" exit {proc.returncode}")
    for name in ("before", "during", "after"):
        ph = result[name]
        if ph:
            print(f"  {name:<6} rounds {ph['rounds']:>7}: median {ph['median_round_seconds']:6.2f} s/round "
                  f"(aggregation {ph['median_aggregation_seconds']:5.2f} s), timed-out steps {ph['timed_out_steps']}, "
                  f"failed steps {ph['failed_steps']}")
    if result["before"] and result["after"]:
        ratio = result["after"]["median_round_seconds"] / result["before"]["median_round_seconds"]
        print(f"  after / before: {ratio:.2f}")


if __name__ == "__main__":
    main()
