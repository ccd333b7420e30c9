"""Differential privacy math (no network): clipping, noise scale, z_Δ, adaptive clipping, the accountant."""
import math

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


def test_noise_std_matches_the_formula_and_is_seeded():
    z, clip, m = 1.0, 0.1, 16
    z_delta = dp.delta_noise_multiplier(z, dp.indicator_noise_std(m))
    std = z_delta * clip / math.sqrt(m)
    zeros = [torch.zeros(1_000_000)]
    noisy = dp.add_gaussian_noise(zeros, std=std, generator=torch.Generator().manual_seed(1))[0]
    assert float(noisy.std()) == pytest.approx(std, rel=0.05)
    assert abs(float(noisy.mean())) < 0.01 * std
    again = dp.add_gaussian_noise(zeros, std=std, generator=torch.Generator().manual_seed(1))[0]
    assert torch.equal(noisy, again)


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
    assert params.sampling_rate == 1.0 and params.delta == pytest.approx(16 ** -1.1)
    central, groupmate = params.central_accountant(), params.groupmate_accountant()
    assert groupmate.noise_multiplier == pytest.approx(1.0 / 4)
    assert groupmate.epsilon(10) > central.epsilon(10)
    partial = dp.dp_params_from_config(parse_config(["--np", "16", "--dp", "--nm", "0.5", "--ap", "50", "--up", "50"]))
    assert partial.sampling_rate == 0.5 and partial.cohort == 8


class RecordingAverager:
    """Stands in for MAR: remembers what would leave the peer and 'averages' with nobody."""

    class options:
        index = 2

    def __init__(self):
        self.shared = None


class Recorder:
    def __init__(self):
        self.shared = None

    def aggregate(self, ctx):
        from moshpit_all_reduce import MarReport
        from peer_aggregation_logic import AggregationResult

        self.shared = [t.detach().clone() for t in [p.data for p in ctx.params] + list(ctx.extra)]
        return AggregationResult(report=MarReport())


def test_dp_wrapper_shares_only_the_privatised_model():
    import torch.nn as nn

    from moshpit_all_reduce import MarSchedule
    from peer_aggregation_logic import AggregationContext, DifferentialPrivacy

    class Task:
        @staticmethod
        def trainable(model):
            return list(model.parameters())

    torch.manual_seed(0)
    model = nn.Linear(20, 4)
    initial = [p.detach().clone() for p in model.parameters()]
    params = dp.dp_params_from_config(parse_config(["--np", "16", "--dp", "--nm", "1.0", "--ct", "0.1"]))
    inner = Recorder()
    wrapper = DifferentialPrivacy(inner, params, initial)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))  # a local update far above the clip threshold
    ctx = AggregationContext(averager=RecordingAverager(), task=Task, model=model, momentum=[], participants=range(16),
                             round_index=1, schedule=MarSchedule(4, 2, 2))
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
    assert abs(float(indicator)) < 1.0  # b = 0 plus noise of std σ_b/√m = 0.2
    assert wrapper.state.clip != 0.1 and wrapper.state.rounds_shared == 1
