#!/usr/bin/env python3
"""MAR-FL: launcher, peer runtime and command line.

``python mar_fl.py [flags]`` starts a bootstrap DHT node, then one peer process per peer index this host runs.
Peers drive their own rounds (local momentum SGD → Moshpit All-Reduce over libp2p → periodic evaluation);
the launcher only spawns, supervises and collects the metrics that peers append to files in the run dir.
"""
from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import gc
import json
import logging
import math
import multiprocessing as mp
import os
import re
import secrets
import signal
import string
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Dict, List, Mapping, Optional, Sequence, Set, Tuple

if TYPE_CHECKING:  # annotations only: peers import torch and hivemind lazily, the launcher never
    import numpy as np
    import torch

    from ml_tasks import ArrayDataset, Task
    from moshpit_all_reduce import MarSchedule, MoshpitAverager
    from peer_aggregation_logic import Aggregator

from config_setup import WANDB_MODES, ConfigError, RunConfig, check_paths, config_from_json, parse_config, save_config

logger = logging.getLogger("mar_fl")

EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 143
EXIT_DEGRADED = 3  # finished, but averaging failed too often or a peer died: the figures are not the asked-for run
EXIT_PREEMPTED = 75  # EX_TEMPFAIL: cut short by a time limit with every peer checkpointed; resume with --resume
CHECKPOINTS_KEPT = 3
MAX_RESTARTS = 3  # per peer, with --restart-dead
# Peers run at this niceness, their launcher at its own: the launcher's DHT node is every peer's initial peer, and
# all of them store and read the start barrier there. On two cores shared with 125 peers at the same niceness it
# got 1/250 of the CPU: its answers took 3.7-7 s on average and the last peer left the start barrier 28 s after
# the last one was ready (at nice 5: answers in 2.6-3 s, the barrier 14 s). The peers' shares among themselves
# do not change.
PEER_NICE = 5
TIMING_KEYS = ("round_seconds", "train_seconds", "aggregation_seconds", "elapsed_seconds", "wait_seconds")
_PRELOAD = ["torch", "torchvision", "hivemind", "ml_tasks", "moshpit_all_reduce", "peer_aggregation_logic",
            "differential_privacy"]
# per-round keys that only KD / DP runs log: pooled as the mean over aggregating peers, ε as the worst peer's
MEAN_KEYS = ("kd_lambda", "kd_teachers", "dp_clip_threshold", "dp_update_norm")
MAX_KEYS = ("dp_epsilon", "dp_epsilon_groupmate")
LABEL_KEYS = ("dp_noise",)  # the same on every peer: passed through


class PeerStopped(SystemExit):
    """Raised in a peer by SIGTERM/SIGINT so that every ``finally`` (daemon shutdown) runs."""


def configure_peer_environment() -> None:
    """Environment the forkserver (and so every peer and its p2pd) starts with; memory decides how many fit."""
    # the forkserver imports hivemind, whose torch.jit use warns on stderr at import: keep the console clean
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    # glibc gives each thread its own heap arena; the averager's worker threads would each keep tens of MB
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    # glibc maps every block over 128 KB (later: over the largest freed one) afresh and unmaps it when freed, and
    # hands a heap's free top back at 128 KB: training steps cost thousands of page faults each. Freed blocks are
    # kept for reuse (11x fewer page faults, the slowest of 32 identical trainings on one core 7 % faster) and
    # handed back only as :class:`HeapTrimmer` decides (bench/RESULTS.md, bench_training_spread.py)
    os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", str(32 << 20))
    os.environ.setdefault("MALLOC_TRIM_THRESHOLD_", str(256 << 20))
    # Go's default GC pace for p2pd: GOGC=25 saved ≈ 15 MB per daemon but tripled its idle CPU (64 daemons took
    # ≈ 1.5 of 2 cores between rounds; bench/RESULTS.md)


HEAP_SLACK_BYTES = 16 << 20


class HeapTrimmer:
    """When a peer hands freed heap pages back to the OS (``malloc_trim``): only once its resident memory has
    grown ``slack`` bytes past its level, the resident memory at the end of its second round.

    A round's buffers (activations, all-reduce shards) are the next round's, so glibc keeps freed blocks for
    reuse. Trimming after every round made each round fault them all in again: 600 K page faults a round at 64
    peers, zeroing pages took 11 % of the machine. Never trimming let fragmentation grow a peer's free heap by
    ≈ 20 MB over 10 rounds. The round after a trim faults the buffers it uses back in and sets the level anew (a
    peer that sat out its first rounds and trains later gets a new level that way).

    :param slack: bytes of growth past the level that trigger a trim
    """

    def __init__(self, *, slack: int = HEAP_SLACK_BYTES):
        self.slack = slack
        self.level: Optional[int] = None
        self._settling = 2  # round ends still to come before the level holds

    def should_trim(self, resident: int) -> bool:
        """Record a round's end at ``resident`` bytes; whether to trim now."""
        if self._settling:
            self._settling -= 1
            self.level = resident
            return False
        if self.level is not None and resident > self.level + self.slack:
            self._settling = 1
            return True
        return False

    def after_round(self) -> bool:
        """Trim if :meth:`should_trim` says so; whether it did."""
        resident = resident_bytes()
        if resident is None or not self.should_trim(resident):
            return False
        try:
            import ctypes

            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            return False
        logger.debug("heap trimmed: %d MB resident, level %d MB", resident >> 20, (self.level or 0) >> 20)
        return True


def resident_bytes() -> Optional[int]:
    """This process's resident memory (``/proc/self/statm``); None where that cannot be read."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def start_forkserver(cfg: RunConfig) -> "mp.context.BaseContext":
    """Start the forkserver that this host's peers are forked from, if it does not run yet, and return its
    multiprocessing context. It imports torch and hivemind (≈ 4 s) in the background: started as soon as the flags
    are checked, that overlaps the launcher's own data loading and network start. Peers share its pages
    copy-on-write. :func:`stop_forkserver` ends it when the run is refused after all."""
    from multiprocessing import forkserver

    ctx = mp.get_context("forkserver")
    configure_peer_environment()
    ctx.set_forkserver_preload(_PRELOAD + (["dp_accounting"] if cfg.dp else []))
    forkserver.ensure_running()
    return ctx


def stop_forkserver() -> None:
    """End this process's forkserver, if it started one (a run refused after the flags were checked): at once,
    rather than after it has finished importing torch."""
    from multiprocessing import forkserver

    server = forkserver._forkserver  # the standard library's own stop waits for the preload to finish
    if getattr(server, "_forkserver_pid", None):
        with contextlib.suppress(ProcessLookupError):
            os.kill(server._forkserver_pid, signal.SIGTERM)
    server._stop()


def control_key(prefix: str) -> str:
    return f"{prefix}.control"


def should_test(cfg: RunConfig, round_index: int, last_round: int) -> bool:
    return round_index % cfg.test_every == 0 or round_index == last_round


def round_test_indices(cfg: RunConfig, own: "np.ndarray", *, peer: int, participants: Sequence[int],
                       num_test: int) -> Optional["np.ndarray"]:
    """The test samples ``peer`` evaluates in a test round; None: it does not evaluate (a pure decision).

    ``--test-peers all``: every peer, on its own share ``own`` (an ``eval_slice``, or its label-matched share with
    ``--test-split dirichlet``). ``aggregators``: only the round's aggregators (``participants``, the same on every
    peer: derived from (seed, round)); with ``--test-split iid`` they split the whole test set among themselves
    by position, so the round's accuracy is still over the whole test set; with ``dirichlet`` each evaluates its
    own share, so it is over the union of the aggregators' shares.
    """
    from ml_tasks import eval_slice

    if cfg.test_peers == "all":
        return own
    ordered = sorted(participants)
    if peer not in ordered:
        return None
    return own if cfg.test_split == "dirichlet" else eval_slice(num_test, ordered.index(peer), len(ordered))


# a round's groups wait this many times the longest training this peer has seen for late group-mates, on top
# of --matchmaking-timeout: on an overloaded host the same training takes some peers 3x as long as others
STRAGGLER_PATIENCE = 2.0
CONTROL_READ_GRACE = 5.0  # seconds a round's start waits for the control read begun a round earlier
CONTROL_SEARCH_SPREAD = 5.0  # seconds over which the peers' searches for the control key's nodes are spread


def stale_after_seconds(cfg: RunConfig) -> float:
    """How long a round may wait for a silent peer before the launcher reports it without that peer."""
    return 2 * cfg.matchmaking_timeout + 3 * cfg.allreduce_timeout + 60


# ==================== peer runtime ====================


@dataclass
class PeerState:
    index: int
    model: Any
    momentum: List[Any]
    order: Any
    round_index: int = 0
    stop_after: Optional[int] = None
    preempted: bool = False  # the stop is a cut (time limit, Slurm's warning signal): the run will resume
    longest_training: float = 0.0  # seconds, over this process's rounds: how late a group-mate may come


@dataclass(frozen=True)
class PeerRuntime:
    """What a peer's rounds run with: the task and its data, the averager and the aggregation pipeline.

    :param task: the ML task (model, batches, training and evaluation)
    :param prepared: what the launcher prepared for the task once per host (JSON-able)
    :param train: this peer's view of the training set (its partition is drawn from it)
    :param test: the test set; ``test_idx`` is this peer's disjoint share of it (``own_test_indices``)
    :param num_batches: mini-batches per round for a training peer
    :param averager: this peer's MAR engine (group formation + all-reduce over its network)
    :param aggregator: the aggregation pipeline (MAR averaging, optionally KD and DP around it)
    :param schedule: group size, key dimension and MAR steps per round
    :param device: where the model lives
    """

    task: "Task"
    prepared: Dict[str, Any]
    train: "ArrayDataset"
    test: "ArrayDataset"
    test_idx: "np.ndarray"
    num_batches: int
    averager: "MoshpitAverager"
    aggregator: "Aggregator"
    schedule: "MarSchedule"
    device: "torch.device"


def _pin_peer(cfg: RunConfig, index: int) -> str:
    """Pin to a core of this process's allowed set (never one Slurm did not give us); pick GPU i mod n.

    When the affinity mask is wider than the CPUs Slurm granted (no CPU binding on that cluster) we do not
    know which cores are ours, so peers are not pinned at all.
    """
    import torch

    from config_setup import read_allocation

    allocation = read_allocation()
    if allocation.pin:
        cores = allocation.cores
        os.sched_setaffinity(0, {cores[(index // cfg.peers_per_core) % len(cores)]})
    torch.set_num_threads(1)
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--dv cuda was given but CUDA is not available on this host")
        torch.cuda.set_device(index % torch.cuda.device_count())
        return f"cuda:{index % torch.cuda.device_count()}"
    return "cpu"


def _setup_peer_logging(run_dir: str, index: int, level: str = "INFO") -> None:
    """Peers log to ``logs/peer_NNNN.log``; their stdout/stderr (library warnings, p2pd) go there too."""
    os.makedirs(os.path.join(run_dir, "logs"), exist_ok=True)
    path = os.path.join(run_dir, "logs", f"peer_{index:04d}.log")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("hivemind", "hivemind.averaging.partition"):
        logging.getLogger(noisy).setLevel(logging.ERROR)


def _watch_launcher(launcher_pid: int) -> None:
    """If the launcher dies without telling us (SIGKILL, OOM), stop too; the finally clause stops our p2pd.

    Our parent is the forkserver, which outlives a killed launcher, so we watch the launcher's pid itself.
    """

    def launcher_alive() -> bool:
        try:
            os.kill(launcher_pid, 0)
            return True
        except ProcessLookupError:
            return False
        except PermissionError:
            return True

    def watch():
        while launcher_alive():
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _lower_priority() -> None:
    """Run this peer (every thread it starts, its ``p2pd``) at nice :data:`PEER_NICE`, below its launcher."""
    try:
        os.nice(PEER_NICE)
    except OSError as e:
        logger.debug("nice: %r", e)


def peer_entry(cfg_json: Dict[str, Any], index: int, run_dir: str, initial_peers: List[str], prefix: str,
               launcher_pid: int, prepared: Dict[str, Any], resume_round: int = 0,
               run_secret: Optional[bytes] = None, rejoin: bool = False, go: Optional[Any] = None) -> None:
    """Process entry point of one peer. ``go``: the read end of a pipe whose write end the launcher closes once it
    has spawned all its peers (a peer that starts its network while the others are still being forked slows every
    later fork down: 64 peers took two minutes just to be spawned)."""
    os.setpgrp()  # its own process group: the launcher can reap the peer's p2pd even after a SIGKILL
    _lower_priority()
    # the forkserver's imports (torch, hivemind: ≈ 280 MB) are shared with every peer until written to; the cyclic
    # collector writes into every object it scans, so leave the inherited ones out of its scans
    gc.freeze()

    def stop(signum, frame):
        raise PeerStopped(EXIT_INTERRUPTED)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _watch_launcher(launcher_pid)
    cfg = config_from_json(cfg_json)
    _setup_peer_logging(run_dir, index, cfg.log_level)
    if go is not None:
        go.poll(cfg.startup_timeout)  # returns at the launcher's close (EOF), whatever is sent
        go.close()
    network = None
    try:
        from peer_synchronization import NetworkOptions, PeerNetwork

        device = _pin_peer(cfg, index)
        options = NetworkOptions(initial_peers=initial_peers, host=cfg.host, announce_host=cfg.announce_host,
                                 nat_port_map=cfg.nat_port_map, startup_timeout=cfg.startup_timeout, prefix=prefix,
                                 run_secret=run_secret)
        started = time.monotonic()
        network = PeerNetwork(options).start()
        logger.info("peer %d: network up in %.1f s (%s)", index, time.monotonic() - started,
                    ", ".join(f"{name} {seconds:.1f}" for name, seconds in network.start_stages.items()))
        if is_server(cfg, index):
            run_server(cfg, index=index, run_dir=run_dir, network=network, prefix=prefix, prepared=prepared,
                       resume_round=resume_round)
        else:
            run_peer(cfg, index=index, run_dir=run_dir, network=network, prefix=prefix, device=device,
                     prepared=prepared, resume_round=resume_round, rejoin=rejoin)
    except PeerStopped:
        logger.info("peer %d stopped by signal", index)
        raise
    except Exception:
        logger.exception("peer %d failed", index)
        raise SystemExit(EXIT_FAILED) from None
    finally:
        if network is not None:
            network.shutdown()


def _init_peer_state(cfg: RunConfig, task, prepared: Dict[str, Any], train, index: int, device) -> PeerState:
    import torch

    from config_setup import set_all_seeds
    from ml_tasks import BatchOrder, dirichlet_partition, iid_partition

    set_all_seeds(cfg.seed)  # identical initial model on every peer
    model = task.make_model(prepared).to(device)
    momentum = [torch.zeros_like(p) for p in task.trainable(model)]
    if cfg.split == "dirichlet":
        parts = dirichlet_partition(train.labels, cfg.num_peers, alpha=cfg.dirichlet_alpha, seed=cfg.seed)
    else:
        parts = iid_partition(len(train), cfg.num_peers)
    order = BatchOrder(indices=parts[index], seed=cfg.seed, peer=index)
    return PeerState(index=index, model=model, momentum=momentum, order=order)


def own_test_indices(cfg: RunConfig, train, test, index: int) -> "np.ndarray":
    """Peer ``index``'s share of the test set: a fixed slice (``--test-split iid``), or with ``dirichlet`` a share
    whose label mix follows its training partition's. The shares of all peers cover the test set once."""
    from ml_tasks import dirichlet_partition, eval_slice, label_matched_test_partition

    if cfg.test_split != "dirichlet":
        return eval_slice(len(test), index, cfg.num_peers)
    parts = dirichlet_partition(train.labels, cfg.num_peers, alpha=cfg.dirichlet_alpha, seed=cfg.seed)
    return label_matched_test_partition(test.labels, train.labels, parts, seed=cfg.seed)[index]


