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
from dataclasses import dataclass, replace
from fractions import Fraction
from typing import Any

from edge_sdk.crypto import ExtraSlot, PackingSpec, PaillierPublicKey
from edge_sdk.errors import ConfigError
from edge_sdk.extras import clip_slot, evaluation_slots
from edge_sdk.pipeline import encode_noise_spec, noise_digest
from edge_sdk.privacy import DPPolicy, NoiseSpec, calibrate, sigma2_on_grid
from edge_sdk.privacy.mechanisms import mechanism
from edge_sdk.protocol import GlobalModel, RoundAnnouncement

__all__ = [
    "AdaptiveClipPlan",
    "EvaluationPlan",
    "RoundPlan",
    "build_announcement",
    "choose_scale",
    "evaluation_extras",
    "plan_rounds",
]

DEFAULT_NOISE_SIGMAS = 6.0


@dataclass(frozen=True, slots=True, kw_only=True)
class EvaluationPlan:
    """Federated evaluation: devices evaluate the received model on a local held-out split.

    Every ``every``-th round (round ids divisible by it) carries the three
    evaluation slots (:mod:`edge_sdk.extras`); the aggregator reports the
    fleet's noised accuracy and loss for that round.

    Attributes:
        every: evaluate in rounds whose id is a multiple of this.
        max_examples: most held-out examples one device counts.
        max_loss: per-example loss clip.
        loss_scale: slot units per 1.0 of loss.
        noise_multiplier: standard deviation of each slot's released-sum
            noise divided by the slot's sensitivity (its bound); distributed
            mode spreads it over ``min_clients`` devices like the model noise.
    """

    every: int = 1
    max_examples: int = 16
    max_loss: float = 8.0
    loss_scale: float = 1.0
    noise_multiplier: float = 5.0

    def __post_init__(self) -> None:
        if self.every < 1 or self.max_examples < 1:
            raise ValueError(
                f"every and max_examples must be >= 1, got {self.every}, {self.max_examples}"
            )
        for name in ("max_loss", "loss_scale", "noise_multiplier"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"evaluation {name} must be finite and > 0, got {value}")

    def releases(self, rounds: int) -> int:
        """Evaluation rounds among rounds ``1..rounds``."""
        return rounds // self.every


@dataclass(frozen=True, slots=True, kw_only=True)
class AdaptiveClipPlan:
    """Adaptive clipping (Andrew et al., NeurIPS 2021): the clip follows a quantile.

    Each device sends whether its update norm was within the round's clip
    (the ``clip_below`` slot); from the noised fraction ``b_hat`` the next
    round's clip is ``C * exp(-lr * (b_hat - target_quantile))`` (the
    paper's geometric update), kept within ``[min_clip, max_clip]``, which
    devices and committee members check against the signed federation
    policy. The model noise is recalibrated for every clip so each round
    costs the same (the noise stays proportional to the sensitivity), and
    the bit's own release is composed into the calibration (the paper's
    ``z_delta = (z^-2 - (2 sigma_b)^-2)^-1/2``, computed by the accountant).

    Attributes:
        target_quantile: ``gamma``, the share of updates that should be unclipped.
        lr: ``eta``, the geometric step.
        initial_clip: the first round's clip.
        min_clip: the smallest clip (the policy's floor or above).
        max_clip: the largest clip (the policy's ``max_clip`` or below).
        bit_noise: ``sigma_b``: standard deviation, in bits, of the noise on
            the released count (spread over ``min_clients`` devices in
            distributed mode). The paper suggests ``expected clients / 20``.
    """

    target_quantile: float = 0.5
    lr: float = 0.2
    initial_clip: float = 0.1
    min_clip: float = 1e-3
    max_clip: float = 10.0
    bit_noise: float = 1.0

    def __post_init__(self) -> None:
        if not 0.0 < self.target_quantile < 1.0:
            raise ValueError(f"target_quantile must be in (0, 1), got {self.target_quantile}")
        for name in ("lr", "initial_clip", "min_clip", "max_clip", "bit_noise"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"adaptive clip {name} must be finite and > 0, got {value}")
        if not self.min_clip <= self.initial_clip <= self.max_clip:
            raise ValueError("need min_clip <= initial_clip <= max_clip")

    def next_clip(self, clip: float, unclipped_fraction: float) -> float:
        """The geometric update, kept within ``[min_clip, max_clip]``."""
        new = clip * math.exp(-self.lr * (unclipped_fraction - self.target_quantile))
        return min(max(new, self.min_clip), self.max_clip)


def _slot_sigma2(bound: int, multiplier: float, policy: DPPolicy) -> Fraction:
    """Per-device grid variance giving the released sum ``multiplier * bound`` noise."""
    share = 1 if policy.mode == "local" else policy.min_clients
    want = (multiplier * bound) ** 2 / share
    return max(sigma2_on_grid(want), mechanism(policy.mechanism).min_sigma2(policy.mode))


