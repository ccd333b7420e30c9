#!/usr/bin/env python3
"""MAR-FL: launcher, peer runtime and command line.

``python mar_fl.py [flags]`` starts a bootstrap DHT node, then one peer process per peer index this host runs.
Peers drive their own rounds (local momentum SGD → Moshpit All-Reduce over libp2p → periodic evaluation);
the launcher only spawns, supervises and collects the metrics that peers append to files in the run dir.
"""
from __future__ import annotations

import json
import logging
import math
import multiprocessing as mp
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence

from config_setup import ConfigError, RunConfig, config_from_json, parse_config, run_name, save_config

logger = logging.getLogger("mar_fl")

EXIT_USAGE, EXIT_FAILED, EXIT_INTERRUPTED = 2, 1, 143
TIMING_KEYS = ("round_seconds", "train_seconds", "aggregation_seconds", "elapsed_seconds")
_PRELOAD = ["torch", "torchvision", "hivemind", "ml_tasks", "moshpit_all_reduce", "peer_aggregation_logic"]


class PeerStopped(SystemExit):
    """Raised in a peer by SIGTERM/SIGINT so that every ``finally`` (daemon shutdown) runs."""


def configure_peer_environment() -> None:
    """Environment the forkserver (and so every peer and its p2pd) starts with; memory decides how many fit."""
    # the forkserver imports hivemind, whose torch.jit use warns on stderr at import: keep the console clean
    os.environ.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    # glibc gives each thread its own heap arena; the averager's worker threads would each keep tens of MB
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")


def release_freed_memory() -> None:
    """Hand freed heap pages back to the OS after a round (all-reduce buffers are large and short-lived)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def control_key(prefix: str) -> str:
    return f"{prefix}.control"


def should_test(cfg: RunConfig, round_index: int, last_round: int) -> bool:
    return round_index % cfg.test_every == 0 or round_index == last_round


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
    lr_drop_from: Optional[int] = None  # --lr-drop-round, or the round the launcher announced for --lr-drop-acc
    lr_decided_through: int = 0  # --lr-drop-acc: the last test round the launcher has judged


@dataclass
class PeerRuntime:
    """What a peer's rounds run with: the task and its data, the averager and the aggregation pipeline."""

    task: Any
    prepared: Dict[str, Any]
    train: Any
    test: Any
    test_idx: Any
    num_batches: int
    averager: Any
    aggregator: Any
    schedule: Any
    device: Any


