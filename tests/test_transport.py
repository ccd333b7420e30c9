"""``--transport tcp``: the authenticated TCP data plane (unit tests on two planes) and real peers averaging on it
(exact means, byte accounting, absent / killed / bad group-mates, direct matchmaking with its DHT fallback)."""
import asyncio
import gc
import signal
import socket
import time
import weakref

import numpy as np
import pytest
import torch

from conftest import alive
from engine_peer import TCP_SECRET, initial_tensors, load_result, mean_of, run_engine_peers
from moshpit_all_reduce import AveragerOptions, MoshpitAverager, _Traffic
from peer_synchronization import (
    MAX_UNCLAIMED_FRAMES,
    NetworkOptions,
    PeerNetwork,
    PlaneError,
    TcpPlane,
    frame_bytes,
    parse_endpoint,
)

N, GS, NI = 8, 2, 3
SECRET = bytes(range(32))
GID = bytes(20)


# ---------- the plane itself (two planes in one process, no p2pd) ----------


def on_planes(body, *, secrets=(SECRET, SECRET)):
    """Run ``body(a, b)`` on two started planes (indices 0 and 1) and close them."""
    async def main():
        a = TcpPlane(index=0, secret=secrets[0], host="127.0.0.1", num_peers=4)
        b = TcpPlane(index=1, secret=secrets[1], host="127.0.0.1", num_peers=4)
        await a.start()
        await b.start()
        try:
            return await body(a, b)
        finally:
            await a.close()
            await b.close()

    return asyncio.run(main())


def test_frames_arrive_whole_and_keyed():
    async def body(a, b):
        await a.connect(1, "127.0.0.1", b.port)
        payload = np.arange(300_000, dtype=np.float32)
        sent = await a.send(1, GID, 1, payload)
        await a.send(1, GID, 0, b"first")  # frames are keyed, not ordered: phase 0 is read after phase 1 came
        first = await b.receive(0, GID, 0, timeout=10)
        got = await b.receive(0, GID, 1, timeout=10)
        reply = a.receive(1, GID, 0, timeout=10)  # the connection a dialled carries b's frames too
        await b.send(0, GID, 0, b"back")
        return sent, bytes(first), np.frombuffer(got, dtype=np.float32), bytes(await reply)

    sent, first, got, reply = on_planes(body)
    assert sent == frame_bytes(300_000 * 4) and first == b"first" and reply == b"back"
    assert np.array_equal(got, np.arange(300_000, dtype=np.float32))


def test_a_frame_read_and_dropped_is_freed_while_the_connection_waits():
    """The connection's reader, idle until the next frame, must not keep the last payload (a shard) alive."""
    async def body(a, b):
        await a.connect(1, "127.0.0.1", b.port)
        await a.send(1, GID, 0, np.ones(500_000, dtype=np.float32))
        got = await b.receive(0, GID, 0, timeout=10)
        ref = weakref.ref(got)
        del got
        gc.collect()
        return ref() is None, b.connected(0)

    freed, connected = on_planes(body)
    assert freed and connected


def test_a_closed_plane_leaves_the_next_owner_of_its_sockets_numbers_alone():
    """close() cancels every pending read; asyncio takes a socket off the selector in a callback that runs later.
    Closed before that, a socket gave its file descriptor to the next socket opened, and the late callback took
    that socket's reader away (or, where a transport held it, logged an asyncio ERROR: 7 at one run's shutdown)."""
    async def main():
        a = TcpPlane(index=0, secret=SECRET, host="127.0.0.1", num_peers=4)
        b = TcpPlane(index=1, secret=SECRET, host="127.0.0.1", num_peers=4)
        await a.start()
        await b.start()
        await a.connect(1, "127.0.0.1", b.port)
        await asyncio.sleep(0.2)  # both ends' readers wait for frames
        await a.close()
        loop = asyncio.get_running_loop()
        pairs = [socket.socketpair() for _ in range(4)]  # they take the numbers a's sockets had
        heard = [asyncio.Event() for _ in pairs]
        for (ours, _), event in zip(pairs, heard):
            ours.setblocking(False)
            loop.add_reader(ours.fileno(), event.set)
        await asyncio.sleep(0.1)  # any callback the closed plane left runs now
        for _, other in pairs:
            other.send(b"x")
        try:
            await asyncio.wait_for(asyncio.gather(*(event.wait() for event in heard)), 5)
            return True
        except asyncio.TimeoutError:
            return [event.is_set() for event in heard]
        finally:
            for ours, other in pairs:
                loop.remove_reader(ours.fileno())
                ours.close()
                other.close()
            await b.close()

    assert asyncio.run(main()) is True


