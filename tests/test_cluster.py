"""Cluster housekeeping without a cluster: Slurm allocation parsing, peer ranges, resume flags, checkpoints,
and the /dev/shm watchdog."""
import os
import subprocess
import sys
import time

import pytest
import torch

import config_setup as cs
from config_setup import ConfigError, parse_config

MASK = tuple(range(8))


@pytest.mark.parametrize("env, expected", [
    ({}, dict(launcher_index=0, num_launchers=1, job_id=None, pin=True, gpus=None)),
    ({"SLURM_JOB_ID": "77", "SLURM_CPUS_ON_NODE": "8", "SLURM_NTASKS": "1"},
     dict(launcher_index=0, num_launchers=1, job_id="77", pin=True)),
    # the batch script itself is one launcher even if the job has more tasks
    ({"SLURM_JOB_ID": "78", "SLURM_NTASKS": "2", "SLURM_PROCID": "0", "SLURM_CPUS_ON_NODE": "8"},
     dict(num_launchers=1)),
    # inside `srun`: one launcher per task
    ({"SLURM_JOB_ID": "79", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "4", "SLURM_PROCID": "2", "SLURM_NODEID": "2"},
     dict(launcher_index=2, num_launchers=4)),
    # no CPU binding: the mask is wider than what Slurm granted, so nobody may be pinned
    ({"SLURM_JOB_ID": "80", "SLURM_CPUS_ON_NODE": "2"}, dict(pin=False)),
    ({"CUDA_VISIBLE_DEVICES": "2,3"}, dict(gpus=("2", "3"))),
    ({"SLURM_ARRAY_JOB_ID": "90", "SLURM_JOB_ID": "93", "SLURM_ARRAY_TASK_ID": "3", "SLURM_RESTART_COUNT": "1"},
     dict(job_id="90", array_task="3", restart_count=1)),
])
def test_allocation_from_slurm_environment(env, expected):
    allocation = cs.read_allocation(env, affinity=MASK)
    assert allocation.cores == MASK
    for key, value in expected.items():
        assert getattr(allocation, key) == value, key


def test_attempt_changes_with_requeue():
    first = cs.read_allocation({"SLURM_JOB_ID": "5"}, affinity=MASK)
    again = cs.read_allocation({"SLURM_JOB_ID": "5", "SLURM_RESTART_COUNT": "1"}, affinity=MASK)
    assert first.attempt == "5.0" and again.attempt == "5.1"
    assert cs.read_allocation({}, affinity=MASK).attempt is None


def test_peer_ranges_split_evenly_and_cover_everything():
    for peers, parts in ((16, 2), (10, 3), (64, 5), (3, 3)):
        ranges = [cs.split_peer_range(peers, parts, i) for i in range(parts)]
        assert ranges[0][0] == 0 and ranges[-1][1] == peers
        assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
        sizes = [stop - start for start, stop in ranges]
        assert max(sizes) - min(sizes) <= 1
    with pytest.raises(ConfigError):
        cs.split_peer_range(2, 3, 0)


def test_srun_task_gets_its_peers_run_dir_and_bootstrap_file():
    env = {"SLURM_JOB_ID": "4242", "SLURM_STEP_ID": "0", "SLURM_NTASKS": "2", "SLURM_PROCID": "1"}
    cfg = parse_config(["--np", "16", "-sd", "3"], env=env)
    assert cfg.peer_range == (8, 16)
    assert cfg.run_dir.endswith("-job4242")
    assert cfg.initial_peers == os.path.join(cfg.run_dir, "bootstrap.json")
    first = parse_config(["--np", "16", "-sd", "3"], env={**env, "SLURM_PROCID": "0"})
    assert first.peer_range == (0, 8) and first.run_dir == cfg.run_dir and first.initial_peers is None
    array = parse_config(["--np", "4"], env={"SLURM_ARRAY_JOB_ID": "9", "SLURM_ARRAY_TASK_ID": "2", "SLURM_JOB_ID": "11"})
    assert array.run_dir.endswith("-job9_2")


def test_resume_takes_the_saved_config_and_refuses_changes(tmp_path):
    cfg = parse_config(["--np", "8", "--lr", "0.05", "--rounds", "20", "--run-dir", str(tmp_path)])
    cs.save_config(cfg, str(tmp_path / "config.json"))
    resumed = parse_config(["--resume", str(tmp_path), "--rounds", "40"])
    assert resumed.resume and resumed.learning_rate == 0.05 and resumed.rounds == 40 and resumed.num_peers == 8
    assert resumed.run_dir == str(tmp_path)
    with pytest.raises(ConfigError, match="learning_rate"):
        parse_config(["--resume", str(tmp_path), "--lr", "0.2"])
    with pytest.raises(ConfigError, match="cannot read"):
        parse_config(["--resume", str(tmp_path / "nothing")])


