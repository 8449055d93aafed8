"""``edgefl keys``: generate, show and precompute Paillier keys.

* ``edgefl keys generate --out DIR [--bits 3072]`` writes ``paillier_public.json``
  (share it with devices and the aggregator) and ``paillier_secret.json``
  (mode 0600, for the key holder only). The secret is sealed with a passphrase
  from ``--passphrase-file`` or ``$EDGEFL_KEY_PASSPHRASE``; storing it in clear
  needs ``--insecure-unencrypted``.
* ``edgefl keys show [--dir DIR | --public FILE]`` prints the fingerprint, size
  and, when present, the secret file's protection and permission check.
* ``edgefl keys precompute --public FILE --pool DIR --count N`` fills the
  device's obfuscator pool ahead of time.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from edge_sdk.errors import ConfigError

__all__ = ["register"]


def _public_path(args: argparse.Namespace) -> Path:
    if getattr(args, "public", None):
        return Path(args.public)
    if getattr(args, "dir", None):
        from edge_sdk.crypto.keyfile import PUBLIC_KEY_FILE

        return Path(args.dir) / PUBLIC_KEY_FILE
    raise ConfigError("give --dir DIR or --public FILE")


def _cmd_generate(args: argparse.Namespace) -> int:
    from edge_sdk.cli import emit
    from edge_sdk.crypto.keyfile import (
        PUBLIC_KEY_FILE,
        SECRET_KEY_FILE,
        read_passphrase,
        save_private_key,
        save_public_key,
    )
    from edge_sdk.crypto.keys import generate_keypair

    passphrase = read_passphrase(args.passphrase_file)
    if passphrase is None and not args.insecure_unencrypted:
        raise ConfigError(
            "no passphrase: set EDGEFL_KEY_PASSPHRASE or pass --passphrase-file FILE "
            "(or --insecure-unencrypted to store the secret key in clear)"
        )
    if passphrase is not None and args.insecure_unencrypted:
        raise ConfigError("--insecure-unencrypted contradicts the passphrase given")
    out = Path(args.out)
    public_path, secret_path = out / PUBLIC_KEY_FILE, out / SECRET_KEY_FILE
    if not args.force:
        for path in (public_path, secret_path):
            if path.exists():
                raise ConfigError(f"{path} exists; pass --force to replace it")
    out.mkdir(parents=True, exist_ok=True)
    public_key, private_key = generate_keypair(args.bits)
    save_private_key(
        private_key,
        secret_path,
        passphrase=passphrase,
        insecure_unencrypted=args.insecure_unencrypted,
        overwrite=args.force,
    )
    save_public_key(public_key, public_path, overwrite=args.force)
    data: dict[str, Any] = {
        "fingerprint": public_key.fingerprint,
        "bits": public_key.bits,
        "public_key": str(public_path),
        "secret_key": str(secret_path),
        "protection": "none" if args.insecure_unencrypted else "scrypt-aes256gcm",
    }
    text = (
        f"generated a {public_key.bits}-bit Paillier key\n"
        f"  fingerprint: {public_key.fingerprint}\n"
        f"  public key:  {public_path}  (give to devices and the aggregator)\n"
        f"  secret key:  {secret_path}  (key holder only; {data['protection']})"
    )
    emit(data, as_json=args.json, text=text)
    return 0


def _cmd_show(args: argparse.Namespace) -> int:
    from edge_sdk.cli import emit
    from edge_sdk.crypto.keyfile import SECRET_KEY_FILE, load_public_key, secret_key_protection

    public_path = _public_path(args)
    key = load_public_key(public_path, min_bits=args.min_bits)
    data: dict[str, Any] = {
        "fingerprint": key.fingerprint,
        "bits": key.bits,
        "public_key": str(public_path),
    }
    lines = [f"fingerprint: {key.fingerprint}", f"bits:        {key.bits}"]
    secret_path = public_path.parent / SECRET_KEY_FILE
    if secret_path.exists():
        info = secret_key_protection(secret_path)
        if info["fingerprint"] != key.fingerprint:
            raise ConfigError(f"{secret_path} belongs to another key ({info['fingerprint']})")
        data["secret_key"] = str(secret_path)
        data["protection"] = info["protection"]
        lines.append(f"secret key:  {secret_path} ({info['protection']}, permissions ok)")
    emit(data, as_json=args.json, text="\n".join(lines))
    return 0


def _cmd_precompute(args: argparse.Namespace) -> int:
    import time

    from edge_sdk.cli import emit
    from edge_sdk.crypto._parallel import default_workers
    from edge_sdk.crypto.keyfile import load_public_key
    from edge_sdk.crypto.pool import ObfuscatorPool

    if args.count < 0:
        raise ConfigError(f"--count must be >= 0, got {args.count}")
    key = load_public_key(_public_path(args), min_bits=args.min_bits)
    pool = ObfuscatorPool(args.pool, key)
    before = pool.size()
    started = time.perf_counter()
    workers = args.workers if args.workers is not None else default_workers()
    after = pool.fill(args.count, workers=workers)
    elapsed = time.perf_counter() - started
    data = {
        "fingerprint": key.fingerprint,
        "pool": str(pool.directory),
        "added": args.count,
        "size_before": before,
        "size": after,
        "seconds": round(elapsed, 3),
    }
    text = (
        f"added {args.count} obfuscators in {elapsed:.1f} s; pool {pool.directory} "
        f"now holds {after}"
    )
    emit(data, as_json=args.json, text=text)
    return 0


def register(parser: argparse.ArgumentParser) -> None:
    """Add the ``keys`` subcommands to ``parser``."""
    sub = parser.add_subparsers(dest="keys_command", metavar="SUBCOMMAND")

    gen = sub.add_parser("generate", help="generate a Paillier key pair into a directory")
    gen.add_argument("--out", required=True, metavar="DIR", help="output directory")
    gen.add_argument("--bits", type=int, default=2048, choices=(2048, 3072, 4096))
    gen.add_argument(
        "--passphrase-file",
        metavar="FILE",
        help="read the passphrase from FILE's first line (default: $EDGEFL_KEY_PASSPHRASE)",
    )
    gen.add_argument(
        "--insecure-unencrypted",
        action="store_true",
        help="store the secret key WITHOUT encryption (still mode 0600)",
    )
    gen.add_argument("--force", action="store_true", help="replace existing key files")
    gen.add_argument("--json", action="store_true", help="print the result as JSON")
    gen.set_defaults(func=_cmd_generate)

    show = sub.add_parser("show", help="show a key's fingerprint and the secret file's state")
    show.add_argument("--dir", metavar="DIR", help="key directory (from 'keys generate')")
    show.add_argument("--public", metavar="FILE", help="public key file")
    show.add_argument("--min-bits", type=int, default=2048, help=argparse.SUPPRESS)
    show.add_argument("--json", action="store_true", help="print the result as JSON")
    show.set_defaults(func=_cmd_show)

    pre = sub.add_parser("precompute", help="fill the obfuscator pool for a public key")
    pre.add_argument("--dir", metavar="DIR", help="key directory")
    pre.add_argument("--public", metavar="FILE", help="public key file")
    pre.add_argument("--pool", required=True, metavar="DIR", help="pool root directory")
    pre.add_argument("--count", type=int, required=True, help="obfuscators to add")
    pre.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: all cores)"
    )
    pre.add_argument("--min-bits", type=int, default=2048, help=argparse.SUPPRESS)
    pre.add_argument("--json", action="store_true", help="print the result as JSON")
    pre.set_defaults(func=_cmd_precompute)