def test_a_stranger_without_the_secret_is_refused_both_ways():
    async def body(a, b):
        with pytest.raises(PlaneError):
            await a.connect(1, "127.0.0.1", b.port)  # b cannot prove it holds a's secret
        await asyncio.sleep(0.2)
        return a.connected(1), b.connected(0)

    assert on_planes(body, secrets=(SECRET, bytes(32))) == (False, False)


def test_a_peer_claiming_another_index_is_refused():
    async def body(a, b):
        with pytest.raises(PlaneError):
            await a.connect(2, "127.0.0.1", b.port)  # b is peer 1, not 2
        return a.connected(2)

    assert on_planes(body) is False


def test_garbage_and_silence_get_no_connection():
    async def body(a, b):
        loop = asyncio.get_running_loop()
        raw = socket.create_connection(("127.0.0.1", b.port))
        raw.setblocking(False)
        await loop.sock_sendall(raw, b"GET / HTTP/1.1\r\n" * 4)
        try:  # closed without a word (a reset, as our unread garbage is discarded)
            data = await asyncio.wait_for(loop.sock_recv(raw, 100), 15)
        except ConnectionResetError:
            data = b""
        raw.close()
        return data, b.connected(0)

    assert on_planes(body) == (b"", False)


def test_oversized_frames_disconnect_and_waiters_learn_it_at_once():
    async def body(a, b):
        await a.connect(1, "127.0.0.1", b.port)
        await asyncio.sleep(0.1)
        b.allow_frames(1000)
        waiting = asyncio.ensure_future(b.receive(0, GID, 0, timeout=30))
        await a.send(1, GID, 1, bytes(4000))
        with pytest.raises(PlaneError):
            await waiting  # not after 30 s: the connection broke
        return b.connected(0)

    assert on_planes(body) is False


def test_unclaimed_frames_are_bounded():
    async def body(a, b):
        await a.connect(1, "127.0.0.1", b.port)
        for k in range(3 * MAX_UNCLAIMED_FRAMES):
            await a.send(1, k.to_bytes(20, "big"), 0, b"x" * 100)
        await asyncio.sleep(0.3)
        kept = len(b._inboxes[0].frames)
        newest = await b.receive(0, (3 * MAX_UNCLAIMED_FRAMES - 1).to_bytes(20, "big"), 0, timeout=5)
        return kept, bytes(newest), b.connected(0)

    kept, newest, connected = on_planes(body)
    assert kept == MAX_UNCLAIMED_FRAMES and newest == b"x" * 100 and connected


@pytest.mark.parametrize("value, want", [
    (["127.0.0.1", 4000], ("127.0.0.1", 4000)), (["::1", 1], ("::1", 1)),
    (["localhost", 4000], None), (["127.0.0.1", 0], None), (["127.0.0.1", 70000], None),
    (["127.0.0.1", True], None), (["127.0.0.1", "80"], None), ("127.0.0.1:80", None), (None, None),
    (["1" * 100, 80], None), (["127.0.0.1", 80, 1], None),
])
def test_endpoint_records_are_parsed_strictly(value, want):
    assert parse_endpoint(value) == want


# ---------- direct matchmaking on the plane (averagers without a network) ----------


class _Liveness:
    def __init__(self, gone):
        self.gone = set(gone)

    def presumed_gone(self, index):
        return index in self.gone

    def observe(self, *, expected, present):
        pass


