"""One round's aggregation pipeline, as small pluggable objects.

An aggregator takes the peer's model and momentum plus the round's participants and leaves them aggregated in
place. Plain MAR averaging is the base; differential privacy wraps an aggregator, knowledge distillation is
another aggregator (both land with their own issue) — never an integer "use case".
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Protocol, Sequence

import torch

from moshpit_all_reduce import MarReport, MarSchedule, MoshpitAverager, moshpit_all_reduce


@dataclass
class AggregationContext:
    averager: MoshpitAverager
    params: Sequence[torch.Tensor]  # the task's trainable tensors
    momentum: Sequence[torch.Tensor]
    participants: Sequence[int]
    round_index: int
    schedule: MarSchedule
    weight: float = 1.0


@dataclass
class AggregationResult:
    report: MarReport
    metrics: Dict[str, Any] = field(default_factory=dict)


class Aggregator(Protocol):
    def aggregate(self, ctx: AggregationContext) -> AggregationResult: ...


class MarAveraging:
    """Plain Moshpit All-Reduce of the trainable parameters and their momentum buffers in one exchange."""

    def aggregate(self, ctx: AggregationContext) -> AggregationResult:
        tensors: List[torch.Tensor] = [p.data for p in ctx.params] + [m for m in ctx.momentum]
        report = moshpit_all_reduce(
            ctx.averager,
            tensors,
            participants=ctx.participants,
            round_index=ctx.round_index,
            schedule=ctx.schedule,
            weight=ctx.weight,
        )
        return AggregationResult(report=report)


def make_aggregator(cfg: Any) -> Aggregator:
    """The aggregation pipeline for a run configuration."""
    return MarAveraging()
