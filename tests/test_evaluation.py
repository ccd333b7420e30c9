"""Who evaluates on which test samples (--test-peers, --test-split) and accuracy targets in the summary."""
import json

import numpy as np
import pytest

from config_setup import parse_config
from mar_fl import accuracy_targets_reached, round_test_indices, summarize_round
from ml_tasks import dirichlet_partition, eval_slice, label_matched_test_partition


def _labels(per_class, classes=10, seed=0):
    return np.random.default_rng(seed).permutation(np.repeat(np.arange(classes), per_class))


def test_label_matched_test_partition_is_deterministic_disjoint_and_complete():
    train, test = _labels(600), _labels(100, seed=1)
    parts = dirichlet_partition(train, 8, alpha=0.5, seed=3)
    shares = label_matched_test_partition(test, train, parts, seed=3)
    assert len(shares) == 8
    assert sorted(np.concatenate(shares).tolist()) == list(range(len(test)))  # each test sample once
    again = label_matched_test_partition(test, train, parts, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(shares, again))
    other = label_matched_test_partition(test, train, parts, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(shares, other))  # the seed picks which samples
    assert [len(s) for s in shares] == [len(s) for s in other]  # but not how many of each class


def test_label_matched_test_partition_follows_each_training_mix():
    train, test = _labels(600), _labels(200, seed=1)
    parts = dirichlet_partition(train, 8, alpha=0.3, seed=5)
    shares = label_matched_test_partition(test, train, parts, seed=5)
    for part, share in zip(parts, shares):
        mix = np.bincount(train[part], minlength=10) / len(part)
        test_mix = np.bincount(test[share], minlength=10) / len(share)
        assert 0.5 * np.abs(mix - test_mix).sum() < 0.03  # total variation: the same label mix
        assert len(share) == pytest.approx(len(test) * len(part) / len(train), abs=10)
    # non-IID: the mixes differ a lot between peers (an iid slice would hold ~10 % of each class)
    dominant = [np.bincount(test[s], minlength=10).max() / len(s) for s in shares]
    assert np.mean(dominant) > 0.3


def test_label_matched_test_partition_shares_an_untrained_class_equally():
    train = np.array([0] * 30 + [1] * 30)
    test = np.array([0] * 10 + [1] * 10 + [2] * 9)
    shares = label_matched_test_partition(test, train, [np.arange(30), np.arange(30, 60), np.arange(0)], seed=0)
    assert [sorted(set(test[s].tolist())) for s in shares] == [[0, 2], [1, 2], [2]]
    assert [int(np.sum(test[s] == 2)) for s in shares] == [3, 3, 3]


def test_round_test_indices_all_and_aggregators():
    own = eval_slice(10000, 5, 8)
    cfg = parse_config(["--np", "8", "--wandb", "disabled"])
    assert round_test_indices(cfg, own, peer=5, participants=[1, 2], num_test=10000) is own  # all: everybody
    cfg = parse_config(["--np", "8", "--test-peers", "aggregators", "--wandb", "disabled"])
    participants = [6, 1, 3]
    assert round_test_indices(cfg, own, peer=5, participants=participants, num_test=10000) is None
    slices = [round_test_indices(cfg, own, peer=p, participants=participants, num_test=10000) for p in (1, 3, 6)]
    assert np.concatenate(slices).tolist() == list(range(10000))  # the aggregators cover the whole test set
    assert round_test_indices(cfg, own, peer=1, participants=[], num_test=10000) is None


def test_round_test_indices_dirichlet_split_keeps_own_share():
    own = np.array([3, 17, 42])
    cfg = parse_config(["--np", "8", "--sp", "dirichlet", "--test-split", "dirichlet", "--test-peers", "aggregators",
                        "--wandb", "disabled"])
    assert round_test_indices(cfg, own, peer=2, participants=[2, 4], num_test=100) is own
    assert round_test_indices(cfg, own, peer=3, participants=[2, 4], num_test=100) is None


def test_pooled_accuracy_is_the_count_weighted_mean_of_local_accuracies():
    base = {"round": 2, "t_start": 1.0, "t_end": 2.0, "round_seconds": 1.0, "train_seconds": 0.5,
            "aggregation_seconds": 0.5}
    local = [(0, 90, 100), (1, 10, 40), (2, 0, 0)]  # (peer, correct, count): peer 2's share is empty
    rows = [{**base, "peer": p, "test_correct": c, "test_loss_sum": 0.0, "test_count": n} for p, c, n in local]
    weighted = sum(n * (100 * c / n) for _, c, n in local if n) / sum(n for _, _, n in local)
    assert summarize_round(rows, run_start=0.0)["test_accuracy"] == pytest.approx(weighted)


def test_accuracy_targets_reached():
    rows = [{"round": 1, "test_accuracy": None, "elapsed_seconds": 5.0},
            {"round": 2, "test_accuracy": 48.0, "elapsed_seconds": 9.0},
            {"round": 4, "test_accuracy": 50.0, "elapsed_seconds": 17.5},
            {"round": 6, "test_accuracy": 49.0, "elapsed_seconds": 25.0},
            {"round": 8, "test_accuracy": 91.0, "elapsed_seconds": 33.0}]
    assert accuracy_targets_reached(rows, (50.0, 90.0, 97.5)) == {
        "50": {"round": 4, "seconds": 17.5}, "90": {"round": 8, "seconds": 33.0},
        "97.5": {"round": None, "seconds": None}}
    assert accuracy_targets_reached(rows, ()) == {}
    assert accuracy_targets_reached([], (10.0,)) == {"10": {"round": None, "seconds": None}}


def test_dirichlet_test_split_with_real_peers(tmp_path, data_dir, no_new_p2pd):
    """Each peer tests on its own label-matched share; the shares cover the test set; metrics pool them."""
    from ml_tasks import load_mnist
    from test_e2e import launch, read_metrics

    run_dir = tmp_path / "niid"
    proc = launch(run_dir, data_dir, "--sp", "dirichlet", "--al", "0.5", "--test-split", "dirichlet",
                  "--accuracy-targets", "5,99.9", "--matchmaking-timeout", "120", rounds=2)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    records = [json.loads(line) for i in range(4) for line in open(run_dir / "peers" / f"peer_{i:04d}.jsonl")]
    tested = {r["peer"]: r for r in records if r["round"] == 2}
    train, test = load_mnist(data_dir)
    shares = label_matched_test_partition(test.labels, train.labels,
                                          dirichlet_partition(train.labels, 4, alpha=0.5, seed=3), seed=3)
    assert [tested[i]["test_count"] for i in range(4)] == [len(s) for s in shares]
    assert sum(len(s) for s in shares) == 10000 and len({len(s) for s in shares}) > 1  # not the iid slices
    (row,) = [r for r in read_metrics(run_dir) if r["round"] == 2]
    assert row["test_accuracy"] == pytest.approx(100 * sum(r["test_correct"] for r in tested.values()) / 10000)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["accuracy_targets"]["99.9"] == {"round": None, "seconds": None}
    assert summary["accuracy_targets"]["5"] == {"round": 2, "seconds": row["elapsed_seconds"]}
