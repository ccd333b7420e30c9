"""Moshpit All-Reduce: deterministic group keys, DHT matchmaking and in-group averaging over libp2p.

Group keys (pure functions)
---------------------------
The ``M`` participants of a round are ordered by peer index. With ``G = min(M // gs, gs ** (gk - 1))``
buckets, participant ``p`` starts in bucket ``p * G // M``; a peer that held rank ``r`` (its position, by peer
index, in the group it just averaged with) moves to bucket ``(b * gs + r) mod G``.

For ``M = gs ** gk`` this *is* the reference's sliding-window grid: a bucket is a ``gk - 1`` digit base-``gs``
number, ``b * gs + r mod G`` drops its leading digit and appends ``r``, so after ``gk`` steps every peer holds the
exact global mean. For any other ``M`` the same two rules apply, with no special case per ``(gs, gk, N)``:
buckets start balanced (sizes differ by at most one) and, because ``G <= M // gs``, no group is smaller than
``gs`` when all are present, so nobody averages alone. What that buys in mixing is measured by
:func:`mixing_error` (README table; e.g. N=125, gs=4, ni=4: max deviation 1.5 % of the initial spread).
When ``M > gs ** gk`` the cap on buckets makes groups larger than ``gs`` (:func:`group_size_warning`).

That is ``--grouping packed`` (the default). ``--grouping reference`` (:class:`ReferenceGrouping`) keys groups on
the *global* peer index among all ``N`` peers, exactly as the published reference: under partial participation
and dropout the absent peers leave holes, so groups can be smaller than ``gs``, down to a peer alone. Both are a
:class:`Grouping` (a first key per peer, the next key from the key and the rank held); :func:`plan_groups`
simulates either, and :func:`moshpit_steps` walks the keys with the ranks a peer actually had.

Why ``AllReduceRunner`` and not ``DecentralizedAverager``
--------------------------------------------------------
hivemind's averager forms random groups through its own leader election in a separate process holding a shared
memory copy of the tensors. MAR needs *deterministic* groups, and every extra process costs memory on nodes that
host dozens of peers. So each peer runs hivemind's butterfly ``AllReduceRunner`` directly in its own process: the
vector is split into one shard per member, each member reduces its shard (reduce-scatter) and returns the
average (all-gather), so every member sends and receives about ``2 (M - 1) / M`` of the vector per step.
"""
from __future__ import annotations

import asyncio
import bisect
import concurrent.futures
import hashlib
import logging
import math
import random
import threading
import time
from dataclasses import dataclass, field
from typing import (
    Any,
    AsyncIterator,
    Awaitable,
    Callable,
    Dict,
    FrozenSet,
    Hashable,
    Iterable,
    List,
    Mapping,
    Optional,
    Protocol,
    Sequence,
    Set,
    Tuple,
)

import numpy as np
import torch
from hivemind.averaging.allreduce import AllReduceRunner
from hivemind.averaging.partition import BannedException, TensorPartReducer
from hivemind.compression import (
    Float16Compression,
    NoCompression,
    Uniform8BitQuantization,
    deserialize_torch_tensor,
    serialize_torch_tensor,
)
from hivemind.p2p import P2PContext, PeerID, ServicerBase
from hivemind.proto import averaging_pb2
from hivemind.utils.asyncio import achain, anext, as_aiter
from hivemind.utils.streaming import combine_from_streaming, split_for_streaming

from peer_synchronization import (
    DIAL_PATIENCE,
    PeerNetwork,
    PlaneError,
    Renewal,
    RepeatedRead,
    TcpPlane,
    dht_poll_pause,
    dht_time,
    frame_bytes,
    parse_endpoint,
    poll_read,
    poll_until,
    publish,
    reachable_host,
)

logger = logging.getLogger("mar_fl.mar")

_FINAL = "final"  # subkey under which a group's leader publishes the agreed member list
_JOIN, _ABORT = 2, 3  # data-plane frame phases of direct matchmaking (0 and 1 are the all-reduce's)


class AveragingError(RuntimeError):
    """An all-reduce could not be run at all (as opposed to a member failing, which is tolerated)."""


class NetworkDown(AveragingError):
    """This peer's own ``p2pd`` is gone: nothing can be averaged any more, so the peer must stop, not go on alone."""


# ==================== group keys (pure) ====================


