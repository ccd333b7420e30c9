#!/usr/bin/env python3
"""Benchmark Moshpit All-Reduce alone: N real peers, each with MNIST-CNN-sized tensors.

    python bench/bench_aggregation.py --np 16 --gs 4 --ni 2 [--compression fp16] [--rounds 5] [--json]
    python bench/bench_aggregation.py --np 16 --gs 4 --ni 2 --baseline gloo     # + a gloo all-reduce, same groups
    python bench/bench_aggregation.py --np 8 --gs 2 --ni 3 --part-size 524288 --py-spy /tmp/peer0   # profile peer 0
    python bench/bench_aggregation.py --np 8 --gs 2 --ni 3 --hosts 2          # as root: 2 separate hosts
    MFL_RATE=100mbit MFL_DELAY_MS=20 python bench/bench_aggregation.py --np 8 --gs 2 --ni 3 --hosts 2

Peers are forkserver children that preload torch and hivemind, exactly as ``mar_fl.py`` starts them. Each round
every peer draws fresh random tensors (seeded by peer and round), so the error is measured anew each round.
Prints: median seconds per MAR round (slowest peer), bytes sent per peer per round, the payload, the max
deviation from the exact global mean (checked by every peer up to N = 16, by four beyond: ``check_peers``), and
memory per peer (PSS of the peer process plus its p2pd). ``--transport tcp`` averages over the TCP data plane.

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

``--baseline gloo``: after the MAR rounds the same peer processes run a ``torch.distributed`` gloo all-reduce
(sum, then divide by the group size) of the same tensors in the same groups (``simulate_schedule``: one gloo
process group per distinct MAR group, built once over a TCPStore held by peer 0 and reused by every round, as
full-participation groups repeat), for as many rounds. A round starts, for both, at the same start line (a
counter in a TCPStore held by peer 0, whose last arrival releases the others: a DHT barrier would let peers
start a poll interval apart and time that as waiting); seconds per
step are the slowest peer's round time divided by ``--ni``, median over the rounds after the first, for both
(``seconds_per_step``, ``baseline_seconds_per_step``). Both end with the same values: the last round's gloo
result is compared with the MAR result (``baseline_max_abs_diff``).

``--part-size BYTES`` sets ``AveragerOptions.part_size_bytes`` (the largest all-reduce message); ``--py-spy PREFIX``
samples peer 0 (all threads, CPU) from round 1 on into ``PREFIX.txt`` (collapsed stacks; needs ``pip install
py-spy``). The JSON also carries ``matchmaking_seconds_per_round`` (DHT matchmaking, mean over peers, waiting for
slower group-mates included) and ``memory_mb_per_peer_by_process`` (PSS of the peer process and of its p2pd).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import multiprocessing as mp
import os
import queue
import socket
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

    from mar_fl import HeapTrimmer
    from moshpit_all_reduce import AveragerOptions, MarSchedule, MoshpitAverager, moshpit_all_reduce
    from peer_synchronization import NetworkOptions, PeerNetwork, barrier

    torch.set_num_threads(1)
    net = PeerNetwork(NetworkOptions(initial_peers=maddrs, host=args["host"], startup_timeout=300,
                                     run_secret=bytes.fromhex(args["secret"]))).start()
    try:
        options = AveragerOptions(prefix="bench", index=index, compression=args["compression"],
                                  transport=args["transport"], num_peers=args["np"])
        if args.get("part_size"):
            options = dataclasses.replace(options, part_size_bytes=args["part_size"])
        avg = MoshpitAverager(net, options)
        schedule = MarSchedule(args["gs"], args["gk"], args["ni"])
        n = args["np"]
        barrier(net, "bench.start", me=index, expected=range(n), timeout=300, max_delay=1.0)
        learn_addresses(net, n + 1)  # every peer and the bootstrap node
        store = bench_store(index, args)
        rows, cpu, last, heap = [], {"python": 0.0, "p2pd": 0.0}, None, HeapTrimmer()  # as the peers do
        profiler = None
        for r in range(args["rounds"]):
            tensors = make_tensors(index, r)
            # the bench's own start line, the same for MAR and gloo: a TCPStore counter, not the DHT (a DHT barrier
            # lets peers start up to a poll interval apart, which would be timed as the step's waiting)
            store_barrier(store, f"r{r}", n)
            if r == min(1, args["rounds"] - 1) and index == 0 and args.get("py_spy"):
                profiler = start_py_spy(args["py_spy"])
            t0 = time.perf_counter()
            cpu0 = (cpu_seconds(os.getpid()), cpu_seconds(net.p2pd_pid))
            report = moshpit_all_reduce(avg, tensors, participants=range(n), round_index=r, schedule=schedule)
            seconds = time.perf_counter() - t0
            if r > 0:
                cpu["python"] += cpu_seconds(os.getpid()) - cpu0[0]
                cpu["p2pd"] += cpu_seconds(net.p2pd_pid) - cpu0[1]
            # the exact mean costs every peer N draws: not while slower peers are still averaging
            # the bench's barriers go through its store: peers done early polling the DHT would steal the CPU of
            # those still averaging (64 peers: ~2,500 DHT calls per second)
            store_barrier(store, f"r{r}.done", n)
            mean = global_mean(n, r) if index in args["check_peers"] else None
            err = max((a - b).abs().max().item() for a, b in zip(tensors, mean)) if mean else None
            if r == args["rounds"] - 1 and args.get("baseline"):
                last = [t.clone() for t in tensors]
            heap.after_round()
            rows.append({"seconds": seconds, "sent": report.bytes_sent, "received": report.bytes_received,
                         "err": err, "failed_steps": report.failed_steps,
                         "matchmaking": sum(step.matchmaking_seconds for step in report.steps),
                         "payload": sum(t.numel() * t.element_size() for t in tensors)})
        if profiler is not None:
            stop_py_spy(profiler)
        store_barrier(store, "end", n)
        memory = {"python": pss_kb(os.getpid()), "p2pd": pss_kb(net.p2pd_pid) if net.p2pd_pid else 0}
        baseline = gloo_baseline(index, args, last, store) if args.get("baseline") == "gloo" else None
        results.put({"index": index, "rows": rows, "memory_kb": sum(memory.values()), "memory": memory, "cpu": cpu,
                     "baseline": baseline})
        store_barrier(store, "measured", n)
    finally:
        net.shutdown()


def start_py_spy(out_prefix: str) -> subprocess.Popen:
    """Sample this process (all threads, CPU only) with py-spy until :func:`stop_py_spy`: collapsed stacks in
    ``OUT_PREFIX.txt``, which ``py-spy``'s flame-graph tools and ``sort | head`` read."""
    exe = os.path.join(os.path.dirname(sys.executable), "py-spy")
    proc = subprocess.Popen([exe if os.path.exists(exe) else "py-spy", "record", "--pid", str(os.getpid()),
                             "--rate", "200", "--format", "raw", "--output", out_prefix + ".txt", "--nonblocking"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    time.sleep(1.0)  # let it attach
    return proc


def stop_py_spy(proc: subprocess.Popen) -> None:
    proc.send_signal(2)  # SIGINT: py-spy writes its output and exits
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()


def bench_store(index: int, args: dict):
    """The bench's TCPStore (held by peer 0): round start lines for both MAR and gloo, and gloo's rendezvous."""
    import torch.distributed as dist

    return dist.TCPStore(args["gloo_addr"], args["gloo_port"], args["np"], is_master=index == 0, timeout=_td(300))


def store_barrier(store, key: str, n: int) -> None:
    """Wait until all ``n`` peers reached ``key``: the last to arrive sets ``key.go``, the others block on it in the
    store (no polling; they all leave within a millisecond or so)."""
    if store.add(key, 1) == n:
        store.set(f"{key}.go", "1")
    else:
        store.wait([f"{key}.go"])


def gloo_baseline(index: int, args: dict, mar_result, store) -> dict:
    """The same rounds as a gloo all-reduce in the MAR groups: ``{"seconds": [per round], "diff": max |gloo - MAR|
    on the last round}`` (see the module docstring)."""
    import torch
    import torch.distributed as dist

    from moshpit_all_reduce import simulate_schedule

    n = args["np"]
    os.environ.setdefault("GLOO_SOCKET_IFNAME", args["gloo_ifname"])
    dist.init_process_group("gloo", store=store, rank=index, world_size=n, timeout=_td(300))
    try:
        steps = simulate_schedule(n, args["gs"], args["gk"], args["ni"])
        groups = {}
        for step in steps:  # every rank creates every group, in the same order
            for members in sorted(step.values()):
                if len(members) > 1 and tuple(members) not in groups:
                    groups[tuple(members)] = dist.new_group(members, backend="gloo")
        mine = [next(tuple(m) for m in step.values() if index in m) for step in steps]
        seconds, diff = [], None
        for r in range(args["rounds"]):
            tensors = make_tensors(index, r)
            store_barrier(store, f"gloo.r{r}", n)
            t0 = time.perf_counter()
            for members in mine:
                if len(members) == 1:
                    continue
                flat = torch.cat([t.view(-1) for t in tensors])
                dist.all_reduce(flat, group=groups[members])
                flat.div_(len(members))
                offset = 0
                for t in tensors:
                    t.view(-1).copy_(flat[offset:offset + t.numel()])
                    offset += t.numel()
            seconds.append(time.perf_counter() - t0)
        if mar_result is not None:
            diff = max((a - b).abs().max().item() for a, b in zip(tensors, mar_result))
        dist.barrier()
        return {"seconds": seconds, "diff": diff}
    finally:
        dist.destroy_process_group()


def _td(seconds: float):
    import datetime

    return datetime.timedelta(seconds=seconds)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


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
        reports = collect_reports(results, procs, timeout=900)
        for p in procs:
            p.join(timeout=60)
    finally:
        for p in procs:
            if p.is_alive():
                p.kill()
    return reports


def collect_reports(results, procs, *, timeout: float) -> list:
    """One report per peer process; exits (naming the exit codes) as soon as one died without reporting."""
    reports, deadline = [], time.monotonic() + timeout
    while len(reports) < len(procs):
        try:
            reports.append(results.get(timeout=1.0))
        except queue.Empty:
            failed = [p.exitcode for p in procs if p.exitcode not in (None, 0)]
            if failed or time.monotonic() > deadline:
                sys.exit(f"bench_aggregation: {len(procs) - len(reports)} peer(s) did not report "
                         f"(exit codes of the failed: {failed})")
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
            boot = PeerNetwork(NetworkOptions(host=spec["addresses"][0],
                                              run_secret=bytes.fromhex(spec["conf"]["secret"]))).start()
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
        conf["gloo_addr"] = hosts.address(0)  # peer 0 holds the store
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


def check_peers(num_peers: int) -> list:
    """Peers that check their result against the exact mean: all up to 16; beyond, four spread over the indices
    (the exact mean costs each checker N draws of the tensors: at N = 64, 77 M normal samples per round)."""
    if num_peers <= 16:
        return list(range(num_peers))
    return sorted({0, num_peers // 3, 2 * num_peers // 3, num_peers - 1})


def run(args: argparse.Namespace) -> dict:
    conf = {"np": args.np, "gs": args.gs, "gk": args.gk or args.ni, "ni": args.ni, "rounds": args.rounds,
            "compression": args.compression, "check_peers": check_peers(args.np),
            "part_size": args.part_size, "transport": args.transport, "secret": os.urandom(16).hex(),
            "py_spy": args.py_spy and os.path.abspath(args.py_spy),
            "baseline": args.baseline, "gloo_port": free_port(), "gloo_addr": "127.0.0.1",
            "gloo_ifname": "eth0" if args.hosts else "lo"}
    if args.hosts:
        reports = run_on_hosts(args, conf)
    else:
        from peer_synchronization import NetworkOptions, PeerNetwork

        boot = PeerNetwork(NetworkOptions(run_secret=bytes.fromhex(conf["secret"]))).start()
        try:
            reports = run_peers(conf, range(args.np), "127.0.0.1", boot.visible_maddrs())
        finally:
            boot.shutdown()
    per_round = [max(rep["rows"][r]["seconds"] for rep in reports) for r in range(args.rounds)]
    timed = per_round[1:] if len(per_round) > 1 else per_round  # round 0 includes connection set-up
    out = {}
    if args.baseline:
        base = [max(rep["baseline"]["seconds"][r] for rep in reports) for r in range(args.rounds)]
        base_timed = base[1:] if len(base) > 1 else base
        out = {"baseline": args.baseline, "baseline_seconds_per_step": statistics.median(base_timed) / args.ni,
               "baseline_seconds_per_round": statistics.median(base_timed),
               "baseline_max_abs_diff": max(rep["baseline"]["diff"] for rep in reports)}
    errors = [row["err"] for rep in reports for row in rep["rows"] if row["err"] is not None]
    return {
        "np": args.np, "gs": args.gs, "ni": args.ni, "compression": args.compression, "transport": args.transport,
        "hosts": args.hosts or 1, "on_loopback": not args.hosts, "part_size_bytes": args.part_size,
        "rate": os.environ.get("MFL_RATE") if args.hosts else None,
        "delay_ms": os.environ.get("MFL_DELAY_MS") if args.hosts else None,
        "seconds_per_round": statistics.median(timed),
        "seconds_per_step": statistics.median(timed) / args.ni,
        "seconds_per_round_max": max(timed),
        "matchmaking_seconds_per_round": statistics.median(
            statistics.mean(rep["rows"][r]["matchmaking"] for rep in reports) for r in range(1, args.rounds)
        ) if args.rounds > 1 else None,  # mean over peers: DHT matchmaking, before any tensor moves
        "bytes_sent_per_peer": statistics.mean(row["sent"] for rep in reports for row in rep["rows"]),
        "bytes_sent_per_peer_range": [min(row["sent"] for rep in reports for row in rep["rows"]),
                                      max(row["sent"] for rep in reports for row in rep["rows"])],
        "payload_bytes": reports[0]["rows"][0]["payload"],
        "max_abs_error": max(errors),
        "failed_steps": sum(row["failed_steps"] for rep in reports for row in rep["rows"]),
        "memory_mb_per_peer": statistics.mean(rep["memory_kb"] for rep in reports) / 1024,
        "memory_mb_per_peer_by_process": {k: statistics.mean(rep["memory"][k] for rep in reports) / 1024
                                          for k in ("python", "p2pd")},
        "cpu_seconds_per_round": {k: sum(rep["cpu"][k] for rep in reports) / max(1, args.rounds - 1)
                                  for k in ("python", "p2pd")},
        **out,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--np", type=int, default=8)
    p.add_argument("--gs", type=int, default=2)
    p.add_argument("--ni", type=int, default=3)
    p.add_argument("--gk", type=int, default=None, help="group key dimension (default: --ni)")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--compression", choices=["none", "fp16", "8bit"], default="none")
    p.add_argument("--transport", choices=["libp2p", "tcp"], default="libp2p",
                   help="data plane of the averaging steps (AveragerOptions.transport)")
    p.add_argument("--hosts", type=int, default=0,
                   help="spread the peers over K network namespaces (root; MFL_RATE / MFL_DELAY_MS shape the links); "
                        "0: all on 127.0.0.1")
    p.add_argument("--baseline", choices=["gloo"], default=None,
                   help="after the MAR rounds, time a torch.distributed gloo all-reduce of the same tensors in the "
                        "same groups, in the same processes, and print the ratio")
    p.add_argument("--part-size", type=int, default=None, metavar="BYTES",
                   help="AveragerOptions.part_size_bytes (default: the averager's)")
    p.add_argument("--py-spy", default=None, metavar="OUT_PREFIX",
                   help="sample peer 0 with py-spy during rounds 1.. (collapsed stacks in OUT_PREFIX.txt)")
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
    mem = out["memory_mb_per_peer_by_process"]
    print(f"  memory per peer (PSS + p2pd)   : {out['memory_mb_per_peer']:.0f} MB (python {mem['python']:.0f}, "
          f"p2pd {mem['p2pd']:.0f})")
    cpu = out["cpu_seconds_per_round"]
    print(f"  CPU s per round, all peers     : python {cpu['python']:.2f}, p2pd {cpu['p2pd']:.2f}")
    print(f"  seconds per MAR step (median)  : {out['seconds_per_step']:.3f}")
    if out["matchmaking_seconds_per_round"] is not None:
        print(f"  matchmaking s per round (mean) : {out['matchmaking_seconds_per_round']:.3f}")
    if args.baseline:
        print(f"  seconds per {args.baseline} step (median) : {out['baseline_seconds_per_step']:.3f} "
              f"(MAR / {args.baseline} = {out['seconds_per_step'] / out['baseline_seconds_per_step']:.1f}; "
              f"max |{args.baseline} - MAR| {out['baseline_max_abs_diff']:.1e})")


if __name__ == "__main__":
    main()
