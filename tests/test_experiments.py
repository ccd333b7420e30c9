"""experiments/: the closed-form traffic model and helpers (unit), and each runner's --quick mode end to end on
real 4-peer runs, restricted to the methods/variants this checkout's mar_fl.py has (kept tiny: 1-2 runs each)."""
import json
import math

import pytest

from experiments import comm_bytes, common, mkd_ablation, participation, privacy_utility

P = 1000.0


# ==================== closed forms ====================


def test_payload_is_the_mnist_cnn_and_its_momentum_in_float32():
    params = 32 * 9 + 32 + 64 * 32 * 9 + 64 + 64 * 12 * 12 * 128 + 128 + 128 * 10 + 10  # conv, conv, fc, fc
    assert comm_bytes.payload_bytes() == 2 * 4 * params == 9_599_056


@pytest.mark.parametrize("n, gs", [(4, 4), (16, 4), (64, 4), (4096, 4), (8, 2), (125, 5)])
def test_mar_on_a_full_grid_sends_ni_times_2_gs_minus_1_over_gs_payloads(n, gs):
    _, gk, ni = common.mar_layout(n, gs)
    assert gs ** gk == n and ni == gk
    sent = comm_bytes.closed_form_bytes("mar", n, P, gs=gs)
    assert sent.per_peer == pytest.approx(ni * 2 * (gs - 1) / gs * P)
    assert sent.total == pytest.approx(n * sent.per_peer) and sent.server == 0


def test_mar_off_the_grid_counts_the_simulated_group_of_every_peer():
    # N = 6, gs = 4: one bucket (6 // 4 = 1 group), so all six average together in each of the 2 steps
    assert comm_bytes.closed_form_bytes("mar", 6, P, gs=4).per_peer == pytest.approx(2 * 2 * 5 / 6 * P)
    # N = 8, gs = 4: two groups of 4 in both steps; explicit gk/ni override the default layout
    assert comm_bytes.closed_form_bytes("mar", 8, P, gs=4).per_peer == pytest.approx(2 * 1.5 * P)
    assert comm_bytes.closed_form_bytes("mar", 8, P, gs=4, gk=2, ni=1).per_peer == pytest.approx(1.5 * P)
    assert comm_bytes.closed_form_bytes("mar", 1, P).per_peer == 0  # alone: nothing to send


def test_rdfl_fedavg_and_gossip_closed_forms():
    rdfl = comm_bytes.closed_form_bytes("rdfl", 125, P)
    assert (rdfl.per_peer, rdfl.total) == (124 * P, 125 * 124 * P)
    fedavg = comm_bytes.closed_form_bytes("fedavg", 125, P)
    assert (fedavg.per_peer, fedavg.server, fedavg.total) == (P, 125 * P, 2 * 125 * P)
    gossip = comm_bytes.closed_form_bytes("gossip", 125, P, k=3)
    assert (gossip.per_peer, gossip.total) == (3 * P, 125 * 3 * P)
    assert comm_bytes.closed_form_bytes("gossip", 2, P, k=3).per_peer == P  # at most N - 1 partners
    with pytest.raises(ValueError, match="unknown method"):
        comm_bytes.closed_form_bytes("allreduce", 4, P)


def test_mar_total_grows_like_n_log_n_and_far_below_rdfl():
    total = {n: comm_bytes.closed_form_bytes("mar", n, P, gs=4).total for n in (64, 4096)}
    assert total[4096] / total[64] == pytest.approx(4096 * math.log(4096) / (64 * math.log(64)), rel=1e-9)
    paper = comm_bytes.closed_form_bytes("mar", 125, P, gs=5)
    assert comm_bytes.closed_form_bytes("rdfl", 125, P).total / paper.total > 10


def test_closed_form_sizes_double_from_4():
    assert comm_bytes.closed_form_sizes(4096) == [4 * 2 ** i for i in range(11)]


# ==================== helpers ====================


@pytest.mark.parametrize("n, layout", [(1, (4, 1, 1)), (4, (4, 1, 1)), (5, (4, 2, 2)), (16, (4, 2, 2)),
                                       (17, (4, 3, 3)), (4096, (4, 6, 6))])
def test_mar_layout_is_the_smallest_grid_that_holds_n(n, layout):
    assert common.mar_layout(n) == layout


def test_parse_list_with_ranges():
    assert common.parse_list("0-2,5", int) == [0, 1, 2, 5]
    assert common.parse_list("100, 50", float) == [100.0, 50.0]


def test_target_hit_prefers_the_summary_and_falls_back_to_tested_rows():
    rows = [{"round": 1, "test_accuracy": None, "elapsed_seconds": 1.0},
            {"round": 2, "test_accuracy": 55.0, "elapsed_seconds": 2.0},
            {"round": 3, "test_accuracy": 91.0, "elapsed_seconds": 3.0}]
    assert common.target_hit({}, rows, 50) == (2, 2.0)
    assert common.target_hit({}, rows, 90) == (3, 3.0)
    assert common.target_hit({}, rows, 95) == (None, None)
    summary = {"accuracy_targets": {"50": {"round": 7, "seconds": 70.0}, "90": {"round": None, "seconds": None}}}
    assert common.target_hit(summary, rows, 50.0) == (7, 70.0)
    assert common.target_hit(summary, rows, 90) == (None, None)


def test_mean_plus_minus_std_says_how_many_seeds_count():
    assert common.pm([1.0, 3.0]) == "2.00 ± 1.41"
    assert common.pm([4.0, None], ".1f", of=2) == "4.0 (1/2)"
    assert common.pm([None], of=1) == "— (0/1)"


