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


def test_round_time_is_the_working_peers_and_the_idle_wait_is_reported_apart():
    rows = [
        record(0, 2, train_loss=1.0, bytes_sent=10, bytes_received=10, group_size=2, round_seconds=3.0,
               train_seconds=1.0, aggregation_seconds=2.0),
        record(1, 2, train_loss=1.0, bytes_sent=10, bytes_received=10, group_size=2, round_seconds=4.0,
               train_seconds=1.5, aggregation_seconds=2.5),
        record(2, 2, round_seconds=0.5, train_seconds=0.0, aggregation_seconds=0.0, wait_seconds=3.0),
        record(3, 2, round_seconds=9.0, train_seconds=0.0, aggregation_seconds=0.0, wait_seconds=1.0),
    ]
    out = summarize_round(rows, run_start=100.0)
    assert out["round_seconds"] == 4.0  # peer 3's 9 s: a record of a peer that did nothing in the round
    assert out["train_seconds"] == 1.25 and out["aggregation_seconds"] == 2.25  # means over those who did it
    assert out["wait_seconds"] == 2.0
    # a peer that trains without aggregating (--up > --ap), or tests its slice, worked in the round: its time counts
    for extra in ({"train_loss": 2.0}, {"test_count": 10, "test_correct": 5, "test_loss_sum": 1.0}):
        assert summarize_round(rows[:3] + [{**rows[3], **extra}], run_start=100.0)["round_seconds"] == 9.0
    assert "wait_seconds" not in summarize_round(rows[:2], run_start=100.0)


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


def test_collector_waits_again_for_a_dead_peer_that_reports_after_its_death(tmp_path):
    # peer 1 died after round 1 and was restarted elsewhere (--rejoin by hand): once it reports a later round,
    # the rounds after are pooled with it again instead of without it
    (tmp_path / "peers").mkdir()
    a, b = tmp_path / "peers" / "peer_0000.jsonl", tmp_path / "peers" / "peer_0001.jsonl"
    a.write_text("".join(json.dumps(record(0, r)) + "\n" for r in (1, 2)))
    b.write_text(json.dumps(record(1, 1)) + "\n")
    collector = MetricsCollector(str(tmp_path), num_peers=2)
    assert [r["reporting_peers"] for r in collector.poll(dead=[1])] == [2, 1]  # round 2 without the dead peer
    with open(b, "a") as f:
        f.write(json.dumps(record(1, 3)) + "\n")  # it rejoined: its first round back
    with open(a, "a") as f:
        f.write(json.dumps(record(0, 3)) + "\n" + json.dumps(record(0, 4)) + "\n")
    rows = collector.poll(dead=[1])
    assert [(r["round"], r["reporting_peers"]) for r in rows] == [(3, 2)]  # round 4 waits for peer 1 again
    with open(b, "a") as f:
        f.write(json.dumps(record(1, 4)) + "\n")
    assert [(r["round"], r["reporting_peers"]) for r in collector.poll(dead=[1])] == [(4, 2)]


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
    import mar_fl
    from config_setup import parse_config

    launcher = mar_fl.Launcher.__new__(mar_fl.Launcher)
    launcher.cfg = parse_config(["--np", "4"])
    launcher.stop_policy, launcher.diverged, launcher.stop_reason = mar_fl.StopPolicy.from_config(launcher.cfg), False, None
    stops = []
    launcher.publish_stop = lambda reason, after, **kw: stops.append((reason, after))
    collector = mar_fl.MetricsCollector(run_dir="unused", num_peers=4)
    collector.newest_round = 7
    launcher._check_stop({"round": 6, "train_loss": 0.5, "test_loss": None, "test_accuracy": None}, collector)
    assert stops == [] and not launcher.diverged
    launcher._check_stop({"round": 7, "train_loss": float("nan"), "test_loss": None, "test_accuracy": None}, collector)
    assert stops and "diverged" in stops[0][0] and stops[0][1] == 9 and launcher.diverged


def row(r, *, acc=None, loss=None, train=0.5):
    return {"round": r, "train_loss": train, "test_loss": loss, "test_accuracy": acc}


def test_stop_policy_target_patience_and_divergence():
    from mar_fl import StopPolicy

    assert StopPolicy().observe(row(1, acc=99.0, loss=0.01)) is None  # no rule set: never stops
    target = StopPolicy(target_accuracy=90.0)
    assert target.observe(row(1, acc=89.9)) is None
    assert "target accuracy 90% reached" in target.observe(row(2, acc=90.0)).reason
    patient = StopPolicy(patience=3, convergence_threshold=0.1)
    decisions = [patient.observe(row(r, loss=loss)) for r, loss in enumerate([1.0, 0.95, None, 0.92], 1)]
    assert decisions[:3] == [None, None, None]  # 0.95 is not 0.1 better than 1.0; an untested round waits
    assert decisions[3] is not None and "did not improve by 0.1 in 3" in decisions[3].reason  # round 4 = 1 + 3
    again = StopPolicy(patience=3, convergence_threshold=0.1)
    assert [again.observe(row(r, loss=loss)) for r, loss in enumerate([1.0, 0.95, 0.85, 0.84], 1)] == [None] * 4
    diverging = StopPolicy(target_accuracy=10.0)
    decision = diverging.observe(row(4, acc=50.0, loss=float("inf")))
    assert decision.diverged and "non-finite" in decision.reason  # divergence wins over a met target


def test_run_outcome_says_how_a_run_ended():
    from mar_fl import EXIT_DEGRADED, EXIT_FAILED, EXIT_PREEMPTED, run_outcome

    ok = {0: 0, 1: 0}
    rows = [{"mar_steps": 100, "failed_steps": 5}]
    assert run_outcome(peer_codes=ok, history=rows, max_failed_percent=5, preempted=False) == ("completed", 0)
    assert run_outcome(peer_codes=ok, history=[{"mar_steps": 100, "failed_steps": 6}], max_failed_percent=5,
                       preempted=False) == ("degraded", EXIT_DEGRADED)
    assert run_outcome(peer_codes={0: 0, 1: 1}, history=rows, max_failed_percent=5,
                       preempted=False) == ("degraded", EXIT_DEGRADED)
    assert run_outcome(peer_codes=ok, history=rows, max_failed_percent=5, preempted=False,
                       diverged=True) == ("diverged", EXIT_DEGRADED)
    assert run_outcome(peer_codes={0: 1}, history=rows, max_failed_percent=5, preempted=False) == ("failed", EXIT_FAILED)
    assert run_outcome(peer_codes=ok, history=rows, max_failed_percent=5, preempted=True) == ("preempted", EXIT_PREEMPTED)
