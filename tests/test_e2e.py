"""End-to-end: the launcher, real peer processes, MNIST from ../shared/data."""
import json
import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from conftest import ROOT, alive, descendants
from shared_memory_handling import peer_pids

TIMING = {"round_seconds", "train_seconds", "aggregation_seconds", "elapsed_seconds"}
ROUND_KEYS = {"round", "train_loss", "test_accuracy", "test_loss", "participating_peers", "bytes_sent_per_peer",
              "round_seconds", "train_seconds", "aggregation_seconds", "avg_group_size"}
SUMMARY_KEYS = {"best_test_accuracy", "final_test_accuracy", "rounds", "wall_seconds", "seconds_to_target"}


def shm_entries() -> set:
    return set(os.listdir("/dev/shm"))


def launch(run_dir, data_dir, *extra, rounds=4):
    cmd = [sys.executable, os.path.join(ROOT, "mar_fl.py"), "--np", "4", "--gs", "2", "--gk", "2", "--ni", "2",
           "--rounds", str(rounds), "--tf", "2", "--iv", "4", "-sd", "3", "--data-dir", data_dir,
           "--run-dir", str(run_dir), "--wandb", "disabled", "--matchmaking-timeout", "30", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for_first_round(run_dir, timeout=300.0):
    deadline = time.time() + timeout
    metrics = run_dir / "metrics.jsonl"
    while time.time() < deadline and not (metrics.exists() and metrics.stat().st_size > 0):
        time.sleep(0.5)


def read_metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir):
    run_dir = tmp_path_factory.mktemp("e2e") / "run"
    shm_before = shm_entries()
    proc = launch(run_dir, data_dir)
    out, err = proc.communicate(timeout=600)
    return run_dir, proc.returncode, out, err, shm_before


def test_run_completes_and_run_dir_is_complete(finished_run, no_new_p2pd):
    run_dir, code, out, err, shm_before = finished_run
    assert code == 0, err[-2000:]
    for name in ("config.json", "metrics.jsonl", "summary.json"):
        assert (run_dir / name).is_file()
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert all(ROUND_KEYS <= set(r) for r in rows)
    assert all(r["participating_peers"] == 4 and r["avg_group_size"] == 2 for r in rows)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary) and summary["rounds"] == 4
    assert sum(1 for line in out.splitlines() if line.startswith("round ")) == 4  # one status line per round
    assert not (shm_entries() - shm_before)


def test_accuracy_rises(finished_run):
    rows = read_metrics(finished_run[0])
    tested = [r["test_accuracy"] for r in rows if r["test_accuracy"] is not None]
    assert len(tested) == 2 and tested[1] > tested[0] > 10.0


def test_same_seed_same_metrics(finished_run, tmp_path, data_dir, no_new_p2pd):
    proc = launch(tmp_path / "again", data_dir)
    proc.communicate(timeout=600)
    assert proc.returncode == 0
    strip = lambda rows: [{k: v for k, v in r.items() if k not in TIMING} for r in rows]  # noqa: E731
    assert strip(read_metrics(tmp_path / "again")) == strip(read_metrics(finished_run[0]))


def test_sigterm_stops_everything_cleanly(tmp_path, data_dir, no_new_p2pd):
    shm_before = shm_entries()
    run_dir = tmp_path / "term"
    proc = launch(run_dir, data_dir, rounds=500)
    wait_for_first_round(run_dir)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143
    assert "Traceback" not in err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["rounds"] >= 1
    assert not (shm_entries() - shm_before)


def test_two_hosts_share_a_run_through_the_bootstrap_file(tmp_path, data_dir, no_new_p2pd):
    """Two launchers emulate two nodes: node 0 runs peers 0-1 and writes bootstrap.json, node 1 runs 2-3."""
    run_dir = tmp_path / "multi"
    node0 = launch(run_dir, data_dir, "--peer-range", "0-1", rounds=2)
    node1 = launch(run_dir, data_dir, "--peer-range", "2-3", "--initial-peers", str(run_dir / "bootstrap.json"),
                   rounds=2)
    out1, err1 = node1.communicate(timeout=600)
    out0, err0 = node0.communicate(timeout=600)
    assert (node0.returncode, node1.returncode) == (0, 0), err0[-1500:] + err1[-1500:]
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2]
    assert all(r["reporting_peers"] == 4 and r["participating_peers"] == 4 for r in rows)
    assert "round " not in out1  # only the launcher of peer 0 reports