def num_groups(num_members: int, group_size: int, key_dim: int) -> int:
    """Buckets per MAR step: at least ``gs`` members each, capped by the ``gs ** (gk-1)`` keys of a ``gk`` grid."""
    return max(1, min(num_members // group_size, group_size ** max(0, key_dim - 1)))


def initial_bucket(position: int, num_members: int, n_groups: int) -> int:
    """Contiguous, balanced start: bucket sizes differ by at most one (``p // gs`` on a full grid)."""
    return position * n_groups // num_members


def next_bucket(bucket: int, rank: int, group_size: int, n_groups: int) -> int:
    return (bucket * group_size + rank) % n_groups


def max_group_size(num_members: int, group_size: int, key_dim: int, steps: int) -> int:
    """The largest ``packed`` group in ``steps`` MAR steps when all ``num_members`` take part: ``ceil(M / G)``
    in the first step, sometimes a few more later; above ``gs`` when ``M > gs ** gk`` caps the buckets."""
    return max(len(group) for step in simulate_schedule(num_members, group_size, key_dim, steps)
               for group in step.values())


def key_dim_for(num_members: int, group_size: int) -> int:
    """The smallest ``gk`` with ``gs ** gk >= M``: enough buckets for groups of (about) ``gs``."""
    key_dim = 1
    while group_size**key_dim < num_members:
        key_dim += 1
    return key_dim


def group_size_warning(num_members: int, group_size: int, key_dim: int, steps: int, *, grouping: str = "packed",
                       who: str = "") -> Optional[str]:
    """One line when ``packed`` groups of ``num_members`` outgrow ``--gs`` because ``--gk`` caps the buckets
    (``M > gs ** gk``); else None. The reference grouping never makes groups above ``gs``.

    :param steps: MAR steps per round (``--ni``)
    :param who: how the message names the members (default ``--np M``)
    """
    if grouping != "packed" or num_members <= group_size**key_dim:
        return None
    better = key_dim_for(num_members, group_size)
    size = max_group_size(num_members, group_size, key_dim, steps)
    fixed = max_group_size(num_members, group_size, better, steps)
    keeps = f"keeps them at {group_size}" if fixed == group_size else f"keeps them at {group_size}-{fixed}"
    return (f"warning: {who or f'--np {num_members}'} with --gs {group_size} --gk {key_dim} makes groups of up to "
            f"{size} peers (not {group_size}); --gk {better} {keeps}")


GROUPINGS = ("packed", "reference")


class Grouping(Protocol):
    """How one round's peers find their group in every MAR step: ``start`` gives a peer's first key,
    ``advance`` its next one from the key it held and its rank (position by peer index) in the group it
    actually met. A group is the set of the round's participants holding equal keys."""

    def start(self, peer: int) -> Hashable:
        ...

    def advance(self, key: Hashable, rank: int) -> Hashable:
        ...


@dataclass(frozen=True)
class PackedGrouping:
    """The round's participants re-packed by position into ``G`` balanced buckets (module docstring).

    :param participants: the round's participants, ascending
    """

    participants: Tuple[int, ...]
    group_size: int
    key_dim: int

    @property
    def n_groups(self) -> int:
        return num_groups(len(self.participants), self.group_size, self.key_dim)

    def start(self, peer: int) -> int:
        position = bisect.bisect_left(self.participants, peer)
        if position == len(self.participants) or self.participants[position] != peer:
            raise AveragingError(f"peer {peer} is not among this round's participants")
        return initial_bucket(position, len(self.participants), self.n_groups)

    def advance(self, key: Hashable, rank: int) -> int:
        return next_bucket(key, rank, self.group_size, self.n_groups)


@dataclass(frozen=True)
class ReferenceGrouping:
    """The published reference's keys, on the *global* peer index among all ``num_peers`` peers: whoever does
    not take part leaves a hole, so groups may be smaller than ``gs`` (down to one peer, who averages alone).

    ``N = gs ** gk``: the key is peer ``i``'s ``gk - 1`` leading base-``gs`` digits and slides (drop the first,
    append the rank). Any other ``N``: a bucket ``i // gs`` of ``G = ceil(N / gs)`` and a phase, packed into
    ``gk - 1`` coordinates as the reference did; bucket ``b`` with rank ``r`` moves to ``(b + alpha * r) mod G``
    with ``alpha`` from the reference's schedule (its own choices for N = 125 with gs 4 / gk 3 and gs 3 / gk 4,
    else the smallest odd number co-prime to ``G``).
    """

    num_peers: int
    group_size: int
    key_dim: int

    @property
    def full_grid(self) -> bool:
        return self.num_peers == self.group_size**self.key_dim

    @property
    def n_buckets(self) -> int:
        return -(-self.num_peers // self.group_size)

    def start(self, peer: int) -> Tuple[int, ...]:
        if not 0 <= peer < self.num_peers:
            raise AveragingError(f"peer {peer} is outside 0-{self.num_peers - 1}")
        gs, gk = self.group_size, self.key_dim
        if self.full_grid:
            return tuple(peer // gs ** (gk - 1 - digit) % gs for digit in range(gk - 1))
        return self._pack(peer // gs, 0)

    def advance(self, key: Hashable, rank: int) -> Tuple[int, ...]:
        key = tuple(key)
        if self.full_grid:
            return key[1:] + (rank,)
        phase = key[-1] if self.key_dim - 1 >= 2 else 0
        alphas = self._alphas(phase)
        return self._pack((key[0] + alphas[phase % len(alphas)] * rank) % self.n_buckets, (phase + 1) % len(alphas))

    def _alphas(self, phase: int) -> Tuple[int, ...]:
        special = {(4, 3, 125): (1, 5), (3, 4, 125): (1, 5, 11)}
        alphas = special.get((self.group_size, self.key_dim, self.num_peers))
        if alphas is not None:
            return alphas
        alpha = 2 * phase + 1
        while math.gcd(alpha, self.n_buckets) != 1:
            alpha += 2
        return (alpha,)

    def _pack(self, bucket: int, phase: int) -> Tuple[int, ...]:
        """``[bucket]``, ``[bucket, phase]``, or ``[bucket, 0, ..., 0, phase]`` for ``gk - 1`` = 1, 2, more
        coordinates (``gk = 1`` packs like "more", with no zeros between: the reference's layout)."""
        dims = self.key_dim - 1
        return (bucket,) if dims == 1 else (bucket,) + (0,) * max(0, dims - 2) + (phase,)


def make_grouping(name: str, *, participants: Sequence[int], group_size: int, key_dim: int,
                  num_peers: int) -> Grouping:
    """The ``--grouping`` rule for one round.

    :param participants: the round's participants (peer indices)
    :param num_peers: all peers of the run (``--np``): the reference keys on the global index among them
    """
    if name == "packed":
        return PackedGrouping(tuple(sorted(participants)), group_size, key_dim)
    if name == "reference":
        if num_peers < 1:
            raise ValueError("the reference grouping needs the run's number of peers")
        return ReferenceGrouping(num_peers, group_size, key_dim)
    raise ValueError(f"unknown grouping {name!r}; choose from {', '.join(GROUPINGS)}")


def plan_groups(grouping: Grouping, participants: Sequence[int], steps: int) -> List[Dict[Hashable, List[int]]]:
    """Groups of every step when all ``participants`` are present: ``[{key: [peer indices, ascending]}]``."""
    ordered = sorted(participants)
    keys = {peer: grouping.start(peer) for peer in ordered}
    schedule: List[Dict[Hashable, List[int]]] = []
    for _ in range(steps):
        groups: Dict[Hashable, List[int]] = {}
        for peer in ordered:
            groups.setdefault(keys[peer], []).append(peer)
        schedule.append(groups)
        for key, members in groups.items():
            for rank, peer in enumerate(members):
                keys[peer] = grouping.advance(key, rank)
    return schedule


def group_label(key: Hashable) -> str:
    """A key as it appears in the DHT group key: ``3`` (packed bucket), ``3_0_1`` (reference coordinates)."""
    return "_".join(map(str, key)) if isinstance(key, tuple) else str(key)


def simulate_schedule(num_members: int, group_size: int, key_dim: int, steps: int) -> List[Dict[int, List[int]]]:
    """Packed groups of every step when all ``num_members`` participants are present: ``[{bucket: [positions]}]``."""
    members = tuple(range(num_members))
    return plan_groups(PackedGrouping(members, group_size, key_dim), members, steps)


def mixing_error(values: np.ndarray, group_size: int, key_dim: int, steps: int) -> float:
    """Max absolute deviation from the global mean after simulated MAR (``values``: one row per peer)."""
    state = np.array(values, dtype=np.float64, copy=True)
    for groups in simulate_schedule(len(state), group_size, key_dim, steps):
        for members in groups.values():
            state[members] = state[members].mean(axis=0)
    return float(np.abs(state - np.asarray(values, dtype=np.float64).mean(axis=0)).max())


GOSSIP_SALT = 0x6055  # keeps the gossip ring's random stream apart from the participation draws


def gossip_sources(participants: Sequence[int], *, seed: int, round_index: int, k: int) -> Dict[int, Tuple[int, ...]]:
    """Whom each participant pulls from in a gossip round: the participants on a fresh random ring (drawn from
    ``(seed, round)``, the same on every peer), each pulling from the ``k`` peers after it — so every peer is also
    read by exactly ``k`` others and sends and receives ``k`` models per round."""
    ordered = sorted(participants)
    k = max(0, min(k, len(ordered) - 1))
    rng = np.random.default_rng(np.random.SeedSequence([seed, round_index, GOSSIP_SALT]))
    ring = [ordered[i] for i in rng.permutation(len(ordered))]
    return {ring[p]: tuple(ring[(p + j) % len(ring)] for j in range(1, k + 1)) for p in range(len(ring))}


def gossip_readers(sources: Dict[int, Sequence[int]]) -> Dict[int, Tuple[int, ...]]:
    """The inverse of :func:`gossip_sources`: who pulls from each peer."""
    readers: Dict[int, List[int]] = {peer: [] for peer in sources}
    for peer, pulled in sources.items():
        for source in pulled:
            readers[source].append(peer)
    return {peer: tuple(sorted(who)) for peer, who in readers.items()}


# ==================== wire compression ====================


def _fix_quantization_for_numpy2() -> None:
    """hivemind 1.1.12 reads the 8-bit codebook size with ``int()`` of a one-element array, which numpy 2
    refuses; without this every 8-bit shard fails to decode and silently stays local."""
    from hivemind.compression import quantization

    def extract(self, serialized_tensor):
        buffer = serialized_tensor.buffer
        size = int(np.frombuffer(buffer, count=1, dtype=np.int64)[0])
        codebook = np.frombuffer(buffer, offset=8, count=size, dtype=self.codebook_dtype)
        indices = np.frombuffer(buffer, offset=8 + codebook.nbytes, dtype=self.indices_dtype)
        indices = torch.as_tensor(indices, dtype=torch.int64).reshape(tuple(serialized_tensor.size))
        table = torch.as_tensor(codebook).to(dtype=getattr(torch, serialized_tensor.dtype))
        return table[indices].requires_grad_(serialized_tensor.requires_grad)

    quantization.Quantization.extract = extract


_fix_quantization_for_numpy2()


def make_compression(name: str) -> Any:
    table = {"none": NoCompression, "fp16": Float16Compression, "8bit": Uniform8BitQuantization}
    if name not in table:
        raise ValueError(f"unknown compression {name!r}; choose from {sorted(table)}")
    return table[name]()


# ==================== averaging over libp2p ====================


@dataclass
class StepReport:
    """What one MAR step did, from this peer's point of view."""

    members: Tuple[int, ...]
    rank: int
    bytes_sent: int = 0
    bytes_received: int = 0
    seconds: float = 0.0
    matchmaking_seconds: float = 0.0
    failed_peers: Tuple[int, ...] = ()
    failed: bool = False  # this peer kept (some of) its local values: the step did not average as scheduled
    reason: str = ""
    timed_out: bool = False  # matchmaking ran into its deadline (somebody expected never came)


@dataclass
class _Traffic:
    sent: int = 0
    received: int = 0


def check_part(part: torch.Tensor, *, shape, dtype: torch.dtype) -> Optional[str]:
    """Why a tensor part received from the wire cannot be used (None: it can)."""
    if tuple(part.shape) != tuple(shape):
        return f"shape {tuple(part.shape)} instead of {tuple(shape)}"
    if part.dtype != dtype:
        return f"dtype {part.dtype} instead of {dtype}"
    if not all_finite(part):
        return "non-finite values"
    return None


def all_finite(tensor: torch.Tensor) -> bool:
    """Whether every value is finite, in one pass without a temporary.

    A NaN or an infinity anywhere makes the sum non-finite, so a finite sum settles it; the sum is 1.5-2.4x faster
    than ``aminmax`` on the wire's parts and 25x faster than ``isfinite(t).all()``. A sum that overflowed on
    finite values is told apart by ``aminmax`` (min and max propagate NaN, and an infinity is the min or the max).
    """
    if tensor.numel() == 0 or not tensor.is_floating_point():
        return True
    if math.isfinite(tensor.sum().item()):
        return True
    low, high = torch.aminmax(tensor)
    return math.isfinite(low.item()) and math.isfinite(high.item())


class OrderedReducer(TensorPartReducer):
    """Sums each shard in sender order once all senders are in, so results do not depend on arrival order
    (hivemind adds parts as they arrive, which makes float results differ from run to run).

    Every part is checked before it is summed (shape, dtype, finite values); a sender whose part fails is banned
    for the rest of the exchange. Weights on the wire are ignored: MAR averages with equal weights, known to all.
    """

    def __init__(self, part_shapes, num_senders, *, on_reject: Callable[[int, str], None]):
        super().__init__(part_shapes, num_senders)
        self.on_reject = on_reject

    def reset_accumulators(self):
        self._pending: Dict[int, Tuple[torch.Tensor, float]] = {}
        super().reset_accumulators()

    async def accumulate_part(self, sender_index, part_index, tensor_part, weight=1.0):
        shape = self.part_shapes[part_index] if 0 <= part_index < self.num_parts else None
        problem = "unexpected part" if shape is None else check_part(tensor_part, shape=shape, dtype=torch.float32)
        if problem is not None:
            self.on_reject(sender_index, f"part {part_index}: {problem}")
            raise BannedException(f"sender {sender_index} sent an invalid part: {problem}")
        weight = 1.0
        self.num_parts_received[sender_index] += 1
        while part_index > self.current_part_index:
            finished = asyncio.ensure_future(self.finished.wait())
            try:  # the waiter is cancelled, not left pending (thousands of them were at 125 peers)
                await asyncio.wait({self.current_part_future, finished}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                finished.cancel()
            if self.finished.is_set():
                raise BannedException("reducer finalized")
        if self.sender_failed_after[sender_index] != float("inf"):
            raise BannedException(f"sender {sender_index} was banned in background")
        future = self.current_part_future
        if part_index < self.sender_failed_after[sender_index]:
            self._pending[sender_index] = (tensor_part, weight)
            self.current_part_accumulated_from += 1
            self.check_current_part_finished()
        return await future

    def check_current_part_finished(self):
        if self.current_part_accumulated_from == self.num_current_senders:
            for sender in sorted(self._pending):
                part, weight = self._pending[sender]
                self.accumulator.add_(part, alpha=weight)
                self.denominator += weight
            self._pending = {}
            self.current_part_future.set_result(self.accumulator.div_(max(self.denominator, 1e-30)))
            self.reset_accumulators()

STREAM_LINGER = 5.0  # at most this long an all-reduce stream stays open after its last message
FETCH_ATTEMPTS = 3  # a gather stream cut short is resumed where it ended, this many streams in all


class CountingRunner(AllReduceRunner):
    """Butterfly all-reduce that counts the protobuf bytes it puts on and takes off the wire."""

    def __init__(self, *, traffic: _Traffic, **kwargs):
        super().__init__(**kwargs)
        self.traffic = traffic
        self.rejected: Dict[PeerID, str] = {}  # group-mates whose data failed the checks, and why
        shapes = tuple(part.shape for part in self.parts_for_local_averaging)
        self.tensor_part_reducer.finished.set()  # retire hivemind's reducer quietly (its finalizer warns)
        self.tensor_part_reducer = OrderedReducer(
            shapes, len(self.sender_peer_ids),
            on_reject=lambda sender, why: self.rejected.setdefault(self.sender_peer_ids[sender], why))
        container = self.tensor_part_container
        self._expected_parts = [[(part.shape, part.dtype) for part, _ in parts]
                                for parts in container._input_parts_by_peer]
        self._register_unchecked = container.register_processed_part
        container.register_processed_part = self._register_checked
        # groupmates still downloading our shard's average when our own result is complete; a banned
        # (dead or silent) sender will never come, so it counts as served
        own_parts = self.tensor_part_container.num_parts_by_peer[self.ordered_peer_ids.index(self.peer_id)]
        self._to_serve = {p for p in self.sender_peer_ids if p != self.peer_id} if own_parts else set()
        self.all_served = asyncio.Event()
        self._check_served()

    def _register_checked(self, peer_index: int, part_index: int, part: torch.Tensor) -> None:
        """A reducer's averaged shard must match what we sent it; otherwise our values for it stay local."""
        expected = self._expected_parts[peer_index]
        problem = "unexpected part" if part_index >= len(expected) else \
            check_part(part, shape=expected[part_index][0], dtype=expected[part_index][1])
        if problem is not None:
            self.rejected.setdefault(self.ordered_peer_ids[peer_index], f"averaged part {part_index}: {problem}")
            raise AveragingError(f"reducer {peer_index} returned an invalid part {part_index}: {problem}")
        self._register_unchecked(peer_index, part_index, part)

    async def _communicate_with_peer(self, peer_id):
        if peer_id != self.peer_id:
            return await super()._communicate_with_peer(peer_id)
        try:
            await super()._communicate_with_peer(peer_id)
        except BannedException as e:
            # our own part failed the checks (e.g. a diverged model's non-finite values): leave it out of the shard
            # we reduce, so that group-mates still get their average without waiting for us, and keep our values
            logger.warning("own values left out of the exchange: %s", e)
            await self._ban_sender(self.peer_id)
            self.tensor_part_container.register_failed_reducer(self.ordered_peer_ids.index(self.peer_id))

    def _check_served(self) -> None:
        if not self._to_serve - self.banned_senders:
            self.all_served.set()

    async def _ban_sender(self, peer_id):
        await super()._ban_sender(peer_id)
        self._check_served()

    async def _generate_input_for_peer(self, peer_index: int):
        async for msg in super()._generate_input_for_peer(peer_index):
            self.traffic.sent += msg.ByteSize()
            yield msg

    def _get_peer_stub(self, peer):
        stub = super()._get_peer_stub(peer)
        traffic = self.traffic
        expected = self.tensor_part_container.num_parts_by_peer[self.ordered_peer_ids.index(peer)]

        class _CountingStub:
            async def rpc_aggregate_part(self, inputs):
                stream = await stub.rpc_aggregate_part(inputs)

                async def counted():
                    # stop reading after the last expected part instead of waiting for the reducer to close: the
                    # reader, not the writer, ends the stream, so no part still in flight is cut off by a close
                    received = 0
                    try:
                        async for msg in stream:
                            traffic.received += msg.ByteSize()
                            yield msg
                            received += 1
                            if received >= expected > 0:
                                break
                    finally:
                        await stream.aclose()

                return counted()

        return _CountingStub()

    async def rpc_aggregate_part(self, stream, context):
        async def counted_in():
            async for msg in stream:
                self.traffic.received += msg.ByteSize()
                yield msg

        try:
            async for msg in super().rpc_aggregate_part(counted_in(), context):
                self.traffic.sent += msg.ByteSize()
                yield msg
        finally:
            self._to_serve.discard(context.remote_id)
            self._check_served()
        # the stream closes when this handler returns: keep it open until the group-mate, which stops reading
        # after its last part, closes it (a close right after the last part could cut it off on a slow link)
        await asyncio.sleep(STREAM_LINGER)


@dataclass
class SharedTensors:
    """This peer's serialized tensors offered to some peers under one group id (all-gather, RDFL, gossip).

    :param chunks: the serialized tensors, streamed as they are
    :param traffic: where the bytes served are counted
    :param readers: peer ids allowed to fetch them; each is crossed off ``pending`` once served
    """

    chunks: List[Any]
    traffic: _Traffic
    readers: FrozenSet[bytes]
    pending: Set[bytes] = field(default_factory=set)
    served: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self):
        self.pending = set(self.readers)
        self._check()

    def mark_served(self, peer_id: bytes) -> None:
        self.pending.discard(peer_id)
        self._check()

    def _check(self) -> None:
        if not self.pending:
            self.served.set()


class Snapshot:
    """A peer's newest aggregated tensors, kept for a restarted peer to fetch (``rpc_snapshot``): copied every round
    into the same buffers, serialized only when a member asks. Serializing every round cost each peer ≈ 10 ms of
    CPU, all peers at the same moment (64 peers: a third of a second of both cores). A lock keeps a fetch from
    reading a copy half-way through the next round's."""

    def __init__(self):
        self._lock = threading.Lock()
        self._round: Optional[int] = None
        self._tensors: List[torch.Tensor] = []

    def keep(self, round_index: int, tensors: Sequence[torch.Tensor]) -> None:
        """Copy ``tensors`` (this round's aggregated values) as the snapshot of ``round_index``."""
        with self._lock:
            if [(t.shape, t.dtype) for t in self._tensors] != [(t.shape, t.dtype) for t in tensors]:
                self._tensors = [torch.empty(t.shape, dtype=t.dtype) for t in tensors]
            for kept, tensor in zip(self._tensors, tensors):
                kept.copy_(tensor.detach())
            self._round = round_index

    def chunks(self) -> Optional[Tuple[int, List[Any]]]:
        """``(round, serialized chunks)`` of the snapshot; None before the first round."""
        with self._lock:
            if self._round is None:
                return None
            return self._round, [chunk for tensor in self._tensors for chunk in split_for_streaming(
                serialize_torch_tensor(tensor, NoCompression().compression_type))]


class MoshpitServicer(ServicerBase):
    """Routes incoming all-reduce / all-gather streams to the group they belong to (keyed by group id)."""

    def __init__(self):
        self.runners: Dict[bytes, CountingRunner] = {}
        self.shared: Dict[bytes, SharedTensors] = {}
        self.registered = asyncio.Condition()
        self.wait_timeout = 30.0
        self.snapshot = Snapshot()  # the newest aggregated tensors, for peers that rejoin
        self.is_member: Callable[[PeerID], Awaitable[bool]] = _nobody

    async def _lookup(self, table: Dict[bytes, Any], group_id: bytes) -> Optional[Any]:
        # a groupmate may reach us before we read the final member list ourselves: wait a little for it
        async with self.registered:
            try:
                await asyncio.wait_for(
                    self.registered.wait_for(lambda: group_id in table), timeout=self.wait_timeout
                )
            except asyncio.TimeoutError:
                return None
        return table.get(group_id)

    async def register(self, table: Dict[bytes, Any], group_id: bytes, value: Any) -> None:
        async with self.registered:
            table[group_id] = value
            self.registered.notify_all()

    async def rpc_aggregate_part(
        self, stream: AsyncIterator[averaging_pb2.AveragingData], context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        request = await anext(stream)
        runner = await self._lookup(self.runners, request.group_id)
        if runner is None:
            yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
            return
        if context.remote_id not in runner.sender_peer_ids:  # only the group's members may send it parts
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        async for msg in runner.rpc_aggregate_part(achain(as_aiter(request), stream), context):
            yield msg

    async def rpc_gather(
        self, request: averaging_pb2.AveragingData, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        entry = await self._lookup(self.shared, request.group_id)
        if entry is None:
            yield averaging_pb2.AveragingData(code=averaging_pb2.BAD_GROUP_ID)
            return
        reader = context.remote_id.to_bytes()
        if reader not in entry.readers:  # our model goes to group-mates only
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        start = resume_point(request, len(entry.chunks))
        if start is None:
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        entry.traffic.received += request.ByteSize()
        for chunk in entry.chunks[start:]:
            msg = averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=chunk)
            entry.traffic.sent += msg.ByteSize()
            yield msg
        # the stream closes when this handler returns, and a close right after the last chunk could cut its
        # tail off (the reader then saw a short stream, as if complete): the reader, who knows when it has every
        # chunk, closes it first (this wait is then cancelled). Only then is it served: marked earlier, our offer
        # could be withdrawn before a reader whose tail was cut asked for the rest (it was, in CI)
        try:
            await asyncio.sleep(STREAM_LINGER)
        finally:
            entry.mark_served(reader)

    async def rpc_snapshot(
        self, request: averaging_pb2.AveragingData, context: P2PContext
    ) -> AsyncIterator[averaging_pb2.AveragingData]:
        """The newest aggregated model, for a member of the run (its address record is authenticated)."""
        snapshot = await self.is_member(context.remote_id) and self.snapshot.chunks()
        if not snapshot:
            yield averaging_pb2.AveragingData(code=averaging_pb2.PROTOCOL_VIOLATION)
            return
        round_index, chunks = snapshot
        for position, chunk in enumerate(chunks):
            yield averaging_pb2.AveragingData(code=averaging_pb2.AVERAGED_PART, tensor_part=chunk,
                                              group_id=str(round_index).encode() if position == 0 else b"")


def resume_point(request: averaging_pb2.AveragingData, total: int) -> Optional[int]:
    """The chunk a gather request asks to start from (its ``weight``: 0, or where a cut stream ended);
    None if that is not a whole number in ``[0, total]``."""
    start = request.weight
    if not math.isfinite(start) or start != int(start) or not 0 <= start <= total:
        return None
    return int(start)


async def _nobody(peer_id: PeerID) -> bool:
    return False


@dataclass(frozen=True)
class AveragerOptions:
    prefix: str  # run-scoped, so that two runs sharing one DHT never meet
    index: int
    compression: str = "none"
    matchmaking_timeout: float = 60.0  # how long a group waits for missing members before going ahead
    allreduce_timeout: float = 30.0  # a member silent this long is dropped from the exchange
    dht_ttl: float = 600.0
    num_peers: int = 1 << 20  # indices on the wire must lie below this
    heartbeat_interval: float = 5.0  # how often a peer renews its liveness record (it expires after 4 intervals)
    part_size_bytes: int = 2**21  # all-reduce messages carry at most this many bytes of a shard (hivemind: 2**19)
    transport: str = "libp2p"  # MAR's averaging steps: "libp2p" (hivemind streams) or "tcp" (:class:`TcpPlane`)


MAX_PEER_ID_BYTES = 64
ENDPOINT_RETRY = 3.0  # a data-plane endpoint that could not be stored is stored again this soon (doubling each time)
HEARTBEAT_SECONDS_PER_PEER = 0.25  # every beat is a DHT store on the same few nodes: N peers beat every 0.25 N s


def heartbeat_interval_for(num_peers: int) -> float:
    """Seconds between two liveness records of a peer in a run of ``num_peers``: 5 s up to 20 peers, then
    growing so that the whole run stores about 4 beats a second (64 peers at 5 s: 13 DHT stores a second on the
    nodes nearest the key, ≈ a quarter of both cores with their p2pds). A peer that misses a group is presumed gone
    only if its newest beat is older than the miss, so a longer interval does not make dead peers look alive."""
    return max(5.0, HEARTBEAT_SECONDS_PER_PEER * num_peers)


def parse_index(text: Any, num_peers: int) -> Optional[int]:
    """A peer index from the wire: ASCII digits only (no signs, spaces or other scripts' digits), in range."""
    if isinstance(text, str) and 0 < len(text) <= 10 and text.isascii() and text.isdigit():
        value = int(text)
        return value if value < num_peers else None
    return None


def _peer_id_bytes(value: Any) -> Optional[bytes]:
    return bytes(value) if isinstance(value, (bytes, bytearray)) and 0 < len(value) <= MAX_PEER_ID_BYTES else None


def parse_declarations(record: Dict[str, Any], num_peers: int) -> Dict[int, bytes]:
    """``{index: peer id}`` of a group key's well-formed declarations (anything else is ignored)."""
    declared: Dict[int, bytes] = {}
    for subkey, value in record.items():
        index, peer_id = parse_index(subkey, num_peers), _peer_id_bytes(value)
        if index is not None and peer_id is not None:
            declared[index] = peer_id
    return declared


def parse_final(value: Any, num_peers: int) -> Optional[List["_Member"]]:
    """A leader's final member list: ``[[index, peer id], ...]``, indices ascending and in range; else None."""
    if not isinstance(value, (list, tuple)) or not 0 < len(value) <= min(num_peers, 4096):
        return None
    members = []
    for item in value:
        if not (isinstance(item, (list, tuple)) and len(item) == 2 and type(item[0]) is int):
            return None
        peer_id = _peer_id_bytes(item[1])
        if peer_id is None or not 0 <= item[0] < num_peers or (members and item[0] <= members[-1].index):
            return None
        members.append(_Member(item[0], peer_id))
    return members


@dataclass(frozen=True)
class Heartbeat:
    time: float
    round: int
    peer_id: bytes

    @staticmethod
    def parse(value: Any) -> Optional["Heartbeat"]:
        if not (isinstance(value, (list, tuple)) and len(value) == 3):
            return None
        beat_time, round_index, peer_id = value
        if not (isinstance(beat_time, float) and math.isfinite(beat_time) and type(round_index) is int
                and round_index >= 0 and _peer_id_bytes(peer_id) is not None):
            return None
        return Heartbeat(beat_time, round_index, bytes(peer_id))


class Liveness:
    """Which peers this peer still waits for: those that missed a group are presumed gone until their liveness
    record (renewed every few seconds by every running peer, expiring on its own) is newer than the miss."""

    def __init__(self):
        self.missed: Dict[int, float] = {}  # index -> DHT time at which it missed a group
        self.heartbeats: Dict[int, float] = {}  # index -> DHT time of its newest liveness record

    def presumed_gone(self, index: int) -> bool:
        missed = self.missed.get(index)
        return missed is not None and self.heartbeats.get(index, -math.inf) <= missed

    def observe(self, *, expected: FrozenSet[int], present: Set[int]) -> None:
        from peer_synchronization import dht_time

        now = dht_time()
        for index in expected - present:
            self.missed.setdefault(index, now)
        for index in present:
            self.missed.pop(index, None)

    def update(self, heartbeats: Dict[int, float]) -> None:
        self.heartbeats = heartbeats
        for index, beat in heartbeats.items():
            if index in self.missed and beat > self.missed[index]:
                del self.missed[index]


@dataclass
class _Member:
    index: int
    peer_id: bytes


# an in-group exchange: (key, members, traffic) → (lost members, why the step failed or "", payload)
Exchange = Callable[[str, Sequence["_Member"], _Traffic], Awaitable[Tuple[Tuple[int, ...], str, Any]]]


class MoshpitAverager:
    """Runs MAR steps for one peer: matchmaking through the DHT, butterfly all-reduce or all-gather over libp2p."""

    def __init__(self, network: PeerNetwork, options: AveragerOptions):
        self.network, self.options = network, options
        self.compression = make_compression(options.compression)
        self._runner_cls = CountingRunner
        self._servicer_cls = MoshpitServicer
        self.liveness = Liveness()
        self.excluded: Set[int] = set()  # group-mates left out for the rest of this round (sent bad data, went silent)
        self._round: Optional[int] = None
        self._timed_out = False
        self._patience_until = -math.inf  # until when steps wait longer for group-mates (:meth:`wait_for_stragglers`)
        self._prefetch: Optional[concurrent.futures.Future] = None  # a background read of data-plane endpoints
        self._alive_reader: Optional[RepeatedRead] = None  # the heartbeats, read from their key's nodes
        self.start_stages: Dict[str, float] = {}  # seconds each step of the start took (handlers, plane)
        stage = time.monotonic()
        self.servicer = network.run(self._make_servicer(), timeout=60)
        self.start_stages["handlers"] = time.monotonic() - stage
        self.plane: Optional[TcpPlane] = None
        self._endpoint: Optional[List[Any]] = None  # [host, port] of our data plane, renewed every dht_ttl / 4
        self._endpoint_renewal = dht_time() + options.dht_ttl / 4
        self._endpoints: Dict[int, Tuple[str, int]] = {}  # group-mates' data-plane endpoints, as read
        if options.transport == "tcp":
            stage = time.monotonic()
            network.run(self._start_plane(), timeout=60)
            self.start_stages["plane"] = time.monotonic() - stage
        self._heartbeat = network.run(self._start_heartbeat(), timeout=30)

    async def _make_servicer(self):
        servicer = self._servicer_cls()
        servicer.wait_timeout = self.options.matchmaking_timeout
        servicer.is_member = self.network.is_member
        await servicer.add_p2p_handlers(self.network.p2p, namespace=self.options.prefix)
        return servicer

    # ---------- liveness ----------

    def _alive_key(self) -> str:
        return f"{self.options.prefix}.alive"

    async def _start_heartbeat(self) -> asyncio.Task:
        endpoint, alive = Renewal(self.network.dht, self._endpoint_key()), Renewal(self.network.dht, self._alive_key())

        async def beat_forever():
            retry = ENDPOINT_RETRY
            while True:
                pause = self.options.heartbeat_interval
                try:
                    if self._endpoint is not None and dht_time() >= self._endpoint_renewal:
                        if await self.network.store_shared(self._endpoint_key(), str(self.options.index),
                                                           self._endpoint, ttl=self.options.dht_ttl, renewal=endpoint):
                            self._endpoint_renewal, retry = dht_time() + self.options.dht_ttl / 4, ENDPOINT_RETRY
                        else:  # no node took it: tried again soon, but with backoff (the start barrier carried
                            # it to the peers there; 125 peers retrying every 3 s kept the initial peer overloaded)
                            logger.debug("data-plane endpoint not stored; again in %.0f s", retry)
                            self._endpoint_renewal, pause = dht_time() + retry, min(pause, retry)
                            retry = min(2 * retry, self.options.dht_ttl / 4)
                    beat = [dht_time(), self._round or 0, self.network.p2p.peer_id.to_bytes()]
                    await alive.store(str(self.options.index), beat, ttl=4 * self.options.heartbeat_interval)
                except Exception as e:  # noqa: BLE001 - the next beat retries
                    logger.debug("heartbeat failed: %r", e)
                    pause = min(pause, ENDPOINT_RETRY)
                await asyncio.sleep(pause)

        return asyncio.create_task(beat_forever())

    def begin_round(self, round_index: int) -> None:
        """Once per round: forgive last round's offenders and, if somebody is presumed gone, read who is alive
        (one DHT read; heartbeats only matter for peers that missed a group)."""
        if self._round == round_index:
            return
        self._round, self.excluded = round_index, set()
        if not self.liveness.missed:
            return
        try:
            beats = self.read_heartbeats()
        except Exception as e:  # noqa: BLE001 - without fresh heartbeats we keep the old view
            logger.warning("liveness read failed: %r", e)
            return
        self.liveness.update({index: beat.time for index, beat in beats.items()})

    def wait_for_stragglers(self, seconds: float) -> None:
        """For the next ``seconds`` the steps' matchmaking waits for group-mates beyond ``--matchmaking-timeout``
        (call it after a round's training). On a loaded host the same training takes some peers 3x as long as
        others (125 peers on 2 cores: 38-123 s); a group that stopped waiting after ``--matchmaking-timeout`` left
        its late members alone, and the groups of the round's later steps then waited for members still held up
        in an earlier one. The seconds are one budget for all the round's steps, not a wait per step: a
        straggler that trained last is late by the same amount in every step, and with a wait per step a group
        held up in step 1 held its members' groups up again in steps 2 and 3 (125 peers: a third of them took
        3.5x the round). A peer presumed gone is still not waited for, so a dead peer costs this once."""
        self._patience_until = time.monotonic() + max(0.0, seconds)

    def _patience(self) -> float:
        """Seconds left of the budget set by :meth:`wait_for_stragglers`."""
        return max(0.0, self._patience_until - time.monotonic())

    def prefetch_endpoints(self, peers: Iterable[int], *, within: float) -> None:
        """Read the data-plane endpoints of ``peers`` not known yet, in the background, trying for up to
        ``within`` seconds (call it before a round's training). At 125 peers, all reading the endpoint record
        only when round 1's first groups met, the reads timed out and hundreds of dials found no endpoint."""
        if self.plane is None or (self._prefetch is not None and not self._prefetch.done()):
            return
        wanted = {p for p in peers if p != self.options.index} - self._endpoints.keys()
        if wanted:
            self._prefetch = asyncio.run_coroutine_threadsafe(self._read_endpoints(wanted, within), self.network.loop)

    async def _read_endpoints(self, wanted: Set[int], within: float) -> None:
        deadline = time.monotonic() + within
        await asyncio.sleep(random.Random().uniform(0, min(ENDPOINT_RETRY, within)))  # spread the peers' reads
        while True:
            try:
                self._learn_endpoints(await self.network.read_shared(self._endpoint_key()))
            except Exception as e:  # noqa: BLE001 - a group-mate's endpoint is read again when it is dialled
                logger.debug("endpoint prefetch: %r", e)
            if wanted <= self._endpoints.keys() or time.monotonic() + ENDPOINT_RETRY >= deadline:
                return
            await asyncio.sleep(ENDPOINT_RETRY)

    def _learn_endpoints(self, record: Mapping[Any, Any]) -> None:
        for subkey, value in record.items():
            index, endpoint = parse_index(subkey, self.options.num_peers), parse_endpoint(value)
            if index is not None and endpoint is not None and index != self.options.index:
                self._endpoints[index] = endpoint

    @property
    def endpoint_card(self) -> Optional[List[Any]]:
        """Our data-plane endpoint ``[host, port]`` (None without a data plane), for the start barrier to carry."""
        return self._endpoint

    def learn_endpoints(self, cards: Mapping[int, Any]) -> None:
        """Take group-mates' data-plane endpoints from the cards the start barrier carried (each parsed strictly).
        Read from the DHT instead, at 125 peers on two cores, some peers could not read some group-mates'
        endpoints for minutes, and every group with such a member failed to meet directly."""
        self._learn_endpoints({str(index): card for index, card in cards.items()})

    def read_heartbeats(self) -> Dict[int, "Heartbeat"]:
        """The unexpired liveness records: who runs, at which round, under which peer id."""
        if self._alive_reader is None:
            self._alive_reader = RepeatedRead(self.network.dht, self._alive_key())
        record = self.network.run(self._alive_reader.read(timeout=25), timeout=30)
        beats = {}
        for subkey, value in record.items():
            index, beat = parse_index(subkey, self.options.num_peers), Heartbeat.parse(value)
            if index is not None and beat is not None:
                beats[index] = beat
        return beats

    # ---------- the cluster data plane (--transport tcp) ----------

    def _endpoint_key(self) -> str:
        return f"{self.options.prefix}.tcp"

    async def _start_plane(self) -> None:
        """Listen for group-mates' data-plane connections and publish where (an authenticated record)."""
        secret = self.network.options.run_secret
        if secret is None:
            raise ValueError("--transport tcp needs the run secret (it authenticates every connection)")
        opts = self.network.options
        self.plane = TcpPlane(index=self.options.index, secret=secret, host=opts.host,
                              num_peers=self.options.num_peers)
        port = await self.plane.start()
        self._endpoint = [reachable_host(opts.host, opts.announce_host, await self.network.advertised()), port]
        # published by the first heartbeat, not here: on a loaded DHT (125 peers starting on 2 cores) one store
        # could outlast the start-up step, and group-mates read endpoints with patience anyway
        self._endpoint_renewal = dht_time()

    async def _connect(self, peers: Sequence[int]) -> Set[int]:
        """Open data-plane connections to ``peers`` (their endpoints read with backoff, bounded); returns those
        that could not be reached."""
        plane, deadline, delay = self.plane, time.monotonic() + DIAL_PATIENCE, 0.05
        missing = {p for p in peers if not plane.connected(p)}
        refused: Set[int] = set()
        while missing:
            if not missing <= self._endpoints.keys():  # endpoints do not move: read again only for new peers
                self._learn_endpoints(await self.network.read_shared(self._endpoint_key(),
                                                                     timeout=max(0.1, deadline - time.monotonic())))
            dialled = [p for p in missing if p in self._endpoints]
            outcomes = await asyncio.gather(*(plane.connect(p, *self._endpoints[p]) for p in dialled),
                                            return_exceptions=True)
            for peer, error in zip(dialled, outcomes):
                if isinstance(error, BaseException):
                    logger.debug("data plane: %r", error)
                    refused.add(peer)
                    self._endpoints.pop(peer, None)  # maybe restarted elsewhere: its record is read again
            missing = {p for p in missing if not plane.connected(p)}
            if not missing or time.monotonic() + delay >= deadline:
                break
            await asyncio.sleep(delay)
            delay = min(2 * delay, 1.0)
        for peer in missing:
            logger.warning("data plane: peer %d unreachable (%s)", peer,
                           "its dial failed" if peer in refused else "its endpoint unknown")
        return missing

    async def _join_directly(self, key: str, expected: FrozenSet[int], deadline: float,
                             traffic: _Traffic) -> Optional[List[_Member]]:
        """Meet a planned group on the data plane, without the DHT; None: meet through the DHT.

        The group we expect is ``expected`` less the members we presume gone or left out this round (they sent
        bad data or went silent). Every member sends every other it expects a JOIN frame carrying a digest of
        that member set (an empty one when somebody it expects cannot be dialled: it will use the DHT). When the
        JOINs of all of them arrive before ``deadline`` and carry our digest, the group is that set for all of
        them. Otherwise we send ABORT frames (so a straggler that finds all our JOINs later does not go ahead
        alone with us) and fall back to the DHT, where the leader's list is final.
        """
        me, plane = self.options.index, self.plane
        gone = {i for i in expected - {me} if self.liveness.presumed_gone(i)}
        left_out = gone | self.excluded.intersection(expected - {me})
        members = expected - left_out
        others = sorted(members - {me})
        if not others:
            return None
        join_id = hashlib.sha256(b"join" + key.encode()).digest()[:20]
        view = hashlib.sha256(repr(sorted(members)).encode()).digest()
        # a peer left out is not dialled (a gone peer's stale endpoint would refuse dials for DIAL_PATIENCE)
        unreachable = await self._connect(others)
        joined, aborted = [], False
        try:
            for i in others:
                if i not in unreachable:
                    traffic.sent += await plane.send(i, join_id, _JOIN, b"" if unreachable else view)
            if not unreachable:
                joined, aborted = await self._await_joins(others, join_id, view, deadline)
                traffic.received += sum(frame_bytes(len(j)) for j in joined if isinstance(j, np.ndarray))
        except PlaneError as e:
            logger.debug("group %s: direct join failed: %r", key, e)
        complete = len(joined) == len(others) and all(isinstance(j, np.ndarray) and j.tobytes() == view for j in joined)
        if complete and not aborted and not any(plane.has_frame(i, join_id, _ABORT) for i in others):
            plane.forget(join_id)  # frames of this join that come later (a straggler's) are dropped unread
            self._timed_out = False
            self.liveness.observe(expected=members, present=set(members))
            return [_Member(i, b"") for i in sorted(members)]
        logger.debug("group %s: no direct join (left out %s, unreachable %s, JOINs from %s, with our view from %s)",
                     key, sorted(left_out), sorted(unreachable),
                     [i for i, j in zip(others, joined) if isinstance(j, np.ndarray)],
                     [i for i, j in zip(others, joined) if isinstance(j, np.ndarray) and j.tobytes() == view])
        sent = await asyncio.gather(*(plane.send(i, join_id, _ABORT, b"") for i in others if plane.connected(i)),
                                    return_exceptions=True)
        traffic.sent += sum(n for n in sent if isinstance(n, int))
        plane.forget(join_id)
        return None

    async def _await_joins(self, others: Sequence[int], join_id: bytes, view: bytes,
                           deadline: float) -> Tuple[List[Any], bool]:
        """The JOIN frames of ``others`` (each a frame, or the exception that ended its wait) and whether one of
        them sent ABORT. Waited for until ``deadline``, but no longer than it takes one member to send ABORT or a
        view other than ``view``: the join cannot complete then, and who still waited for a member that had left
        for the DHT waited out its whole straggler patience (at 125 peers, two peers held every group after
        theirs for minutes)."""
        def wait_for(i: int, phase: int) -> asyncio.Future:
            return asyncio.ensure_future(self.plane.receive(i, join_id, phase, timeout=deadline - time.monotonic()))

        def arrived(future: asyncio.Future) -> bool:
            return future.done() and not future.cancelled() and future.exception() is None

        joins, aborts = {i: wait_for(i, _JOIN) for i in others}, [wait_for(i, _ABORT) for i in others]
        pending = set(joins.values()) | set(aborts)
        try:
            while not all(f.done() for f in joins.values()):
                _, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                if any(arrived(f) for f in aborts) or any(
                        arrived(f) and f.result().tobytes() != view for f in joins.values()):
                    break
        finally:
            for future in list(joins.values()) + aborts:
                future.cancel()
        joined = [(f.exception() or f.result()) if f.done() and not f.cancelled() else PlaneError("not waited for")
                  for f in joins.values()]
        return joined, any(arrived(f) for f in aborts)

    async def _tcp_allreduce(self, key, members, flat: torch.Tensor, traffic) -> Tuple[Tuple[int, ...], int]:
        """Butterfly all-reduce over :class:`TcpPlane`: the same algorithm and checks as :meth:`_allreduce`.

        The flat vector is cut into one shard per member (in index order). Phase 0: each member sends shard
        ``j`` to member ``j`` and receives its own shard from everyone; it sums the valid ones in index order
        and divides by their count. Phase 1: it returns that average to every member and receives theirs. A
        group-mate that is unreachable, silent past the deadline or sends a part of the wrong size or with
        non-finite values is left out (and reported); a shard whose average never came keeps local values.
        A member whose own values are not finite sends empty parts (it withdraws) and keeps its values.
        """
        me, plane = self.options.index, self.plane
        group_id = self._group_id(key, members)
        order = [m.index for m in members]
        lost: Set[int] = await self._connect([i for i in order if i != me])
        plane.allow_frames(flat.numel() * 4)
        cuts = [flat.numel() * k // len(order) for k in range(len(order) + 1)]
        shard = {i: flat[cuts[k]:cuts[k + 1]] for k, i in enumerate(order)}
        own_ok = all_finite(flat)
        empty = torch.empty(0, dtype=torch.float32)
        started, timeout = time.monotonic(), self.options.allreduce_timeout

        async def send(peer: int, phase: int, values: torch.Tensor) -> None:
            try:
                sent = await plane.send(peer, group_id, phase, values.numpy())
                traffic.sent += sent  # not `+= await`: that reads the count before the await, losing concurrent sends
            except PlaneError as e:
                logger.warning("group %s: sending to peer %d failed: %r", key, peer, e)
                lost.add(peer)

        async def receive(peer: int, phase: int, size: int, until: float) -> Optional[torch.Tensor]:
            try:
                payload = await plane.receive(peer, group_id, phase, timeout=until - time.monotonic())
            except (PlaneError, asyncio.TimeoutError) as e:
                logger.warning("group %s: nothing from peer %d (phase %d): %r", key, peer, phase, e)
                lost.add(peer)
                return None
            traffic.received += frame_bytes(len(payload))
            if len(payload) == 0:
                return None  # the peer withdrew its values (phase 0) or had nothing to average (phase 1)
            part = torch.from_numpy(payload.view(np.float32)) if len(payload) % 4 == 0 else None
            problem = f"{len(payload)} bytes" if part is None else check_part(part, shape=(size,), dtype=torch.float32)
            if problem is not None:
                logger.warning("group %s: rejected data from peer %s: %s", key, peer, problem)
                lost.add(peer)
                return None
            return part

        try:
            others = [i for i in order if i != me and i not in lost]
            mine = shard[me].numel()
            _, received = await asyncio.gather(
                asyncio.gather(*(send(i, 0, shard[i] if own_ok else empty) for i in others)),
                asyncio.gather(*(receive(i, 0, mine, started + timeout) for i in others)))
            parts = dict(zip(others, received))
            if own_ok:
                parts[me] = shard[me]
            valid = [parts[i] for i in order if parts.get(i) is not None]
            average = valid[0].clone() if valid else empty
            for part in valid[1:]:  # index order: the same float sum on every run
                average.add_(part)
            average.div_(max(len(valid), 1))
            others = [i for i in others if i not in lost]
            _, returned = await asyncio.gather(
                asyncio.gather(*(send(i, 1, average) for i in others)),
                asyncio.gather(*(receive(i, 1, shard[i].numel(), started + 2 * timeout) for i in others)))
        finally:
            plane.forget(group_id)
        if not own_ok:
            logger.warning("own values left out of the exchange: non-finite values")
            return tuple(sorted(lost)), flat.numel()
        averaged = {peer: values for peer, values in zip(others, returned) if values is not None}
        kept = 0
        for peer in order:  # a group-mate dropped in either phase leaves its shard with our local values
            if peer in averaged:
                shard[peer].copy_(averaged[peer])
            elif peer != me:
                kept += shard[peer].numel()
        if valid:
            shard[me].copy_(average)
        else:
            kept += shard[me].numel()
        return tuple(sorted(lost)), kept

    # ---------- rejoining after a restart ----------

    def share_snapshot(self, round_index: int, tensors: Sequence[torch.Tensor]) -> None:
        """Keep a copy of this round's aggregated tensors for a restarted peer to fetch (:class:`Snapshot`)."""
        self.servicer.snapshot.keep(round_index, tensors)

    def fetch_snapshot(self, like: Sequence[torch.Tensor]) -> Optional[Tuple[int, List[torch.Tensor]]]:
        """The newest aggregated tensors of a live peer: ``(round, tensors)``, checked against ``like``."""
        beats = self.read_heartbeats()
        donors = sorted((b.round, i) for i, b in beats.items() if i != self.options.index and b.round > 0)
        for round_index, index in reversed(donors):
            try:
                got = self.network.run(self._fetch_snapshot(beats[index].peer_id), timeout=self._step_timeout())
            except Exception as e:  # noqa: BLE001 - try the next live peer
                logger.warning("snapshot from peer %d failed: %r", index, e)
                continue
            if got is not None and len(got[1]) == len(like) and all(
                    check_part(t, shape=o.shape, dtype=o.dtype) is None for t, o in zip(got[1], like)):
                return got
            logger.warning("peer %d sent an unusable snapshot", index)
        return None

    async def _fetch_snapshot(self, peer_id: bytes) -> Optional[Tuple[int, List[torch.Tensor]]]:
        stub = self._servicer_cls.get_stub(self.network.p2p, PeerID(peer_id), namespace=self.options.prefix)
        parts, round_index = [], None
        async for msg in await stub.rpc_snapshot(averaging_pb2.AveragingData()):
            if msg.code != averaging_pb2.AVERAGED_PART:
                return None
            if round_index is None:
                round_index = parse_index(msg.group_id.decode("ascii", "replace"), 1 << 40)
            parts.append(msg.tensor_part)
        if round_index is None:
            return None
        return round_index, [deserialize_torch_tensor(t) for t in _regroup(parts, combine_from_streaming)]

    # ---------- matchmaking ----------

    def group_key(self, *, round_index: int, step: int, bucket: Hashable, tag: str = "avg") -> str:
        """The DHT key of one group: ``bucket`` is its grouping key (``g3`` packed, ``g3_0_1`` reference)."""
        return f"{self.options.prefix}.{tag}.r{round_index}.s{step}.g{group_label(bucket)}"

    async def _form_group(self, key: str, expected: FrozenSet[int], deadline: float) -> List[_Member]:
        """Declare ourselves under ``key``; the lowest declared index publishes the final list, all obey it.

        The leader waits until every expected member that is not presumed gone declared, or the deadline passed.
        A member missing from the final list (it came too late) averages alone this step, which keeps groups
        symmetric. Expected members that did not make it are presumed gone until they show signs of life.
        """
        me, dht, ttl = self.options.index, self.network.dht, self.options.dht_ttl
        own_id = self.network.p2p.peer_id.to_bytes()
        stored = await publish(dht, key, str(me), own_id, ttl=ttl)
        result: List[_Member] = [_Member(me, own_id)]
        wait_for = frozenset(i for i in expected if not self.liveness.presumed_gone(i))
        grace = max(2.0, 0.25 * self.options.matchmaking_timeout)
        self._timed_out = False

        async def settled() -> bool:
            nonlocal result, stored
            if not stored:  # a failed store is retried, never silently ignored
                stored = await publish(dht, key, str(me), own_id, ttl=ttl)
            record = await poll_read(dht, key)
            final = parse_final(record.get(_FINAL), self.options.num_peers)
            if final is not None:
                result = final if any(m.index == me and m.peer_id == own_id for m in final) else [_Member(me, own_id)]
                return True
            declared = parse_declarations(record, self.options.num_peers)
            declared[me] = own_id
            now = time.monotonic()
            if min(declared) == me and (wait_for <= declared.keys() or now >= deadline):
                self._timed_out = not wait_for <= declared.keys()
                result = [_Member(i, declared[i]) for i in sorted(declared) if i not in self.excluded or i == me]
                await publish(dht, key, _FINAL, [[m.index, m.peer_id] for m in result], ttl=ttl)
                return True
            return now >= deadline + grace

        if not await poll_until(settled, deadline=deadline + grace, max_delay=dht_poll_pause(self.options.num_peers)):
            self._timed_out = True
        self.liveness.observe(expected=expected, present={m.index for m in result})
        return result

    # ---------- exchanges ----------

    @staticmethod
    def _group_id(key: str, members: Sequence[_Member]) -> bytes:
        """Derived from the key *and* the final member list: two different lists can never be averaged together."""
        digest = hashlib.sha256(key.encode())
        for member in members:
            digest.update(member.index.to_bytes(8, "big") + len(member.peer_id).to_bytes(2, "big") + member.peer_id)
        return digest.digest()[:20]

    def _peer_ids(self, members: Sequence[_Member]):
        return [PeerID(m.peer_id) for m in members]

    async def _allreduce(self, key, members, tensors, weight, traffic, *, fractions=None,
                         modes=None) -> Tuple[Tuple[int, ...], int]:
        group_id = self._group_id(key, members)
        timeout = self.options.allreduce_timeout
        runner = self._runner_cls(
            traffic=traffic,
            p2p=self.network.p2p,
            servicer_type=self._servicer_cls,
            prefix=self.options.prefix,
            group_id=group_id,
            tensors=tensors,
            weight=weight,
            ordered_peer_ids=self._peer_ids(members),
            peer_fractions=fractions or tuple(1.0 for _ in members),
            modes=modes,
            compression=self.compression,
            sender_timeout=timeout,
            reducer_timeout=2 * timeout,
            part_size_bytes=self.options.part_size_bytes,
        )
        await self.servicer.register(self.servicer.runners, group_id, runner)
        try:
            async for tensor, delta in _azip(tensors, runner):
                tensor.add_(delta.to(tensor.dtype))
            try:  # finish serving groupmates, so that traffic is complete and nobody loses our shard
                await asyncio.wait_for(runner.all_served.wait(), 2 * timeout)
            except asyncio.TimeoutError:
                logger.warning("group %s: a groupmate did not collect its averaged shard", key)
        finally:
            self.servicer.runners.pop(group_id, None)
        failed = runner.tensor_part_container.failed_size
        banned = {bytes(p.to_bytes()) for p in runner.banned_senders}
        for peer_id, why in runner.rejected.items():
            index = next((m.index for m in members if m.peer_id == peer_id.to_bytes()), None)
            logger.warning("group %s: rejected data from peer %s: %s", key, index, why)
            banned.add(peer_id.to_bytes())
        lost = tuple(m.index for m in members if m.peer_id in banned and m.index != self.options.index)
        if failed:
            logger.warning("group %s: %d values kept local after a reducer failed", key, failed)
        return lost, failed

    def _serialize(self, tensors: Sequence[torch.Tensor]) -> List[Any]:
        return [chunk for tensor in tensors for chunk in split_for_streaming(
            serialize_torch_tensor(tensor.detach().cpu(), self.compression.compression_type))]

    async def _offer(self, group_id: bytes, tensors, traffic, readers: FrozenSet[bytes]) -> SharedTensors:
        """Serve ``tensors`` under ``group_id`` to ``readers`` until they fetched them (or a while longer)."""
        entry = SharedTensors(self._serialize(tensors), traffic, readers)
        await self.servicer.register(self.servicer.shared, group_id, entry)
        # withdrawn at the latest after a few timeouts: a reader that never comes does not pin our memory
        asyncio.get_running_loop().call_later(
            self.options.matchmaking_timeout + 2 * self.options.allreduce_timeout,
            self.servicer.shared.pop, group_id, None)
        return entry

    async def _await_served(self, group_id: bytes, entry: SharedTensors) -> None:
        """Wait (bounded) until every reader fetched our tensors, so the step's byte count is complete."""
        try:
            await asyncio.wait_for(entry.served.wait(), 2 * self.options.allreduce_timeout)
        except asyncio.TimeoutError:
            logger.warning("%d reader(s) did not fetch our tensors", len(entry.pending))
        if self.servicer.shared.get(group_id) is entry and not entry.pending:
            self.servicer.shared.pop(group_id, None)

    async def _fetch(self, member: _Member, group_id: bytes, like, traffic) -> List[torch.Tensor]:
        """``member``'s full tensors offered under ``group_id``, checked against ``like`` (shape, dtype, finite).
        A stream cut short (libp2p reports a closed connection as the end of the stream) is resumed where it
        ended, up to :data:`FETCH_ATTEMPTS` times: only the missing chunks travel again."""
        parts: List[Any] = []
        for attempt in range(1, FETCH_ATTEMPTS + 1):
            whole = await self._stream_parts(member, group_id, parts, traffic, tensors=len(like))
            if whole >= len(like):
                break
            if attempt == FETCH_ATTEMPTS:
                raise AveragingError(f"peer {member.index}'s stream was cut {attempt} times ({whole} of "
                                     f"{len(like)} tensors)")
            logger.info("stream from peer %d cut after %d chunks: resuming", member.index, len(parts))
        received = [deserialize_torch_tensor(t) for t in _regroup(parts, combine_from_streaming)]
        problems = [check_part(got, shape=own.shape, dtype=own.dtype) for got, own in zip(received, like)]
        problem = f"{len(received)} tensors instead of {len(like)}" if len(received) != len(like) \
            else next((p for p in problems if p is not None), None)
        if problem is not None:
            raise AveragingError(f"peer {member.index} sent unusable tensors: {problem}")
        return received

    async def _stream_parts(self, member: _Member, group_id: bytes, parts: List[Any], traffic, *,
                            tensors: int) -> int:
        """Append to ``parts`` the chunks ``member`` streams under ``group_id``, from chunk ``len(parts)`` on, until
        they hold ``tensors`` whole tensors; then close the stream ourselves (the sender waits for that: a stream
        its sender closes right after the last chunk can lose its tail, as the all-reduce's streams could).
        Returns how many whole tensors ``parts`` holds (fewer: the stream was cut)."""
        stub = self._servicer_cls.get_stub(self.network.p2p, PeerID(member.peer_id), namespace=self.options.prefix)
        request = averaging_pb2.AveragingData(group_id=group_id, weight=len(parts))
        traffic.sent += request.ByteSize()
        whole, boundary = _whole_tensors(parts, 0, 0)
        stream = await stub.rpc_gather(request)
        try:
            async for msg in stream:
                traffic.received += msg.ByteSize()
                if msg.code != averaging_pb2.AVERAGED_PART:
                    raise AveragingError(f"peer {member.index} refused to send its tensors: {msg.code}")
                parts.append(msg.tensor_part)
                whole, boundary = _whole_tensors(parts, whole, boundary)
                if whole >= tensors:
                    break
        finally:
            await stream.aclose()
        return whole

    async def _fetch_in_order(self, sources: Sequence[_Member], group_ids: Sequence[bytes], like, traffic,
                              consume: Callable[[int, List[torch.Tensor]], None], *, window: int = 4) -> List[int]:
        """Fetch every source's tensors, ``window`` at a time, and hand them to ``consume`` in source order (so a
        sum over them is the same on every run); at most ``window`` of them are held at once. Returns the
        indices of the sources that failed."""
        window_slots = asyncio.Semaphore(window)
        loop = asyncio.get_running_loop()
        outcomes = [loop.create_future() for _ in sources]

        async def one(position: int) -> None:
            await window_slots.acquire()  # FIFO: the oldest unconsumed source always holds a slot
            try:
                result = await asyncio.wait_for(self._fetch(sources[position], group_ids[position], like, traffic),
                                                self.options.allreduce_timeout)
            except Exception as e:  # noqa: BLE001 - a failed source is reported, the others still count
                result = e
            outcomes[position].set_result(result)

        tasks = [asyncio.create_task(one(position)) for position in range(len(sources))]
        failed = []
        try:
            for member, outcome in zip(sources, outcomes):
                result = await outcome
                if isinstance(result, BaseException):
                    logger.warning("fetching from peer %d failed: %r", member.index, result)
                    failed.append(member.index)
                else:
                    consume(member.index, result)
                del result
                window_slots.release()
        finally:
            for task in tasks:
                task.cancel()
        return failed

    async def _gather(self, key, members, tensors, traffic) -> Dict[int, List[torch.Tensor]]:
        """Every group-mate's full tensors (knowledge distillation's all-gather)."""
        group_id = self._group_id(key, members)
        others = [m for m in members if m.index != self.options.index]
        entry = await self._offer(group_id, tensors, traffic, frozenset(m.peer_id for m in others))
        results: Dict[int, List[torch.Tensor]] = {}
        await self._fetch_in_order(others, [group_id] * len(others), tensors, traffic, results.__setitem__,
                                   window=len(others) or 1)
        await self._await_served(group_id, entry)
        return results

    async def _mean_of_all(self, key, members, tensors, traffic) -> List[int]:
        """RDFL: fetch every member's full tensors and average them with ours, in index order, in place."""
        group_id = self._group_id(key, members)
        others = [m for m in members if m.index != self.options.index]
        entry = await self._offer(group_id, tensors, traffic, frozenset(m.peer_id for m in others))
        failed = await self._weighted_mean(tensors, others, [group_id] * len(others), traffic, lambda index: 1.0)
        await self._await_served(group_id, entry)
        return failed

    async def _weighted_mean(self, tensors, sources, group_ids, traffic, weight_of) -> List[int]:
        """``tensors`` ← weighted mean of ours and the sources' (summed in index order; failed sources left out)."""
        me = self.options.index
        pending = sorted([(me, None)] + [(m.index, m) for m in sources], key=lambda item: item[0])
        sums = [torch.zeros_like(t) for t in tensors]
        total = 0.0

        def add(index: int, values: Sequence[torch.Tensor]) -> None:
            nonlocal total
            for acc, value in zip(sums, values):
                acc.add_(value.to(acc.dtype), alpha=weight_of(index))
            total += weight_of(index)

        # consume strictly by index, ours included at its place: fetch results arrive in source order
        ours_added = False

        def consume(index: int, values: Sequence[torch.Tensor]) -> None:
            nonlocal ours_added
            if not ours_added and index > me:
                add(me, tensors)
                ours_added = True
            add(index, values)

        ordered_sources = [m for _, m in pending if m is not None]
        positions = {m.index: i for i, m in enumerate(sources)}
        failed = await self._fetch_in_order(ordered_sources, [group_ids[positions[m.index]] for m in ordered_sources],
                                            tensors, traffic, consume)
        if not ours_added:
            add(me, tensors)
        for target, acc in zip(tensors, sums):
            target.copy_(acc.div_(total))
        return failed

    async def _step(self, *, key: str, expected: FrozenSet[int], exchange: "Exchange",
                    required: FrozenSet[int] = frozenset(), direct: bool = False) -> Tuple[StepReport, Any]:
        """Form the group ``key`` (matchmaking), then run ``exchange(key, members, traffic)`` within it.

        ``exchange`` returns ``(lost members, why the step failed or "", payload)``. ``required``: members without
        whom there is nothing to exchange (FedAvg's server). ``direct``: the exchange runs on the data plane, so
        a complete planned group may meet there (:meth:`_join_directly`) instead of through the DHT.
        The matchmaking waits what is left of :meth:`wait_for_stragglers`'s seconds on top of
        ``--matchmaking-timeout``.
        """
        started, wait, patience = time.monotonic(), self.options.matchmaking_timeout, self._patience()
        traffic = _Traffic()
        members: Optional[List[_Member]] = None
        deadline = started + patience + wait
        if expected == frozenset({self.options.index}):
            members = [_Member(self.options.index, b"")]
        elif direct:  # the patience goes to the planned group on the data plane, where waiting costs nothing
            members = await self._join_directly(key, expected, started + patience + wait / 2, traffic)
            deadline = max(started + wait, time.monotonic() + wait / 2)  # polling the DHT does cost
        met_directly = members is not None
        if members is None:
            members = await self._form_group(key, expected, deadline)
        if len(members) > 1 and not direct:  # group-mates met for the first time may have published their addresses
            await self.network.await_addresses(m.peer_id for m in members)
        matched = time.monotonic()
        indices = tuple(m.index for m in members)
        report = StepReport(members=indices, rank=indices.index(self.options.index),
                            timed_out=len(expected) > 1 and self._timed_out)
        payload: Any = {}
        if len(members) == 1 and len(expected) > 1:
            report.failed, report.reason = True, "no group-mate joined"
        elif not required <= set(indices):
            report.failed, report.reason = True, f"peer(s) {sorted(required - set(indices))} did not join"
        elif len(members) > 1:
            report.failed_peers, reason, payload = await exchange(key, members, traffic)
            report.failed, report.reason = bool(reason), reason
        self.excluded.update(report.failed_peers)
        report.bytes_sent, report.bytes_received = traffic.sent, traffic.received
        report.matchmaking_seconds = matched - started
        report.seconds = time.monotonic() - started
        logger.debug("group %s: members %s, met %s in %.2f s, step %.2f s", key, indices,
                     "directly" if met_directly else "via the DHT", report.matchmaking_seconds, report.seconds)
        return report, payload

    def average(
        self, tensors: Sequence[torch.Tensor], *, key: str, expected: FrozenSet[int], weight: float = 1.0
    ) -> StepReport:
        """Average ``tensors`` in place with whoever joins group ``key``; returns who took part and the traffic.

        The exchange works on a copy: if the step fails as a whole the tensors keep their local values.
        """
        if self.plane is not None:  # one flat float32 copy, cut into shards as it is
            flat = torch.cat([t.detach().reshape(-1).to("cpu", torch.float32) for t in tensors])

            async def exchange(key, members, traffic):
                lost, kept = await self._tcp_allreduce(key, members, flat, traffic)
                return lost, f"{kept} values kept local" if kept else "", None

            report, _ = self._run_step(key=key, expected=expected, exchange=exchange, direct=True)
            return self._copy_back(report, tensors, flat.split([t.numel() for t in tensors]))
        staged = [t.detach().to("cpu", copy=True).contiguous() for t in tensors]

        async def exchange(key, members, traffic):
            lost, kept = await self._allreduce(key, members, staged, weight, traffic)
            return lost, f"{kept} values kept local" if kept else "", None

        report, _ = self._run_step(key=key, expected=expected, exchange=exchange)
        return self._copy_back(report, tensors, staged)

    def average_all(self, tensors: Sequence[torch.Tensor], *, key: str, expected: FrozenSet[int]) -> StepReport:
        """RDFL: every member fetches every other member's full tensors and averages them all (all-to-all)."""
        staged = [t.detach().to("cpu", copy=True).contiguous() for t in tensors]

        async def exchange(key, members, traffic):
            lost = await self._mean_of_all(key, members, staged, traffic)
            return tuple(lost), "no group-mate's tensors arrived" if len(lost) == len(members) - 1 else "", None

        report, _ = self._run_step(key=key, expected=expected, exchange=exchange)
        return self._copy_back(report, tensors, staged)

    def average_via_server(self, tensors: Sequence[torch.Tensor], *, key: str, expected: FrozenSet[int],
                           server: int) -> StepReport:
        """FedAvg (star): the clients send their tensors to ``server``, which averages them and sends the mean
        back; the server (an extra peer without data of its own) passes tensors of the right shapes and keeps
        nothing. Same group formation and wire checks as MAR."""
        staged = [t.detach().to("cpu", copy=True).contiguous() for t in tensors]
        me = self.options.index

        async def exchange(key, members, traffic):
            from hivemind.averaging.allreduce import AveragingMode

            roles = [AveragingMode.AUX if m.index == server else AveragingMode.CLIENT for m in members]
            fractions = tuple(1.0 if m.index == server else 0.0 for m in members)
            lost, kept = await self._allreduce(key, members, staged, 1.0, traffic, fractions=fractions, modes=roles)
            return lost, f"{kept} values kept local" if kept else "", None

        report, _ = self._run_step(key=key, expected=expected | {server}, exchange=exchange,
                                   required=frozenset({server}))
        return report if me == server else self._copy_back(report, tensors, staged)

    def gossip(self, tensors: Sequence[torch.Tensor], *, key: str, sources: Sequence[int], readers: Sequence[int],
               weight_of: Callable[[int], float]) -> StepReport:
        """One gossip exchange: offer our tensors to ``readers``, fetch the ``sources``' tensors and replace ours
        by the ``weight_of``-weighted mean of ours and theirs (no group: each peer has its own neighbours)."""
        staged = [t.detach().to("cpu", copy=True).contiguous() for t in tensors]
        aborted = (StepReport(members=(self.options.index,), rank=0), None)
        report, _ = self._guarded(key, self._gossip(key, staged, frozenset(sources), frozenset(readers), weight_of),
                                  aborted)
        return self._copy_back(report, tensors, staged)

    async def _gossip(self, key, tensors, sources: FrozenSet[int], readers: FrozenSet[int],
                      weight_of) -> Tuple[StepReport, None]:
        me, started, traffic = self.options.index, time.monotonic(), _Traffic()
        declared = await self._declare(key, sources | readers, started + self.options.matchmaking_timeout)
        present = [_Member(i, declared[i]) for i in sorted(sources) if i in declared]
        await self.network.await_addresses(m.peer_id for m in present)
        matched = time.monotonic()
        own_id = self._gossip_id(key, me)
        entry = await self._offer(own_id, tensors, traffic, frozenset(declared[i] for i in readers if i in declared))
        failed = await self._weighted_mean(tensors, present, [self._gossip_id(key, m.index) for m in present],
                                           traffic, weight_of)
        await self._await_served(own_id, entry)
        lost = tuple(sorted((sources - declared.keys()) | set(failed)))
        report = StepReport(members=tuple(sorted({me} | {m.index for m in present})), rank=0, failed_peers=lost,
                            timed_out=self._timed_out, bytes_sent=traffic.sent, bytes_received=traffic.received,
                            matchmaking_seconds=matched - started, seconds=time.monotonic() - started)
        if sources and len(lost) == len(sources):
            report.failed, report.reason = True, "no neighbour's tensors arrived"
        self.excluded.update(lost)
        return report, None

    def await_first_declaration(self, key: str, *, patience: float) -> float:
        """Wait (at most ``patience`` seconds) until somebody declared under ``key``: a peer that has nothing to
        do before a group forms (FedAvg's server) does not start the group's deadline before its members come.
        Returns the seconds waited."""
        started = time.monotonic()

        async def declared() -> bool:
            return bool(parse_declarations(await poll_read(self.network.dht, key), self.options.num_peers))

        try:
            self.network.run(poll_until(declared, deadline=started + patience, max_delay=0.2), timeout=patience + 30)
        except (TimeoutError, OSError, RuntimeError) as e:
            logger.warning("waiting for group %s: %r", key, e)
        return time.monotonic() - started

    @staticmethod
    def _gossip_id(key: str, index: int) -> bytes:
        return hashlib.sha256(f"{key}.from{index}".encode()).digest()[:20]

    async def _declare(self, key: str, wanted: FrozenSet[int], deadline: float) -> Dict[int, bytes]:
        """Publish our peer id under ``key`` and read who of ``wanted`` did, until all (not presumed gone) did or
        the deadline passed: ``{index: peer id}``."""
        me, dht, ttl = self.options.index, self.network.dht, self.options.dht_ttl
        own_id = self.network.p2p.peer_id.to_bytes()
        stored = await publish(dht, key, str(me), own_id, ttl=ttl)
        wait_for = frozenset(i for i in wanted if not self.liveness.presumed_gone(i))
        declared: Dict[int, bytes] = {}

        async def everyone() -> bool:
            nonlocal stored, declared
            if not stored:
                stored = await publish(dht, key, str(me), own_id, ttl=ttl)
            found = parse_declarations(await poll_read(dht, key), self.options.num_peers)
            declared = {i: found[i] for i in wanted if i in found and i not in self.excluded}
            return wait_for <= declared.keys()

        self._timed_out = not await poll_until(everyone, deadline=deadline,
                                               max_delay=dht_poll_pause(self.options.num_peers))
        self.liveness.observe(expected=frozenset(wanted), present=set(declared) | {me})
        return declared

    @staticmethod
    def _copy_back(report: StepReport, tensors: Sequence[torch.Tensor], staged: Sequence[torch.Tensor]) -> StepReport:
        if not report.reason.startswith("step aborted"):
            for target, source in zip(tensors, staged):
                target.data.copy_(source.view_as(target))
        return report

    def all_gather(
        self, tensors: Sequence[torch.Tensor], *, key: str, expected: FrozenSet[int]
    ) -> Tuple[StepReport, Dict[int, List[torch.Tensor]]]:
        """Fetch every groupmate's full tensors (CPU copies) for callers that need more than the mean."""
        like = list(tensors)

        async def exchange(key, members, traffic):
            payload = await self._gather(key, members, like, traffic)
            lost = tuple(m.index for m in members if m.index != self.options.index and m.index not in payload)
            return lost, "" if payload else "no group-mate's tensors arrived", payload

        return self._run_step(key=f"{key}.gather", expected=expected, exchange=exchange)

    def _run_step(self, *, key, expected, exchange, required=frozenset(), direct=False) -> Tuple[StepReport, Any]:
        """One step with a deadline; a step that raises is reported as failed and leaves the tensors alone."""
        me = self.options.index
        rank = sorted(expected | {me}).index(me)  # keeps this peer on its scheduled path through the groups
        aborted = (StepReport(members=(me,), rank=rank), {})
        return self._guarded(key, self._step(key=key, expected=expected, exchange=exchange, required=required,
                                             direct=direct), aborted)

    def _guarded(self, key: str, coro, aborted: Tuple[StepReport, Any]) -> Tuple[StepReport, Any]:
        if not self.network.daemon_alive():
            coro.close()
            raise NetworkDown("this peer's p2pd has exited")
        try:
            return self.network.run(coro, timeout=self._step_timeout())
        except (AveragingError, TimeoutError, OSError, RuntimeError, ValueError) as e:
            if not self.network.daemon_alive():
                raise NetworkDown("this peer's p2pd has exited") from e
            logger.warning("group %s: step aborted, local values kept: %r", key, e)
            report = aborted[0]
            report.failed, report.reason = True, f"step aborted: {e!r}"
            return aborted

    def _step_timeout(self) -> float:
        opts = self.options
        return 1.25 * opts.matchmaking_timeout + 3 * opts.allreduce_timeout + 30 + self._patience()

    def close(self) -> None:
        self.network.loop.call_soon_threadsafe(self._heartbeat.cancel)
        try:
            if self.plane is not None:
                self.network.run(self.plane.close(), timeout=5)
            self.network.run(
                self.servicer.remove_p2p_handlers(self.network.p2p, namespace=self.options.prefix), timeout=5
            )
        except BaseException as e:  # noqa: BLE001 - the network may already be gone
            logger.debug("averager close: %r", e)


async def _azip(tensors: Sequence[torch.Tensor], deltas) -> AsyncIterator[Tuple[torch.Tensor, torch.Tensor]]:
    index = 0
    async for delta in deltas:
        yield tensors[index], delta
        index += 1


class TruncatedStream(AveragingError):
    """A stream of chunks ended inside a tensor (the connection closed early: libp2p reports that as an end)."""


def _whole_tensors(chunks, whole: int, boundary: int) -> Tuple[int, int]:
    """How many whole tensors ``chunks`` holds, and where the next one starts, counted on from ``(whole,
    boundary)`` (a tensor's first chunk says how many chunks it has)."""
    while boundary < len(chunks) and boundary + max(1, chunks[boundary].chunks) <= len(chunks):
        boundary += max(1, chunks[boundary].chunks)
        whole += 1
    return whole, boundary


def _regroup(chunks, combine) -> List[Any]:
    """Split a flat chunk stream back into tensors: each tensor's first chunk says how many chunks it has.
    A stream that ends inside a tensor raises :class:`TruncatedStream` instead of yielding a short tensor."""
    tensors, position = [], 0
    while position < len(chunks):
        count = max(1, chunks[position].chunks)
        if position + count > len(chunks):
            raise TruncatedStream(f"stream ended after {len(chunks) - position} of a tensor's {count} chunks")
        tensors.append(combine(chunks[position : position + count]))
        position += count
    return tensors



# ==================== a whole MAR pass ====================


@dataclass
class MarReport:
    steps: List[StepReport] = field(default_factory=list)

    @property
    def bytes_sent(self) -> int:
        return sum(s.bytes_sent for s in self.steps)

    @property
    def bytes_received(self) -> int:
        return sum(s.bytes_received for s in self.steps)

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.steps)

    @property
    def failed_steps(self) -> int:
        return sum(1 for s in self.steps if s.failed)

    @property
    def timed_out_steps(self) -> int:
        return sum(1 for s in self.steps if s.timed_out)

    @property
    def avg_group_size(self) -> float:
        return float(np.mean([len(s.members) for s in self.steps])) if self.steps else 0.0


@dataclass(frozen=True)
class MarSchedule:
    """How a round's MAR runs: ``num_steps`` steps in groups of about ``group_size``.

    :param grouping: ``packed`` (participants re-packed by position) or ``reference`` (keys on the global index
        among ``num_peers``, as the published reference: holes and singletons under partial participation)
    :param num_peers: all peers of the run (``--np``); the reference grouping needs it
    """

    group_size: int
    key_dim: int
    num_steps: int
    grouping: str = "packed"
    num_peers: int = 0


def moshpit_steps(
    averager: MoshpitAverager,
    *,
    participants: Sequence[int],
    round_index: int,
    schedule: MarSchedule,
    tag: str,
    run_step: Callable[[str, FrozenSet[int]], StepReport],
) -> MarReport:
    """Walk this peer through the round's MAR groups; ``run_step(key, expected)`` does the in-group exchange.

    Averaging and the all-gather of knowledge distillation share this walk, so both meet the same groups. The
    walk follows the plan: the next group comes from this peer's rank in its *planned* group, whoever of it was
    met. A group that lost a member thus costs only its own step: walking on by the rank among those met put a
    peer into a group that did not expect it, whose members then met through the DHT, and so on: one group that
    lost a member could send most of the round's later groups to the DHT matchmaking.
    """
    ordered = sorted(participants)
    me = averager.options.index
    if me not in ordered:
        raise AveragingError(f"peer {me} is not among this round's participants")
    averager.begin_round(round_index)
    grouping = make_grouping(schedule.grouping, participants=ordered, group_size=schedule.group_size,
                             key_dim=schedule.key_dim, num_peers=schedule.num_peers)
    plan = plan_groups(grouping, ordered, schedule.num_steps)
    group = grouping.start(me)
    report = MarReport()
    for step in range(schedule.num_steps):
        expected = frozenset(plan[step].get(group, [])) | {me}
        key = averager.group_key(round_index=round_index, step=step, bucket=group, tag=tag)
        report.steps.append(run_step(key, expected))
        group = grouping.advance(group, sorted(expected).index(me))
    return report


def moshpit_all_reduce(
    averager: MoshpitAverager,
    tensors: Sequence[torch.Tensor],
    *,
    participants: Sequence[int],
    round_index: int,
    schedule: MarSchedule,
    weight: float = 1.0,
    tag: str = "avg",
) -> MarReport:
    """Run ``schedule.num_steps`` MAR steps among this round's ``participants`` (peer indices)."""
    return moshpit_steps(
        averager, participants=participants, round_index=round_index, schedule=schedule, tag=tag,
        run_step=lambda key, expected: averager.average(tensors, key=key, expected=expected, weight=weight),
    )
