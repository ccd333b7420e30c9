"""One round's aggregation pipeline, as small pluggable objects.

An aggregator takes the peer's model and momentum plus the round's participants and leaves them aggregated in
place. :class:`MarAveraging` is the base; the paper's baselines run in the same runtime, on the same tensors and
with the same byte accounting: :class:`AllToAllAveraging` (RDFL: everyone exchanges with everyone),
:class:`ServerAveraging` (FedAvg: a server peer, star topology) and :class:`GossipAveraging` (k random
neighbours per round). :class:`KnowledgeDistillation` wraps an aggregator and distils from
group-mates before handing over to it; :class:`DifferentialPrivacy` wraps an aggregator and makes sure that
the model leaves the peer only as a clipped, noised update and the momentum not at all. ``make_aggregator``
stacks them from the flags — never an integer "use case".
"""
from __future__ import annotations

import copy
import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch

from moshpit_all_reduce import (
    MarReport,
    MarSchedule,
    MoshpitAverager,
    gossip_readers,
    gossip_sources,
    moshpit_all_reduce,
    moshpit_steps,
)


@dataclass
class AggregationContext:
    averager: MoshpitAverager
    task: Any  # ml_tasks.Task: declares the trainable tensors
    model: torch.nn.Module
    momentum: Sequence[torch.Tensor]
    participants: Sequence[int]
    round_index: int
    schedule: MarSchedule
    weight: float = 1.0
    extra: Sequence[torch.Tensor] = ()  # averaged alongside the model (DP: smoothed deltas, indicator)
    local_batches: Optional[Callable[[int], List[Tuple]]] = None  # MAR step → distinct local batches (KD)
    lr: float = 0.0  # this round's learning rate (KD trains with it)

    @property
    def params(self) -> List[torch.nn.Parameter]:
        return self.task.trainable(self.model)

    @property
    def peer(self) -> int:
        return self.averager.options.index


@dataclass
class AggregationResult:
    report: MarReport
    metrics: Dict[str, Any] = field(default_factory=dict)


class Aggregator(Protocol):
    """One stage of a peer's aggregation pipeline (``MarAveraging``, ``KnowledgeDistillation(inner)``,
    ``DifferentialPrivacy(inner)``): called once per round by every aggregating peer, with no coordinator."""

    def aggregate(self, ctx: AggregationContext) -> AggregationResult:
        """Aggregate this round's model in place.

        :param ctx: the round's model, momentum, extra tensors, averager, schedule and participants
        :returns: the MAR report (steps, bytes, failures) and per-round metrics to log
        """
        ...

    def state_dict(self) -> Dict[str, Any]:
        """What a checkpoint must keep across rounds (e.g. DP's clip threshold and smoothed delta)."""
        ...

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore what ``state_dict`` returned, on resume or rejoin."""
        ...


def exchanged_tensors(ctx: AggregationContext) -> List[torch.Tensor]:
    """What every aggregation algorithm averages: the trainable parameters, their momentum and the extras."""
    return [p.data for p in ctx.params] + list(ctx.momentum) + list(ctx.extra)


class _Stateless:
    def state_dict(self) -> Dict[str, Any]:
        return {}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        pass


class MarAveraging(_Stateless):
    """Plain Moshpit All-Reduce of the trainable parameters, their momentum and any extras in one exchange."""

    def aggregate(self, ctx: AggregationContext) -> AggregationResult:
        report = moshpit_all_reduce(ctx.averager, exchanged_tensors(ctx), participants=ctx.participants,
                                    round_index=ctx.round_index, schedule=ctx.schedule, weight=ctx.weight)
        return AggregationResult(report=report)


class AllToAllAveraging(_Stateless):
    """RDFL, the paper's O(N²) baseline: each participant fetches every other participant's full tensors and
    averages them all (the exact mean, like a full MAR grid) — (M − 1) models sent and received per peer."""

    def aggregate(self, ctx: AggregationContext) -> AggregationResult:
        ctx.averager.begin_round(ctx.round_index)
        key = ctx.averager.group_key(round_index=ctx.round_index, step=0, bucket=0, tag="rdfl")
        step = ctx.averager.average_all(exchanged_tensors(ctx), key=key, expected=frozenset(ctx.participants))
        return AggregationResult(report=MarReport(steps=[step]))


class ServerAveraging(_Stateless):
    """FedAvg, the centralised baseline: every participant sends its tensors to the server peer (index ``N``,
    started by the launcher, no data of its own), which averages them and sends the mean back — one model up
    and one down per client, ``M`` each way at the server."""

    def __init__(self, *, server: int):
        """:param server: the server peer's index (``--np``: one past the last client)"""
        self.server = server

    def aggregate(self, ctx: AggregationContext) -> AggregationResult:
        ctx.averager.begin_round(ctx.round_index)
        step = ctx.averager.average_via_server(exchanged_tensors(ctx), key=fedavg_key(ctx.averager, ctx.round_index),
                                               expected=frozenset(ctx.participants), server=self.server)
        return AggregationResult(report=MarReport(steps=[step]))