def run_peer(cfg: RunConfig, *, index: int, run_dir: str, network, prefix: str, device: str,
             prepared: Dict[str, Any], resume_round: int = 0, rejoin: bool = False) -> None:
    import torch

    from config_setup import kd_rounds_for, mini_batches_per_round
    from ml_tasks import get_task
    from moshpit_all_reduce import AveragerOptions, MarSchedule, MoshpitAverager, heartbeat_interval_for
    from peer_aggregation_logic import make_aggregator
    from peer_synchronization import barrier

    task = get_task(cfg.task)
    started = time.monotonic()
    train, test = task.load(prepared)
    state = _init_peer_state(cfg, task, prepared, train, index, torch.device(device))
    loaded = time.monotonic()
    averager = MoshpitAverager(network, AveragerOptions(
        prefix=prefix, index=index, compression=cfg.compression,
        matchmaking_timeout=cfg.matchmaking_timeout, allreduce_timeout=cfg.allreduce_timeout,
        num_peers=process_count(cfg), transport=cfg.transport,
        heartbeat_interval=heartbeat_interval_for(process_count(cfg))))
    rt = PeerRuntime(task=task, prepared=prepared, train=train, test=test,
                     test_idx=own_test_indices(cfg, train, test, index),
                     num_batches=mini_batches_per_round(cfg, num_samples=len(train)), averager=averager,
                     aggregator=make_aggregator(cfg, initial_params=task.trainable(state.model),
                                                kd_rounds=kd_rounds_for(cfg, num_samples=len(train))),
                     device=torch.device(device),
                     schedule=MarSchedule(cfg.group_size, cfg.group_key_dim, cfg.mar_steps,
                                          grouping=cfg.grouping, num_peers=cfg.num_peers))
    if resume_round:
        load_checkpoint(checkpoint_path(run_dir, index, resume_round), state, rt.aggregator, device=device)
    if rejoin:
        _rejoin(cfg, state, rt)
    else:
        logger.info("peer %d: model, data and averager ready in %.1f s (model and data %.1f, %s)", index,
                    time.monotonic() - started, loaded - started,
                    ", ".join(f"{name} {seconds:.1f}" for name, seconds in averager.start_stages.items()))
        endpoints: Dict[int, Any] = {}  # group-mates' data-plane endpoints come with the start barrier
        arrived = barrier(network, f"{prefix}.start", me=index, expected=range(cfg.num_peers),
                          timeout=cfg.startup_timeout, card=averager.endpoint_card, cards=endpoints)
        averager.learn_endpoints(endpoints)
        logger.info("peer %d: %d/%d peers up, %d batches per round, from round %d", index, len(arrived),
                    cfg.num_peers, rt.num_batches, state.round_index + 1)
    out_path = os.path.join(run_dir, "peers", f"peer_{index:04d}.jsonl")
    saved = state.round_index
    control, heap = ControlReader(network, prefix), HeapTrimmer()
    with open(out_path, "a", buffering=1) as out:
        for round_index in range(state.round_index + 1, cfg.rounds + 1):
            if not network.daemon_alive():
                from moshpit_all_reduce import NetworkDown

                raise NetworkDown(f"peer {index}: its p2pd has exited; it cannot average any more")
            if control.stop_requested(state, round_index):
                break
            out.write(json.dumps(_run_round(cfg, state, rt, round_index)) + "\n")
            # a restarted peer (--restart-dead, or by hand with --rejoin) rejoins with this; one serialized copy
            rt.averager.share_snapshot(round_index, _shared_tensors(state, rt))
            if cfg.ckpt_every and round_index % cfg.ckpt_every == 0:
                saved = save_checkpoint(run_dir, state, rt.aggregator)
            heap.after_round()
    if state.round_index != saved:  # the last round always is on disk: a cut run resumes, a finished one extends
        save_checkpoint(run_dir, state, rt.aggregator)
    barrier(network, f"{prefix}.end", me=index, expected=range(cfg.num_peers), timeout=cfg.allreduce_timeout)
    averager.close()


def is_server(cfg: RunConfig, index: int) -> bool:
    """``--aggregation fedavg`` runs one more process, the server, under the index after the last client."""
    return cfg.aggregation == "fedavg" and index == cfg.num_peers


def process_count(cfg: RunConfig) -> int:
    """Processes that take part in aggregation: the peers, plus FedAvg's server."""
    return cfg.num_peers + (1 if cfg.aggregation == "fedavg" else 0)


@dataclass
class ServerState:
    round_index: int = 0
    stop_after: Optional[int] = None
    preempted: bool = False


def run_server(cfg: RunConfig, *, index: int, run_dir: str, network, prefix: str, prepared: Dict[str, Any],
               resume_round: int = 0) -> None:
    """FedAvg's server: each round it waits for the round's first client, then averages the clients' tensors
    (star topology, through the same engine and wire checks as MAR) and sends the mean back. It holds no data
    and no model of its own, only tensors of the right shapes; its traffic is logged as the server's."""
    from ml_tasks import get_task
    from moshpit_all_reduce import AveragerOptions, MoshpitAverager, heartbeat_interval_for
    from peer_aggregation_logic import fedavg_key, server_tensors
    from peer_synchronization import aggregation_participants, barrier

    task = get_task(cfg.task)
    like = server_tensors(cfg, task.trainable(task.make_model(prepared)))
    averager = MoshpitAverager(network, AveragerOptions(
        prefix=prefix, index=index, compression=cfg.compression, matchmaking_timeout=cfg.matchmaking_timeout,
        allreduce_timeout=cfg.allreduce_timeout, num_peers=process_count(cfg),
        heartbeat_interval=heartbeat_interval_for(process_count(cfg))))
    barrier(network, f"{prefix}.start", me=index, expected=range(cfg.num_peers), timeout=cfg.startup_timeout)
    state, control = ServerState(round_index=resume_round), ControlReader(network, prefix)
    with open(os.path.join(run_dir, "peers", f"peer_{index:04d}.jsonl"), "a", buffering=1) as out:
        for round_index in range(resume_round + 1, cfg.rounds + 1):
            if control.stop_requested(state, round_index):
                break
            started = time.time()
            participants = aggregation_participants(
                seed=cfg.seed, round_index=round_index, num_peers=cfg.num_peers, update_percent=cfg.update_percent,
                aggregate_percent=cfg.aggregate_percent, dropout_percent=cfg.dropout_percent)
            key = fedavg_key(averager, round_index)
            averager.begin_round(round_index)
            waited = averager.await_first_declaration(key, patience=stale_after_seconds(cfg))
            step = averager.average_via_server(like, key=key, expected=frozenset(participants), server=index)
            out.write(json.dumps({
                "round": round_index, "peer": index, "role": "server", "t_start": started,
                "participating_peers": len(participants), "server_bytes_sent": step.bytes_sent,
                "server_bytes_received": step.bytes_received, "server_failed": step.failed,
                "failed_peers": list(step.failed_peers), "wait_seconds": waited, "train_seconds": 0.0,
                "aggregation_seconds": step.seconds, "round_seconds": step.seconds, "t_end": time.time()}) + "\n")
            state.round_index = round_index
    barrier(network, f"{prefix}.end", me=index, expected=range(cfg.num_peers), timeout=cfg.allreduce_timeout)
    averager.close()


