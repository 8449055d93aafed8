"""Key files: the public key (shareable) and the secret key (encrypted at rest).

Public key file (JSON): ``{"format": "edgefl-paillier-public-key", "version": 1,
"bits": ..., "n": "<hex>", "fingerprint": "<hex sha-256>"}``. Loading
recomputes the fingerprint and rejects a mismatch (a corrupted or edited file).

Secret key file (JSON, mode 0600, refused when group/world accessible):
``{"format": "edgefl-paillier-secret-key", "version": 1, "fingerprint", "bits",
"n", "protection": "scrypt-aes256gcm" | "none", ...}``. With a passphrase the
primes are sealed with AES-256-GCM under a key derived by scrypt (random
16-byte salt, N=2^15, r=8, p=1 by default); the header fields are bound as
associated data, so pairing a secret with another public key is detected.
Unencrypted files exist only when explicitly asked for
(``insecure_unencrypted=True``).

Threat model: the secret key decrypts every individual update that ever
reached the aggregator. Keep it on the key holder only, never on a device.
"""

from __future__ import annotations

import base64
import json
import os
import stat
from pathlib import Path
from typing import Any

from edge_sdk._fs import atomic_write
from edge_sdk.crypto.keys import MIN_KEY_BITS, PaillierPrivateKey, PaillierPublicKey
from edge_sdk.errors import KeyFileError

__all__ = [
    "PASSPHRASE_ENV",
    "PUBLIC_KEY_FILE",
    "SECRET_KEY_FILE",
    "load_private_key",
    "load_public_key",
    "read_passphrase",
    "save_private_key",
    "save_public_key",
    "secret_key_protection",
]

PUBLIC_KEY_FILE = "paillier_public.json"
SECRET_KEY_FILE = "paillier_secret.json"
PASSPHRASE_ENV = "EDGEFL_KEY_PASSPHRASE"

_PUBLIC_FORMAT = "edgefl-paillier-public-key"
_SECRET_FORMAT = "edgefl-paillier-secret-key"
_SCRYPT_DEFAULT = {"n": 2**15, "r": 8, "p": 1}
# Bounds on scrypt parameters read from a file (a hostile file must not
# make us allocate gigabytes).
_SCRYPT_MAX_N = 2**20
_SCRYPT_MAX_RP = 64


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _unb64(text: Any, what: str) -> bytes:
    if not isinstance(text, str):
        raise KeyFileError(f"secret key file field {what!r} must be a base64 string")
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise KeyFileError(f"secret key file field {what!r} is not valid base64") from exc


def _atomic_write(path: Path, data: bytes, mode: int, *, overwrite: bool) -> None:
    path = Path(path)
    if path.exists() and not overwrite:
        raise KeyFileError(f"{path} exists; refusing to overwrite (pass overwrite=True / --force)")
    atomic_write(path, data, mode=mode)


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise KeyFileError(f"cannot read {what} {path}: {exc.strerror or exc}") from exc
    if len(raw) > 1 << 20:
        raise KeyFileError(f"{what} {path} is larger than 1 MiB")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise KeyFileError(f"{what} {path} is not valid JSON") from exc
    if not isinstance(data, dict):
        raise KeyFileError(f"{what} {path} must hold a JSON object")
    return data


def _parse_n(data: dict[str, Any], path: Path, min_bits: int) -> PaillierPublicKey:
    n_hex = data.get("n")
    if not isinstance(n_hex, str):
        raise KeyFileError(f"{path}: field 'n' must be a hex string")
    try:
        n = int(n_hex, 16)
    except ValueError as exc:
        raise KeyFileError(f"{path}: field 'n' is not hex") from exc
    if n.bit_length() < min_bits:
        raise KeyFileError(f"{path}: modulus has {n.bit_length()} bits, minimum is {min_bits}")
    try:
        key = PaillierPublicKey(n=n)
    except ValueError as exc:
        raise KeyFileError(f"{path}: invalid modulus: {exc}") from exc
    if data.get("fingerprint") != key.fingerprint:
        raise KeyFileError(f"{path}: fingerprint does not match the modulus (corrupted file?)")
    return key


