#!/usr/bin/env python3
"""Benchmark Moshpit All-Reduce alone: N real peers on 127.0.0.1, each with MNIST-CNN-sized tensors.

    python bench/bench_aggregation.py --np 16 --gs 4 --ni 2 [--compression fp16] [--rounds 5] [--json]

Peers are forkserver children that preload torch and hivemind, exactly as ``mar_fl.py`` starts them. Each round
every peer draws fresh random tensors (seeded by peer and round), so the error is measured anew each round.
Prints: median seconds per MAR round (slowest peer), bytes sent per peer per round, the payload, the max
deviation from the exact global mean, and memory per peer (PSS of the peer process plus its p2pd).
"""
from __future__ import annotations

import argparse
import json
import warnings
import multiprocessing as mp
import os
import statistics
import sys
import time

warnings.filterwarnings("ignore", category=FutureWarning)  # hivemind's torch.jit use at import
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# parameter shapes of the MNIST CNN (conv1, conv2, fc1, fc2 weights and biases): 1,199,882 values
CNN_SHAPES = [(32, 1, 3, 3), (32,), (64, 32, 3, 3), (64,), (128, 9216), (128,), (10, 128), (10,)]


def make_tensors(index: int, round_index: int):
    import torch

    g = torch.Generator().manual_seed(1_000_003 * round_index + index)
    params = [torch.randn(s, generator=g) for s in CNN_SHAPES]
    return params + [torch.randn(s, generator=g) for s in CNN_SHAPES]  # + momentum buffers


def global_mean(num_peers: int, round_index: int):
    total = None
    for i in range(num_peers):
        ts = make_tensors(i, round_index)
        total = ts if total is None else [a.add_(b) for a, b in zip(total, ts)]
    return [t / num_peers for t in total]


def pss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, from /proc (works for our p2pd child as well)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def worker(index: int, args: dict, maddrs, results) -> None:
    import torch

    from mar_fl import release_freed_memory
    from moshpit_all_reduce import AveragerOptions, MarSchedule, MoshpitAverager, moshpit_all_reduce
    from peer_synchronization import NetworkOptions, PeerNetwork, barrier

    torch.set_num_threads(1)
    net = PeerNetwork(NetworkOptions(initial_peers=maddrs)).start()
    try:
        avg = MoshpitAverager(net, AveragerOptions(prefix="bench", index=index, compression=args["compression"]))
        schedule = MarSchedule(args["gs"], args["gk"], args["ni"])
        n = args["np"]
        barrier(net, "bench.start", me=index, expected=range(n), timeout=300)
        rows, cpu = [], {"python": 0.0, "p2pd": 0.0}
        for r in range(args["rounds"]):
            tensors = make_tensors(index, r)
            barrier(net, f"bench.r{r}", me=index, expected=range(n), timeout=120)
            t0 = time.perf_counter()
            cpu0 = (cpu_seconds(os.getpid()), cpu_seconds(net.p2pd_pid))
            report = moshpit_all_reduce(avg, tensors, participants=range(n), round_index=r, schedule=schedule)
            seconds = time.perf_counter() - t0
            if r > 0:
                cpu["python"] += cpu_seconds(os.getpid()) - cpu0[0]
                cpu["p2pd"] += cpu_seconds(net.p2pd_pid) - cpu0[1]
            mean = global_mean(n, r) if index < args["check_peers"] else None
            err = max((a - b).abs().max().item() for a, b in zip(tensors, mean)) if mean else None
            release_freed_memory()
            rows.append({"seconds": seconds, "sent": report.bytes_sent, "received": report.bytes_received,
                         "err": err, "payload": sum(t.numel() * t.element_size() for t in tensors)})
        barrier(net, "bench.end", me=index, expected=range(n), timeout=120)
        memory_kb = pss_kb(os.getpid()) + (pss_kb(net.p2pd_pid) if net.p2pd_pid else 0)
        results.put({"index": index, "rows": rows, "memory_kb": memory_kb, "cpu": cpu})
        barrier(net, "bench.measured", me=index, expected=range(n), timeout=120)
    finally:
        net.shutdown()


def run(args: argparse.Namespace) -> dict:
    from peer_synchronization import NetworkOptions, PeerNetwork

    boot = PeerNetwork(NetworkOptions()).start()
    from mar_fl import configure_peer_environment

    ctx = mp.get_context("forkserver")
    configure_peer_environment()  # the same environment mar_fl.py gives its peers
    ctx.set_forkserver_preload(["torch", "hivemind", "moshpit_all_reduce"])
    results = ctx.Queue()
    conf = {"np": args.np, "gs": args.gs, "gk": args.gk or args.ni, "ni": args.ni, "rounds": args.rounds,
            "compression": args.compression, "check_peers": min(args.np, 2)}
    procs = [ctx.Process(target=worker, args=(i, conf, boot.visible_maddrs(), results)) for i in range(args.np)]
    try:
        for p in procs:
            p.start()
        reports = [results.get(timeout=600) for _ in procs]
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
        boot.shutdown()
    per_round = [max(rep["rows"][r]["seconds"] for rep in reports) for r in range(args.rounds)]
    timed = per_round[1:] if len(per_round) > 1 else per_round  # round 0 includes connection set-up
    errors = [row["err"] for rep in reports for row in rep["rows"] if row["err"] is not None]
    return {
        "np": args.np, "gs": args.gs, "ni": args.ni, "compression": args.compression,
        "seconds_per_round": statistics.median(timed),
        "bytes_sent_per_peer": statistics.mean(row["sent"] for rep in reports for row in rep["rows"]),
        "payload_bytes": reports[0]["rows"][0]["payload"],
        "max_abs_error": max(errors),
        "memory_mb_per_peer": statistics.mean(rep["memory_kb"] for rep in reports) / 1024,
        "cpu_seconds_per_round": {k: sum(rep["cpu"][k] for rep in reports) / max(1, args.rounds - 1)
                                  for k in ("python", "p2pd")},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--np", type=int, default=8)
    p.add_argument("--gs", type=int, default=2)
    p.add_argument("--ni", type=int, default=3)
    p.add_argument("--gk", type=int, default=None, help="group key dimension (default: --ni)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compression", choices=["none", "fp16", "8bit"], default="none")
    p.add_argument("--json", action="store_true")
    args = p.parse_args()
    out = run(args)
    if args.json:
        print(json.dumps(out))
        return
    ideal = 2 * (args.gs - 1) / args.gs * args.ni * out["payload_bytes"]
    print(f"peers {out['np']}  gs {out['gs']}  ni {out['ni']}  compression {out['compression']}")
    print(f"  seconds per MAR round (median) : {out['seconds_per_round']:.3f}")
    print(f"  bytes sent per peer per round  : {out['bytes_sent_per_peer'] / 1e6:.2f} MB "
          f"({out['bytes_sent_per_peer'] / ideal:.3f} x 2(M-1)/M*ni*payload)")
    print(f"  payload per peer               : {out['payload_bytes'] / 1e6:.2f} MB")
    print(f"  max |x - global mean|          : {out['max_abs_error']:.2e}")
    print(f"  memory per peer (PSS + p2pd)   : {out['memory_mb_per_peer']:.0f} MB")
    cpu = out["cpu_seconds_per_round"]
    print(f"  CPU s per round, all peers     : python {cpu['python']:.2f}, p2pd {cpu['p2pd']:.2f}")


if __name__ == "__main__":
    main()
