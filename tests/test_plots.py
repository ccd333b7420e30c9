"""scripts/plots.py: end-of-run plots, and `mar_fl.py plot` comparing runs (bands over seeds, table)."""
import csv
import io
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import ROOT

sys.path.insert(0, str(Path(ROOT) / "scripts"))
import plots  # noqa: E402

NAMES = ("accuracy_vs_round", "accuracy_vs_time", "loss_vs_round", "loss_vs_time", "bytes_per_round",
         "round_time_split")
BASE = {"seed": 0, "task": "mnist", "num_peers": 4, "group_size": 2, "group_key_dim": 2, "mar_steps": 2,
        "dp": False, "rounds": 4, "target_accuracy": 0.0, "run_dir": "x", "wandb_mode": "disabled",
        "data_dir": "/d", "lr_drop_to": None}


def fake_run(root: Path, name: str, *, seed: int, accuracies, bytes_sent=2e6, round_seconds=1.0,
             extra_lines: str = "", **config) -> Path:
    """A run dir written by hand: config.json, summary.json and one metrics row per round (tested each round)."""
    run = root / name
    run.mkdir()
    cfg = {**BASE, **config, "seed": seed, "run_dir": str(run)}
    (run / "config.json").write_text(json.dumps(cfg))
    (run / "summary.json").write_text(json.dumps({"status": "completed", "rounds": len(accuracies)}))
    rows = [{"round": i, "test_accuracy": acc, "test_loss": 3.0 - acc / 50, "train_loss": 1.0,
             "elapsed_seconds": i * round_seconds, "round_seconds": round_seconds, "train_seconds": 0.5,
             "aggregation_seconds": 0.3, "bytes_sent_per_peer": bytes_sent, "bytes_received_per_peer": bytes_sent}
            for i, acc in enumerate(accuracies, 1)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + extra_lines)
    return run


@pytest.fixture
def two_configs(tmp_path):
    """gs 2 (three seeds) and gs 4 (two seeds), plus a gs-2 run with a different wandb mode and data dir."""
    a = [fake_run(tmp_path, f"gs2-s{s}", seed=s, accuracies=acc)
         for s, acc in ((1, [50, 70, 80, 90]), (2, [40, 60, 85, 88]), (3, [45, 65, 75, 86]))]
    b = [fake_run(tmp_path, f"gs4-s{s}", seed=s, accuracies=acc, group_size=4, bytes_sent=4e6, round_seconds=2.0)
         for s, acc in ((1, [30, 50, 60, 70]), (2, [35, 55, 65, 75]))]
    return a, b


def test_seeds_group_into_configurations_and_the_legend_names_the_differing_flag(two_configs):
    a, b = two_configs
    runs = plots.load_runs([str(p) for p in (a[0], b[0], a[1], b[1], a[2])])
    groups = plots.group_runs(runs)
    assert [[r.seed for r in g.runs] for g in groups] == [[1, 2, 3], [1, 2]]
    assert [g.config["group_size"] for g in groups] == [2, 4]
    assert plots.differing_keys(groups) == ["group_size"]
    assert plots.group_labels(groups) == ["--gs 2", "--gs 4"]  # the flag as config_setup names it


def test_timing_irrelevant_keys_do_not_split_a_configuration(tmp_path):
    runs = [fake_run(tmp_path, "a", seed=1, accuracies=[50]),
            fake_run(tmp_path, "b", seed=2, accuracies=[60], wandb_mode="offline", data_dir="/other",
                     wandb_group="g"),
            fake_run(tmp_path, "c", seed=3, accuracies=[70], mar_steps=3, dp=True)]
    groups = plots.group_runs(plots.load_runs([str(r) for r in runs]))
    assert [len(g.runs) for g in groups] == [2, 1]
    labels = plots.group_labels(groups, flags={"mar_steps": "--ni", "dp": "--dp"})
    assert labels == ["--ni 2 no --dp", "--ni 3 --dp"]
    assert plots.group_labels(groups[:1]) == ["2 seeds (1, 2)"]


def test_table_holds_mean_and_std_over_seeds(two_configs, tmp_path):
    a, b = two_configs
    groups = plots.group_runs(plots.load_runs([str(p) for p in a + b]))
    rows = plots.table_rows(groups, plots.group_labels(groups), target=85.0)
    gs2, gs4 = rows
    assert gs2["runs"] == 3 and gs2["seeds"] == "1 2 3"
    assert gs2["final_accuracy_mean"] == pytest.approx(statistics.mean([90, 88, 86]))
    assert gs2["final_accuracy_std"] == pytest.approx(statistics.stdev([90, 88, 86]))
    assert gs2["best_accuracy_mean"] == pytest.approx(statistics.mean([90, 88, 86]))
    assert gs2["rounds_to_target_mean"] == pytest.approx(statistics.mean([4, 3, 4]))
    assert gs2["seconds_to_target_mean"] == pytest.approx(statistics.mean([4.0, 3.0, 4.0]))
    assert gs2["target_reached"] == 3
    assert gs4["target_reached"] == 0 and gs4["rounds_to_target_mean"] is None
    assert gs4["median_round_seconds_mean"] == 2.0 and gs4["median_round_seconds_std"] == 0.0
    assert gs4["mb_sent_per_peer_per_round_mean"] == pytest.approx(4.0)
    table = plots.markdown_table(rows)
    assert "rounds to 85%" in table
    assert f"| --gs 2 | 3 | 88.00 ± {statistics.stdev([90, 88, 86]):.2f} |" in table
    assert "| --gs 4 | 2 | 72.50 ± 3.54 | 72.50 ± 3.54 | — (0/2 reached) |" in table
    parsed = list(csv.DictReader(io.StringIO(plots.csv_text(rows))))
    assert [r["configuration"] for r in parsed] == ["--gs 2", "--gs 4"]
    assert float(parsed[1]["final_accuracy_std"]) == pytest.approx(statistics.stdev([70, 75]))
    assert parsed[1]["rounds_to_target_mean"] == ""


