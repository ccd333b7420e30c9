"""DHT barriers and bootstrap files with real hivemind DHT nodes on 127.0.0.1 (in one process)."""
import threading
import time

import pytest

from peer_synchronization import (
    NetworkOptions,
    PeerNetwork,
    announce_round_done,
    barrier,
    parse_done,
    parse_initial_peers,
    read_local,
    round_done_key,
    still_working,
    wait_for_round,
    write_bootstrap_file,
)


@pytest.fixture
def networks(no_new_p2pd):
    boot = PeerNetwork(NetworkOptions()).start()
    maddrs = boot.visible_maddrs()
    nets = [PeerNetwork(NetworkOptions(initial_peers=maddrs)).start() for _ in range(3)]
    yield nets
    for net in nets + [boot]:
        net.shutdown()


def run_barriers(nets, key_for, expected, timeout):
    results = {}

    def go(i):
        results[i] = barrier(nets[i], key_for(i), me=i, expected=expected, timeout=timeout)

    threads = [threading.Thread(target=go, args=(i,)) for i in range(len(nets))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def peer_2_arrives_last(networks, key, *, timeout, cards=None):
    """Peers 0 and 1 wait at barrier ``key``; peer 2 arrives a second later. Returns who each saw arrive (and
    fills ``cards`` with {peer: the cards it learnt}, each peer ``i`` carrying ``card_of(i)``)."""
    import time

    results = {}

    def go(i):
        learnt = {}
        results[i] = barrier(networks[i], key, me=i, expected=range(3), timeout=timeout,
                             card=None if cards is None else card_of(i), cards=learnt)
        if cards is not None:
            cards[i] = learnt

    early = [threading.Thread(target=go, args=(i,)) for i in (0, 1)]
    for t in early:
        t.start()
    time.sleep(1.0)
    go(2)
    for t in early:
        t.join()
    return results


def card_of(i):
    return ["10.0.0.%d" % (i + 1), 40000 + i]


def dht_copies(monkeypatch, read, store=None):
    """Point a barrier's DHT copies, read and stored straight on the key's nodes (``RepeatedRead``, ``Renewal``)
    or by a search (``read_subkeys``, ``publish``), at test doubles called like the latter: ``(dht, key, ...)``."""
    import peer_synchronization as ps

    monkeypatch.setattr(ps, "read_subkeys", read)
    monkeypatch.setattr(ps.RepeatedRead, "read", lambda self, **kwargs: read(self.dht, self.nodes.key, **kwargs))
    if store is not None:
        monkeypatch.setattr(ps, "publish", store)
        monkeypatch.setattr(ps.Renewal, "store", lambda self, subkey, value, *, ttl: store(
            self.dht, self.nodes.key, subkey, value, ttl=ttl))


def test_barrier_returns_who_arrived_and_respects_the_deadline(networks):
    # peers 0-2 arrive; peer 3 is expected but never comes: the barrier ends at its deadline with {0, 1, 2}
    results = run_barriers(networks, lambda i: "run.barrier", expected=range(4), timeout=3)
    assert all(arrived == {0, 1, 2} for arrived in results.values())


def test_a_barriers_dht_copy_is_stored_and_read_on_its_keys_nodes_without_searches(networks, monkeypatch):
    # under a one-core quota at 125 peers, 954 barrier reads that were each a search (≈ 40 RPCs) made most of the
    # DHT's calls during the start; the key's nodes are found once and asked directly
    import collections

    from hivemind.dht.routing import DHTID

    import peer_synchronization as ps

    full, direct, searched = [], collections.Counter(), collections.Counter()
    real_read, real_direct = ps.read_subkeys, ps.RepeatedRead.read

    async def full_read(dht, key, **kwargs):
        if key.startswith("run.direct"):  # not the address records' reads
            full.append(key)
        return await real_read(dht, key, **kwargs)

    async def direct_read(self, **kwargs):
        direct[self.dht.peer_id] += 1
        return await real_direct(self, **kwargs)

    key_id = DHTID.generate(source="run.direct")
    for net in networks:  # as in a run, where the address records are read long before the key's nodes are asked
        assert net.run(net.await_addresses([n.dht.peer_id.to_bytes() for n in networks], patience=30), timeout=60)
    for net in networks:
        real_search = net.dht.find_nearest_nodes

        async def search(queries, *args, real=real_search, me=net.dht.peer_id, **kwargs):
            searched[me] += key_id in list(queries)  # not the address records. stores
            return await real(queries, *args, **kwargs)

        monkeypatch.setattr(net.dht, "find_nearest_nodes", search)
    monkeypatch.setattr(ps, "read_subkeys", full_read)
    monkeypatch.setattr(ps.RepeatedRead, "read", direct_read)
    monkeypatch.setattr(ps, "read_at", lambda *args, **kwargs: asyncio_sleep_forever())  # no initial copies
    assert peer_2_arrives_last(networks, "run.direct", timeout=60) == {i: {0, 1, 2} for i in range(3)}
    assert full == [] and len(direct) == 3  # every peer read the key's nodes, none made a full search
    assert [searched[n.dht.peer_id] for n in networks] == [1, 1, 1]  # one search each, for its stores and reads


async def asyncio_sleep_forever():
    import asyncio

    await asyncio.sleep(3600)


def test_a_barriers_completion_is_pushed_to_peers_that_cannot_see_it(networks, monkeypatch):
    # peers 0 and 1 wait; their own reads of the record never show anybody else (as on a DHT too busy to
    # answer), so only the completion pushed by peer 2 - the last to arrive, whose read is complete - ends their
    # wait before the deadline

    import peer_synchronization as ps

    real_read, real_read_at, last = ps.read_subkeys, ps.read_at, networks[2].dht

    async def blind_read(dht, key, **kwargs):
        return await real_read(dht, key, **kwargs) if dht is last else {}

    async def blind_read_at(dht, peer_id, key):  # the initial peer's copies too
        return await real_read_at(dht, peer_id, key) if dht is last else {}

    dht_copies(monkeypatch, blind_read)
    monkeypatch.setattr(ps, "read_at", blind_read_at)
    cards = {}
    assert peer_2_arrives_last(networks, "run.pushed", timeout=60, cards=cards) == {i: {0, 1, 2} for i in range(3)}
    # every arrival's card (a data-plane endpoint in mar_fl.py) comes with the completion: peers 0 and 1 learnt
    # the others' from the push alone (a peer that read no endpoint record could not dial its group-mates)
    assert cards == {i: {j: card_of(j) for j in range(3)} for i in range(3)}


def test_a_barriers_completion_reaches_peers_through_the_initial_peers(networks, monkeypatch):
    # as before, peers 0 and 1 never see anybody else in their own reads, and now every push to a peer is lost
    # too: only the completion that peer 2 stored on the initial peer (the bootstrap node) ends their wait

    import peer_synchronization as ps

    real_read, real_read_at, real_store_at, last = ps.read_subkeys, ps.read_at, ps.store_at, networks[2].dht
    initial = {p.to_bytes() for p in networks[0].initial_peer_ids()}
    assert len(initial) == 1

    async def blind_read(dht, key, **kwargs):
        return await real_read(dht, key, **kwargs) if dht is last else {}

    async def blind_read_at(dht, peer_id, key):  # the arrivals the initial peer holds stay unseen, as above
        return await real_read_at(dht, peer_id, key) if dht is last or key.endswith(".done") else {}

    async def lossy_store_at(dht, peer_id, key, subkey, value, *, ttl):
        return peer_id.to_bytes() in initial and await real_store_at(dht, peer_id, key, subkey, value, ttl=ttl)

    dht_copies(monkeypatch, blind_read)
    monkeypatch.setattr(ps, "read_at", blind_read_at)
    monkeypatch.setattr(ps, "store_at", lossy_store_at)
    monkeypatch.setattr(ps, "BARRIER_PUSH_RETRIES", 0)
    assert peer_2_arrives_last(networks, "run.shared", timeout=20) == {0: {0, 1, 2}, 1: {0, 1, 2}, 2: {0, 1, 2}}


def test_arrivals_are_read_from_the_initial_peers_when_dht_reads_miss_them(networks, monkeypatch):
    # no DHT read shows anybody's arrival (as at 125 peers on two cores, for minutes): the copies stored straight
    # on the initial peer (the bootstrap node) complete the barrier for everyone

    async def blind_read(dht, key, **kwargs):
        return {}

    async def lost_store(dht, key, subkey, value, *, ttl):  # and no arrival lands through a DHT search
        return False

    dht_copies(monkeypatch, blind_read, lost_store)
    results = run_barriers(networks, lambda i: "run.initial", expected=range(3), timeout=20)
    assert results == {0: {0, 1, 2}, 1: {0, 1, 2}, 2: {0, 1, 2}}


def test_the_initial_peers_copies_complete_a_barrier_while_every_dht_read_hangs(networks, monkeypatch):
    # every DHT search hangs (a busy DHT: one was seen to take minutes); the initial peer's copies are read on
    # their own and complete the barrier long before a search would time out
    import asyncio


    async def hanging_read(dht, key, **kwargs):
        await asyncio.sleep(3600)

    dht_copies(monkeypatch, hanging_read)
    results = run_barriers(networks, lambda i: "run.quick", expected=range(3), timeout=15)
    assert results == {0: {0, 1, 2}, 1: {0, 1, 2}, 2: {0, 1, 2}}


def test_an_arrival_whose_first_stores_on_the_initial_peer_failed_is_stored_there_again(networks, monkeypatch):
    # at 125 peers a third of the first arrival stores on the initial peer timed out; an arrival whose DHT copy
    # had landed was never stored there again, and the others, whose DHT reads are rare and slow, saw it 50-90 s
    # after the last peer arrived. Here every DHT read hangs: only the initial peer's copies can end the barrier
    import asyncio
    import collections

    import peer_synchronization as ps

    async def hanging_read(dht, key, **kwargs):
        await asyncio.sleep(3600)

    real_store_at, tries = ps.store_at, collections.Counter()

    async def flaky_store_at(dht, peer_id, key, subkey, value, *, ttl):
        if key == "run.flaky":
            tries[subkey] += 1
            if tries[subkey] <= 2:  # refused twice, like a store that timed out
                return False
        return await real_store_at(dht, peer_id, key, subkey, value, ttl=ttl)

    async def lost_publish(dht, key, subkey, value, *, ttl):
        return True  # "stored" on DHT nodes that no reader asks (in a 4-node DHT it would land on the initial peer)

    dht_copies(monkeypatch, hanging_read, lost_publish)
    monkeypatch.setattr(ps, "store_at", flaky_store_at)
    results = run_barriers(networks, lambda i: "run.flaky", expected=range(3), timeout=20)
    assert results == {0: {0, 1, 2}, 1: {0, 1, 2}, 2: {0, 1, 2}}
    assert sorted(tries) == ["0", "1", "2"] and min(tries.values()) == 3


def test_an_arrival_store_that_timed_out_is_not_tried_again_sooner_than_it_took(monkeypatch):
    # under a 1-CPU quota the 125 peers' retries (1, 2, 4, 5, 5 ... s apart) kept the initial peer so busy that
    # 935 of 1,058 arrival stores and nearly every read there timed out: a store that took 8 s waits 8 s again
    import asyncio

    import peer_synchronization as ps

    now, sleeps, tries = [0.0], [], []
    real_sleep = asyncio.sleep
    monkeypatch.setattr(ps, "time", type("Clock", (), {"monotonic": staticmethod(lambda: now[0])}))

    async def fake_sleep(seconds):
        sleeps.append(seconds)
        now[0] += seconds
        await real_sleep(0)

    async def busy_store_at(dht, peer_id, key, subkey, value, *, ttl):
        tries.append(now[0])
        now[0] += 8.0  # the initial peer answers after 8 s: too late
        return False

    async def lost_publish(dht, key, subkey, value, *, ttl):
        return False

    class FakeDHT:
        peer_id = type("Id", (), {"to_bytes": staticmethod(lambda: b"me")})

    monkeypatch.setattr(ps, "store_at", busy_store_at)
    monkeypatch.setattr(ps, "publish", lost_publish)
    monkeypatch.setattr(ps.Renewal, "store", lambda self, subkey, value, *, ttl: lost_publish(
        self.dht, self.nodes.key, subkey, value, ttl=ttl))
    monkeypatch.setattr(ps.asyncio, "sleep", fake_sleep)

    async def main():
        landed = await ps._announce(FakeDHT(), "k", 0, 60.0, [object()], until=100.0)
        while ps._PUSHES:
            await asyncio.gather(*list(ps._PUSHES))
        return landed

    assert asyncio.run(main()) is False
    assert len(tries) >= 3 and all(b - a >= 16.0 for a, b in zip(tries, tries[1:])), tries
    assert sleeps and min(sleeps) >= 8.0 and tries[-1] <= 100.0


def test_the_initial_peers_copy_of_the_arrivals_is_read_less_often_than_their_copy_of_the_completion(
        networks, monkeypatch):
    # the arrivals copy holds one checked subkey per peer: read as often as the (small) completion, 125 waiting
    # peers checked 12,500 subkeys a second between them
    import peer_synchronization as ps

    real_read_at, reads = ps.read_at, []

    async def counting_read_at(dht, peer_id, key):
        reads.append(key)
        return await real_read_at(dht, peer_id, key)

    monkeypatch.setattr(ps, "read_at", counting_read_at)
    # 40 expected, 3 come: the completion copy is read every 0.4 s, the arrivals copy every 2 s, for 4 s
    results = run_barriers(networks, lambda i: "run.cadence", expected=range(40), timeout=4)
    assert all(arrived == {0, 1, 2} for arrived in results.values())
    arrivals, done = reads.count("run.cadence"), reads.count("run.cadence.done")
    assert 3 <= arrivals and 3 * arrivals <= done, (arrivals, done)


def test_a_barrier_call_that_overruns_its_deadline_returns_instead_of_killing_the_peer(monkeypatch, caplog):
    # the network loop held up past the barrier's deadline (seen once at 125 peers): the call ends like a
    # deadline, knowing only the caller, and says so
    import asyncio

    import peer_synchronization as ps

    async def stuck(*args, **kwargs):
        await asyncio.sleep(3600)

    net = PeerNetwork(NetworkOptions())
    net._thread.start()
    monkeypatch.setattr(ps, "async_barrier", stuck)
    monkeypatch.setattr(ps, "BARRIER_OVERRUN", 0.2)
    monkeypatch.setattr(PeerNetwork, "initial_peer_ids", lambda self: [])
    try:
        assert barrier(net, "run.stuck", me=3, expected=range(4), timeout=0.3) == {3}
    finally:
        net.loop.call_soon_threadsafe(net.loop.stop)
    assert "overran" in caplog.text


def test_a_peer_leaves_a_barrier_once_its_completion_pushes_landed(networks, monkeypatch):
    # a peer that left at once went to work (training, both cores) while the peers it was to tell still waited:
    # at 64 peers the last one left the start barrier 8 s after the first
    import asyncio
    import time

    import peer_synchronization as ps

    real_store_at, pushed = ps.store_at, []
    index_of = {id(net.dht): i for i, net in enumerate(networks)}

    async def slow_store_at(dht, peer_id, key, subkey, value, *, ttl):
        await asyncio.sleep(0.5)
        stored = await real_store_at(dht, peer_id, key, subkey, value, ttl=ttl)
        if key.endswith(".done"):
            pushed.append((index_of[id(dht)], time.monotonic()))
        return stored

    monkeypatch.setattr(ps, "store_at", slow_store_at)
    left = {}

    def go(i):
        barrier(networks[i], "run.handed", me=i, expected=range(3), timeout=30)
        left[i] = time.monotonic()

    threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(left) == 3 and pushed  # the completion was pushed (to the tree and the initial peer)
    assert all(at <= left[i] for i, at in pushed), (pushed, left)


def test_the_completion_tree_reaches_every_peer_once():
    from peer_synchronization import tree_children

    for n, fanout in [(1, 4), (2, 4), (5, 4), (64, 4), (125, 4), (10, 2)]:
        order = sorted(range(0, 3 * n, 3))  # indices need not be contiguous
        for root in (order[0], order[n // 2], order[-1]):
            reached, frontier = [root], [root]
            while frontier:
                frontier = [c for p in frontier for c in tree_children(order, root, p, fanout)]
                reached += frontier
            assert sorted(reached) == order


def test_a_peer_that_read_the_completion_itself_still_pushes_to_its_subtree(monkeypatch):
    # several peers may read a barrier complete on their own and leave at once; with one tree per barrier each of
    # them still serves its own children, so no subtree is left to its slow reads (4 peers waited 3 minutes)
    import asyncio
    import random

    import peer_synchronization as ps

    n = 125
    ids = {i: b"peer%d" % i for i in range(n)}
    by_id = {v: i for i, v in ids.items()}
    pushes = []

    class FakeDHT:
        def __init__(self, index):
            self.index = index

    async def fake_store_at(dht, peer_id, key, subkey, value, *, ttl):
        pushes.append((dht.index, by_id[peer_id.to_bytes()], subkey))
        return True

    monkeypatch.setattr(ps, "store_at", fake_store_at)

    async def spread(readers):
        completed = set()
        while True:
            pushed = {child for _, child, _ in pushes}
            learnt = (set(readers) | pushed) - completed
            if not learnt:
                return completed
            for me in sorted(learnt):
                completed.add(me)
                ps._pass_completion_on(FakeDHT(me), "b.done", ids, me=me, ttl=60, read_it=me in readers)
            await asyncio.sleep(0.01)
            await asyncio.gather(*list(ps._PUSHES))

    root = ps.completion_root(range(n), "b.done")
    for readers in ([3], [root], [0, 64, 77, 124], random.Random(1).sample(range(n), 20)):
        pushes.clear()
        assert asyncio.run(spread(readers)) == set(range(n))
        # each peer is pushed to once by its parent in the barrier's one tree, and the root once by every reader
        assert len(pushes) == n - 1 + len(set(readers) - {root})
        assert {subkey for _, _, subkey in pushes} == {str(root)}


def test_a_completion_push_that_failed_is_tried_again(monkeypatch):
    # a leaf has no children to fall back on: without a second try it waits for its own reads until the deadline
    import asyncio

    import peer_synchronization as ps

    ids = {i: b"peer%d" % i for i in range(6)}
    attempts = []

    async def flaky_store_at(dht, peer_id, key, subkey, value, *, ttl):
        attempts.append(peer_id.to_bytes())
        return attempts.count(peer_id.to_bytes()) > 2  # every push fails twice, then lands

    class FakeDHT:
        pass

    monkeypatch.setattr(ps, "store_at", flaky_store_at)
    monkeypatch.setattr(ps, "BARRIER_PUSH_RETRY", 0.01)
    root = ps.completion_root(range(6), "r.done")

    async def main():
        ps._pass_completion_on(FakeDHT(), "r.done", ids, me=root, ttl=60)
        await asyncio.sleep(0.01)
        while ps._PUSHES:
            await asyncio.gather(*list(ps._PUSHES))

    asyncio.run(main())
    children = ps.tree_children(list(range(6)), root, root)
    assert children and all(attempts.count(ids[c]) == 3 for c in children)


def test_a_pushed_completion_record_is_parsed_strictly():
    from peer_synchronization import Completion, parse_arrival, parse_completion

    wanted = frozenset({0, 1})
    assert parse_completion([[0, b"a"], [1, b""]], wanted, 2) == Completion({0: b"a", 1: b""}, {})
    assert parse_completion([[0, b"a", ["h", 1]], [1, b""]], wanted, 2) == Completion({0: b"a", 1: b""}, {0: ["h", 1]})
    assert parse_completion([[0, b"a", ["h", 1.5]], [1, b""]], wanted, 2) is None  # a card holds ints and text only
    assert parse_completion([[0, b"a", ["h"] * 5], [1, b""]], wanted, 2) is None  # and a few of them
    assert parse_completion([[0, b"a", ["h" * 65]], [1, b""]], wanted, 2) is None  # short ones
    assert parse_completion([[0, b"a", [True]], [1, b""]], wanted, 2) is None  # a bool is no int
    assert parse_completion([[0, b"a", [], 1], [1, b""]], wanted, 2) is None
    assert parse_arrival(b"a") == (b"a", None)
    assert parse_arrival([b"a", ["h", 1]]) == (b"a", ["h", 1])
    assert parse_arrival([b"a", {"h": 1}]) == (b"a", None)  # a bad card is dropped; the arrival still counts
    assert parse_arrival([b"x" * 65, ["h", 1]]) is None and parse_arrival("a") is None
    assert parse_completion([[0, b"a"]], wanted, 2) is None  # does not cover everybody expected
    assert parse_completion([[0, b"a"], [5, b"b"]], wanted, 2) is None  # out of range
    assert parse_completion([[0, b"a"], [True, b"b"]], wanted, 2) is None  # a bool is no index
    assert parse_completion([[0, b"a"], [1, b"x" * 65]], wanted, 2) is None  # no peer id is that long
    assert parse_completion({"0": b"a"}, wanted, 2) is None
    assert parse_completion([[0, b"a"], [1, "b"]], wanted, 2) is None


def test_an_abandoned_event_wait_is_no_error_but_other_loop_errors_still_are(caplog):
    # hivemind's DHT search leaves one Event.wait() task pending per request when the search is cancelled; asyncio
    # logged each as an ERROR when it was collected (dozens per peer log, with nothing failed)
    import asyncio
    import gc
    import logging

    from peer_synchronization import quiet_abandoned_waits

    loop = asyncio.new_event_loop()
    loop.set_exception_handler(quiet_abandoned_waits)

    async def abandon():
        asyncio.ensure_future(asyncio.Event().wait())  # the event and its waiter become garbage together
        await asyncio.sleep(0)

    async def fail_in_a_callback():
        loop.call_soon(lambda: 1 / 0)
        await asyncio.sleep(0.01)

    # hivemind's stubs run an RPC in a wait_for: one that failed as its caller's deadline cancelled it keeps an
    # exception nobody reads (256 ERROR lines in one 125-peer start under a one-core quota)
    async def call_protobuf_handler():
        raise ConnectionError("failed to dial: context deadline exceeded")

    async def our_own_call():
        raise ConnectionError("a failure of ours that nobody read")

    call_protobuf_handler.__qualname__ = "P2P.call_protobuf_handler"  # as hivemind's method is named

    async def leave_unread(make):
        asyncio.ensure_future(make())
        await asyncio.sleep(0.01)

    with caplog.at_level(logging.DEBUG):
        loop.run_until_complete(abandon())
        loop.run_until_complete(leave_unread(call_protobuf_handler))
        gc.collect()
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert any("abandoned DHT search" in r.getMessage() for r in caplog.records)
        assert any("caller had given up" in r.getMessage() for r in caplog.records)
        loop.run_until_complete(fail_in_a_callback())
        loop.run_until_complete(leave_unread(our_own_call))
        gc.collect()
    loop.close()
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert any("ZeroDivisionError" in str(r.exc_info) for r in errors)
    assert any("a failure of ours" in str(r.exc_info) + r.getMessage() for r in errors)


def test_a_reply_to_a_call_that_just_timed_out_leaves_the_daemon_connection_working():
    # hivemind reads every reply from p2pd in one task and sets it on the caller's future; a reply that came in the
    # same loop pass as the caller's deadline found that future cancelled, raised there and ended the reader: the
    # peer's RPCs and its handlers were dead from then on (one peer in 4 of 9 64-peer runs, at the start)
    import asyncio
    from types import SimpleNamespace

    from hivemind.p2p import PeerID
    from hivemind.p2p.p2p_daemon_bindings.control import ControlClient
    from hivemind.p2p.p2p_daemon_bindings.utils import write_pbmsg
    from hivemind.proto import p2pd_pb2

    from peer_synchronization import guard_late_replies

    class Daemon:  # the daemon's end of the persistent connection: we write its replies into the reader
        def __init__(self):
            self.reader, self.sent = asyncio.StreamReader(), []

        async def open_persistent_connection(self):
            writer = SimpleNamespace(write=self.sent.append, drain=self._drained, close=lambda: None)
            return self.reader, writer

        @staticmethod
        async def _drained():
            return None

        async def reply(self, call_id: bytes, data: bytes) -> None:  # framed as p2pd frames it
            response = p2pd_pb2.PersistentConnectionResponse(
                callId=call_id, callUnaryResponse=p2pd_pb2.CallUnaryResponse(response=data))
            await write_pbmsg(SimpleNamespace(write=self.reader.feed_data, drain=self._drained), response)

    async def scenario():
        daemon = Daemon()
        control = await ControlClient.create(daemon)
        guard_late_replies(SimpleNamespace(_client=SimpleNamespace(control=control)))
        peer = PeerID(b"\x00\x24\x08\x01\x12\x20" + bytes(32))

        async def call_and_reply(data: bytes, *, cancel: bool):
            call = asyncio.ensure_future(control.call_unary_handler(peer, "proto", b"request"))
            await asyncio.sleep(0.01)
            (call_id,) = [c for c, f in control._pending_calls.items() if not f.done()]
            await daemon.reply(call_id.bytes, data)
            if cancel:  # the caller's deadline, in the same loop pass as the reply
                call.cancel()
            return await asyncio.gather(call, return_exceptions=True)

        (first,) = await call_and_reply(b"too late", cancel=True)
        assert isinstance(first, asyncio.CancelledError)
        assert not control._read_task.done(), control._read_task
        (second,) = await call_and_reply(b"answer", cancel=False)
        control.close()
        return second

    assert asyncio.run(scenario()) == b"answer"


def test_a_peer_whose_connection_to_its_daemon_ended_counts_its_network_as_down():
    # every reply and every request comes through that one connection: without it the peer only waits out
    # deadlines, so it must learn it is cut off (the averager then raises NetworkDown, the launcher reports it)
    from types import SimpleNamespace

    from peer_synchronization import NetworkOptions, PeerNetwork

    network = PeerNetwork(NetworkOptions(initial_peers=[], host="127.0.0.1"))
    reader = SimpleNamespace(done=lambda: False)
    network.p2p = SimpleNamespace(_child=SimpleNamespace(returncode=None),
                                  _client=SimpleNamespace(control=SimpleNamespace(_read_task=reader)))
    assert network.daemon_alive()
    reader.done = lambda: True
    assert not network.daemon_alive()
    network.p2p._child.returncode, reader.done = 1, (lambda: False)
    assert not network.daemon_alive()
    network.loop.close()


def test_run_prefix_keeps_runs_apart(networks):
    # same DHT, two run prefixes: peer 0 is alone in run A, peers 1 and 2 meet in run B
    results = run_barriers(networks, lambda i: "runA.b" if i == 0 else "runB.b", expected=range(3), timeout=2)
    assert results[0] == {0}
    assert results[1] == results[2] == {1, 2}


def test_bootstrap_file_round_trip(tmp_path):
    path = str(tmp_path / "bootstrap.json")
    write_bootstrap_file(path, ["/ip4/127.0.0.1/tcp/1/p2p/QmX"])
    assert parse_initial_peers(path, timeout=1) == ["/ip4/127.0.0.1/tcp/1/p2p/QmX"]
    assert parse_initial_peers("/ip4/1.2.3.4/tcp/5/p2p/A,/ip4/1.2.3.4/tcp/6/p2p/B", timeout=1) == [
        "/ip4/1.2.3.4/tcp/5/p2p/A", "/ip4/1.2.3.4/tcp/6/p2p/B"]


def test_all_gather_delivers_every_groupmates_full_tensors(networks):
    import torch

    from moshpit_all_reduce import AveragerOptions, MoshpitAverager

    averagers = [MoshpitAverager(net, AveragerOptions(prefix="gathertest", index=i, matchmaking_timeout=10))
                 for i, net in enumerate(networks)]
    tensors = {i: [torch.full((3, 4), float(i)), torch.arange(300_000, dtype=torch.float32) * (i + 1)]
               for i in range(3)}
    results = {}

    def go(i):
        results[i] = averagers[i].all_gather(tensors[i], key="gathertest.k", expected=frozenset(range(3)))

    threads = [threading.Thread(target=go, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (report, gathered) in results.items():
        assert report.members == (0, 1, 2) and sorted(gathered) == sorted({0, 1, 2} - {i})
        for j, got in gathered.items():
            assert all(torch.equal(a, b) for a, b in zip(got, tensors[j]))
        assert report.bytes_received > 2 * 300_000 * 4  # two groupmates' big tensors came over the wire


def test_still_working_waits_for_running_participants_that_are_not_done():
    base = dict(participants={1, 3, 5, 7}, done={3}, round_index=4)
    assert still_working(**base, running=None) == {1, 5, 7}  # no liveness view: everybody not done
    # 5's record expired (gone), 7's names round 5 (past round 4, its done record lost), 1 is at round 4
    assert still_working(**base, running={0: 4, 1: 4, 3: 4, 7: 5}) == {1}
    assert still_working(**base, running={1: 3, 5: 2, 7: 4}) == {1, 5, 7}  # still training / behind
    assert still_working(participants={2}, done={2}, running=None, round_index=1) == frozenset()
    assert still_working(participants=(), done=(), running={}, round_index=1) == frozenset()


def test_parse_done_is_strict():
    record = {"0": True, "2": True, "3": False, "4": 1, "-1": True, "07x": True, "9": True, "\u0663": True}
    assert parse_done(record, num_peers=8) == {0, 2}


def test_wait_for_round_ends_when_every_running_participant_is_done(networks):
    key = round_done_key("waittest", 3)
    running = lambda: {0: 3, 1: 3, 2: 3}  # noqa: E731
    for me in (1, 2):
        announce_round_done(networks[me], key, me=me)
    waited = wait_for_round(networks[0], key, me=0, participants={1, 2}, round_index=3, num_peers=3,
                            running=running, patience=60)
    assert waited.pending == frozenset()
    # peer 2 never says it is done but is alive at round 3: the wait gives up after `patience` without progress
    other = round_done_key("waittest", 4)
    announce_round_done(networks[1], other, me=1)
    waited = wait_for_round(networks[0], other, me=0, participants={1, 2}, round_index=4, num_peers=3,
                            running=lambda: {0: 4, 1: 4, 2: 3}, patience=1.0)
    assert waited.pending == {2} and waited.seconds >= 1.0
    # once its liveness record is gone (or names a later round) nobody waits for it
    waited = wait_for_round(networks[0], other, me=0, participants={1, 2}, round_index=4, num_peers=3,
                            running=lambda: {0: 4, 1: 4}, patience=60)
    assert waited.pending == frozenset()
    # a liveness view without our own record is not trusted: wait for everybody not done
    waited = wait_for_round(networks[0], other, me=0, participants={1, 2}, round_index=4, num_peers=3,
                            running=lambda: {1: 4}, patience=0.5)
    assert waited.pending == {2}


def test_a_dht_call_made_by_an_address_refresh_does_not_wait_for_that_refresh(monkeypatch):
    # the refresh's own DHT calls meet nodes not yet in the address book; had they waited for the refresh they
    # belong to, every first contact would have cost a timeout (8-9 s on a group's first step)
    import asyncio
    import time

    import peer_synchronization

    net = PeerNetwork(NetworkOptions())
    inner = []

    async def slow_read_with_a_routed_call(dht, key, **kwargs):
        await asyncio.sleep(1.2)  # a slow read: past the refresh spacing, so a lookup may start waiting
        started = time.monotonic()
        inner.append(await net._lookup_address(b"a node the read met"))
        inner.append(time.monotonic() - started)
        return {}

    monkeypatch.setattr(peer_synchronization, "read_subkeys", slow_read_with_a_routed_call)
    outer = asyncio.run(asyncio.wait_for(net._lookup_address(b"a group-mate"), 5))
    assert outer == [] and inner[0] == []
    assert inner[1] < 0.5  # answered from what is known, at once


def test_daemons_start_without_libp2ps_own_dht(no_new_p2pd):
    # peers find each other through hivemind's DHT and the run's address records; p2pd's Kademlia DHT would only
    # slow its start (≈ 4×) and add background traffic
    import psutil

    net = PeerNetwork(NetworkOptions()).start()
    try:
        args = psutil.Process(net.p2p._child.pid).cmdline()
        assert args and not [a for a in args if a.split("=")[0] in ("-dht", "-dhtServer", "-dhtClient")]
    finally:
        net.shutdown()


def test_a_daemon_that_cannot_reach_its_bootstrap_peer_is_started_again_until_the_deadline(no_new_p2pd, caplog):
    # p2pd exits within seconds when its bootstrap peers do not answer (a busy bootstrap node while 125 peers start):
    # the peer starts it again instead of dying, and gives up with SyncError only at its start-up deadline
    import logging
    import time

    from peer_synchronization import SyncError

    gone = PeerNetwork(NetworkOptions()).start()
    maddrs = gone.visible_maddrs()
    gone.shutdown()
    caplog.set_level(logging.INFO, logger="mar_fl.sync")
    started = time.monotonic()
    with pytest.raises(SyncError, match="bootstrap"):
        PeerNetwork(NetworkOptions(initial_peers=maddrs, startup_timeout=8)).start()
    assert "(attempt 2)" in caplog.text and time.monotonic() - started < 8 + 30


def test_a_barrier_keeps_its_deadline_when_the_dht_does_not_answer():
    # a store or read that hangs (an overloaded DHT) must not hold the barrier past its deadline
    import asyncio

    from peer_synchronization import async_barrier

    class HangingDHT:
        peer_id = type("Id", (), {"to_bytes": lambda self: b"me"})()
        protocol = type("Protocol", (), {"storage": {}})()  # nothing pushed to this node

        async def store(self, *args, **kwargs):
            await asyncio.sleep(3600)

        async def get(self, *args, **kwargs):
            await asyncio.sleep(3600)

    async def main():
        return await asyncio.wait_for(async_barrier(HangingDHT(), "k", me=0, expected=[0, 1], timeout=0.5), 30)

    assert asyncio.run(main()) == frozenset({0})


def test_a_slow_first_neighbour_lookup_does_not_stop_the_start(no_new_p2pd, monkeypatch, caplog):
    # the lookup after the first answered bootstrap ping only fills the routing table: 28 of 125 peers died when
    # it took longer than one DHT call's timeout on a loaded host
    import asyncio
    import logging
    import time

    import peer_synchronization as ps

    net = PeerNetwork(NetworkOptions()).start()

    async def slow(*args, **kwargs):
        await asyncio.sleep(3600)

    monkeypatch.setattr(ps, "DHT_RPC_TIMEOUT", 0.3)
    monkeypatch.setattr(net.dht, "find_nearest_nodes", slow)
    caplog.set_level(logging.WARNING, logger="mar_fl.sync")
    try:
        net.run(net._look_up_neighbours(time.monotonic() + 60), timeout=30)
    finally:
        net.shutdown()
    assert "neighbours timed out" in caplog.text


def test_a_renewed_record_is_stored_on_its_keys_nodes_without_a_new_search(no_new_p2pd, monkeypatch):
    # a heartbeat renewed every few seconds searches for its key's nodes once, then stores to them directly;
    # what it stores is read like any other record, and a store to a node that is gone brings the search back
    from peer_synchronization import Renewal, read_subkeys

    boot = PeerNetwork(NetworkOptions()).start()
    nets = [boot] + [PeerNetwork(NetworkOptions(initial_peers=boot.visible_maddrs())).start() for _ in range(5)]
    writer, reader = nets[1], nets[2]
    holders = [boot] + nets[2:]  # the search's answer: five nodes, the writer not among them
    searches = []

    async def search(queries, **kwargs):
        searches.append(queries)
        return {query: {n.dht.node_id: n.dht.peer_id for n in holders} for query in queries}

    monkeypatch.setattr(writer.dht, "find_nearest_nodes", search)
    # as in a run, where the address records are read long before: each holder is dialled at its address
    assert writer.run(writer.await_addresses([n.dht.peer_id.to_bytes() for n in holders], patience=30), timeout=60)
    renewal = Renewal(writer.dht, "run.renewed")
    try:
        for beat in range(5):
            assert writer.run(renewal.store("0", [beat, b"id"], ttl=60), timeout=30)
            assert reader.run(read_subkeys(reader.dht, "run.renewed"), timeout=30) == {"0": [beat, b"id"]}
        assert len(searches) == 1
        before = len(searches)
        nets[4].shutdown()  # one of the key's nodes is gone: the others still take the record...
        assert writer.run(renewal.store("0", [5, b"id"], ttl=60), timeout=60)
        assert writer.run(renewal.store("0", [6, b"id"], ttl=60), timeout=60)
        assert len(searches) == before + 1  # ... and the next renewal looked for the key's nodes again
        assert reader.run(read_subkeys(reader.dht, "run.renewed"), timeout=30) == {"0": [6, b"id"]}
    finally:
        for net in nets:
            net.shutdown()


def test_a_record_read_again_and_again_is_read_from_its_keys_nodes_without_a_new_search(no_new_p2pd, monkeypatch):
    # the launcher's control record is read by every peer every round: a search each time (≈ 20 find calls at
    # 64 peers) was most of the DHT's traffic during a round; the key's nodes are found once and asked directly
    import peer_synchronization as ps
    from peer_synchronization import Renewal, RepeatedRead, store_at

    boot = PeerNetwork(NetworkOptions()).start()
    nets = [boot] + [PeerNetwork(NetworkOptions(initial_peers=boot.visible_maddrs())).start() for _ in range(5)]
    writer, reader = nets[1], nets[2]
    holders = [boot] + nets[2:]  # five nodes, the reader among them (its own copy costs no call)
    searches, finds, full_reads = [], [], []

    async def search(queries, **kwargs):
        searches.append(queries)
        return {query: {n.dht.node_id: n.dht.peer_id for n in holders} for query in queries}

    real_find, real_read = reader.dht.protocol.call_find, ps.read_subkeys

    async def counted_find(*args, **kwargs):
        finds.append(args[0])
        return await real_find(*args, **kwargs)

    async def counted_full_read(*args, **kwargs):
        full_reads.append(args[1])
        return await real_read(*args, **kwargs)

    for net in (writer, reader):
        monkeypatch.setattr(net.dht, "find_nearest_nodes", search)
        assert net.run(net.await_addresses([n.dht.peer_id.to_bytes() for n in holders], patience=30), timeout=60)
    monkeypatch.setattr(reader.dht.protocol, "call_find", counted_find)
    monkeypatch.setattr(ps, "read_subkeys", counted_full_read)
    renewal, read = Renewal(writer.dht, "run.read"), RepeatedRead(reader.dht, "run.read")
    try:
        for beat in range(4):
            assert writer.run(renewal.store("0", [beat, b"id"], ttl=60), timeout=30)
            assert reader.run(read.read(), timeout=30) == {"0": [beat, b"id"]}
        assert len(searches) == 2  # one for the writer's renewals, one for the reader's reads
        assert len(finds) == 4 * (len(holders) - 1) and full_reads == []
        # two nodes hold different values of one subkey: the newest copy wins, whichever node answers first
        assert writer.run(store_at(writer.dht, boot.dht.peer_id, "run.read", "1", "older", ttl=60), timeout=30)
        assert writer.run(store_at(writer.dht, nets[3].dht.peer_id, "run.read", "1", "newer", ttl=90), timeout=30)
        assert reader.run(read.read(), timeout=30)["1"] == "newer"
        # a node gone: the others' copies are read, with no new search (the key's nodes are looked up again
        # when their refresh time has passed)
        nets[4].shutdown()
        assert reader.run(read.read(), timeout=60)["0"] == [3, b"id"]
        assert len(searches) == 2 and full_reads == []
        # most of the key's nodes silent: the read is a full search instead
        nets[3].shutdown()
        nets[5].shutdown()
        reader.run(read.read(timeout=15), timeout=60)
        assert full_reads == ["run.read"]
    finally:
        for net in nets:
            net.shutdown()


def test_an_address_record_that_did_not_land_is_stored_again_soon(monkeypatch):
    # the renewal comes only every TTL / 3 (200 s); a first store that no node took is tried again in seconds
    import asyncio

    import peer_synchronization as ps

    net = PeerNetwork(NetworkOptions())
    outcomes = iter([False, False, True, True])
    calls = []

    async def publish_address():
        calls.append(True)
        return next(outcomes)

    monkeypatch.setattr(ps, "ADDRESS_RETRY", 0.05)
    monkeypatch.setattr(net, "_publish_address", publish_address)

    async def main():
        task = asyncio.ensure_future(net._publish_address_forever(False))
        await asyncio.sleep(1.0)  # retries after 0.05 and 0.1 s; then the next renewal is TTL / 3 (200 s) away
        task.cancel()

    asyncio.run(main())
    assert len(calls) == 3


def test_a_start_does_not_wait_for_an_address_store_that_hangs(no_new_p2pd, monkeypatch):
    # one node slow to take the DHT copy of a peer's address record held that peer's start for a whole RPC
    # timeout; the start goes on after a short wait and the record keeps being stored in the background
    import asyncio

    import peer_synchronization as ps

    calls = []

    async def hangs(self):
        calls.append(True)
        await asyncio.sleep(3600)

    boot = PeerNetwork(NetworkOptions()).start()
    monkeypatch.setattr(ps, "ADDRESS_START_PATIENCE", 0.2)
    monkeypatch.setattr(PeerNetwork, "_publish_address", hangs)
    # a 3600-s store would outlast this deadline
    net = PeerNetwork(NetworkOptions(initial_peers=boot.visible_maddrs(), startup_timeout=20)).start()
    try:
        assert calls == [True] and not net._publisher.done()  # the first store still goes on
        # but the copy that every peer reads first, on the initial peer, landed before the start returned
        held = net.run(ps.read_at(net.dht, boot.p2p.peer_id, net.address_key()), timeout=10)
        assert net.p2p.peer_id.to_base58() in held
    finally:
        net.shutdown()
        boot.shutdown()


def test_addresses_travel_through_the_initial_peers_when_dht_searches_cannot(no_new_p2pd, monkeypatch):
    # a peer that has just joined can dial only the initial peers: a DHT search for the address records must reach
    # nodes it cannot dial yet. Each peer also stores its record straight on the initial peers and reads theirs.
    import asyncio

    import peer_synchronization as ps

    async def search_fails(*args, **kwargs):
        raise asyncio.TimeoutError

    async def store_lands_nowhere(*args, **kwargs):
        return False

    boot = PeerNetwork(NetworkOptions()).start()
    nets = [boot]
    try:
        monkeypatch.setattr(ps, "read_subkeys", search_fails)
        monkeypatch.setattr(ps, "publish", store_lands_nowhere)
        nets += [PeerNetwork(NetworkOptions(initial_peers=boot.visible_maddrs())).start() for _ in range(3)]
        held = read_local(boot.dht, boot.address_key())
        assert {net.p2p.peer_id.to_base58() for net in nets[1:]} <= held.keys()
        for net in nets[1:]:
            net.run(net.refresh_addresses(), timeout=60)
            assert {other.p2p.peer_id.to_bytes() for other in nets[1:] if other is not net} <= net.addresses.keys()
    finally:
        for net in nets:
            net.shutdown()


def test_the_control_read_never_holds_a_round_and_reads_at_a_random_point_of_it(monkeypatch):
    # a peer whose control read had not finished waited for its whole deadline at the next round's start (12 s
    # of a 64-peer round, for every group after its own); and all peers reading at once at the busiest time of a
    # run (round 1) made every first read of a 125-peer run under a one-core quota time out
    import asyncio
    import threading
    from types import SimpleNamespace

    import mar_fl

    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(mar_fl, "CONTROL_READ_GRACE", 0.05)
    monkeypatch.setattr(mar_fl, "CONTROL_SEARCH_SPREAD", 0.2)
    found = []

    async def find_nearest_nodes(queries, **kwargs):  # the search for the control key's nodes
        found.extend(queries)
        return {}

    dht = SimpleNamespace(num_replicas=5, find_nearest_nodes=find_nearest_nodes)
    reader = mar_fl.ControlReader(SimpleNamespace(dht=dht, loop=loop), "run")
    started, answer, release = [], {"stop_after.0": 3}, threading.Event()

    async def read():
        started.append(time.monotonic())
        while not release.is_set():
            await asyncio.sleep(0.01)
        return answer

    reader._reader.read = read
    spans = []  # the (low, high) of each random delay drawn
    reader._jitter = SimpleNamespace(uniform=lambda low, high: spans.append((low, high)) or 0.0)
    state = mar_fl.PeerState(index=0, model=None, momentum=[], order=None)
    try:
        reader._search.result(timeout=10)
        assert found == [reader._reader.nodes.key_id]  # the key's nodes are looked up in round 1, without a read
        first = time.monotonic()
        assert not reader.stop_requested(state, 1)
        time.sleep(0.3)
        assert started == [] and spans == []  # the first check reads nothing: round 1 is the run's busiest time
        assert not reader.stop_requested(state, 2)
        second = time.monotonic()
        assert len(spans) == 1 and spans[0][0] == 0.0 and 0.3 / 2 <= spans[0][1] <= (second - first) / 2
        assert not reader.stop_requested(state, 3)  # the read hangs: the check goes on without it ...
        assert state.stop_after is None and len(started) == 1 and len(spans) == 1  # ... and starts no other
        release.set()
        reader._read.result(timeout=10)
        assert reader.stop_requested(state, 4)  # the read finished: used at the next check
        assert state.stop_after == 3 and len(spans) == 2
    finally:
        release.set()
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()
