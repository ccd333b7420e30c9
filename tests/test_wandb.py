"""wandb: flag/env precedence (pure), a short real offline run read back with wandb's own reader (the
``wandb leet inspect`` transaction-log reader of wandb-core), its resume, and a wandb that cannot start (exit 2)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from conftest import ROOT
from mar_fl import WandbRun, WandbStartError
from mar_fl import read_wandb_state as read_state
from mar_fl import resolve_wandb_settings as resolve_settings

ROUND_KEYS = {"round", "train_loss", "test_accuracy", "test_loss", "participating_peers", "bytes_sent_per_peer",
              "round_seconds", "train_seconds", "aggregation_seconds", "elapsed_seconds"}
SUMMARY_KEYS = {"status", "best_test_accuracy", "final_test_accuracy", "rounds", "wall_seconds"}
NO_FLAGS = {"mode": None, "project": None, "entity": None, "group": None, "tags": None, "job_type": None}


# ==================== precedence (pure) ====================


def settings(env, **flags):
    return resolve_settings({**NO_FLAGS, **flags}, env, seed=3, task="mnist", name="run-a")


def test_defaults_without_flags_or_variables():
    s = settings({"WANDB_API_KEY": "k"})
    assert (s.mode, s.mode_source, s.project, s.entity, s.group, s.job_type, s.name) == \
        ("online", "default", "mar-fl", None, None, "train", "run-a")
    assert s.tags == ("mnist", "seed-3")


def test_variables_apply_when_no_flag_is_given():
    env = {"WANDB_MODE": "disabled", "WANDB_PROJECT": "p", "WANDB_ENTITY": "e", "WANDB_RUN_GROUP": "g",
           "WANDB_TAGS": "a, b", "WANDB_JOB_TYPE": "eval", "WANDB_NAME": "n"}
    s = settings(env)
    assert (s.mode, s.mode_source, s.project, s.entity, s.group, s.job_type, s.name) == \
        ("disabled", "WANDB_MODE", "p", "e", "g", "eval", "n")
    assert s.tags == ("a", "b", "mnist", "seed-3")


def test_flags_win_over_variables():
    env = {"WANDB_MODE": "bogus", "WANDB_PROJECT": "p", "WANDB_ENTITY": "e", "WANDB_RUN_GROUP": "g",
           "WANDB_TAGS": "a", "WANDB_JOB_TYPE": "eval"}
    s = settings(env, mode="offline", project="P", entity="E", group="G", tags="x,mnist", job_type="sweep")
    assert (s.mode, s.mode_source, s.project, s.entity, s.group, s.job_type) == \
        ("offline", "flag", "P", "E", "G", "sweep")
    assert s.tags == ("x", "mnist", "seed-3")


def test_mode_spellings_and_slurm_array_group():
    assert settings({"WANDB_MODE": "dryrun"}).mode == "offline"
    assert settings({"WANDB_MODE": "Online"}).mode == "online"
    assert settings({"WANDB_DISABLED": "true", "WANDB_MODE": "online"}).mode == "disabled"
    assert settings({"SLURM_ARRAY_JOB_ID": "123", "SLURM_ARRAY_TASK_ID": "4"}).group == "slurm-123"
    assert settings({"SLURM_ARRAY_JOB_ID": "123"}, group="mine").group == "mine"
    with pytest.raises(WandbStartError, match="WANDB_MODE"):
        settings({"WANDB_MODE": "bogus"})


class FakeRun:
    def __init__(self):
        self.logged, self.summary, self.calls = [], {}, []

    def log(self, values, step):
        self.logged.append((step, values))

    def mark_preempting(self):
        self.calls.append("preempting")

    def finish(self, exit_code):
        self.calls.append(("finish", exit_code))


def test_each_round_is_logged_once_and_remembered(tmp_path):
    (tmp_path / "wandb.json").write_text(json.dumps({"id": "abc", "last_round": 2}))
    run = WandbRun(FakeRun(), str(tmp_path), read_state(str(tmp_path)))
    run.log_rows([{"round": r, "test_accuracy": None, "train_loss": 0.5} for r in (1, 2, 3, 4)], {"shm": 1})
    run.log_rows([{"round": 4, "train_loss": 0.1}])  # a round re-run after a resume: not logged again
    assert run.run.logged == [(3, {"round": 3, "train_loss": 0.5, "shm": 1}),
                              (4, {"round": 4, "train_loss": 0.5, "shm": 1})]
    assert read_state(str(tmp_path)) == {"id": "abc", "last_round": 4}
    run.finish(75, preempted=True)
    assert run.run.calls == ["preempting", ("finish", 75)]


def test_only_a_default_online_mode_falls_back_to_offline(monkeypatch, tmp_path):
    import types

    import mar_fl

    modes = []

    def init(**kwargs):
        modes.append(kwargs["mode"])
        if kwargs["mode"] == "online":
            raise RuntimeError("no network")
        return FakeRun()

    monkeypatch.setattr(mar_fl, "_import_wandb", lambda settings: types.SimpleNamespace(init=init))
    run = mar_fl.start_wandb_run(settings({"WANDB_API_KEY": "k"}), str(tmp_path), {})
    assert modes == ["online", "offline"] and isinstance(run.run, FakeRun)
    assert read_state(str(tmp_path))["id"] == run.run_id
    with pytest.raises(WandbStartError, match="^--wandb online: wandb could not start"):
        mar_fl.start_wandb_run(settings({}, mode="online"), str(tmp_path), {})


def test_peers_and_the_config_never_import_wandb():
    code = "import sys, mar_fl, config_setup; assert 'wandb' not in sys.modules, 'wandb imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]


# ==================== a real offline run, read back ====================


def launch(run_dir, data_dir, *extra, env=None, rounds=2):
    cmd = [sys.executable, os.path.join(ROOT, "mar_fl.py"), "--np", "2", "--gs", "2", "--gk", "1", "--ni", "1",
           "--rounds", str(rounds), "--tf", "1", "--iv", "2", "-sd", "5", "--data-dir", data_dir,
           "--run-dir", str(run_dir), "--matchmaking-timeout", "30", *extra]
    clean = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env={**clean, **(env or {})})


def inspect(wandb_file, *flags):
    """wandb's own reader of a run's ``.wandb`` transaction log, as JSON."""
    proc = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", *flags, str(wandb_file)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc.stdout


def history(run_dir):
    """(run id, step, item) of every history record of every offline run in the run dir, oldest run first."""
    out = []
    for folder in sorted((run_dir / "wandb").glob("offline-run-*")):
        wandb_file = next(folder.glob("run-*.wandb"))
        for line in inspect(wandb_file).splitlines():
            record = json.loads(line)
            if record.get("type") == "history":
                out.append((wandb_file.stem, record["history"]["step"]["num"], record["history"]["item"]))
    return out


@pytest.fixture(scope="module")
def offline_run(tmp_path_factory, data_dir):
    run_dir = tmp_path_factory.mktemp("wandb") / "run"
    proc = launch(run_dir, data_dir, "--wandb", "offline", "--wandb-group", "grp", "--wandb-tags", "t1",
                  env={"WANDB_PROJECT": "from-env", "WANDB_JOB_TYPE": "env-job"})
    return run_dir, proc


def test_offline_run_logs_every_round_with_the_round_as_step(offline_run, no_new_p2pd):
    run_dir, proc = offline_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = history(run_dir)
    assert [step for _, step, _ in rows] == [1, 2]
    for _, step, item in rows:
        assert ROUND_KEYS <= set(item) and item["round"] == step
        assert item["test_accuracy"] > 0


def test_offline_run_has_config_summary_and_settings(offline_run):
    run_dir, proc = offline_run
    wandb_file = next((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    seen = json.loads(inspect(wandb_file, "--summary"))
    config = json.loads((run_dir / "config.json").read_text())
    assert {k: v for k, v in seen["config"].items() if k != "_wandb"} == config
    assert SUMMARY_KEYS <= set(seen["summary"]) and seen["summary"]["status"] == "completed"
    assert seen["summary"]["rounds"] == 2 and seen["state"] == "finished"
    assert seen["project"] == "from-env" and set(seen["tags"]) == {"t1", "mnist", "seed-5"}
    run = next(json.loads(line)["run"] for line in inspect(wandb_file).splitlines() if '"type":"run"' in line)
    assert run["run_group"] == "grp" and run["job_type"] == "env-job"
    assert json.loads((run_dir / "wandb.json").read_text()) == {"id": run["run_id"], "last_round": 2}


def test_resume_continues_the_same_wandb_run_without_gaps_or_repeats(offline_run, data_dir, no_new_p2pd):
    run_dir, first = offline_run
    assert first.returncode == 0
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "mar_fl.py"), "--resume", str(run_dir), "--rounds",
                           "3", "--wandb", "offline", "--data-dir", data_dir], capture_output=True, text=True,
                          timeout=600, env={k: v for k, v in os.environ.items() if not k.startswith("WANDB_")})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = history(run_dir)
    assert [step for _, step, _ in rows] == [1, 2, 3]
    assert len({run_id for run_id, _, _ in rows}) == 1  # one wandb run, in two offline segments


# ==================== a wandb that cannot start ====================


FAKE_WANDB = {
    "import": "raise ImportError('broken install')\n",
    "init": "def init(**kwargs):\n    raise RuntimeError('no\\nservice')\n",
}


@pytest.mark.parametrize("failure, how", [("import", "flag"), ("init", "flag"), ("init", "env")])
def test_wandb_that_cannot_start_is_exit_2_naming_the_flag(tmp_path, data_dir, failure, how):
    fake = tmp_path / "fake" / "wandb"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(textwrap.dedent(FAKE_WANDB[failure]))
    env = {"PYTHONPATH": str(tmp_path / "fake")} | ({"WANDB_MODE": "offline"} if how == "env" else {})
    extra = ["--wandb", "offline"] if how == "flag" else []
    proc = launch(tmp_path / "run", data_dir, *extra, env=env)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-2000:]
    assert "--wandb offline" in lines[0] and "Traceback" not in proc.stderr
    assert ("WANDB_MODE" in lines[0]) == (how == "env")
    assert "MAR-FL run dir" not in proc.stdout  # refused before any peer started
    assert not (tmp_path / "run" / "config.json").exists()  # the same command can simply be repeated
