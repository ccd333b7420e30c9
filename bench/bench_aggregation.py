#!/usr/bin/env python3
"""Benchmark Moshpit All-Reduce alone: N real peers, each with MNIST-CNN-sized tensors.

    python bench/bench_aggregation.py --np 16 --gs 4 --ni 2 [--compression fp16] [--rounds 5] [--json]
    python bench/bench_aggregation.py --np 8 --gs 2 --ni 3 --hosts 2          # as root: 2 separate hosts
    MFL_RATE=100mbit MFL_DELAY_MS=20 python bench/bench_aggregation.py --np 8 --gs 2 --ni 3 --hosts 2

Peers are forkserver children that preload torch and hivemind, exactly as ``mar_fl.py`` starts them. Each round
every peer draws fresh random tensors (seeded by peer and round), so the error is measured anew each round.
Prints: median seconds per MAR round (slowest peer), bytes sent per peer per round, the payload, the max
deviation from the exact global mean, and memory per peer (PSS of the peer process plus its p2pd).

Without ``--hosts`` every peer listens on 127.0.0.1. ``--hosts K`` spreads the peers over K network namespaces
(``tests/netns.py``, the kit in ``../shared/netns``; needs root), contiguous blocks of peer indices per host as
``mar_fl.py --peer-range`` gives them, each peer listening on its host's address 198.51.100.<h+1>: one worker
group per host (this script with ``--worker-group``, started inside the namespace with ``nsenter``) spawns that
host's peers, group 0 also runs the bootstrap node. ``MFL_RATE`` / ``MFL_DELAY_MS`` shape the links between hosts
(rate per host egress, one-way delay per hop; see the kit's README).

Before round 0 every peer reads the address records until it knows every node: a peer's first dial of a group-mate
on another host otherwise fails when its one address-book refresh came back without that group-mate
(``peer_synchronization.PeerNetwork._lookup_address`` does not retry within ``ADDRESS_REFRESH_MIN_INTERVAL``),
and that step keeps its values local. Failed steps, if any, are counted and printed.
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings

import psutil

warnings.filterwarnings("ignore", category=FutureWarning)  # hivemind's torch.jit use at import
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

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
    """Proportional set size of a process in KiB (0 when it is gone or not ours to look at)."""
    try:
        return psutil.Process(pid).memory_full_info().pss // 1024
    except (psutil.Error, AttributeError):
        return 0


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process (works for our p2pd child as well)."""
    try:
        times = psutil.Process(pid).cpu_times()
    except psutil.Error:
        return 0.0
    return times.user + times.system


def learn_addresses(net, expected: int, timeout: float = 120.0) -> int:
    """Read the address records until ``expected`` nodes are known (or the timeout): see the docstring's note."""
    deadline = time.monotonic() + timeout
    known = 0
    while time.monotonic() < deadline:
        known = net.run(net.refresh_addresses(), timeout=30)
        if known >= expected:
            break
        time.sleep(0.5)
    return known


def worker(index: int, args: dict, maddrs, results) -> None:
    import torch

    from mar_fl import release_freed_memory
    from moshpit_all_reduce import AveragerOptions, MarSchedule, MoshpitAverager, moshpit_all_reduce
    from peer_synchronization import NetworkOptions, PeerNetwork, barrier

    torch.set_num_threads(1)
    net = PeerNetwork(NetworkOptions(initial_peers=maddrs, host=args["host"])).start()
    try:
        avg = MoshpitAverager(net, AveragerOptions(prefix="bench", index=index, compression=args["compression"]))
        schedule = MarSchedule(args["gs"], args["gk"], args["ni"])
        n = args["np"]
        barrier(net, "bench.start", me=index, expected=range(n), timeout=300)
        learn_addresses(net, n + 1)  # every peer and the bootstrap node
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
            mean = global_mean(n, r) if index in args["check_peers"] else None
            err = max((a - b).abs().max().item() for a, b in zip(tensors, mean)) if mean else None
            release_freed_memory()
            rows.append({"seconds": seconds, "sent": report.bytes_sent, "received": report.bytes_received,
                         "err": err, "failed_steps": report.failed_steps,
                         "payload": sum(t.numel() * t.element_size() for t in tensors)})
        barrier(net, "bench.end", me=index, expected=range(n), timeout=120)
        memory_kb = pss_kb(os.getpid()) + (pss_kb(net.p2pd_pid) if net.p2pd_pid else 0)
        results.put({"index": index, "rows": rows, "memory_kb": memory_kb, "cpu": cpu})
        barrier(net, "bench.measured", me=index, expected=range(n), timeout=120)
    finally:
        net.shutdown()