def join_directly(views, *, expected=frozenset({0, 1, 2}), patience=5.0):
    """``_join_directly`` of every averager in ``views`` ({index: (presumed gone, excluded)}) at once, each on its
    own plane (one plane per index of ``expected``); returns {index: member indices, or None for the DHT}."""
    async def main():
        planes = {i: TcpPlane(index=i, secret=SECRET, host="127.0.0.1", num_peers=8) for i in expected}
        ports = {i: await plane.start() for i, plane in planes.items()}
        averagers = {}
        for i, (gone, excluded) in views.items():
            averager = object.__new__(MoshpitAverager)
            averager.options = AveragerOptions(prefix="t", index=i, num_peers=8, transport="tcp")
            averager.plane, averager.liveness, averager.excluded = planes[i], _Liveness(gone), set(excluded)
            averager._endpoints = {j: ("127.0.0.1", port) for j, port in ports.items()}
            averager._timed_out = False
            averagers[i] = averager
        deadline = time.monotonic() + patience
        try:
            met = await asyncio.gather(*(a._join_directly("run.avg.r1.s0.g0", expected, deadline, _Traffic())
                                         for a in averagers.values()))
        finally:
            for plane in planes.values():
                await plane.close()
        return {i: None if m is None else [member.index for member in m] for i, m in zip(averagers, met)}

    return asyncio.run(asyncio.wait_for(main(), 120))


def test_a_planned_group_meets_directly_without_the_member_all_of_them_left_out():
    """A member everybody presumes gone (or left out after it went silent) is not waited for: the others still
    meet on the data plane, as the planned group less that member."""
    assert join_directly({0: ({2}, ()), 1: ({2}, ())}) == {0: [0, 1], 1: [0, 1]}
    assert join_directly({0: ((), {2}), 1: ((), {2})}) == {0: [0, 1], 1: [0, 1]}
    assert join_directly({0: ((), ()), 1: ((), ()), 2: ((), ())}) == {i: [0, 1, 2] for i in range(3)}


def test_members_that_disagree_on_who_is_left_out_meet_through_the_dht_without_waiting_out_their_patience():
    # peer 0 left peer 2 out, peer 1 did not: nobody goes ahead on the data plane with a group the others differ
    # on, and nobody waits for a JOIN that will not come (peer 0 sends none to peer 2) once a view differs or an
    # ABORT came: with an hour's patience the joins still end (the call below would otherwise hang for an hour)
    assert join_directly({0: ((), {2}), 1: ((), ()), 2: ((), ())}, patience=3600) == {0: None, 1: None, 2: None}


# ---------- real peers on the plane ----------


@pytest.fixture
def bootstrap(no_new_p2pd):
    net = PeerNetwork(NetworkOptions(prefix="enginetest", run_secret=TCP_SECRET)).start()
    yield ",".join(net.visible_maddrs())
    net.shutdown()


def run_peers(tmp_path, maddrs, *, live, die=None, evil=None, num_peers=N, gs=GS, ni=NI, more=lambda i: []):
    def extra(i):
        flags = ["--transport", "tcp", "--matchmaking-timeout", "20", "--allreduce-timeout", "5", *more(i)]
        if die and die[0] == i:
            flags += ["--die-in-step", str(die[1])]
        if evil and evil[0] == i:
            flags += ["--evil", evil[1]]
        return flags

    return run_engine_peers(str(tmp_path), maddrs, live=live, num_peers=num_peers, gs=gs, ni=ni, extra=extra)


@pytest.mark.parametrize("n, gs, ni", [(N, GS, NI), (4, 4, 1)])  # gs 4: three frames in flight per phase
def test_tcp_peers_reach_the_exact_mean_and_count_every_byte(tmp_path, bootstrap, n, gs, ni):
    codes = run_peers(tmp_path, bootstrap, live=list(range(n)), num_peers=n, gs=gs, ni=ni)
    assert codes == {i: 0 for i in range(n)}
    target = mean_of(range(n))
    payload = sum(t.numel() * 4 for t in initial_tensors(0))
    for i in range(n):
        tensors, report = load_result(tmp_path, i)
        assert [len(m) for m in report["members"]] == [gs] * ni and report["failed_steps"] == 0
        for got, want in zip(tensors, target):
            assert (got - want).abs().max().item() < 1e-5
        # per step: a shard to each group-mate, the averaged shard back to each (framed) and one JOIN frame each
        shard = payload // 4 // gs * 4
        framed = ni * (2 * (gs - 1) * frame_bytes(shard) + (gs - 1) * frame_bytes(32))
        assert abs(report["sent"] - framed) <= ni * 2 * (gs - 1) * 4, (report["sent"], framed)


