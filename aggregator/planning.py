"""Round planning: quantization scale, packing spec, noise spec, announcement.

The one hard constraint is the slot range: a device clamps its noised integer
vector to ``[-2^(b-1), 2^(b-1) - 1]`` (``b = value_bits``), and clamping after
noise biases the sum. :func:`choose_scale` therefore leaves room for a
coordinate of the full clip ``C`` (the worst case of an L2-clipped delta)
plus ``noise_sigmas`` standard deviations of the device's noise:

    scale * C + k * sigma_int <= 2^(b-1) - 1

``sigma_int`` (in quantization units) itself depends on the scale, but
``sigma_int / scale`` hardly does (the sensitivity grows with the scale at
the same rate), so the noise is calibrated once at a nominal scale, the
ratio solved for, and the result re-checked after a final calibration; the
scale shrinks by a few percent until the inequality holds exactly.

Without a :class:`~edge_sdk.privacy.DPPolicy` (HE-only rounds) the scale is
``(2^(b-1) - 1) / C`` and the announcement's ``privacy`` field is empty.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from edge_sdk.crypto import PackingSpec, PaillierPublicKey
from edge_sdk.errors import ConfigError
from edge_sdk.pipeline import encode_noise_spec, noise_digest
from edge_sdk.privacy import DPPolicy, NoiseSpec, calibrate
from edge_sdk.protocol import GlobalModel, RoundAnnouncement

__all__ = ["RoundPlan", "build_announcement", "choose_scale", "plan_rounds"]

DEFAULT_NOISE_SIGMAS = 6.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundPlan:
    """Everything a round announcement carries that does not change per round.

    Attributes:
        packing: the packing spec (fixes the headroom for ``max_contributors``).
        noise: the calibrated noise spec, or None for HE-only rounds.
        clip: the L2 clip devices apply (also inside ``noise`` when present).
        dimension: the model's parameter count.
        min_clients: the quorum.
        max_contributors: the packing headroom bound.
        public_key: the federation's Paillier public key.
    """

    packing: PackingSpec
    noise: NoiseSpec | None
    clip: float
    dimension: int
    min_clients: int
    max_contributors: int
    public_key: PaillierPublicKey

    @property
    def privacy_field(self) -> bytes:
        """The announcement's ``privacy`` bytes (empty without DP)."""
        return encode_noise_spec(self.noise)

    @property
    def privacy_digest(self) -> bytes:
        """What an update's ``privacy_digest`` must be."""
        return noise_digest(self.privacy_field)

    @property
    def num_ciphertexts(self) -> int:
        """Ciphertexts per update."""
        return self.packing.num_plaintexts(self.dimension)


def choose_scale(
    *,
    clip: float,
    value_bits: int = 16,
    sigma_per_unit_scale: float = 0.0,
    noise_sigmas: float = DEFAULT_NOISE_SIGMAS,
) -> float:
    """Largest scale with ``scale * (clip + noise_sigmas * sigma_per_unit_scale) <= max``.

    Args:
        clip: L2 clip ``C``.
        value_bits: slot value bits ``b``.
        sigma_per_unit_scale: noise standard deviation divided by the scale.
        noise_sigmas: how many standard deviations of headroom.

    Returns:
        The scale (quantization units per 1.0).
    """
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError(f"clip must be finite and > 0, got {clip}")
    top = float((1 << (value_bits - 1)) - 1)
    return top / (clip + noise_sigmas * sigma_per_unit_scale)


def plan_rounds(
    public_key: PaillierPublicKey,
    *,
    dimension: int,
    max_contributors: int,
    min_clients: int,
    clip: float,
    value_bits: int = 16,
    policy: DPPolicy | None = None,
    noise_sigmas: float = DEFAULT_NOISE_SIGMAS,
) -> RoundPlan:
    """Choose the scale, derive the packing spec and calibrate the noise.

    Args:
        public_key: the federation's Paillier key.
        dimension: model parameter count.
        max_contributors: most contributions one sum may hold (headroom).
        min_clients: the round quorum (>= the policy's ``min_clients``).
        clip: L2 clip of a device's delta (the policy's clip when given).
        value_bits: slot value bits (16 by default).
        policy: the DP policy, or None for HE-only rounds.
        noise_sigmas: noise headroom in standard deviations.

    Returns:
        The plan.

    Raises:
        ConfigError: inconsistent quorum, clip or policy; or no scale fits.
    """
    if not 1 <= min_clients <= max_contributors:
        raise ConfigError(
            f"need 1 <= min_clients ({min_clients}) <= max_contributors ({max_contributors})"
        )
    if policy is not None:
        if policy.min_clients > min_clients:
            raise ConfigError(
                f"the DP policy assumes {policy.min_clients} clients per sum but the quorum "
                f"is only {min_clients}"
            )
        clip = policy.clip
    top = (1 << (value_bits - 1)) - 1
    noise: NoiseSpec | None = None
    if policy is None:
        scale = choose_scale(clip=clip, value_bits=value_bits)
    else:
        nominal = choose_scale(clip=clip, value_bits=value_bits)
        probe = calibrate(policy, scale=nominal, dimension=dimension)
        ratio = probe.sigma / nominal
        scale = choose_scale(
            clip=clip,
            value_bits=value_bits,
            sigma_per_unit_scale=ratio,
            noise_sigmas=noise_sigmas,
        )
        for _ in range(60):
            noise = calibrate(policy, scale=scale, dimension=dimension)
            if scale * clip + noise_sigmas * noise.sigma <= top:
                break
            scale *= 0.97
        else:
            raise ConfigError(
                f"no quantization scale fits clip {clip} and {noise_sigmas} noise standard "
                f"deviations in {value_bits} value bits; raise value_bits or epsilon"
            )
    packing = PackingSpec.derive(public_key, max_contributors, value_bits, scale)
    return RoundPlan(
        packing=packing,
        noise=noise,
        clip=float(clip),
        dimension=dimension,
        min_clients=min_clients,
        max_contributors=max_contributors,
        public_key=public_key,
    )


def build_announcement(
    plan: RoundPlan,
    *,
    federation: str,
    round_id: int,
    model: GlobalModel,
    issued_ms: int,
    deadline_ms: int,
    cohort: Sequence[str] = (),
    train: Sequence[tuple[str, Any]] = (),
) -> RoundAnnouncement:
    """The retained announcement of one round under ``plan``.

    Without a noise spec the clip travels in ``train`` as ``("clip", C)`` so
    HE-only devices still clip (the pipeline's ``clip=`` argument).
    """
    train_items = list(train)
    if plan.noise is None and not any(k == "clip" for k, _ in train_items):
        train_items.append(("clip", plan.clip))
    return RoundAnnouncement(
        federation=federation,
        round_id=round_id,
        model_version=model.version,
        model_digest=model.digest,
        issued_ms=issued_ms,
        deadline_ms=deadline_ms,
        cohort=tuple(cohort),
        min_clients=plan.min_clients,
        max_contributors=plan.max_contributors,
        key_fingerprint=bytes.fromhex(plan.public_key.fingerprint),
        packing=plan.packing.to_bytes(),
        packing_digest=plan.packing.digest(),
        privacy=plan.privacy_field,
        train=tuple(train_items),
    )