def _shared_tensors(state: PeerState, rt: PeerRuntime) -> List[Any]:
    return [p.data for p in rt.task.trainable(state.model)] + list(state.momentum)


def _rejoin(cfg: RunConfig, state: PeerState, rt: PeerRuntime) -> None:
    """A restarted peer takes the newest aggregated model (and momentum) of a live peer and continues after the
    round that peer finished, instead of averaging its stale checkpoint into the run."""
    import torch

    tensors = _shared_tensors(state, rt)
    deadline = time.monotonic() + cfg.startup_timeout
    while (snapshot := rt.averager.fetch_snapshot(tensors)) is None:
        if time.monotonic() >= deadline:
            raise RuntimeError(f"peer {state.index}: no live peer shared its model within --startup-timeout")
        time.sleep(2.0)
    round_index, received = snapshot
    with torch.no_grad():
        for target, source in zip(tensors, received):
            target.copy_(source.to(target.device))
    state.round_index = max(state.round_index, round_index)
    logger.info("peer %d rejoined after round %d with a live peer's model", state.index, state.round_index)


class ControlReader:
    """Whether the launcher asked to stop: it publishes the last round to run under one DHT key.

    Read in the background, one read at a time, each used at the round check after the one that started it: a
    slow read (up to 20 s at 125 peers under load) does not hold the peer. A read still running at a check is
    waited for :data:`CONTROL_READ_GRACE` seconds at most, then left to finish for the check after; waiting out
    its whole deadline there held a peer, and every group after its own, for up to 12 s of a 64-peer round.

    The first read starts at the second check, and each starts at a random point of the first half of a round
    (as long as the last one): all peers reading the key's nodes at once, at the busiest time of a run, made
    every first read of a 125-peer run under a one-core quota time out. The search for the key's nodes, which
    costs a 64-peer run ≈ 1.5 s in the round where all peers make it, is made in round 1, at a random point of
    its first :data:`CONTROL_SEARCH_SPREAD` seconds.

    A stop is thus seen a round or two after it was published; the launcher leaves two rounds of slack.

    :param network: this peer's network (its loop runs the reads)
    :param prefix: the run's DHT prefix
    """

    def __init__(self, network, prefix: str):
        import random

        from peer_synchronization import RepeatedRead

        self.network, self.key = network, control_key(prefix)
        self._reader = RepeatedRead(network.dht, self.key)  # the key's nodes, read directly: no search a round
        self._read: Optional[concurrent.futures.Future] = None
        self._last_check: Optional[float] = None
        self._jitter = random.Random()  # its own: the run's seeded generators are left alone
        self._search = asyncio.run_coroutine_threadsafe(
            self._find_nodes_after(self._jitter.uniform(0.0, CONTROL_SEARCH_SPREAD)), network.loop)

    def stop_requested(self, state: PeerState, round_index: int) -> bool:
        read, now = self._read, time.monotonic()
        if read is not None:
            concurrent.futures.wait([read], timeout=CONTROL_READ_GRACE)
            if not read.done():
                logger.info("control read still running at round %d: it is used at the next one", round_index)
                return self._stopping(state, round_index)
            try:
                self._apply(state, read.result())
            except Exception as e:  # noqa: BLE001 - a missed read only delays the stop by a round
                logger.warning("control read failed: %r", e)
        if self._last_check is not None:
            delay = self._jitter.uniform(0.0, (now - self._last_check) / 2)
            self._read = asyncio.run_coroutine_threadsafe(self._read_after(delay), self.network.loop)
        self._last_check = now
        return self._stopping(state, round_index)

    async def _find_nodes_after(self, delay: float) -> None:
        from peer_synchronization import DHT_READ_TIMEOUT

        await asyncio.sleep(delay)
        try:
            await asyncio.wait_for(self._reader.nodes.get(), DHT_READ_TIMEOUT)
        except Exception as e:  # noqa: BLE001 - the first read searches again
            logger.debug("control key's nodes not found yet: %r", e)

    async def _read_after(self, delay: float) -> Dict[str, Any]:
        await asyncio.sleep(delay)
        return await self._reader.read()

    @staticmethod
    def _stopping(state: PeerState, round_index: int) -> bool:
        return state.stop_after is not None and round_index > state.stop_after

    @staticmethod
    def _apply(state: PeerState, record: Dict[str, Any]) -> None:
        # every launcher that decides a stop writes its own subkey; the earliest round wins, so all peers agree
        stops = [v for k, v in record.items() if str(k).startswith("stop_after") and type(v) is int and v >= 0]
        if stops:
            state.stop_after = min(stops)
            state.preempted = record.get("preempt") is True or state.preempted


def _kd_batches(cfg: RunConfig, state: PeerState, rt: PeerRuntime, round_index: int):
    """Distinct local batches for the distillation in MAR step ``step`` (drawn only when KD asks)."""
    from ml_tasks import distillation_batches

    return lambda step: distillation_batches(rt.task, rt.train, state.order.indices, seed=cfg.seed,
                                             peer=state.index, round_index=round_index, step=step,
                                             batch_size=cfg.batch_size, device=rt.device)


def _run_round(cfg: RunConfig, state: PeerState, rt: PeerRuntime, round_index: int) -> Dict[str, Any]:
    """One round of one peer: train if chosen, aggregate if chosen, evaluate on test rounds."""
    from config_setup import learning_rate
    from ml_tasks import evaluate, train_batches
    from peer_aggregation_logic import AggregationContext
    from peer_synchronization import (
        aggregation_participants,
        announce_round_done,
        round_done_key,
        update_participants,
    )

    started = time.time()
    lr = learning_rate(cfg, round_index)
    record: Dict[str, Any] = {"round": round_index, "peer": state.index, "t_start": started, "learning_rate": lr}
    participants = aggregation_participants(
        seed=cfg.seed, round_index=round_index, num_peers=cfg.num_peers, update_percent=cfg.update_percent,
        aggregate_percent=cfg.aggregate_percent, dropout_percent=cfg.dropout_percent)
    rt.averager.prefetch_endpoints(participants, within=max(60.0, cfg.matchmaking_timeout))
    if state.index in update_participants(seed=cfg.seed, round_index=round_index, num_peers=cfg.num_peers,
                                          update_percent=cfg.update_percent):
        record["train_loss"] = train_batches(
            rt.task, state.model, state.momentum, data=rt.train, order=state.order, num_batches=rt.num_batches,
            batch_size=cfg.batch_size, lr=lr, beta=cfg.momentum, device=rt.device)
    trained = time.time()
    state.longest_training = max(state.longest_training, trained - started)
    record["participating_peers"] = len(participants)
    aggregating = state.index in participants
    if aggregating:
        rt.averager.wait_for_stragglers(STRAGGLER_PATIENCE * state.longest_training)
        ctx = AggregationContext(averager=rt.averager, task=rt.task, model=state.model, momentum=state.momentum,
                                 participants=sorted(participants), round_index=round_index,
                                 schedule=rt.schedule, local_batches=_kd_batches(cfg, state, rt, round_index),
                                 lr=lr)
        result = rt.aggregator.aggregate(ctx)
        record.update(result.metrics, bytes_sent=result.report.bytes_sent,
                      bytes_received=result.report.bytes_received, group_size=result.report.avg_group_size,
                      failed_peers=sorted({p for s in result.report.steps for p in s.failed_peers}),
                      mar_steps=len(result.report.steps), failed_steps=result.report.failed_steps,
                      timed_out_steps=result.report.timed_out_steps)
    aggregated = time.time()
    if aggregating and len(participants) < cfg.num_peers:  # only peers sitting this round out read it
        announce_round_done(rt.averager.network, round_done_key(rt.averager.options.prefix, round_index),
                            me=state.index)
    # a run stopped for good is evaluated at its last round; a cut one is not (it resumes as if never cut)
    last_round = cfg.rounds if state.preempted else min(cfg.rounds, state.stop_after or cfg.rounds)
    test_idx = round_test_indices(cfg, rt.test_idx, peer=state.index, participants=participants,
                                  num_test=len(rt.test))
    if should_test(cfg, round_index, last_round) and test_idx is not None:
        record.update(evaluate(rt.task, state.model, data=rt.test, indices=test_idx, device=rt.device))
    record.update(train_seconds=trained - started, aggregation_seconds=aggregated - trained,
                  round_seconds=time.time() - started)
    if not aggregating:  # idle time, not part of the round: its model does not change while it waits
        record["wait_seconds"] = _sit_out(cfg, state, rt, round_index, participants)
    record["t_end"] = time.time()
    state.round_index = round_index
    return record


def _sit_out(cfg: RunConfig, state: PeerState, rt: PeerRuntime, round_index: int, participants) -> float:
    """A peer that does not aggregate this round waits for those who do (``--matchmaking-timeout`` without
    progress at most), instead of running ahead into groups whose members are still busy; returns the seconds."""
    from peer_synchronization import round_done_key, wait_for_round

    waited = wait_for_round(
        rt.averager.network, round_done_key(rt.averager.options.prefix, round_index), me=state.index,
        participants=participants, round_index=round_index, num_peers=cfg.num_peers,
        running=lambda: {i: beat.round for i, beat in rt.averager.read_heartbeats().items()},
        patience=cfg.matchmaking_timeout)
    if waited.pending:
        logger.warning("peer %d: round %d: gave up waiting for aggregating peers %s after %.1f s", state.index,
                       round_index, sorted(waited.pending), waited.seconds)
    return waited.seconds


# ==================== checkpoints ====================


CHECKPOINT_NAME = re.compile(r"round_(\d{6,})\.pt")
PEER_FOLDER_NAME = re.compile(r"peer_(\d{4,})")


def checkpoint_path(run_dir: str, index: int, round_index: int) -> str:
    return os.path.join(run_dir, "checkpoints", f"peer_{index:04d}", f"round_{round_index:06d}.pt")


def digest_path(path: str) -> str:
    """The sidecar written next to each checkpoint once it is complete: its size and sha256."""
    return f"{path}.sha256"


def checkpoint_rounds(run_dir: str, index: int) -> List[int]:
    """Rounds that peer ``index`` has a checkpoint file of (intact or not); other names are ignored."""
    try:
        names = os.listdir(os.path.dirname(checkpoint_path(run_dir, index, 0)))
    except OSError:
        return []
    return sorted(int(m.group(1)) for m in map(CHECKPOINT_NAME.fullmatch, names) if m)


