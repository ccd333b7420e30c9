"""scripts/dp_curve.py: reads finished --dp run dirs into a table and a plot."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import dp_curve  # noqa: E402


def fake_run(root: Path, z: float, accuracy: float, eps: float, noise: str = "os-entropy") -> Path:
    run = root / f"dp-z{z}"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"dp": True, "noise_multiplier": z}))
    (run / "summary.json").write_text(json.dumps({"rounds": 2, "status": "completed", "final_test_accuracy": accuracy,
                                                  "best_test_accuracy": accuracy + 1, "dp_noise": noise}))
    rows = [{"round": r, "dp_epsilon": eps * r / 2, "dp_epsilon_groupmate": 50 * eps * r / 2, "dp_noise": noise}
            for r in (1, 2)]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_table_and_plot_from_run_dirs(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    runs = [fake_run(tmp_path, 1.0, 80.0, 72.5), fake_run(tmp_path, 0.5, 95.0, 247.1)]
    out = tmp_path / "curve.png"
    assert dp_curve.main([str(r) for r in runs] + ["--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.index("| 0.5 |") < printed.index("| 1 |")  # sorted by z
    assert "| 247.1 |" in printed and "| 3,625 |" in printed and "os-entropy" in printed
    assert out.stat().st_size > 1000


def test_a_run_without_dp_is_refused(tmp_path):
    run = fake_run(tmp_path, 1.0, 80.0, 72.5)
    (run / "config.json").write_text(json.dumps({"dp": False, "noise_multiplier": 1.0}))
    with pytest.raises(ValueError, match="not a finished --dp run"):
        dp_curve.load_run(str(run))


def test_at_round_reads_every_run_at_the_same_round(tmp_path):
    run = fake_run(tmp_path, 1.0, 80.0, 72.5)
    rows = [{"round": r, "dp_epsilon": 10.0 * r, "dp_epsilon_groupmate": 100.0 * r, "test_accuracy": acc}
            for r, acc in ((1, 50.0), (2, None), (3, 70.0), (4, 60.0))]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    at2 = dp_curve.load_run(str(run), at_round=2)
    assert (at2.epsilon, at2.epsilon_groupmate, at2.final_accuracy, at2.best_accuracy) == (20.0, 200.0, 50.0, 50.0)
    at4 = dp_curve.load_run(str(run), at_round=4)
    assert (at4.final_accuracy, at4.best_accuracy, at4.rounds) == (60.0, 70.0, 4)
    with pytest.raises(ValueError, match="has no round 9"):
        dp_curve.load_run(str(run), at_round=9)
