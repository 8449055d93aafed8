"""The federation policy: the privacy promise, signed by the key-holder committee.

Trust model. The aggregator is the party the encryption defends against, so
nothing it announces may weaken a device's privacy. The policy is written at
the key ceremony and signed by at least ``T`` of the ``N`` committee members
(Ed25519 over its canonical bytes); devices pin its digest at enrollment
and check every round announcement against it:

* the mode (``distributed``, ``local`` or ``none``) must be the policy's;
* distributed mode: the announced noise must be sized for at most the
  policy's quorum (``noise.min_clients <= policy.min_clients``): an
  announcement that inflates the quorum to shrink each device's noise share
  is refused, and every member refuses to decrypt a sum of fewer than
  ``max(policy.min_clients, noise.min_clients)`` updates, so the sum always
  carries the noise each device's ledger charged for;
* the announced epsilon target, delta, rounds horizon and clip may be at
  most the policy's, the clip at least ``min_clip``; the slot value bits
  within the policy's bounds;
* the model noise relative to the clip: the announced noise spec's own
  cost over its rounds (computed, not read from the spec) must be within
  its epsilon target, so an announcement cannot shrink the noise or raise
  the sensitivity below what its target promises;
* extra slots (docs/packing.md): the adaptive-clipping bit only when the
  policy sets ``adaptive_clip``; in a DP round every extra slot is noised.

Changing the policy is a new ceremony step (a new document signed by ``T``
members and re-pinned by each device), never an aggregator setting.

Compatibility rule: ``format``/``version`` are checked first; fields are
never removed or re-purposed.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from edge_sdk._fs import atomic_write
from edge_sdk.crypto.djn import DJNBase
from edge_sdk.errors import ConfigError, DecodeError, InvalidSignatureError, RemoteProtocolError
from edge_sdk.identity import DeviceIdentity, verify_signature

__all__ = ["POLICY_MODES", "FederationPolicy"]

POLICY_MODES = ("distributed", "local", "none")
_FORMAT = "edgefl-federation-policy"
_VERSION = 1
_DOMAIN = b"edgefl/federation-policy/v1\x00"


def _bool(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, got {value!r}")
    return value


@dataclass(frozen=True, slots=True, kw_only=True)
class FederationPolicy:
    """What every device's privacy rests on, signed by the committee.

    Attributes:
        federation: the federation.
        key_fingerprint: the Paillier public key (hex fingerprint).
        committee_fingerprint: the committee manifest's fingerprint.
        threshold: ``T``: signatures needed on this policy and on enrollments.
        holders: every member's id and raw Ed25519 public key.
        mode: ``distributed``, ``local`` or ``none`` (HE only, no DP).
        min_clients: the quorum the noise is calibrated for (distributed).
        epsilon: each device's total epsilon budget.
        delta: its delta.
        rounds: the rounds horizon one device takes part in.
        max_clip: largest L2 clip an announcement may use.
        min_value_bits: smallest slot value width an announcement may use.
        max_value_bits: largest slot value width an announcement may use.
        min_clip: smallest L2 clip an announcement may use (None: no floor).
            With ``max_clip`` it is the range an adaptive clip must stay in.
        adaptive_clip: whether rounds may ask devices for their
            clipped-or-not bit (adaptive clipping, Andrew et al. 2021).
        djn_base: the committee's DJN base (``hs``, an n-th residue no device
            chose): devices encrypt with ``hs^a`` and prove knowledge of their
            plaintexts over it (:mod:`edge_sdk.crypto.binding`). None: no
            binding (a development federation).
        signatures: (holder id, Ed25519 signature over :meth:`signing_bytes`).
    """

    federation: str
    key_fingerprint: str
    committee_fingerprint: str
    threshold: int
    holders: tuple[tuple[str, bytes], ...]
    mode: str
    min_clients: int
    epsilon: float
    delta: float
    rounds: int
    max_clip: float
    min_value_bits: int = 8
    max_value_bits: int = 24
    min_clip: float | None = None
    adaptive_clip: bool = False
    djn_base: DJNBase | None = None
    signatures: tuple[tuple[str, bytes], ...] = field(default=())

    def __post_init__(self) -> None:
        if self.mode not in POLICY_MODES:
            raise ValueError(f"policy mode must be one of {POLICY_MODES}, got {self.mode!r}")
        if not 1 <= self.threshold <= len(self.holders):
            raise ValueError(
                f"policy threshold must be in [1, {len(self.holders)}], got {self.threshold}"
            )
        ids = [h for h, _ in self.holders]
        if len(set(ids)) != len(ids) or any(len(k) != 32 for _, k in self.holders):
            raise ValueError("policy holders must have distinct ids and 32-byte Ed25519 keys")
        if not isinstance(self.min_clients, int) or self.min_clients < 1:
            raise ValueError(f"policy min_clients must be >= 1, got {self.min_clients!r}")
        for name in ("epsilon", "max_clip"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"policy {name} must be a finite number > 0, got {value!r}")
        if not 0.0 < self.delta < 1.0:
            raise ValueError(f"policy delta must be in (0, 1), got {self.delta!r}")
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"policy rounds must be >= 1, got {self.rounds!r}")
        if not 1 <= self.min_value_bits <= self.max_value_bits <= 62:
            raise ValueError("policy value bits must satisfy 1 <= min <= max <= 62")
        if self.min_clip is not None and not (
            isinstance(self.min_clip, (int, float))
            and math.isfinite(self.min_clip)
            and 0 < self.min_clip <= self.max_clip
        ):
            raise ValueError(f"policy min_clip must be in (0, max_clip], got {self.min_clip!r}")
        if not isinstance(self.adaptive_clip, bool):
            raise ValueError(f"policy adaptive_clip must be a bool, got {self.adaptive_clip!r}")

    # -- canonical form and signatures -------------------------------------------

    def _body(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "federation": self.federation,
            "key_fingerprint": self.key_fingerprint,
            "committee_fingerprint": self.committee_fingerprint,
            "threshold": self.threshold,
            "holders": [[h, k.hex()] for h, k in self.holders],
            "mode": self.mode,
            "min_clients": self.min_clients,
            "epsilon": float(self.epsilon),
            "delta": float(self.delta),
            "rounds": self.rounds,
            "max_clip": float(self.max_clip),
            "min_value_bits": self.min_value_bits,
            "max_value_bits": self.max_value_bits,
            "djn_base": None if self.djn_base is None else self.djn_base.to_dict(),
        }
        # Optional fields appear only when set, so a policy that does not use
        # them keeps its canonical bytes (and the digest devices pinned).
        if self.min_clip is not None:
            body["min_clip"] = float(self.min_clip)
        if self.adaptive_clip:
            body["adaptive_clip"] = True
        return body

    def signing_bytes(self) -> bytes:
        """The bytes each member signs (everything but the signatures)."""
        return _DOMAIN + json.dumps(self._body(), sort_keys=True, separators=(",", ":")).encode()

    @property
    def digest(self) -> str:
        """SHA-256 (hex) of :meth:`signing_bytes`: what a device pins."""
        return hashlib.sha256(self.signing_bytes()).hexdigest()

    def signed_by(self, identity: DeviceIdentity) -> FederationPolicy:
        """This policy with ``identity``'s signature added (a member signing it)."""
        keys = dict(self.holders)
        if keys.get(identity.device_id) != identity.public_key_bytes:
            raise ValueError(f"{identity.device_id} is not a member named by the policy")
        others = tuple(s for s in self.signatures if s[0] != identity.device_id)
        signature = identity.sign(self.signing_bytes())
        return replace(self, signatures=(*others, (identity.device_id, signature)))

    def verify(self) -> None:
        """Check that at least ``T`` distinct members signed this exact policy.

        Raises:
            InvalidSignatureError: fewer than ``threshold`` valid signatures.
        """
        keys = dict(self.holders)
        valid: set[str] = set()
        for holder, signature in self.signatures:
            key = keys.get(holder)
            if key is None:
                continue
            try:
                verify_signature(key, self.signing_bytes(), signature)
            except InvalidSignatureError:
                continue
            valid.add(holder)
        if len(valid) < self.threshold:
            raise InvalidSignatureError(
                f"federation policy carries {len(valid)} valid committee signatures, "
                f"needs {self.threshold}",
                reason="policy_signatures",
            )

    # -- the checks devices and members make ---------------------------------------

    def check_noise(
        self, noise: Any, *, value_bits: int | None = None, extras: Sequence[Any] = ()
    ) -> None:
        """Refuse a round whose noise spec (a ``NoiseSpec`` or None) is outside the policy.

        ``extras`` are the round's extra slots (``ExtraSlot``, from its packing spec).

        Raises:
            RemoteProtocolError: ``reason="outside_policy"``, the message says which bound.
        """

        def refuse(why: str) -> None:
            raise RemoteProtocolError(
                f"round outside the federation policy: {why}", reason="outside_policy"
            )

        if value_bits is not None and not (
            self.min_value_bits <= value_bits <= self.max_value_bits
        ):
            refuse(
                f"value bits {value_bits} outside [{self.min_value_bits}, {self.max_value_bits}]"
            )
        names = {getattr(e, "name", None) for e in extras}
        if "clip_below" in names and not self.adaptive_clip:
            refuse("the round asks for the clipped-or-not bit; the policy allows no adaptive clip")
        if noise is None:
            if self.mode != "none":
                refuse(f"the policy requires {self.mode} DP, the round announces no noise")
            return
        if noise.mode != self.mode:
            refuse(f"mode {noise.mode!r}, the policy's is {self.mode!r}")
        if self.mode == "distributed" and noise.min_clients > self.min_clients:
            refuse(
                f"noise sized for sums of {noise.min_clients} devices, the policy's quorum is "
                f"{self.min_clients} (each device would add too little noise)"
            )
        if noise.epsilon_target > self.epsilon * (1 + 1e-9):
            refuse(f"epsilon {noise.epsilon_target} above the policy's {self.epsilon}")
        if noise.delta > self.delta * (1 + 1e-9):
            refuse(f"delta {noise.delta} above the policy's {self.delta}")
        if noise.rounds > self.rounds:
            refuse(f"calibrated for {noise.rounds} rounds, the policy's horizon is {self.rounds}")
        if noise.clip > self.max_clip * (1 + 1e-12):
            refuse(f"clip {noise.clip} above the policy's {self.max_clip}")
        if self.min_clip is not None and noise.clip < self.min_clip * (1 - 1e-12):
            refuse(f"clip {noise.clip} below the policy's {self.min_clip}")
        from fractions import Fraction

        from edge_sdk.privacy.mechanisms import mechanism

        floor = mechanism(noise.mechanism).min_sigma2(noise.mode)
        if Fraction(noise.sigma2_num, noise.sigma2_den) < floor:
            refuse(f"per-device noise variance below {floor}, where its accounting is not stated")
        # The noise relative to the clip, computed from what devices will add.
        from edge_sdk.privacy.accounting import epsilon_spent

        spent = epsilon_spent(noise, noise.rounds)
        if spent > noise.epsilon_target * (1 + 1e-9):
            refuse(
                f"the announced noise gives epsilon {spent:.4g} over {noise.rounds} rounds, "
                f"above its own target {noise.epsilon_target} (too little noise for the clip)"
            )

    def check_lifetime(self, ledger: Any, cost: Any) -> float:
        """Refuse a participation that would take a device past the policy's total epsilon.

        Every announcement is checked on its own by :meth:`check_noise`; this
        is the check across announcements: the device's whole history (its
        ledger) plus this round, composed at the policy's delta, must stay
        within the policy's epsilon, whatever each announcement claims about
        its own horizon (an aggregator re-planning every round for
        ``rounds = 1``, or adding evaluation slots, still stops here). The
        device's own ``budget_epsilon`` is a second, independent cap.

        Args:
            ledger: the device's :class:`~edge_sdk.privacy.PrivacyLedger`.
            cost: this round's :class:`~edge_sdk.privacy.PrivacyCost`.

        Returns:
            The epsilon at the policy's delta after this round.

        Raises:
            BudgetExhaustedError: it would exceed the policy's epsilon.
        """
        from edge_sdk.errors import BudgetExhaustedError

        after = float(ledger.epsilon_if(cost, delta=self.delta))
        if after > self.epsilon * (1 + 1e-9):
            raise BudgetExhaustedError(
                f"taking part would raise epsilon to {after:.6g} at delta {self.delta:g}, above "
                f"the federation policy's total {self.epsilon:g}"
            )
        return after

    def quorum(self, noise: Any) -> int:
        """Fewest contributions a member may decrypt for a round with this noise spec."""
        if noise is None or self.mode != "distributed":
            return self.min_clients if self.mode == "distributed" else 1
        return max(self.min_clients, int(noise.min_clients))

    # -- files --------------------------------------------------------------------

    def to_json(self) -> dict[str, Any]:
        """The JSON form (with the signatures)."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            **self._body(),
            "signatures": [[h, s.hex()] for h, s in self.signatures],
        }

    @classmethod
    def from_json(cls, doc: Mapping[str, Any]) -> FederationPolicy:
        """Parse and validate (signatures are NOT checked here: call :meth:`verify`).

        Raises:
            ConfigError: wrong format or an invalid field.
        """
        if doc.get("format") != _FORMAT or doc.get("version") != _VERSION:
            raise ConfigError(
                f"not an edgefl federation policy (format {doc.get('format')!r}, "
                f"version {doc.get('version')!r})"
            )
        try:
            return cls(
                federation=str(doc["federation"]),
                key_fingerprint=str(doc["key_fingerprint"]),
                committee_fingerprint=str(doc["committee_fingerprint"]),
                threshold=int(doc["threshold"]),
                holders=tuple((str(h), bytes.fromhex(k)) for h, k in doc["holders"]),
                mode=str(doc["mode"]),
                min_clients=int(doc["min_clients"]),
                epsilon=float(doc["epsilon"]),
                delta=float(doc["delta"]),
                rounds=int(doc["rounds"]),
                max_clip=float(doc["max_clip"]),
                min_value_bits=int(doc.get("min_value_bits", 8)),
                max_value_bits=int(doc.get("max_value_bits", 24)),
                min_clip=None if doc.get("min_clip") is None else float(doc["min_clip"]),
                adaptive_clip=_bool(doc.get("adaptive_clip", False)),
                djn_base=None
                if doc.get("djn_base") is None
                else DJNBase.from_dict(doc["djn_base"]),
                signatures=tuple((str(h), bytes.fromhex(s)) for h, s in doc["signatures"]),
            )
        except (KeyError, TypeError, ValueError, DecodeError) as exc:
            raise ConfigError(f"invalid federation policy: {exc}") from None

    def save(self, path: str | Path) -> Path:
        """Write the policy (public; mode 0644)."""
        target = Path(path)
        atomic_write(target, (json.dumps(self.to_json(), indent=2) + "\n").encode(), mode=0o644)
        return target

    @classmethod
    def load(cls, path: str | Path, *, expected_digest: str | None = None) -> FederationPolicy:
        """Read a policy file and verify its committee signatures.

        Args:
            path: the file.
            expected_digest: the digest the caller pinned (a device: at enrollment).

        Raises:
            ConfigError: unreadable, invalid, not enough valid signatures, or
                not the pinned policy.
        """
        source = Path(path)
        try:
            doc = json.loads(source.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise ConfigError(f"cannot read federation policy {source}: {exc}") from None
        if not isinstance(doc, dict):
            raise ConfigError(f"{source}: a federation policy is a JSON object")
        policy = cls.from_json(doc)
        try:
            policy.verify()
        except InvalidSignatureError as exc:
            raise ConfigError(f"{source}: {exc}") from None
        if expected_digest is not None and policy.digest != expected_digest:
            raise ConfigError(
                f"{source}: policy digest {policy.digest} is not the pinned {expected_digest}; "
                "a changed policy must be re-pinned on the device (`edgefl device pin-policy`)"
            )
        return policy
