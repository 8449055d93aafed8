"""The CA of `edgefl pki`: issue, revoke, CRL, file modes, CLI; and the generated broker config.

Broker behaviour with these certificates is in ``test_broker_identity.py``.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import stat
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from edge_sdk.cli import main
from edge_sdk.errors import ConfigError
from edge_sdk.transport import topic_matches
from firmware_sim import pki_cli
from firmware_sim.acl import (
    KEYHOLDER_RESULT_TOPIC,
    TopicGrant,
    acl_grants,
    generate_broker_auth,
    keyholder_result_topic,
)
from firmware_sim.broker import (
    MosquittoBroker,
    MosquittoOptions,
    TlsListener,
    find_mosquitto,
    render_mutual_tls_config,
)
from firmware_sim.pki import (
    CA_PASSPHRASE_ENV,
    DEFAULT_CA_DAYS,
    DEFAULT_CERT_DAYS,
    DEFAULT_CRL_DAYS,
    KEY_TYPES,
    ROLES,
    CaMissingError,
    CertificateAuthority,
    PkiError,
)

P = "edgefl/v1/fed/"


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _crl(ca: CertificateAuthority) -> x509.CertificateRevocationList:
    return x509.load_pem_x509_crl(ca.crl_file.read_bytes())


def _pki(*args: str) -> int:
    return main(["pki", *args], only=["pki"])


@pytest.fixture
def ca(tmp_path: Path) -> CertificateAuthority:
    return CertificateAuthority.init(tmp_path / "ca")


# ------------------------------------------------------------------ the CA


def test_init_writes_a_ca_with_private_key_modes(ca: CertificateAuthority) -> None:
    assert _mode(ca.ca_key) == 0o600
    assert _mode(ca.ca_cert) == 0o644
    assert _mode(ca.index_file) == 0o644
    cert = _cert(ca.ca_cert)
    assert cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    assert usage.key_cert_sign and usage.crl_sign
    cert.verify_directly_issued_by(cert)  # self-signed
    assert isinstance(cert.public_key(), ec.EllipticCurvePublicKey)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert abs(lifetime - dt.timedelta(days=DEFAULT_CA_DAYS)) < dt.timedelta(hours=1)
    # an empty CRL from the start: Mosquitto's crlfile can point at it at once
    assert len(_crl(ca)) == 0
    key = serialization.load_pem_private_key(ca.ca_key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)


def test_init_refuses_an_existing_ca(ca: CertificateAuthority) -> None:
    with pytest.raises(PkiError, match="already exists"):
        CertificateAuthority.init(ca.folder)


def test_opening_a_folder_without_a_ca_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(CaMissingError, match="edgefl pki init") as info:
        CertificateAuthority(tmp_path / "nothing")
    assert isinstance(info.value, ConfigError)


def test_sealed_ca_key_needs_its_passphrase(tmp_path: Path) -> None:
    sealed = CertificateAuthority.init(tmp_path / "ca", passphrase=b"correct horse")
    assert b"ENCRYPTED" in sealed.ca_key.read_bytes()
    with pytest.raises(TypeError):
        serialization.load_pem_private_key(sealed.ca_key.read_bytes(), password=None)
    with pytest.raises(ConfigError, match=CA_PASSPHRASE_ENV):
        CertificateAuthority(sealed.folder).issue("device", "d1")
    with pytest.raises(PkiError, match="wrong passphrase"):
        CertificateAuthority(sealed.folder, passphrase=b"wrong").issue("device", "d1")
    issued = CertificateAuthority(sealed.folder, passphrase=b"correct horse").issue("device", "d1")
    _cert(issued.cert).verify_directly_issued_by(_cert(sealed.ca_cert))
    # nothing was recorded by the failed attempts
    assert [r.id for r in sealed.records()] == ["d1"]


# ----------------------------------------------------------------- issuing


@pytest.mark.parametrize("role", ["device", "aggregator", "keyholder"])
def test_client_certificates_name_their_identity(ca: CertificateAuthority, role: Any) -> None:
    ident = {"device": "pi-17", "aggregator": "aggregator", "keyholder": "keyholder-2"}[role]
    issued = ca.issue(role, ident, days=30)
    cert = _cert(issued.cert)
    cert.verify_directly_issued_by(_cert(ca.ca_cert))
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == ident
    assert cert.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == role
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    with pytest.raises(x509.ExtensionNotFound):
        cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    lifetime = cert.not_valid_after_utc - dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(days=29) < lifetime <= dt.timedelta(days=30)
    assert format(cert.serial_number, "x") == issued.record.serial
    # the key is a fresh P-256 key matching the certificate, mode 0600 in a 0700 folder
    key = serialization.load_pem_private_key(issued.key.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    assert key.public_key().public_numbers() == cert.public_key().public_numbers()  # type: ignore[union-attr]
    assert _mode(issued.key) == 0o600
    assert _mode(issued.key.parent) == 0o700
    assert _mode(issued.cert) == 0o644


def test_broker_certificate_is_a_server_certificate_with_local_and_given_names(
    ca: CertificateAuthority,
) -> None:
    issued = ca.issue("broker", "broker", hosts=["mqtt.example.org", "10.0.0.7", "localhost"])
    cert = _cert(issued.cert)
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(eku) == [ExtendedKeyUsageOID.SERVER_AUTH]
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "mqtt.example.org"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.0.0.7"),
    ]
    assert issued.record.hosts == ("localhost", "127.0.0.1", "mqtt.example.org", "10.0.0.7")


def test_validity_is_capped_at_the_cas_own(tmp_path: Path) -> None:
    short = CertificateAuthority.init(tmp_path / "ca", days=10)
    cert = _cert(short.issue("device", "d1", days=DEFAULT_CERT_DAYS).cert)
    assert cert.not_valid_after_utc <= _cert(short.ca_cert).not_valid_after_utc


@pytest.mark.parametrize("bad", ["a/b", "", "x" * 65, "a+b", "#", "dé", "a b", 7])
def test_ids_follow_the_protocols_id_pattern(ca: CertificateAuthority, bad: Any) -> None:
    with pytest.raises(ConfigError, match="must match"):
        ca.issue("device", bad)
    assert ca.records() == []


@pytest.mark.parametrize(
    ("role", "kwargs", "reason"),
    [
        ("robot", {}, "role must be one of"),
        ("device", {"hosts": ["a.example"]}, "broker certificates only"),
        ("broker", {"hosts": ["bad_name.example"]}, "invalid DNS name"),
        ("broker", {"hosts": ["-x.example"]}, "invalid DNS name"),
        ("device", {"days": 0}, "validity"),
        ("device", {"days": True}, "validity"),
    ],
)
def test_invalid_issue_arguments_are_refused(
    ca: CertificateAuthority, role: Any, kwargs: dict[str, Any], reason: str
) -> None:
    with pytest.raises(ConfigError, match=reason):
        ca.issue(role, "d1", **kwargs)


def test_an_id_has_one_live_certificate_across_roles(ca: CertificateAuthority) -> None:
    ca.issue("device", "d1")
    with pytest.raises(PkiError, match="already has a certificate") as info:
        ca.issue("device", "d1")
    assert info.value.reason == "id_exists"
    with pytest.raises(PkiError, match="already has a certificate"):
        ca.issue("keyholder", "d1")  # one namespace: CN = ACL user = client id


def test_revoked_id_can_be_issued_again_with_a_new_serial(ca: CertificateAuthority) -> None:
    first = ca.issue("device", "d1")
    ca.revoke(ident="d1")
    second = ca.issue("device", "d1")
    assert second.record.serial != first.record.serial
    assert [(r.id, r.status()) for r in ca.records()] == [("d1", "revoked"), ("d1", "valid")]
    found = ca.find("d1")
    assert found is not None and found.serial == second.record.serial


# ---------------------------------------------------------- revoke and CRL


def test_revocation_lists_exactly_the_revoked_serials(ca: CertificateAuthority) -> None:
    keep = ca.issue("device", "keep")
    gone = ca.issue("device", "gone")
    other = ca.issue("keyholder", "keyholder-1")
    ca.revoke(ident="gone")
    serial_text = ":".join(
        other.record.serial.upper().zfill(40)[i : i + 2] for i in range(0, 40, 2)
    )
    ca.revoke(serial=serial_text)  # colons and upper case as openssl prints them
    crl = _crl(ca)
    revoked = {format(entry.serial_number, "x") for entry in crl}
    assert revoked == {gone.record.serial, other.record.serial}
    assert keep.record.serial not in revoked
    ca_cert = _cert(ca.ca_cert)
    assert crl.is_signature_valid(ca_cert.public_key())  # type: ignore[arg-type]
    assert crl.issuer == ca_cert.subject
    statuses = {r.id: r.status() for r in ca.records()}
    assert statuses == {"keep": "valid", "gone": "revoked", "keyholder-1": "revoked"}


def test_crl_numbers_increase_and_next_update_is_configurable(ca: CertificateAuthority) -> None:
    def number() -> int:
        return _crl(ca).extensions.get_extension_for_class(x509.CRLNumber).value.crl_number

    first = number()
    ca.write_crl(days=3)
    assert number() == first + 1
    crl = _crl(ca)
    assert crl.next_update_utc is not None
    remaining = crl.next_update_utc - dt.datetime.now(dt.timezone.utc)
    assert dt.timedelta(days=2, hours=23) < remaining <= dt.timedelta(days=3)
    ca.issue("device", "d1")
    ca.revoke(ident="d1", crl_days=DEFAULT_CRL_DAYS)
    assert number() == first + 2


def test_revoke_errors_name_the_problem(ca: CertificateAuthority) -> None:
    with pytest.raises(PkiError, match="no certificate with id 'ghost'") as info:
        ca.revoke(ident="ghost")
    assert info.value.reason == "unknown_id"
    with pytest.raises(PkiError, match="no certificate with serial"):
        ca.revoke(serial="abc")
    issued = ca.issue("device", "d1")
    ca.revoke(ident="d1")
    with pytest.raises(PkiError, match="non-revoked"):
        ca.revoke(ident="d1")
    with pytest.raises(PkiError, match="already revoked"):
        ca.revoke(serial=issued.record.serial)
    with pytest.raises(ConfigError, match="exactly one"):
        ca.revoke()
    with pytest.raises(ConfigError, match="exactly one"):
        ca.revoke(ident="d1", serial="ab")
    with pytest.raises(ConfigError, match="hexadecimal"):
        ca.revoke(serial="xyz")


def test_ed25519_ca_issues_ed25519_certificates_and_crls(tmp_path: Path) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca", key_type="ed25519")
    issued = ca.issue("device", "d1")
    cert = _cert(issued.cert)
    assert isinstance(cert.public_key(), ed25519.Ed25519PublicKey)
    cert.verify_directly_issued_by(_cert(ca.ca_cert))
    ca.revoke(ident="d1")
    assert _crl(ca).is_signature_valid(_cert(ca.ca_cert).public_key())  # type: ignore[arg-type]
    assert CertificateAuthority(ca.folder).key_type == "ed25519"


def test_index_survives_reopening_and_records_everything(ca: CertificateAuthority) -> None:
    ca.issue("broker", "broker", hosts=["mqtt.example"])
    ca.issue("aggregator", "aggregator")
    reopened = CertificateAuthority(ca.folder)
    data = json.loads(reopened.index_file.read_text())
    assert data["format"] == 1 and data["key_type"] == "ec-p256"
    assert [(e["id"], e["role"]) for e in data["certs"]] == [
        ("broker", "broker"),
        ("aggregator", "aggregator"),
    ]
    assert data["certs"][0]["hosts"] == ["localhost", "127.0.0.1", "mqtt.example"]
    assert all(e["revoked_at"] is None for e in data["certs"])


# --------------------------------------------------------------------- CLI


def test_cli_constants_mirror_the_library() -> None:
    assert pki_cli.ROLES == ROLES
    assert pki_cli.KEY_TYPES == KEY_TYPES
    assert (pki_cli.DEFAULT_CA_DAYS, pki_cli.DEFAULT_CERT_DAYS, pki_cli.DEFAULT_CRL_DAYS) == (
        DEFAULT_CA_DAYS,
        DEFAULT_CERT_DAYS,
        DEFAULT_CRL_DAYS,
    )


def test_cli_walkthrough_with_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    d = str(tmp_path / "ca")

    def run_json(*args: str) -> Any:
        assert _pki(*args, "--json") == 0
        return json.loads(capsys.readouterr().out)

    made = run_json("init", "--dir", d, "--days", "100")
    assert made["key_type"] == "ec-p256" and made["sealed"] is False
    broker = run_json(
        "issue", "--dir", d, "--role", "broker", "--id", "broker", "--dns", "a.example,10.1.2.3"
    )
    assert broker["hosts"] == ["localhost", "127.0.0.1", "a.example", "10.1.2.3"]
    assert Path(broker["cert_file"]).is_file() and Path(broker["key_file"]).is_file()
    dev = run_json("issue", "--dir", d, "--role", "device", "--id", "pi-1", "--days", "7")
    assert dev["status"] == "valid" and dev["role"] == "device"
    revoked = run_json("revoke", "--dir", d, "--id", "pi-1")
    assert revoked["status"] == "revoked" and revoked["serial"] == dev["serial"]
    crl = run_json("crl", "--dir", d, "--days", "2")
    assert crl["revoked"] == [dev["serial"]]
    listed = run_json("list", "--dir", d)
    assert [(c["id"], c["status"]) for c in listed["certs"]] == [
        ("broker", "valid"),
        ("pi-1", "revoked"),
    ]
    only_devices = run_json("list", "--dir", d, "--role", "device")
    assert [c["id"] for c in only_devices["certs"]] == ["pi-1"]
    # the text forms print something useful too
    assert _pki("list", "--dir", d) == 0
    out = capsys.readouterr().out
    assert "pi-1" in out and "revoked" in out


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["issue", "--dir", "NOCA", "--role", "device", "--id", "d1"], 2, "no CA in"),
        (["list", "--dir", "NOCA"], 2, "no CA in"),
        (["issue", "--dir", "CA", "--role", "device", "--id", "a/b"], 2, "must match"),
        (["issue", "--dir", "CA", "--role", "robot", "--id", "d1"], 2, "invalid choice"),
        (["issue", "--dir", "CA", "--role", "device"], 2, "required"),
        (["issue", "--dir", "CA", "--role", "device", "--id", "taken"], 1, "already has"),
        (["revoke", "--dir", "CA", "--id", "ghost"], 1, "no certificate with id"),
        (["revoke", "--dir", "CA"], 2, "one of the arguments"),
        (["revoke", "--dir", "CA", "--id", "taken", "--serial", "ab"], 2, "not allowed"),
        (["init", "--dir", "CA"], 1, "already exists"),
        (["crl", "--dir", "CA", "--days", "0"], 2, "validity"),
        (["mosquitto", "--dir", "CA", "--federation", "f", "--out", "OUT"], 2, "aggregator"),
        ([], 2, "SUBCOMMAND"),
    ],
)
def test_cli_errors_and_exit_codes(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    args: list[str],
    code: int,
    message: str,
) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    ca.issue("device", "taken")
    capsys.readouterr()
    names = {"CA": str(ca.folder), "NOCA": str(tmp_path / "none"), "OUT": str(tmp_path / "o")}
    assert _pki(*[names.get(a, a) for a in args]) == code
    assert message in capsys.readouterr().err


def test_cli_help_exits_0(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["--help"], ["issue", "--help"], ["mosquitto", "--help"]):
        assert _pki(*args) == 0
    out = capsys.readouterr().out
    assert "--role" in out and "use_username_as_clientid" in out


def test_cli_passphrase_from_file_or_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = tmp_path / "pass"
    secret.write_text("s3cret passphrase\n")
    d = str(tmp_path / "ca")
    assert _pki("init", "--dir", d, "--passphrase-file", str(secret), "--json") == 0
    assert json.loads(capsys.readouterr().out)["sealed"] is True
    monkeypatch.delenv(CA_PASSPHRASE_ENV, raising=False)
    assert _pki("issue", "--dir", d, "--role", "device", "--id", "d1") == 2
    assert CA_PASSPHRASE_ENV in capsys.readouterr().err
    assert (
        _pki(
            "issue", "--dir", d, "--role", "device", "--id", "d1", "--passphrase-file", str(secret)
        )
        == 0
    )
    monkeypatch.setenv(CA_PASSPHRASE_ENV, "wrong")
    assert _pki("issue", "--dir", d, "--role", "device", "--id", "d2") == 1
    assert "wrong passphrase" in capsys.readouterr().err
    monkeypatch.setenv(CA_PASSPHRASE_ENV, "s3cret passphrase")
    assert _pki("revoke", "--dir", d, "--id", "d1") == 0


def test_cli_mosquitto_writes_a_self_contained_broker_folder(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    ca.issue("broker", "broker")
    ca.issue("aggregator", "aggregator")
    for holder in ("keyholder-1", "keyholder-2", "keyholder-3"):
        ca.issue("keyholder", holder)
    for device in ("dA", "dB", "dGone"):
        ca.issue("device", device)
    ca.revoke(ident="dGone")
    out = tmp_path / "broker"
    args = ["--dir", str(ca.folder), "--federation", "fed", "--out", str(out), "--json"]
    assert _pki("mosquitto", *args, "--port", "18883", "--bind", "127.0.0.1") == 0
    result = json.loads(capsys.readouterr().out)
    assert result["keyholders"] == ["keyholder-1", "keyholder-2", "keyholder-3"]
    assert result["users"] == sorted(
        ["aggregator", "keyholder-1", "keyholder-2", "keyholder-3", "dA", "dB"]
    )
    acl = (out / "acl").read_text()
    assert "user dGone" not in acl  # revoked: no ACL entry either
    assert "topic write edgefl/v1/fed/keyholder/result/keyholder-2" in acl
    conf = (out / "mosquitto.conf").read_text().splitlines()
    for line in (
        "allow_anonymous false",
        "listener 18883 127.0.0.1",
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
        f"crlfile {out / 'crl.pem'}",
        f"acl_file {out / 'acl'}",
    ):
        assert line in conf, line
    assert conf.index("listener 18883 127.0.0.1") < conf.index("use_username_as_clientid true")
    assert (out / "server.key").read_bytes() == (ca.folder / "private/broker.key").read_bytes()
    assert _mode(out / "server.key") == 0o600
    assert (out / "crl.pem").read_bytes() == ca.crl_file.read_bytes()


# -------------------------------------------- broker identity configuration


def _allowed(grants: tuple[TopicGrant, ...], access: str, topic: str) -> bool:
    return any(g.access in (access, "readwrite") and topic_matches(g.topic, topic) for g in grants)


def test_each_key_holder_writes_only_its_own_result_topic() -> None:
    holders = ["keyholder-1", "keyholder-2", "keyholder-3"]
    grants = acl_grants("fed", ["dA"], keyholders=holders)
    assert set(grants) == {"aggregator", "dA", *holders}
    assert KEYHOLDER_RESULT_TOPIC == "keyholder/result/{holder}"
    for holder in holders:
        own = keyholder_result_topic("fed", holder)
        assert own == P + f"keyholder/result/{holder}"
        assert _allowed(grants[holder], "write", own)
        assert _allowed(grants["aggregator"], "read", own)
        for other in holders:
            if other != holder:
                assert not _allowed(grants[holder], "write", keyholder_result_topic("fed", other))
        assert _allowed(grants[holder], "read", P + "updates/dA")
        assert _allowed(grants[holder], "read", P + "keyholder/request")
        assert not _allowed(grants[holder], "write", P + "updates/dA")
        assert not _allowed(grants[holder], "write", P + "keyholder/request")
        assert not _allowed(grants["dA"], "write", keyholder_result_topic("fed", holder))
    assert not _allowed(grants["aggregator"], "write", keyholder_result_topic("fed", "keyholder-1"))
    auth = generate_broker_auth("fed", ["dA"], keyholders=holders)
    assert {u: r for u, r in auth.roles.items() if r == "keyholder"} == dict.fromkeys(
        holders, "keyholder"
    )


@pytest.mark.parametrize(
    ("devices", "holders", "reason"),
    [
        (["dA"], ["keyholder-1", "keyholder-1"], "twice"),
        (["dA"], [], "at least one"),
        (["keyholder-1"], ["keyholder-1"], "collides"),
        (["dA"], ["aggregator"], "different"),
        (["dA"], ["bad/holder"], "must match"),
        (["dA"], "keyholder-1", "not one string"),
    ],
)
def test_key_holder_committee_names_are_checked(
    devices: list[str], holders: Any, reason: str
) -> None:
    with pytest.raises(ConfigError, match=reason):
        acl_grants("fed", devices, keyholders=holders)


def test_tls_listener_binds_the_client_id_to_the_certificate(tmp_path: Path) -> None:
    if find_mosquitto() is None:
        pytest.skip("mosquitto is not installed (only its path is needed here)")
    tls = TlsListener(
        certfile=tmp_path / "s.crt", keyfile=tmp_path / "s.key", cafile=tmp_path / "ca.crt"
    )
    broker = MosquittoBroker(workdir=tmp_path / "m", options=MosquittoOptions(tls=tls))
    lines = broker.config_text().splitlines()
    tls_at = lines.index(f"listener {broker.tls_port} 127.0.0.1")
    section = lines[tls_at:]
    for wanted in (
        "require_certificate true",
        "use_identity_as_username true",
        "use_username_as_clientid true",
    ):
        assert wanted in section, wanted
    # the plain harness listener keeps per-test client ids unless asked
    assert "use_username_as_clientid true" not in lines[:tls_at]
    bound = MosquittoOptions(use_username_as_clientid=True)
    plain = MosquittoBroker(workdir=tmp_path / "p", options=bound).config_text().splitlines()
    assert plain[plain.index("use_username_as_clientid true") - 1].startswith("listener ")


def test_production_config_has_one_bound_mutual_tls_listener(tmp_path: Path) -> None:
    tls = TlsListener(
        certfile=tmp_path / "s.crt",
        keyfile=tmp_path / "s.key",
        cafile=tmp_path / "ca.crt",
        crlfile=tmp_path / "crl.pem",
    )
    text = render_mutual_tls_config(tls=tls, acl_file=tmp_path / "acl", port=8883)
    lines = text.splitlines()
    assert [ln for ln in lines if ln.startswith("listener")] == ["listener 8883"]
    assert "allow_anonymous false" in lines and "password_file" not in text
    assert "use_username_as_clientid true" in lines
    assert f"crlfile {tmp_path / 'crl.pem'}" in lines
    with pytest.raises(ValueError):
        render_mutual_tls_config(tls=tls, acl_file=tmp_path / "acl", port=0)


def test_cli_mosquitto_keeps_the_broker_key_once_moved_off_the_ca(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    for role, ident in (("broker", "broker"), ("aggregator", "aggregator")):
        ca.issue(role, ident)  # type: ignore[arg-type]
    ca.issue("keyholder", "keyholder-1")
    out = tmp_path / "broker"
    args = ["mosquitto", "--dir", str(ca.folder), "--federation", "fed", "--out", str(out)]
    assert _pki(*args) == 0
    key = (out / "server.key").read_bytes()
    ca.key_path("broker").unlink()  # installed on the broker, deleted on the CA host
    ca.issue("device", "d-new")
    assert _pki(*args) == 0
    assert (out / "server.key").read_bytes() == key
    assert "user d-new" in (out / "acl").read_text()
    (out / "server.key").unlink()
    capsys.readouterr()
    assert _pki(*args) == 2
    assert "cannot copy" in capsys.readouterr().err


def test_passphrase_file_must_hold_a_passphrase(tmp_path: Path) -> None:
    from firmware_sim.pki import read_ca_passphrase

    empty = tmp_path / "empty"
    empty.write_text("")
    with pytest.raises(ConfigError, match="empty"):
        read_ca_passphrase(empty)
    with pytest.raises(ConfigError, match="cannot read"):
        read_ca_passphrase(tmp_path / "missing")
    (tmp_path / "ok").write_text("pw\nignored\n")
    assert read_ca_passphrase(tmp_path / "ok") == b"pw"


def test_cli_mosquitto_gives_each_aggregator_worker_its_own_user(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = CertificateAuthority.init(tmp_path / "ca")
    ca.issue("broker", "broker")
    ca.issue("aggregator", "aggregator")
    ca.issue("keyholder", "keyholder-1")
    ca.issue("device", "dA")
    out = tmp_path / "broker"
    args = ["--dir", str(ca.folder), "--federation", "fed", "--out", str(out), "--json"]
    ca.issue("aggregator", "aggregator-worker-1")  # worker 0 missing: refused
    assert _pki("mosquitto", *args) == 2
    assert "aggregator-worker-0..N-1" in capsys.readouterr().err
    ca.issue("aggregator", "aggregator-worker-0")
    assert _pki("mosquitto", *args) == 0
    users = json.loads(capsys.readouterr().out)["users"]
    assert {"aggregator", "aggregator-worker-0", "aggregator-worker-1"} <= set(users)
    acl = (out / "acl").read_text()
    for user in ("aggregator-worker-0", "aggregator-worker-1"):
        block = acl.split(f"user {user}\n", 1)[1].split("\nuser ", 1)[0]
        assert "topic read edgefl/v1/fed/updates/+/+" in block
        assert "topic readwrite edgefl/v1/fed/aggregator/partial/+" in block
