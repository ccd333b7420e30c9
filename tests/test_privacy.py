"""Differential privacy (no network): clipping, noise sources and scales, z_Δ, adaptive clipping, the accountant,
and the DP aggregator with MAR faked: what leaves a peer, and what a group-mate can make of it (issue 13)."""
import math
import threading

import pytest
import torch

import differential_privacy as dp
from config_setup import ConfigError, parse_config


def test_clipping_bounds_the_global_norm_and_sets_the_indicator():
    torch.manual_seed(0)
    tensors = [torch.randn(30, 7) * 5, torch.randn(11) * 5]
    clipped, norm, indicator = dp.clip_by_global_norm(tensors, 1.0)
    assert norm > 1.0 and indicator == 0.0
    assert dp.global_norm(clipped) == pytest.approx(1.0, rel=1e-6)
    # direction is kept
    assert torch.allclose(clipped[0] / clipped[0].norm(), tensors[0] / tensors[0].norm(), atol=1e-6)
    small = [t * 1e-3 for t in tensors]
    unchanged, _, inside = dp.clip_by_global_norm(small, 1.0)
    assert inside == 1.0 and all(torch.equal(a, b) for a, b in zip(unchanged, small))


def test_noise_std_matches_the_formula_from_either_source():
    z, clip, m = 1.0, 0.1, 16
    z_delta = dp.delta_noise_multiplier(z, dp.indicator_noise_std(m))
    std = z_delta * clip / math.sqrt(m)
    zeros = [torch.zeros(1_000_000)]
    cpu = torch.device("cpu")
    for source in (dp.OsEntropyNoise(), dp.SeededNoise(seed=1, peer=0, round_index=1, device=cpu)):
        noisy = dp.add_gaussian_noise(zeros, std=std, noise=source)[0]
        assert float(noisy.std()) == pytest.approx(std, rel=0.05)
        assert abs(float(noisy.mean())) < 0.01 * std
        assert float((noisy.abs() > 2 * std).float().mean()) == pytest.approx(0.0455, abs=0.002)  # Gaussian tails
    seeded = [dp.add_gaussian_noise(zeros, std=std, noise=dp.SeededNoise(seed=1, peer=0, round_index=1, device=cpu))[0]
              for _ in range(2)]
    assert torch.equal(*seeded)  # --dp-insecure-seeded-noise: bit-reproducible
    fresh = [dp.add_gaussian_noise(zeros, std=std, noise=dp.OsEntropyNoise())[0] for _ in range(2)]
    assert not torch.equal(*fresh)


def test_z_delta_formula_and_invalid_configuration():
    sigma_b = dp.indicator_noise_std(16)
    assert sigma_b == 0.8
    assert dp.delta_noise_multiplier(1.0, sigma_b) == pytest.approx((1 - 1 / 1.6 ** 2) ** -0.5)
    # composing z_Δ on the update with σ_b (sensitivity ½) on the indicator gives back z
    z_delta = dp.delta_noise_multiplier(0.5, sigma_b)
    assert (z_delta ** -2 + (2 * sigma_b) ** -2) ** -0.5 == pytest.approx(0.5)
    with pytest.raises(dp.PrivacyConfigError, match="below"):
        dp.delta_noise_multiplier(1.6, sigma_b)


def test_cli_refuses_z_at_or_above_two_sigma_b():
    with pytest.raises(ConfigError, match="--nm"):
        parse_config(["--np", "4", "--dp", "--nm", "0.5"])  # σ_b = 0.2
    cfg = parse_config(["--np", "4", "--dp", "--nm", "0.3"])
    assert cfg.dp and cfg.noise_multiplier == 0.3
    with pytest.raises(ConfigError, match="--up"):
        parse_config(["--np", "16", "--dp", "--up", "50", "--ap", "100"])


def test_adaptive_clip_moves_the_threshold_the_right_way():
    assert dp.update_clip_threshold(1.0, 1.0) < 1.0  # everybody inside: shrink
    assert dp.update_clip_threshold(1.0, 0.0) > 1.0  # everybody clipped: grow
    assert dp.update_clip_threshold(1.0, 0.5) == 1.0
    assert dp.update_clip_threshold(1.0, 7.0) == pytest.approx(math.exp(-0.2 * 0.5))  # clamped to [0, 1]
    assert dp.update_clip_threshold(2.0, 0.0) == pytest.approx(2.0 * math.exp(0.1))