def _file_digest(path: str) -> Dict[str, Any]:
    import hashlib

    sha = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            sha.update(block)
    return {"size": os.path.getsize(path), "sha256": sha.hexdigest()}


def checkpoint_problem(path: str) -> Optional[str]:
    """Why the checkpoint at ``path`` cannot be resumed from (None: it is intact, as its sidecar says)."""
    try:
        with open(digest_path(path)) as f:
            expected = json.load(f)
    except FileNotFoundError:
        return "has no .sha256 sidecar (incomplete, or written by an older MAR-FL: those cannot be resumed)"
    except (OSError, ValueError):
        return "has a damaged .sha256 sidecar"
    try:
        actual = _file_digest(path)
    except OSError as e:
        return f"cannot be read ({e.strerror})"
    return None if actual == expected else "differs from what was written (truncated or damaged)"


def common_checkpoint_round(run_dir: str, num_peers: int) -> int:
    """The newest round of which every peer has an intact checkpoint (0: none): where a resumed run continues.
    A damaged candidate is reported and passed over for an older round."""
    shared = set.intersection(*(set(checkpoint_rounds(run_dir, index)) for index in range(num_peers)))
    for round_index in sorted(shared, reverse=True):
        problems = ((index, checkpoint_problem(checkpoint_path(run_dir, index, round_index)))
                    for index in range(num_peers))
        bad = next(((index, problem) for index, problem in problems if problem), None)
        if bad is None:
            return round_index
        logger.warning("round %d cannot be resumed: %s %s; trying an older round", round_index,
                       checkpoint_path(run_dir, bad[0], round_index), bad[1])
    return 0


def _newest_shared_round(run_dir: str, rounds: Sequence[int]) -> Optional[int]:
    """The newest of ``rounds`` that every peer with a checkpoint folder has a complete checkpoint of."""
    try:
        names = os.listdir(os.path.join(run_dir, "checkpoints"))
    except OSError:
        return None
    peers = [int(m.group(1)) for m in map(PEER_FOLDER_NAME.fullmatch, names) if m]
    for round_index in sorted(rounds, reverse=True):
        if all(os.path.exists(digest_path(checkpoint_path(run_dir, i, round_index))) for i in peers):
            return round_index
    return None


def _prune_checkpoints(run_dir: str, index: int) -> None:
    """Keep this peer's newest few checkpoints, and the newest round every peer has: with one peer dead
    early, that round is the only one a resume can continue from."""
    rounds = checkpoint_rounds(run_dir, index)
    keep = set(rounds[-CHECKPOINTS_KEPT:]) | {_newest_shared_round(run_dir, rounds)}
    for old in (r for r in rounds if r not in keep):
        path = checkpoint_path(run_dir, index, old)
        for name in (digest_path(path), path):
            try:
                os.unlink(name)
            except FileNotFoundError:
                pass


def _write_atomically(path: str, write) -> None:
    """``write(f)`` into ``path.tmp``, fsync, rename: readers see the old file or the complete new one."""
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _rng_state() -> Dict[str, Any]:
    """Every RNG's state in types ``torch.load(weights_only=True)`` accepts (numpy's array becomes a tensor)."""
    import random

    import numpy as np
    import torch

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(), "python": random.getstate(),
            "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                      "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None}


