"""A small certificate authority for the broker's mutual-TLS identities.

One CA signs every certificate of a federation's broker set-up:

* ``device``: a client certificate whose CN is the device id;
* ``aggregator``: the aggregator's client certificate (CN ``aggregator`` by
  convention, the ACL's default aggregator user);
* ``keyholder``: one client certificate per member of the key-holder
  committee, CN = the holder id (``keyholder-1``, ``keyholder-2``...);
* ``broker``: the server certificate, with ``localhost`` and ``127.0.0.1``
  plus the given DNS names / IP addresses as subject alternative names.

The CN is the identity: Mosquitto's ``use_identity_as_username`` makes it the
user the ACL sees and ``use_username_as_clientid`` makes it the client id, so
a certificate speaks for exactly one party. Ids follow the protocol's id
pattern (``[A-Za-z0-9_-]{1,64}``) and share one namespace across roles.

Layout of a CA folder (``edgefl pki init --dir DIR``):

==================  ======  ==============================================
file                mode    content
==================  ======  ==============================================
``ca.crt``          0644    the CA certificate (give it to every party)
``ca.key``          0600    the CA private key (PKCS#8; sealed with a
                            passphrase when one is given)
``index.json``      0644    every certificate issued: serial, id, role,
                            validity, SANs, revocation
``crl.pem``         0644    the certificate revocation list (Mosquitto's
                            ``crlfile``)
``certs/ID.crt``    0644    issued certificates
``private/ID.key``  0600    their private keys (move each to its owner)
==================  ======  ==============================================

Keys are ECDSA P-256 by default: Mosquitto 2.0.11 on OpenSSL 3 accepts both
P-256 and Ed25519 client certificates (both are tested), but P-256 is the
one every TLS 1.2 stack on small devices (mbedTLS, wolfSSL, older OpenSSL)
also speaks. Ed25519 is available with ``key_type="ed25519"``.

The CRL has a ``next_update``: once it passes, OpenSSL treats the CRL as
expired and the broker refuses EVERY client certificate. Rewrite it
(:meth:`CertificateAuthority.write_crl`, ``edgefl pki crl``) well before,
for example daily from cron, and reload Mosquitto (SIGHUP).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import fcntl
import ipaddress
import json
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, cast, get_args

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_sdk._fs import atomic_write
from edge_sdk.errors import ConfigError, EdgeFLError
from edge_sdk.ids import ID_PATTERN

__all__ = [
    "CA_PASSPHRASE_ENV",
    "DEFAULT_CA_DAYS",
    "DEFAULT_CERT_DAYS",
    "DEFAULT_CRL_DAYS",
    "ROLES",
    "CaMissingError",
    "CertRecord",
    "CertificateAuthority",
    "IssuedCert",
    "KeyType",
    "PkiError",
    "Role",
    "check_id",
    "read_ca_passphrase",
]

Role = Literal["device", "aggregator", "keyholder", "broker"]
KeyType = Literal["ec-p256", "ed25519"]
ROLES: tuple[Role, ...] = get_args(Role)
KEY_TYPES: tuple[KeyType, ...] = get_args(KeyType)

CA_PASSPHRASE_ENV = "EDGEFL_CA_PASSPHRASE"
DEFAULT_CA_DAYS = 3650  # ten years: re-keying a CA means re-issuing every certificate
DEFAULT_CERT_DAYS = 397  # the CA/Browser forum's ceiling for server certs; renew yearly
DEFAULT_CRL_DAYS = 30  # rewrite it (cron) well before: an expired CRL locks everyone out
INDEX_FORMAT = 1
_CLOCK_SKEW = dt.timedelta(minutes=5)
_BROKER_DEFAULT_HOSTS = ("localhost", "127.0.0.1")
_DNS_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")

PrivateKey = ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey


class PkiError(EdgeFLError):
    """A PKI operation failed (CA unreadable, id exists, unknown id...)."""

    reason = "pki"


class CaMissingError(PkiError, ConfigError):
    """The folder given holds no CA: a configuration error (CLI exit code 2)."""

    reason = "ca_missing"


def read_ca_passphrase(passphrase_file: str | os.PathLike[str] | None = None) -> bytes | None:
    """Return the CA passphrase from a file (first line) or ``$EDGEFL_CA_PASSPHRASE``.

    The file wins over the environment; None when neither gives one.

    Raises:
        ConfigError: the file cannot be read or its first line is empty.
    """
    if passphrase_file is not None:
        try:
            text = Path(passphrase_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise ConfigError(f"cannot read passphrase file {passphrase_file}: {exc}") from exc
        line = text.splitlines()[0] if text else ""
        if not line:
            raise ConfigError(f"passphrase file {passphrase_file} is empty")
        return line.encode("utf-8")
    value = os.environ.get(CA_PASSPHRASE_ENV)
    return value.encode("utf-8") if value else None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.timezone.utc).replace(microsecond=0)


def _iso(moment: dt.datetime) -> str:
    return moment.astimezone(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def _parse_iso(text: str) -> dt.datetime:
    return dt.datetime.fromisoformat(text.replace("Z", "+00:00"))


def check_id(value: object, what: str = "id") -> str:
    """Return ``value`` when it matches the protocol's id pattern.

    Raises:
        ConfigError: it does not.
    """
    if not isinstance(value, str) or not ID_PATTERN.fullmatch(value):
        raise ConfigError(f"{what} must match {ID_PATTERN.pattern}, got {value!r}")
    return value


def _check_days(days: object, what: str) -> int:
    if not isinstance(days, int) or isinstance(days, bool) or not 1 <= days <= 36_500:
        raise ConfigError(f"{what} must be a whole number of days in [1, 36500], got {days!r}")
    return days


def _new_key(key_type: KeyType) -> PrivateKey:
    if key_type == "ed25519":
        return ed25519.Ed25519PrivateKey.generate()
    return ec.generate_private_key(ec.SECP256R1())


def _sign_hash(key: PrivateKey) -> hashes.SHA256 | None:
    return None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()


def _key_pem(key: PrivateKey, passphrase: bytes | None) -> bytes:
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, encryption
    )


def _san_entries(hosts: Iterable[str]) -> list[x509.GeneralName]:
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for host in hosts:
        if host in seen:
            continue
        seen.add(host)
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return names


def _check_host(host: object) -> str:
    """Return ``host`` when it is an IP address or a DNS name (``*.`` wildcard allowed)."""
    if not isinstance(host, str) or not host or len(host) > 253:
        raise ConfigError(f"invalid DNS name or IP address {host!r}")
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(host)
        return host
    labels = host.split(".")
    if labels[0] == "*" and len(labels) > 2:
        labels = labels[1:]
    if not all(_DNS_LABEL.fullmatch(label) for label in labels):
        raise ConfigError(f"invalid DNS name {host!r}")
    return host


@dataclass(frozen=True, slots=True, kw_only=True)
class CertRecord:
    """One certificate in the CA's index.

    Attributes:
        serial: the serial number, lower-case hex.
        id: the subject CN (device id, ``aggregator``, holder id or broker name).
        role: ``device``, ``aggregator``, ``keyholder`` or ``broker``.
        not_before: start of validity (ISO 8601, UTC).
        not_after: end of validity (ISO 8601, UTC).
        hosts: subject alternative names (broker certificates only).
        cert_file: the certificate, relative to the CA folder.
        key_file: its private key, relative to the CA folder.
        revoked_at: when it was revoked (ISO 8601), or None.
    """

    serial: str
    id: str
    role: Role
    not_before: str
    not_after: str
    hosts: tuple[str, ...] = ()
    cert_file: str
    key_file: str
    revoked_at: str | None = None

    def status(self, now: dt.datetime | None = None) -> str:
        """``"revoked"``, ``"expired"`` or ``"valid"``."""
        if self.revoked_at is not None:
            return "revoked"
        if _parse_iso(self.not_after) <= (now or _now()):
            return "expired"
        return "valid"

    def to_dict(self) -> dict[str, Any]:
        """Return the JSON form kept in ``index.json`` (plus the current status)."""
        return {
            "serial": self.serial,
            "id": self.id,
            "role": self.role,
            "not_before": self.not_before,
            "not_after": self.not_after,
            "hosts": list(self.hosts),
            "cert_file": self.cert_file,
            "key_file": self.key_file,
            "revoked_at": self.revoked_at,
            "status": self.status(),
        }

    @classmethod
    def from_dict(cls, data: Any) -> CertRecord:
        """Parse one index entry.

        Raises:
            PkiError: a malformed entry.
        """
        try:
            role = data["role"]
            if role not in ROLES:
                raise ValueError(f"unknown role {role!r}")
            revoked = data.get("revoked_at")
            return cls(
                serial=str(data["serial"]),
                id=str(data["id"]),
                role=cast(Role, role),
                not_before=str(data["not_before"]),
                not_after=str(data["not_after"]),
                hosts=tuple(str(h) for h in data.get("hosts", ())),
                cert_file=str(data["cert_file"]),
                key_file=str(data["key_file"]),
                revoked_at=None if revoked is None else str(revoked),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PkiError(f"malformed index entry {data!r}: {exc}") from exc


@dataclass(frozen=True, slots=True, kw_only=True)
class IssuedCert:
    """Where :meth:`CertificateAuthority.issue` wrote a certificate and its key."""

    record: CertRecord
    cert: Path
    key: Path
    ca_cert: Path


class CertificateAuthority:
    """An existing CA folder (create one with :meth:`init`).

    Args:
        folder: the CA folder.
        passphrase: the CA key's passphrase, when it is sealed with one.

    Raises:
        PkiError: the folder holds no CA (``ca.crt``, ``ca.key``, ``index.json``).
    """

    def __init__(self, folder: str | Path, *, passphrase: bytes | None = None) -> None:
        self.folder = Path(folder)
        self._passphrase = passphrase
        missing = [p.name for p in (self.ca_cert, self.ca_key, self.index_file) if not p.is_file()]
        if missing:
            raise CaMissingError(
                f"no CA in {self.folder} (missing {', '.join(missing)}); "
                f"create one with: edgefl pki init --dir {self.folder}"
            )
        try:
            self.certificate = x509.load_pem_x509_certificate(self.ca_cert.read_bytes())
        except (OSError, ValueError) as exc:
            raise PkiError(f"cannot read the CA certificate {self.ca_cert}: {exc}") from exc
        meta = self._read_index()
        self.key_type: KeyType = meta["key_type"]

    # ------------------------------------------------------------------ paths

    @property
    def ca_cert(self) -> Path:
        """The CA certificate (PEM)."""
        return self.folder / "ca.crt"

    @property
    def ca_key(self) -> Path:
        """The CA private key (PEM, PKCS#8, mode 0600)."""
        return self.folder / "ca.key"

    @property
    def index_file(self) -> Path:
        """The index of issued certificates (JSON)."""
        return self.folder / "index.json"

    @property
    def crl_file(self) -> Path:
        """The certificate revocation list (PEM)."""
        return self.folder / "crl.pem"

    def cert_path(self, ident: str) -> Path:
        """Where the certificate of ``ident`` is written."""
        return self.folder / "certs" / f"{ident}.crt"

    def key_path(self, ident: str) -> Path:
        """Where the private key of ``ident`` is written."""
        return self.folder / "private" / f"{ident}.key"

    # --------------------------------------------------------------- creation

    @classmethod
    def init(
        cls,
        folder: str | Path,
        *,
        name: str = "edgefl CA",
        days: int = DEFAULT_CA_DAYS,
        key_type: KeyType = "ec-p256",
        passphrase: bytes | None = None,
        crl_days: int = DEFAULT_CRL_DAYS,
    ) -> CertificateAuthority:
        """Create a CA in ``folder`` (an empty CRL included) and return it.

        Args:
            folder: created when absent; must not hold a CA already.
            name: the CA's subject CN.
            days: CA validity.
            key_type: ``"ec-p256"`` (default) or ``"ed25519"``; used for every
                key this CA issues.
            passphrase: seal ``ca.key`` with it (PKCS#8, AES-256-CBC with a
                scrypt/PBKDF2-derived key: cryptography's best available).
            crl_days: validity of the first CRL.

        Raises:
            PkiError: a CA already exists there.
            ConfigError: invalid arguments.
        """
        root = Path(folder)
        _check_days(days, "CA validity")
        _check_days(crl_days, "CRL validity")
        if key_type not in KEY_TYPES:
            raise ConfigError(f"key type must be one of {', '.join(KEY_TYPES)}, got {key_type!r}")
        if not isinstance(name, str) or not name.strip() or len(name) > 64:
            raise ConfigError(f"CA name must be 1-64 characters, got {name!r}")
        if (root / "ca.key").exists() or (root / "ca.crt").exists():
            raise PkiError(f"a CA already exists in {root}", reason="ca_exists")
        root.mkdir(parents=True, exist_ok=True)
        key = _new_key(key_type)
        subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
        now = _now()
        public = key.public_key()
        cert = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(subject)
            .public_key(public)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _CLOCK_SKEW)
            .not_valid_after(now + dt.timedelta(days=days))
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
            .sign(key, _sign_hash(key))
        )
        # the key first: a folder with ca.crt but no ca.key would look like a CA
        atomic_write(root / "ca.key", _key_pem(key, passphrase), mode=0o600)
        atomic_write(root / "ca.crt", cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
        index: dict[str, Any] = {
            "format": INDEX_FORMAT,
            "key_type": key_type,
            "crl_number": 0,
            "certs": [],
        }
        atomic_write(root / "index.json", _index_bytes(index), mode=0o644)
        ca = cls(root, passphrase=passphrase)
        ca.write_crl(days=crl_days)
        return ca

    # ------------------------------------------------------------------ index

    def _read_index(self) -> dict[str, Any]:
        try:
            data = json.loads(self.index_file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise PkiError(f"cannot read the CA index {self.index_file}: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != INDEX_FORMAT:
            raise PkiError(f"{self.index_file} is not an edgefl CA index (format {INDEX_FORMAT})")
        if data.get("key_type") not in KEY_TYPES or not isinstance(data.get("certs"), list):
            raise PkiError(f"{self.index_file}: malformed (key_type / certs)")
        return data

    @contextlib.contextmanager
    def _locked(self) -> Iterator[dict[str, Any]]:
        """Hold the CA lock; yield the index, written back when the block succeeds."""
        lock_path = self.folder / ".lock"
        with lock_path.open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                data = self._read_index()
                yield data
                atomic_write(self.index_file, _index_bytes(data), mode=0o644)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def records(self) -> list[CertRecord]:
        """Every certificate this CA issued, oldest first."""
        return [CertRecord.from_dict(entry) for entry in self._read_index()["certs"]]

    def find(self, ident: str) -> CertRecord | None:
        """The newest non-revoked certificate of ``ident`` (expired ones included)."""
        live = [r for r in self.records() if r.id == ident and r.revoked_at is None]
        return live[-1] if live else None

    # ---------------------------------------------------------------- signing

    def _load_key(self) -> PrivateKey:
        try:
            pem = self.ca_key.read_bytes()
        except OSError as exc:
            raise PkiError(f"cannot read the CA key {self.ca_key}: {exc}") from exc
        try:
            key = serialization.load_pem_private_key(pem, password=self._passphrase)
        except TypeError as exc:
            if self._passphrase is None:
                raise ConfigError(
                    f"the CA key {self.ca_key} is sealed with a passphrase: set "
                    f"{CA_PASSPHRASE_ENV} or pass --passphrase-file FILE"
                ) from exc
            raise PkiError(f"the CA key {self.ca_key} is not sealed; give no passphrase") from exc
        except ValueError as exc:
            raise PkiError(
                f"cannot open the CA key {self.ca_key} (wrong passphrase?)",
                reason="ca_key",
            ) from exc
        if not isinstance(key, (ec.EllipticCurvePrivateKey, ed25519.Ed25519PrivateKey)):
            raise PkiError(f"the CA key {self.ca_key} is neither EC nor Ed25519")
        return key

    def issue(
        self,
        role: Role,
        ident: str,
        *,
        days: int = DEFAULT_CERT_DAYS,
        hosts: Sequence[str] = (),
    ) -> IssuedCert:
        """Issue a certificate (and a fresh key) for ``ident`` in ``role``.

        Args:
            role: ``device``, ``aggregator``, ``keyholder`` (client
                certificates, extended key usage clientAuth) or ``broker``
                (server certificate, serverAuth).
            ident: the CN: device id, aggregator name, holder id or broker
                name; unique among this CA's non-revoked certificates.
            days: validity (capped at the CA's own expiry).
            hosts: broker only: DNS names or IP addresses added to the SAN
                list after ``localhost`` and ``127.0.0.1``.

        Raises:
            ConfigError: invalid role, id, validity or host name.
            PkiError: ``ident`` already has a non-revoked certificate.
        """
        if role not in ROLES:
            raise ConfigError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
        check_id(ident, f"{role} id")
        _check_days(days, "certificate validity")
        if hosts and role != "broker":
            raise ConfigError("DNS names / IP addresses are for broker certificates only")
        san_hosts = tuple(dict.fromkeys([*_BROKER_DEFAULT_HOSTS, *map(_check_host, hosts)]))
        ca_key = self._load_key()
        with self._locked() as index:
            for entry in index["certs"]:
                if entry["id"] == ident and entry.get("revoked_at") is None:
                    raise PkiError(
                        f"{ident!r} already has a certificate (serial {entry['serial']}, "
                        f"role {entry['role']}); revoke it first to issue a new one",
                        reason="id_exists",
                    )
            key = _new_key(self.key_type)
            now = _now()
            not_after = min(
                now + dt.timedelta(days=days), self.certificate.not_valid_after_utc
            ).replace(microsecond=0)
            serial = x509.random_serial_number()
            usage = (
                ExtendedKeyUsageOID.SERVER_AUTH
                if role == "broker"
                else ExtendedKeyUsageOID.CLIENT_AUTH
            )
            builder = (
                x509.CertificateBuilder()
                .subject_name(
                    x509.Name(
                        [
                            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, role),
                            x509.NameAttribute(NameOID.COMMON_NAME, ident),
                        ]
                    )
                )
                .issuer_name(self.certificate.subject)
                .public_key(key.public_key())
                .serial_number(serial)
                .not_valid_before(now - _CLOCK_SKEW)
                .not_valid_after(not_after)
                .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
                .add_extension(
                    x509.KeyUsage(
                        digital_signature=True,
                        content_commitment=False,
                        key_encipherment=False,
                        data_encipherment=False,
                        key_agreement=False,
                        key_cert_sign=False,
                        crl_sign=False,
                        encipher_only=False,
                        decipher_only=False,
                    ),
                    critical=True,
                )
                .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
                .add_extension(
                    x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
                )
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                    critical=False,
                )
            )
            if role == "broker":
                builder = builder.add_extension(
                    x509.SubjectAlternativeName(_san_entries(san_hosts)), critical=False
                )
            cert = builder.sign(ca_key, _sign_hash(ca_key))
            cert_path, key_path = self.cert_path(ident), self.key_path(ident)
            key_path.parent.mkdir(mode=0o700, exist_ok=True)
            atomic_write(key_path, _key_pem(key, None), mode=0o600)
            atomic_write(cert_path, cert.public_bytes(serialization.Encoding.PEM), mode=0o644)
            record = CertRecord(
                serial=format(serial, "x"),
                id=ident,
                role=role,
                not_before=_iso(now - _CLOCK_SKEW),
                not_after=_iso(not_after),
                hosts=san_hosts if role == "broker" else (),
                cert_file=str(cert_path.relative_to(self.folder)),
                key_file=str(key_path.relative_to(self.folder)),
            )
            entry = record.to_dict()
            del entry["status"]
            index["certs"].append(entry)
        return IssuedCert(record=record, cert=cert_path, key=key_path, ca_cert=self.ca_cert)

    def revoke(
        self,
        *,
        ident: str | None = None,
        serial: str | None = None,
        crl_days: int = DEFAULT_CRL_DAYS,
    ) -> CertRecord:
        """Revoke a certificate by id (its non-revoked one) or by serial, then rewrite the CRL.

        The broker refuses the certificate once it has reloaded the CRL
        (SIGHUP). Its files stay in place until the id is issued again.

        Raises:
            ConfigError: neither or both of ``ident`` and ``serial``.
            PkiError: no such certificate, or it is already revoked.
        """
        if (ident is None) == (serial is None):
            raise ConfigError("revoke needs exactly one of: an id, a serial")
        _check_days(crl_days, "CRL validity")
        wanted = None if serial is None else _normal_serial(serial)
        if ident is not None:
            check_id(ident)
        self._load_key()  # fail before changing anything when the key cannot be opened
        with self._locked() as index:
            matches = [
                (pos, entry)
                for pos, entry in enumerate(index["certs"])
                if (ident is not None and entry["id"] == ident and entry.get("revoked_at") is None)
                or (wanted is not None and entry["serial"] == wanted)
            ]
            if not matches:
                what = f"id {ident!r}" if ident is not None else f"serial {serial}"
                known = ident is not None and any(e["id"] == ident for e in index["certs"])
                raise PkiError(
                    f"no {'non-revoked ' if known else ''}certificate with {what} in {self.folder}",
                    reason="unknown_id",
                )
            pos, entry = matches[-1]
            if entry.get("revoked_at") is not None:
                raise PkiError(
                    f"certificate {entry['serial']} ({entry['id']}) is already revoked",
                    reason="already_revoked",
                )
            record = replace(CertRecord.from_dict(entry), revoked_at=_iso(_now()))
            updated = record.to_dict()
            del updated["status"]
            index["certs"][pos] = updated
        self.write_crl(days=crl_days)
        return record

    def write_crl(self, *, days: int = DEFAULT_CRL_DAYS) -> Path:
        """Write ``crl.pem``: every revoked certificate, valid for ``days``.

        Each CRL carries an increasing CRL number. Reload the broker (SIGHUP)
        after writing it.

        Raises:
            PkiError: the CA key cannot be opened.
        """
        _check_days(days, "CRL validity")
        ca_key = self._load_key()
        with self._locked() as index:
            number = int(index.get("crl_number", 0)) + 1
            index["crl_number"] = number
            now = _now()
            builder = (
                x509.CertificateRevocationListBuilder()
                .issuer_name(self.certificate.subject)
                .last_update(now - _CLOCK_SKEW)
                .next_update(now + dt.timedelta(days=days))
                .add_extension(x509.CRLNumber(number), critical=False)
                .add_extension(
                    x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()),
                    critical=False,
                )
            )
            for entry in index["certs"]:
                revoked_at = entry.get("revoked_at")
                if revoked_at is None:
                    continue
                builder = builder.add_revoked_certificate(
                    x509.RevokedCertificateBuilder()
                    .serial_number(int(entry["serial"], 16))
                    .revocation_date(_parse_iso(revoked_at))
                    .build()
                )
            crl = builder.sign(ca_key, _sign_hash(ca_key))
            atomic_write(self.crl_file, crl.public_bytes(serialization.Encoding.PEM), mode=0o644)
        return self.crl_file

    def __repr__(self) -> str:
        return f"CertificateAuthority(folder={str(self.folder)!r}, key_type={self.key_type!r})"


def _normal_serial(serial: str) -> str:
    text = serial.strip().lower().replace(":", "")
    text = text.removeprefix("0x")
    try:
        value = int(text, 16)
    except ValueError as exc:
        raise ConfigError(f"a serial is a hexadecimal number, got {serial!r}") from exc
    return format(value, "x")


def _index_bytes(index: dict[str, Any]) -> bytes:
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode("utf-8")