def test_a_flag_mar_fl_refuses_stops_the_experiment_with_one_line_before_any_run(tmp_path, capsys):
    specs = [common.RunSpec("ok", ("--np", "4")), common.RunSpec("bad", ("--np", "4", "--no-such-flag"))]
    code = common.main_guard(lambda: common.run_all(specs, out=str(tmp_path), data_dir="."), "prog")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "run bad" in err and "--no-such-flag" in err
    assert not (tmp_path / "runs").exists()  # nothing started, not even the good run
    dp = common.RunSpec("dp", ("--np", "4", "--dp", "--nm", "1.0"))  # z >= 2σ_b = 0.4 at N = 4: mar_fl refuses
    with pytest.raises(common.ExperimentError, match="--nm"):
        common.check_flags([dp])


def test_a_finished_run_with_the_same_flags_is_reused_and_another_is_moved_aside(tmp_path):
    spec = common.RunSpec("r", ("--np", "4"))
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "summary.json").write_text(json.dumps({"status": "completed", "final_test_accuracy": 50.0}))
    (run_dir / "metrics.jsonl").write_text(json.dumps({"round": 1, "test_accuracy": 50.0}) + "\n")
    (run_dir / common.MARKER).write_text(json.dumps({"flags": ["--np", "4"], "exit_code": 0}))
    result = common.run_spec(spec, out=str(tmp_path), data_dir=".")
    assert result.reused and result.ok and result.rows[0]["test_accuracy"] == 50.0
    assert not common.reusable(common.RunSpec("r", ("--np", "8")), str(run_dir))
    aside = common.move_aside(str(run_dir), str(tmp_path / "moved_aside"))
    assert not run_dir.exists() and (tmp_path / "moved_aside").is_dir() and aside.endswith(tuple("0123456789"))


# ==================== --quick runs (real peers) ====================


def _results(out):
    return json.loads((out / "results.json").read_text())


def _assert_outputs(out, *names):
    assert (out / "table.md").read_text().startswith("# ")
    for name in names:
        assert (out / name).stat().st_size > 1000, name


def test_comm_bytes_quick_measures_what_the_schedule_predicts(tmp_path, data_dir, no_new_p2pd, capsys):
    out = tmp_path / "comm"
    assert comm_bytes.main(["--quick", "--methods", "mar", "--sizes", "4", "--out", str(out),
                            "--data-dir", data_dir]) == 0
    _assert_outputs(out, "bytes_vs_n.png", "bytes_vs_n.svg", "plots/bytes_per_round.png")
    results = _results(out)
    [row] = results["measured"]
    assert row["status"] == "completed" and row["measured_sent_per_peer"] > 0
    assert 1.0 <= row["ratio"] < 1.01  # protobuf framing on top of the tensors, nothing else
    assert [r["n"] for r in results["closed_form"]][-2:] == [4096, 125]
    assert "| mar | 4 | 4/1/1 |" in capsys.readouterr().out  # the table is printed


def test_participation_quick(tmp_path, data_dir, no_new_p2pd):
    out = tmp_path / "part"
    assert participation.main(["--quick", "--methods", "mar", "--rounds", "2", "--out", str(out), "--data-dir", data_dir]) == 0
    _assert_outputs(out, "accuracy_vs_participation.png", "plots/mar/accuracy_vs_round.png")
    rows = {r["participation"]: r for r in _results(out)["rows"]}
    assert set(rows) == {100.0, 50.0}
    assert all(r["status"] == "completed" and 0 <= r["final_accuracy"] <= 100 for r in rows.values())
    assert rows[100.0]["drop_points"] == 0 and rows[50.0]["drop_points"] is not None


def test_mkd_ablation_quick(tmp_path, data_dir, no_new_p2pd):
    out = tmp_path / "mkd"
    assert mkd_ablation.main(["--quick", "--variants", "base,decay", "--rounds", "2", "--out", str(out),
                              "--data-dir", data_dir]) == 0
    _assert_outputs(out, "rounds_to_target.png", "plots/mnist/accuracy_vs_round.png")
    results = _results(out)
    rows = {r["variant"]: r for r in results["rows"]}
    assert set(rows) == {"base", "decay"} and results["targets"] == {"mnist": [50.0, 90.0]}
    for row in rows.values():
        assert row["status"] == "completed" and 0 <= row["final_accuracy"][0] <= 100
        for target in row["targets"].values():
            assert target["rounds"][0] is None or 1 <= target["rounds"][0] <= 2
    decay = next(r for r in results["runs"] if r["labels"]["variant"] == "decay")
    lambdas = [row.get("kd_lambda") for row in common.load_result(common.RunSpec("d", ()), decay["run_dir"], 0).rows]
    assert lambdas == [1.0, 0.5]  # K = 2: λ = 1 − (t − 1)/K


def test_privacy_utility_quick(tmp_path, data_dir, no_new_p2pd):
    out = tmp_path / "dp"
    assert privacy_utility.main(["--quick", "--methods", "mar", "--noise", "0.3", "--rounds", "2", "--out", str(out),
                                 "--data-dir", data_dir]) == 0
    _assert_outputs(out, "accuracy_vs_epsilon.png", "plots/accuracy_vs_round.png")
    [row] = _results(out)["rows"]
    assert row["status"] == "completed" and row["epsilon"][0] > 0 and row["epsilon_groupmate"][0] > row["epsilon"][0]
    assert 0 <= row["final_accuracy"][0] <= 100 and row["noise"] == ["os-entropy"]