def _pin_peer(cfg: RunConfig, index: int) -> str:
    """Pin to a core of this process's allowed set (never one Slurm did not give us); pick GPU i mod n."""
    import torch

    cores = sorted(os.sched_getaffinity(0))
    core = cores[(index // cfg.peers_per_core) % len(cores)]
    os.sched_setaffinity(0, {core})
    torch.set_num_threads(1)
    if cfg.device == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("--dv cuda was given but CUDA is not available on this host")
        torch.cuda.set_device(index % torch.cuda.device_count())
        return f"cuda:{index % torch.cuda.device_count()}"
    return "cpu"


def _setup_peer_logging(run_dir: str, index: int) -> None:
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
    root.setLevel(logging.INFO)
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


def peer_entry(cfg_json: Dict[str, Any], index: int, run_dir: str, initial_peers: List[str], prefix: str,
               launcher_pid: int, prepared: Dict[str, Any]) -> None:
    """Process entry point of one peer."""
    os.setpgrp()  # its own process group: the launcher can reap the peer's p2pd even after a SIGKILL

    def stop(signum, frame):
        raise PeerStopped(EXIT_INTERRUPTED)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    _watch_launcher(launcher_pid)
    cfg = config_from_json(cfg_json)
    _setup_peer_logging(run_dir, index)
    network = None
    try:
        from peer_synchronization import NetworkOptions, PeerNetwork

        device = _pin_peer(cfg, index)
        options = NetworkOptions(initial_peers=initial_peers, host=cfg.host, announce_host=cfg.announce_host,
                                 nat_port_map=cfg.nat_port_map)
        network = PeerNetwork(options).start()
        run_peer(cfg, index=index, run_dir=run_dir, network=network, prefix=prefix, device=device, prepared=prepared)
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
    return PeerState(index=index, model=model, momentum=momentum, order=order, lr_drop_from=cfg.lr_drop_round)


def run_peer(cfg: RunConfig, *, index: int, run_dir: str, network, prefix: str, device: str,
             prepared: Dict[str, Any]) -> None:
    import torch

    from config_setup import mini_batches_per_round
    from ml_tasks import eval_slice, get_task
    from moshpit_all_reduce import AveragerOptions, MarSchedule, MoshpitAverager
    from peer_aggregation_logic import make_aggregator
    from peer_synchronization import barrier

    task = get_task(cfg.task)
    train, test = task.load(prepared)
    state = _init_peer_state(cfg, task, prepared, train, index, torch.device(device))
    averager = MoshpitAverager(network, AveragerOptions(
        prefix=prefix, index=index, compression=cfg.compression,
        matchmaking_timeout=cfg.matchmaking_timeout, allreduce_timeout=cfg.allreduce_timeout))
    rt = PeerRuntime(task=task, prepared=prepared, train=train, test=test,
                     test_idx=eval_slice(len(test), index, cfg.num_peers),
                     num_batches=mini_batches_per_round(cfg, num_samples=len(train)), averager=averager,
                     aggregator=make_aggregator(cfg), device=torch.device(device),
                     schedule=MarSchedule(cfg.group_size, cfg.group_key_dim, cfg.mar_steps))
    arrived = barrier(network, f"{prefix}.start", me=index, expected=range(cfg.num_peers),
                      timeout=cfg.startup_timeout)
    logger.info("peer %d: %d/%d peers up, %d batches per round", index, len(arrived), cfg.num_peers, rt.num_batches)
    out_path = os.path.join(run_dir, "peers", f"peer_{index:04d}.jsonl")
    with open(out_path, "a", buffering=1) as out:
        for round_index in range(1, cfg.rounds + 1):
            if _stop_requested(network, prefix, state, round_index):
                break
            _await_lr_verdict(cfg, network, prefix, state, round_index)
            out.write(json.dumps(_run_round(cfg, state, rt, round_index)) + "\n")
            release_freed_memory()
    barrier(network, f"{prefix}.end", me=index, expected=range(cfg.num_peers), timeout=cfg.allreduce_timeout)
    averager.close()


def _read_control(network, prefix: str, state: PeerState) -> None:
    """Read the launcher's decisions (stop, learning-rate drop) from its DHT control key into ``state``."""
    from peer_synchronization import read_subkeys

    try:
        record = network.run(read_subkeys(network.dht, control_key(prefix)), timeout=30)
    except Exception as e:  # noqa: BLE001 - a missed read only delays the stop by a round
        logger.warning("control read failed: %r", e)
        return
    if "stop_after" in record:
        state.stop_after = int(record["stop_after"])
    if "lr" in record:  # one value, so a reader never sees the verdict without the drop round it implies
        decided_through, drop_from = record["lr"]
        state.lr_decided_through = max(state.lr_decided_through, int(decided_through))
        if drop_from and state.lr_drop_from is None:
            state.lr_drop_from = int(drop_from)


def _stop_requested(network, prefix: str, state: PeerState, round_index: int) -> bool:
    """One DHT read per round: the launcher publishes the last round to run when it decides to stop."""
    _read_control(network, prefix, state)
    return state.stop_after is not None and round_index > state.stop_after


def lr_verdict_pending(cfg: RunConfig, state: PeerState, round_index: int) -> bool:
    """--lr-drop-acc: a round after a test round starts only once the launcher has judged that test."""
    previous = round_index - 1
    return (cfg.lr_drop_accuracy is not None and state.lr_drop_from is None and previous >= 1
            and previous % cfg.test_every == 0 and state.lr_decided_through < previous)


def _await_lr_verdict(cfg: RunConfig, network, prefix: str, state: PeerState, round_index: int) -> None:
    """Wait for the launcher's verdict, so that every peer trains each round with the same lr (reproducibly)."""
    deadline = time.time() + stale_after_seconds(cfg) + 60
    while lr_verdict_pending(cfg, state, round_index):
        if time.time() > deadline:
            logger.warning("peer %d: no learning-rate verdict on round %d from the launcher; keeping lr %g",
                           state.index, round_index - 1, cfg.learning_rate)
            return
        time.sleep(0.2)
        _read_control(network, prefix, state)


def _run_round(cfg: RunConfig, state: PeerState, rt: PeerRuntime, round_index: int) -> Dict[str, Any]:
    """One round of one peer: train if chosen, aggregate if chosen, evaluate on test rounds."""
    from config_setup import learning_rate
    from ml_tasks import evaluate, train_batches
    from peer_aggregation_logic import AggregationContext
    from peer_synchronization import aggregation_participants, update_participants

    started = time.time()
    lr = learning_rate(cfg, round_index, drop_from=state.lr_drop_from)
    record: Dict[str, Any] = {"round": round_index, "peer": state.index, "t_start": started, "learning_rate": lr}
    if state.index in update_participants(seed=cfg.seed, round_index=round_index, num_peers=cfg.num_peers,
                                          update_percent=cfg.update_percent):
        record["train_loss"] = train_batches(
            rt.task, state.model, state.momentum, data=rt.train, order=state.order, num_batches=rt.num_batches,
            batch_size=cfg.batch_size, lr=lr, beta=cfg.momentum, device=rt.device)
    trained = time.time()
    participants = aggregation_participants(
        seed=cfg.seed, round_index=round_index, num_peers=cfg.num_peers, update_percent=cfg.update_percent,
        aggregate_percent=cfg.aggregate_percent, dropout_percent=cfg.dropout_percent)
    record["participating_peers"] = len(participants)
    if state.index in participants:
        ctx = AggregationContext(averager=rt.averager, params=rt.task.trainable(state.model),
                                 momentum=state.momentum, participants=sorted(participants),
                                 round_index=round_index, schedule=rt.schedule)
        result = rt.aggregator.aggregate(ctx)
        record.update(result.metrics, bytes_sent=result.report.bytes_sent,
                      bytes_received=result.report.bytes_received, group_size=result.report.avg_group_size,
                      failed_peers=sorted({p for s in result.report.steps for p in s.failed_peers}))
    aggregated = time.time()
    last_round = min(cfg.rounds, state.stop_after or cfg.rounds)
    if should_test(cfg, round_index, last_round):
        record.update(evaluate(rt.task, state.model, data=rt.test, indices=rt.test_idx, device=rt.device))
    record.update(train_seconds=trained - started, aggregation_seconds=aggregated - trained,
                  round_seconds=time.time() - started, t_end=time.time())
    state.round_index = round_index
    return record


# ==================== metrics (launcher side) ====================


def summarize_round(records: Sequence[Dict[str, Any]], run_start: float) -> Dict[str, Any]:
    """Pool one round's per-peer records into the per-round metrics (sorted by peer: reproducible sums)."""
    records = sorted(records, key=lambda r: r["peer"])
    mean = lambda xs: (sum(xs) / len(xs)) if xs else None  # noqa: E731
    trained = [r["train_loss"] for r in records if "train_loss" in r]
    aggregated = [r for r in records if "bytes_sent" in r]
    tested = [r for r in records if "test_count" in r]
    count = sum(r["test_count"] for r in tested)
    return {
        "round": records[0]["round"],
        "learning_rate": records[0].get("learning_rate"),
        "train_loss": mean(trained),
        "test_accuracy": 100.0 * sum(r["test_correct"] for r in tested) / count if count else None,
        "test_loss": sum(r["test_loss_sum"] for r in tested) / count if count else None,
        "participating_peers": len(aggregated),
        "reporting_peers": len(records),
        "bytes_sent_per_peer": mean([r["bytes_sent"] for r in aggregated]) or 0,
        "bytes_received_per_peer": mean([r["bytes_received"] for r in aggregated]) or 0,
        "avg_group_size": mean([r["group_size"] for r in aggregated]) or 0,
        "round_seconds": max(r["round_seconds"] for r in records),  # the slowest peer sets the pace
        "train_seconds": mean([r["train_seconds"] for r in records]),
        "aggregation_seconds": mean([r["aggregation_seconds"] for r in records]),
        "elapsed_seconds": max(r["t_end"] for r in records) - run_start,
    }


@dataclass
class MetricsCollector:
    """Tails ``peers/peer_*.jsonl`` and emits each round once every live peer has reported it.

    Peers that sit a round out race ahead, so "somebody is already further" proves nothing; a round is given up
    on only when its missing peers are known dead or it has waited ``stale_after`` seconds (a remote peer that
    hangs must not stall the report forever).
    """

    run_dir: str
    num_peers: int
    stale_after: float = 300.0
    offsets: Dict[str, int] = field(default_factory=dict)
    pending: Dict[int, List[Dict[str, Any]]] = field(default_factory=dict)
    first_seen: Dict[int, float] = field(default_factory=dict)
    next_round: int = 1
    newest_round: int = 0
    run_start: Optional[float] = None

    def _read_new(self) -> None:
        folder = os.path.join(self.run_dir, "peers")
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            with open(path) as f:
                f.seek(self.offsets.get(name, 0))
                chunk = f.read()
            complete = chunk[: chunk.rfind("\n") + 1]  # a peer may be mid-line
            self.offsets[name] = self.offsets.get(name, 0) + len(complete.encode())
            for line in complete.splitlines():
                self._add(json.loads(line))

    def _add(self, rec: Dict[str, Any]) -> None:
        if rec["round"] < self.next_round:
            return  # that round was already reported without this (slow or once-dead) peer
        self.pending.setdefault(rec["round"], []).append(rec)
        self.first_seen.setdefault(rec["round"], time.time())
        self.newest_round = max(self.newest_round, rec["round"])
        if rec["round"] == 1:
            self.run_start = min(self.run_start or rec["t_start"], rec["t_start"])

    def poll(self, *, dead: Sequence[int] = (), final: bool = False) -> List[Dict[str, Any]]:
        self._read_new()
        rows = []
        while self.next_round in self.pending:
            records = self.pending[self.next_round]
            missing = set(range(self.num_peers)) - {r["peer"] for r in records} - set(dead)
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
            f"{row['bytes_sent_per_peer'] / 1e6:.2f} MB sent | peers {row['participating_peers']}")


# ==================== launcher ====================


class Launcher:
    """Spawns and supervises this host's peers; on the primary host also collects metrics and decides stops."""

    def __init__(self, cfg: RunConfig, run_dir: str, *, primary: bool, prepared: Dict[str, Any]):
        self.cfg, self.run_dir, self.primary, self.prepared = cfg, run_dir, primary, prepared
        self.prefix = f"marfl.{os.path.basename(os.path.abspath(run_dir))}.s{cfg.seed}"
        self.procs: Dict[int, Any] = {}
        self.network = None
        self.stop_reason: Optional[str] = None
        self.stopping = False
        self.wandb = None
        self.history: List[Dict[str, Any]] = []
        self.best_loss, self.best_loss_round = math.inf, 0
        self.lr_drop_from: Optional[int] = None
        self.started = time.time()

    def _start_network(self) -> List[str]:
        from peer_synchronization import NetworkOptions, PeerNetwork, parse_initial_peers, write_bootstrap_file

        initial = parse_initial_peers(self.cfg.initial_peers, timeout=self.cfg.startup_timeout)
        options = NetworkOptions(initial_peers=initial, host=self.cfg.host, announce_host=self.cfg.announce_host,
                                 nat_port_map=self.cfg.nat_port_map)
        self.network = PeerNetwork(options).start()
        maddrs = self.network.visible_maddrs()
        if not initial:
            write_bootstrap_file(os.path.join(self.run_dir, "bootstrap.json"), maddrs)
        return initial or maddrs

    def _spawn_peers(self, initial_peers: List[str]) -> None:
        ctx = mp.get_context("forkserver")
        configure_peer_environment()
        ctx.set_forkserver_preload(_PRELOAD)  # children share the imported torch/hivemind pages copy-on-write
        for index in self.cfg.local_peers():
            proc = ctx.Process(target=peer_entry, name=f"peer-{index}",
                               args=(self.cfg.to_json(), index, self.run_dir, initial_peers, self.prefix, os.getpid(),
                                     self.prepared))
            proc.start()
            self.procs[index] = proc

    def publish_stop(self, reason: str, after_round: int) -> None:
        from peer_synchronization import publish

        if self.stop_reason is None:
            self.stop_reason = reason
            logger.info("stopping after round %d: %s", after_round, reason)
            self.network.run(publish(self.network.dht, control_key(self.prefix), "stop_after", after_round,
                                     ttl=7 * 24 * 3600), timeout=30)

    def run(self) -> int:
        os.makedirs(os.path.join(self.run_dir, "peers"), exist_ok=True)
        initial_peers = self._start_network()
        self._spawn_peers(initial_peers)
        collector = MetricsCollector(self.run_dir, self.cfg.num_peers, stale_after=stale_after_seconds(self.cfg))
        if self.primary:
            self._init_wandb()
        with open(os.path.join(self.run_dir, "metrics.jsonl"), "a", buffering=1) as metrics:
            while any(p.is_alive() for p in self.procs.values()):
                self._reap_dead()
                if self.primary:
                    self._emit(collector.poll(dead=self._dead_peers()), metrics, collector)
                    self._check_runtime(collector)
                time.sleep(0.5)
            self._reap_dead()
            if self.primary:
                self._emit(collector.poll(final=True), metrics, collector)
        codes = {i: p.exitcode for i, p in self.procs.items()}
        failed = {i: c for i, c in codes.items() if c != 0}
        if failed:
            logger.error("peers exited with errors: %s (see %s/logs)", failed, self.run_dir)
        return EXIT_FAILED if failed else 0

    def _emit(self, rows, metrics_file, collector: MetricsCollector) -> None:
        for row in rows:
            self.history.append(row)
            metrics_file.write(json.dumps(row) + "\n")
            print(status_line(row, self.cfg.rounds), flush=True)
            if self.wandb is not None:
                self.wandb.log({k: v for k, v in row.items() if v is not None}, step=row["round"])
            self._check_stop(row, collector)
            self._judge_lr_drop(row)

    def _check_stop(self, row: Dict[str, Any], collector: MetricsCollector) -> None:
        cfg = self.cfg
        after = collector.newest_round + 2  # peers run at most a round or two apart
        if cfg.target_accuracy > 0 and (row["test_accuracy"] or 0) >= cfg.target_accuracy:
            self.publish_stop(f"target accuracy {cfg.target_accuracy:g}% reached", after)
        if cfg.patience > 0 and row["test_loss"] is not None:
            if row["test_loss"] < self.best_loss - cfg.convergence_threshold:
                self.best_loss, self.best_loss_round = row["test_loss"], row["round"]
            elif row["round"] - self.best_loss_round >= cfg.patience:
                self.publish_stop(f"test loss did not improve by {cfg.convergence_threshold:g} "
                                  f"in {cfg.patience} rounds", after)

    def _judge_lr_drop(self, row: Dict[str, Any]) -> None:
        """--lr-drop-acc: judge every test round; peers wait for the verdict before the next round."""
        from peer_synchronization import publish

        cfg = self.cfg
        if cfg.lr_drop_accuracy is None or self.lr_drop_from is not None or row["round"] % cfg.test_every:
            return
        if row["test_accuracy"] is not None and row["test_accuracy"] >= cfg.lr_drop_accuracy:
            self.lr_drop_from = row["round"] + 1
            logger.info("test accuracy %.2f%% reached %g%%: lr %g from round %d on", row["test_accuracy"],
                        cfg.lr_drop_accuracy, cfg.lr_drop_to, self.lr_drop_from)
        try:
            self.network.run(publish(self.network.dht, control_key(self.prefix), "lr",
                                     [row["round"], self.lr_drop_from or 0], ttl=7 * 24 * 3600), timeout=30)
        except Exception as e:  # noqa: BLE001 - peers wait, then keep their lr and say so in their logs
            logger.warning("could not publish the learning-rate verdict on round %d: %r", row["round"], e)

    def _check_runtime(self, collector: MetricsCollector) -> None:
        if time.time() - self.started > self.cfg.max_runtime_hours * 3600:
            self.publish_stop("--rt runtime limit", collector.newest_round + 2)

    def _dead_peers(self) -> List[int]:
        return [i for i, p in self.procs.items() if not p.is_alive() and p.exitcode != 0]

    def _reap_dead(self) -> None:
        for index, proc in self.procs.items():
            if not proc.is_alive() and not getattr(proc, "_reaped", False):
                proc._reaped = True
                _kill_group(proc.pid)
                if proc.exitcode not in (0, None) and not self.stopping:
                    logger.warning("peer %d exited with code %s", index, proc.exitcode)

    def _init_wandb(self) -> None:
        if self.cfg.wandb_mode == "disabled":
            return
        try:
            import wandb

            self.wandb = wandb.init(project=self.cfg.wandb_project, entity=self.cfg.wandb_entity,
                                    name=os.path.basename(self.run_dir), config=self.cfg.to_json(),
                                    dir=self.run_dir, mode=self.cfg.wandb_mode)
        except Exception as e:  # noqa: BLE001 - metrics still land in metrics.jsonl
            logger.warning("wandb disabled: %s", e)

    def write_summary(self, status: str) -> Dict[str, Any]:
        tested = [r for r in self.history if r["test_accuracy"] is not None]
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
            "median_round_seconds": _median([r["round_seconds"] for r in self.history]),
            "mean_bytes_sent_per_peer": _mean([r["bytes_sent_per_peer"] for r in self.history]),
        }
        with open(os.path.join(self.run_dir, "summary.json"), "w") as f:
            json.dump(summary, f, indent=2)
        if self.wandb is not None:
            self.wandb.summary.update({k: v for k, v in summary.items() if v is not None})
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

    def finish_wandb(self) -> None:
        if self.wandb is not None:
            try:
                self.wandb.finish()
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


