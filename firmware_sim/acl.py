"""Mosquitto credentials and topic ACLs for one federation.

Threat model: every device holds its own broker password; a device that is
stolen and opened gives its holder that device's identity and nothing more.
The ACL keeps it off the other devices' topics: it can write only its own
update and status topics and read only the global model, the round
announcement and its own receipts. It cannot read another device's updates
(they are encrypted anyway) or receipts, nor impersonate the aggregator or
the key holder. Removing a device from the files and reloading the broker
(SIGHUP) revokes it.

Topics live under ``edgefl/v1/{federation}/``:

=========================  =====================  ==========================
topic                      written by             read by
=========================  =====================  ==========================
``model/{i}`` (retained)   aggregator             devices
``round`` (retained)       aggregator             devices
``updates/{device}``       that device            aggregator, key holder
``ack/{device}``           aggregator             that device
``status/{device}``        that device (+ will)   aggregator
``keyholder/request``      aggregator             every key holder
``keyholder/result/{h}``   key holder ``h``       aggregator
``keyholder/commit/{h}``   key holder ``h``       every key holder
``keyholder/gap/{h}``      key holder ``h``       aggregator
``keyholder/relay/{h}``    aggregator             key holder ``h``
=========================  =====================  ==========================

Several key holders (a committee, each its own identity ``keyholder-1``...)
each read ``updates/+`` (the read-only witness of the ciphertexts) and
``keyholder/request`` and write only their own result topic; the result
topic's name is defined once, in :data:`KEYHOLDER_RESULT_TOPIC`.

With mutual TLS the broker user is the certificate's CN
(``use_identity_as_username``) and also the client id
(``use_username_as_clientid``): the user names here are exactly the ids
:mod:`firmware_sim.pki` issues certificates for (device ids, ``aggregator``,
the holder ids).

Passwords are stored in Mosquitto 2's ``$7$`` format (PBKDF2-HMAC-SHA512,
12-byte salt, 64-byte hash), computed here with :mod:`hashlib` so no
``mosquitto_passwd`` binary is needed. Generated passwords carry 256 random
bits (OS CSPRNG by default), so the iteration count guards nothing that the
entropy does not already; it stays at ``mosquitto_passwd``'s 101 to keep the
broker's CPU cost low when a whole fleet reconnects at once. Raise it for
human-chosen passwords.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edge_sdk._fs import atomic_write
from edge_sdk.errors import ConfigError
from edge_sdk.ids import ID_PATTERN
from edge_sdk.randomness import RandomSource, default_random

__all__ = [
    "DEFAULT_AGGREGATOR_USER",
    "DEFAULT_KEYHOLDER_USER",
    "DEVICE_ID_PATTERN",
    "KEYHOLDER_REQUEST_TOPIC",
    "KEYHOLDER_RESULT_TOPIC",
    "AuthFiles",
    "BrokerAuth",
    "TopicGrant",
    "acl_grants",
    "generate_broker_auth",
    "hash_password",
    "keyholder_result_topic",
    "load_credentials",
    "read_device_ids",
    "render_acl",
    "render_password_file",
    "topic_prefix",
    "verify_password",
]

DEVICE_ID_PATTERN = ID_PATTERN.pattern
_NAME_RE = re.compile(DEVICE_ID_PATTERN)
_PBKDF2_SALT_BYTES = 12
_PBKDF2_HASH_BYTES = 64
_PASSWORD_BYTES = 32
DEFAULT_ITERATIONS = 101  # mosquitto_passwd 2.0's own default
CREDENTIALS_FORMAT = 1
DEFAULT_AGGREGATOR_USER = "aggregator"
DEFAULT_KEYHOLDER_USER = "keyholder"
# The topic layout of the key-holder exchange, relative to the federation
# prefix. The one place the result topic's name is defined: each holder
# writes its own, the aggregator reads them all ({holder} = "+").
KEYHOLDER_REQUEST_TOPIC = "keyholder/request"
KEYHOLDER_RESULT_TOPIC = "keyholder/result/{holder}"
KEYHOLDER_COMMIT_TOPIC = "keyholder/commit/{holder}"
KEYHOLDER_GAP_TOPIC = "keyholder/gap/{holder}"
KEYHOLDER_RELAY_TOPIC = "keyholder/relay/{holder}"

Access = Literal["read", "write", "readwrite"]
Role = Literal["device", "aggregator", "keyholder"]


def _check_name(value: object, what: str) -> str:
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ConfigError(f"{what} must match {DEVICE_ID_PATTERN}, got {value!r}")
    return value


def topic_prefix(federation: str) -> str:
    """Return ``edgefl/v1/{federation}/`` after checking the federation name."""
    return f"edgefl/v1/{_check_name(federation, 'federation')}/"


@dataclass(frozen=True, slots=True, kw_only=True)
class TopicGrant:
    """One ACL line: ``topic {access} {topic}``."""

    access: Access
    topic: str


def keyholder_result_topic(federation: str, holder: str) -> str:
    """Return the topic key holder ``holder`` publishes its results on (``+``: all of them)."""
    if holder != "+":
        _check_name(holder, "key holder id")
    return topic_prefix(federation) + KEYHOLDER_RESULT_TOPIC.format(holder=holder)


def acl_grants(
    federation: str,
    device_ids: Iterable[str],
    *,
    aggregator_user: str = DEFAULT_AGGREGATOR_USER,
    keyholder_user: str = DEFAULT_KEYHOLDER_USER,
    keyholders: Iterable[str] | None = None,
    aggregator_workers: int = 0,
) -> dict[str, tuple[TopicGrant, ...]]:
    """Return each broker user's topic grants (pure; see the module docstring).

    Args:
        federation: federation name.
        device_ids: the devices' ids (= their broker users / certificate CNs).
        aggregator_user: the aggregator's broker user.
        keyholder_user: the key holder's broker user when ``keyholders`` is None.
        keyholders: the ids of a committee of key holders (``keyholder-1``...),
            each with its own grants; overrides ``keyholder_user``.
        aggregator_workers: a sharded aggregator's workers: users
            ``{aggregator_user}-worker-{K}`` (:func:`worker_users`) with the
            aggregator's grants (a broker that ties client ids to users needs
            one user per worker session).

    Raises:
        ConfigError: an invalid or duplicate name, or a device id equal to a
            service user name.
    """
    prefix = topic_prefix(federation)
    holders = _check_holders(keyholders, keyholder_user)
    workers = worker_users(aggregator_user, aggregator_workers)
    devices = _check_users(device_ids, aggregator_user, [*holders, *workers])
    grants: dict[str, tuple[TopicGrant, ...]] = {
        aggregator_user: (
            TopicGrant(access="write", topic=prefix + "model/+"),
            TopicGrant(access="write", topic=prefix + "round"),
            TopicGrant(access="read", topic=prefix + "updates/+"),
            TopicGrant(access="read", topic=prefix + "updates/+/+"),  # sharded rounds
            TopicGrant(access="write", topic=prefix + "ack/+"),
            TopicGrant(access="read", topic=prefix + "status/+"),
            TopicGrant(access="write", topic=prefix + KEYHOLDER_REQUEST_TOPIC),
            TopicGrant(access="read", topic=keyholder_result_topic(federation, "+")),
            # witness relay: members' gap notices in, devices' signed updates out
            TopicGrant(access="read", topic=prefix + KEYHOLDER_GAP_TOPIC.format(holder="+")),
            TopicGrant(access="write", topic=prefix + KEYHOLDER_RELAY_TOPIC.format(holder="+")),
            # aggregator workers and their root (one identity): control and partial sums
            TopicGrant(access="readwrite", topic=prefix + "aggregator/control"),
            TopicGrant(access="readwrite", topic=prefix + "aggregator/partial/+"),
        ),
    }
    for worker in workers:
        grants[worker] = grants[aggregator_user]
    for holder in holders:
        grants[holder] = (
            # read-only witness of the ciphertexts: a key holder decrypts a
            # sum only if it can rebuild it from the devices' own updates
            TopicGrant(access="read", topic=prefix + "updates/+"),
            TopicGrant(access="read", topic=prefix + "updates/+/+"),  # sharded rounds
            TopicGrant(access="read", topic=prefix + KEYHOLDER_REQUEST_TOPIC),
            TopicGrant(access="write", topic=keyholder_result_topic(federation, holder)),
            # the commit phase: each member's one signed request digest per round
            TopicGrant(access="read", topic=prefix + KEYHOLDER_COMMIT_TOPIC.format(holder="+")),
            TopicGrant(
                access="write",
                topic=prefix + KEYHOLDER_COMMIT_TOPIC.format(holder=_check_name(holder, "id")),
            ),
            # the witness relay: its own gap notices out, updates it missed in
            TopicGrant(access="write", topic=prefix + KEYHOLDER_GAP_TOPIC.format(holder=holder)),
            TopicGrant(access="read", topic=prefix + KEYHOLDER_RELAY_TOPIC.format(holder=holder)),
        )
    for device in devices:
        grants[device] = (
            TopicGrant(access="read", topic=prefix + "model/+"),
            TopicGrant(access="read", topic=prefix + "round"),
            TopicGrant(access="write", topic=f"{prefix}updates/{device}"),
            # a round over aggregator workers: its shard's topic (workers check
            # the shard is the device's own, so any other shard only loses it)
            TopicGrant(access="write", topic=f"{prefix}updates/+/{device}"),
            TopicGrant(access="read", topic=f"{prefix}ack/{device}"),
            TopicGrant(access="write", topic=f"{prefix}status/{device}"),
        )
    return grants


def _check_holders(keyholders: Iterable[str] | None, keyholder_user: str) -> list[str]:
    if keyholders is None:
        return [_check_name(keyholder_user, "key holder user")]
    if isinstance(keyholders, str):
        raise ConfigError("keyholders must be a list of ids, not one string")
    holders: list[str] = []
    for holder in keyholders:
        _check_name(holder, "key holder id")
        if holder in holders:
            raise ConfigError(f"key holder id {holder!r} is listed twice")
        holders.append(holder)
    if not holders:
        raise ConfigError("at least one key holder is needed")
    return holders


def worker_users(aggregator_user: str, workers: int) -> list[str]:
    """The broker users of a sharded aggregator's workers: ``{aggregator_user}-worker-{K}``."""
    if not 0 <= workers <= 256:
        raise ConfigError(f"aggregator workers must be in 0..256, got {workers}")
    return [_check_name(f"{aggregator_user}-worker-{k}", "worker user") for k in range(workers)]


