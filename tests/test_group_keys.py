"""Group-key schedule: pure math, no network."""
import numpy as np
import pytest

from moshpit_all_reduce import initial_bucket, mixing_error, next_bucket, num_groups, simulate_schedule


def reference_grid_groups(num_peers, gs, gk, steps):
    """The published reference's sliding window, written independently: key = gk-1 base-gs digits."""
    keys = [[(p // gs ** (gk - j)) % gs for j in range(1, gk)] for p in range(num_peers)]
    schedule = []
    for _ in range(steps):
        groups = {}
        for p, key in enumerate(keys):
            groups.setdefault(tuple(key), []).append(p)
        schedule.append(sorted(sorted(g) for g in groups.values()))
        for members in groups.values():
            for rank, p in enumerate(sorted(members)):
                keys[p] = keys[p][1:] + [rank]
    return schedule


@pytest.mark.parametrize("gs,gk", [(2, 3), (4, 2), (3, 3), (2, 5), (5, 2), (4, 3)])
def test_full_grid_is_exact_and_matches_reference(gs, gk):
    n = gs**gk
    ours = [sorted(sorted(g) for g in step.values()) for step in simulate_schedule(n, gs, gk, gk)]
    assert ours == reference_grid_groups(n, gs, gk, gk)
    values = np.random.default_rng(0).standard_normal((n, 7))
    assert mixing_error(values, gs, gk, gk) < 1e-6


@pytest.mark.parametrize("n,gs,gk", [(125, 4, 4), (10, 3, 3), (7, 2, 3), (13, 4, 2), (50, 4, 3), (100, 4, 4)])
def test_every_peer_in_one_group_and_no_group_below_gs(n, gs, gk):
    for step in simulate_schedule(n, gs, gk, gk + 1):
        members = sorted(p for group in step.values() for p in group)
        assert members == list(range(n))
        assert min(len(g) for g in step.values()) >= gs


@pytest.mark.parametrize(
    "n,gs,gk,bound",
    # documented guarantee (README): max deviation after ni = gk steps, relative to the initial spread
    [(125, 4, 4, 0.05), (10, 3, 3, 0.05), (100, 4, 4, 0.05), (10, 3, 2, 0.15), (13, 4, 2, 0.25)],
)
def test_non_power_counts_mix_well(n, gs, gk, bound):
    rng = np.random.default_rng(1)
    worst = 0.0
    for _ in range(10):
        values = rng.standard_normal((n, 16))
        spread = np.abs(values - values.mean(0)).max()
        worst = max(worst, mixing_error(values, gs, gk, gk) / spread)
    assert worst < bound
    # more steps keep mixing: twice the steps is at least 5x closer
    values = rng.standard_normal((n, 16))
    assert mixing_error(values, gs, gk, 2 * gk) < mixing_error(values, gs, gk, gk) / 5


def test_buckets_are_balanced_and_next_bucket_is_sliding_window():
    n, groups = 125, num_groups(125, 4, 4)
    sizes = np.bincount([initial_bucket(p, n, groups) for p in range(n)])
    assert sizes.max() - sizes.min() <= 1
    # on a full grid, b*gs + r mod G drops the leading base-gs digit and appends r
    assert next_bucket(0b1011 // 1, 1, 2, 16) == 0b0111


def test_group_count_respects_key_dim():
    assert num_groups(16, 4, 2) == 4
    assert num_groups(100, 4, 2) == 4  # gk caps the key space: bigger groups, not more of them
    assert num_groups(3, 4, 3) == 1


# 8bit is hivemind's uniform quantizer: 256 bins over +-3 sigma, so tails clip (max error) but bulk is close
@pytest.mark.parametrize("name,tolerance,mean_tolerance", [("none", 0.0, 0.0), ("fp16", 1e-2, 1e-3),
                                                           ("8bit", 1.0, 0.02)])
def test_wire_compression_round_trip(name, tolerance, mean_tolerance):
    import torch
    from hivemind.compression import deserialize_torch_tensor, serialize_torch_tensor

    from moshpit_all_reduce import make_compression

    x = torch.randn(4096, generator=torch.Generator().manual_seed(0))
    y = deserialize_torch_tensor(serialize_torch_tensor(x, make_compression(name).compression_type))
    assert y.shape == x.shape and (x - y).abs().max().item() <= tolerance
    assert (x - y).abs().mean().item() <= mean_tolerance