def _set_rng_state(rng: Dict[str, Any]) -> None:
    import random

    import numpy as np
    import torch

    numpy = rng["numpy"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state((numpy["kind"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["cached_gaussian"]))
    random.setstate(rng["python"])
    if rng["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])


def save_checkpoint(run_dir: str, state: PeerState, aggregator) -> int:
    """Everything the next round depends on, written atomically with a size + sha256 sidecar (a checkpoint
    without one is incomplete); keeps the last few. Only tensors and plain values: it loads weights-only."""
    import torch

    path = checkpoint_path(run_dir, state.index, state.round_index)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    payload = {
        "round": state.round_index, "model": state.model.state_dict(), "momentum": list(state.momentum),
        "order": {"epoch": int(state.order.epoch), "cursor": int(state.order.cursor)},
        "aggregator": aggregator.state_dict(), "rng": _rng_state(),
    }
    if os.path.exists(digest_path(path)):
        os.unlink(digest_path(path))  # a round run again: its old sidecar must not vouch for the new file
    _write_atomically(path, lambda f: torch.save(payload, f))
    digest = json.dumps(_file_digest(path)).encode()
    _write_atomically(digest_path(path), lambda f: f.write(digest))
    _prune_checkpoints(run_dir, state.index)
    return state.round_index


def load_checkpoint(path: str, state: PeerState, aggregator, *, device: str) -> None:
    """Restore a peer from ``path``; ``weights_only``: a checkpoint folder others can write runs no code here."""
    import torch

    payload = torch.load(path, map_location=device, weights_only=True)
    state.model.load_state_dict(payload["model"])
    for target, source in zip(state.momentum, payload["momentum"]):
        target.copy_(source)
    state.order.epoch, state.order.cursor = payload["order"]["epoch"], payload["order"]["cursor"]
    state.order._perm = None
    aggregator.load_state_dict(payload["aggregator"])
    _set_rng_state(payload["rng"])
    state.round_index = payload["round"]
    logger.info("peer %d resumed from %s", state.index, path)


# ==================== metrics (launcher side) ====================


def summarize_round(records: Sequence[Dict[str, Any]], run_start: float) -> Dict[str, Any]:
    """Pool one round's per-peer records into the per-round metrics (sorted by peer: reproducible sums)."""
    server = [r for r in records if r.get("role") == "server"]  # FedAvg's server: its traffic is its own
    records = sorted((r for r in records if r.get("role") != "server"), key=lambda r: r["peer"]) or server
    mean = lambda xs: (sum(xs) / len(xs)) if xs else None  # noqa: E731
    trained = [r["train_loss"] for r in records if "train_loss" in r]
    aggregated = [r for r in records if "bytes_sent" in r]
    # the round lasts as long as its slowest working peer (trained, aggregated or tested) worked; a peer that sat
    # the round out waited for the aggregating peers, and that wait (wait_seconds) is not in its round_seconds
    worked = [r for r in records if {"train_loss", "bytes_sent", "test_count"} & r.keys()] or records
    waited = [r["wait_seconds"] for r in records if "wait_seconds" in r]
    tested = [r for r in records if "test_count" in r]
    count = sum(r["test_count"] for r in tested)
    optional = {key: mean([r[key] for r in aggregated if key in r]) for key in MEAN_KEYS}
    optional.update({key: max([r[key] for r in aggregated if key in r], default=None) for key in MAX_KEYS})
    optional.update({key: next((r[key] for r in aggregated if key in r), None) for key in LABEL_KEYS})
    return {
        "round": records[0]["round"],
        "learning_rate": records[0].get("learning_rate"),
        "train_loss": mean(trained),
        "test_accuracy": 100.0 * sum(r["test_correct"] for r in tested) / count if count else None,
        "test_loss": sum(r["test_loss_sum"] for r in tested) / count if count else None,
        "participating_peers": len(aggregated),
        "reporting_peers": len(records),
        "mar_steps": sum(r.get("mar_steps", 0) for r in aggregated),
        "failed_steps": sum(r.get("failed_steps", 0) for r in aggregated),
        "timed_out_steps": sum(r.get("timed_out_steps", 0) for r in aggregated),
        "bytes_sent_per_peer": mean([r["bytes_sent"] for r in aggregated]) or 0,
        "bytes_received_per_peer": mean([r["bytes_received"] for r in aggregated]) or 0,
        "avg_group_size": mean([r["group_size"] for r in aggregated]) or 0,
        "round_seconds": max(r["round_seconds"] for r in worked),  # the slowest working peer sets the pace
        "train_seconds": mean([r["train_seconds"] for r in records if "train_loss" in r]) or 0.0,
        "aggregation_seconds": mean([r["aggregation_seconds"] for r in aggregated]) or 0.0,
        "elapsed_seconds": max(r["t_end"] for r in records) - run_start,
        **({"wait_seconds": mean(waited)} if waited else {}),
        **{key: value for key, value in optional.items() if value is not None},
        **({"server_bytes_sent": server[0]["server_bytes_sent"],
            "server_bytes_received": server[0]["server_bytes_received"]} if server else {}),
    }


@dataclass
class MetricsCollector:
    """Tails ``peers/peer_*.jsonl`` and emits each round once every live peer has reported it.

    A peer that sits a round out can still be ahead (its wait for the round has a deadline), so "somebody is
    already further" proves nothing; a round is given up on only when its missing peers are known dead or it has
    waited ``stale_after`` seconds (a remote peer that hangs must not stall the report forever).
    """

    run_dir: str
    num_peers: int
    stale_after: float = 300.0
    offsets: Dict[str, Tuple[Optional[int], int, int]] = field(default_factory=dict)  # path -> inode, bytes, lines
    ignored: Set[str] = field(default_factory=set)  # names in peers/ that are no peer's file (warned once)
    pending: Dict[int, List[Dict[str, Any]]] = field(default_factory=dict)
    first_seen: Dict[int, float] = field(default_factory=dict)
    next_round: int = 1
    newest_round: int = 0
    newest_by_peer: Dict[int, int] = field(default_factory=dict)
    run_start: Optional[float] = None
    first_round: int = 1
    elapsed_offset: float = 0.0  # a resumed run's clock continues from its checkpointed round
    dead_after: Dict[int, int] = field(default_factory=dict)  # dead peer -> its newest round when first seen dead

    def _read_new(self) -> None:
        for index, path in self._peer_files():
            for number, line in self._new_lines(path):
                rec = parse_row(line)
                if rec is None or not is_peer_record(rec, index):
                    logger.warning("skipping a damaged line in %s (line %d)", path, number)
                    continue
                self._add(rec)

    def _peer_files(self) -> List[Tuple[int, str]]:
        """``peers/peer_NNNN.jsonl`` of this run's peers; anything else there is reported once and left alone."""
        folder = os.path.join(self.run_dir, "peers")
        try:
            names = sorted(os.listdir(folder))
        except OSError:
            return []
        files = []
        for name in names:
            match = PEER_FILE_NAME.fullmatch(name)
            path = os.path.join(folder, name)
            if match and int(match.group(1)) < self.num_peers and os.path.isfile(path):
                files.append((int(match.group(1)), path))
            elif name not in self.ignored and not name.endswith(".tmp"):  # .tmp: a resume rewriting a file
                self.ignored.add(name)
                logger.warning("ignoring %s: not the record file of one of the run's %d peers", path, self.num_peers)
        return files

    def _new_lines(self, path: str) -> List[Tuple[int, bytes]]:
        """The complete lines appended since the last poll (a peer may be mid-line), numbered from 1."""
        inode, offset, number = self.offsets.get(path, (None, 0, 0))
        try:
            with open(path, "rb") as f:
                if os.fstat(f.fileno()).st_ino != inode:  # a new file (or one a resume rewrote): from its start
                    inode, offset, number = os.fstat(f.fileno()).st_ino, 0, 0
                f.seek(offset)
                chunk = f.read()
        except OSError as e:
            logger.warning("cannot read %s: %s", path, e.strerror)
            return []
        lines = chunk[: chunk.rfind(b"\n") + 1].split(b"\n")[:-1]
        self.offsets[path] = (inode, offset + sum(len(line) + 1 for line in lines), number + len(lines))
        return list(enumerate(lines, number + 1))

    def _add(self, rec: Dict[str, Any]) -> None:
        if rec["round"] < self.next_round:
            return  # that round was already reported without this (slow or once-dead) peer
        self.pending.setdefault(rec["round"], []).append(rec)
        self.newest_by_peer[rec["peer"]] = max(self.newest_by_peer.get(rec["peer"], 0), rec["round"])
        self.first_seen.setdefault(rec["round"], time.time())
        self.newest_round = max(self.newest_round, rec["round"])
        if rec["round"] == self.first_round:
            start = rec["t_start"] - self.elapsed_offset
            self.run_start = min(self.run_start or start, start)

    def _still_dead(self, dead: Sequence[int]) -> Set[int]:
        """``dead`` less the peers that reported a round after they died: restarted elsewhere (``--rejoin`` by
        hand, another launcher), they are waited for again like any live peer."""
        for peer in dead:
            self.dead_after.setdefault(peer, self.newest_by_peer.get(peer, 0))
        return {p for p in dead if self.newest_by_peer.get(p, 0) <= self.dead_after[p]}

    def poll(self, *, dead: Sequence[int] = (), final: bool = False) -> List[Dict[str, Any]]:
        self._read_new()
        dead = self._still_dead(dead)
        rows = []
        while self.next_round in self.pending:
            records = self.pending[self.next_round]
            # a peer writes its rounds in order: one that reported a later round (it rejoined) skips this one
            skipped = {p for p, newest in self.newest_by_peer.items() if newest > self.next_round}
            missing = set(range(self.num_peers)) - {r["peer"] for r in records} - set(dead) - skipped
            stale = time.time() - self.first_seen[self.next_round] > self.stale_after
            if missing and not (final or stale):
                break
            rows.append(summarize_round(self.pending.pop(self.next_round), self.run_start or 0.0))
            self.next_round += 1
        return rows


def status_line(row: Dict[str, Any], rounds: int) -> str:
    acc = "  —   " if row["test_accuracy"] is None else f"{row['test_accuracy']:6.2f}%"
    loss = row["test_loss"] if row["test_loss"] is not None else row["train_loss"]
    loss_txt = "—" if loss is None else f"{loss:.4f}"
    return (f"round {row['round']:>4}/{rounds} | acc {acc} | loss {loss_txt} | {row['round_seconds']:.2f} s | "
            f"{row['bytes_sent_per_peer'] / 1e6:.2f} MB sent | peers {row['participating_peers']}"
            + (f" | FAILED steps {row['failed_steps']}/{row['mar_steps']}" if row.get("failed_steps") else "")
            + (f" | KD λ {row['kd_lambda']:.2f}" if "kd_lambda" in row else "")
            + (f" | ε {row['dp_epsilon']:.2f} (groupmate {row['dp_epsilon_groupmate']:.3g}, "
               f"noise {row.get('dp_noise')})" if "dp_epsilon" in row else ""))


# ==================== wandb (launcher side) ====================
# Settings from flags and WANDB_* variables, one wandb run per run dir. wandb itself is imported only when a run
# starts in online or offline mode: peers never load it. RUN_DIR/wandb.json remembers the wandb run id and the
# last round logged, so a resumed run continues the same wandb run and logs each round exactly once.

wandb_logger = logging.getLogger("mar_fl.wandb")

# what WANDB_MODE may say besides the three modes (wandb's own older spellings)
WANDB_MODE_ALIASES = {"dryrun": "offline", "run": "online"}
WANDB_DEFAULT_PROJECT = "mar-fl"
WANDB_DEFAULT_JOB_TYPE = "train"
WANDB_STATE_FILE = "wandb.json"


class WandbStartError(RuntimeError):
    """``--wandb online|offline`` was asked for but wandb could not start (reported as one line, exit 2)."""


@dataclass(frozen=True)
class WandbSettings:
    """What ``wandb.init`` is given; ``mode_source`` says where the mode came from (for error messages)."""

    mode: str
    project: str
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: Tuple[str, ...] = ()
    job_type: str = WANDB_DEFAULT_JOB_TYPE
    name: Optional[str] = None
    mode_source: str = "flag"  # or "WANDB_MODE", or "default"

    def mode_text(self) -> str:
        """``--wandb MODE`` as an error message names it, with where the mode came from if not the flag."""
        origin = {"flag": "", "default": " (the default: an API key is configured)"}
        return f"--wandb {self.mode}" + origin.get(self.mode_source, f" (from {self.mode_source})")


def default_wandb_mode(env: Mapping[str, str], netrc_path: Optional[str] = None) -> str:
    """``online`` only when an API key is configured (env or ~/.netrc), so offline machines never hang."""
    if env.get("WANDB_API_KEY"):
        return "online"
    try:
        with open(netrc_path or os.path.expanduser("~/.netrc")) as f:
            return "online" if "api.wandb.ai" in f.read() else "offline"
    except OSError:
        return "offline"


def _env_wandb_mode(env: Mapping[str, str]) -> Optional[str]:
    """The mode ``WANDB_MODE`` (or ``WANDB_DISABLED=true``) asks for; None when neither is set."""
    if env.get("WANDB_DISABLED", "").lower() in ("true", "1", "yes"):
        return "disabled"
    text = env.get("WANDB_MODE", "").strip()
    mode = WANDB_MODE_ALIASES.get(text.lower(), text.lower())
    if mode and mode not in WANDB_MODES:
        raise WandbStartError(f"--wandb not given and WANDB_MODE={text!r} is none of {', '.join(WANDB_MODES)}")
    return mode or None


def split_wandb_tags(text: Optional[str]) -> Tuple[str, ...]:
    """``"a, b,,c"`` → ``("a", "b", "c")``."""
    return tuple(tag.strip() for tag in (text or "").split(",") if tag.strip())


def _first_given(*values: Optional[str]) -> Optional[str]:
    return next((v for v in values if v), None)


def default_wandb_group(env: Mapping[str, str]) -> Optional[str]:
    """Members of one Slurm array (and of one wandb sweep) share a group."""
    if env.get("SLURM_ARRAY_JOB_ID"):
        return f"slurm-{env['SLURM_ARRAY_JOB_ID']}"
    if env.get("WANDB_SWEEP_ID"):
        return f"sweep-{env['WANDB_SWEEP_ID']}"
    return None


def resolve_wandb_settings(flags: Mapping[str, Optional[str]], env: Mapping[str, str], *, seed: int, task: str,
                     name: Optional[str] = None) -> WandbSettings:
    """Flags (None: not given) win over ``WANDB_*`` variables, which win over the defaults. A pure function.

    ``flags`` keys: mode, project, entity, group, tags (comma-separated), job_type. The task and the seed are
    always tags, added to those given.
    """
    env_mode = None if flags.get("mode") else _env_wandb_mode(env)  # a given flag: WANDB_MODE is not even read
    mode = flags.get("mode") or env_mode or default_wandb_mode(env)
    source = "flag" if flags.get("mode") else ("WANDB_MODE" if env_mode else "default")
    given_tags = split_wandb_tags(flags["tags"] if flags.get("tags") is not None else env.get("WANDB_TAGS"))
    auto_tags = (task, f"seed-{seed}")
    return WandbSettings(
        mode=mode, mode_source=source,
        project=_first_given(flags.get("project"), env.get("WANDB_PROJECT")) or WANDB_DEFAULT_PROJECT,
        entity=_first_given(flags.get("entity"), env.get("WANDB_ENTITY")),
        group=_first_given(flags.get("group"), env.get("WANDB_RUN_GROUP")) or default_wandb_group(env),
        tags=tuple(dict.fromkeys(given_tags + auto_tags)),
        job_type=_first_given(flags.get("job_type"), env.get("WANDB_JOB_TYPE")) or WANDB_DEFAULT_JOB_TYPE,
        name=_first_given(env.get("WANDB_NAME"), name),
    )


def new_wandb_run_id() -> str:
    """An 8-character id in wandb's alphabet (lowercase letters and digits)."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def read_wandb_state(run_dir: str) -> Dict[str, Any]:
    """``RUN_DIR/wandb.json``: {"id": ..., "last_round": ...}; {} when there is none (or it is damaged)."""
    try:
        with open(os.path.join(run_dir, WANDB_STATE_FILE)) as f:
            state = json.load(f)
    except (OSError, ValueError):
        state = {}
    return state if isinstance(state, dict) and isinstance(state.get("id"), str) else {}


def write_wandb_state(run_dir: str, state: Dict[str, Any]) -> None:
    """Atomically: a crash mid-write leaves the previous state, never half a file."""
    path = os.path.join(run_dir, WANDB_STATE_FILE)
    with open(f"{path}.tmp", "w") as f:
        json.dump(state, f)
    os.replace(f"{path}.tmp", path)


class WandbRun:
    """One run's wandb logging: rounds with the round as step (each once), the summary, the end."""

    def __init__(self, run: Any, run_dir: str, state: Dict[str, Any]):
        self.run, self.run_dir = run, run_dir
        self.run_id: str = state["id"]
        self.last_round: int = int(state.get("last_round") or 0)

    def log_rows(self, rows: Sequence[Dict[str, Any]], extra: Optional[Dict[str, Any]] = None) -> None:
        """Log the rows of rounds after the last one logged (a resumed run re-runs rounds it already logged)."""
        for row in rows:
            if row["round"] <= self.last_round:
                continue
            values = {key: value for key, value in row.items() if value is not None}
            self.run.log({**values, **(extra or {})}, step=row["round"])
            self.last_round = row["round"]
        write_wandb_state(self.run_dir, {"id": self.run_id, "last_round": self.last_round})

    def update_summary(self, summary: Dict[str, Any]) -> None:
        self.run.summary.update({key: value for key, value in summary.items() if value is not None})

    def finish(self, exit_code: int, *, preempted: bool = False) -> None:
        """End the run; a preempted one (it will be resumed) is marked so, not as crashed."""
        if preempted:
            self.run.mark_preempting()
        self.run.finish(exit_code=exit_code)


def _import_wandb(settings: WandbSettings):
    try:
        import wandb
    except Exception as e:  # noqa: BLE001 - ImportError, or a broken install failing inside its import
        raise WandbStartError(f"{settings.mode_text()}: wandb cannot be imported ({e}); install "
                              f"it (requirements.txt) or use --wandb disabled") from None
    return wandb


def _init_wandb_run(wandb: Any, settings: WandbSettings, run_dir: str, config: Dict[str, Any], run_id: str) -> Any:
    """``wandb.init`` with the settings; any failure becomes a one-line WandbStartError."""
    try:
        return wandb.init(project=settings.project, entity=settings.entity, group=settings.group,
                          tags=list(settings.tags), job_type=settings.job_type, name=settings.name, id=run_id,
                          resume="allow", config=config, dir=run_dir, mode=settings.mode)
    except Exception as e:  # noqa: BLE001 - wandb raises many kinds (UsageError, CommError, timeouts)
        message = " ".join(str(e).split()) or type(e).__name__
        raise WandbStartError(f"{settings.mode_text()}: wandb could not start ({message}); "
                              f"use --wandb disabled to run without it") from None


def start_wandb_run(settings: WandbSettings, run_dir: str, config: Dict[str, Any]) -> Optional[WandbRun]:
    """Start (or, with the run dir's saved id, continue) the wandb run; None when disabled.

    Raises WandbStartError when wandb cannot be imported or ``wandb.init`` fails, except that a mode nobody
    asked for (online, the default when an API key is configured) falls back to offline with a warning.
    """
    if settings.mode == "disabled":
        return None
    wandb = _import_wandb(settings)
    state = read_wandb_state(run_dir) or {"id": new_wandb_run_id(), "last_round": 0}
    try:
        run = _init_wandb_run(wandb, settings, run_dir, config, state["id"])
    except WandbStartError as e:
        if settings.mode_source != "default" or settings.mode != "online":
            raise
        wandb_logger.warning("%s; logging offline instead (upload later with wandb sync)", e)
        run = _init_wandb_run(wandb, dataclasses.replace(settings, mode="offline"), run_dir, config, state["id"])
    write_wandb_state(run_dir, state)
    return WandbRun(run, run_dir, state)


# ==================== launcher ====================


def failed_step_share(history: Sequence[Dict[str, Any]]) -> Tuple[int, int]:
    """(failed, total) MAR steps over a run's rows, counted per peer and step."""
    return (sum(r.get("failed_steps", 0) for r in history), sum(r.get("mar_steps", 0) for r in history))


@dataclass(frozen=True)
class StopDecision:
    reason: str
    diverged: bool = False  # the run ends, but not as asked: reported as status "diverged"


@dataclass
class StopPolicy:
    """When a run ends early, decided row by row from the pooled metrics (a small pure object; the launcher
    only publishes what it decides). Divergence comes first, then ``--target-acc``, then ``--patience``.

    :param target_accuracy: stop once test accuracy reaches this percent (0: never)
    :param patience: stop when the test loss has not improved by ``convergence_threshold`` for this many rounds
        (0: never)
    """

    target_accuracy: float = 0.0
    patience: int = 0
    convergence_threshold: float = 0.0
    best_loss: float = math.inf
    best_loss_round: int = 0

    @classmethod
    def from_config(cls, cfg: RunConfig) -> "StopPolicy":
        return cls(target_accuracy=cfg.target_accuracy, patience=cfg.patience,
                   convergence_threshold=cfg.convergence_threshold)

    def observe(self, row: Dict[str, Any]) -> Optional[StopDecision]:
        """Take the next round's row; returns why the run should stop, or None."""
        improving = self._track_loss(row)
        losses = [row.get(key) for key in ("train_loss", "test_loss") if row.get(key) is not None]
        if any(not math.isfinite(loss) for loss in losses):  # e.g. DP noise too strong: nothing left to learn
            return StopDecision("training diverged (non-finite loss)", diverged=True)
        if self.target_accuracy > 0 and (row.get("test_accuracy") or 0) >= self.target_accuracy:
            return StopDecision(f"target accuracy {self.target_accuracy:g}% reached")
        if self.patience > 0 and not improving:
            return StopDecision(f"test loss did not improve by {self.convergence_threshold:g} "
                                f"in {self.patience} rounds")
        return None

    def _track_loss(self, row: Dict[str, Any]) -> bool:
        """Update the best test loss; False once it has not improved for ``patience`` rounds."""
        loss = row.get("test_loss")
        if loss is not None and math.isfinite(loss) and loss < self.best_loss - self.convergence_threshold:
            self.best_loss, self.best_loss_round = loss, row["round"]
        return loss is None or self.patience <= 0 or row["round"] - self.best_loss_round < self.patience


def accuracy_targets_reached(rows: Sequence[Dict[str, Any]],
                             targets: Sequence[float]) -> Dict[str, Dict[str, Optional[float]]]:
    """For each target accuracy (percent): the first round whose pooled test accuracy reached it and that
    round's ``elapsed_seconds`` (both None if never): ``{"50": {"round": 12, "seconds": 80.5}, ...}``."""
    reached = {}
    for target in targets:
        hit = next((r for r in rows if r.get("test_accuracy") is not None and r["test_accuracy"] >= target), None)
        reached[f"{target:g}"] = {"round": hit["round"] if hit else None,
                                  "seconds": hit.get("elapsed_seconds") if hit else None}
    return reached


def group_size_notice(cfg: RunConfig) -> Optional[str]:
    """The start-up warning when ``--gk`` caps the packed buckets so that groups outgrow ``--gs`` (else None)."""
    from moshpit_all_reduce import group_size_warning

    if cfg.aggregation != "mar":  # the baselines form no MAR groups
        return None
    members = min(cfg.num_peers, int(cfg.num_peers * cfg.aggregate_percent / 100))
    who = f"--np {cfg.num_peers}" + (f" --ap {cfg.aggregate_percent:g} ({members} aggregators)"
                                     if members < cfg.num_peers else "")
    return group_size_warning(members, cfg.group_size, cfg.group_key_dim, cfg.mar_steps, grouping=cfg.grouping,
                              who=who)


def _percent(value: Optional[float]) -> str:
    return "—" if value is None else f"{value:.2f}%"


def run_outcome(*, peer_codes: Dict[int, Optional[int]], history: Optional[Sequence[Dict[str, Any]]],
                max_failed_percent: float, preempted: bool, diverged: bool = False) -> Tuple[str, int]:
    """The run's status and exit code from what its peers and rows say (a pure decision).

    ``failed``: no local peer finished; ``diverged``: training produced a non-finite loss and the run was
    stopped; ``degraded``: it finished, but a peer died or more than ``max_failed_percent`` of the MAR steps kept
    local values (``history`` None: not judged on this host). The last two exit with ``EXIT_DEGRADED``.
    """
    codes = list(peer_codes.values())
    if codes and all(c != 0 for c in codes):
        return "failed", EXIT_FAILED
    if diverged:
        return "diverged", EXIT_DEGRADED
    failed, total = failed_step_share(history or [])
    if any(c != 0 for c in codes) or (total and 100.0 * failed / total > max_failed_percent):
        return "degraded", EXIT_DEGRADED
    return ("preempted", EXIT_PREEMPTED) if preempted else ("completed", 0)


class Launcher:
    """Spawns and supervises this host's peers; on the primary host also collects metrics and decides stops."""

    def __init__(self, cfg: RunConfig, run_dir: str, *, primary: bool, prepared: Dict[str, Any],
                 resume_round: int = 0, wandb_run: Any = None):
        from config_setup import read_allocation

        self.cfg, self.run_dir, self.primary, self.prepared = cfg, run_dir, primary, prepared
        self.resume_round = resume_round
        self.allocation = read_allocation()
        self.preempt_requested = False  # set by SIGUSR1 (Slurm's warning before the time limit)
        self.preempted = False
        self.watchdog = None
        self.prefix = f"marfl.{os.path.basename(os.path.abspath(run_dir))}.s{cfg.seed}"
        self.procs: Dict[int, Any] = {}
        self._go: Optional[Any] = None  # read end of the start gate while peers are being forked (_spawn_peers)
        self.network = None
        self.run_secret: Optional[bytes] = None
        self.stop_reason: Optional[str] = None
        self.stopping = False
        self.wandb = wandb_run  # a WandbRun on the primary host, None when disabled
        self.history: List[Dict[str, Any]] = []
        self.failed_peers: Dict[int, int] = {}
        self.restarts: Dict[int, int] = {}
        self.stop_policy = StopPolicy.from_config(cfg)
        self.diverged = False
        self.started = time.time()

    def _start_network(self) -> List[str]:
        from peer_synchronization import (
            NetworkOptions,
            PeerNetwork,
            load_run_secret,
            parse_initial_peers,
            prepare_daemon_binary,
            write_bootstrap_file,
        )

        prepare_daemon_binary()  # once here, before this host's first p2pd; peers only look it up
        initial = parse_initial_peers(self.cfg.initial_peers, timeout=self.cfg.startup_timeout,
                                      attempt=self.allocation.attempt)
        # written before bootstrap.json, so a launcher that found the bootstrap file finds the secret too
        self.run_secret = load_run_secret(self.run_dir, create=self.primary, timeout=self.cfg.startup_timeout)
        options = NetworkOptions(initial_peers=initial, host=self.cfg.host, announce_host=self.cfg.announce_host,
                                 nat_port_map=self.cfg.nat_port_map, prefix=self.prefix, run_secret=self.run_secret)
        self.network = PeerNetwork(options).start()
        maddrs = self.network.visible_maddrs()
        if not initial:
            write_bootstrap_file(os.path.join(self.run_dir, "bootstrap.json"), maddrs,
                                 attempt=self.allocation.attempt)
        return initial or maddrs

    def _spawn_peers(self, initial_peers: List[str]) -> None:
        self._ctx = start_forkserver(self.cfg)  # normally already running since _pre_start
        self._initial_peers = initial_peers
        # closed once all are forked (no semaphore: nothing for the resource tracker); later restarts get None
        self._go, go_writer = self._ctx.Pipe(duplex=False)
        for index in self.cfg.local_peers():
            if self.cfg.rejoin:  # restarted by hand: like --restart-dead, from the peer's own newest checkpoint
                newest = newest_intact_checkpoint(self.run_dir, index)
                logger.warning("restarting peer %d from %s; it rejoins the running run", index,
                               f"its checkpoint of round {newest}" if newest else "scratch")
                self._spawn(index, resume_round=newest, rejoin=True)
            else:
                self._spawn(index, resume_round=self.resume_round, rejoin=False)
        if self.cfg.aggregation == "fedavg" and self.primary:
            self._spawn(self.cfg.num_peers, resume_round=self.resume_round, rejoin=False)  # the server
        go_writer.close()
        self._go.close()
        self._go = None

    def _spawn(self, index: int, *, resume_round: int, rejoin: bool) -> None:
        proc = self._ctx.Process(target=peer_entry, name=f"peer-{index}",
                                 args=(self.cfg.to_json(), index, self.run_dir, self._initial_peers, self.prefix,
                                       os.getpid(), self.prepared, resume_round, self.run_secret, rejoin,
                                       self._go))
        proc.start()
        self.procs[index] = proc

    def _restart_dead(self) -> None:
        """``--restart-dead``: a peer that died is started again from its newest intact checkpoint and rejoins
        with a live peer's model (at most MAX_RESTARTS times per peer)."""
        if not self.cfg.restart_dead or self.stopping or self.stop_reason is not None:
            return
        for index, proc in list(self.procs.items()):
            if proc.is_alive() or proc.exitcode == 0 or self.restarts.get(index, 0) >= MAX_RESTARTS \
                    or is_server(self.cfg, index):  # a dead server ends FedAvg: the run reports it, degraded
                continue
            self.restarts[index] = self.restarts.get(index, 0) + 1
            newest = newest_intact_checkpoint(self.run_dir, index)
            logger.warning("restarting peer %d (exit code %s, restart %d of %d) from %s", index, proc.exitcode,
                           self.restarts[index], MAX_RESTARTS,
                           f"its checkpoint of round {newest}" if newest else "scratch")
            self._spawn(index, resume_round=newest, rejoin=True)

    def publish_stop(self, reason: str, after_round: int, *, preempt: bool = False) -> None:
        """Tell every peer (through one DHT key) the last round to run; ``preempt``: the run will resume."""
        from peer_synchronization import publish

        if self.stop_reason is None:
            self.stop_reason, self.preempted = reason, preempt
            logger.info("stopping after round %d: %s", after_round, reason)
            me = self.cfg.local_peers().start
            if preempt:
                self.network.run(publish(self.network.dht, control_key(self.prefix), "preempt", True,
                                         ttl=7 * 24 * 3600), timeout=30)
            self.network.run(publish(self.network.dht, control_key(self.prefix), f"stop_after.{me}", after_round,
                                     ttl=7 * 24 * 3600), timeout=30)

    def _newest_local_round(self) -> int:
        """The furthest round any of this host's peers has logged (read from the tail of their files)."""
        newest = 0
        for index in self.cfg.local_peers():
            path = os.path.join(self.run_dir, "peers", f"peer_{index:04d}.jsonl")
            try:
                with open(path, "rb") as f:
                    f.seek(max(0, os.path.getsize(path) - 65536))
                    lines = f.read().splitlines()
                newest = max([newest] + [row["round"] for row in map(parse_row, lines[-2:]) if row])
            except OSError:
                continue
        return max(newest, self.resume_round)

    def _check_preempt(self) -> None:
        if self.preempt_requested and self.stop_reason is None:
            self.publish_stop("time limit signal (SIGUSR1): checkpointing", self._newest_local_round() + 2,
                              preempt=True)

    def _start_watchdog(self) -> None:
        from shared_memory_handling import ShmWatchdog, descendant_pids

        root = os.getpid()
        self.watchdog = ShmWatchdog(run_pids=lambda: [root, *descendant_pids(root)],
                                    warn_fraction=self.cfg.shm_warn_percent / 100,
                                    on_warning=lambda message: print(f"WARNING: {message}", flush=True)).start()

    def run(self) -> Tuple[str, int]:
        """Run this host's peers to the end; returns the run's status and exit code (``run_outcome``)."""
        os.makedirs(os.path.join(self.run_dir, "peers"), exist_ok=True)
        self._start_watchdog()
        initial_peers = self._start_network()
        self._spawn_peers(initial_peers)
        collector = MetricsCollector(self.run_dir, process_count(self.cfg), stale_after=stale_after_seconds(self.cfg))
        self._continue_history(collector)
        self._log_wandb(self.history)  # rounds of a resumed run that wandb has not seen yet (else none)
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a", buffering=1) as metrics:
            while any(p.is_alive() for p in self.procs.values()):
                self._reap_dead()
                self._restart_dead()
                self._check_preempt()
                if self.primary:
                    self._emit(collector.poll(dead=self._dead_peers()), metrics, collector)
                self._check_runtime()
                time.sleep(0.5)
            self._reap_dead()
            if self.primary:
                self._emit(collector.poll(final=True), metrics, collector)
        codes = {i: p.exitcode for i, p in self.procs.items()}
        self.failed_peers = {i: c for i, c in codes.items() if c != 0}
        if self.failed_peers:
            logger.error("peers exited with errors: %s (see %s/logs)", self.failed_peers, self.run_dir)
        return run_outcome(peer_codes=codes, history=self.history if self.primary else None,
                           max_failed_percent=self.cfg.max_failed_percent, preempted=self.preempted,
                           diverged=self.diverged)

    def _continue_history(self, collector: MetricsCollector) -> None:
        """On resume: metrics and stop rules continue from the checkpointed round, as if never cut."""
        if not self.resume_round:
            return
        self.history = read_jsonl(os.path.join(self.run_dir, "metrics.jsonl"), required=METRICS_ROW_KEYS)
        collector.next_round = collector.first_round = self.resume_round + 1
        collector.elapsed_offset = self.history[-1]["elapsed_seconds"] if self.history else 0.0
        for row in self.history:
            self.stop_policy.observe(row)

    def _emit(self, rows, metrics_file, collector: MetricsCollector) -> None:
        for row in rows:
            self.history.append(row)
            metrics_file.write(json.dumps(row) + "\n")
            print(status_line(row, self.cfg.rounds), flush=True)
            self._log_wandb([row], self.watchdog.metrics() if self.watchdog else {})
            self._check_stop(row, collector)

    def _log_wandb(self, rows: Sequence[Dict[str, Any]], extra: Optional[Dict[str, Any]] = None) -> None:
        """Per-round metrics to wandb, the round as step; a failure there never stops the run."""
        if self.wandb is None or not rows:
            return
        try:
            self.wandb.log_rows(rows, extra)
        except Exception as e:  # noqa: BLE001 - metrics.jsonl still has every row
            logger.warning("wandb log failed: %s", e)

    def _check_stop(self, row: Dict[str, Any], collector: MetricsCollector) -> None:
        decision = self.stop_policy.observe(row)
        if decision is not None:
            self.diverged = self.diverged or (decision.diverged and self.stop_reason is None)
            self.publish_stop(decision.reason, collector.newest_round + 2)  # peers run at most a round or two apart

    def _check_runtime(self) -> None:
        if time.time() - self.started > self.cfg.max_runtime_hours * 3600:
            self.publish_stop("--rt runtime limit: checkpointing", self._newest_local_round() + 2, preempt=True)

    def _dead_peers(self) -> List[int]:
        return [i for i, p in self.procs.items() if not p.is_alive() and p.exitcode != 0]

    def _reap_dead(self) -> None:
        for index, proc in self.procs.items():
            if not proc.is_alive() and not getattr(proc, "_reaped", False):
                proc._reaped = True
                _kill_group(proc.pid)
                if proc.exitcode not in (0, None) and not self.stopping:
                    logger.warning("peer %d exited with code %s", index, proc.exitcode)

    def write_summary(self, status: str) -> Dict[str, Any]:
        tested = [r for r in self.history if r["test_accuracy"] is not None]
        failed, total = failed_step_share(self.history)
        target = self.cfg.target_accuracy
        hit = next((r for r in tested if target > 0 and r["test_accuracy"] >= target), None)
        summary = {
            "status": status,
            "stop_reason": self.stop_reason,
            "rounds": self.history[-1]["round"] if self.history else 0,
            "best_test_accuracy": max((r["test_accuracy"] for r in tested), default=None),
            "final_test_accuracy": tested[-1]["test_accuracy"] if tested else None,
            "wall_seconds": time.time() - self.started,
            "rounds_to_target": hit["round"] if hit else None,
            "seconds_to_target": hit["elapsed_seconds"] if hit else None,
            "accuracy_targets": accuracy_targets_reached(self.history, self.cfg.accuracy_targets),
            "median_round_seconds": _median([r["round_seconds"] for r in self.history]),
            "mean_bytes_sent_per_peer": _mean([r["bytes_sent_per_peer"] for r in self.history]),
            "failed_steps": failed, "mar_steps": total,
            "failed_peers": sorted(self.failed_peers),
            "restarted_peers": {str(i): n for i, n in sorted(self.restarts.items())},
            "resumed_from_round": self.resume_round or None,
            "shm_segments_removed": len(self.watchdog.removed) if self.watchdog else 0,
            **{key: r[key] for r in self.history for key in LABEL_KEYS if key in r},  # the peers' last word
        }
        with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if self.wandb is not None:
            try:
                self.wandb.update_summary(summary)
            except Exception as e:  # noqa: BLE001 - summary.json is written
                logger.warning("wandb summary failed: %s", e)
        return summary

    def shutdown(self, *, grace: float = 15.0) -> None:
        """Stop every local peer (TERM, then KILL) and reap each peer's process group, then our own daemon."""
        self.stopping = True
        for proc in self.procs.values():
            if proc.is_alive():
                proc.terminate()
        deadline = time.time() + grace
        for proc in self.procs.values():
            proc.join(timeout=max(0.1, deadline - time.time()))
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
            _kill_group(proc.pid)
        if self.network is not None:
            self.network.shutdown()
        if self.watchdog is not None:
            self.watchdog.stop()

    def finish_wandb(self, exit_code: int = 0) -> None:
        """End the wandb run (an offline run is then complete on disk, ready for ``wandb sync``)."""
        if self.wandb is not None:
            try:
                self.wandb.finish(exit_code, preempted=exit_code == EXIT_PREEMPTED)
            except Exception as e:  # noqa: BLE001 - the run's files are already written
                logger.warning("wandb finish failed: %s", e)


def _kill_group(pid: Optional[int]) -> None:
    """Kill what is left of a peer's process group (its p2pd) once the peer itself is gone."""
    if pid is None:
        return
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _median(xs: Sequence[float]) -> Optional[float]:
    xs = sorted(x for x in xs if x is not None)
    return None if not xs else (xs[len(xs) // 2] if len(xs) % 2 else (xs[len(xs) // 2 - 1] + xs[len(xs) // 2]) / 2)


def _mean(xs: Sequence[float]) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


PEER_FILE_NAME = re.compile(r"peer_(\d{4,})\.jsonl")
# what the launcher reads from a peer's record and from a metrics row on resume; rows without them are skipped
PEER_RECORD_KEYS = ("t_start", "t_end", "round_seconds", "train_seconds", "aggregation_seconds")
METRICS_ROW_KEYS = ("train_loss", "test_loss", "test_accuracy", "elapsed_seconds", "round_seconds",
                    "bytes_sent_per_peer")


def parse_row(line) -> Optional[Dict[str, Any]]:
    """One jsonl line as a row: a JSON object with a positive integer ``round``; None for anything else."""
    try:
        row = json.loads(line)
    except ValueError:  # also a line that is not UTF-8
        return None
    return row if isinstance(row, dict) and type(row.get("round")) is int and row["round"] >= 1 else None


def is_peer_record(rec: Dict[str, Any], index: int) -> bool:
    """A row of ``peers/peer_{index}.jsonl`` that the launcher can pool (see ``_run_round``)."""
    return rec.get("peer") == index and all(type(rec.get(key)) in (int, float) for key in PEER_RECORD_KEYS)


def _lines(path: str) -> Tuple[List[bytes], bytes]:
    """A file's complete lines (each with its newline) and what follows the last newline (an unfinished line)."""
    with open(path, "rb") as f:
        *lines, tail = f.read().split(b"\n")
    return [line + b"\n" for line in lines], tail


def read_jsonl(path: str, required: Sequence[str] = ()) -> List[Dict[str, Any]]:
    """The rows of a jsonl file. A damaged line, or a row without a ``required`` key, is skipped with a
    warning; an unfinished last line silently (its writer may be mid-line)."""
    try:
        lines, _ = _lines(path)
    except FileNotFoundError:
        return []
    rows = []
    for number, line in enumerate(lines, 1):
        row = parse_row(line)
        if row is not None and all(key in row for key in required):
            rows.append(row)
        elif line.strip():
            logger.warning("skipping a damaged line in %s (line %d)", path, number)
    return rows


def cut_jsonl(path: str, last_round: int, aside: str) -> int:
    """Keep only the rows of rounds ≤ ``last_round`` in ``path``; every other line (later rounds, damaged or
    unfinished lines) is written to ``aside`` first, so nothing is lost. Returns how many lines moved."""
    try:
        lines, tail = _lines(path)
    except FileNotFoundError:
        return 0
    keep, move = [], []
    for line in lines:
        row = parse_row(line)
        (keep if row is not None and row["round"] <= last_round else move).append(line)
    move += [tail + b"\n"] if tail else []
    if move:
        os.makedirs(os.path.dirname(aside), exist_ok=True)
        _write_atomically(aside, lambda f: f.writelines(move))  # on disk before anything is cut
        _write_atomically(path, lambda f: f.writelines(keep))
    return len(move)


def _move_later_checkpoints(run_dir: str, peers: Sequence[int], last_round: int, aside: str) -> int:
    """Move this host's checkpoints of rounds after ``last_round`` aside: a resumed run must never mix them
    with the rounds it runs again. Returns how many moved."""
    moved = 0
    for index in peers:
        for round_index in (r for r in checkpoint_rounds(run_dir, index) if r > last_round):
            path = checkpoint_path(run_dir, index, round_index)
            target = os.path.join(aside, os.path.relpath(path, run_dir))
            os.makedirs(os.path.dirname(target), exist_ok=True)
            for source in (digest_path(path), path):
                if os.path.exists(source):
                    os.replace(source, os.path.join(os.path.dirname(target), os.path.basename(source)))
            moved += 1
    return moved


def newest_intact_checkpoint(run_dir: str, index: int) -> int:
    """The newest round of which peer ``index`` has an intact checkpoint (0: none)."""
    return next((r for r in reversed(checkpoint_rounds(run_dir, index))
                 if checkpoint_problem(checkpoint_path(run_dir, index, r)) is None), 0)


def prepare_resume(cfg: RunConfig, run_dir: str, *, primary: bool) -> int:
    """The round a resumed run continues after: the newest one every peer has an intact checkpoint of.

    What this host's files hold beyond it (later rows, damaged lines, later checkpoints) is moved to
    ``RUN_DIR/moved_aside/after-rNNNNNN-<time>-<pid>/`` under its own relative path, never deleted.
    """
    resume_round = common_checkpoint_round(run_dir, cfg.num_peers)
    if resume_round == 0:
        logger.warning("no round has an intact checkpoint from every peer in %s: starting again from round 1 "
                       "(earlier results are moved aside, not deleted)", run_dir)
    aside = os.path.join(run_dir, "moved_aside",
                         f"after-r{resume_round:06d}-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}")
    files = [os.path.join("peers", f"peer_{index:04d}.jsonl") for index in cfg.local_peers()]
    files += ["metrics.jsonl"] if primary else []
    lines = sum(cut_jsonl(os.path.join(run_dir, name), resume_round, os.path.join(aside, name)) for name in files)
    checkpoints = _move_later_checkpoints(run_dir, cfg.local_peers(), resume_round, aside)
    if lines or checkpoints:
        logger.warning("moved %d lines and %d checkpoints from after round %d to %s", lines, checkpoints,
                       resume_round, aside)
    print(f"resuming {run_dir} after round {resume_round}", flush=True)
    return resume_round


# ==================== command line ====================


def _plots_module():
    """``scripts/plots.py``, loaded from its path when needed (peers never import it, nor matplotlib)."""
    import importlib.util

    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "scripts", "plots.py")
    spec = importlib.util.spec_from_file_location("mar_fl_plots", path)
    module = sys.modules.setdefault(spec.name, importlib.util.module_from_spec(spec))
    spec.loader.exec_module(module)  # registered first: its dataclasses look their module up
    return module


def write_plots(run_dir: str) -> None:
    """``RUN_DIR/plots/`` at the end of a run; a plot that fails is a warning, never the run's failure."""
    try:
        if _plots_module().write_run_plots(run_dir):
            print(f"plots: {os.path.join(run_dir, 'plots')}", flush=True)
    except Exception as e:  # noqa: BLE001 - the run's results are already written
        logger.warning("plots not written: %s: %s", type(e).__name__, e)


def _check_device(cfg: RunConfig) -> None:
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--dv cuda was given but no CUDA device is visible on this host")


def prepare_run_dir(cfg: RunConfig, *, primary: bool) -> str:
    run_dir = cfg.run_dir  # always set by parse_config (config_setup.default_run_dir)
    try:
        os.makedirs(run_dir, exist_ok=True)
        if primary:  # one writer on a shared file system; other hosts' configs differ only in their peer range
            save_config(dataclasses.replace(cfg, peer_range=None, initial_peers=None),
                        os.path.join(run_dir, "config.json"))
    except OSError as e:
        raise ConfigError(f"--run-dir {run_dir}: {e.strerror or e}") from None
    return run_dir


def _wait_for_bootstrap(cfg: RunConfig) -> None:
    """A launcher that joins through node 0's bootstrap file waits for it here, before anything starts."""
    from config_setup import read_allocation
    from peer_synchronization import SyncError, multiaddrs_in, parse_initial_peers

    if cfg.initial_peers and multiaddrs_in(cfg.initial_peers) is None:
        try:
            parse_initial_peers(cfg.initial_peers, timeout=cfg.startup_timeout, attempt=read_allocation().attempt)
        except SyncError as e:
            raise ConfigError(f"--initial-peers: {e}") from None


def _pre_start(argv: Optional[Sequence[str]]):
    """Everything that can refuse the command line, in order, before any peer or daemon starts: the flags, the
    device, the paths, the data, the run dir, node 0's bootstrap file, the resume point. ConfigError/DataError."""
    from ml_tasks import get_task

    cfg = parse_config(argv)
    _check_device(cfg)
    check_paths(cfg)
    if len(cfg.local_peers()):
        start_forkserver(cfg)  # imports torch in the background; stopped again if anything below refuses the run
    prepared = get_task(cfg.task).prepare(cfg, cfg.run_dir)  # before peers spawn: they only load its result
    primary = cfg.primary()
    run_dir = prepare_run_dir(cfg, primary=primary)
    _wait_for_bootstrap(cfg)
    try:
        # --rejoin: the run is still going; each peer restarts from its own newest checkpoint (Launcher._spawn_peers)
        resume_round = prepare_resume(cfg, run_dir, primary=primary) if cfg.resume and not cfg.rejoin else 0
    except OSError as e:
        raise ConfigError(f"--resume {run_dir}: cannot move earlier results aside ({e})") from None
    logging.getLogger().setLevel(cfg.log_level)
    wandb_run = _start_wandb(cfg, run_dir) if primary else None  # last: it is the only step with a side effect
    return cfg, run_dir, prepared, primary, resume_round, wandb_run


def wandb_settings(cfg: RunConfig, run_dir: str, env: Optional[Dict[str, str]] = None):
    """The run's wandb settings: its flags, then the WANDB_* variables of ``env`` (default: os.environ)."""
    flags = {"mode": cfg.wandb_mode, "project": cfg.wandb_project, "entity": cfg.wandb_entity,
             "group": cfg.wandb_group, "tags": cfg.wandb_tags, "job_type": cfg.wandb_job_type}
    return resolve_wandb_settings(flags, os.environ if env is None else env, seed=cfg.seed, task=cfg.task,
                            name=os.path.basename(os.path.abspath(run_dir)))


def _start_wandb(cfg: RunConfig, run_dir: str):
    """Start the wandb run with RUN_DIR/config.json as its config; a wandb that cannot start is a ConfigError
    (a fresh run dir then loses its config.json again, so the same command can simply be repeated)."""
    config_path = os.path.join(run_dir, "config.json")
    with open(config_path) as f:
        config = json.load(f)
    try:
        return start_wandb_run(wandb_settings(cfg, run_dir), run_dir, config)
    except WandbStartError as e:
        if not cfg.resume:
            os.unlink(config_path)
        raise ConfigError(str(e)) from None


def _setup_console_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("hivemind", "wandb"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)


@contextlib.contextmanager
def _restored_process_state():
    """What ``main`` changes in its process (signal handlers, the root log level) is put back when it returns,
    so that it can be called from a notebook or a test."""
    handlers = {signum: signal.getsignal(signum) for signum in HANDLED_SIGNALS}
    level = logging.getLogger().level
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
        logging.getLogger().setLevel(level)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The command line; returns the exit status. Signal handlers and log level are restored on return."""
    with _restored_process_state():
        return _main(argv)


def _main(argv: Optional[Sequence[str]]) -> int:
    _setup_console_logging()
    import warnings

    # hivemind scripts a function with torch.jit at import; the deprecation is torch's business, not the user's
    warnings.filterwarnings("ignore", message=".*torch.jit.script.*", category=FutureWarning)
    from ml_tasks import DataError

    try:
        cfg, run_dir, prepared, primary, resume_round, wandb_run = _pre_start(argv)
    except (ConfigError, DataError) as e:
        stop_forkserver()
        print(f"mar_fl.py: error: {' '.join(str(e).splitlines())}", file=sys.stderr)  # always one line
        return EXIT_USAGE
    launcher = Launcher(cfg, run_dir, primary=primary, prepared=prepared, resume_round=resume_round,
                        wandb_run=wandb_run)

    def on_signal(signum, frame):
        raise PeerStopped(EXIT_INTERRUPTED)

    def on_time_limit(signum, frame):  # Slurm's warning (--signal=USR1@120): checkpoint, stop, exit 75
        launcher.preempt_requested = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGUSR1, on_time_limit)
    status, code = "completed", EXIT_FAILED
    try:
        print(f"MAR-FL run dir: {run_dir}", flush=True)
        notice = group_size_notice(cfg) if primary else None
        if notice:
            print(notice, file=sys.stderr, flush=True)
        status, code = launcher.run()
    except PeerStopped:
        status, code = "interrupted", EXIT_INTERRUPTED
        print("interrupted: stopping all peers", file=sys.stderr, flush=True)
    except Exception as e:  # noqa: BLE001
        logger.exception("launcher failed: %s", e)
        status = "failed"
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        launcher.shutdown()
        if primary:
            summary = launcher.write_summary(status)
            best, final = (_percent(summary[k]) for k in ("best_test_accuracy", "final_test_accuracy"))
            why = f" ({summary['stop_reason']})" if summary["stop_reason"] else ""
            print(f"done ({status}): best test accuracy {best}, final {final}, {summary['rounds']} rounds, "
                  f"{summary['wall_seconds']:.0f} s{why}", flush=True)
            if summary["failed_steps"] or summary["failed_peers"]:
                print(f"averaging: {summary['failed_steps']} of {summary['mar_steps']} MAR steps failed (values kept "
                      f"local); peers that died: {summary['failed_peers'] or 'none'} (see {run_dir}/logs)", flush=True)
            if status == "preempted":
                print(f"every peer checkpointed round {summary['rounds']}; continue with: "
                      f"python mar_fl.py --resume {run_dir}", flush=True)
            write_plots(run_dir)
        launcher.finish_wandb(code)
    return code


if __name__ == "__main__":
    # `python mar_fl.py plot RUN_DIR... --out DIR`: compare finished runs (scripts/plots.py)
    sys.exit(_plots_module().main(sys.argv[2:]) if sys.argv[1:2] == ["plot"] else main())
