"""One engine peer for the integration tests: runs MAR on seeded tensors and saves what it ended with."""
import argparse
import json
import os
import re
import signal
import sys
import time
import warnings

warnings.filterwarnings("ignore", category=FutureWarning)
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from moshpit_all_reduce import AveragerOptions, MarSchedule, MoshpitAverager, moshpit_all_reduce  # noqa: E402
from peer_synchronization import NetworkOptions, PeerNetwork, barrier  # noqa: E402


def run_engine_peers(out_dir, maddrs, *, live, num_peers, gs, ni, extra=lambda i: []):
    """Start one engine peer per index in ``live`` (``extra(i)``: more flags for peer i), wait for all, and reap
    whatever is left of each (its p2pd, through the process group). Returns ``{index: exit code}``."""
    import subprocess

    procs = {}
    for i in live:
        cmd = [sys.executable, os.path.abspath(__file__), "--index", str(i), "--np", str(num_peers), "--gs", str(gs),
               "--ni", str(ni), "--alive", ",".join(map(str, live)), "--initial-peers", maddrs,
               "--out", os.path.join(out_dir, f"peer{i}.pt"), *extra(i)]
        log = open(os.path.join(out_dir, f"peer{i}.log"), "w")
        procs[i] = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=log)
    codes = {}
    try:
        for i, proc in procs.items():
            codes[i] = proc.wait(timeout=240)  # a hang check, not a speed assertion
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # whatever is left of a killed peer: its p2pd
            except (ProcessLookupError, PermissionError):
                pass
    return codes


def initial_tensors(index: int):
    g = torch.Generator().manual_seed(index)
    return [torch.randn(200_000, generator=g), torch.randn(37, 11, generator=g)]


def load_result(out_dir, i):
    """What engine peer ``i`` ended with: ``(tensors, report)`` (report: members per step, bytes sent, failed
    steps)."""
    tensors = torch.load(os.path.join(out_dir, f"peer{i}.pt"))
    with open(os.path.join(out_dir, f"peer{i}.pt.json")) as f:
        return tensors, json.load(f)


def mean_of(indices):
    """The exact mean of the initial tensors of peers ``indices``."""
    return [torch.stack([initial_tensors(i)[k] for i in indices]).mean(0) for k in range(2)]


EVIL_MODES = {"nan", "shape", "dtype", "weight", "delta", "diverged"}


def evil_runner(mode: str):
    """A group-mate that sends NaN / wrong-shaped / wrong-dtype parts, claims a huge weight, or (as a reducer)
    returns averaged shards of the wrong length."""
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor

    from moshpit_all_reduce import CountingRunner

    def corrupt(part):
        tensor = deserialize_torch_tensor(part)
        bad = {"nan": lambda: torch.full_like(tensor, float("nan")), "shape": lambda: torch.zeros(7),
               "dtype": lambda: tensor.double()}[mode]()
        part.CopyFrom(serialize_torch_tensor(bad))

    class EvilRunner(CountingRunner):
        async def _generate_input_for_peer(self, peer_index):
            async for msg in super()._generate_input_for_peer(peer_index):
                if mode == "weight":
                    msg.weight = 1e9
                elif mode != "delta":
                    corrupt(msg.tensor_part)
                yield msg

        async def _accumulate_parts_streaming(self, stream, sender_index):
            async for msg in super()._accumulate_parts_streaming(stream, sender_index):
                if mode == "delta":
                    msg.tensor_part.CopyFrom(serialize_torch_tensor(torch.zeros(3)))
                yield msg

    return EvilRunner


TCP_SECRET = bytes(range(100, 132))  # the run secret of --transport tcp engine peers (and of their bootstrap node)