def fedavg_key(averager: MoshpitAverager, round_index: int) -> str:
    return averager.group_key(round_index=round_index, step=0, bucket=0, tag="fedavg")


def server_tensors(cfg: Any, params: Sequence[torch.Tensor]) -> List[torch.Tensor]:
    """Zeros shaped like what a FedAvg client sends (``exchanged_tensors``): parameters and momentum, or with DP
    the released parameters, the smoothed deltas and the clip indicator (the momentum stays on the client)."""
    shaped = [torch.zeros(p.shape, dtype=torch.float32) for _ in range(2) for p in params]
    return shaped + ([torch.zeros(1)] if cfg.dp else [])


class GossipAveraging(_Stateless):
    """Gossip (P2PFL-style): each round every participant averages with ``k`` random live participants — a fresh
    random ring from ``(seed, round)``, each peer pulling the models of the ``k`` after it (so each also serves
    ``k``). With ``staleness``, a model not trained for ``s`` rounds weighs ``1 / (1 + s)``."""

    def __init__(self, *, seed: int, peers: int, staleness: bool,
                 last_trained: Optional[Callable[[int, int], Optional[int]]] = None):
        """:param seed: the run's seed (the rings derive from it)
        :param peers: ``k``, the neighbours each peer pulls from per round
        :param staleness: weigh models by how recently their peer trained
        :param last_trained: ``(peer, round) → the last round ≤ round it trained in`` (None: never)
        """
        self.seed, self.peers, self.staleness, self.last_trained = seed, peers, staleness, last_trained

    def weight(self, peer: int, round_index: int) -> float:
        if not self.staleness or self.last_trained is None:
            return 1.0
        last = self.last_trained(peer, round_index)
        return 1.0 / (1 + (round_index if last is None else round_index - last))

    def aggregate(self, ctx: AggregationContext) -> AggregationResult:
        ctx.averager.begin_round(ctx.round_index)
        sources = gossip_sources(ctx.participants, seed=self.seed, round_index=ctx.round_index, k=self.peers)
        readers = gossip_readers(sources)
        key = ctx.averager.group_key(round_index=ctx.round_index, step=0, bucket=0, tag="gossip")
        step = ctx.averager.gossip(exchanged_tensors(ctx), key=key, sources=sources[ctx.peer],
                                   readers=readers[ctx.peer], weight_of=lambda p: self.weight(p, ctx.round_index))
        return AggregationResult(report=MarReport(steps=[step]))


# ==================== knowledge distillation ====================


@dataclass(frozen=True)
class KdSettings:
    rounds: int  # K: rounds 1..K distil
    no_blending: bool
    use_all: bool
    private: bool  # DP on: KL term only
    beta: float