def test_checkpoint_round_trip(tmp_path):
    import mar_fl
    from ml_tasks import BatchOrder
    from peer_aggregation_logic import MarAveraging

    def state(seed):
        torch.manual_seed(seed)
        model = torch.nn.Linear(6, 3)
        momentum = [torch.randn_like(p) for p in model.parameters()]
        order = BatchOrder(indices=torch.arange(50).numpy(), seed=1, peer=2)
        order.next_batch(7)
        return mar_fl.PeerState(index=2, model=model, momentum=momentum, order=order, round_index=5)

    saved = state(0)
    torch.manual_seed(123)
    mar_fl.save_checkpoint(str(tmp_path), saved, MarAveraging())
    expected_draw = torch.rand(3)
    loaded = state(1)
    loaded.round_index = 0
    mar_fl.load_checkpoint(mar_fl.checkpoint_path(str(tmp_path), 2, 5), loaded, MarAveraging(), device="cpu")
    assert loaded.round_index == 5 and (loaded.order.epoch, loaded.order.cursor) == (0, 7)
    assert all(torch.equal(a, b) for a, b in zip(saved.model.state_dict().values(), loaded.model.state_dict().values()))
    assert all(torch.equal(a, b) for a, b in zip(saved.momentum, loaded.momentum))
    assert torch.equal(torch.rand(3), expected_draw)  # RNG continues where the checkpoint was taken
    assert mar_fl.common_checkpoint_round(str(tmp_path), 3) == 0  # peers 0 and 1 have none
    for round_index in (2, 4, 6, 8):
        for peer in range(2):
            s = state(0)
            s.index, s.round_index = peer, round_index
            mar_fl.save_checkpoint(str(tmp_path), s, MarAveraging())
    assert mar_fl.checkpoint_rounds(str(tmp_path), 0) == [4, 6, 8]  # the last three are kept
    assert mar_fl.common_checkpoint_round(str(tmp_path), 2) == 8
    assert not [n for n in os.listdir(tmp_path / "checkpoints" / "peer_0000") if n.endswith(".tmp")]


HOLD = "import sys, time; f = open(sys.argv[1], 'w'); f.write('x' * 4096); f.flush(); time.sleep(60)"


def test_watchdog_keeps_live_and_foreign_segments_and_removes_a_dead_run_owned_one(tmp_path):
    from shared_memory_handling import ShmWatchdog

    shm = tmp_path / "shm"
    shm.mkdir()
    owned, live, foreign = shm / "psm_dead_run", shm / "psm_live_run", shm / "psm_other_run"
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(owned)])
    keeper = subprocess.Popen([sys.executable, "-c", HOLD, str(live)])
    foreign.write_bytes(b"y" * 100)  # created by nobody of ours
    torch_named = shm / f"torch_{holder.pid}_123_0"
    torch_named.write_bytes(b"z")
    try:
        while not (owned.exists() and live.exists()):
            time.sleep(0.05)
        time.sleep(0.3)
        run_pids = {holder.pid, keeper.pid}
        dog = ShmWatchdog(run_pids=lambda: run_pids, shm_dir=str(shm), warn_fraction=1.0)
        assert dog.sweep() == []  # everything is in use or not ours yet
        assert str(owned) in dog.owned and str(live) in dog.owned and str(foreign) not in dog.owned
        holder.kill()
        holder.wait()
        removed = dog.sweep()
        assert sorted(removed) == sorted([str(owned), str(torch_named)])
        assert live.exists() and foreign.exists() and not owned.exists()
    finally:
        for proc in (holder, keeper):
            proc.kill()
            proc.wait()
    assert dog.stop() == [str(live)]  # at exit, whatever the run created and nobody uses goes
    assert foreign.exists()


def test_watchdog_warns_past_the_threshold(tmp_path):
    from shared_memory_handling import ShmWatchdog

    warnings = []
    dog = ShmWatchdog(run_pids=lambda: [], shm_dir=str(tmp_path), warn_fraction=1e-9, on_warning=warnings.append)
    dog.sweep()
    assert warnings and "full" in warnings[0]
    assert dog.metrics()["shm_used_fraction"] > 0
