"""Launcher-side metric pooling (pure, no processes)."""
import json

from config_setup import RunConfig
from mar_fl import MetricsCollector, should_test, status_line, summarize_round


def record(peer, rnd, **extra):
    base = {"round": rnd, "peer": peer, "t_start": 100.0 + rnd, "t_end": 101.0 + rnd + peer, "round_seconds": 1.0,
            "train_seconds": 0.5, "aggregation_seconds": 0.5, "participating_peers": 2}
    return {**base, **extra}


def test_summarize_pools_test_slices_exactly():
    rows = [
        record(0, 3, train_loss=1.0, bytes_sent=10, bytes_received=10, group_size=2, test_correct=90,
               test_loss_sum=10.0, test_count=100),
        record(1, 3, train_loss=3.0, bytes_sent=30, bytes_received=30, group_size=2, test_correct=30,
               test_loss_sum=50.0, test_count=50),
        record(2, 3),  # sat the round out: no training, no aggregation, no test
    ]
    out = summarize_round(rows, run_start=100.0)
    assert out["test_accuracy"] == 100.0 * 120 / 150
    assert out["test_loss"] == 60.0 / 150
    assert out["train_loss"] == 2.0
    assert out["participating_peers"] == 2 and out["reporting_peers"] == 3
    assert out["bytes_sent_per_peer"] == 20
    assert out["elapsed_seconds"] == 6.0


def test_collector_waits_for_all_peers_and_skips_partial_lines(tmp_path):
    (tmp_path / "peers").mkdir()
    a, b = tmp_path / "peers" / "peer_0000.jsonl", tmp_path / "peers" / "peer_0001.jsonl"
    a.write_text(json.dumps(record(0, 1)) + "\n" + json.dumps(record(0, 2)) + "\n")
    b.write_text(json.dumps(record(1, 1)) + "\n" + '{"round": 2, "pe')  # peer 1 is mid-write
    collector = MetricsCollector(str(tmp_path), num_peers=2)
    assert [r["round"] for r in collector.poll()] == [1]
    with open(b, "a") as f:
        f.write(json.dumps(record(1, 2))[len('{"round": 2, "pe'):] + "\n")
    rows = collector.poll()
    assert [r["round"] for r in rows] == [2] and rows[0]["reporting_peers"] == 2


def test_collector_waits_for_slow_peers_but_not_for_dead_ones(tmp_path):
    (tmp_path / "peers").mkdir()
    lines = [json.dumps(record(0, r)) for r in (1, 2, 3)]  # peer 0 sat out rounds and raced ahead
    (tmp_path / "peers" / "peer_0000.jsonl").write_text("\n".join(lines) + "\n")
    collector = MetricsCollector(str(tmp_path), num_peers=2)
    assert collector.poll() == []  # peer 1 is merely slower: wait for it
    assert [r["round"] for r in collector.poll(dead=[1])] == [1, 2, 3]
    (tmp_path / "peers" / "peer_0001.jsonl").write_text(json.dumps(record(1, 1)) + "\n")
    assert collector.poll() == []  # a late record of an already reported round is dropped


def test_collector_gives_up_on_a_stale_round(tmp_path):
    (tmp_path / "peers").mkdir()
    (tmp_path / "peers" / "peer_0000.jsonl").write_text(json.dumps(record(0, 1)) + "\n")
    collector = MetricsCollector(str(tmp_path), num_peers=2, stale_after=0.0)
    assert [r["round"] for r in collector.poll()] == [1]


def test_should_test_and_status_line():
    cfg = RunConfig(test_every=5)
    assert [r for r in range(1, 13) if should_test(cfg, r, 12)] == [5, 10, 12]
    row = summarize_round([record(0, 5, train_loss=0.5, bytes_sent=2e6, bytes_received=2e6, group_size=2,
                                  test_correct=9, test_loss_sum=1.0, test_count=10)], run_start=100.0)
    line = status_line(row, 200)
    assert line.startswith("round    5/200") and "90.00%" in line and "2.00 MB sent" in line


def test_a_non_finite_loss_stops_the_run():
    import math

    import mar_fl
    from config_setup import parse_config

    launcher = mar_fl.Launcher.__new__(mar_fl.Launcher)
    launcher.cfg = parse_config(["--np", "4"])
    launcher.best_loss, launcher.best_loss_round = math.inf, 0
    stops = []
    launcher.publish_stop = lambda reason, after, **kw: stops.append((reason, after))
    collector = mar_fl.MetricsCollector(run_dir="unused", num_peers=4)
    collector.newest_round = 7
    launcher._check_stop({"round": 6, "train_loss": 0.5, "test_loss": None, "test_accuracy": None}, collector)
    assert stops == []
    launcher._check_stop({"round": 7, "train_loss": float("nan"), "test_loss": None, "test_accuracy": None}, collector)
    assert stops and "diverged" in stops[0][0] and stops[0][1] == 9