def test_epsilon_equals_the_library_and_grows_with_rounds():
    from dp_accounting import GaussianDpEvent, PoissonSampledDpEvent
    from dp_accounting.rdp import RdpAccountant

    accountant = dp.PrivacyAccountant(sampling_rate=0.25, noise_multiplier=1.0, delta=16 ** -1.1)
    for rounds in (1, 10, 100):
        library = RdpAccountant()
        library.compose(PoissonSampledDpEvent(0.25, GaussianDpEvent(1.0)), rounds)
        assert accountant.epsilon(rounds) == pytest.approx(library.get_epsilon(16 ** -1.1), rel=1e-9)
    values = [accountant.epsilon(t) for t in (1, 5, 20, 100)]
    assert values == sorted(values) and values[0] < values[-1]
    assert accountant.epsilon(0) == 0.0


def test_reference_formula_undercounts_for_small_q():
    # the example: q = 0.1, z = 0.5, 1000 rounds; the reference's hand formula said ~50
    eps = dp.PrivacyAccountant(sampling_rate=0.1, noise_multiplier=0.5, delta=1e-5).epsilon(1000)
    assert eps == pytest.approx(236.45, abs=0.5)


def test_groupmate_epsilon_exceeds_the_central_one():
    params = dp.dp_params_from_config(parse_config(["--np", "16", "--dp", "--nm", "1.0"]))
    assert params.delta == pytest.approx(16 ** -1.1)
    central, groupmate = params.central_accountant(), params.groupmate_accountant()
    assert central.sampling_rate == groupmate.sampling_rate == 1.0  # participation is public: no amplification
    assert central.noise_multiplier == pytest.approx(1.0)  # centred indicator: z_Δ and σ_b compose to z
    assert groupmate.noise_multiplier == pytest.approx(1.0 / (2 * 4))  # replace-one on one share: z/(2√m)
    assert groupmate.epsilon(10) > central.epsilon(10)
    partial = dp.dp_params_from_config(parse_config(["--np", "16", "--dp", "--nm", "0.5", "--ap", "50", "--up", "50"]))
    assert partial.cohort == 8 and partial.central_accountant().sampling_rate == 1.0


# ==================== the DP aggregator, with MAR faked ====================

CENTRAL_ARGS = ["--np", "16", "--dp", "--nm", "1.0", "--ct", "0.1"]


class RecordingAverager:
    """Stands in for MAR: remembers what would leave the peer and 'averages' with nobody."""

    def __init__(self, index: int = 2):
        self.options = type("Options", (), {"index": index})


class Recorder:
    def __init__(self):
        self.shared = None
        self.momentum = None

    def aggregate(self, ctx):
        from moshpit_all_reduce import MarReport
        from peer_aggregation_logic import AggregationResult

        self.shared = [t.detach().clone() for t in [p.data for p in ctx.params] + list(ctx.extra)]
        self.momentum = list(ctx.momentum)
        return AggregationResult(report=MarReport())


class Task:
    @staticmethod
    def trainable(model):
        return list(model.parameters())


def dp_peer(argv=CENTRAL_ARGS, *, inner=None, peer: int = 2, update_seed: int = 0, momentum=()):
    """(wrapper, context, initial params) of one peer whose local update lies far above the clip threshold."""
    import torch.nn as nn

    from moshpit_all_reduce import MarSchedule
    from peer_aggregation_logic import AggregationContext, DifferentialPrivacy

    torch.manual_seed(update_seed)
    model = nn.Linear(20, 4)
    initial = [p.detach().clone() for p in model.parameters()]
    wrapper = DifferentialPrivacy(inner or Recorder(), dp.dp_params_from_config(parse_config(argv)), initial)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    ctx = AggregationContext(averager=RecordingAverager(peer), task=Task, model=model, momentum=list(momentum),
                             participants=range(16), round_index=1, schedule=MarSchedule(4, 2, 2))
    return wrapper, ctx, initial


