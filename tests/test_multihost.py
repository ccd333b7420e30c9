"""Multi-host runs on separate network stacks (namespaces with their own addresses), never only on 127.0.0.1."""
import json
import os
import subprocess
import sys

import pytest
import torch

import netns
from conftest import ROOT

REASON = netns.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"multi-host tests skipped: {REASON}")

TIMING = {"round_seconds", "train_seconds", "aggregation_seconds", "elapsed_seconds"}
NP, ROUNDS = 9, 3
FLAGS = ["--np", str(NP), "--gs", "3", "--gk", "2", "--ni", "2", "--rounds", str(ROUNDS), "--tf", str(ROUNDS),
         "--iv", "2", "-sd", "5", "--wandb", "disabled", "--matchmaking-timeout", "60", "--startup-timeout", "300"]


def mar_fl(run_dir, data_dir, *extra):
    return [sys.executable, os.path.join(ROOT, "mar_fl.py"), *FLAGS, "--data-dir", data_dir,
            "--run-dir", str(run_dir), *extra]


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def final_models(run_dir):
    models = []
    for i in range(NP):
        path = os.path.join(run_dir, "checkpoints", f"peer_{i:04d}", f"round_{ROUNDS:06d}.pt")
        models.append(torch.load(path, map_location="cpu", weights_only=True)["model"])
    return models


def assert_one_global_model_and_completed(run_dir):
    models = final_models(run_dir)
    for model in models[1:]:
        for name, tensor in model.items():
            assert (tensor - models[0][name]).abs().max().item() < 1e-5, name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["failed_steps"] == 0


def run_on_three_hosts(run_dir, data_dir, hosts, *extra, host):
    """One launcher per host, peers 0-2 / 3-5 / 6-8, listening on ``host(i)``; all must exit 0."""
    procs = []
    for i in range(3):
        flags = ["--peer-range", f"{3 * i}-{3 * i + 2}", "--host", host(i), *extra]
        if i:
            flags += ["--initial-peers", str(run_dir / "bootstrap.json")]
        procs.append(subprocess.Popen(hosts.wrap(i, mar_fl(run_dir, data_dir, *flags)),
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0], "\n".join(err[-2000:] for _, err in outputs)


@pytest.fixture
def three_hosts():
    hosts = netns.up(3, tag="mh")
    try:
        yield hosts
    finally:
        hosts.down()
        assert not netns.namespaces_left(hosts.prefix), "namespaces left behind"


@pytest.fixture(scope="module")
def one_host_run(tmp_path_factory, data_dir):
    run_dir = tmp_path_factory.mktemp("onehost") / "run"
    done = subprocess.run(mar_fl(run_dir, data_dir), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def test_three_hosts_average_exactly_like_one_host(tmp_path, data_dir, one_host_run, three_hosts, no_new_p2pd):
    """One launcher per host, peers 0-2 / 3-5 / 6-8: the same rows (bar timing) and bytes as on one host, every
    peer ends with the same global model, no step failed."""
    run_dir = tmp_path / "run"
    run_on_three_hosts(run_dir, data_dir, three_hosts, host=three_hosts.address)

    bootstrap = json.loads((run_dir / "bootstrap.json").read_text())["initial_peers"]
    assert all(m.startswith(f"/ip4/{three_hosts.address(0)}/") for m in bootstrap)
    multi, single = rows(run_dir), rows(one_host_run)
    assert [r["round"] for r in multi] == list(range(1, ROUNDS + 1))
    for got, want in zip(multi, single):
        assert got["failed_steps"] == 0 and got["bytes_sent_per_peer"] > 0
        assert {k: v for k, v in got.items() if k not in TIMING} == {k: v for k, v in want.items() if k not in TIMING}
    assert_one_global_model_and_completed(run_dir)
    logs = "".join(open(os.path.join(run_dir, "logs", name)).read() for name in os.listdir(run_dir / "logs"))
    assert "kept local" not in logs and "step aborted" not in logs


def test_zero_address_announces_the_hosts_real_address(tmp_path, data_dir, three_hosts, no_new_p2pd):
    """``--host 0.0.0.0``: what the bootstrap file and the address records announce is the host's own address,
    never 127.0.0.1 (which, dialled from another host, reaches that host itself)."""
    from peer_synchronization import advertised_maddrs

    code = ("import sys; sys.path.insert(0, %r)\n"
            "from peer_synchronization import NetworkOptions, PeerNetwork\n"
            "net = PeerNetwork(NetworkOptions(host='0.0.0.0')).start()\n"
            "print(' '.join(net.visible_maddrs())); net.shutdown()\n") % ROOT
    out = subprocess.run(three_hosts.wrap(1, [sys.executable, "-c", code]), capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    maddrs = out.stdout.split()
    assert maddrs and all(m.startswith(f"/ip4/{three_hosts.address(1)}/tcp/") for m in maddrs), maddrs
    pid = maddrs[0].rsplit("/", 1)[1]
    announced = advertised_maddrs([f"/ip4/0.0.0.0/tcp/1/p2p/{pid}"], announce_host="203.0.113.7")
    assert announced == [f"/ip4/203.0.113.7/tcp/1/p2p/{pid}"]


def test_three_hosts_average_exactly_over_the_tcp_plane(tmp_path, data_dir, one_host_run, three_hosts, no_new_p2pd):
    """``--transport tcp`` across hosts: every tensor goes peer to peer at the address the peer announced (a wrong
    address would not connect across namespaces); the same losses and accuracy as the libp2p run on one host, one
    global model on every peer, no step failed; peers on host 1 listen on ``0.0.0.0`` and announce its address."""
    run_dir = tmp_path / "run"
    run_on_three_hosts(run_dir, data_dir, three_hosts, "--transport", "tcp",
                       host=lambda i: "0.0.0.0" if i == 1 else three_hosts.address(i))
    multi, single = rows(run_dir), rows(one_host_run)
    assert [r["round"] for r in multi] == list(range(1, ROUNDS + 1))
    for got, want in zip(multi, single):
        assert got["failed_steps"] == 0 and got["bytes_sent_per_peer"] > 0
        assert got["train_loss"] == pytest.approx(want["train_loss"], abs=1e-5)
        if want["test_accuracy"] is None:
            assert got["test_accuracy"] is None
        else:
            assert got["test_accuracy"] == pytest.approx(want["test_accuracy"], abs=0.2)
    assert_one_global_model_and_completed(run_dir)