def save_public_key(
    public_key: PaillierPublicKey, path: str | os.PathLike[str], *, overwrite: bool = False
) -> Path:
    """Write the public key file (mode 0644). Returns the path."""
    doc = {
        "format": _PUBLIC_FORMAT,
        "version": 1,
        "bits": public_key.bits,
        "n": format(public_key.n, "x"),
        "fingerprint": public_key.fingerprint,
    }
    target = Path(path)
    _atomic_write(target, (json.dumps(doc, indent=2) + "\n").encode(), 0o644, overwrite=overwrite)
    return target


def load_public_key(
    path: str | os.PathLike[str],
    *,
    expected_fingerprint: str | None = None,
    min_bits: int = MIN_KEY_BITS,
) -> PaillierPublicKey:
    """Read and verify a public key file.

    Args:
        path: the file.
        expected_fingerprint: if given, the key must have this fingerprint.
        min_bits: smallest modulus accepted.

    Raises:
        KeyFileError: unreadable, malformed, fingerprint mismatch, too small.
    """
    target = Path(path)
    data = _read_json(target, "public key file")
    if data.get("format") != _PUBLIC_FORMAT or data.get("version") != 1:
        raise KeyFileError(f"{target} is not a version-1 edgefl public key file")
    key = _parse_n(data, target, min_bits)
    if expected_fingerprint is not None and key.fingerprint != expected_fingerprint:
        raise KeyFileError(
            f"{target}: key fingerprint {key.fingerprint} is not the expected "
            f"{expected_fingerprint}"
        )
    return key


def _derive(passphrase: bytes, salt: bytes, n: int, r: int, p: int) -> bytes:
    from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

    return Scrypt(salt=salt, length=32, n=n, r=r, p=p).derive(passphrase)


def _aad(header: dict[str, Any]) -> bytes:
    return json.dumps(header, sort_keys=True, separators=(",", ":")).encode()


def _secret_payload(private_key: PaillierPrivateKey) -> bytes:
    width = (private_key.public_key.bits + 7) // 8
    return private_key.p.to_bytes(width, "big") + private_key.q.to_bytes(width, "big")


def save_private_key(
    private_key: PaillierPrivateKey,
    path: str | os.PathLike[str],
    *,
    passphrase: bytes | str | None,
    insecure_unencrypted: bool = False,
    overwrite: bool = False,
    scrypt_n: int = _SCRYPT_DEFAULT["n"],
) -> Path:
    """Write the secret key file, mode 0600, encrypted unless explicitly told not to.

    Args:
        private_key: the key.
        path: target file.
        passphrase: passphrase for scrypt + AES-256-GCM; ``None`` only with
            ``insecure_unencrypted=True``.
        insecure_unencrypted: store the primes in clear (explicit opt-in).
        overwrite: replace an existing file.
        scrypt_n: scrypt cost (power of two, default 2^15).

    Raises:
        ValueError: neither a passphrase nor the explicit insecure opt-in, or both.
        KeyFileError: the file exists and ``overwrite`` is False.
    """
    public_key = private_key.public_key
    header: dict[str, Any] = {
        "format": _SECRET_FORMAT,
        "version": 1,
        "bits": public_key.bits,
        "n": format(public_key.n, "x"),
        "fingerprint": public_key.fingerprint,
    }
    if insecure_unencrypted:
        if passphrase is not None:
            raise ValueError("give either a passphrase or insecure_unencrypted=True, not both")
        doc = dict(
            header, protection="none", p=format(private_key.p, "x"), q=format(private_key.q, "x")
        )
    else:
        if passphrase is None:
            raise ValueError(
                "a passphrase is required to save a secret key "
                "(or pass insecure_unencrypted=True explicitly)"
            )
        doc = _seal_payload(header, _secret_payload(private_key), passphrase, scrypt_n)
    target = Path(path)
    _atomic_write(target, (json.dumps(doc, indent=2) + "\n").encode(), 0o600, overwrite=overwrite)
    return target