def assert_four_peers_met_in_pairs_with_the_exact_mean(tmp_path, codes):
    """Peers 0-3 (gs 2, ni 2) all exited 0, met a group-mate in both steps and hold the exact global mean."""
    assert codes == {i: 0 for i in range(4)}
    target = mean_of(range(4))
    for i in range(4):
        tensors, report = load_result(tmp_path, i)
        assert [len(m) for m in report["members"]] == [2, 2] and report["failed_steps"] == 0, report
        for got, want in zip(tensors, target):
            assert (got - want).abs().max().item() < 1e-5


def test_a_straggler_is_waited_for_when_stragglers_are_expected(tmp_path, bootstrap):
    # peer 3 comes 15 s late, far past the 3-s matchmaking deadline; the others were told to expect stragglers
    # (as a peer is after a long training) and still meet it in their first group, and then everyone in theirs
    def more(i):
        return ["--matchmaking-timeout", "3", "--patience", "30"] + (["--late", "15"] if i == 3 else [])

    codes = run_peers(tmp_path, bootstrap, live=[0, 1, 2, 3], num_peers=4, gs=2, ni=2, more=more)
    assert_four_peers_met_in_pairs_with_the_exact_mean(tmp_path, codes)


def test_the_straggler_patience_is_one_budget_for_all_of_a_rounds_steps(monkeypatch):
    # a group held up in step 1 must not hold its members' groups up by the whole patience again in steps 2, 3:
    # what a step may still wait is what is left of the budget set after training
    import moshpit_all_reduce as mar

    now = [1000.0]
    monkeypatch.setattr(mar, "time", type("Clock", (), {"monotonic": staticmethod(lambda: now[0])}))
    averager = object.__new__(mar.MoshpitAverager)  # no network needed for the budget
    averager._patience_until = -float("inf")
    assert averager._patience() == 0.0
    averager.wait_for_stragglers(60.0)
    now[0] += 45.0  # step 1 waited 45 s for a straggler
    assert averager._patience() == 15.0
    now[0] += 30.0
    assert averager._patience() == 0.0  # steps 2 and 3 only get --matchmaking-timeout
    averager.wait_for_stragglers(60.0)  # the next round's budget
    assert averager._patience() == 60.0


def test_group_mates_whose_endpoint_records_never_landed_are_dialled_all_the_same(tmp_path, bootstrap):
    # no peer's data-plane endpoint record lands anywhere (at 125 peers on two cores some peers could not read
    # some group-mates' records for minutes): the endpoints the start barrier carried are enough to meet
    codes = run_peers(tmp_path, bootstrap, live=list(range(4)), num_peers=4, gs=2, ni=2,
                      more=lambda i: ["--hide-endpoint"])
    assert_four_peers_met_in_pairs_with_the_exact_mean(tmp_path, codes)