def test_dp_wrapper_shares_only_the_privatised_model():
    wrapper, ctx, initial = dp_peer()
    params, inner = wrapper.params, wrapper.inner
    result = wrapper.aggregate(ctx)
    n = len(initial)
    shared_model, smoothed, indicator = inner.shared[:n], inner.shared[n:2 * n], inner.shared[2 * n]
    for shared, start, s in zip(shared_model, initial, smoothed):
        assert torch.allclose(shared, start + dp.SERVER_LR * s, atol=1e-6)
    # the shared update is the clipped delta plus noise of std z_Δ·C/√m: its norm is near C, not near the update's
    noise_norm = params.z_delta * 0.1 / 4 * math.sqrt(sum(t.numel() for t in initial))
    assert dp.global_norm(smoothed) < 0.1 + 3 * noise_norm
    assert result.metrics["dp_update_norm"] > 1.0 and result.metrics["dp_clip_threshold"] == 0.1
    assert result.metrics["dp_epsilon"] > 0 and result.metrics["dp_epsilon_groupmate"] > result.metrics["dp_epsilon"]
    assert result.metrics["dp_noise"] == "os-entropy"
    assert abs(float(indicator) + 0.5) < 1.0  # centred: b − ½ = −½ plus noise of std σ_b/√m = 0.2
    assert wrapper.state.clip != 0.1 and wrapper.state.rounds_shared == 1


def test_reference_indicator_is_released_uncentred():
    wrapper, ctx, initial = dp_peer(CENTRAL_ARGS + ["--dp-reference-indicator", "--dp-insecure-seeded-noise"])
    centred, ctx_c, _ = dp_peer(CENTRAL_ARGS + ["--dp-insecure-seeded-noise"])
    wrapper.aggregate(ctx)
    centred.aggregate(ctx_c)
    n = len(initial)
    # same seeded noise, so the released indicators differ by exactly the centring
    assert float(wrapper.inner.shared[2 * n]) - float(centred.inner.shared[2 * n]) == pytest.approx(0.5)
    assert wrapper.state.clip == pytest.approx(centred.state.clip)  # both recover the same fraction


# (a) the noise is unpredictable


def test_same_seed_draws_different_noise_unless_insecure_flag():
    released = []
    for _ in range(2):  # two runs with the same -sd, the same peer, round and update
        wrapper, ctx, initial = dp_peer()
        wrapper.aggregate(ctx)
        released.append(wrapper.inner.shared)
    assert all(not torch.equal(a, b) for a, b in zip(*released))  # model, smoothed delta and indicator
    seeded = []
    for _ in range(2):
        wrapper, ctx, _ = dp_peer(CENTRAL_ARGS + ["--dp-insecure-seeded-noise"])
        result = wrapper.aggregate(ctx)
        seeded.append(wrapper.inner.shared)
    assert all(torch.equal(a, b) for a, b in zip(*seeded))
    assert result.metrics["dp_noise"] == "seeded (not private)"


def test_peers_draw_different_noise():
    updates = []
    for peer in (0, 1):
        wrapper, ctx, initial = dp_peer(peer=peer)
        wrapper.aggregate(ctx)
        updates.append(wrapper.inner.shared[len(initial)])
    assert not torch.equal(*updates)


# (b) a group-mate cannot strip the noise


def _old_recipe_noise(config: dict, *, peer: int, round_index: int, shapes, std: float):
    """What a group-mate regenerates from config.json with the pre-fix seeding: SeedSequence(seed, peer, round)."""
    import numpy as np

    state = np.random.SeedSequence([config["seed"], peer, round_index, 0xD9]).generate_state(1)[0]
    gen = torch.Generator().manual_seed(int(state))
    return [torch.randn(shape, generator=gen) * std for shape in shapes]


@pytest.mark.parametrize("insecure", [False, True], ids=["os-entropy", "insecure-seeded"])
def test_groupmate_with_the_config_cannot_recover_the_clipped_update(insecure):
    argv = CENTRAL_ARGS + ["-sd", "42"] + (["--dp-insecure-seeded-noise"] if insecure else [])
    config = parse_config(argv).to_json()  # everything in RUN_DIR/config.json
    wrapper, ctx, initial = dp_peer(argv, peer=5)
    clip, m = wrapper.state.clip, len(ctx.participants)
    true_delta = [p.detach() - g for p, g in zip(ctx.params, initial)]
    clipped, _, _ = dp.clip_by_global_norm(true_delta, clip)
    wrapper.aggregate(ctx)
    n = len(initial)
    first_step = wrapper.inner.shared  # the message the peer hands to the averager
    # round 1: last global (initial) and the smoothed state are common knowledge, so the model reveals `noisy`
    noisy = [(sent - g) / dp.SERVER_LR for sent, g in zip(first_step[:n], initial)]
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(noisy, first_step[n:2 * n]))
    std = wrapper.params.z_delta * clip / math.sqrt(m)
    guess = _old_recipe_noise(config, peer=5, round_index=1, shapes=[t.shape for t in noisy], std=std)
    recovered = [x - g for x, g in zip(noisy, guess)]
    residual = dp.global_norm([r - c for r, c in zip(recovered, clipped)])
    noise_norm = std * math.sqrt(sum(t.numel() for t in noisy))
    if insecure:
        assert residual < 1e-4 * clip  # the old recipe: the clipped update in clear
    else:
        # subtracting the guess adds noise instead of removing it: ≈ √2 × the noise, never ≈ 0
        assert residual == pytest.approx(math.sqrt(2) * noise_norm, rel=0.25)
        assert residual > clip  # larger than the whole clipped update