def test_peers_stop_when_the_launcher_is_killed(tmp_path, data_dir, no_new_p2pd):
    """SIGKILL leaves the launcher no chance to clean up: its peers notice and stop their p2pd themselves."""
    run_dir = tmp_path / "killed"
    proc = launch(run_dir, data_dir, rounds=500)
    wait_for_first_round(run_dir)
    family = descendants(proc.pid)  # forkserver, peers and their p2pd, before the launcher is gone
    # the peers and their p2pds run below the launcher and its own DHT node, which serves them all
    from mar_fl import PEER_NICE

    base = os.getpriority(os.PRIO_PROCESS, proc.pid)
    niceness = {pid: (psutil.Process(pid).ppid() == proc.pid, os.getpriority(os.PRIO_PROCESS, pid)) for pid in family}
    assert sum(not own for own, _ in niceness.values()) >= 4  # two peers, two p2pds at least
    assert all(nice == (base if own else base + PEER_NICE) for own, nice in niceness.values()), niceness
    proc.kill()
    proc.wait()
    try:
        deadline = time.time() + 90
        while time.time() < deadline and any(alive(pid) for pid in family):
            time.sleep(0.5)
        assert not [pid for pid in family if alive(pid)]
    finally:
        for pid in family:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def peer_records(run_dir):
    """``{round: [record, ...]}`` from the peers' own files."""
    rounds = {}
    for name in sorted(os.listdir(run_dir / "peers")):
        with open(run_dir / "peers" / name) as f:
            for line in f:
                rec = json.loads(line)
                rounds.setdefault(rec["round"], []).append(rec)
    return rounds


def assert_idle_peers_waited_for_the_round(run_dir, participants_of):
    """A peer that did not aggregate in a round left it only after every aggregating peer of the round was done
    (it did not run ahead into the next round's groups), and its idle wait is reported apart from its round."""
    for rnd, records in peer_records(run_dir).items():
        participants = participants_of(rnd)
        # an aggregating peer announces that it is done right after this instant (t_start + train + aggregation)
        done = max((r["t_start"] + r["train_seconds"] + r["aggregation_seconds"] for r in records
                    if r["peer"] in participants), default=0.0)
        for r in records:
            if r["peer"] in participants:
                assert "wait_seconds" not in r
            else:
                assert r["t_end"] >= done - 1e-3, (rnd, r["peer"])
                assert r["wait_seconds"] >= 0.0
                assert r["round_seconds"] + r["wait_seconds"] <= r["t_end"] - r["t_start"] + 1e-3
        working = [r["round_seconds"] for r in records if {"train_loss", "bytes_sent", "test_count"} & r.keys()]
        row = next(row for row in read_metrics(run_dir) if row["round"] == rnd)
        assert row["round_seconds"] == max(working)
        assert ("wait_seconds" in row) == (len(participants) < len(records))


def test_a_stop_decided_by_the_launcher_reaches_every_peer_at_the_same_round(tmp_path, data_dir, no_new_p2pd):
    """A met --target-acc: the launcher publishes the last round (the newest it has seen + 2) under the control
    key, every peer reads it straight from the key's nodes once a round, and all of them stop after that round."""
    run_dir = tmp_path / "target"
    proc = launch(run_dir, data_dir, "--target-acc", "1", "--tf", "1", rounds=12)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-2000:]
    rows = read_metrics(run_dir)
    last = rows[-1]["round"]
    assert 3 <= last <= 4 and [r["round"] for r in rows] == list(range(1, last + 1))
    for index in range(4):
        with open(run_dir / "peers" / f"peer_{index:04d}.jsonl") as f:
            assert [json.loads(line)["round"] for line in f] == list(range(1, last + 1))
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["rounds"] == last