class KnowledgeDistillation:
    """During the first K rounds: in each MAR step fetch the group-mates' models (all-gather), keep the
    lowest-KL teachers and distil from them; then the inner aggregator averages over the same groups.
    """

    def __init__(self, inner: Aggregator, settings: KdSettings):
        self.inner, self.settings = inner, settings
        self._scratch: Optional[torch.nn.Module] = None

    def aggregate(self, ctx: AggregationContext) -> AggregationResult:
        from ml_tasks import kd_loss_weights

        if ctx.round_index > self.settings.rounds or ctx.local_batches is None:
            result = self.inner.aggregate(ctx)
            result.metrics.update(kd_lambda=0.0, kd_teachers=0.0)
            return result
        weights = kd_loss_weights(ctx.round_index, kd_rounds=self.settings.rounds,
                                  no_blending=self.settings.no_blending, private=self.settings.private)
        teachers: List[int] = []

        def run_step(key, expected):
            report, gathered = ctx.averager.all_gather([p.data for p in ctx.params], key=key, expected=expected)
            if gathered:
                teachers.append(self._distil(ctx, len(teachers), gathered, weights))
            return report

        kd_report = moshpit_steps(ctx.averager, participants=ctx.participants, round_index=ctx.round_index,
                                  schedule=ctx.schedule, tag="kd", run_step=run_step)
        result = self.inner.aggregate(ctx)
        result.report.steps[:0] = kd_report.steps  # traffic of both passes counts
        result.metrics.update(kd_lambda=weights.kl_weight, kd_teachers=float(np.mean(teachers)) if teachers else 0.0)
        return result

    def state_dict(self) -> Dict[str, Any]:
        return {"inner": self.inner.state_dict()}  # everything else is derived from (seed, round)

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])

    def _distil(self, ctx: AggregationContext, step: int, gathered: Dict[int, List[torch.Tensor]], weights) -> int:
        from ml_tasks import distill, num_teachers, score_teachers, select_teachers

        device = ctx.params[0].device
        if self._scratch is None:  # a copy has the student's architecture and its frozen parts, whatever the task
            self._scratch = copy.deepcopy(ctx.model)
        batches = ctx.local_batches(step)
        candidates = {peer: [t.to(device) for t in tensors] for peer, tensors in gathered.items()}
        scores, logits = score_teachers(ctx.task, ctx.model, self._scratch, candidates, batches)
        chosen = select_teachers(scores, num_teachers(len(scores), use_all=self.settings.use_all))
        targets = [torch.stack([logits[p][i] for p in chosen]).mean(0) for i in range(len(batches))]
        distill(ctx.task, ctx.model, ctx.momentum, batches=batches, teacher_logits=targets, weights=weights,
                lr=ctx.lr, beta=self.settings.beta)
        return len(chosen)


# ==================== differential privacy ====================


@dataclass
class DpState:
    """A peer's DP state across rounds (checkpointed with the peer)."""

    clip: float
    last_global: List[torch.Tensor]
    smoothed: Optional[List[torch.Tensor]] = None
    rounds_shared: int = 0


