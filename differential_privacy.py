"""Differential privacy for MAR-FL: DP-FedAvg with adaptive clipping (Andrew et al. 2021) without a server.

Pure math only (no network): clipping, noise sources and scales, the clip-threshold update and the privacy
accountant. The aggregation step that applies them lives in ``peer_aggregation_logic.DifferentialPrivacy``.

Noise is *distributed*: each of the ``m`` aggregating peers adds Gaussian noise with std ``z_Δ·C/√m`` to its own
clipped update before it leaves the process, so the sum of the ``m`` updates that MAR computes carries noise
``z_Δ·C`` — the central DP-FedAvg mechanism — while no single peer ever sees another's raw update. The clip
indicator is released centred, as in TF Privacy's ``QuantileEstimatorQuery``: ``(b − ½)`` with ``b = [‖Δ‖ ≤ C]``
plus noise of std ``σ_b/√m`` per peer; the averaged value plus ½ is the noisy fraction of unclipped updates, the
same on every peer (up to MAR's float rounding), hence one clip threshold. ``--dp-reference-indicator`` releases
the uncentred ``b`` as the reference did (sensitivity 1 instead of ½; the accountant charges for it).

Noise comes from the operating system's CSPRNG (:class:`OsEntropyNoise`), so it differs on every peer and run
and cannot be regenerated from the config. :class:`SeededNoise` (``--dp-insecure-seeded-noise``) derives it from
(seed, peer, round) for bit-reproducible runs and is **not private**: anyone with ``config.json`` can subtract it.

Accounting (``PrivacyAccountant``) uses Google's ``dp-accounting`` RDP accountant, a Gaussian mechanism composed
once per round the peer shared; q = 1 (participation is a public function of (seed, round), so there is no
amplification by sampling). Two figures:

* ``epsilon`` (central) — against anybody who sees only the averaged models, zero-out adjacency (one peer's
  contribution replaced by nothing: update sensitivity C, centred indicator ½): ``z_Δ`` on the update and ``σ_b``
  on the indicator compose to exactly ``z`` (uncentred: ``(z_Δ⁻² + σ_b⁻²)^−½``);
* ``epsilon_groupmate`` — against a curious group-mate who sees one peer's own message in the first MAR step,
  which carries only that peer's noise share, replace-one adjacency (the group-mate knows the peer took part:
  update sensitivity 2C, indicator 1): ``(z_Δ/(2√m))`` and ``σ_b/√m`` compose to ``z/(2√m)``.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch

logger = logging.getLogger("mar_fl.dp")

SERVER_LR = 0.1  # η_s: the reference's server step on the smoothed delta
DELTA_SMOOTHING = 0.9  # the reference's momentum on noisy deltas
CLIP_LR = 0.2  # η_c of the geometric clip update
TARGET_QUANTILE = 0.5  # γ: aim for the median update norm
INDICATOR_CENTRE = 0.5  # released indicator: b − ½ (TF Privacy's QuantileEstimatorQuery)
OS_ENTROPY = "os-entropy"  # the ``dp_noise`` label of private runs
SEEDED = "seeded (not private)"  # … and of --dp-insecure-seeded-noise runs


class PrivacyConfigError(ValueError):
    """A DP configuration that cannot give the promised guarantee (reported as a one-line user error)."""


# ==================== noise sources ====================


class NoiseSource(Protocol):
    label: str

    def normal(self, shape: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor: ...


class OsEntropyNoise:
    """Standard normal draws from ``os.urandom`` (the OS CSPRNG) by Box–Muller in float64.

    Not a seeded PRNG: nothing in the config, and no run of outputs a group-mate might isolate (e.g. on
    coordinates whose update is exactly zero), predicts the next draw.
    """

    label = OS_ENTROPY

    def normal(self, shape: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        count = math.prod(shape)
        pairs = (count + 1) // 2
        bits = torch.frombuffer(bytearray(os.urandom(16 * pairs)), dtype=torch.int64)
        uniform = ((bits & (2 ** 53 - 1)).double() + 0.5) * 2.0 ** -53  # 53 random bits each, in (0, 1)
        radius, angle = torch.sqrt(-2.0 * torch.log(uniform[:pairs])), 2 * math.pi * uniform[pairs:]
        normal = torch.cat([radius * torch.cos(angle), radius * torch.sin(angle)])[:count]
        return normal.reshape(tuple(shape)).to(device=device, dtype=dtype)


class SeededNoise:
    """``--dp-insecure-seeded-noise``: a torch generator seeded by (seed, peer, round). Bit-reproducible and NOT
    private — the seed is in every peer's config, so any group-mate regenerates the noise."""

    label = SEEDED

    def __init__(self, *, seed: int, peer: int, round_index: int, device: torch.device):
        state = np.random.SeedSequence([seed, peer, round_index, 0xD9]).generate_state(1)[0]
        self.generator = torch.Generator(device=device).manual_seed(int(state))

    def normal(self, shape: Sequence[int], *, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        return torch.randn(tuple(shape), generator=self.generator, dtype=dtype,
                           device=self.generator.device).to(device)


# ==================== noise scales (pure) ====================


def indicator_noise_std(expected_participants: int) -> float:
    """σ_b = m/20, the reference's (and Andrew et al.'s) choice for the clipped-count noise."""
    return expected_participants / 20.0


def delta_noise_multiplier(noise_multiplier: float, sigma_b: float) -> float:
    """z_Δ = (z⁻² − (2σ_b)⁻²)^(−1/2): the update noise that, with σ_b on the centred indicator, composes to ``z``."""
    if noise_multiplier <= 0:
        raise PrivacyConfigError(f"the noise multiplier must be positive, got {noise_multiplier:g}")
    if noise_multiplier >= 2 * sigma_b:
        raise PrivacyConfigError(
            f"noise multiplier {noise_multiplier:g} must be below 2·σ_b = {2 * sigma_b:g} (σ_b = participating "
            f"peers / 20); lower --nm or raise --np/--ap"
        )
    return (noise_multiplier ** -2 - (2 * sigma_b) ** -2) ** -0.5


def composed_multiplier(*multipliers: float) -> float:
    """The one Gaussian noise multiplier equivalent to releasing several Gaussians together: (Σ zᵢ⁻²)^(−1/2)."""
    return sum(z ** -2 for z in multipliers) ** -0.5


def expected_participants(*, num_peers: int, aggregate_percent: float) -> int:
    """The cohort size σ_b is derived from (peers sampled per round, before simulated dropout)."""
    return max(1, int(num_peers * aggregate_percent / 100))


# ==================== clipping and noise (pure) ====================


def global_norm(tensors: Sequence[torch.Tensor]) -> float:
    return float(torch.linalg.vector_norm(torch.cat([t.detach().reshape(-1).double() for t in tensors])))


def clip_by_global_norm(tensors: Sequence[torch.Tensor], clip: float) -> Tuple[List[torch.Tensor], float, float]:
    """Scale ``tensors`` to global L2 norm ≤ ``clip``; returns (clipped, norm before clipping, indicator)."""
    norm = global_norm(tensors)
    scale = min(1.0, clip / (norm + 1e-12))
    return [t * scale for t in tensors], norm, float(norm <= clip)


def add_gaussian_noise(tensors: Sequence[torch.Tensor], *, std: float, noise: NoiseSource) -> List[torch.Tensor]:
    """``t + N(0, std²)`` elementwise, drawn from ``noise``."""
    return [t + noise.normal(t.shape, dtype=t.dtype, device=t.device) * std for t in tensors]


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
    """ε after ``steps`` compositions of a Gaussian mechanism (Poisson-subsampled if ``sampling_rate`` < 1), by
    RDP (``dp-accounting``, default orders). MAR-FL's runs always use q = 1: participation is public.

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
    delta: float
    seed: int
    seeded_noise: bool = False  # --dp-insecure-seeded-noise
    reference_indicator: bool = False  # --dp-reference-indicator: release b, not b − ½

    @property
    def sigma_b(self) -> float:
        return indicator_noise_std(self.cohort)

    @property
    def z_delta(self) -> float:
        return delta_noise_multiplier(self.noise_multiplier, self.sigma_b)

    @property
    def indicator_offset(self) -> float:
        """What a peer subtracts from b before noising (and adds back to the average)."""
        return 0.0 if self.reference_indicator else INDICATOR_CENTRE

    @property
    def noise_label(self) -> str:
        return SEEDED if self.seeded_noise else OS_ENTROPY

    def noise_source(self, *, peer: int, round_index: int, device: torch.device) -> NoiseSource:
        if self.seeded_noise:
            return SeededNoise(seed=self.seed, peer=peer, round_index=round_index, device=device)
        return OsEntropyNoise()

    @property
    def central_multiplier(self) -> float:
        """Zero-out adjacency on the sum of the m released values: update sensitivity C under noise z_Δ·C,
        indicator sensitivity ½ (centred) or 1 (reference) under noise σ_b."""
        indicator_sensitivity = 1.0 if self.reference_indicator else 0.5
        return composed_multiplier(self.z_delta, self.sigma_b / indicator_sensitivity)

    @property
    def groupmate_multiplier(self) -> float:
        """Replace-one adjacency on one peer's own message: update sensitivity 2C under its noise share z_Δ·C/√m,
        indicator sensitivity 1 under σ_b/√m (centring does not help here). Taking m = cohort ≥ this round's m
        errs on the safe side (fewer participants means a larger share each)."""
        share = math.sqrt(self.cohort)
        return composed_multiplier(self.z_delta / (2 * share), self.sigma_b / share)

    def central_accountant(self) -> PrivacyAccountant:
        return PrivacyAccountant(sampling_rate=1.0, noise_multiplier=self.central_multiplier, delta=self.delta)

    def groupmate_accountant(self) -> PrivacyAccountant:
        return PrivacyAccountant(sampling_rate=1.0, noise_multiplier=self.groupmate_multiplier, delta=self.delta)


def dp_params_from_config(cfg) -> DpParams:
    """Validate and derive the run's DP constants; raises :class:`PrivacyConfigError` on an invalid setup."""
    params = DpParams(
        noise_multiplier=cfg.noise_multiplier,
        initial_clip=cfg.clip_threshold,
        num_peers=cfg.num_peers,
        cohort=expected_participants(num_peers=cfg.num_peers, aggregate_percent=cfg.aggregate_percent),
        delta=cfg.dp_delta if cfg.dp_delta is not None else default_delta(cfg.num_peers),
        seed=cfg.seed,
        seeded_noise=cfg.dp_insecure_seeded_noise,
        reference_indicator=cfg.dp_reference_indicator,
    )
    params.z_delta  # noqa: B018 - raises PrivacyConfigError when z ≥ 2σ_b
    return params
