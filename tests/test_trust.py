"""Bad group-mates and strangers: one bad peer never takes an honest one down, and a run is closed to outsiders."""
import json

import pytest
import torch

from engine_peer import initial_tensors, run_engine_peers
from peer_synchronization import NetworkOptions, PeerNetwork, barrier, publish, read_subkeys

SECRET = bytes(range(32))


def run_group(tmp_path, bootstrap, *, evil_mode):
    """Peers 0 and 1 are honest, peer 2 misbehaves; one group of three, one MAR step."""
    return run_engine_peers(str(tmp_path), bootstrap, live=[0, 1, 2], num_peers=3, gs=3, ni=1,
                            extra=lambda i: ["--matchmaking-timeout", "60", "--allreduce-timeout", "30"] + (["--evil", evil_mode] if i == 2 else []))


@pytest.fixture
def bootstrap(no_new_p2pd):
    net = PeerNetwork(NetworkOptions(prefix="enginetest")).start()
    yield ",".join(net.visible_maddrs())
    net.shutdown()


@pytest.mark.parametrize("mode", ["nan", "shape", "dtype", "delta", "weight"])
def test_a_bad_groupmate_never_breaks_the_honest_peers(tmp_path, bootstrap, mode):
    codes = run_group(tmp_path, bootstrap, evil_mode=mode)
    assert codes[0] == 0 and codes[1] == 0, (tmp_path / "peer0.log").read_text()[-3000:]
    assert (tmp_path / "peer0.pt.json").read_text().startswith('{"members": [[0, 1, 2]]')  # peer 2 was in the group
    honest = [torch.load(tmp_path / f"peer{i}.pt") for i in (0, 1)]
    for tensors in honest:
        assert all(bool(torch.isfinite(t).all()) for t in tensors)
    if mode == "weight":  # wire weights are ignored: the plain mean of all three
        for tensors in honest:
            for k, got in enumerate(tensors):
                want = torch.stack([initial_tensors(i)[k] for i in range(3)]).mean(0)
                assert (got - want).abs().max().item() < 1e-5
    else:
        logs = (tmp_path / "peer0.log").read_text() + (tmp_path / "peer1.log").read_text()
        assert "rejected data from peer 2" in logs
        for tensors in honest:  # every value is local, the honest mean, or (peer 2's own shard, which it reduced
            for k, got in enumerate(tensors):  # correctly from its real values) the mean of all three
                own = [initial_tensors(i)[k] for i in range(3)]
                candidates = (own[0], own[1], (own[0] + own[1]) / 2, (own[0] + own[1] + own[2]) / 3)
                close = torch.zeros_like(got, dtype=torch.bool)
                for c in candidates:
                    close |= (got - c).abs() < 1e-5
                assert bool(close.all())


def test_a_diverged_groupmate_neither_stalls_nor_poisons_the_others(tmp_path, bootstrap):
    """Peer 2's own model is non-finite: its reducer leaves its own part out, so the honest peers get the exact mean
    of the honest values from every reducer, with no failed step and no reducer timeout."""
    codes = run_group(tmp_path, bootstrap, evil_mode="diverged")
    assert codes == {0: 0, 1: 0, 2: 0}, codes
    for i in (0, 1):
        report = json.loads((tmp_path / f"peer{i}.pt.json").read_text())
        assert report["members"] == [[0, 1, 2]] and report["failed_steps"] == 0, report
        for k, got in enumerate(torch.load(tmp_path / f"peer{i}.pt")):
            want = (initial_tensors(0)[k] + initial_tensors(1)[k]) / 2
            assert (got - want).abs().max().item() < 1e-5
    assert json.loads((tmp_path / "peer2.pt.json").read_text())["failed_steps"] == 1  # it kept its own values


@pytest.fixture
def closed_run(no_new_p2pd):
    """Two members of a run (sharing its secret) and a stranger who knows a member's multiaddr."""
    boot = PeerNetwork(NetworkOptions(prefix="closed", run_secret=SECRET)).start()
    maddrs = boot.visible_maddrs()
    member = PeerNetwork(NetworkOptions(initial_peers=maddrs, prefix="closed", run_secret=SECRET)).start()
    stranger = PeerNetwork(NetworkOptions(initial_peers=maddrs, prefix="closed")).start()
    try:
        yield boot, member, stranger
    finally:
        for net in (stranger, member, boot):
            net.shutdown()


def test_strangers_cannot_write_records_the_run_accepts(closed_run):
    boot, member, stranger = closed_run
    forged = [("closed.start", str(i), True) for i in range(8)] + [("closed.start", "x", True),
                                                                   ("closed.start", "\u0667", True),
                                                                   ("closed.control", "stop_after.0", 0),
                                                                   ("closed.control", "stop_after.1", "boom"),
                                                                   ("closed.g", "final", [[0, b"x"], [7, b"y"]])]
    for key, subkey, value in forged:
        stranger.run(publish(stranger.dht, key, subkey, value, ttl=60), timeout=30)
    assert boot.run(publish(boot.dht, "closed.start", "0", True, ttl=60), timeout=30)
    seen = member.run(read_subkeys(member.dht, "closed.start"), timeout=30)
    assert set(seen) == {"0"}  # only the member's own declaration, none of the stranger's
    assert member.run(read_subkeys(member.dht, "closed.control"), timeout=30) == {}
    assert member.run(read_subkeys(member.dht, "closed.g"), timeout=30) == {}
    # a forged arrival never completes a barrier for a peer that is not there
    assert barrier(member, "closed.start", me=1, expected=[0, 1, 2], timeout=3) == frozenset({0, 1})