@pytest.mark.parametrize("up, ap", [(50, 50), (100, 50)], ids=["same-peers", "train-without-aggregating"])
def test_peers_that_sit_a_round_out_do_not_run_ahead(tmp_path, data_dir, no_new_p2pd, up, ap):
    """--up 50 --ap 50 (and --ap below --up): peers that do not aggregate in a round wait until the round's
    aggregating peers are done, so no group waits for members still busy with an earlier round: no matchmaking
    runs into its deadline, no step fails, and the idle wait is recorded apart (wait_seconds), not as round time."""
    from peer_synchronization import aggregation_participants

    run_dir = tmp_path / "sitout"
    proc = launch(run_dir, data_dir, "--up", str(up), "--ap", str(ap), "--matchmaking-timeout", "120", rounds=5)
    _, err = proc.communicate(timeout=900)
    assert proc.returncode == 0, err[-2000:]
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == list(range(1, 6))
    assert all(r["timed_out_steps"] == 0 and r["failed_steps"] == 0 for r in rows)
    assert all(r["participating_peers"] == 2 and r["reporting_peers"] == 4 for r in rows)
    participants_of = lambda rnd: aggregation_participants(  # noqa: E731
        seed=3, round_index=rnd, num_peers=4, update_percent=up, aggregate_percent=ap, dropout_percent=0)
    assert_idle_peers_waited_for_the_round(run_dir, participants_of)
    assert all("wait_seconds" in r for r in rows)  # two of four peers sit out every round
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["failed_peers"] == []


def test_partial_participation_and_churn_agree_without_messages(tmp_path, data_dir, no_new_p2pd):
    """--up/--ap/--dl: every peer derives the same sets from (seed, round); the metrics show exactly those."""
    from peer_synchronization import aggregation_participants

    run_dir = tmp_path / "partial"
    proc = launch(run_dir, data_dir, "--up", "50", "--ap", "50", "--dl", "20", "--sp", "dirichlet", "--al", "0.5",
                  "--matchmaking-timeout", "120", rounds=6)  # a long deadline: idle peers never give up waiting
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == list(range(1, 7))
    for row in rows:
        expected = aggregation_participants(seed=3, round_index=row["round"], num_peers=4, update_percent=50,
                                            aggregate_percent=50, dropout_percent=20)
        assert row["participating_peers"] == len(expected)
        assert row["reporting_peers"] == 4  # peers that sit out still report (and evaluate)
    assert_idle_peers_waited_for_the_round(run_dir, lambda rnd: aggregation_participants(
        seed=3, round_index=rnd, num_peers=4, update_percent=50, aggregate_percent=50, dropout_percent=20))


@pytest.mark.parametrize("extra, keys", [
    (("--kd", "--kd-rounds", "2"), {"kd_lambda", "kd_teachers"}),
    (("--dp", "--nm", "0.3", "--ct", "0.5"), {"dp_epsilon", "dp_epsilon_groupmate", "dp_clip_threshold",
                                             "dp_update_norm"}),
], ids=["kd", "dp"])
def test_kd_and_dp_runs_complete_and_log_their_keys(tmp_path, data_dir, no_new_p2pd, extra, keys):
    run_dir = tmp_path / "run"
    proc = launch(run_dir, data_dir, *extra, rounds=3)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(keys <= set(r) for r in rows)
    if "--kd" in extra:
        assert [r["kd_lambda"] for r in rows] == [1.0, 0.5, 0.0]  # K = 2
        assert rows[0]["kd_teachers"] == 1.0  # groups of 2: one candidate
        # the KD rounds add one all-gather pass of the model to the averaging pass
        assert rows[0]["bytes_sent_per_peer"] > 1.3 * rows[2]["bytes_sent_per_peer"]
    else:
        eps = [r["dp_epsilon"] for r in rows]
        assert eps == sorted(eps) and eps[0] > 0
        assert all(r["dp_epsilon_groupmate"] > r["dp_epsilon"] for r in rows)
        assert rows[0]["dp_clip_threshold"] == 0.5 and rows[1]["dp_clip_threshold"] != 0.5
    assert rows[-1]["test_accuracy"] is not None


