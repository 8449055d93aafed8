"""Password hashes, ACL layout, credentials files and the `edgefl broker acl` command."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from edge_sdk.cli import main
from edge_sdk.errors import ConfigError
from edge_sdk.randomness import DeterministicRandom
from edge_sdk.transport import topic_matches
from firmware_sim.acl import (
    TopicGrant,
    acl_grants,
    generate_broker_auth,
    hash_password,
    load_credentials,
    read_device_ids,
    verify_password,
)

P = "edgefl/v1/fed/"


def _allowed(grants: tuple[TopicGrant, ...], access: str, topic: str) -> bool:
    return any(g.access in (access, "readwrite") and topic_matches(g.topic, topic) for g in grants)


# ------------------------------------------------------------------- hashes


def test_hash_verifies_and_rejects_wrong_passwords() -> None:
    hashed = hash_password("s3cret", salt=b"\x01" * 12)
    assert hashed.startswith("$7$101$")
    assert verify_password("s3cret", hashed)
    assert not verify_password("s3cret ", hashed)


def test_hash_has_mosquitto_field_sizes() -> None:
    import base64

    _, seven, iterations, salt, digest = hash_password("x", salt=b"\x02" * 12).split("$")
    assert (seven, iterations) == ("7", "101")
    assert len(base64.b64decode(salt)) == 12
    assert len(base64.b64decode(digest)) == 64


@pytest.mark.skipif(shutil.which("mosquitto_passwd") is None, reason="mosquitto_passwd absent")
def test_hashes_written_by_mosquitto_passwd_verify(tmp_path: Path) -> None:
    # The reference implementation writes the file; our verifier must agree.
    path = tmp_path / "pw"
    subprocess.run(
        ["mosquitto_passwd", "-c", "-b", str(path), "alice", "correct horse"], check=True
    )
    user, hashed = path.read_text().strip().split(":", 1)
    assert user == "alice"
    assert verify_password("correct horse", hashed)
    assert not verify_password("wrong horse", hashed)


@pytest.mark.parametrize("bad", ["$6$abc$def", "plain", "$7$x$AAAA$AAAA", "$7$1$!!$AAAA"])
def test_malformed_hashes_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        verify_password("x", bad)


# ---------------------------------------------------------------------- ACL


def test_each_role_gets_exactly_its_topics() -> None:
    grants = acl_grants("fed", ["dA", "dB"])
    a, agg, kh = grants["dA"], grants["aggregator"], grants["keyholder"]
    # device A
    assert _allowed(a, "write", P + "updates/dA")
    assert _allowed(a, "write", P + "status/dA")
    assert _allowed(a, "read", P + "model/0")
    assert _allowed(a, "read", P + "round")
    assert _allowed(a, "read", P + "ack/dA")
    for forbidden_write in (
        "updates/dB",
        "status/dB",
        "model/0",
        "round",
        "ack/dA",
        "keyholder/result",
    ):
        assert not _allowed(a, "write", P + forbidden_write), forbidden_write
    for forbidden_read in ("updates/dA", "updates/dB", "ack/dB", "status/dB", "keyholder/request"):
        assert not _allowed(a, "read", P + forbidden_read), forbidden_read
    # aggregator
    for topic in ("updates/dA", "updates/dB", "status/dA", "keyholder/result/keyholder"):
        assert _allowed(agg, "read", P + topic)
    for topic in ("model/0", "model/7", "round", "ack/dA", "ack/dB", "keyholder/request"):
        assert _allowed(agg, "write", P + topic)
    assert not _allowed(agg, "read", P + "keyholder/request")
    assert not _allowed(agg, "write", P + "keyholder/result/keyholder")
    assert not _allowed(agg, "write", P + "updates/dA")
    # key holder
    assert _allowed(kh, "read", P + "keyholder/request")
    assert _allowed(kh, "write", P + "keyholder/result/keyholder")
    assert _allowed(kh, "read", P + "updates/dA")  # the witness of ciphertexts
    assert not _allowed(kh, "write", P + "updates/dA")
    assert not _allowed(kh, "read", P + "ack/dA")
    assert not _allowed(kh, "read", P + "model/0")
    # nothing outside the federation
    assert not any(_allowed(g, "read", "edgefl/v1/other/model/0") for g in grants.values())


def test_only_the_aggregator_relays_and_each_member_asks_for_its_own() -> None:
    grants = acl_grants("fed", ["dA"], keyholders=["keyholder-1", "keyholder-2"])
    agg, k1, dev = grants["aggregator"], grants["keyholder-1"], grants["dA"]
    assert _allowed(agg, "read", P + "keyholder/gap/keyholder-1")
    assert _allowed(agg, "write", P + "keyholder/relay/keyholder-2")
    assert _allowed(k1, "write", P + "keyholder/gap/keyholder-1")
    assert _allowed(k1, "read", P + "keyholder/relay/keyholder-1")
    assert not _allowed(k1, "write", P + "keyholder/gap/keyholder-2")  # no notice in another's name
    assert not _allowed(
        k1, "write", P + "keyholder/relay/keyholder-1"
    )  # only the aggregator relays
    assert not _allowed(k1, "read", P + "keyholder/relay/keyholder-2")
    for topic in ("keyholder/relay/keyholder-1", "keyholder/gap/keyholder-1"):
        assert not _allowed(dev, "write", P + topic) and not _allowed(dev, "read", P + topic)


def test_acl_file_has_no_anonymous_section() -> None:
    auth = generate_broker_auth("fed", ["dA"], rng=DeterministicRandom(1))
    body = [ln for ln in auth.acl_file.splitlines() if ln and not ln.startswith("#")]
    assert body[0].startswith("user ")
    assert "user dA" in body
    assert "topic write edgefl/v1/fed/updates/dA" in body


@pytest.mark.parametrize(
    ("devices", "kwargs", "reason"),
    [
        (["ok", "bad/id"], {}, "device id"),
        (["a+b"], {}, "device id"),
        (["x" * 65], {}, "device id"),
        ([""], {}, "device id"),
        (["d1", "d1"], {}, "twice"),
        (["aggregator"], {}, "collides"),
        (["d1"], {"aggregator_user": "k", "keyholder_user": "k"}, "different"),
        ("d1,d2", {}, "list"),
    ],
)
def test_invalid_device_lists_are_refused(
    devices: object, kwargs: dict[str, str], reason: str
) -> None:
    with pytest.raises(ConfigError, match=reason):
        acl_grants("fed", devices, **kwargs)  # type: ignore[arg-type]


def test_federation_name_is_checked() -> None:
    with pytest.raises(ConfigError, match="federation"):
        acl_grants("fed/#", ["d1"])


# -------------------------------------------------------------- credentials


def test_generated_passwords_are_random_and_verify() -> None:
    auth = generate_broker_auth("fed", ["dA", "dB"])
    assert set(auth.passwords) == {"aggregator", "keyholder", "dA", "dB"}
    assert len(set(auth.passwords.values())) == 4
    assert all(len(p) >= 43 for p in auth.passwords.values())  # 256 bits, base64url
    lines = dict(line.split(":", 1) for line in auth.password_file.splitlines())
    for user, password in auth.passwords.items():
        assert verify_password(password, lines[user])
    assert "dA" in repr(auth) and auth.passwords["dA"] not in repr(auth)


def test_injected_randomness_makes_the_files_reproducible() -> None:
    one = generate_broker_auth("fed", ["dA"], rng=DeterministicRandom(5))
    two = generate_broker_auth("fed", ["dA"], rng=DeterministicRandom(5))
    other = generate_broker_auth("fed", ["dA"], rng=DeterministicRandom(6))
    assert one.password_file == two.password_file
    assert one.passwords == two.passwords
    assert one.passwords != other.passwords


def test_given_passwords_are_kept_and_stale_ones_ignored() -> None:
    auth = generate_broker_auth(
        "fed", ["dA"], passwords={"dA": "kept-password", "gone": "ignored"}, iterations=1000
    )
    assert auth.passwords["dA"] == "kept-password"
    assert "gone" not in auth.passwords
    line = next(ln for ln in auth.password_file.splitlines() if ln.startswith("dA:"))
    assert line.split("$")[2] == "1000"
    with pytest.raises(ConfigError, match="non-empty"):
        generate_broker_auth("fed", ["dA"], passwords={"dA": ""})


def test_write_sets_permissions_and_round_trips_credentials(tmp_path: Path) -> None:
    auth = generate_broker_auth("fed", ["dA", "dB"])
    files = auth.write(tmp_path / "out")
    assert stat.S_IMODE(files.password_file.stat().st_mode) == 0o600
    assert stat.S_IMODE(files.credentials_file.stat().st_mode) == 0o600
    assert files.acl_file.read_text() == auth.acl_file
    doc = json.loads(files.credentials_file.read_text())
    assert doc["users"]["dA"]["role"] == "device"
    assert doc["users"]["aggregator"]["role"] == "aggregator"
    assert doc["topic_prefix"] == P
    assert load_credentials(files.credentials_file, federation="fed") == dict(auth.passwords)
    with pytest.raises(ConfigError, match="belongs to federation"):
        load_credentials(files.credentials_file, federation="other")
    assert not list((tmp_path / "out").glob(".*"))  # no temporary files left


def test_devices_file_skips_comments_and_reports_bad_lines(tmp_path: Path) -> None:
    good = tmp_path / "devices.txt"
    good.write_text("# fleet\nd1\n\n  d2  # kitchen\n")
    assert read_device_ids(good) == ["d1", "d2"]
    bad = tmp_path / "bad.txt"
    bad.write_text("d1\nd 2\n")
    with pytest.raises(ConfigError, match=r"bad.txt:2"):
        read_device_ids(bad)


# ---------------------------------------------------------------------- CLI


def test_cli_writes_files_and_never_prints_passwords(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "auth"
    code = main(
        ["broker", "acl", "--federation", "fed", "--devices", "d1,d2", "--out", str(out), "--json"]
    )
    assert code == 0
    printed = capsys.readouterr().out
    result = json.loads(printed)
    assert result["users"] == [
        "aggregator",
        "d1",
        "d2",
        "keyholder-1",
        "keyholder-2",
        "keyholder-3",
    ]
    passwords = load_credentials(out / "credentials.json")
    assert not any(p in printed for p in passwords.values())
    assert Path(result["acl_file"]).read_text().count("user ") == 6


def test_cli_reuse_keeps_passwords_of_remaining_users(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "auth"
    devices = tmp_path / "devices.txt"
    devices.write_text("d1\nd2\n")
    assert (
        main(
            [
                "broker",
                "acl",
                "--federation",
                "fed",
                "--devices-file",
                str(devices),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    capsys.readouterr()
    before = load_credentials(out / "credentials.json")
    devices.write_text("d1\nd3\n")
    reuse = tmp_path / "old.json"
    shutil.copy(out / "credentials.json", reuse)
    args = ["broker", "acl", "--federation", "fed", "--devices-file", str(devices)]
    assert main([*args, "--out", str(out), "--reuse", str(reuse), "--json"]) == 0
    after = load_credentials(out / "credentials.json")
    assert after["d1"] == before["d1"] and after["aggregator"] == before["aggregator"]
    assert "d2" not in after and after["d3"] not in before.values()
    result = json.loads(capsys.readouterr().out)
    assert result["passwords_kept"] == [
        "aggregator",
        "d1",
        "keyholder-1",
        "keyholder-2",
        "keyholder-3",
    ]


@pytest.mark.parametrize(
    "args",
    [
        ["--federation", "fed", "--out", "X"],
        ["--federation", "fed", "--devices", "a", "--devices-file", "f", "--out", "X"],
        ["--federation", "fed", "--devices", "bad id", "--out", "X"],
        ["--federation", "fed", "--devices", " , ", "--out", "X"],
    ],
)
def test_cli_usage_errors_exit_2(args: list[str], tmp_path: Path) -> None:
    resolved = [str(tmp_path / "o") if a == "X" else a for a in args]
    assert main(["broker", "acl", *resolved]) == 2


def test_grants_cover_every_topic_the_code_uses() -> None:
    # Derived from the protocol's own topic names, so a topic layout change
    # that the ACL misses (as model/{i} chunks once did) fails here.
    from edge_sdk.protocol import Topics

    t = Topics("fed")
    grants = generate_broker_auth("fed", ["dA", "dB"]).grants
    device, agg, kh = grants["dA"], grants["aggregator"], grants["keyholder"]
    for topic in (t.round, t.model(0), t.model(12), t.ack("dA")):
        assert _allowed(device, "read", topic), topic
    for topic in (t.updates("dA"), t.status("dA")):
        assert _allowed(device, "write", topic), topic
    for topic in (t.round, t.model(0), t.model(12), t.ack("dB"), t.keyholder_request):
        assert _allowed(agg, "write", topic), topic
    for topic in (t.updates("dB"), t.status("dB"), t.keyholder_result("keyholder")):
        assert _allowed(agg, "read", topic), topic
    for topic in (t.updates("dA"), t.keyholder_request):
        assert _allowed(kh, "read", topic), topic
    assert _allowed(kh, "write", t.keyholder_result("keyholder"))


def test_sharded_topics_and_worker_users() -> None:
    from edge_sdk.protocol import Topics

    t = Topics("fed")
    grants = acl_grants("fed", ["dA", "dB"], keyholders=["keyholder-1"], aggregator_workers=2)
    assert grants["aggregator-worker-0"] == grants["aggregator-worker-1"] == grants["aggregator"]
    agg, member, dev = grants["aggregator-worker-1"], grants["keyholder-1"], grants["dA"]
    sharded = t.round_updates("dA", 4)
    assert sharded.count("/") == t.updates("dA").count("/") + 1
    assert _allowed(dev, "write", sharded) and not _allowed(dev, "write", t.round_updates("dB", 4))
    assert _allowed(agg, "read", sharded) and _allowed(member, "read", sharded)
    for topic in (t.shard_control, t.partial("worker-0")):
        assert _allowed(agg, "write", topic) and _allowed(agg, "read", topic)
        assert not _allowed(dev, "read", topic) and not _allowed(member, "write", topic)
    auth = generate_broker_auth("fed", ["dA"], aggregator_workers=2)
    assert auth.roles["aggregator-worker-1"] == "aggregator"
    with pytest.raises(ConfigError, match="collides"):
        acl_grants("fed", ["aggregator-worker-0"], aggregator_workers=1)
