"""The device's one-call recipe: model delta -> private, encrypted, signed update.

    delta -> L2 clip (C) -> x scale -> stochastic rounding, repeated until the
    rounded vector is within the norm bound (conditional randomized rounding)
    -> + exact discrete Gaussian noise -> clamp to the slot range -> pack
    -> Paillier encrypt (obfuscator pool) -> sign

:class:`RoundContext` decodes and checks what a round announcement asks for
(packing spec and digest, key fingerprint, noise spec) against the device's
own Paillier public key; :func:`privatize` and :func:`seal` are the two
halves of the pipeline, and :func:`build_update` runs both. The privacy
ledger charge sits between them in the device agent: the spend is recorded
durably before the sealed update can leave the device.

Safe defaults: randomness comes from the OS CSPRNG; a deterministic source
is accepted only with ``allow_insecure_rng=True`` (tests).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import msgpack
import numpy as np
import numpy.typing as npt

from edge_sdk.crypto import (
    BindingProof,
    CiphertextVector,
    DJNBase,
    DJNObfuscatorSource,
    InvalidBindingError,
    ObfuscatorPool,
    PackingSpec,
    PaillierPublicKey,
    clamp,
    encrypt,
    encrypt_bound,
    pack,
    quantize,
    verify_bound,
)
from edge_sdk.crypto.packing import ExtraSlot
from edge_sdk.errors import DecodeError, LocalProtocolError, RemoteProtocolError
from edge_sdk.extras import CLIP_BELOW, EVAL_SLOTS, check_slots
from edge_sdk.identity import DeviceIdentity
from edge_sdk.policy import FederationPolicy
from edge_sdk.privacy import (
    NoiseSpec,
    PrivacyCost,
    add_noise,
    clip_l2,
    round_cost,
    within_norm_bound,
)
from edge_sdk.privacy._sampler import discrete_gaussian
from edge_sdk.protocol import EncryptedUpdate, RoundAnnouncement, digest
from edge_sdk.randomness import RandomSource, default_random, uniform_uint64

__all__ = [
    "NO_NOISE_DIGEST",
    "PrivatizedUpdate",
    "RoundContext",
    "build_update",
    "encode_noise_spec",
    "noise_digest",
    "privatize",
    "seal",
    "verify_update_binding",
]

NO_NOISE_DIGEST = digest(b"edgefl/v1/no-noise")
MAX_ROUNDING_TRIES = 64


def encode_noise_spec(noise: NoiseSpec | None) -> bytes:
    """The announcement's ``privacy`` field: msgpack of the spec, empty for none."""
    if noise is None:
        return b""
    data: bytes = msgpack.packb(noise.to_dict(), use_bin_type=True)
    return data


def noise_digest(privacy_field: bytes) -> bytes:
    """Digest an update carries for the noise spec it applied."""
    return digest(b"edgefl/v1/noise\x00" + privacy_field) if privacy_field else NO_NOISE_DIGEST