def _seal_payload(
    header: dict[str, Any], payload: bytes, passphrase: bytes | str, scrypt_n: int
) -> dict[str, Any]:
    """The sealed document: ``header`` plus KDF parameters, nonce and AES-256-GCM ciphertext.

    The header (with the KDF parameters and nonce) is authenticated as associated data.
    Shared by secret key files and threshold share files.

    Raises:
        ValueError: an empty passphrase or a bad ``scrypt_n``.
    """
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    secret = passphrase.encode("utf-8") if isinstance(passphrase, str) else bytes(passphrase)
    if not secret:
        raise ValueError("the passphrase must not be empty")
    if scrypt_n < 2 or scrypt_n & (scrypt_n - 1) or scrypt_n > _SCRYPT_MAX_N:
        raise ValueError(f"scrypt_n must be a power of two in [2, 2^20], got {scrypt_n}")
    salt, nonce = os.urandom(16), os.urandom(12)
    cost_r, cost_p = _SCRYPT_DEFAULT["r"], _SCRYPT_DEFAULT["p"]
    key = _derive(secret, salt, scrypt_n, cost_r, cost_p)
    kdf = {"name": "scrypt", "n": scrypt_n, "r": cost_r, "p": cost_p, "salt": _b64(salt)}
    sealed_header = dict(header, protection="scrypt-aes256gcm", kdf=kdf, nonce=_b64(nonce))
    ciphertext = AESGCM(key).encrypt(nonce, payload, _aad(sealed_header))
    return dict(sealed_header, ciphertext=_b64(ciphertext))


def _check_permissions(path: Path) -> None:
    try:
        st = os.stat(path)
    except OSError as exc:
        raise KeyFileError(f"cannot read secret key file {path}: {exc.strerror or exc}") from exc
    if st.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise KeyFileError(
            f"secret key file {path} is accessible by group/others "
            f"(mode {stat.S_IMODE(st.st_mode):04o}); run: chmod 600 {path}",
            reason="key_file_permissions",
        )


