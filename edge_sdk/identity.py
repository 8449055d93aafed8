"""Device identity (Ed25519) and the aggregator's device registry.

Each device holds an Ed25519 private key; the aggregator (and the key
holder) hold a registry of enrolled devices' public keys. Every update is
signed over its canonical header bytes (federation, round, device id, key
fingerprint, packing and privacy digests, ciphertext digest, ...), so a
forged, tampered or replayed update is refused before it reaches any sum.

Device keys are stored unencrypted with mode 0600 (a device must restart
unattended); loading refuses a key file readable by group or others.
Revoking a device in the registry makes every later update from it fail
verification.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from edge_sdk._fs import atomic_write, check_private
from edge_sdk.errors import ConfigError, InvalidSignatureError, KeyFileError
from edge_sdk.ids import ID_PATTERN

__all__ = [
    "DeviceIdentity",
    "DeviceRecord",
    "DeviceRegistry",
    "SignedMessage",
    "check_approvals_in_background",
    "enrollment_bytes",
    "sign_message",
    "verify_message",
    "verify_signature",
]

_ID = ID_PATTERN
_log = logging.getLogger(__name__)


def _check_id(device_id: str) -> str:
    if not isinstance(device_id, str) or not _ID.fullmatch(device_id):
        raise ValueError(f"device id must match [A-Za-z0-9_-]{{1,64}}, got {device_id!r}")
    return device_id


class DeviceIdentity:
    """A device id with its Ed25519 signing key."""

    __slots__ = ("_key", "device_id")

    def __init__(self, device_id: str, key: Ed25519PrivateKey) -> None:
        self.device_id = _check_id(device_id)
        self._key = key

    @classmethod
    def generate(cls, device_id: str) -> DeviceIdentity:
        """Create a new identity with a fresh key from the OS CSPRNG."""
        return cls(device_id, Ed25519PrivateKey.generate())

    @property
    def public_key_bytes(self) -> bytes:
        """The raw 32-byte public key."""
        return self._key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )

    def sign(self, data: bytes) -> bytes:
        """Sign ``data`` (64-byte Ed25519 signature)."""
        return self._key.sign(data)

    def save(self, path: str | Path) -> None:
        """Write the key as a 0600 file (JSON: device id and raw private key hex)."""
        raw = self._key.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        doc = {"format": "edgefl-device-key/1", "device_id": self.device_id, "ed25519": raw.hex()}
        atomic_write(path, (json.dumps(doc, indent=2) + "\n").encode(), mode=0o600)

    @classmethod
    def load(cls, path: str | Path) -> DeviceIdentity:
        """Load a key file written by :meth:`save`.

        Raises:
            KeyFileError: missing, unsafe permissions, or malformed.
        """
        p = Path(path)
        try:
            check_private(p)
            doc = json.loads(p.read_text(encoding="utf-8"))
            if doc.get("format") != "edgefl-device-key/1":
                raise ValueError(f"unknown format {doc.get('format')!r}")
            key = Ed25519PrivateKey.from_private_bytes(bytes.fromhex(doc["ed25519"]))
            return cls(doc["device_id"], key)
        except FileNotFoundError:
            raise KeyFileError(f"device key {p} does not exist") from None
        except PermissionError as exc:
            raise KeyFileError(str(exc)) from None
        except (ValueError, KeyError, TypeError) as exc:
            raise KeyFileError(f"device key {p} is malformed: {exc}") from None


def verify_signature(public_key: bytes, data: bytes, signature: bytes) -> None:
    """Verify an Ed25519 signature.

    Raises:
        InvalidSignatureError: the signature does not verify (or the key or
            signature is malformed).
    """
    try:
        Ed25519PublicKey.from_public_bytes(public_key).verify(signature, data)
    except (InvalidSignature, ValueError):
        raise InvalidSignatureError("signature does not verify") from None


class SignedMessage(Protocol):
    """A wire message carrying an optional signature over ``signed_bytes()``."""

    @property
    def signature(self) -> bytes:
        """The signature (empty when unsigned)."""
        ...

    def signed_bytes(self) -> bytes:
        """The bytes the signature covers."""
        ...


M = TypeVar("M", bound=SignedMessage)


def sign_message(message: M, identity: DeviceIdentity) -> M:
    """Return a copy of ``message`` signed by ``identity`` (Ed25519 is deterministic)."""
    signature = identity.sign(message.signed_bytes())
    return dataclasses.replace(message, signature=signature)  # type: ignore[type-var]


def verify_message(message: SignedMessage, public_key: bytes) -> None:
    """Check a message's signature against a pinned public key.

    Raises:
        InvalidSignatureError: unsigned (``reason="unsigned"``) or a bad signature.
    """
    if not message.signature:
        raise InvalidSignatureError("message is not signed", reason="unsigned")
    verify_signature(public_key, message.signed_bytes(), message.signature)


def enrollment_bytes(federation: str, device_id: str, public_key: bytes) -> bytes:
    """What a committee member signs to approve a device's enrollment."""
    return (
        b"edgefl/v1/enroll\x00"
        + federation.encode()
        + b"\x00"
        + _check_id(device_id).encode()
        + b"\x00"
        + bytes(public_key)
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class DeviceRecord:
    """One enrolled device.

    Attributes:
        device_id: its id.
        public_key: its raw Ed25519 public key.
        enrolled_ms: when it was enrolled.
        revoked_ms: when it was revoked (None: active).
        approvals: committee members' signatures over
            :func:`enrollment_bytes` (holder id, signature).
    """

    device_id: str
    public_key: bytes
    enrolled_ms: int
    revoked_ms: int | None = None
    approvals: tuple[tuple[str, bytes], ...] = ()

    @property
    def active(self) -> bool:
        """True unless revoked."""
        return self.revoked_ms is None

    def to_json(self) -> dict[str, Any]:
        """JSON-ready form."""
        doc: dict[str, Any] = {
            "public_key": self.public_key.hex(),
            "enrolled_ms": self.enrolled_ms,
            "revoked_ms": self.revoked_ms,
        }
        if self.approvals:
            doc["approvals"] = {h: sig.hex() for h, sig in sorted(self.approvals)}
        return doc


def check_approvals_in_background(
    registry: DeviceRegistry, device_ids: list[str] | None = None, *, name: str = "approvals"
) -> threading.Event:
    """Run :meth:`DeviceRegistry.check_approvals` on a daemon thread; returns its stop event.

    A service starts this when it starts: the committee's approvals of the
    devices it will take are checked while the round waits for updates, not
    in the path of the first update from each device. An update arriving
    before its device was reached is checked as it always is.
    """
    stop = threading.Event()
    ids = registry.active_ids() if device_ids is None else device_ids

    def run() -> None:
        started = time.monotonic()
        approved = registry.check_approvals(ids, stop=stop)
        if not stop.is_set():
            _log.info(
                "checked the committee's approvals of %d device(s) in %.1f s (%d approved)",
                len(ids),
                time.monotonic() - started,
                approved,
            )

    threading.Thread(target=run, name=name, daemon=True).start()
    return stop


class DeviceRegistry:
    """The enrolled devices of a federation, persisted as a JSON file.

    With :meth:`require_approvals` (every committee member and the
    aggregator of a committee federation), a device counts only once ``T``
    committee members signed its enrollment: whoever writes the registry
    file (the aggregator's operator) cannot create contributors alone.

    Args:
        path: registry file (created on first save).
        federation: federation name recorded in the file.
    """

    FORMAT = "edgefl-registry/1"

    def __init__(self, path: str | Path, federation: str = "default") -> None:
        self.path = Path(path)
        self.federation = federation
        self._devices: dict[str, DeviceRecord] = {}
        self._approvers: dict[str, bytes] = {}
        self._approvals_needed = 0
        self._approved: set[str] = set()
        # The approval cache may be filled by another thread
        # (:meth:`check_approvals`): a change of approvers or of a device's
        # record bumps the generation, and a check begun before it is not kept.
        self._approval_lock = threading.Lock()
        self._approval_gen = 0

    @classmethod
    def load(cls, path: str | Path, *, create: bool = False) -> DeviceRegistry:
        """Load a registry file.

        Args:
            path: the file.
            create: return an empty registry when the file does not exist.

        Raises:
            ConfigError: the file is missing (and not ``create``) or malformed.
        """
        p = Path(path)
        if not p.exists():
            if create:
                return cls(p)
            raise ConfigError(f"device registry {p} does not exist")
        try:
            doc = json.loads(p.read_text(encoding="utf-8"))
            if doc.get("format") != cls.FORMAT:
                raise ValueError(f"unknown format {doc.get('format')!r}")
            registry = cls(p, doc["federation"])
            for device_id, rec in doc["devices"].items():
                key = bytes.fromhex(rec["public_key"])
                if len(key) != 32:
                    raise ValueError(f"{device_id}: public key must be 32 bytes")
                approvals = tuple(
                    (str(h), bytes.fromhex(sig)) for h, sig in rec.get("approvals", {}).items()
                )
                registry._devices[_check_id(device_id)] = DeviceRecord(
                    device_id=device_id,
                    public_key=key,
                    enrolled_ms=int(rec["enrolled_ms"]),
                    revoked_ms=None if rec.get("revoked_ms") is None else int(rec["revoked_ms"]),
                    approvals=approvals,
                )
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise ConfigError(f"device registry {p} is malformed: {exc}") from None
        return registry

    def save(self) -> None:
        """Write the registry atomically (0644: it holds only public keys)."""
        doc = {
            "format": self.FORMAT,
            "federation": self.federation,
            "devices": {d: r.to_json() for d, r in sorted(self._devices.items())},
        }
        atomic_write(self.path, (json.dumps(doc, indent=2) + "\n").encode(), mode=0o644)

    def enroll(self, device_id: str, public_key: bytes, *, now_ms: int | None = None) -> None:
        """Add a device (or re-enroll a revoked one with a NEW key).

        Raises:
            ValueError: the id is taken by an active device, or a revoked
                device tries to come back with its old key.
        """
        _check_id(device_id)
        if len(public_key) != 32:
            raise ValueError(f"public key must be 32 bytes, got {len(public_key)}")
        Ed25519PublicKey.from_public_bytes(public_key)
        existing = self._devices.get(device_id)
        if existing is not None and existing.active:
            raise ValueError(f"device {device_id!r} is already enrolled")
        if existing is not None and existing.public_key == public_key:
            raise ValueError(f"device {device_id!r} was revoked; enroll it with a new key")
        when = int(time.time() * 1000) if now_ms is None else now_ms
        self._devices[device_id] = DeviceRecord(
            device_id=device_id, public_key=public_key, enrolled_ms=when
        )
        self._forget_approval(device_id)

    def require_approvals(self, approvers: dict[str, bytes], threshold: int) -> None:
        """Count a device only with ``threshold`` valid approvals from ``approvers``.

        Args:
            approvers: committee member id -> raw Ed25519 public key.
            threshold: approvals needed (the committee's ``T``).
        """
        if not 1 <= threshold <= len(approvers):
            raise ValueError(f"threshold must be in [1, {len(approvers)}], got {threshold}")
        with self._approval_lock:
            self._approvers = dict(approvers)
            self._approvals_needed = threshold
            self._approved = set()
            self._approval_gen += 1

    def approve(self, device_id: str, identity: DeviceIdentity) -> None:
        """Add ``identity``'s (a committee member's) approval of a device's enrollment.

        Raises:
            KeyError: unknown device.
        """
        rec = self._devices[device_id]
        signature = identity.sign(enrollment_bytes(self.federation, device_id, rec.public_key))
        others = tuple(a for a in rec.approvals if a[0] != identity.device_id)
        self._devices[device_id] = dataclasses.replace(
            rec, approvals=(*others, (identity.device_id, signature))
        )
        self._forget_approval(device_id)

    def _forget_approval(self, device_id: str) -> None:
        with self._approval_lock:
            self._approved.discard(device_id)
            self._approval_gen += 1

    def approval_count(self, device_id: str, *, enough: int | None = None) -> int:
        """Valid approvals of a device's current key by the required approvers.

        ``enough``: stop counting (and checking signatures) once that many are valid.
        """
        rec = self._devices.get(device_id)
        if rec is None:
            return 0
        data = enrollment_bytes(self.federation, device_id, rec.public_key)
        valid = set()
        for holder, signature in rec.approvals:
            key = self._approvers.get(holder)
            if key is None or holder in valid:
                continue
            try:
                verify_signature(key, data, signature)
            except InvalidSignatureError:
                continue
            valid.add(holder)
            if enough is not None and len(valid) >= enough:
                break
        return len(valid)

    def _is_approved(self, device_id: str) -> bool:
        if not self._approvals_needed or device_id in self._approved:
            return True
        needed, generation = self._approvals_needed, self._approval_gen
        if self.approval_count(device_id, enough=needed) < needed:
            return False
        with self._approval_lock:
            if generation == self._approval_gen:  # nothing changed while it was checked
                self._approved.add(device_id)
        return True

    def check_approvals(
        self, device_ids: list[str] | None = None, *, stop: threading.Event | None = None
    ) -> int:
        """Check (and remember) the committee's approvals of devices ahead of their updates.

        Verifying a device's approvals costs ``T`` signature checks, paid
        once per device and process; a service calls this from a background
        thread when it starts, so the first round after a start does not
        pay it update by update. Safe to run beside :meth:`verify` (a
        change of approvers or records meanwhile discards what was checked
        before it). Without required approvals there is nothing to check.

        Args:
            device_ids: the devices to check (default: every active one).
            stop: checked between devices; set it to end early.

        Returns:
            How many of them are approved.
        """
        approved = 0
        for device_id in self.active_ids() if device_ids is None else device_ids:
            if stop is not None and stop.is_set():
                break
            approved += self.is_active(device_id)
        return approved

    def revoke(self, device_id: str, *, now_ms: int | None = None) -> None:
        """Revoke a device: its signatures stop verifying.

        Raises:
            KeyError: unknown device.
        """
        rec = self._devices[device_id]
        if rec.active:
            when = int(time.time() * 1000) if now_ms is None else now_ms
            self._devices[device_id] = dataclasses.replace(rec, revoked_ms=when)

    def get(self, device_id: str) -> DeviceRecord | None:
        """The record of a device, or None."""
        return self._devices.get(device_id)

    def is_active(self, device_id: str) -> bool:
        """True for an enrolled, non-revoked (and, where required, approved) device."""
        rec = self._devices.get(device_id)
        return rec is not None and rec.active and self._is_approved(device_id)

    def active_ids(self) -> list[str]:
        """Ids of enrolled, non-revoked devices, sorted."""
        return sorted(d for d, r in self._devices.items() if r.active)

    def records(self) -> list[DeviceRecord]:
        """All records, sorted by id."""
        return [self._devices[d] for d in sorted(self._devices)]

    def verify(self, device_id: str, data: bytes, signature: bytes) -> None:
        """Verify a device's signature.

        Raises:
            InvalidSignatureError: unknown or revoked device, or a bad
                signature (one opaque error: the reason is for local logs).
        """
        rec = self._devices.get(device_id)
        if rec is None:
            raise InvalidSignatureError(f"unknown device {device_id!r}", reason="unknown_device")
        if not rec.active:
            raise InvalidSignatureError(f"device {device_id!r} is revoked", reason="revoked")
        if not self._is_approved(device_id):
            raise InvalidSignatureError(
                f"device {device_id!r} lacks the committee's approval of its enrollment",
                reason="not_approved",
            )
        verify_signature(rec.public_key, data, signature)

    def __len__(self) -> int:
        return len(self._devices)

    def __contains__(self, device_id: object) -> bool:
        return device_id in self._devices