def test_an_endpoint_record_that_does_not_land_is_stored_again_with_backoff(monkeypatch):
    # the start barrier carries the endpoints, so a record no node takes need not be retried every 3 s: 125 peers
    # doing so kept the initial peer (the launcher's node) overloaded under a one-core CPU quota
    import moshpit_all_reduce as mar

    now, stores = [0.0], []
    real_sleep = asyncio.sleep

    async def fake_sleep(seconds):
        now[0] += seconds
        await real_sleep(0)

    class FakeRenewal:
        def __init__(self, dht, key):
            pass

        async def store(self, subkey, value, *, ttl):
            return True

    class FakeNetwork:
        dht = None
        p2p = type("P2P", (), {"peer_id": type("Id", (), {"to_bytes": staticmethod(lambda: b"me")})})

        async def store_shared(self, key, subkey, value, *, ttl, renewal=None):
            stores.append(now[0])
            return False  # no node takes it

    monkeypatch.setattr(mar, "dht_time", lambda: now[0])
    monkeypatch.setattr(mar, "Renewal", FakeRenewal)
    monkeypatch.setattr(mar.asyncio, "sleep", fake_sleep)
    averager = object.__new__(MoshpitAverager)
    averager.network, averager._round = FakeNetwork(), 1
    averager.options = AveragerOptions(prefix="t", index=0, num_peers=4, transport="tcp", heartbeat_interval=5.0)
    averager._endpoint, averager._endpoint_renewal = ["127.0.0.1", 4000], 0.0

    async def main():
        task = await averager._start_heartbeat()
        while now[0] < 120.0:
            await real_sleep(0)
        task.cancel()

    asyncio.run(main())
    gaps = [b - a for a, b in zip(stores, stores[1:])]
    assert len(stores) >= 4 and gaps[0] >= mar.ENDPOINT_RETRY, stores
    assert all(later > earlier for earlier, later in zip(gaps, gaps[1:]) if later < averager.options.dht_ttl / 4), gaps
    assert len(stores) <= 7, stores  # 3, 6, 12, 24, 48 s apart (every 3 s: 40 stores in 120 s)


def test_tcp_absent_peer_falls_back_to_the_dht_and_does_not_block(tmp_path, bootstrap):
    survivors = list(range(N - 1))  # peer 7 is a participant but never shows up
    codes = run_peers(tmp_path, bootstrap, live=survivors)
    assert codes == {i: 0 for i in survivors}
    finals = {i: load_result(tmp_path, i) for i in survivors}
    assert all(N - 1 not in members for _, report in finals.values() for members in report["members"])
    start = mean_of(survivors)
    for k in range(2):  # averaging only among survivors conserves their sum exactly
        stack = torch.stack([finals[i][0][k] for i in survivors])
        assert (stack.mean(0) - start[k]).abs().max().item() < 1e-5
    assert finals[6][1]["members"][0] == [6]  # peer 7's group-mate found nobody and kept its values


def test_tcp_peer_killed_mid_step_does_not_block_the_others(tmp_path, bootstrap):
    codes = run_peers(tmp_path, bootstrap, live=list(range(N)), die=(N - 1, 1))
    survivors = list(range(N - 1))
    assert codes[N - 1] == -signal.SIGKILL
    assert {i: codes[i] for i in survivors} == {i: 0 for i in survivors}
    assert not alive(int(open(tmp_path / f"peer{N - 1}.pt.pid").read()))
    start = mean_of(survivors)
    for i in survivors:
        for k, got in enumerate(load_result(tmp_path, i)[0]):
            assert bool(torch.isfinite(got).all())
            init = torch.stack([initial_tensors(j)[k] for j in survivors])
            assert (got - start[k]).abs().max().item() < (init - start[k]).abs().max().item()


@pytest.mark.parametrize("mode", ["nan", "shape"])
def test_tcp_bad_groupmate_never_breaks_the_honest_peers(tmp_path, bootstrap, mode):
    codes = run_peers(tmp_path, bootstrap, live=[0, 1, 2], evil=(2, mode), num_peers=3, gs=3, ni=1)
    assert codes[0] == 0 and codes[1] == 0, (tmp_path / "peer0.log").read_text()[-3000:]
    logs = (tmp_path / "peer0.log").read_text() + (tmp_path / "peer1.log").read_text()
    assert "rejected data from peer 2" in logs
    own = [initial_tensors(i) for i in range(3)]
    for i in (0, 1):
        tensors, report = load_result(tmp_path, i)
        assert report["members"] == [[0, 1, 2]] and report["failed_steps"] == 1
        for k, got in enumerate(tensors):  # local values, the honest mean, or the mean of all three (shard 2)
            candidates = (own[i][k], (own[0][k] + own[1][k]) / 2, sum(o[k] for o in own) / 3)
            close = torch.zeros_like(got, dtype=torch.bool)
            for c in candidates:
                close |= (got - c).abs() < 1e-5
            assert bool(close.all()) and bool(torch.isfinite(got).all())