def run_peers(conf: dict, indices, host: str, maddrs) -> list:
    """Start peers ``indices`` listening on ``host`` (this process's network namespace) and collect their reports."""
    from mar_fl import configure_peer_environment

    ctx = mp.get_context("forkserver")
    configure_peer_environment()  # the same environment mar_fl.py gives its peers
    ctx.set_forkserver_preload(["torch", "hivemind", "moshpit_all_reduce"])
    results = ctx.Queue()
    procs = [ctx.Process(target=worker, args=(i, dict(conf, host=host), maddrs, results)) for i in indices]
    try:
        for p in procs:
            p.start()
        reports = [results.get(timeout=900) for _ in procs]
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return reports


def host_blocks(num_peers: int, hosts: int):
    """Contiguous peer indices per host (the split ``mar_fl.py`` uses for Slurm tasks)."""
    from config_setup import split_peer_range

    return [range(*split_peer_range(num_peers, hosts, h)) for h in range(hosts)]


def worker_group(spec_path: str, group: int) -> None:
    """One host of a ``--hosts`` run, already inside its namespace: its peers, and on host 0 the bootstrap node."""
    from peer_synchronization import NetworkOptions, PeerNetwork

    with open(spec_path) as f:
        spec = json.load(f)
    folder = os.path.dirname(spec_path)
    boot_file = os.path.join(folder, "bootstrap.json")
    boot = None
    try:
        if group == 0:
            boot = PeerNetwork(NetworkOptions(host=spec["addresses"][0])).start()
            with open(boot_file + ".tmp", "w") as f:
                json.dump(boot.visible_maddrs(), f)
            os.replace(boot_file + ".tmp", boot_file)
        deadline = time.time() + 300
        while not os.path.exists(boot_file):
            if time.time() > deadline:
                raise SystemExit(f"group {group}: no bootstrap file from group 0 after 300 s")
            time.sleep(0.2)
        with open(boot_file) as f:
            maddrs = json.load(f)
        reports = run_peers(spec["conf"], spec["blocks"][group], spec["addresses"][group], maddrs)
        with open(os.path.join(folder, f"group{group}.json"), "w") as f:
            json.dump(reports, f)
    finally:
        if boot is not None:
            boot.shutdown()


def run_on_hosts(args: argparse.Namespace, conf: dict) -> list:
    """``--hosts K``: K namespaces, one worker group per host, each started inside its namespace."""
    sys.path.insert(0, os.path.join(ROOT, "tests"))
    import netns

    reason = netns.unavailable_reason()
    if reason:
        raise SystemExit(f"--hosts needs network namespaces: {reason}")
    rate, delay = os.environ.get("MFL_RATE") or None, os.environ.get("MFL_DELAY_MS") or None
    hosts = netns.up(args.hosts, tag="bn", rate=rate, delay_ms=delay)
    folder = tempfile.mkdtemp(prefix="bench-hosts-")
    try:
        spec = {"conf": conf, "blocks": [list(b) for b in host_blocks(args.np, args.hosts)],
                "addresses": [hosts.address(h) for h in range(args.hosts)]}
        spec_path = os.path.join(folder, "spec.json")
        with open(spec_path, "w") as f:
            json.dump(spec, f)
        groups = [subprocess.Popen(hosts.wrap(h, [sys.executable, os.path.abspath(__file__), "--worker-group",
                                                  str(h), "--spec", spec_path]))
                  for h in range(args.hosts)]
        codes = [g.wait(timeout=1800) for g in groups]
        if any(codes):
            raise SystemExit(f"worker groups exited with {codes}")
        reports = []
        for h in range(args.hosts):
            with open(os.path.join(folder, f"group{h}.json")) as f:
                reports += json.load(f)
        return reports
    finally:
        hosts.down()  # also stops whatever a failed group left inside the namespaces
        for name in os.listdir(folder):
            os.remove(os.path.join(folder, name))
        os.rmdir(folder)


