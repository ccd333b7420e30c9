"""Group-key schedule: pure math, no network (and one run with real peers for --grouping reference)."""
import json
import math
import re

import numpy as np
import pytest

from moshpit_all_reduce import (
    AveragerOptions,
    MarSchedule,
    MoshpitAverager,
    StepReport,
    group_label,
    group_size_warning,
    initial_bucket,
    key_dim_for,
    make_grouping,
    max_group_size,
    mixing_error,
    moshpit_steps,
    next_bucket,
    num_groups,
    plan_groups,
    simulate_schedule,
)


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


# ==================== --grouping reference ====================


def reference_rules_groups(n, gs, gk, participants, steps):
    """The published reference's keys, written independently: lists, the global index among all ``n`` peers, and
    a group is whoever of ``participants`` holds an equal key. Returns per step ``{key tuple: members}``."""
    dims = gk - 1
    grid = gs**gk == n
    buckets = -(-n // gs)

    def pack(bucket, phase):
        if dims == 1:
            return [bucket]
        if dims == 2:
            return [bucket, phase]
        return [bucket] + [0] * (dims - 2) + [phase]

    def first(i):
        if not grid:
            return pack(i // gs, 0)
        digits = []  # gk base-gs digits of i, most significant first
        for _ in range(gk):
            digits.insert(0, i % gs)
            i //= gs
        return digits[: gk - 1]

    def after(key, rank):
        if grid:
            return key[1:] + [rank]
        phase = key[-1] if dims >= 2 else 0
        if (gs, gk, n) == (4, 3, 125):
            alphas = [1, 5]
        elif (gs, gk, n) == (3, 4, 125):
            alphas = [1, 5, 11]
        else:
            a = 2 * phase + 1
            while math.gcd(a, buckets) > 1:
                a += 2
            alphas = [a]
        return pack((key[0] + alphas[phase % len(alphas)] * rank) % buckets, (phase + 1) % len(alphas))

    keys = {i: first(i) for i in participants}
    out = []
    for _ in range(steps):
        groups = {}
        for i in sorted(keys):
            groups.setdefault(tuple(keys[i]), []).append(i)
        out.append(groups)
        keys = {i: after(keys[i], sorted(groups[tuple(keys[i])]).index(i)) for i in keys}
    return out


def ours_reference(n, gs, gk, participants, steps):
    grouping = make_grouping("reference", participants=participants, group_size=gs, key_dim=gk, num_peers=n)
    return plan_groups(grouping, participants, steps)


@pytest.mark.parametrize("n,gs,gk", [(8, 2, 3), (16, 4, 2), (27, 3, 3), (64, 4, 3), (125, 4, 3), (125, 3, 4),
                                     (10, 3, 3), (12, 4, 2), (7, 2, 3), (100, 4, 4)])
def test_reference_grouping_matches_independent_rules(n, gs, gk):
    steps = gk + 2
    assert ours_reference(n, gs, gk, range(n), steps) == reference_rules_groups(n, gs, gk, range(n), steps)
    if n == gs**gk:  # and on a full grid it is the sliding window (the other independent version above)
        ours = [sorted(step.values()) for step in ours_reference(n, gs, gk, range(n), gk)]
        assert ours == reference_grid_groups(n, gs, gk, gk)
    # the reference never puts more than gs peers in a group (packed would, for n > gs**gk)
    assert max(len(g) for step in ours_reference(n, gs, gk, range(n), steps) for g in step.values()) <= gs


@pytest.mark.parametrize("n,gs,gk", [(16, 2, 4), (64, 4, 3), (125, 4, 3), (125, 3, 4), (10, 3, 3), (12, 4, 2)])
def test_reference_grouping_keeps_holes_under_partial_participation(n, gs, gk):
    rng = np.random.default_rng(n * 100 + gs * 10 + gk)
    smaller, singletons = 0, 0
    for fraction in (0.3, 0.5, 0.8):
        for _ in range(5):
            subset = sorted(rng.choice(n, size=max(1, int(fraction * n)), replace=False).tolist())
            ours = ours_reference(n, gs, gk, subset, gk)
            assert ours == reference_rules_groups(n, gs, gk, subset, gk)
            for step in ours:
                assert sorted(p for g in step.values() for p in g) == subset  # every participant, once
                smaller += sum(1 for g in step.values() if len(g) < gs)
                singletons += sum(1 for g in step.values() if len(g) == 1)
            # packed re-packs the same subset into groups of at least gs (when there are gs of them)
            if len(subset) >= gs:
                packed = plan_groups(make_grouping("packed", participants=subset, group_size=gs, key_dim=gk,
                                                   num_peers=n), subset, gk)
                assert min(len(g) for step in packed for g in step.values()) >= gs
    assert smaller > 0 and singletons > 0


def test_packed_plan_is_the_old_schedule_on_global_indices():
    subset = [1, 4, 5, 9, 11, 12, 20, 31, 33]
    plan = plan_groups(make_grouping("packed", participants=subset, group_size=2, key_dim=3, num_peers=40), subset, 4)
    old = simulate_schedule(len(subset), 2, 3, 4)
    assert plan == [{b: [subset[p] for p in members] for b, members in step.items()} for step in old]


class _WalkAverager:
    """What moshpit_steps needs of an averager, without a network."""

    def __init__(self, index):
        self.options = AveragerOptions(prefix="run", index=index, num_peers=1000)

    def begin_round(self, round_index):
        pass

    group_key = MoshpitAverager.group_key


@pytest.mark.parametrize("grouping,n,gs,gk", [("packed", 20, 2, 3), ("reference", 20, 2, 3),
                                              ("reference", 125, 4, 3), ("reference", 27, 3, 3)])
def test_moshpit_steps_walks_the_planned_groups_and_keys_encode_them(grouping, n, gs, gk):
    """Every peer walks with the rank it actually had; peers that meet share one DHT key, and only they."""
    participants = sorted(np.random.default_rng(5).choice(n, size=n * 3 // 5, replace=False).tolist())
    schedule = MarSchedule(gs, gk, gk, grouping=grouping, num_peers=n)
    seen = {}
    for me in participants:
        def run_step(key, expected, me=me):
            members = tuple(sorted(expected))
            seen.setdefault(key, set()).add((members, me))
            return StepReport(members=members, rank=members.index(me))

        moshpit_steps(_WalkAverager(me), participants=participants, round_index=7, schedule=schedule, tag="avg",
                      run_step=run_step)
    for key, views in seen.items():
        (members,) = {m for m, _ in views}  # everybody under one key expects the same members
        assert {me for _, me in views} == set(members)
    plan = plan_groups(make_grouping(grouping, participants=participants, group_size=gs, key_dim=gk, num_peers=n),
                       participants, gk)
    assert sorted(m for m, _ in (next(iter(v)) for v in seen.values())) == sorted(
        tuple(g) for step in plan for g in step.values())
    suffix = re.compile(r"run\.avg\.r7\.s\d\.g\d+" + (r"(_\d+)+" if grouping == "reference" else "") + "$")
    assert all(suffix.fullmatch(key) for key in seen)


@pytest.mark.parametrize("grouping", ["packed", "reference"])
def test_a_group_that_lost_members_leaves_the_later_steps_as_planned(grouping):
    """A peer whose group met without some members (late, gone, left out) walks on by its planned rank: every
    later group is still the planned one, so one missing member costs one group one step, not the round."""
    n, gs, gk = 125, 5, 3
    participants = list(range(n))
    schedule = MarSchedule(gs, gk, gk, grouping=grouping, num_peers=n)

    def walk(missing):
        seen = {}
        for me in participants:
            def run_step(key, expected, me=me):
                met = tuple(sorted(i for i in expected if i == me or (key, i) not in missing))
                seen.setdefault(key, set()).add((tuple(sorted(expected)), me))
                return StepReport(members=met, rank=met.index(me))

            moshpit_steps(_WalkAverager(me), participants=participants, round_index=1, schedule=schedule,
                          tag="avg", run_step=run_step)
        return seen

    planned = walk(set())
    first_key = sorted(k for k in planned if ".s0." in k)[0]
    lost = {(first_key, min(m for m, _ in planned[first_key] for m in m))}  # its lowest member missed step 0
    assert walk(lost) == planned


def test_reference_key_label():
    assert group_label(3) == "3" and group_label((3, 0, 1)) == "3_0_1"
    averager = _WalkAverager(0)
    assert averager.group_key(round_index=2, step=1, bucket=(3, 0, 1)) == "run.avg.r2.s1.g3_0_1"
    assert averager.group_key(round_index=2, step=1, bucket=3) == "run.avg.r2.s1.g3"


# ==================== groups above --gs ====================


def test_max_group_size_when_gk_caps_the_buckets():
    assert max_group_size(125, 4, 3, 3) == 8  # 16 buckets for 125 peers
    assert max_group_size(100, 4, 2, 1) == 25 and max_group_size(100, 4, 2, 2) == 28  # later steps pile up more
    assert max_group_size(64, 4, 3, 3) == 4 and max_group_size(16, 2, 4, 4) == 2
    for n, gs, gk in [(125, 4, 3), (300, 3, 3), (50, 2, 4)]:  # the formula agrees with the simulated groups
        assert max_group_size(n, gs, gk, gk) == max(len(g) for step in simulate_schedule(n, gs, gk, gk)
                                                    for g in step.values())
    assert key_dim_for(125, 4) == 4 and key_dim_for(64, 4) == 3 and key_dim_for(1, 2) == 1


def test_group_size_warning_names_size_and_a_key_dim():
    assert group_size_warning(125, 4, 3, 3) == ("warning: --np 125 with --gs 4 --gk 3 makes groups of up to 8 peers "
                                                "(not 4); --gk 4 keeps them at 4-5")
    assert group_size_warning(100, 4, 2, 2) == ("warning: --np 100 with --gs 4 --gk 2 makes groups of up to 28 peers "
                                                "(not 4); --gk 4 keeps them at 4")
    assert group_size_warning(64, 4, 3, 3) is None  # a full grid
    assert group_size_warning(50, 4, 3, 3) is None  # fewer peers than keys: no cap
    assert group_size_warning(125, 4, 3, 3, grouping="reference") is None  # never above gs
    assert "\n" not in group_size_warning(1000, 2, 3, 3)


def test_launcher_notice_counts_the_rounds_aggregators():
    from config_setup import parse_config
    from mar_fl import group_size_notice

    cfg = parse_config(["--np", "125", "--gs", "4", "--gk", "3", "--wandb", "disabled"])
    assert group_size_notice(cfg).startswith("warning: --np 125 with --gs 4 --gk 3 makes groups of up to 8")
    half = parse_config(["--np", "200", "--ap", "50", "--gs", "4", "--gk", "3", "--wandb", "disabled"])
    assert group_size_notice(half).startswith("warning: --np 200 --ap 50 (100 aggregators) with --gs 4 --gk 3")
    assert group_size_notice(parse_config(["--np", "125", "--gs", "4", "--gk", "4", "--wandb", "disabled"])) is None
    ref = parse_config(["--np", "125", "--gs", "4", "--gk", "3", "--grouping", "reference", "--wandb", "disabled"])
    assert group_size_notice(ref) is None


def test_reference_grouping_with_real_peers_keeps_holes(tmp_path, data_dir, no_new_p2pd):
    """4 peers, half of them aggregate: under --grouping reference they meet in the groups of the global grid,
    so a peer whose grid-mate sits the round out averages alone (not a failure); only aggregators evaluate."""
    from peer_synchronization import aggregation_participants
    from test_e2e import launch, read_metrics

    run_dir = tmp_path / "reference"
    # a peer that sat a round out races ahead and waits for its group-mate, who may still be evaluating: on a
    # loaded machine that takes longer than the helper's 30 s
    proc = launch(run_dir, data_dir, "--grouping", "reference", "--ap", "50", "--up", "50", "--test-peers",
                  "aggregators", "--matchmaking-timeout", "180", rounds=3)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-2000:]
    rows = read_metrics(run_dir)
    assert [r["round"] for r in rows] == [1, 2, 3]
    records = [json.loads(line) for i in range(4) for line in open(run_dir / "peers" / f"peer_{i:04d}.jsonl")]
    for row in rows:
        participants = sorted(aggregation_participants(seed=3, round_index=row["round"], num_peers=4,
                                                       update_percent=50, aggregate_percent=50, dropout_percent=0))
        plan = ours_reference(4, 2, 2, participants, 2)
        expected = sum(len(g) ** 2 for step in plan for g in step.values()) / (len(participants) * 2)
        assert row["participating_peers"] == 2 and row["failed_steps"] == 0 and row["mar_steps"] == 4
        assert row["avg_group_size"] == expected < 2  # packed would pair the two: 2.0
        tested = [r for r in records if r["round"] == row["round"] and "test_count" in r]
        if row["round"] in (2, 3):  # --tf 2 and the last round: the two aggregators split the test set
            assert sorted(r["peer"] for r in tested) == participants
            assert sum(r["test_count"] for r in tested) == 10000 and row["test_accuracy"] is not None
        else:
            assert not tested and row["test_accuracy"] is None
    assert "Traceback" not in err
