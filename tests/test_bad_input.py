"""Bad command lines: each one is refused with ONE line on stderr naming the flag and exit status 2, before any
peer or p2pd starts (README's promise). Table-driven; most run in-process through ``mar_fl.main``, a handful as
real subprocesses to prove there is no traceback, no p2pd and nothing new in /dev/shm."""
import json
import os
import subprocess
import sys

import pytest

import mar_fl
from conftest import ROOT

PEER_ID = "QmXoypizjW3WknFiJnKLwHCnL72vedxjQkDDP1mXWo6uco"

# (command line, the flag its one-line error must name); FILE is an existing plain file, DIR an existing folder,
# RUN a run dir whose config.json is replaced per case (see RESUME_CONFIGS)
CASES = [
    (["--run-dir", "FILE"], "--run-dir"),
    (["--run-dir", "FILE/run"], "--run-dir"),
    (["--run-dir", "DIR/" + "x" * 300], "--run-dir"),
    (["-sd", "1" * 300], "-sd"),
    (["-sd", "-1"], "-sd"),
    (["-sd", str(2**63)], "-sd"),
    (["--np", str(2**70)], "--np"),
    (["--initial-peers", "garbage"], "--initial-peers"),
    (["--initial-peers", "DIR"], "--initial-peers"),
    (["--initial-peers", "/ip4/1.2.3.4/tcp/5"], "--initial-peers"),
    (["--initial-peers", "/ip4/1.2.3.4/tcp/5/p2p/QmX"], "--initial-peers"),
    (["--initial-peers", f"/ip4/300.2.3.4/tcp/5/p2p/{PEER_ID}"], "--initial-peers"),
    (["--startup-timeout", "nan"], "--startup-timeout"),
    (["--startup-timeout", "-5"], "--startup-timeout"),
    (["--startup-timeout", "inf"], "--startup-timeout"),
    (["--lr", "inf"], "--lr"),
    (["--matchmaking-timeout", "nan"], "--matchmaking-timeout"),
    (["--allreduce-timeout", "inf"], "--allreduce-timeout"),
    (["--rt", "nan"], "--rt"),
    (["--al", "inf"], "--al"),
    (["--ct", "nan"], "--ct"),
    (["--nm", "nan"], "--nm"),
    (["--dp-delta", "nan"], "--dp-delta"),
    (["--target-acc", "nan"], "--target-acc"),
    (["--cd", "nan"], "--cd"),
    (["--cd", "-1"], "--cd"),
    (["--mm", "nan"], "--mm"),
    (["--up", "nan"], "--up"),
    (["--ap", "inf"], "--ap"),
    (["--dl", "nan"], "--dl"),
    (["--shm-warn", "nan"], "--shm-warn"),
    (["--lr-drop-to", "inf", "--lr-drop-round", "3"], "--lr-drop-to"),
    (["--np", "4", "--up", "10"], "--up"),
    (["--np", "4", "--ap", "20"], "--ap"),
    (["--news-cache-dir", "FILE"], "--news-cache-dir"),
    (["--data-dir", "FILE"], "--data-dir"),
    (["--run-dir", "RUN:ok"], "--run-dir"),  # a fresh run would overwrite another run's config and files
    (["--host", "garbage"], "--host"),
    (["--host", "999.1.1.1"], "--host"),
    (["--host", "::1"], "--host"),
    (["--announce-host", "0.0.0.0"], "--announce-host"),
    (["--announce-host", "nope"], "--announce-host"),
    (["--resume", "FILE"], "--resume"),
    (["--resume", "RUN:list"], "--resume"),
    (["--resume", "RUN:wrong-type"], "--resume"),
    (["--resume", "RUN:out-of-range"], "--resume"),
    (["--resume", "RUN:nan"], "--resume"),
    (["--resume", "RUN:ok", "--lr", "0.2"], "--lr"),
    (["--resume", "RUN:ok", "--np", "5"], "--np"),
]

RESUME_CONFIGS = {
    "list": [1, 2, 3],
    "wrong-type": {"num_peers": "four", "learning_rate": 0.1},
    "out-of-range": {"num_peers": 4, "group_size": 1},
    "nan": {"num_peers": 4, "learning_rate": float("nan")},
    "ok": {"num_peers": 4, "learning_rate": 0.1},
}


def materialise(argv, tmp_path):
    """Replace the placeholders FILE, DIR and RUN:<config> with real paths under ``tmp_path``."""
    (tmp_path / "FILE").write_text("not a folder")
    out = []
    for arg in argv:
        if arg.startswith("RUN:"):
            run = tmp_path / "runs" / arg[4:]
            run.mkdir(parents=True, exist_ok=True)
            (run / "config.json").write_text(json.dumps(RESUME_CONFIGS[arg[4:]]))
            arg = str(run)
        elif arg == "FILE" or arg.startswith(("FILE/", "DIR")):
            arg = str(tmp_path / arg.replace("DIR", ".", 1))
        out.append(arg)
    return out


def assert_one_line_naming(stderr, flag):
    lines = stderr.strip().splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("mar_fl.py: error: ") and flag in lines[0], lines[0]
    assert "Traceback" not in stderr


@pytest.mark.parametrize("argv, flag", CASES, ids=[" ".join(a)[:60] for a, _ in CASES])
def test_bad_command_line_is_one_line_naming_the_flag(argv, flag, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # a default run dir, were one made, lands here
    empty_data = tmp_path / "no-data"  # a command line accepted by mistake fails on the data, never starts a run
    code = mar_fl.main(["--data-dir", str(empty_data)] + materialise(argv, tmp_path) + ["--wandb", "disabled"])
    assert code == 2
    assert_one_line_naming(capsys.readouterr().err, flag)
    assert not (tmp_path / "runs").exists() or all(p.name in RESUME_CONFIGS for p in (tmp_path / "runs").iterdir())


def shm_entries() -> set:
    return set(os.listdir("/dev/shm"))


SUBPROCESS_CASES = [
    (["--run-dir", "FILE/run"], "--run-dir"),
    (["--startup-timeout", "nan"], "--startup-timeout"),
    (["--initial-peers", "garbage"], "--initial-peers"),
    (["--resume", "RUN:list"], "--resume"),
    # a second launcher (peers 2-3) whose node 0 never writes the bootstrap file
    (["--np", "4", "--peer-range", "2-3", "--run-dir", "DIR/joined", "--startup-timeout", "2"], "--initial-peers"),
]


@pytest.mark.parametrize("argv, flag", SUBPROCESS_CASES, ids=[" ".join(a)[:60] for a, _ in SUBPROCESS_CASES])
def test_bad_command_line_starts_nothing(argv, flag, tmp_path, data_dir, no_new_p2pd):
    before = shm_entries()
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "mar_fl.py"), *materialise(argv, tmp_path),
                           "--data-dir", data_dir, "--wandb", "disabled"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path)
    assert proc.returncode == 2
    assert_one_line_naming(proc.stderr, flag)
    assert not (shm_entries() - before)
    assert not (tmp_path / "joined" / "peers").exists()  # the waiting launcher never got to start its peers
