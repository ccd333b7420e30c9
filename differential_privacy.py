"""Differential privacy for MAR-FL: DP-FedAvg with adaptive clipping (Andrew et al. 2021) without a server.

Pure math only (no network): clipping, noise scales, the clip-threshold update and the privacy accountant. The
aggregation step that applies them lives in ``peer_aggregation_logic.DifferentialPrivacy``.

Noise is *distributed*: each of the ``m`` aggregating peers adds Gaussian noise with std ``z_Δ·C/√m`` to its own
clipped update before it leaves the process, so the sum of the ``m`` updates that MAR computes carries noise
``z_Δ·C`` — the central DP-FedAvg mechanism — while no single peer ever sees another's raw update. The clipped
indicator ``b = [‖Δ‖ ≤ C]`` gets the same treatment (std ``σ_b/√m`` per peer → ``σ_b/m`` on the mean), so every
peer ends the round with the same noisy mean indicator and hence the same clip threshold.

Accounting (``PrivacyAccountant``) uses Google's ``dp-accounting`` RDP accountant. Two figures per round:

* ``epsilon`` — against anybody who sees only the averaged models (the central guarantee): Poisson-subsampled
  Gaussian with noise multiplier ``z`` (Andrew et al.: ``z_Δ`` on the updates and ``σ_b`` on the indicator with
  sensitivity ½ compose to exactly ``z``), sampling rate ``q`` = expected participating fraction, one release
  per round;
* ``epsilon_groupmate`` — against a curious group-mate who sees one peer's own shared update in the first MAR
  step, which carries only that peer's share of the noise: noise multiplier ``z/√m``, no subsampling (the
  group-mate knows the peer took part), composed over the rounds this peer shared.
"""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

logger = logging.getLogger("mar_fl.dp")

SERVER_LR = 0.1  # η_s: the reference's server step on the smoothed delta
DELTA_SMOOTHING = 0.9  # the reference's momentum on noisy deltas
CLIP_LR = 0.2  # η_c of the geometric clip update
TARGET_QUANTILE = 0.5  # γ: aim for the median update norm


class PrivacyConfigError(ValueError):
    """A DP configuration that cannot give the promised guarantee (reported as a one-line user error)."""


# ==================== noise scales (pure) ====================


def indicator_noise_std(expected_participants: int) -> float:
    """σ_b = m/20, the reference's (and Andrew et al.'s) choice for the clipped-count noise."""
    return expected_participants / 20.0


def delta_noise_multiplier(noise_multiplier: float, sigma_b: float) -> float:
    """z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2): the update noise that, with σ_b on the indicator, composes to ``z``."""
    if noise_multiplier <= 0:
        raise PrivacyConfigError(f"the noise multiplier must be positive, got {noise_multiplier:g}")
    if noise_multiplier >= 2 * sigma_b:
        raise PrivacyConfigError(
            f"noise multiplier {noise_multiplier:g} must be below 2·σ_b = {2 * sigma_b:g} (σ_b = participating "
            f"peers / 20); lower --nm or raise --np/--ap"
        )
    return (noise_multiplier ** -2 - (2 * sigma_b) ** -2) ** -0.5


def expected_participants(*, num_peers: int, aggregate_percent: float) -> int:
    """The cohort size σ_b is derived from (peers sampled per round, before simulated dropout)."""
    return max(1, int(num_peers * aggregate_percent / 100))


def sampling_rate(*, num_peers: int, aggregate_percent: float, dropout_percent: float) -> float:
    """q: the expected fraction of peers whose data enters one round's average."""
    cohort = expected_participants(num_peers=num_peers, aggregate_percent=aggregate_percent)
    return min(1.0, cohort * (1 - dropout_percent / 100) / num_peers)


# ==================== clipping and noise (pure) ====================


def global_norm(tensors: Sequence[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.cat([t.detach().reshape(-1).double() for t in tensors])))


def clip_by_global_norm(tensors: Sequence[torch.Tensor], clip: float) -> Tuple[List[torch.Tensor], float, float]:
    """Scale ``tensors`` to global L2 norm ≤ ``clip``; returns (clipped, norm before clipping, indicator)."""
    norm = global_norm(tensors)
    scale = min(1.0, clip / (norm + 1e-12))
    return [t * scale for t in tensors], norm, float(norm <= clip)


def add_gaussian_noise(tensors: Sequence[torch.Tensor], *, std: float, generator: torch.Generator) -> List[torch.Tensor]:
    """``t + N(0, std²)`` elementwise, drawn from ``generator`` (seeded per peer and round: reproducible)."""
    noisy = []
    for t in tensors:
        noise = torch.randn(t.shape, generator=generator, dtype=t.dtype, device=generator.device)
        noisy.append(t + noise.to(t.device) * std)
    return noisy