def test_without_a_target_the_table_leaves_the_target_columns_out(two_configs):
    a, _ = two_configs
    groups = plots.group_runs(plots.load_runs([str(p) for p in a]))
    table = plots.markdown_table(plots.table_rows(groups, plots.group_labels(groups)))
    assert "rounds to" not in table and "median s/round" in table
    assert "| 3 seeds (1, 2, 3) | 3 |" in table


def test_the_runs_own_target_accuracy_is_the_default_target(tmp_path):
    run = fake_run(tmp_path, "t", seed=1, accuracies=[50, 70, 90], target_accuracy=60.0)
    groups = plots.group_runs(plots.load_runs([str(run)]))
    rows = plots.table_rows(groups, plots.group_labels(groups))
    assert rows[0]["target"] == 60.0 and rows[0]["rounds_to_target_mean"] == 2
    assert "rounds to 60%" in plots.markdown_table(rows)


def test_damaged_lines_are_skipped_and_a_run_without_rows_is_reported(tmp_path, capsys):
    good = fake_run(tmp_path, "good", seed=1, accuracies=[50, 60],
                    extra_lines='{"round": 3, "test_accur\n[1, 2]\nnot json\n{"round": 3, "test_accuracy": 61.0')
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text(json.dumps(BASE))
    (empty / "metrics.jsonl").write_text("garbage\n")
    runs = plots.load_runs([str(good), str(empty), str(tmp_path / "missing")])
    assert [r.run_dir for r in runs] == [str(good)]
    assert [r["round"] for r in runs[0].rows] == [1, 2]
    err = capsys.readouterr().err
    assert f"skipping {empty}: no metrics rows" in err and "no such run dir" in err


def test_compare_writes_png_svg_csv_and_prints_markdown(two_configs, tmp_path, capsys):
    a, b = two_configs
    out = tmp_path / "out"
    assert plots.main([str(p) for p in a + b] + ["--out", str(out), "--target", "85"]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith("| configuration | runs | final acc % |") and "| --gs 4 | 2 |" in printed
    for name in NAMES:
        assert (out / f"{name}.png").stat().st_size > 5000
        assert (out / f"{name}.svg").read_text().count("<path") > 10
    assert "--gs 2" in (out / "accuracy_vs_round.svg").read_text()  # the legend
    assert (out / "table.csv").read_text().splitlines()[0].startswith("configuration,runs,seeds,target")
    assert (out / "table.md").read_text().strip() == printed.split("\n\nplots")[0].strip()


def test_compare_with_no_usable_run_fails_without_a_traceback(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    proc = subprocess.run([sys.executable, str(Path(ROOT) / "mar_fl.py"), "plot", str(empty), "--out",
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "no metrics rows" in proc.stderr and "Traceback" not in proc.stderr


def test_end_of_run_plots_of_one_run(tmp_path):
    run = fake_run(tmp_path, "one", seed=7, accuracies=[50, 60, 70])
    paths = plots.write_run_plots(str(run))
    assert sorted(Path(p).name for p in paths) == sorted(f"{n}.{f}" for n in NAMES for f in ("png", "svg"))
    assert all((run / "plots" / f"{n}.png").stat().st_size > 5000 for n in NAMES)
    assert plots.write_run_plots(str(tmp_path / "nothing")) == []


def test_the_launcher_writes_plots_and_only_then_imports_matplotlib(tmp_path):
    run = fake_run(tmp_path, "one", seed=7, accuracies=[50, 60], extra_lines='{"round": 3, "test_loss": NaN}\n')
    code = ("import sys, mar_fl; assert 'matplotlib' not in sys.modules; mar_fl._plots_module(); "
            "assert 'matplotlib' not in sys.modules, 'imported eagerly'; "
            f"mar_fl.write_plots({str(run)!r}); assert 'matplotlib' in sys.modules")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"plots: {run / 'plots'}" in proc.stdout
    assert all((run / "plots" / f"{n}.svg").stat().st_size > 5000 for n in NAMES)


def test_a_plot_failure_is_a_warning_not_the_runs_failure(tmp_path, monkeypatch, caplog):
    import mar_fl

    run = fake_run(tmp_path, "one", seed=7, accuracies=[50])
    (run / "plots").write_text("a file where the folder should be")
    mar_fl.write_plots(str(run))  # must not raise
    assert "plots not written" in caplog.text


def test_a_real_run_writes_its_plots(tmp_path, data_dir, no_new_p2pd):
    run_dir = tmp_path / "run"
    cmd = [sys.executable, str(Path(ROOT) / "mar_fl.py"), "--np", "2", "--gs", "2", "--gk", "1", "--ni", "1",
           "--rounds", "2", "--tf", "1", "--iv", "2", "--wandb", "disabled", "--run-dir", str(run_dir),
           "--data-dir", data_dir, "--matchmaking-timeout", "30"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"plots: {run_dir / 'plots'}" in proc.stdout
    for name in NAMES:
        assert (run_dir / "plots" / f"{name}.png").stat().st_size > 5000
        assert (run_dir / "plots" / f"{name}.svg").stat().st_size > 5000
    # and the compare command reads a real run dir
    out = tmp_path / "cmp"
    proc = subprocess.run([sys.executable, str(Path(ROOT) / "mar_fl.py"), "plot", str(run_dir), str(run_dir),
                           "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "| seed 42 | 1 |" in proc.stdout  # the same run dir twice is one run
    assert (out / "table.csv").exists() and (out / "accuracy_vs_time.svg").exists()