@dataclass(frozen=True, slots=True, kw_only=True)
class RoundContext:
    """What a device needs from an announcement, checked against its own key.

    Attributes:
        announcement: the round announcement.
        packing: the decoded packing spec.
        noise: the decoded noise spec, or None when the round asks for no DP.
        public_key: the federation's Paillier public key held by the device.
    """

    announcement: RoundAnnouncement
    packing: PackingSpec
    noise: NoiseSpec | None
    public_key: PaillierPublicKey
    policy: FederationPolicy | None = None

    @property
    def binding(self) -> DJNBase | None:
        """The committee's DJN base when updates must carry a binding proof."""
        return None if self.policy is None else self.policy.djn_base

    @classmethod
    def from_announcement(
        cls,
        announcement: RoundAnnouncement,
        public_key: PaillierPublicKey,
        *,
        policy: FederationPolicy | None = None,
    ) -> RoundContext:
        """Decode and cross-check an announcement (against the pinned policy, if any).

        Raises:
            RemoteProtocolError: the announcement names another key, its
                packing spec does not match its digest or the key, its
                noise spec is malformed, or it is outside ``policy``
                (``reason="outside_policy"``).
        """
        fingerprint = bytes.fromhex(public_key.fingerprint)
        if announcement.key_fingerprint != fingerprint:
            raise RemoteProtocolError(
                "round names another Paillier key than the device holds", reason="wrong_key"
            )
        try:
            spec = PackingSpec.from_bytes(announcement.packing)
        except Exception as exc:
            raise RemoteProtocolError(f"bad packing spec: {exc}", reason="bad_spec") from None
        if spec.digest() != announcement.packing_digest:
            raise RemoteProtocolError("packing spec does not match its digest", reason="bad_spec")
        if spec.key_fingerprint != public_key.fingerprint or spec.key_bits != public_key.bits:
            raise RemoteProtocolError("packing spec is for another key", reason="bad_spec")
        if spec.max_contributors < announcement.max_contributors:
            raise RemoteProtocolError(
                "packing headroom is smaller than max_contributors", reason="bad_spec"
            )
        noise: NoiseSpec | None = None
        if announcement.privacy:
            try:
                raw = msgpack.unpackb(announcement.privacy, raw=False, strict_map_key=True)
                noise = NoiseSpec.from_dict(raw)
            except Exception as exc:
                raise RemoteProtocolError(f"bad noise spec: {exc}", reason="bad_spec") from None
            if abs(noise.scale - spec.scale) > 1e-12 * spec.scale:
                raise RemoteProtocolError(
                    f"noise spec scale {noise.scale} differs from packing scale {spec.scale}",
                    reason="bad_spec",
                )
            if noise.min_clients > announcement.min_clients:
                raise RemoteProtocolError(
                    "noise calibrated for more clients than the round's quorum",
                    reason="bad_spec",
                )

        try:
            # A DP round releases nothing un-noised; unknown slots are refused.
            check_slots(spec.extras, noise, value_max=spec.value_max)
        except ValueError as exc:
            raise RemoteProtocolError(f"bad extra slots: {exc}", reason="bad_spec") from None
        if policy is not None:
            if policy.key_fingerprint != public_key.fingerprint:
                raise RemoteProtocolError(
                    "the pinned federation policy is for another key", reason="outside_policy"
                )
            if announcement.federation != policy.federation:
                raise RemoteProtocolError(
                    "round of another federation than the pinned policy's",
                    reason="outside_policy",
                )
            policy.check_noise(noise, value_bits=spec.value_bits, extras=spec.extras)
        return cls(
            announcement=announcement,
            packing=spec,
            noise=noise,
            public_key=public_key,
            policy=policy,
        )

    @property
    def round_key(self) -> str:
        """Ledger key of this round: ``federation/round``."""
        return f"{self.announcement.federation}/{self.announcement.round_id}"

    @property
    def privacy_digest(self) -> bytes:
        """Digest of the noise spec applied (bound into the signed update)."""
        return noise_digest(self.announcement.privacy)

    @property
    def clip(self) -> float | None:
        """The L2 clip from the noise spec (None without DP)."""
        return None if self.noise is None else self.noise.clip

    @property
    def extras(self) -> tuple[ExtraSlot, ...]:
        """The extra slots the round asks for (packed after the model parameters)."""
        return self.packing.extras

    @property
    def evaluate(self) -> bool:
        """Whether the round asks for federated evaluation of the received model."""
        return self.packing.extra_index(EVAL_SLOTS[0]) is not None

    @property
    def cost(self) -> PrivacyCost | None:
        """What taking part costs (model slots and every extra slot), None without DP.

        The one figure both the agent and the simulator check against the
        ledger and charge before an update leaves the device.
        """
        return None if self.noise is None else round_cost(self.noise, self.packing.extras)


@dataclass(frozen=True, slots=True, kw_only=True)
class PrivatizedUpdate:
    """The noised integer update and what happened on the way.

    Attributes:
        values: clamped integer vector, ready to pack.
        original_norm: L2 norm of the delta before clipping.
        clipped: whether clipping changed the delta.
        rounding_tries: conditional rounding attempts used.
        clamped: coordinates changed by the final clamp to the slot range.
        extras: the bounded extra-slot values before noise (slot units), by name.
    """

    values: npt.NDArray[np.int64]
    original_norm: float
    clipped: bool
    rounding_tries: int
    clamped: int
    extras: Mapping[str, int] = field(default_factory=dict)