# (c) ε against an independent computation

RDP_ORDERS = [1 + x / 10 for x in range(1, 100)] + list(range(11, 64)) + [128, 256, 512, 1024]  # dp-accounting's


def independent_epsilon(*, stds_and_sensitivities, rounds: int, delta: float) -> float:
    """RDP of Gaussians written out: each release of std σ at L2 sensitivity s costs α·s²/(2σ²) at order α; T
    rounds add up; (ε, δ) by Canonne–Kamath–Steinke Prop. 12, the conversion dp-accounting uses."""
    per_alpha_unit = sum(s ** 2 / (2 * sd ** 2) for sd, s in stds_and_sensitivities)
    best = math.inf
    for a in RDP_ORDERS:
        rdp = rounds * a * per_alpha_unit
        best = min(best, rdp + math.log1p(-1 / a) - math.log(delta * a) / (a - 1))
    return best


def test_epsilon_equals_an_independent_computation_n16_z1_100_rounds():
    from dp_accounting import ComposedDpEvent, GaussianDpEvent
    from dp_accounting.rdp import RdpAccountant

    params = dp.dp_params_from_config(parse_config(CENTRAL_ARGS))
    m, clip, rounds, delta = 16, 0.1, 100, 16 ** -1.1
    z_delta, sigma_b = params.z_delta, params.sigma_b
    assert sigma_b == 0.8 and z_delta == pytest.approx((1 - 1 / 1.6 ** 2) ** -0.5)
    # central observer, zero-out adjacency, the sum of 16 releases: update (sens. C, std z_Δ·C), centred indicator
    # (sens. ½, std σ_b)
    central = independent_epsilon(stds_and_sensitivities=[(z_delta * clip, clip), (sigma_b, 0.5)],
                                  rounds=rounds, delta=delta)
    # group-mate, replace-one adjacency, one peer's message: update (sens. 2C, std z_Δ·C/√m), indicator (sens. 1,
    # std σ_b/√m)
    groupmate = independent_epsilon(
        stds_and_sensitivities=[(z_delta * clip / math.sqrt(m), 2 * clip), (sigma_b / math.sqrt(m), 1.0)],
        rounds=rounds, delta=delta)
    assert params.central_accountant().epsilon(rounds) == pytest.approx(central, rel=1e-9)
    assert params.groupmate_accountant().epsilon(rounds) == pytest.approx(groupmate, rel=1e-9)
    assert central == pytest.approx(72.5, abs=0.1) and groupmate == pytest.approx(3547, abs=1)
    # dp-accounting composing the two Gaussians itself agrees
    for (update_z, indicator_z), expected in (((z_delta, 2 * sigma_b), central),
                                              ((z_delta / 8, sigma_b / 4), groupmate)):
        library = RdpAccountant()
        library.compose(ComposedDpEvent([GaussianDpEvent(update_z), GaussianDpEvent(indicator_z)]), rounds)
        assert library.get_epsilon(delta) == pytest.approx(expected, rel=1e-9)
    # and so does the figure the aggregator prints after its 100th shared round
    wrapper, ctx, _ = dp_peer()
    wrapper.state.rounds_shared = rounds - 1
    metrics = wrapper.aggregate(ctx).metrics
    assert metrics["dp_epsilon"] == pytest.approx(central, rel=1e-9)
    assert metrics["dp_epsilon_groupmate"] == pytest.approx(groupmate, rel=1e-9)


