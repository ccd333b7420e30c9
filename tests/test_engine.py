"""Integration: real hivemind peers (separate processes) averaging over libp2p on 127.0.0.1."""
import signal

import pytest
import torch

from conftest import alive
from engine_peer import initial_tensors, load_result, mean_of, run_engine_peers
from peer_synchronization import NetworkOptions, PeerNetwork

N, GS, NI = 8, 2, 3


@pytest.fixture
def bootstrap(no_new_p2pd):
    net = PeerNetwork(NetworkOptions()).start()
    yield ",".join(net.visible_maddrs())
    net.shutdown()


def run_peers(tmp_path, maddrs, *, live, die=None, compression="none", patient=30):
    # with every peer present nothing should time out, even on a loaded machine (30 s); a fault test's deadlines
    # decide what a missing peer costs: the absent peer's (3-4 s, the engine peer's defaults) are never met by
    # anybody, while a peer killed mid-round leaves exchanges behind that must still fit a loaded machine's pace
    waits = ["--matchmaking-timeout", str(patient), "--allreduce-timeout", str(patient)] if patient else []

    def extra(i):
        return ["--compression", compression, *waits] + (
            ["--die-in-step", str(die[1])] if die and die[0] == i else [])

    return run_engine_peers(str(tmp_path), maddrs, live=live, num_peers=N, gs=GS, ni=NI, extra=extra)


def test_all_present_reach_exact_global_mean(tmp_path, bootstrap):
    codes = run_peers(tmp_path, bootstrap, live=list(range(N)))
    assert codes == {i: 0 for i in range(N)}
    target = mean_of(range(N))
    sent = []
    for i in range(N):
        tensors, report = load_result(tmp_path, i)
        assert [len(m) for m in report["members"]] == [GS] * NI
        assert report["failed_steps"] == 0, report
        for got, want in zip(tensors, target):
            assert (got - want).abs().max().item() < 1e-5
        sent.append(report["sent"])
    # butterfly: 2(M-1)/M of the payload per step, on average over peers (shards need not be equal per peer)
    ideal = 2 * (GS - 1) / GS * NI * sum(t.numel() * 4 for t in initial_tensors(0))
    assert abs(sum(sent) / N - ideal) < 0.1 * ideal


def _assert_survivors_average_among_themselves(tmp_path, survivors, *, exact_mass):
    finals = {i: load_result(tmp_path, i) for i in survivors}
    start = mean_of(survivors)
    for k in range(2):
        stack = torch.stack([finals[i][0][k] for i in survivors])
        init = torch.stack([initial_tensors(i)[k] for i in survivors])
        if exact_mass:  # averaging only among survivors conserves their sum exactly
            assert (stack.mean(0) - start[k]).abs().max().item() < 1e-5
        spread_before = (init - start[k]).abs().max().item()
        assert (stack - start[k]).abs().max().item() < 0.75 * spread_before


def test_absent_peer_does_not_block_the_others(tmp_path, bootstrap):
    survivors = list(range(N - 1))  # peer 7 is a participant but never shows up
    codes = run_peers(tmp_path, bootstrap, live=survivors, patient=0)
    assert codes == {i: 0 for i in survivors}
    for i in survivors:
        _, report = load_result(tmp_path, i)
        assert all(N - 1 not in members for members in report["members"])
    _assert_survivors_average_among_themselves(tmp_path, survivors, exact_mass=True)


def test_peer_killed_mid_step_does_not_block_the_others(tmp_path, bootstrap):
    codes = run_peers(tmp_path, bootstrap, live=list(range(N)), die=(N - 1, 1), patient=10)
    survivors = list(range(N - 1))
    assert codes[N - 1] == -signal.SIGKILL
    assert {i: codes[i] for i in survivors} == {i: 0 for i in survivors}
    pid = int(open(tmp_path / f"peer{N - 1}.pt.pid").read())
    assert not alive(pid)  # the dead peer's daemon was reaped through its process group
    _assert_survivors_average_among_themselves(tmp_path, survivors, exact_mass=False)


def test_fp16_compression_halves_traffic(tmp_path, bootstrap):
    codes = run_peers(tmp_path, bootstrap, live=list(range(N)), compression="fp16")
    assert set(codes.values()) == {0}
    target = mean_of(range(N))
    finals = [load_result(tmp_path, i) for i in range(N)]
    ideal = 2 * (GS - 1) / GS * NI * sum(t.numel() * 4 for t in initial_tensors(0))
    assert sum(report["sent"] for _, report in finals) / N < 0.6 * ideal
    for tensors, _ in finals:
        assert max((a - b).abs().max().item() for a, b in zip(tensors, target)) < 1e-2
