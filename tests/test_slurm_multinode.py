"""``slurm/mar_fl_multinode.sbatch``, unchanged, on a real two-node Slurm whose nodes are separate hosts.

Each slurmd runs in its own network namespace (``tests/netns.py``: node n0 = 198.51.100.1, n1 = 198.51.100.2),
slurmctld in the root namespace (on the segment as 198.51.100.254). So the two launchers that ``srun`` starts
really are on two network stacks: a peer that announced or dialled a loopback address, or anything else that only
works when every node is one machine, fails here. Skipped (with the reason) only without Slurm/munge or without
the right to make namespaces.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

import netns
from config_setup import split_peer_range
from conftest import ROOT
from slurm_cluster import SlurmCluster, missing_binaries

NP, ROUNDS = 8, 4
FLAGS = ["--np", str(NP), "--gs", "2", "--gk", "3", "--ni", "3", "--rounds", str(ROUNDS), "--tf", "2", "--iv", "2",
         "-sd", "7", "--wandb", "disabled", "--matchmaking-timeout", "60", "--startup-timeout", "300"]


def _skip_reason():
    missing = missing_binaries()
    if missing:
        return f"Slurm/munge not installed ({', '.join(missing)}); .ci/run installs them as root"
    reason = netns.unavailable_reason()
    return f"network namespaces unavailable: {reason}" if reason else None


@pytest.fixture(scope="module")
def two_node_slurm(tmp_path_factory):
    reason = _skip_reason()
    if reason:
        pytest.skip(reason)
    if subprocess.run(["ip", "link", "show", "mflhost"], capture_output=True).returncode == 0:
        # the kit's root attachment has one fixed name: a second set with attach_root would share the first's
        pytest.fail("veth 'mflhost' exists: another namespace set has the root namespace attached; "
                    "stop it (its down.sh) first")
    hosts = netns.up(2, tag="sl", attach_root=True)
    cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm2")), hosts=hosts)
    try:
        try:
            cluster.start()
        except RuntimeError as e:
            pytest.fail(f"could not start a two-node Slurm cluster in namespaces: {e}")
        yield cluster
    finally:
        cluster.stop()
        hosts.down()
        assert not netns.namespaces_left(hosts.prefix), "namespaces left behind"
        assert not cluster._leftover_pids(), "processes of the cluster's jobs left behind"


def rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_multinode_sbatch_averages_across_two_nodes(two_node_slurm, tmp_path, data_dir, no_new_p2pd):
    slurm, hosts = two_node_slurm, two_node_slurm.hosts
    run_dir = tmp_path / "run"
    where = tmp_path / "launchers.txt"
    env = {**slurm.env, "MARFL_RUN_DIR": str(run_dir), "MARFL_PYTHON": _recording_python(tmp_path, where),
           "MARFL_OFFLINE": "1"}
    done = subprocess.run(
        ["sbatch", "--parsable", "--wait", f"--output={tmp_path}/slurm-%j.out", "--nodes=2",
         "--ntasks-per-node=1", f"--cpus-per-task={slurm.cpus}", "slurm/mar_fl_multinode.sbatch",
         *FLAGS, "--data-dir", data_dir],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    log = "".join(open(os.path.join(tmp_path, n)).read() for n in os.listdir(tmp_path) if n.startswith("slurm-"))
    assert done.returncode == 0, done.stderr + log[-4000:]

    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["failed_steps"] == 0, summary
    got = rows(run_dir)
    assert [r["round"] for r in got] == list(range(1, ROUNDS + 1))
    for r in got:  # tensors moved every round, and no MAR step fell back to local values
        assert r["bytes_sent_per_peer"] > 0 and r["failed_steps"] == 0, r
        assert r["reporting_peers"] == NP and r["participating_peers"] == NP, r

    # launcher 0 ran on n0 and announced n0's own address (never a loopback or the wildcard) ...
    bootstrap = json.loads((run_dir / "bootstrap.json").read_text())
    assert bootstrap["initial_peers"], bootstrap
    assert all(m.startswith(f"/ip4/{hosts.address(0)}/tcp/") for m in bootstrap["initial_peers"]), bootstrap
    assert log.count("MAR-FL run dir") == 2, log[-4000:]
    assert "kept local" not in log and "step aborted" not in log
    # srun's task k ran on node n<k>, inside that node's network namespace; task k runs peers 4k..4k+3
    launchers = sorted(tuple(line.split()) for line in where.read_text().splitlines())
    namespaces = [str(os.stat(f"/run/netns/{hosts.namespace(i)}").st_ino) for i in range(2)]
    assert launchers == [("0", "n0", namespaces[0]), ("1", "n1", namespaces[1])], (launchers, namespaces)
    assert [split_peer_range(NP, 2, k) for k in range(2)] == [(0, 4), (4, 8)]  # what each task runs

    # with gs=2, gk=3, ni=3 and 8 peers each round's MAR is an exact global average, which needs groups that
    # span the two nodes (peers 0-3 on n0, 4-7 on n1): every peer ends with the same model
    models = [torch.load(run_dir / "checkpoints" / f"peer_{i:04d}" / f"round_{ROUNDS:06d}.pt", map_location="cpu",
                         weights_only=True)["model"] for i in range(NP)]
    for i, model in enumerate(models[1:], 1):
        for name, tensor in model.items():
            diff = (tensor - models[0][name]).abs().max().item()
            assert diff < 1e-5, f"peer {i} {name}: {diff}"


def _recording_python(folder, where):
    """A MARFL_PYTHON that notes, per launcher, srun's task id, the node and its network namespace, then runs
    the real interpreter (the job script is unchanged: MARFL_PYTHON is its documented hook)."""
    shim = folder / "python"
    shim.write_text("#!/bin/sh\n"
                    f'echo "$SLURM_PROCID $SLURMD_NODENAME $(stat -L -c %i /proc/self/ns/net)" >> {where}\n'
                    f'exec {sys.executable} "$@"\n')
    shim.chmod(0o755)
    return str(shim)