class DifferentialPrivacy:
    """DP-FedAvg with adaptive clipping around an inner aggregator, per peer, with no server.

    The model leaves the peer only as ``last_global + η_s·smoothed`` where ``smoothed`` accumulates clipped,
    noised updates; the inner aggregator averages that model, the smoothed deltas and the noisy centred clip
    indicator — never the momentum, which stays local (it is a function of the raw gradients). The averaged
    indicator then moves the clip threshold: the same on every peer, since MAR delivers the same average to all
    (up to float rounding: a relative 1e-9 or so, which the accountant does not care about — each peer's noise
    scales with its own C).
    """

    def __init__(self, inner: Aggregator, params, initial: Sequence[torch.Tensor]):
        self.inner, self.params = inner, params
        self.state = DpState(clip=params.initial_clip, last_global=[t.detach().clone() for t in initial])
        self.central, self.groupmate = params.central_accountant(), params.groupmate_accountant()

    def aggregate(self, ctx: AggregationContext) -> AggregationResult:
        from differential_privacy import DELTA_SMOOTHING, SERVER_LR, update_clip_threshold

        params, state = ctx.params, self.state
        noisy, b_tensor, norm = self._privatise(ctx)
        smoothed = noisy if state.smoothed is None else [DELTA_SMOOTHING * s + n for s, n in zip(state.smoothed, noisy)]
        with torch.no_grad():
            for p, g, s in zip(params, state.last_global, smoothed):
                p.copy_(g + SERVER_LR * s)
        released = dataclasses.replace(ctx, momentum=[], extra=list(ctx.extra) + smoothed + [b_tensor])
        result = self.inner.aggregate(released)
        clip_used = state.clip
        mean_indicator = float(b_tensor) + self.params.indicator_offset
        state.smoothed, state.clip = smoothed, update_clip_threshold(state.clip, mean_indicator)
        state.last_global = [p.detach().clone() for p in params]
        state.rounds_shared += 1
        result.metrics.update(
            dp_epsilon=self.central.epsilon(state.rounds_shared),  # q = 1: only the rounds this peer shared count
            dp_epsilon_groupmate=self.groupmate.epsilon(state.rounds_shared),
            dp_clip_threshold=clip_used, dp_update_norm=norm, dp_noise=self.params.noise_label)
        return result

    def _privatise(self, ctx: AggregationContext) -> Tuple[List[torch.Tensor], torch.Tensor, float]:
        """This round's clipped, noised update and noised (centred) indicator; the raw norm stays local."""
        from differential_privacy import add_gaussian_noise, clip_by_global_norm

        params, m = ctx.params, len(ctx.participants)
        noise = self.params.noise_source(peer=ctx.peer, round_index=ctx.round_index, device=params[0].device)
        delta = [p.detach() - g for p, g in zip(params, self.state.last_global)]
        clipped, norm, indicator = clip_by_global_norm(delta, self.state.clip)
        noisy = add_gaussian_noise(clipped, std=self.params.z_delta * self.state.clip / math.sqrt(m), noise=noise)
        b = torch.tensor([indicator - self.params.indicator_offset], dtype=torch.float32, device=params[0].device)
        return noisy, add_gaussian_noise([b], std=self.params.sigma_b / math.sqrt(m), noise=noise)[0], norm

    def state_dict(self) -> Dict[str, Any]:
        return {"dp": dataclasses.asdict(self.state), "inner": self.inner.state_dict()}

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        self.state = DpState(**state["dp"])
        self.inner.load_state_dict(state["inner"])


def base_aggregator(cfg: Any) -> Aggregator:
    """``--aggregation``: MAR, or one of the paper's baselines on the same tensors."""
    if cfg.aggregation == "rdfl":
        return AllToAllAveraging()
    if cfg.aggregation == "fedavg":
        return ServerAveraging(server=cfg.num_peers)
    if cfg.aggregation == "gossip":
        from peer_synchronization import last_trained_round

        return GossipAveraging(seed=cfg.seed, peers=cfg.gossip_peers, staleness=cfg.gossip_weighting == "staleness",
                               last_trained=lambda peer, r: last_trained_round(
                                   peer, r, seed=cfg.seed, num_peers=cfg.num_peers, update_percent=cfg.update_percent))
    return MarAveraging()


def make_aggregator(cfg: Any, *, initial_params: Sequence[torch.Tensor], kd_rounds: int) -> Aggregator:
    """The aggregation pipeline for a run configuration: averaging, wrapped by KD or DP as asked (the config
    refuses both at once: distillation would train the shared model on raw data after the DP step)."""
    aggregator = base_aggregator(cfg)
    if cfg.kd:
        aggregator = KnowledgeDistillation(aggregator, KdSettings(
            rounds=kd_rounds, no_blending=cfg.kd_no_blending, use_all=cfg.kd_all_candidates, private=cfg.dp,
            beta=cfg.momentum))
    if cfg.dp:
        from differential_privacy import dp_params_from_config

        aggregator = DifferentialPrivacy(aggregator, dp_params_from_config(cfg), initial_params)
    return aggregator