# ==================== command line ====================


def _check_device(cfg: RunConfig) -> None:
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError("--dv cuda was given but no CUDA device is visible on this host")


def run_dir_for(cfg: RunConfig) -> str:
    return cfg.run_dir or os.path.join("runs", f"{run_name(cfg)}-{time.strftime('%Y%m%d-%H%M%S')}")


def prepare_run_dir(cfg: RunConfig, run_dir: Optional[str] = None) -> str:
    run_dir = run_dir or run_dir_for(cfg)
    os.makedirs(run_dir, exist_ok=True)
    save_config(cfg, os.path.join(run_dir, "config.json"))
    return run_dir


def _setup_console_logging() -> None:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for noisy in ("hivemind", "wandb"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def main(argv: Optional[Sequence[str]] = None) -> int:
    _setup_console_logging()
    from ml_tasks import DataError, get_task

    try:
        cfg = parse_config(argv)
        _check_device(cfg)
        run_dir = run_dir_for(cfg)
        prepared = get_task(cfg.task).prepare(cfg, run_dir)  # before peers spawn: they only load its result
    except (ConfigError, DataError) as e:
        print(f"mar_fl.py: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    run_dir = prepare_run_dir(cfg, run_dir)
    primary = cfg.peer_range is None or cfg.peer_range[0] == 0
    launcher = Launcher(cfg, run_dir, primary=primary, prepared=prepared)

    def on_signal(signum, frame):
        raise PeerStopped(EXIT_INTERRUPTED)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    status, code = "completed", EXIT_FAILED
    try:
        print(f"MAR-FL run dir: {run_dir}", flush=True)
        code = launcher.run()
        status = "completed" if code == 0 else "failed"
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
            print(f"done ({status}): best {summary['best_test_accuracy']}, final {summary['final_test_accuracy']}, "
                  f"{summary['rounds']} rounds, {summary['wall_seconds']:.0f} s", flush=True)
        launcher.finish_wandb()
    return code


if __name__ == "__main__":
    sys.exit(main())