def secret_key_protection(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Describe a secret key file without decrypting it (permissions checked).

    Returns:
        ``{"fingerprint", "bits", "protection"}``.
    """
    target = Path(path)
    _check_permissions(target)
    data = _read_json(target, "secret key file")
    if data.get("format") != _SECRET_FORMAT or data.get("version") != 1:
        raise KeyFileError(f"{target} is not a version-1 edgefl secret key file")
    return {
        "fingerprint": data.get("fingerprint"),
        "bits": data.get("bits"),
        "protection": data.get("protection"),
    }


def load_private_key(
    path: str | os.PathLike[str],
    *,
    passphrase: bytes | str | None,
    allow_unencrypted: bool = False,
    min_bits: int = MIN_KEY_BITS,
) -> PaillierPrivateKey:
    """Read, check and (if sealed) decrypt a secret key file.

    Args:
        path: the file.
        passphrase: the passphrase (for sealed files).
        allow_unencrypted: accept a file saved with ``insecure_unencrypted``.
        min_bits: smallest modulus accepted.

    Raises:
        KeyFileError: group/world accessible, malformed, wrong passphrase,
            unencrypted without ``allow_unencrypted``, or primes not matching n.
    """
    target = Path(path)
    _check_permissions(target)
    data = _read_json(target, "secret key file")
    if data.get("format") != _SECRET_FORMAT or data.get("version") != 1:
        raise KeyFileError(f"{target} is not a version-1 edgefl secret key file")
    public_key = _parse_n(data, target, min_bits)
    if data.get("bits") != public_key.bits:
        raise KeyFileError(f"{target}: 'bits' does not match the modulus")
    protection = data.get("protection")
    if protection == "none":
        if not allow_unencrypted:
            raise KeyFileError(
                f"{target} holds an UNENCRYPTED secret key; pass allow_unencrypted=True "
                "(CLI: --insecure-unencrypted) to use it"
            )
        try:
            p, q = int(data["p"], 16), int(data["q"], 16)
        except (KeyError, TypeError, ValueError) as exc:
            raise KeyFileError(f"{target}: fields 'p' and 'q' must be hex strings") from exc
    elif protection == "scrypt-aes256gcm":
        if passphrase is None:
            raise KeyFileError(f"{target} is passphrase-protected; no passphrase given")
        p, q = _unseal(target, data, passphrase, public_key)
    else:
        raise KeyFileError(f"{target}: unknown protection {protection!r}")
    try:
        return PaillierPrivateKey(public_key, p, q)
    except ValueError as exc:
        raise KeyFileError(f"{target}: the primes do not match the modulus") from exc


def _unseal_payload(target: Path, data: dict[str, Any], passphrase: bytes | str) -> bytes:
    """Check the KDF parameters of a sealed file and decrypt its payload (key and share files).

    Raises:
        KeyFileError: bad parameters, wrong passphrase or a tampered file.
    """
    from cryptography.exceptions import InvalidTag
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    kdf = data.get("kdf")
    if not isinstance(kdf, dict) or kdf.get("name") != "scrypt":
        raise KeyFileError(f"{target}: missing or unknown 'kdf'")
    n, r, p = kdf.get("n"), kdf.get("r"), kdf.get("p")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in (n, r, p)):
        raise KeyFileError(f"{target}: scrypt parameters must be integers")
    assert isinstance(n, int) and isinstance(r, int) and isinstance(p, int)
    if not (
        2 <= n <= _SCRYPT_MAX_N
        and n & (n - 1) == 0
        and 1 <= r <= _SCRYPT_MAX_RP
        and 1 <= p <= _SCRYPT_MAX_RP
    ):
        raise KeyFileError(f"{target}: scrypt parameters out of bounds (n={n}, r={r}, p={p})")
    salt = _unb64(kdf.get("salt"), "kdf.salt")
    nonce = _unb64(data.get("nonce"), "nonce")
    sealed = _unb64(data.get("ciphertext"), "ciphertext")
    if len(nonce) != 12:
        raise KeyFileError(f"{target}: nonce must be 12 bytes")
    header = {k: v for k, v in data.items() if k != "ciphertext"}
    secret = passphrase.encode("utf-8") if isinstance(passphrase, str) else bytes(passphrase)
    key = _derive(secret, salt, n, r, p)
    try:
        payload = AESGCM(key).decrypt(nonce, sealed, _aad(header))
    except InvalidTag as exc:
        raise KeyFileError(
            f"{target}: wrong passphrase or tampered file", reason="key_file_passphrase"
        ) from exc
    return bytes(payload)


def _unseal(
    target: Path, data: dict[str, Any], passphrase: bytes | str, public_key: PaillierPublicKey
) -> tuple[int, int]:
    payload = _unseal_payload(target, data, passphrase)
    width = (public_key.bits + 7) // 8
    if len(payload) != 2 * width:
        raise KeyFileError(f"{target}: sealed payload has the wrong length")
    return int.from_bytes(payload[:width], "big"), int.from_bytes(payload[width:], "big")


def read_passphrase(
    passphrase_file: str | os.PathLike[str] | None = None, *, env: str = PASSPHRASE_ENV
) -> str | None:
    """Return the passphrase from a file (first line) or the environment, else None.

    The file wins over the environment variable. A trailing newline is removed.
    """
    if passphrase_file is not None:
        try:
            text = Path(passphrase_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise KeyFileError(f"cannot read passphrase file {passphrase_file}: {exc}") from exc
        line = text.splitlines()[0] if text else ""
        if not line:
            raise KeyFileError(f"passphrase file {passphrase_file} is empty")
        return line
    value = os.environ.get(env)
    return value if value else None
