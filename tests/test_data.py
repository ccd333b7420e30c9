"""Partitioning, batch order and participation: pure functions."""
import numpy as np
import pytest

from ml_tasks import BatchOrder, dirichlet_partition, eval_slice, iid_partition, load_mnist
from peer_synchronization import aggregation_participants, update_participants


def test_iid_partition_is_disjoint_and_complete():
    parts = iid_partition(60000, 7)
    assert sorted(np.concatenate(parts).tolist()) == list(range(60000))
    assert max(map(len, parts)) - min(map(len, parts)) <= 6


@pytest.mark.parametrize("alpha", [0.1, 0.5, 1.0])
def test_dirichlet_partition_properties(alpha):
    labels = np.random.default_rng(0).integers(0, 10, size=5000)
    parts = dirichlet_partition(labels, 16, alpha=alpha, seed=3)
    flat = np.concatenate(parts)
    assert len(flat) == len(set(flat.tolist())) == 5000
    assert min(map(len, parts)) >= 10
    again = dirichlet_partition(labels, 16, alpha=alpha, seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    other = dirichlet_partition(labels, 16, alpha=alpha, seed=4)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other))


def test_dirichlet_small_alpha_is_skewed():
    labels = np.repeat(np.arange(10), 500)
    parts = dirichlet_partition(labels, 8, alpha=0.1, seed=0)
    dominant = [np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]
    assert np.mean(dominant) > 0.4  # iid would be ~0.1


def test_eval_slices_cover_test_set_once():
    covered = np.concatenate([eval_slice(10000, i, 6) for i in range(6)])
    assert covered.tolist() == list(range(10000))


def test_batch_order_is_seeded_and_reshuffles_each_epoch():
    idx = np.arange(100, 150)
    a, b = BatchOrder(idx, seed=1, peer=2), BatchOrder(idx, seed=1, peer=2)
    first = np.concatenate([a.next_batch(10) for _ in range(5)])
    assert np.array_equal(first, np.concatenate([b.next_batch(10) for _ in range(5)]))
    assert sorted(first.tolist()) == idx.tolist()
    second = np.concatenate([a.next_batch(10) for _ in range(5)])
    assert sorted(second.tolist()) == idx.tolist() and not np.array_equal(first, second)
    assert not np.array_equal(first, np.concatenate([BatchOrder(idx, seed=1, peer=3).next_batch(50)]))


def test_participation_is_deterministic_and_sized():
    kw = dict(seed=5, round_index=3, num_peers=20)
    ups = update_participants(update_percent=50, **kw)
    assert len(ups) == 10 and ups == update_participants(update_percent=50, **kw)
    assert update_participants(update_percent=50, seed=5, round_index=4, num_peers=20) != ups
    same = aggregation_participants(update_percent=50, aggregate_percent=50, dropout_percent=0, **kw)
    assert same == ups  # equal --up and --ap: true partial participation
    agg = aggregation_participants(update_percent=100, aggregate_percent=100, dropout_percent=30, **kw)
    assert 5 <= len(agg) < 20
    assert agg == aggregation_participants(update_percent=100, aggregate_percent=100, dropout_percent=30, **kw)


def test_mnist_loads_from_shared_copy(data_dir):
    train, test = load_mnist(data_dir)
    assert (len(train), len(test)) == (60000, 10000)
    assert train.labels[:10].tolist() == [5, 0, 4, 1, 9, 2, 1, 3, 1, 4]
    assert train.inputs.shape == (60000, 28, 28)