def test_reference_indicator_is_charged_sensitivity_one():
    params = dp.dp_params_from_config(parse_config(CENTRAL_ARGS + ["--dp-reference-indicator"]))
    z_delta, sigma_b = params.z_delta, params.sigma_b
    assert params.central_multiplier == pytest.approx((z_delta ** -2 + sigma_b ** -2) ** -0.5)
    assert params.central_multiplier == pytest.approx(0.679, abs=1e-3)
    eps = independent_epsilon(stds_and_sensitivities=[(z_delta, 1.0), (sigma_b, 1.0)], rounds=100, delta=16 ** -1.1)
    assert params.central_accountant().epsilon(100) == pytest.approx(eps, rel=1e-9)
    assert eps == pytest.approx(143, abs=2)  # the figure, not the 72.5 the reference reported
    # replace-one flips b either way: the group-mate figure does not depend on the centring
    centred = dp.dp_params_from_config(parse_config(CENTRAL_ARGS))
    assert params.groupmate_multiplier == pytest.approx(centred.groupmate_multiplier)


# (d) momentum and KD never leave in clear


def test_momentum_never_crosses_the_wire_under_dp(monkeypatch):
    import peer_aggregation_logic as pal
    from moshpit_all_reduce import MarReport

    wire = []

    def fake_all_reduce(averager, tensors, **kwargs):
        wire.extend(t.detach().clone() for t in tensors)
        return MarReport()

    monkeypatch.setattr(pal, "moshpit_all_reduce", fake_all_reduce)
    momentum = [torch.randn(4, 20) * 3 + 1, torch.randn(4) * 3 + 1]
    kept = [t.clone() for t in momentum]
    wrapper, ctx, initial = dp_peer(inner=pal.MarAveraging(), momentum=momentum)
    wrapper.aggregate(ctx)
    assert len(wire) == 2 * len(initial) + 1  # privatised model, smoothed delta, indicator
    for sent in wire:
        assert not any(sent.shape == m.shape and torch.allclose(sent, m) for m in kept)
    assert all(torch.equal(a, b) for a, b in zip(momentum, kept))  # stays local, untouched
    # without --dp the same seam does see the momentum: the check above can fail
    wire.clear()
    pal.MarAveraging().aggregate(ctx)
    assert any(sent.shape == m.shape and torch.equal(sent, m) for sent in wire for m in kept)


def test_kd_with_dp_is_refused():
    with pytest.raises(ConfigError, match="--kd"):
        parse_config(["--np", "16", "--dp", "--kd"])


def test_dp_only_flags_need_dp():
    for flag in ("--dp-insecure-seeded-noise", "--dp-reference-indicator"):
        with pytest.raises(ConfigError, match=flag):
            parse_config(["--np", "16", flag])


# the clip threshold stays one threshold


class MeanOfPeers:
    """Stands in for MAR between threads: every peer ends with the same mean (summed in peer order)."""

    def __init__(self, peers: int):
        self.barrier, self.sent = threading.Barrier(peers), {}

    def aggregate(self, ctx):
        from moshpit_all_reduce import MarReport
        from peer_aggregation_logic import AggregationResult

        tensors = [p.data for p in ctx.params] + list(ctx.momentum) + list(ctx.extra)
        self.sent[ctx.peer] = [t.clone() for t in tensors]
        self.barrier.wait()
        for i, t in enumerate(tensors):
            t.copy_(sum(self.sent[p][i] for p in sorted(self.sent)) / len(self.sent))
        self.barrier.wait()
        return AggregationResult(report=MarReport())


def test_clip_threshold_is_the_same_on_every_peer_despite_private_noise():
    inner = MeanOfPeers(2)
    peers = [dp_peer(inner=inner, peer=i, update_seed=i) for i in (0, 1)]
    threads = [threading.Thread(target=w.aggregate, args=(ctx,)) for w, ctx, _ in peers]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    (a, ctx_a, _), (b, ctx_b, _) = peers
    assert a.state.clip == b.state.clip != 0.1
    assert all(torch.equal(x, y) for x, y in zip(ctx_a.params, ctx_b.params))
    sent = inner.sent
    assert not torch.equal(sent[0][-1], sent[1][-1])  # ... while each released its own noisy indicator


def test_metrics_pass_the_noise_label_through():
    from mar_fl import summarize_round

    base = {"round": 1, "round_seconds": 1.0, "train_seconds": 0.5, "aggregation_seconds": 0.5, "t_end": 2.0,
            "bytes_sent": 10, "bytes_received": 10, "group_size": 4, "dp_epsilon": 1.0, "dp_epsilon_groupmate": 2.0}
    rows = [dict(base, peer=i, dp_noise="seeded (not private)") for i in range(2)]
    assert summarize_round(rows, 0.0)["dp_noise"] == "seeded (not private)"
    assert "dp_noise" not in summarize_round([{k: v for k, v in r.items() if k != "dp_noise"} for r in rows], 0.0)