def update_clip_threshold(clip: float, mean_indicator: float, *, lr: float = CLIP_LR,
                          target: float = TARGET_QUANTILE) -> float:
    """C ← C·exp(−η_c(b̄ − γ)) with the noisy mean indicator clamped to [0, 1] (geometric quantile tracking).

    Most updates inside the threshold (b̄ > γ) shrink C, most outside grow it.
    """
    clamped = min(1.0, max(0.0, mean_indicator))
    return clip * math.exp(-lr * (clamped - target))


# ==================== accounting ====================


def _silence_absl() -> None:
    # dp-accounting logs through absl at WARNING for every RDP order it skips; that is expected, not news
    logging.getLogger("absl").setLevel(logging.ERROR)


@dataclass
class PrivacyAccountant:
    """ε after ``steps`` compositions of a (sub)sampled Gaussian mechanism, by RDP (``dp-accounting``).

    RDP composes linearly, so the per-step RDP curve is computed once and scaled by the step count: one
    accountant call per run instead of one per round (a call costs ~50 ms, times every peer, every round).
    """

    sampling_rate: float
    noise_multiplier: float
    delta: float
    _orders: Optional[Sequence[float]] = field(default=None, repr=False)
    _rdp_per_step: Optional[Sequence[float]] = field(default=None, repr=False)
    _cache: Dict[int, float] = field(default_factory=dict, repr=False)

    def _event(self):
        import dp_accounting

        gaussian = dp_accounting.GaussianDpEvent(self.noise_multiplier)
        if self.sampling_rate >= 1.0:
            return gaussian
        return dp_accounting.PoissonSampledDpEvent(self.sampling_rate, gaussian)

    def epsilon(self, steps: int) -> float:
        if steps <= 0:
            return 0.0
        if steps not in self._cache:
            from dp_accounting import rdp
            from dp_accounting.rdp import rdp_privacy_accountant as rdp_math

            if self._rdp_per_step is None:
                _silence_absl()
                accountant = rdp.RdpAccountant()
                accountant.compose(self._event(), 1)
                self._orders, self._rdp_per_step = list(accountant.orders), list(accountant.rdp)
            scaled = [steps * r for r in self._rdp_per_step]
            self._cache[steps] = float(rdp_math.compute_epsilon(self._orders, scaled, self.delta)[0])
        return self._cache[steps]


def default_delta(num_peers: int) -> float:
    """δ = N^−1.1: below 1/N, as a peer-level guarantee requires."""
    return float(num_peers) ** -1.1


@dataclass(frozen=True)
class DpParams:
    """Everything fixed for a run; derived once from the flags (see :func:`dp_params_from_config`)."""

    noise_multiplier: float  # z
    initial_clip: float  # C₀
    num_peers: int
    cohort: int  # expected participants per round (σ_b = cohort / 20)
    sampling_rate: float  # q
    delta: float
    seed: int

    @property
    def sigma_b(self) -> float:
        return indicator_noise_std(self.cohort)

    @property
    def z_delta(self) -> float:
        return delta_noise_multiplier(self.noise_multiplier, self.sigma_b)

    def central_accountant(self) -> PrivacyAccountant:
        return PrivacyAccountant(self.sampling_rate, self.noise_multiplier, self.delta)

    def groupmate_accountant(self) -> PrivacyAccountant:
        # a peer's own noise std is z_Δ·C/√m for the round's m ≤ cohort: assuming m = cohort errs on the safe side
        return PrivacyAccountant(1.0, self.noise_multiplier / math.sqrt(self.cohort), self.delta)


def dp_params_from_config(cfg) -> DpParams:
    """Validate and derive the run's DP constants; raises :class:`PrivacyConfigError` on an invalid setup."""
    cohort = expected_participants(num_peers=cfg.num_peers, aggregate_percent=cfg.aggregate_percent)
    params = DpParams(
        noise_multiplier=cfg.noise_multiplier,
        initial_clip=cfg.clip_threshold,
        num_peers=cfg.num_peers,
        cohort=cohort,
        sampling_rate=sampling_rate(num_peers=cfg.num_peers, aggregate_percent=cfg.aggregate_percent,
                                    dropout_percent=cfg.dropout_percent),
        delta=cfg.dp_delta if cfg.dp_delta is not None else default_delta(cfg.num_peers),
        seed=cfg.seed,
    )
    params.z_delta  # noqa: B018 - raises PrivacyConfigError when z ≥ 2σ_b
    return params