def privatize(
    delta: npt.NDArray[np.floating[Any]],
    ctx: RoundContext,
    *,
    clip: float | None = None,
    extras: Mapping[str, float] | None = None,
    rng: RandomSource | None = None,
    allow_insecure_rng: bool = False,
) -> PrivatizedUpdate:
    """Clip, quantize, noise and clamp a model delta (and the round's extra slots).

    Args:
        delta: the float model delta (length = model size).
        ctx: the round context.
        clip: L2 clip when the round carries no noise spec (HE-only rounds);
            ignored otherwise (the spec's clip rules).
        extras: the device's raw value of every extra slot the round declares
            (e.g. :func:`edge_sdk.extras.evaluation_values`); ``clip_below``
            is computed here from the delta's norm and never taken from the
            caller. Each value is stochastically rounded to slot units and
            bounded to ``[0, bound]`` before its noise is added.
        rng: randomness for rounding and noise; the OS CSPRNG by default.
        allow_insecure_rng: accept a non-secure source (tests only).

    Returns:
        The private integer update.

    Raises:
        ValueError: wrong length, NaN/inf, or an insecure rng without opt-in.
        LocalProtocolError: rounding never met the norm bound (vanishingly
            unlikely; the round should be skipped).
    """
    source = rng or default_random()
    if not source.secure and not allow_insecure_rng:
        raise ValueError(
            f"refusing insecure randomness {source!r} for a private update; "
            "allow_insecure_rng=True is for tests"
        )
    vec = np.asarray(delta, dtype=np.float64).reshape(-1)
    noise = ctx.noise
    if noise is not None and vec.size != noise.dimension:
        raise ValueError(f"delta has {vec.size} values, the round expects {noise.dimension}")
    bound = noise.clip if noise is not None else clip
    if bound is not None:
        clipped_vec, norm = clip_l2(vec, bound)
    else:
        if not np.all(np.isfinite(vec)):
            raise ValueError("delta contains NaN or infinity")
        clipped_vec, norm = vec, float(np.linalg.norm(vec))
    tries = 0
    while True:
        tries += 1
        ints = quantize(clipped_vec, ctx.packing, source)
        if noise is None or within_norm_bound(ints, noise):
            break
        if tries >= MAX_ROUNDING_TRIES:
            raise LocalProtocolError(
                f"conditional rounding failed {tries} times; skip this round",
                reason="rounding_failed",
            )
    if noise is not None:
        ints = add_noise(ints, noise, source, allow_insecure_rng=allow_insecure_rng)
    bounded: dict[str, int] = {}
    if ctx.packing.extras:
        given = dict(extras or {})
        given.pop(CLIP_BELOW, None)  # never the caller's word
        if bound is not None and ctx.packing.extra_index(CLIP_BELOW) is not None:
            # +1 when the norm was within the clip, -1 when clipped (the
            # paper's b - 1/2 at scale 2: sensitivity 1 unit = 1/2 bit)
            given[CLIP_BELOW] = 1.0 if norm <= bound else -1.0
        extra_ints = _extra_values(ctx.packing.extras, given, source)
        bounded = {e.name: int(v) for e, v in zip(ctx.packing.extras, extra_ints, strict=True)}
        extra_ints = extra_ints + _extra_noise(ctx.packing.extras, source)
        ints = np.concatenate([ints, extra_ints])
    elif extras:
        raise ValueError(f"the round declares no extra slots, got values for {sorted(extras)}")
    values, clamped = clamp(ints, ctx.packing)
    return PrivatizedUpdate(
        values=values,
        original_norm=float(norm),
        clipped=bound is not None and norm > bound,
        rounding_tries=tries,
        clamped=int(clamped),
        extras=bounded,
    )


def _extra_values(
    slots: tuple[ExtraSlot, ...], given: Mapping[str, float], source: RandomSource
) -> npt.NDArray[np.int64]:
    """Round each extra value to slot units and bound it to ``[low, bound]`` (on the device)."""
    missing = sorted(e.name for e in slots if e.name not in given)
    unknown = sorted(set(given) - {e.name for e in slots})
    if missing or unknown:
        raise ValueError(f"extra slot values: missing {missing}, not in the round {unknown}")
    out = np.zeros(len(slots), dtype=np.int64)
    for index, e in enumerate(slots):
        x = float(given[e.name])
        if not math.isfinite(x):
            raise ValueError(f"extra slot {e.name!r} value is not finite: {x}")
        y = min(max(x * e.scale, float(e.low)), float(e.bound))
        # unbiased stochastic rounding, the codec's coin (53 random bits)
        floor = math.floor(y)
        coin = float(int(uniform_uint64(source, 1)[0]) >> 11) * 2.0**-53
        out[index] = min(max(int(floor) + int(coin < y - floor), e.low), e.bound)
    return out


def _extra_noise(slots: tuple[ExtraSlot, ...], source: RandomSource) -> npt.NDArray[np.int64]:
    """Exact discrete Gaussian noise per extra slot (its own variance; 0 when none)."""
    out = np.zeros(len(slots), dtype=np.int64)
    for index, e in enumerate(slots):
        if e.noised:
            out[index] = int(discrete_gaussian(source, Fraction(e.sigma2_num, e.sigma2_den), 1)[0])
    return out