def _check_users(
    device_ids: Iterable[str], aggregator_user: str, holders: Sequence[str]
) -> list[str]:
    _check_name(aggregator_user, "aggregator user")
    if aggregator_user in holders:
        raise ConfigError("the aggregator and the key holder need different broker users")
    if isinstance(device_ids, str):
        raise ConfigError("device_ids must be a list of ids, not one string")
    devices: list[str] = []
    seen: set[str] = set()
    for device in device_ids:
        _check_name(device, "device id")
        if device in seen:
            raise ConfigError(f"device id {device!r} is listed twice")
        if device == aggregator_user or device in holders:
            raise ConfigError(f"device id {device!r} collides with a service user name")
        seen.add(device)
        devices.append(device)
    return devices


def hash_password(password: str, *, salt: bytes, iterations: int = DEFAULT_ITERATIONS) -> str:
    """Return Mosquitto 2's ``$7$iterations$salt$hash`` line part for ``password``.

    Args:
        password: the plaintext.
        salt: 12 random bytes (Mosquitto's length; any length verifies).
        iterations: PBKDF2 iterations (>= 1).
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if not salt:
        raise ValueError("salt must not be empty")
    digest = hashlib.pbkdf2_hmac(
        "sha512", password.encode("utf-8"), salt, iterations, _PBKDF2_HASH_BYTES
    )
    return "$7${}${}${}".format(
        iterations,
        base64.b64encode(salt).decode("ascii"),
        base64.b64encode(digest).decode("ascii"),
    )


def verify_password(password: str, hashed: str) -> bool:
    """Check ``password`` against a ``$7$`` hash (as written by mosquitto_passwd).

    Raises:
        ValueError: ``hashed`` is not in the ``$7$`` format.
    """
    parts = hashed.split("$")
    if len(parts) != 5 or parts[0] or parts[1] != "7":
        raise ValueError("not a Mosquitto $7$ (PBKDF2-SHA512) hash")
    try:
        iterations = int(parts[2])
        salt = base64.b64decode(parts[3], validate=True)
        expected = base64.b64decode(parts[4], validate=True)
    except ValueError as exc:
        raise ValueError(f"malformed $7$ hash: {exc}") from exc
    digest = hashlib.pbkdf2_hmac(
        "sha512", password.encode("utf-8"), salt, iterations, len(expected)
    )
    return hmac.compare_digest(digest, expected)


def render_password_file(hashes: Mapping[str, str]) -> str:
    """Return a Mosquitto password file: ``user:$7$...`` lines, sorted by user."""
    return "".join(f"{user}:{hashes[user]}\n" for user in sorted(hashes))


def render_acl(
    grants: Mapping[str, tuple[TopicGrant, ...]],
    *,
    federation: str,
    generator: str = "edgefl broker acl",
) -> str:
    """Return a Mosquitto ACL file with one ``user`` block per broker user.

    No line precedes the first ``user`` block, so anonymous clients (if the
    broker ever allowed them) get nothing. ``generator`` names the command
    in the header comment.
    """
    lines = [
        f"# edgefl ACL for federation {federation!r}: generated by `{generator}`.",
        "# Regenerate rather than edit; reload Mosquitto (SIGHUP) to apply.",
    ]
    for user in sorted(grants):
        lines.append("")
        lines.append(f"user {user}")
        lines.extend(f"topic {grant.access} {grant.topic}" for grant in grants[user])
    return "\n".join(lines) + "\n"


@dataclass(frozen=True, slots=True, kw_only=True)
class AuthFiles:
    """Where :meth:`BrokerAuth.write` put things."""

    password_file: Path
    acl_file: Path
    credentials_file: Path


@dataclass(frozen=True, slots=True, kw_only=True)
class BrokerAuth:
    """Everything a broker and its clients need for one federation.

    Attributes:
        federation: the federation name.
        roles: broker user -> ``"device"``, ``"aggregator"`` or ``"keyholder"``.
        passwords: broker user -> plaintext password. A provisioning secret:
            written only to the 0600 credentials file, never logged.
        password_file: the Mosquitto password file text (hashes only).
        acl_file: the Mosquitto ACL file text.
        grants: broker user -> topic grants.
    """

    federation: str
    roles: Mapping[str, Role]
    passwords: Mapping[str, str]
    password_file: str
    acl_file: str
    grants: Mapping[str, tuple[TopicGrant, ...]]

    def __repr__(self) -> str:  # never print the passwords
        return f"BrokerAuth(federation={self.federation!r}, users={sorted(self.roles)})"

    def credentials(self) -> dict[str, object]:
        """Return the provisioning document (contains the plaintext passwords)."""
        return {
            "format": CREDENTIALS_FORMAT,
            "federation": self.federation,
            "topic_prefix": topic_prefix(self.federation),
            "users": {
                user: {"role": self.roles[user], "password": self.passwords[user]}
                for user in sorted(self.roles)
            },
        }

    def write(self, out_dir: str | Path) -> AuthFiles:
        """Write ``passwd`` (0600), ``acl`` (0644) and ``credentials.json`` (0600).

        Each file is written to a temporary file in ``out_dir`` and renamed
        into place, so a broker reloading meanwhile sees the old or the new
        file, never half of one.
        """
        folder = Path(out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        files = AuthFiles(
            password_file=folder / "passwd",
            acl_file=folder / "acl",
            credentials_file=folder / "credentials.json",
        )
        _write_atomic(files.password_file, self.password_file, 0o600)
        _write_atomic(files.acl_file, self.acl_file, 0o644)
        text = json.dumps(self.credentials(), indent=2, sort_keys=True) + "\n"
        _write_atomic(files.credentials_file, text, 0o600)
        return files


def _write_atomic(path: Path, text: str, mode: int) -> None:
    atomic_write(path, text.encode("utf-8"), mode=mode)


def _new_password(rng: RandomSource) -> str:
    return base64.urlsafe_b64encode(rng.random_bytes(_PASSWORD_BYTES)).decode("ascii").rstrip("=")


def generate_broker_auth(
    federation: str,
    device_ids: Iterable[str],
    *,
    aggregator_user: str = DEFAULT_AGGREGATOR_USER,
    keyholder_user: str = DEFAULT_KEYHOLDER_USER,
    keyholders: Iterable[str] | None = None,
    aggregator_workers: int = 0,
    passwords: Mapping[str, str] | None = None,
    rng: RandomSource | None = None,
    iterations: int = DEFAULT_ITERATIONS,
) -> BrokerAuth:
    """Build the password file, the ACL and the credentials for a federation.

    Args:
        federation: federation name (``[A-Za-z0-9_-]{1,64}``).
        device_ids: device ids, each ``[A-Za-z0-9_-]{1,64}``, distinct.
        aggregator_user: broker user of the aggregator.
        keyholder_user: broker user of the key holder (when ``keyholders`` is None).
        keyholders: ids of a committee of key holders, each its own broker user.
        aggregator_workers: users for a sharded aggregator's workers (:func:`acl_grants`).
        passwords: passwords to keep (e.g. from an earlier credentials file);
            users of this federation without one get a fresh random password;
            entries for users no longer present are ignored (that is how a
            removed device loses access).
        rng: randomness for passwords and salts; the OS CSPRNG by default.
        iterations: PBKDF2 iterations written into each hash.

    Raises:
        ConfigError: invalid names, duplicates, or an empty given password.
    """
    source = rng if rng is not None else default_random()
    holders = None if keyholders is None else list(keyholders)
    grants = acl_grants(
        federation,
        device_ids,
        aggregator_user=aggregator_user,
        keyholder_user=keyholder_user,
        keyholders=holders,
        aggregator_workers=aggregator_workers,
    )
    roles: dict[str, Role] = {aggregator_user: "aggregator"}
    for worker in worker_users(aggregator_user, aggregator_workers):
        roles[worker] = "aggregator"
    for holder in holders if holders is not None else [keyholder_user]:
        roles[holder] = "keyholder"
    for user in grants:
        roles.setdefault(user, "device")
    given = dict(passwords or {})
    plain: dict[str, str] = {}
    hashes: dict[str, str] = {}
    for user in sorted(grants):
        password = given.get(user)
        if password is None:
            password = _new_password(source)
        elif not isinstance(password, str) or not password:
            raise ConfigError(f"the password given for {user!r} must be a non-empty string")
        plain[user] = password
        hashes[user] = hash_password(
            password, salt=source.random_bytes(_PBKDF2_SALT_BYTES), iterations=iterations
        )
    return BrokerAuth(
        federation=federation,
        roles=roles,
        passwords=plain,
        password_file=render_password_file(hashes),
        acl_file=render_acl(grants, federation=federation),
        grants=grants,
    )


def read_device_ids(path: str | Path) -> list[str]:
    """Read device ids from a file: one per line; blank lines and ``#`` comments skipped.

    Raises:
        ConfigError: the file cannot be read or holds an invalid id (with its line).
    """
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"cannot read devices file {path}: {exc}") from exc
    ids: list[str] = []
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if not _NAME_RE.fullmatch(line):
            raise ConfigError(f"{path}:{number}: invalid device id {line!r}")
        ids.append(line)
    return ids


def load_credentials(path: str | Path, *, federation: str | None = None) -> dict[str, str]:
    """Return ``user -> password`` from a credentials file written by :meth:`BrokerAuth.write`.

    Raises:
        ConfigError: unreadable, not this format, or for another federation.
    """
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ConfigError(f"cannot read credentials file {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != CREDENTIALS_FORMAT:
        raise ConfigError(f"{path} is not an edgefl credentials file (format {CREDENTIALS_FORMAT})")
    if federation is not None and data.get("federation") != federation:
        raise ConfigError(
            f"{path} belongs to federation {data.get('federation')!r}, not {federation!r}"
        )
    users = data.get("users")
    if not isinstance(users, dict):
        raise ConfigError(f"{path}: 'users' must be a table")
    out: dict[str, str] = {}
    for user, entry in users.items():
        password = entry.get("password") if isinstance(entry, dict) else None
        if not isinstance(password, str) or not password:
            raise ConfigError(f"{path}: user {user!r} has no password")
        out[str(user)] = password
    return out