def run(args: argparse.Namespace) -> dict:
    conf = {"np": args.np, "gs": args.gs, "gk": args.gk or args.ni, "ni": args.ni, "rounds": args.rounds,
            "compression": args.compression, "check_peers": list(range(args.np))}  # every peer checks its result
    if args.hosts:
        reports = run_on_hosts(args, conf)
    else:
        from peer_synchronization import NetworkOptions, PeerNetwork

        boot = PeerNetwork(NetworkOptions()).start()
        try:
            reports = run_peers(conf, range(args.np), "127.0.0.1", boot.visible_maddrs())
        finally:
            boot.shutdown()
    per_round = [max(rep["rows"][r]["seconds"] for rep in reports) for r in range(args.rounds)]
    timed = per_round[1:] if len(per_round) > 1 else per_round  # round 0 includes connection set-up
    errors = [row["err"] for rep in reports for row in rep["rows"] if row["err"] is not None]
    return {
        "np": args.np, "gs": args.gs, "ni": args.ni, "compression": args.compression,
        "hosts": args.hosts or 1, "on_loopback": not args.hosts,
        "rate": os.environ.get("MFL_RATE") if args.hosts else None,
        "delay_ms": os.environ.get("MFL_DELAY_MS") if args.hosts else None,
        "seconds_per_round": statistics.median(timed),
        "seconds_per_round_max": max(timed),
        "bytes_sent_per_peer": statistics.mean(row["sent"] for rep in reports for row in rep["rows"]),
        "payload_bytes": reports[0]["rows"][0]["payload"],
        "max_abs_error": max(errors),
        "failed_steps": sum(row["failed_steps"] for rep in reports for row in rep["rows"]),
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
    p.add_argument("--hosts", type=int, default=0,
                   help="spread the peers over K network namespaces (root; MFL_RATE / MFL_DELAY_MS shape the links); "
                        "0: all on 127.0.0.1")
    p.add_argument("--json", action="store_true")
    p.add_argument("--worker-group", type=int, default=None, help=argparse.SUPPRESS)  # internal, --hosts
    p.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker_group is not None:
        worker_group(args.spec, args.worker_group)
        return
    if args.hosts < 0 or args.hosts > args.np:
        p.error(f"--hosts must be 0..--np ({args.np})")
    out = run(args)
    if args.json:
        print(json.dumps(out))
        return
    ideal = 2 * (args.gs - 1) / args.gs * args.ni * out["payload_bytes"]
    where = "127.0.0.1" if out["on_loopback"] else f"{out['hosts']} hosts" + (
        f" (rate {out['rate'] or '-'}, delay {out['delay_ms'] or 0} ms/hop)" if out["rate"] or out["delay_ms"] else "")
    print(f"peers {out['np']}  gs {out['gs']}  ni {out['ni']}  compression {out['compression']}  on {where}")
    print(f"  seconds per MAR round (median) : {out['seconds_per_round']:.3f} (slowest round "
          f"{out['seconds_per_round_max']:.3f})")
    print(f"  bytes sent per peer per round  : {out['bytes_sent_per_peer'] / 1e6:.2f} MB "
          f"({out['bytes_sent_per_peer'] / ideal:.3f} x 2(M-1)/M*ni*payload)")
    print(f"  payload per peer               : {out['payload_bytes'] / 1e6:.2f} MB")
    print(f"  max |x - global mean|          : {out['max_abs_error']:.2e}")
    print(f"  failed MAR steps (all peers)   : {out['failed_steps']}")
    print(f"  memory per peer (PSS + p2pd)   : {out['memory_mb_per_peer']:.0f} MB")
    cpu = out["cpu_seconds_per_round"]
    print(f"  CPU s per round, all peers     : python {cpu['python']:.2f}, p2pd {cpu['p2pd']:.2f}")


if __name__ == "__main__":
    main()