def seal(
    values: npt.NDArray[np.int64],
    ctx: RoundContext,
    identity: DeviceIdentity,
    *,
    pool: ObfuscatorPool | None = None,
    rng: RandomSource | None = None,
    now_ms: int | None = None,
) -> EncryptedUpdate:
    """Pack, encrypt and sign an integer update for the round in ``ctx``.

    Args:
        values: output of :func:`privatize` (within the slot range).
        ctx: the round context.
        identity: the device's signing identity.
        pool: obfuscator pool (values used once, consumption durable);
            obfuscators are computed on the fly without one.
        rng: randomness for fresh obfuscators (OS CSPRNG by default).
        now_ms: creation time; the wall clock by default.

    Returns:
        The signed update.
    """
    ann = ctx.announcement
    plaintexts = pack(values, ctx.packing)
    binding = b""
    base = ctx.binding
    if base is None:
        vector = encrypt(ctx.public_key, plaintexts, pool=pool, rng=rng)
    else:
        # DJN obfuscators hs^a and a proof that this device knows its
        # plaintexts, bound to its id and the round: nobody can submit a
        # function of other devices' ciphertexts (cancellation, copies).
        source: ObfuscatorPool | DJNObfuscatorSource
        if pool is not None and pool.kind == "djn":
            source = pool
        else:
            source = DJNObfuscatorSource(ctx.public_key, base)
        vector, proof = encrypt_bound(
            ctx.public_key,
            base,
            plaintexts,
            federation=ann.federation,
            round_id=ann.round_id,
            device_id=identity.device_id,
            packing_digest=ann.packing_digest,
            pool_or_source=source,
            rng=rng,
        )
        binding = proof.to_bytes()
    blob = vector.to_bytes()
    header: dict[str, Any] = {
        "federation": ann.federation,
        "round_id": ann.round_id,
        "device_id": identity.device_id,
        "key_fingerprint": ann.key_fingerprint,
        "packing_digest": ann.packing_digest,
        "privacy_digest": ctx.privacy_digest,
        "num_params": int(values.size),
        "num_ciphertexts": len(plaintexts),
        "ciphertext_digest": digest(blob),
        "created_ms": int(time.time() * 1000) if now_ms is None else now_ms,
        "binding": binding,
    }
    unsigned = EncryptedUpdate(**header, ciphertexts=blob, signature=b"\0" * 64)
    return EncryptedUpdate(
        **header, ciphertexts=blob, signature=identity.sign(unsigned.signing_bytes())
    )


def verify_update_binding(
    update: EncryptedUpdate, public_key: PaillierPublicKey, base: DJNBase
) -> None:
    """Check an update's binding proof (aggregator intake and every committee member).

    Raises:
        InvalidBindingError: missing, malformed, or not valid for this sender,
            round and ciphertext vector.
        InvalidCiphertextError: the ciphertext blob is invalid.
    """
    if not update.binding:
        raise InvalidBindingError("update carries no binding proof", reason="binding_missing")
    try:
        proof = BindingProof.from_bytes(update.binding, public_key)
    except DecodeError as exc:
        raise InvalidBindingError(
            f"malformed binding proof: {exc}", reason="binding_format"
        ) from None
    vector = CiphertextVector.from_bytes(update.ciphertexts, public_key, update.num_ciphertexts)
    verify_bound(
        public_key,
        base,
        vector,
        proof,
        federation=update.federation,
        round_id=update.round_id,
        device_id=update.device_id,
        packing_digest=update.packing_digest,
    )


def build_update(
    delta: npt.NDArray[np.floating[Any]],
    ctx: RoundContext,
    identity: DeviceIdentity,
    *,
    pool: ObfuscatorPool | None = None,
    clip: float | None = None,
    extras: Mapping[str, float] | None = None,
    rng: RandomSource | None = None,
    allow_insecure_rng: bool = False,
    now_ms: int | None = None,
) -> tuple[EncryptedUpdate, PrivatizedUpdate]:
    """Run :func:`privatize` then :func:`seal` (no ledger: callers charge it first).

    Returns:
        The signed update and the privatization record.
    """
    private = privatize(
        delta, ctx, clip=clip, extras=extras, rng=rng, allow_insecure_rng=allow_insecure_rng
    )
    update = seal(private.values, ctx, identity, pool=pool, rng=rng, now_ms=now_ms)
    return update, private
