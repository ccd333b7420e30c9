#!/usr/bin/env python3
"""Time and weigh a whole ``mar_fl.py`` run: start-up, round = training + aggregation, memory per peer by process.

    python bench/bench_run.py --out /tmp/run64 -- --np 64 --gs 4 --gk 3 --ni 3 --rounds 3 --transport tcp
    python bench/bench_run.py --out /tmp/run16 --json -- --np 16 --gs 4 --gk 2 --ni 2 --rounds 5 --tf 1

Everything after ``--`` goes to ``mar_fl.py`` (``--run-dir``, ``--wandb disabled`` and, when ``MARFL_DATA_DIR`` is
set, ``--data-dir`` are added). Every ``--sample`` seconds the script reads the PSS (``/proc/PID/smaps_rollup``) of
every process under the launcher and adds it up per kind: peer processes, their ``p2pd`` daemons, the launcher's
own (launcher, forkserver, its ``p2pd``). Printed, from ``metrics.jsonl``: per round ``round_seconds`` (the
slowest peer), ``train_seconds`` and ``aggregation_seconds`` (means over peers; the rest of a round is testing and
waiting for the slowest); ``period_seconds``: how much later round r ended than round r - 1 (the run's pace,
without the drift of early peers waiting in a round for late ones); ``slowest_train_seconds``: the slowest peer's
training (from ``peers/*.jsonl``); ``start_seconds``: launch until the last peer began round 1 (its ``t_start``:
spawning, data loading, ``p2pd`` and DHT start-up, the start barrier; ``first_start_seconds`` for the first peer);
``peak_pss_mb``: the largest total seen, with the per-peer split at that moment; ``start_stages``: seconds after
launch at which the first, median and last peer logged each start-up stage (network up, model and data ready,
through the start barrier), from ``logs/peer_*.log``.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import subprocess
import sys
import time

import psutil

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pss_mb(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def memory_by_kind(launcher: int) -> dict:
    """PSS in MB of the launcher's tree: peers (Python processes with a p2pd child), their p2pds, the rest."""
    try:
        tree = psutil.Process(launcher).children(recursive=True)
    except psutil.Error:
        return {}
    daemons = [p for p in tree if _name(p) == "p2pd"]
    peers = {_parent(p) for p in daemons} - {launcher, None}
    out = {"peers": len(peers), "peer_python": 0.0, "peer_p2pd": 0.0, "other": pss_mb(launcher)}
    for p in tree:
        if p.pid in peers:
            out["peer_python"] += pss_mb(p.pid)
        elif _name(p) == "p2pd" and _parent(p) in peers:
            out["peer_p2pd"] += pss_mb(p.pid)
        else:
            out["other"] += pss_mb(p.pid)
    out["total"] = out["peer_python"] + out["peer_p2pd"] + out["other"]
    return out


def _parent(process):
    try:
        return process.ppid()
    except psutil.Error:  # it exited while we looked
        return None


def _name(process) -> str:
    try:
        return process.name()
    except psutil.Error:
        return ""


def slowest_training(run_dir: str) -> dict:
    """Round -> the longest ``train_seconds`` any peer reported for it."""
    slowest: dict = {}
    peers = os.path.join(run_dir, "peers")
    for name in sorted(os.listdir(peers)) if os.path.isdir(peers) else []:
        with open(os.path.join(peers, name)) as f:
            for line in f:
                row = json.loads(line)
                if "train_seconds" in row:
                    slowest[row["round"]] = max(slowest.get(row["round"], 0.0), row["train_seconds"])
    return slowest


def round_one_starts(run_dir: str) -> list:
    """When each peer began round 1 (``t_start`` of its round-1 row in ``peers/*.jsonl``), in time order."""
    starts = []
    for name in sorted(os.listdir(os.path.join(run_dir, "peers"))):
        with open(os.path.join(run_dir, "peers", name)) as f:
            starts += [row["t_start"] for row in map(json.loads, f) if row.get("round") == 1]
    return sorted(starts)


START_STAGES = {"network": "network up in", "ready": "model, data and averager ready", "barrier": "peers up,"}
_LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) ")


