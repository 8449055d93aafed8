"""Key files (sealed at rest, 0600, refused when exposed) and the `edgefl keys` CLI."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from edge_sdk.cli import main
from edge_sdk.crypto import (
    ObfuscatorPool,
    generate_keypair,
    load_private_key,
    load_public_key,
    read_passphrase,
    save_private_key,
    save_public_key,
    secret_key_protection,
)
from edge_sdk.errors import KeyFileError

PK, SK = generate_keypair(512, allow_insecure_size=True)
FAST = 2**10  # scrypt cost for tests; files carry their own parameters


def test_public_key_file_round_trip_and_fingerprint_check(tmp_path: Path) -> None:
    path = save_public_key(PK, tmp_path / "pub.json")
    assert load_public_key(path, min_bits=512) == PK
    assert load_public_key(path, min_bits=512, expected_fingerprint=PK.fingerprint) == PK
    with pytest.raises(KeyFileError, match="expected"):
        load_public_key(path, min_bits=512, expected_fingerprint="00" * 32)
    with pytest.raises(KeyFileError, match="bits"):
        load_public_key(path)
    doc = json.loads(path.read_text())
    doc["n"] = format(PK.n + 2, "x")
    path.write_text(json.dumps(doc))
    with pytest.raises(KeyFileError, match="fingerprint"):
        load_public_key(path, min_bits=512)


def test_sealed_secret_key_round_trip(tmp_path: Path) -> None:
    path = save_private_key(SK, tmp_path / "sk.json", passphrase="correct horse", scrypt_n=FAST)
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    text = path.read_text()
    assert format(SK.p, "x") not in text and format(SK.q, "x") not in text
    loaded = load_private_key(path, passphrase="correct horse", min_bits=512)
    assert (loaded.p, loaded.q) == (SK.p, SK.q)
    assert secret_key_protection(path)["protection"] == "scrypt-aes256gcm"


def test_wrong_passphrase_and_tampering_are_rejected(tmp_path: Path) -> None:
    path = save_private_key(SK, tmp_path / "sk.json", passphrase="pw", scrypt_n=FAST)
    with pytest.raises(KeyFileError) as info:
        load_private_key(path, passphrase="PW", min_bits=512)
    assert info.value.reason == "key_file_passphrase"
    with pytest.raises(KeyFileError, match="no passphrase"):
        load_private_key(path, passphrase=None, min_bits=512)
    other, _ = generate_keypair(512, allow_insecure_size=True)
    doc = json.loads(path.read_text())
    # Pair the sealed primes with another public key: the header is authenticated.
    doc["n"], doc["fingerprint"] = format(other.n, "x"), other.fingerprint
    path.write_text(json.dumps(doc))
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError) as info:
        load_private_key(path, passphrase="pw", min_bits=512)
    assert info.value.reason == "key_file_passphrase"


def test_hostile_scrypt_parameters_are_bounded(tmp_path: Path) -> None:
    path = save_private_key(SK, tmp_path / "sk.json", passphrase="pw", scrypt_n=FAST)
    doc = json.loads(path.read_text())
    doc["kdf"]["n"] = 2**30
    path.write_text(json.dumps(doc))
    os.chmod(path, 0o600)
    with pytest.raises(KeyFileError, match="out of bounds"):
        load_private_key(path, passphrase="pw", min_bits=512)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o620])
def test_exposed_secret_key_file_is_refused(tmp_path: Path, mode: int) -> None:
    path = save_private_key(SK, tmp_path / "sk.json", passphrase="pw", scrypt_n=FAST)
    os.chmod(path, mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_private_key(path, passphrase="pw", min_bits=512)


def test_unencrypted_secret_key_needs_explicit_opt_in_both_ways(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="passphrase"):
        save_private_key(SK, tmp_path / "sk.json", passphrase=None)
    path = save_private_key(SK, tmp_path / "sk.json", passphrase=None, insecure_unencrypted=True)
    with pytest.raises(KeyFileError, match="UNENCRYPTED"):
        load_private_key(path, passphrase=None, min_bits=512)
    loaded = load_private_key(path, passphrase=None, allow_unencrypted=True, min_bits=512)
    assert loaded.q == SK.q


def test_existing_files_are_not_overwritten_by_default(tmp_path: Path) -> None:
    path = save_private_key(SK, tmp_path / "sk.json", passphrase="pw", scrypt_n=FAST)
    with pytest.raises(KeyFileError, match="exists"):
        save_private_key(SK, path, passphrase="pw", scrypt_n=FAST)
    save_private_key(SK, path, passphrase="pw2", scrypt_n=FAST, overwrite=True)
    assert load_private_key(path, passphrase="pw2", min_bits=512).p == SK.p


def test_read_passphrase_prefers_the_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EDGEFL_KEY_PASSPHRASE", "from-env")
    assert read_passphrase() == "from-env"
    f = tmp_path / "pw"
    f.write_text("from-file\n")
    assert read_passphrase(f) == "from-file"
    monkeypatch.delenv("EDGEFL_KEY_PASSPHRASE")
    assert read_passphrase() is None


# -- CLI --------------------------------------------------------------------------------


def test_cli_generate_show_precompute(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("EDGEFL_KEY_PASSPHRASE", "s3cret")
    keys = tmp_path / "keys"
    assert main(["keys", "generate", "--out", str(keys), "--json"]) == 0
    generated = json.loads(capsys.readouterr().out)
    assert generated["bits"] == 2048
    assert main(["keys", "show", "--dir", str(keys), "--json"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["fingerprint"] == generated["fingerprint"]
    assert shown["protection"] == "scrypt-aes256gcm"
    sk = load_private_key(keys / "paillier_secret.json", passphrase="s3cret")
    assert sk.public_key.fingerprint == generated["fingerprint"]
    pool_dir = tmp_path / "pool"
    args = ["keys", "precompute", "--dir", str(keys), "--pool", str(pool_dir), "--count", "2"]
    assert main([*args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["size"] == 2
    assert ObfuscatorPool(pool_dir, sk.public_key).size() == 2
    # refusing to clobber existing keys is a usage error
    assert main(["keys", "generate", "--out", str(keys)]) == 2


def test_cli_requires_a_passphrase_or_explicit_insecure_mode(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.delenv("EDGEFL_KEY_PASSPHRASE", raising=False)
    assert main(["keys", "generate", "--out", str(tmp_path / "a")]) == 2
    assert "passphrase" in capsys.readouterr().err
    assert not (tmp_path / "a" / "paillier_secret.json").exists()
    out = tmp_path / "b"
    assert main(["keys", "generate", "--out", str(out), "--insecure-unencrypted"]) == 0
    assert secret_key_protection(out / "paillier_secret.json")["protection"] == "none"
    pw = tmp_path / "pw"
    pw.write_text("filepw\n")
    c = tmp_path / "c"
    assert main(["keys", "generate", "--out", str(c), "--passphrase-file", str(pw)]) == 0
    assert load_private_key(c / "paillier_secret.json", passphrase="filepw").p > 0


def test_cli_show_refuses_an_exposed_secret_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    keys = tmp_path / "k"
    save_public_key(PK, keys / "paillier_public.json")
    save_private_key(SK, keys / "paillier_secret.json", passphrase="pw", scrypt_n=FAST)
    os.chmod(keys / "paillier_secret.json", 0o644)
    assert main(["keys", "show", "--dir", str(keys), "--min-bits", "512"]) == 1
    assert "chmod 600" in capsys.readouterr().err