def evil_plane(plane, mode: str) -> None:
    """A group-mate on the TCP plane that sends all-NaN or wrong-length all-reduce parts (phases 0 and 1)."""
    import numpy as np

    honest_send = plane.send

    async def send(peer, group_id, phase, payload):
        data = np.frombuffer(memoryview(payload).cast("B"), dtype=np.float32)
        if phase in (0, 1) and data.size:
            data = np.full_like(data, np.nan) if mode == "nan" else np.zeros(7, dtype=np.float32)
        return await honest_send(peer, group_id, phase, data if phase in (0, 1) else payload)

    plane.send = send


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--index", type=int, required=True)
    p.add_argument("--np", type=int, required=True)
    p.add_argument("--gs", type=int, default=2)
    p.add_argument("--ni", type=int, default=3)
    p.add_argument("--alive", required=True, help="comma-separated indices expected at the start barrier")
    p.add_argument("--initial-peers", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--die-in-step", type=int, default=None)
    p.add_argument("--compression", default="none")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--matchmaking-timeout", type=float, default=4.0)
    p.add_argument("--allreduce-timeout", type=float, default=3.0)
    p.add_argument("--evil", default=None, choices=sorted(EVIL_MODES), help="misbehave as a group-mate")
    p.add_argument("--transport", default="libp2p", choices=["libp2p", "tcp"])
    p.add_argument("--late", type=float, default=0.0, help="seconds to sleep after the start barrier (a straggler)")
    p.add_argument("--patience", type=float, default=0.0, help="wait_for_stragglers(PATIENCE) before averaging")
    p.add_argument("--hide-endpoint", action="store_true",
                   help="never store our data-plane endpoint record (as when no DHT node takes it)")
    args = p.parse_args()
    os.setpgrp()  # the test can then reap our p2pd even if we are SIGKILLed
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    secret = TCP_SECRET if args.transport == "tcp" else None
    net = PeerNetwork(NetworkOptions(initial_peers=args.initial_peers.split(","), host=args.host, prefix="enginetest",
                                     run_secret=secret)).start()
    try:
        with open(args.out + ".pid", "w") as f:
            f.write(str(net.p2pd_pid))
        if args.hide_endpoint:
            store_shared = net.store_shared

            async def store_all_but_endpoints(key, *a, **kw):
                return key.endswith(".tcp") or await store_shared(key, *a, **kw)

            net.store_shared = store_all_but_endpoints
        averager = MoshpitAverager(net, AveragerOptions(prefix="enginetest", index=args.index,
                                                        compression=args.compression,
                                                        matchmaking_timeout=args.matchmaking_timeout,
                                                        allreduce_timeout=args.allreduce_timeout,
                                                        transport=args.transport))
        if args.evil and args.evil != "diverged":
            if args.transport == "tcp":
                evil_plane(averager.plane, args.evil)
            else:
                averager._runner_cls = evil_runner(args.evil)
        if args.die_in_step is not None:
            name = "_tcp_allreduce" if args.transport == "tcp" else "_allreduce"
            original = getattr(averager, name)

            async def dying_allreduce(key, *a, **kw):
                # the first exchange from step --die-in-step on: on a loaded machine this peer may have found no
                # group in that very step, and then it must die in a later one rather than live to the end
                step = re.search(r"\.s(\d+)\.", key)
                if step and int(step.group(1)) >= args.die_in_step:
                    os.kill(os.getpid(), signal.SIGKILL)  # after matchmaking: we are in the agreed group
                return await original(key, *a, **kw)

            setattr(averager, name, dying_allreduce)
        alive = [int(i) for i in args.alive.split(",")]
        endpoints = {}  # as mar_fl.py does: group-mates' data-plane endpoints come with the start barrier
        barrier(net, "enginetest.start", me=args.index, expected=alive, timeout=180, card=averager.endpoint_card,
                cards=endpoints)
        averager.learn_endpoints(endpoints)
        tensors = initial_tensors(args.index)
        time.sleep(args.late)
        averager.wait_for_stragglers(args.patience)
        if args.evil == "diverged":  # an honest runner whose own model has gone non-finite
            tensors = [torch.full_like(t, float("nan")) for t in tensors]
        report = moshpit_all_reduce(averager, tensors, participants=range(args.np), round_index=0,
                                    schedule=MarSchedule(args.gs, args.ni, args.ni))
        torch.save(tensors, args.out)
        with open(args.out + ".json", "w") as f:
            json.dump({"members": [s.members for s in report.steps], "sent": report.bytes_sent,
                       "failed_steps": report.failed_steps,
                       "failed_peers": [list(s.failed_peers) for s in report.steps]}, f)
        barrier(net, "enginetest.end", me=args.index, expected=alive, timeout=15)
    finally:
        net.shutdown()


if __name__ == "__main__":
    main()