def start_stages(run_dir: str, launched: float) -> dict:
    """Stage -> [first, median, last] seconds after ``launched`` at which the peers logged it (see START_STAGES)."""
    seen: dict = {stage: [] for stage in START_STAGES}
    logs = os.path.join(run_dir, "logs")
    for name in sorted(os.listdir(logs)) if os.path.isdir(logs) else []:
        with open(os.path.join(logs, name), errors="replace") as f:
            for line in f:
                stamp = _LOG_TIME.match(line)
                stage = next((s for s, text in START_STAGES.items() if text in line), None) if stamp else None
                if stage:
                    when = datetime.datetime.strptime(stamp.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
                    seen[stage].append(when - launched)
    return {stage: [min(t), statistics.median(t), max(t)] for stage, t in seen.items() if t}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="run dir (must not exist)")
    p.add_argument("--sample", type=float, default=2.0, help="seconds between two memory samples")
    p.add_argument("--json", action="store_true")
    p.add_argument("flags", nargs=argparse.REMAINDER, help="-- then mar_fl.py's flags")
    args = p.parse_args()
    flags = [f for f in args.flags if f != "--"]
    cmd = [sys.executable, os.path.join(ROOT, "mar_fl.py"), *flags, "--run-dir", args.out, "--wandb", "disabled"]
    if os.environ.get("MARFL_DATA_DIR") and "--data-dir" not in flags:
        cmd += ["--data-dir", os.environ["MARFL_DATA_DIR"]]
    metrics = os.path.join(args.out, "metrics.jsonl")
    launched = time.time()
    with open(args.out.rstrip("/") + ".launcher.log", "w") as console:  # beside the run dir, which must not exist
        proc = subprocess.Popen(cmd, stdout=console, stderr=subprocess.STDOUT)
    peak = {}
    while proc.poll() is None:
        sample = memory_by_kind(proc.pid)
        if sample.get("total", 0) > peak.get("total", 0):
            peak = sample
        time.sleep(args.sample)
    with open(metrics) as f:
        rows = [json.loads(line) for line in f]
    per_peer = {k: peak[k] / max(1, peak["peers"]) for k in ("peer_python", "peer_p2pd")} if peak else {}
    slowest, starts = slowest_training(args.out), round_one_starts(args.out)
    for previous, row in zip([None, *rows], rows):
        row["period_seconds"] = row["elapsed_seconds"] - previous["elapsed_seconds"] if previous else None
        row["slowest_train_seconds"] = slowest.get(row["round"])
    out = {
        "command": " ".join(flags), "exit_code": proc.returncode,
        "start_seconds": starts[-1] - launched if starts else None,
        "first_start_seconds": starts[0] - launched if starts else None,
        "rounds": [{k: r.get(k) for k in ("round", "round_seconds", "train_seconds", "aggregation_seconds",
                                          "failed_steps", "test_accuracy", "period_seconds",
                                          "slowest_train_seconds")} for r in rows],
        "median_round_seconds": statistics.median(r["round_seconds"] for r in rows) if rows else None,
        "median_train_seconds": statistics.median(r["train_seconds"] for r in rows) if rows else None,
        "median_aggregation_seconds": statistics.median(r["aggregation_seconds"] for r in rows) if rows else None,
        "peak_pss_mb": peak, "pss_mb_per_peer": per_peer, "start_stages": start_stages(args.out, launched),
    }
    if args.json:
        print(json.dumps(out))
        return
    print(f"{out['command']}: exit {out['exit_code']}, start {out['start_seconds']:.1f} s (first peer "
          f"{out['first_start_seconds']:.1f} s)")
    for stage, (first, median, last) in out["start_stages"].items():
        print(f"  {stage:8s} first {first:5.1f} s, median {median:5.1f} s, last {last:5.1f} s after launch")
    for r in out["rounds"]:
        pace = f", {r['period_seconds']:.1f} s after the previous one" if r["period_seconds"] else ""
        print(f"  round {r['round']}: {r['round_seconds']:.1f} s = train {r['train_seconds']:.1f} (slowest "
              f"{r['slowest_train_seconds']:.1f}) + aggregate {r['aggregation_seconds']:.1f} (failed steps "
              f"{r['failed_steps']}){pace}")
    if peak:
        print(f"  peak PSS {peak['total']:.0f} MB for {peak['peers']} peers: per peer python "
              f"{per_peer['peer_python']:.0f} + p2pd {per_peer['peer_p2pd']:.0f} MB; launcher etc. {peak['other']:.0f}")


if __name__ == "__main__":
    main()
