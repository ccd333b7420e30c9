"""DHT barriers and bootstrap files with real hivemind DHT nodes on 127.0.0.1 (in one process)."""
import threading

import pytest

from peer_synchronization import NetworkOptions, PeerNetwork, barrier, parse_initial_peers, write_bootstrap_file


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


def test_barrier_returns_who_arrived_and_respects_the_deadline(networks):
    # peers 0-2 arrive; peer 3 is expected but never comes: the barrier ends at its deadline with {0, 1, 2}
    results = run_barriers(networks, lambda i: "run.barrier", expected=range(4), timeout=3)
    assert all(arrived == {0, 1, 2} for arrived in results.values())


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
