"""Resume never loses a row: what it cuts is moved aside, damaged checkpoints and lines are passed over with a
warning, stray files are left alone. Fabricated run dirs, no processes."""
import glob
import json
import logging
import os

import numpy as np
import pytest
import torch

import mar_fl
from config_setup import RunConfig
from ml_tasks import BatchOrder
from peer_aggregation_logic import MarAveraging


def peer_state(index, round_index, seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Linear(6, 3)
    order = BatchOrder(indices=np.arange(50), seed=1, peer=index)
    order.next_batch(7)
    return mar_fl.PeerState(index=index, model=model, momentum=[torch.randn_like(p) for p in model.parameters()],
                            order=order, round_index=round_index)


def write_rows(path, rounds, **extra):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as f:
        f.writelines(json.dumps({"round": r, **extra}) + "\n" for r in rounds)


def all_lines(run_dir):
    """Every non-empty line of every jsonl file in the run dir, moved-aside copies included."""
    paths = glob.glob(os.path.join(run_dir, "**", "*.jsonl"), recursive=True)
    return sorted(line for p in paths for line in open(p, "rb").read().split(b"\n") if line.strip())


def peer_file(run_dir, index):
    return os.path.join(run_dir, "peers", f"peer_{index:04d}.jsonl")


def fabricate_run(run_dir, last_rounds, *, ckpt_every=10, save=True):
    """Peers that logged rounds 1..last and checkpointed every ``ckpt_every`` rounds, in the order a run does."""
    for index, last in last_rounds.items():
        write_rows(peer_file(run_dir, index), range(1, last + 1), peer=index)
    write_rows(os.path.join(run_dir, "metrics.jsonl"), range(1, min(last_rounds.values()) + 1))
    for round_index in range(ckpt_every, max(last_rounds.values()) + 1, ckpt_every):
        for index, last in last_rounds.items():
            if round_index <= last and save:
                mar_fl.save_checkpoint(run_dir, peer_state(index, round_index), MarAveraging())


def test_a_peer_dead_early_leaves_a_round_to_resume_from_and_nothing_is_lost(tmp_path, caplog):
    """The issue's case: --ckpt-every 10, peer 0 dead at round 15, the others at 40."""
    run_dir = str(tmp_path)
    fabricate_run(run_dir, {0: 15, 1: 40, 2: 40})
    assert mar_fl.checkpoint_rounds(run_dir, 1) == [10, 20, 30, 40]  # round 10 is kept: peer 0 has only it
    before = all_lines(run_dir)
    with caplog.at_level(logging.WARNING, logger="mar_fl"):
        assert mar_fl.prepare_resume(RunConfig(num_peers=3), run_dir, primary=True) == 10
    assert all_lines(run_dir) == before  # every line is still somewhere
    assert [r["round"] for r in mar_fl.read_jsonl(peer_file(run_dir, 1))] == list(range(1, 11))
    assert len(mar_fl.read_jsonl(os.path.join(run_dir, "metrics.jsonl"))) == 10
    aside = glob.glob(os.path.join(run_dir, "moved_aside", "after-r000010-*"))
    assert len(aside) == 1
    assert [r["round"] for r in mar_fl.read_jsonl(os.path.join(aside[0], "peers", "peer_0001.jsonl"))] == \
        list(range(11, 41))
    assert mar_fl.checkpoint_rounds(run_dir, 1) == [10]  # later checkpoints moved aside, not deleted
    assert os.path.exists(os.path.join(aside[0], "checkpoints", "peer_0001", "round_000040.pt.sha256"))
    assert "moved" in caplog.text


def test_no_common_round_starts_from_round_1_and_moves_everything_aside(tmp_path, caplog):
    """Checkpoints pruned by an older version: no round is shared; the run starts over, nothing is deleted."""
    run_dir = str(tmp_path)
    fabricate_run(run_dir, {0: 15, 1: 40}, save=False)
    for index, rounds in {0: [10], 1: [20, 30, 40]}.items():
        for round_index in rounds:
            mar_fl.save_checkpoint(run_dir, peer_state(index, round_index), MarAveraging())
    before = all_lines(run_dir)
    with caplog.at_level(logging.WARNING, logger="mar_fl"):
        assert mar_fl.prepare_resume(RunConfig(num_peers=2), run_dir, primary=True) == 0
    assert "starting again from round 1" in caplog.text
    assert all_lines(run_dir) == before
    assert mar_fl.read_jsonl(os.path.join(run_dir, "metrics.jsonl")) == []
    assert mar_fl.checkpoint_rounds(run_dir, 1) == []


@pytest.mark.parametrize("damage", ["truncate", "flip", "no sidecar"])
def test_a_damaged_newest_checkpoint_falls_back_to_an_intact_older_round(tmp_path, caplog, damage):
    run_dir = str(tmp_path)
    fabricate_run(run_dir, {0: 20, 1: 20})
    newest = mar_fl.checkpoint_path(run_dir, 1, 20)
    data = open(newest, "rb").read()
    if damage == "truncate":
        open(newest, "wb").write(data[: len(data) // 2])
    elif damage == "flip":
        open(newest, "wb").write(data[:-1] + bytes([data[-1] ^ 1]))
    else:  # an incomplete save, or a checkpoint of an older MAR-FL
        os.unlink(mar_fl.digest_path(newest))
    with caplog.at_level(logging.WARNING, logger="mar_fl"):
        assert mar_fl.common_checkpoint_round(run_dir, 2) == 10
    assert "round 20 cannot be resumed" in caplog.text and "peer_0001" in caplog.text


def test_checkpoints_load_weights_only_and_restore_every_rng(tmp_path):
    import random

    saved = peer_state(2, 5)
    torch.manual_seed(123), np.random.seed(4), random.seed(5)
    mar_fl.save_checkpoint(str(tmp_path), saved, MarAveraging())
    expected = (torch.rand(3), np.random.rand(3), random.random())
    path = mar_fl.checkpoint_path(str(tmp_path), 2, 5)
    torch.load(path, weights_only=True)  # only tensors and plain values: nothing for the unpickler to run
    loaded = peer_state(2, 0, seed=1)
    mar_fl.load_checkpoint(path, loaded, MarAveraging(), device="cpu")
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]
    assert loaded.round_index == 5 and mar_fl.checkpoint_problem(path) is None


def test_damaged_jsonl_lines_are_skipped_with_a_warning_and_kept_on_resume(tmp_path, caplog):
    run_dir = str(tmp_path)
    fabricate_run(run_dir, {0: 20, 1: 20})
    metrics = os.path.join(run_dir, "metrics.jsonl")
    with open(metrics, "ab") as f:
        f.write(b'{"round": 3, "tr\n\xff\xfe binary\n[1, 2]\n{"round": "7"}\n')
    with open(peer_file(run_dir, 0), "ab") as f:
        f.write(b"not json\n" + b'{"round": 21, "pe')  # a damaged line and an unfinished one
    with caplog.at_level(logging.WARNING, logger="mar_fl"):
        assert len(mar_fl.read_jsonl(metrics)) == 20
    assert caplog.text.count("skipping a damaged line") == 4
    before = all_lines(run_dir)
    assert mar_fl.prepare_resume(RunConfig(num_peers=2), run_dir, primary=True) == 20
    assert all_lines(run_dir) == before
    assert len(open(metrics).read().splitlines()) == 20  # the damaged lines now live in moved_aside/


def test_collector_skips_damaged_lines_and_stray_files_in_peers(tmp_path, caplog):
    run_dir = str(tmp_path)
    rec = lambda peer, rnd: json.dumps({"round": rnd, "peer": peer, "t_start": 1.0, "t_end": 2.0,  # noqa: E731
                                        "round_seconds": 1.0, "train_seconds": 0.5, "aggregation_seconds": 0.5})
    peers = tmp_path / "peers"
    peers.mkdir()
    (peers / "peer_0000.jsonl").write_text(rec(0, 1) + "\n{garbage\n" + rec(1, 2) + "\n" + rec(0, 2) + "\n")
    (peers / "peer_0001.jsonl").write_text(rec(1, 1) + "\n" + rec(1, 2) + "\n")
    (peers / "notes.txt").write_bytes(b"\x00\xffnot json at all")
    (peers / "peer_0001.jsonl.bak").write_text("{}\n")
    (peers / "peer_0007.jsonl").write_text(rec(7, 1) + "\n")  # no such peer in a 2-peer run
    (peers / "peer_0002.jsonl").mkdir()
    collector = mar_fl.MetricsCollector(run_dir, num_peers=2)
    with caplog.at_level(logging.WARNING, logger="mar_fl"):
        rows = collector.poll()
        collector.poll()
    assert [(r["round"], r["reporting_peers"]) for r in rows] == [(1, 2), (2, 2)]
    assert caplog.text.count("skipping a damaged line") == 2  # the garbage, and peer 1's record in peer 0's file
    for name in ("notes.txt", "peer_0001.jsonl.bak", "peer_0007.jsonl", "peer_0002.jsonl"):
        assert caplog.text.count(f"{name}: not the record file") == 1  # warned once, not at every poll


def test_collector_rereads_a_file_that_a_resume_cut(tmp_path, caplog):
    run_dir = str(tmp_path)
    timing = dict(t_start=1.0, t_end=2.0, round_seconds=1.0, train_seconds=0.5, aggregation_seconds=0.5)
    write_rows(peer_file(run_dir, 0), range(1, 6), peer=0, **timing)
    collector = mar_fl.MetricsCollector(run_dir, num_peers=1)
    assert [r["round"] for r in collector.poll()] == [1, 2, 3, 4, 5]
    mar_fl.cut_jsonl(peer_file(run_dir, 0), 2, str(tmp_path / "aside.jsonl"))
    write_rows(peer_file(run_dir, 0), range(3, 8), peer=0, rerun="after the resume", **timing)  # longer lines
    with caplog.at_level(logging.WARNING, logger="mar_fl"):
        assert [r["round"] for r in collector.poll()] == [6, 7]
    assert "damaged" not in caplog.text  # read from the new file's start, not from the old offset mid-line


def launch(*args):
    import subprocess
    import sys

    from conftest import ROOT

    return subprocess.run([sys.executable, os.path.join(ROOT, "mar_fl.py"), *args], capture_output=True, text=True,
                          timeout=600)


def test_real_resume_past_a_damaged_checkpoint_repeats_the_same_round(tmp_path, data_dir, no_new_p2pd):
    """Two peers, three rounds, a checkpoint every round; then round 3 of peer 1 is truncated, a line damaged and a
    stray file dropped into peers/: the resume continues after round 2 and runs round 3 again, identically."""
    run_dir = tmp_path / "run"
    first = launch("--np", "2", "--gs", "2", "--gk", "1", "--ni", "1", "--rounds", "3", "--tf", "3", "--iv", "2",
                   "-sd", "3", "--data-dir", data_dir, "--run-dir", str(run_dir), "--wandb", "disabled",
                   "--ckpt-every", "1", "--matchmaking-timeout", "30")
    assert first.returncode == 0, first.stderr[-2000:]
    original = mar_fl.read_jsonl(str(run_dir / "metrics.jsonl"))
    newest = mar_fl.checkpoint_path(str(run_dir), 1, 3)
    open(newest, "r+b").truncate(100)
    with open(run_dir / "peers" / "peer_0000.jsonl", "a") as f:
        f.write("garbage{\n")
    (run_dir / "peers" / "README.txt").write_text("notes")
    before = all_lines(str(run_dir))
    again = launch("--resume", str(run_dir), "--rounds", "4", "--data-dir", data_dir)
    assert again.returncode == 0, again.stderr[-2000:]
    assert "round 3 cannot be resumed" in again.stderr and "README.txt" in again.stderr
    assert "Traceback" not in again.stderr
    assert set(before) <= set(all_lines(str(run_dir)))  # every earlier line is still somewhere
    rows = mar_fl.read_jsonl(str(run_dir / "metrics.jsonl"))
    assert [r["round"] for r in rows] == [1, 2, 3, 4]
    assert json.loads((run_dir / "summary.json").read_text())["resumed_from_round"] == 2
    untimed = lambda row: {k: v for k, v in row.items() if k not in mar_fl.TIMING_KEYS}  # noqa: E731
    assert untimed(rows[2]) == untimed(original[2])  # the checkpoint of round 2 restored everything