def test_strangers_get_no_model_and_cannot_join_an_exchange(closed_run):
    import asyncio

    from hivemind.proto import averaging_pb2

    from moshpit_all_reduce import AveragerOptions, MoshpitAverager, MoshpitServicer, _Member

    boot, member, stranger = closed_run
    averager = MoshpitAverager(member, AveragerOptions(prefix="closed", index=0, num_peers=2))
    members = [_Member(0, member.p2p.peer_id.to_bytes()), _Member(1, boot.p2p.peer_id.to_bytes())]
    key = "closed.avg.r1.s0.g0"
    group_id = MoshpitAverager._group_id(key, members)
    assert group_id != MoshpitAverager._group_id(key, members[:1])  # another member list, another group
    secret_model = torch.full((1000,), 42.0)
    chunks = []

    async def register():
        from hivemind.compression import serialize_torch_tensor

        from moshpit_all_reduce import SharedTensors, _Traffic

        chunks.append(serialize_torch_tensor(secret_model))
        await averager.servicer.register(averager.servicer.shared, group_id,
                                         SharedTensors(chunks, _Traffic(), frozenset(m.peer_id for m in members)))

    member.run(register(), timeout=30)
    averager.share_snapshot(3, [secret_model])  # what a restarted member would fetch

    async def steal():
        from hivemind.utils.multiaddr import Multiaddr

        # the run's address records are closed to it: it dials the member at an address it learned elsewhere
        suffix = Multiaddr(f"/p2p/{member.p2p.peer_id}")
        addrs = [Multiaddr(m).decapsulate(suffix) for m in member.visible_maddrs()]
        await stranger.p2p._client.connect(member.p2p.peer_id, addrs)
        stub = MoshpitServicer.get_stub(stranger.p2p, member.p2p.peer_id, namespace="closed")
        stream = await stub.rpc_gather(averaging_pb2.AveragingData(group_id=group_id))
        snapshot = await stub.rpc_snapshot(averaging_pb2.AveragingData())
        return [msg async for msg in stream], [msg async for msg in snapshot]

    for replies in stranger.run(asyncio.wait_for(steal(), 30), timeout=40):
        assert all(msg.code != averaging_pb2.AVERAGED_PART for msg in replies)
        assert replies and replies[0].code == averaging_pb2.PROTOCOL_VIOLATION
    averager.close()


def test_a_snapshot_is_a_copy_of_its_round_serialized_only_when_asked():
    # a restarted peer fetches the newest aggregated model from a live one; it is copied every round into the
    # same buffers, and what a fetch serialized is not changed by the rounds after it
    from hivemind.compression import deserialize_torch_tensor
    from hivemind.utils.streaming import combine_from_streaming

    from moshpit_all_reduce import Snapshot, _regroup

    def served(snapshot):
        round_index, chunks = snapshot.chunks()
        return round_index, [deserialize_torch_tensor(t) for t in _regroup(chunks, combine_from_streaming)]

    snapshot, model = Snapshot(), [torch.randn(3, 4), torch.randn(700_000)]
    assert snapshot.chunks() is None  # nothing before the first round
    snapshot.keep(1, model)
    first = served(snapshot)
    buffers = [t.data_ptr() for t in snapshot._tensors]
    old = [t.clone() for t in model]
    for t in model:
        t.add_(1.0)  # the next round trains in place
    assert served(snapshot)[0] == 1 and all(torch.equal(a, b) for a, b in zip(served(snapshot)[1], old))
    snapshot.keep(2, model)
    assert [t.data_ptr() for t in snapshot._tensors] == buffers
    assert first[0] == 1 and all(torch.equal(a, b) for a, b in zip(first[1], old))
    second = served(snapshot)
    assert second[0] == 2 and all(torch.equal(a, b) for a, b in zip(second[1], model))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", [0, 517, -1])
def test_a_part_with_one_non_finite_value_is_refused(bad, where):
    from moshpit_all_reduce import all_finite, check_part

    part = torch.randn(131072)
    assert all_finite(part) and check_part(part, shape=(131072,), dtype=torch.float32) is None
    part[where] = bad
    assert not all_finite(part)
    assert check_part(part, shape=(131072,), dtype=torch.float32) == "non-finite values"
    assert all_finite(torch.empty(0)) and all_finite(torch.arange(5))


def test_finite_values_whose_sum_overflows_count_as_finite():
    from moshpit_all_reduce import all_finite

    huge = torch.full((1000,), 3e38)
    assert not torch.isfinite(huge.sum()) and all_finite(huge)
    huge[500] = float("nan")
    assert not all_finite(huge)
