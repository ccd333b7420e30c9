"""The benchmark scripts still run against the engine they measure (no timing is asserted here)."""
import json
import subprocess
import sys

from conftest import ROOT


def test_the_aggregation_bench_measures_mar_and_gloo_on_the_same_tensors(no_new_p2pd):
    proc = subprocess.run(
        [sys.executable, "bench/bench_aggregation.py", "--np", "2", "--gs", "2", "--ni", "1", "--transport", "tcp",
         "--baseline", "gloo", "--rounds", "2", "--json"],
        cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["failed_steps"] == 0 and out["max_abs_error"] < 1e-6
    assert out["seconds_per_step"] > 0 and out["baseline_seconds_per_step"] > 0
    assert out["baseline_max_abs_diff"] < 1e-6
    assert out["bytes_sent_per_peer"] >= out["payload_bytes"]
