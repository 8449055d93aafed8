"""``edgefl pki``: create a CA, issue and revoke certificates, write the CRL.

Every certificate's CN is its holder's identity: with the broker
configuration ``edgefl pki mosquitto`` writes, it is the user name the ACL
sees and the MQTT client id, so a certificate can only speak for, and only
open the session of, the party it names.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path
from typing import Any

from edge_sdk.cli import EXIT_OK

__all__ = ["register"]

# Mirrors of firmware_sim.pki's constants (a test keeps them equal), so that
# building the parser does not import cryptography: `edgefl --help` stays fast.
ROLES = ("device", "aggregator", "keyholder", "broker")
KEY_TYPES = ("ec-p256", "ed25519")
DEFAULT_CA_DAYS = 3650
DEFAULT_CERT_DAYS = 397
DEFAULT_CRL_DAYS = 30


def _passphrase(args: argparse.Namespace) -> bytes | None:
    from firmware_sim.pki import read_ca_passphrase

    return read_ca_passphrase(args.passphrase_file)


def _open(args: argparse.Namespace) -> Any:
    from firmware_sim.pki import CertificateAuthority

    return CertificateAuthority(args.dir, passphrase=_passphrase(args))


def _cmd_init(args: argparse.Namespace) -> int:
    from edge_sdk.cli import emit
    from firmware_sim.pki import CertificateAuthority

    passphrase = _passphrase(args)
    ca = CertificateAuthority.init(
        args.dir,
        name=args.name,
        days=args.days,
        key_type=args.key_type,
        passphrase=passphrase,
        crl_days=args.crl_days,
    )
    result = {
        "dir": str(ca.folder),
        "ca_cert": str(ca.ca_cert),
        "ca_key": str(ca.ca_key),
        "crl": str(ca.crl_file),
        "key_type": ca.key_type,
        "sealed": passphrase is not None,
        "not_after": ca.certificate.not_valid_after_utc.isoformat(),
    }
    text = (
        f"CA created in {ca.folder} ({ca.key_type}, valid until "
        f"{ca.certificate.not_valid_after_utc:%Y-%m-%d})\n"
        f"certificate: {ca.ca_cert} (give it to every party)\n"
        f"private key: {ca.ca_key} (0600, "
        + ("sealed with the passphrase" if passphrase else "NOT sealed: keep it offline")
        + ")\n"
        f"CRL:         {ca.crl_file} (empty)\n"
        f"next: edgefl pki issue --dir {ca.folder} --role broker --id broker --dns HOST"
    )
    emit(result, as_json=args.json, text=text)
    return EXIT_OK


def _cmd_issue(args: argparse.Namespace) -> int:
    from edge_sdk.cli import emit

    ca = _open(args)
    hosts = [h.strip() for value in args.dns or () for h in value.split(",") if h.strip()]
    issued = ca.issue(args.role, args.id, days=args.days, hosts=hosts)
    record = issued.record
    result = {
        **record.to_dict(),
        "cert_file": str(issued.cert),
        "key_file": str(issued.key),
        "ca_file": str(issued.ca_cert),
    }
    lines = [
        f"issued {record.role} certificate for {record.id!r} "
        f"(serial {record.serial}, valid until {record.not_after})",
        f"certificate: {issued.cert}",
        f"private key: {issued.key} (0600; move it to its owner)",
    ]
    if record.role == "broker":
        lines.append(f"names:       {', '.join(record.hosts)}")
        lines.append("broker:      certfile/keyfile of the TLS listener; cafile = the CA")
    else:
        lines.append(
            f"transport:   ca_file = {issued.ca_cert}, cert_file = {issued.cert}, "
            f"key_file = {issued.key}"
        )
    emit(result, as_json=args.json, text="\n".join(lines))
    return EXIT_OK


def _cmd_revoke(args: argparse.Namespace) -> int:
    from edge_sdk.cli import emit

    ca = _open(args)
    record = ca.revoke(ident=args.id, serial=args.serial, crl_days=args.crl_days)
    result = {**record.to_dict(), "crl": str(ca.crl_file)}
    text = (
        f"revoked {record.role} certificate {record.serial} of {record.id!r}\n"
        f"CRL rewritten: {ca.crl_file}\n"
        "apply: reload Mosquitto (SIGHUP); to cut the revoked party's open connection too, "
        "also drop it from the ACL (edgefl pki mosquitto) before the reload"
    )
    emit(result, as_json=args.json, text=text)
    return EXIT_OK


def _cmd_crl(args: argparse.Namespace) -> int:
    from cryptography import x509

    from edge_sdk.cli import emit

    ca = _open(args)
    path = ca.write_crl(days=args.days)
    crl = x509.load_pem_x509_crl(path.read_bytes())
    number = crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number
    next_update = crl.next_update_utc
    revoked = sorted(format(entry.serial_number, "x") for entry in crl)
    result = {
        "crl": str(path),
        "crl_number": number,
        "revoked": revoked,
        "next_update": None if next_update is None else next_update.isoformat(),
    }
    text = (
        f"CRL #{number} written: {path} ({len(revoked)} revoked, next update "
        f"{next_update:%Y-%m-%d %H:%M} UTC)\n"
        "apply: reload Mosquitto (SIGHUP); rewrite it before the next update, or the "
        "broker refuses every certificate"
    )
    emit(result, as_json=args.json, text=text)
    return EXIT_OK


def _cmd_list(args: argparse.Namespace) -> int:
    from edge_sdk.cli import emit
    from firmware_sim.pki import CertificateAuthority

    ca = CertificateAuthority(args.dir)
    records = [r.to_dict() for r in ca.records()]
    if args.role:
        records = [r for r in records if r["role"] == args.role]
    rows = [f"{'id':<24} {'role':<10} {'status':<8} {'not after':<21} serial"]
    rows += [
        f"{r['id']:<24} {r['role']:<10} {r['status']:<8} {r['not_after']:<21} {r['serial']}"
        for r in records
    ]
    if not records:
        rows.append("(no certificates issued)")
    emit({"dir": str(ca.folder), "certs": records}, as_json=args.json, text="\n".join(rows))
    return EXIT_OK


def _cmd_mosquitto(args: argparse.Namespace) -> int:
    from edge_sdk._fs import atomic_write
    from edge_sdk.cli import emit
    from edge_sdk.errors import ConfigError
    from firmware_sim.acl import acl_grants, render_acl
    from firmware_sim.broker import TlsListener, render_mutual_tls_config
    from firmware_sim.pki import CertificateAuthority

    ca = CertificateAuthority(args.dir)
    valid = [r for r in ca.records() if r.status() == "valid"]
    by_role: dict[str, list[str]] = {}
    for record in valid:
        by_role.setdefault(record.role, []).append(record.id)
    # a sharded aggregator's workers have their own aggregator certificates,
    # {aggregator}-worker-0..N-1 (each its own session; the ACL grants them the same)
    worker_re = re.compile(r"(.+)-worker-(\d+)")
    every = by_role.get("aggregator", [])
    aggregators = [a for a in every if not worker_re.fullmatch(a)]
    holders = by_role.get("keyholder", [])
    brokers = [r for r in valid if r.role == "broker"]
    if len(aggregators) != 1:
        raise ConfigError(
            f"the CA needs exactly one valid aggregator certificate (besides its workers' "
            f"{{aggregator}}-worker-K), has {len(aggregators)}"
        )
    worker_ids = sorted(
        int(m.group(2))
        for a in every
        if (m := worker_re.fullmatch(a)) is not None and m.group(1) == aggregators[0]
    )
    if worker_ids != list(range(len(worker_ids))):
        raise ConfigError(
            f"the aggregator's worker certificates must be {aggregators[0]}-worker-0..N-1, "
            f"found workers {worker_ids}"
        )
    if not holders:
        raise ConfigError("the CA has no valid keyholder certificate (issue keyholder-1...)")
    server = next((r for r in brokers if r.id == args.broker_id), None)
    if server is None:
        raise ConfigError(
            f"no valid broker certificate {args.broker_id!r} "
            f"(issue one: edgefl pki issue --dir {args.dir} --role broker --id {args.broker_id})"
        )
    grants = acl_grants(
        args.federation,
        by_role.get("device", []),
        aggregator_user=aggregators[0],
        keyholders=holders,
        aggregator_workers=len(worker_ids),
    )
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    # the broker folder is self-contained: the CA folder (and its key) can stay offline
    crl_path = out / "crl.pem"
    tls = TlsListener(
        certfile=out / "server.crt",
        keyfile=out / "server.key",
        cafile=out / "ca.crt",
        crlfile=crl_path,
    )
    copies = (
        (ca.folder / server.cert_file, tls.certfile, 0o644),
        (ca.folder / server.key_file, tls.keyfile, 0o600),
        (ca.ca_cert, tls.cafile, 0o644),
        (ca.crl_file, crl_path, 0o644),
    )
    for source, target, mode in copies:
        if not source.is_file() and target.is_file():
            continue  # e.g. the server key, moved off the CA host after a first run
        try:
            data = source.read_bytes()
        except OSError as exc:
            raise ConfigError(f"cannot copy {source} into the broker folder: {exc}") from exc
        atomic_write(target, data, mode=mode)
    acl_path = out / "acl"
    conf_path = out / "mosquitto.conf"
    conf = render_mutual_tls_config(
        tls=tls,
        acl_file=acl_path,
        port=args.port,
        bind=args.bind,
        persistence_location=args.persistence,
    )
    acl_text = render_acl(grants, federation=args.federation, generator="edgefl pki mosquitto")
    atomic_write(acl_path, acl_text.encode(), mode=0o644)
    atomic_write(conf_path, conf.encode(), mode=0o644)
    result = {
        "federation": args.federation,
        "acl_file": str(acl_path),
        "config_file": str(conf_path),
        "ca_file": str(tls.cafile),
        "cert_file": str(tls.certfile),
        "key_file": str(tls.keyfile),
        "crl_file": str(crl_path),
        "users": sorted(grants),
        "aggregator": aggregators[0],
        "keyholders": holders,
        "devices": len(by_role.get("device", [])),
    }
    text = (
        f"federation {args.federation}: {result['devices']} devices, aggregator "
        f"{aggregators[0]!r}, key holders {', '.join(holders)}\n"
        f"ACL:    {acl_path} (user names = certificate CNs)\n"
        f"TLS:    {tls.cafile}, {tls.certfile}, {tls.keyfile} (0600), {crl_path}\n"
        f"config: {conf_path} (mutual TLS on port {args.port}, client id = certificate CN)\n"
        f"start:  mosquitto -c {conf_path}; after an ACL or CRL change: SIGHUP"
    )
    emit(result, as_json=args.json, text=text)
    return EXIT_OK


def _add_common(parser: argparse.ArgumentParser, *, signs: bool) -> None:
    parser.add_argument("--dir", type=Path, required=True, help="the CA folder")
    if signs:
        parser.add_argument(
            "--passphrase-file",
            type=Path,
            help="file whose first line is the CA key's passphrase (else $EDGEFL_CA_PASSPHRASE)",
        )
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def register(parser: argparse.ArgumentParser) -> None:
    """Add the ``pki`` subcommands to ``parser``."""
    sub = parser.add_subparsers(dest="pki_command", metavar="SUBCOMMAND")

    init = sub.add_parser(
        "init",
        help="create a CA (certificate, private key, index, empty CRL)",
        description="Create a CA in --dir: ca.crt, ca.key (0600; sealed with a passphrase from "
        "--passphrase-file or $EDGEFL_CA_PASSPHRASE when given), index.json and an empty "
        "crl.pem. Keys are ECDSA P-256 unless --key-type ed25519.",
    )
    _add_common(init, signs=True)
    init.add_argument("--name", default="edgefl CA", help="the CA's common name")
    init.add_argument(
        "--days", type=int, default=DEFAULT_CA_DAYS, help=f"validity (default {DEFAULT_CA_DAYS})"
    )
    init.add_argument(
        "--crl-days",
        type=int,
        default=DEFAULT_CRL_DAYS,
        help=f"validity of the CRL (default {DEFAULT_CRL_DAYS})",
    )
    init.add_argument(
        "--key-type", choices=KEY_TYPES, default="ec-p256", help="key type of every key"
    )
    init.set_defaults(func=_cmd_init)

    issue = sub.add_parser(
        "issue",
        help="issue a certificate and key for a device, the aggregator, a key holder or the broker",
        description="Issue a certificate whose CN is --id: a device id, the aggregator "
        "('aggregator', the ACL's default), a key holder id (keyholder-1, keyholder-2...) or "
        "the broker's name. Client certificates (device, aggregator, keyholder) carry "
        "clientAuth; the broker's serverAuth and the SANs localhost, 127.0.0.1 and --dns. "
        "Ids match [A-Za-z0-9_-]{1,64} and are unique among non-revoked certificates.",
    )
    _add_common(issue, signs=True)
    issue.add_argument("--role", choices=ROLES, required=True, help="what the certificate is for")
    issue.add_argument("--id", required=True, help="the identity (certificate CN)")
    issue.add_argument(
        "--dns",
        action="append",
        metavar="NAME",
        help="broker only: an extra DNS name or IP address (repeatable, or comma-separated)",
    )
    issue.add_argument(
        "--days",
        type=int,
        default=DEFAULT_CERT_DAYS,
        help=f"validity (default {DEFAULT_CERT_DAYS}, capped at the CA's)",
    )
    issue.set_defaults(func=_cmd_issue)

    revoke = sub.add_parser(
        "revoke",
        help="revoke a certificate by id or serial and rewrite the CRL",
        description="Revoke the non-revoked certificate of --id (or the one with --serial) and "
        "rewrite crl.pem. Reload Mosquitto (SIGHUP) to refuse it at the next handshake.",
    )
    _add_common(revoke, signs=True)
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--id", help="the identity (certificate CN)")
    which.add_argument("--serial", help="the serial number (hex)")
    revoke.add_argument(
        "--crl-days",
        type=int,
        default=DEFAULT_CRL_DAYS,
        help=f"validity of the new CRL (default {DEFAULT_CRL_DAYS})",
    )
    revoke.set_defaults(func=_cmd_revoke)

    crl = sub.add_parser(
        "crl",
        help="rewrite the CRL (run it regularly: an expired CRL locks every client out)",
        description="Rewrite crl.pem with every revoked certificate and a fresh next-update "
        "time, then reload Mosquitto (SIGHUP).",
    )
    _add_common(crl, signs=True)
    crl.add_argument(
        "--days",
        type=int,
        default=DEFAULT_CRL_DAYS,
        help=f"validity (default {DEFAULT_CRL_DAYS})",
    )
    crl.set_defaults(func=_cmd_crl)

    listing = sub.add_parser(
        "list",
        help="list issued certificates",
        description="List every certificate the CA issued: id, role, status (valid, expired, "
        "revoked), expiry and serial.",
    )
    _add_common(listing, signs=False)
    listing.add_argument("--role", choices=ROLES, help="only this role")
    listing.set_defaults(func=_cmd_list)

    mosq = sub.add_parser(
        "mosquitto",
        help="write the broker's mutual-TLS mosquitto.conf and ACL from the issued certificates",
        description="Write a self-contained broker folder --out: acl (one user per valid "
        "device, aggregator and key holder certificate: user name = CN), ca.crt, crl.pem, "
        "server.crt and server.key (0600, copies of the --broker-id certificate) and "
        "mosquitto.conf (a mutual-TLS listener with require_certificate, "
        "use_identity_as_username and use_username_as_clientid, the CRL, no anonymous "
        "access). Re-run after issuing or revoking, then SIGHUP the broker.",
    )
    _add_common(mosq, signs=False)
    mosq.add_argument("--federation", required=True, help="federation name ([A-Za-z0-9_-])")
    mosq.add_argument("--out", type=Path, required=True, help="output folder")
    mosq.add_argument("--broker-id", default="broker", help="the broker certificate's id")
    mosq.add_argument("--port", type=int, default=8883, help="listener port (default 8883)")
    mosq.add_argument("--bind", help="bind address (default: all interfaces)")
    mosq.add_argument(
        "--persistence",
        type=Path,
        default=Path("/var/lib/mosquitto"),
        help="persistence folder (default /var/lib/mosquitto)",
    )
    mosq.set_defaults(func=_cmd_mosquitto)