def evaluation_extras(
    evaluation: EvaluationPlan, policy: DPPolicy | None
) -> tuple[ExtraSlot, ExtraSlot, ExtraSlot]:
    """The evaluation slots of a plan (noised under ``policy``, none without one)."""
    plain = evaluation_slots(
        max_examples=evaluation.max_examples,
        max_loss=evaluation.max_loss,
        loss_scale=evaluation.loss_scale,
    )
    if policy is None:
        return plain
    s = tuple(_slot_sigma2(e.bound, evaluation.noise_multiplier, policy) for e in plain)
    return evaluation_slots(
        max_examples=evaluation.max_examples,
        max_loss=evaluation.max_loss,
        loss_scale=evaluation.loss_scale,
        sigma2=(s[0], s[1], s[2]),
    )


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
        evaluation: federated evaluation settings, or None.
        eval_packing: ``packing`` with the evaluation slots (evaluation rounds).
        adaptive: adaptive clipping settings, or None (a fixed clip).
        policy: the DP policy the plan was calibrated for (None: HE only).
        value_bits: slot value bits.
        noise_sigmas: noise headroom in standard deviations.
    """

    packing: PackingSpec
    noise: NoiseSpec | None
    clip: float
    dimension: int
    min_clients: int
    max_contributors: int
    public_key: PaillierPublicKey
    evaluation: EvaluationPlan | None = None
    eval_packing: PackingSpec | None = None
    adaptive: AdaptiveClipPlan | None = None
    policy: DPPolicy | None = None
    value_bits: int = 16
    noise_sigmas: float = DEFAULT_NOISE_SIGMAS

    def for_clip(self, clip: float) -> RoundPlan:
        """The same plan for another L2 clip (adaptive clipping): rescaled, recalibrated."""
        if clip == self.clip:
            return self
        return plan_rounds(
            self.public_key,
            dimension=self.dimension,
            max_contributors=self.max_contributors,
            min_clients=self.min_clients,
            clip=clip,
            value_bits=self.value_bits,
            policy=None if self.policy is None else replace(self.policy, clip=float(clip)),
            noise_sigmas=self.noise_sigmas,
            evaluation=self.evaluation,
            adaptive=self.adaptive,
        )

    def packing_for(self, round_id: int) -> PackingSpec:
        """The packing spec of round ``round_id`` (with evaluation slots in evaluation rounds)."""
        if (
            self.evaluation is not None
            and self.eval_packing is not None
            and round_id % self.evaluation.every == 0
        ):
            return self.eval_packing
        return self.packing

    def length(self, packing: PackingSpec) -> int:
        """Values one update carries under ``packing``: the model's and the extra slots."""
        return self.dimension + len(packing.extras)

    @property
    def max_ciphertexts(self) -> int:
        """Ciphertexts of the largest update any round of the plan asks for."""
        packings = [self.packing] + ([self.eval_packing] if self.eval_packing else [])
        return max(p.num_plaintexts(self.length(p)) for p in packings)

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
    evaluation: EvaluationPlan | None = None,
    adaptive: AdaptiveClipPlan | None = None,
) -> RoundPlan:
    """Choose the scale, derive the packing spec and calibrate the noise.

    With ``adaptive`` every round also carries the clipped-or-not bit, whose
    releases (one per round) are composed into the calibration too. The
    plan is for ``clip``; :meth:`RoundPlan.for_clip` re-plans for the next.

    With ``evaluation`` the model noise is calibrated so that the model
    releases of every round and the evaluation releases of every
    ``evaluation.every``-th round together meet the policy's epsilon.

    Args:
        public_key: the federation's Paillier key.
        dimension: model parameter count.
        max_contributors: most contributions one sum may hold (headroom).
        min_clients: the round quorum (>= the policy's ``min_clients``).
        clip: L2 clip of a device's delta (the policy's clip when given).
        value_bits: slot value bits (16 by default).
        policy: the DP policy, or None for HE-only rounds.
        noise_sigmas: noise headroom in standard deviations.
        evaluation: federated evaluation settings, or None.
        adaptive: adaptive clipping settings, or None.

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
    eval_slots = None if evaluation is None else evaluation_extras(evaluation, policy)
    extras: list[tuple[tuple[ExtraSlot, ...], int]] = []
    bit: tuple[ExtraSlot, ...] = ()
    if adaptive is not None:
        # the bit is sent as +-1 (2 units per bit): sum noise 2 sigma_b units
        bit = (clip_slot(None if policy is None else _slot_sigma2(2, adaptive.bit_noise, policy)),)
        if policy is not None:
            extras.append((bit, policy.rounds))
    if eval_slots is not None and evaluation is not None and policy is not None:
        extras.append((eval_slots, evaluation.releases(policy.rounds)))
        for e in eval_slots:
            sigma = math.sqrt(e.sigma2_num / e.sigma2_den)
            if e.bound + noise_sigmas * sigma > top:
                raise ConfigError(
                    f"evaluation slot {e.name} (bound {e.bound}, noise sigma {sigma:.3g}) does "
                    f"not fit {value_bits} value bits; lower max_examples or raise value_bits"
                )
    if policy is None:
        scale = choose_scale(clip=clip, value_bits=value_bits)
    else:
        nominal = choose_scale(clip=clip, value_bits=value_bits)
        probe = calibrate(policy, scale=nominal, dimension=dimension, extras=extras)
        ratio = probe.sigma / nominal
        scale = choose_scale(
            clip=clip,
            value_bits=value_bits,
            sigma_per_unit_scale=ratio,
            noise_sigmas=noise_sigmas,
        )
        for _ in range(60):
            noise = calibrate(policy, scale=scale, dimension=dimension, extras=extras)
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
        packing=packing.with_extras(bit),
        noise=noise,
        clip=float(clip),
        dimension=dimension,
        min_clients=min_clients,
        max_contributors=max_contributors,
        public_key=public_key,
        evaluation=evaluation,
        eval_packing=None if eval_slots is None else packing.with_extras((*eval_slots, *bit)),
        adaptive=adaptive,
        policy=policy,
        value_bits=value_bits,
        noise_sigmas=noise_sigmas,
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
    shards: int = 1,
) -> RoundAnnouncement:
    """The retained announcement of one round under ``plan`` (its packing for ``round_id``).

    ``shards`` > 1: the round's updates go to that many aggregator workers.

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
        shards=shards,
        packing=plan.packing_for(round_id).to_bytes(),
        packing_digest=plan.packing_for(round_id).digest(),
        privacy=plan.privacy_field,
        train=tuple(train_items),
    )
