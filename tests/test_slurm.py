"""Integration on a real (private, single-node) Slurm: the job scripts as a user submits them.

The cluster comes from ``tests/slurm_cluster.py``; without Debian's Slurm and munge installed (``.ci/run``
installs them as root) these tests are skipped with the reason.
"""
import json
import os
import subprocess
import sys
import time

import pytest

from conftest import ROOT
from slurm_cluster import SlurmCluster, missing_binaries

TIMING = {"round_seconds", "train_seconds", "aggregation_seconds", "elapsed_seconds"}
TINY = ["--np", "2", "--gs", "2", "--gk", "1", "--ni", "1", "--iv", "2", "--tf", "2", "-sd", "7",
        "--wandb", "disabled", "--matchmaking-timeout", "30"]


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = missing_binaries()
    if missing:
        pytest.skip(f"Slurm/munge not installed ({', '.join(missing)}); .ci/run installs them as root")
    cluster = SlurmCluster(str(tmp_path_factory.mktemp("slurm")))
    try:
        cluster.start()
    except RuntimeError as e:
        cluster.stop()
        pytest.fail(f"could not start a private Slurm cluster: {e}")
    yield cluster
    cluster.stop()


def job_env(slurm, run_dir, **extra):
    return {**slurm.env, "MARFL_RUN_DIR": str(run_dir), "MARFL_PYTHON": sys.executable,
            "MARFL_OFFLINE": "1", **extra}


def metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in TIMING} for line in f]


def submit(slurm, tmp_path, script, *args, env, wait=True):
    cmd = ["sbatch", "--parsable", f"--output={tmp_path}/slurm-%j.out", "--cpus-per-task=2"]
    cmd += (["--wait"] if wait else []) + [script, *args]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)


def job_state(slurm, job_id):
    out = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True, env=slurm.env).stdout
    fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
    return fields.get("JobState"), int(fields.get("Restarts", "0"))


def test_single_node_sbatch_runs_a_tiny_experiment(slurm, tmp_path, data_dir, no_new_p2pd):
    run_dir = tmp_path / "run"
    done = submit(slurm, tmp_path, "slurm/mar_fl.sbatch", *TINY, "--rounds", "3", "--data-dir", data_dir,
                  env=job_env(slurm, run_dir))
    log = "".join(open(os.path.join(tmp_path, n)).read() for n in os.listdir(tmp_path) if n.startswith("slurm-"))
    assert done.returncode == 0, done.stderr + log[-3000:]
    assert [r["round"] for r in metrics(run_dir)] == [1, 2, 3]
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["final_test_accuracy"] is not None
    assert json.loads((run_dir / "config.json").read_text())["num_peers"] == 2


def test_time_limit_signal_checkpoints_requeues_and_resumes_to_the_same_metrics(slurm, tmp_path, data_dir,
                                                                                no_new_p2pd):
    flags = [*TINY, "--rounds", "8", "--ckpt-every", "2", "--data-dir", data_dir]
    reference = tmp_path / "reference"
    plain = subprocess.run([sys.executable, "mar_fl.py", *flags, "--run-dir", str(reference)], cwd=ROOT,
                           capture_output=True, text=True, timeout=900, env={**os.environ, "MARFL_OFFLINE": "1"})
    assert plain.returncode == 0, plain.stderr[-2000:]

    run_dir = tmp_path / "cut"
    submitted = submit(slurm, tmp_path, "slurm/mar_fl.sbatch", *flags, env=job_env(slurm, run_dir), wait=False)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.strip().split(";")[0]
    deadline = time.time() + 600
    while time.time() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.5)
    while time.time() < deadline and len((run_dir / "metrics.jsonl").read_text().splitlines()) < 2:
        time.sleep(0.5)
    # what Slurm's --signal=B:USR1@120 does shortly before the time limit
    subprocess.run(["scancel", "--batch", "--signal=USR1", job_id], env=slurm.env, check=True)
    state, restarts = job_state(slurm, job_id)
    while time.time() < deadline and not (state == "COMPLETED" or state in ("FAILED", "CANCELLED")):
        time.sleep(1)
        state, restarts = job_state(slurm, job_id)
    log = "".join(open(os.path.join(tmp_path, n)).read() for n in os.listdir(tmp_path) if n.startswith("slurm-"))
    assert state == "COMPLETED" and restarts == 1, log[-3000:]
    assert "requeueing" in log and "resuming" in log
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["resumed_from_round"] >= 2
    assert metrics(run_dir) == metrics(reference)  # no duplicate, no missing round, the same numbers


def test_multinode_script_runs_one_launcher_per_task(slurm, tmp_path, data_dir, no_new_p2pd):
    """Two srun tasks on the one node stand in for two nodes: each runs its own peer range, and task 1 joins
    task 0's DHT through the bootstrap file in the shared run dir."""
    run_dir = tmp_path / "run"
    done = subprocess.run(
        ["sbatch", "--parsable", "--wait", f"--output={tmp_path}/slurm-%j.out", "--nodes=1", "--ntasks=2",
         "--ntasks-per-node=2", "--cpus-per-task=1", "slurm/mar_fl_multinode.sbatch",
         *TINY, "--np", "4", "--gk", "2", "--ni", "2", "--rounds", "3", "--data-dir", data_dir],
        cwd=ROOT, env=job_env(slurm, run_dir), capture_output=True, text=True, timeout=900)
    log = "".join(open(os.path.join(tmp_path, n)).read() for n in os.listdir(tmp_path) if n.startswith("slurm-"))
    assert done.returncode == 0, done.stderr + log[-3000:]
    rows = metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]
    assert all(r["reporting_peers"] == 4 and r["participating_peers"] == 4 for r in rows)
    assert log.count("MAR-FL run dir") == 2  # two launchers
    bootstrap = json.loads((run_dir / "bootstrap.json").read_text())
    assert bootstrap["attempt"] and bootstrap["attempt"].endswith(".0")
    assert json.loads((run_dir / "config.json").read_text())["peer_range"] is None