def test_run_whose_averaging_fails_ends_degraded(tmp_path, data_dir, no_new_p2pd):
    """A peer's p2pd is killed: that peer notices and stops, its group-mates' steps fail (values kept local),
    and the run says so in the status lines, metrics and summary, and exits 3 instead of 'completed'."""
    run_dir = tmp_path / "degraded"
    proc = launch(run_dir, data_dir, "--matchmaking-timeout", "5", "--allreduce-timeout", "5", "--tf", "1",
                  rounds=4)
    wait_for_first_round(run_dir)
    daemons = [pid for pid in descendants(proc.pid) if psutil.Process(pid).name() == "p2pd"]
    victim = max(daemons)  # a peer's daemon (the launcher's own one starts first)
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 3, err[-2000:]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "degraded" and len(summary["failed_peers"]) == 1
    rows = read_metrics(run_dir)
    assert sum(r["failed_steps"] for r in rows) > 0 and summary["failed_steps"] == sum(r["failed_steps"] for r in rows)
    assert "FAILED steps" in out and "done (degraded)" in out


def test_survivors_stop_waiting_for_dead_peers(tmp_path, data_dir, no_new_p2pd):
    """SIGKILL a quarter of 8 peers: every round is still reported, survivors stop waiting for the dead within
    two rounds (no matchmaking runs into its deadline any more), accuracy keeps rising, and the run says it
    degraded (who died, how many steps failed)."""
    run_dir = tmp_path / "churn"
    cmd = [sys.executable, os.path.join(ROOT, "mar_fl.py"), "--np", "8", "--gs", "2", "--gk", "3", "--ni", "3",
           "--rounds", "7", "--tf", "1", "--iv", "2", "-sd", "4", "--data-dir", data_dir, "--run-dir", str(run_dir),
           "--wandb", "disabled", "--matchmaking-timeout", "20", "--allreduce-timeout", "10"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 400
    while time.time() < deadline and len(read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []) < 2:
        time.sleep(0.5)
    victims = peer_pids(proc.pid)[-2:]
    assert len(victims) == 2
    for pid in victims:
        os.kill(pid, signal.SIGKILL)
    out, err = proc.communicate(timeout=900)
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == list(range(1, 8)), err[-2000:]
    death = next(r["round"] for r in rows if r["participating_peers"] < 8)
    assert all(r["participating_peers"] == 6 for r in rows if r["round"] > death)
    assert all(r["timed_out_steps"] == 0 for r in rows if r["round"] >= death + 2)
    accuracy = [r["test_accuracy"] for r in rows]
    assert accuracy[-1] > accuracy[death - 1]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert proc.returncode == 3 and summary["status"] == "degraded" and len(summary["failed_peers"]) == 2


def test_a_killed_peer_restarted_by_hand_rejoins(tmp_path, data_dir, no_new_p2pd):
    """Without --restart-dead: a second launcher, `--resume RUN_DIR --peer-range 3-3 --rejoin`, restarts the dead
    peer from its checkpoint while the run goes on; it takes a live peer's model and round and reports again."""
    run_dir = tmp_path / "byhand"
    proc = launch(run_dir, data_dir, "--ckpt-every", "1", "--tf", "1", "--matchmaking-timeout", "10",
                  "--allreduce-timeout", "10", rounds=7)
    deadline = time.time() + 400
    while time.time() < deadline and len(read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []) < 2:
        time.sleep(0.5)
    os.kill(peer_pids(proc.pid)[-1], signal.SIGKILL)  # the highest index: peer 3
    rejoin = subprocess.run([sys.executable, os.path.join(ROOT, "mar_fl.py"), "--resume", str(run_dir),
                             "--peer-range", "3-3", "--rejoin", "--data-dir", data_dir],
                            capture_output=True, text=True, timeout=900)
    out, err = proc.communicate(timeout=900)
    assert rejoin.returncode == 0, rejoin.stderr[-2000:]
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == list(range(1, 8)), err[-2000:]
    assert "rejoined after round" in (run_dir / "logs" / "peer_0003.log").read_text()
    with open(run_dir / "peers" / "peer_0003.jsonl") as f:
        own = [json.loads(line)["round"] for line in f]
    assert own == sorted(own) and own[-1] == 7  # it reported again, up to the last round, never a round twice
    assert rows[-1]["reporting_peers"] == 4 and rows[-1]["test_accuracy"] > rows[1]["test_accuracy"]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["failed_peers"] == [3] and summary["status"] == "degraded"  # the death is still reported


def test_a_killed_peer_is_restarted_and_rejoins_with_the_live_model(tmp_path, data_dir, no_new_p2pd):
    """--restart-dead: the launcher starts a SIGKILLed peer again; it takes a live peer's model and round and
    takes part in the rounds after that, and the summary counts the restart."""
    run_dir = tmp_path / "restart"
    proc = launch(run_dir, data_dir, "--restart-dead", "--ckpt-every", "1", "--tf", "1",
                  "--matchmaking-timeout", "10", "--allreduce-timeout", "10", rounds=6)
    deadline = time.time() + 400
    while time.time() < deadline and len(read_metrics(run_dir) if (run_dir / "metrics.jsonl").exists() else []) < 2:
        time.sleep(0.5)
    victim = peer_pids(proc.pid)[-1]
    os.kill(victim, signal.SIGKILL)
    out, err = proc.communicate(timeout=900)
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == list(range(1, 7)), err[-2000:]
    assert rows[-1]["participating_peers"] == 4
    summary = json.loads((run_dir / "summary.json").read_text())
    assert list(summary["restarted_peers"].values()) == [1] and summary["failed_peers"] == []
    logs = "".join((run_dir / "logs" / name).read_text() for name in os.listdir(run_dir / "logs"))
    assert "rejoined after round" in logs
    assert rows[-1]["test_accuracy"] > rows[1]["test_accuracy"]


def test_a_peer_trims_its_heap_only_once_it_grew_past_its_level():
    from mar_fl import HeapTrimmer

    mb = 1 << 20
    heap = HeapTrimmer(slack=32 * mb)
    assert not heap.should_trim(500 * mb) and not heap.should_trim(560 * mb)  # rounds 1-2 set the level
    assert heap.level == 560 * mb
    assert not heap.should_trim(590 * mb)  # within the slack: the round's buffers stay for the next round
    assert heap.should_trim(600 * mb)
    assert not heap.should_trim(700 * mb) and heap.level == 700 * mb  # the round after a trim sets a new level
    assert not heap.should_trim(720 * mb) and heap.should_trim(740 * mb)


def test_a_heap_trim_hands_freed_memory_back():
    script = """
import sys
sys.path.insert(0, sys.argv[1])
from mar_fl import HeapTrimmer, resident_bytes as rss
heap = HeapTrimmer(slack=16 << 20)
heap.after_round(); heap.after_round()
blocks = [bytearray(4 << 20) for _ in range(32)]  # 128 MB, below the mmap threshold: on the heap
keep = bytearray(1 << 10)  # above them: the freed blocks stay inside the heap, not at its top
del blocks
before = rss()
trimmed = heap.after_round()
print(trimmed, before >> 20, rss() >> 20)
"""
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_=str(32 << 20), MALLOC_TRIM_THRESHOLD_=str(256 << 20))
    out = subprocess.run([sys.executable, "-c", script, ROOT], env=env, capture_output=True, text=True, timeout=60)
    trimmed, before, after = out.stdout.split()
    assert trimmed == "True", out.stderr
    assert int(before) - int(after) >= 100, (before, after)
