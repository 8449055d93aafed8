"""Transport configuration, URL parsing, topic rules, packet sizes and backoff (pure code)."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paho.mqtt.enums import CallbackAPIVersion

from edge_sdk.errors import ConfigError
from edge_sdk.transport import (
    Backoff,
    TransportConfig,
    Will,
    max_payload_size,
    parse_url,
    publish_packet_size,
    topic_matches,
    validate_filter,
    validate_topic,
)

# --------------------------------------------------------------------- urls


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("mqtt://127.0.0.1:1884", ("mqtt", "127.0.0.1", 1884)),
        ("mqtt://broker.example", ("mqtt", "broker.example", 1883)),
        ("mqtts://broker.example", ("mqtts", "broker.example", 8883)),
        ("MQTTS://[::1]:9000", ("mqtts", "::1", 9000)),
        ("mqtt://host/", ("mqtt", "host", 1883)),
    ],
)
def test_parse_url_accepts_mqtt_urls(url: str, expected: tuple[str, str, int]) -> None:
    assert parse_url(url) == expected


@pytest.mark.parametrize(
    ("url", "reason"),
    [
        ("http://host:1883", "scheme"),
        ("mqtt://user:secret@host", "credentials"),
        ("mqtt://host:1883/topic", "path"),
        ("mqtt://host?x=1", "path"),
        ("mqtt://:1883", "no host"),
        ("mqtt://host:0", "port"),
        ("mqtt://host:99999", "invalid broker url"),
        ("", "non-empty"),
    ],
)
def test_parse_url_refuses_with_reason(url: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        parse_url(url)


def test_credentials_in_url_are_not_echoed() -> None:
    with pytest.raises(ConfigError) as info:
        parse_url("mqtt://user:hunter2@host")
    assert "hunter2" not in str(info.value)


# ------------------------------------------------------------------- config


def test_defaults_are_the_safe_ones() -> None:
    cfg = TransportConfig(url="mqtt://h", client_id="d1")
    assert cfg.protocol == 5
    assert cfg.clean_start is True
    assert cfg.session_expiry_s == 0
    assert cfg.max_message_size == 128 * 1024
    assert cfg.jitter is True
    assert (cfg.reconnect_min_s, cfg.reconnect_max_s) == (1.0, 60.0)
    assert cfg.keepalive == 30
    assert cfg.manual_ack is False
    assert cfg.tls is False


@pytest.mark.parametrize(
    ("settings", "reason"),
    [
        ({"client_id": ""}, "client_id"),
        ({"client_id": "has space"}, "client_id"),
        ({"protocol": 4}, "protocol"),
        ({"password": "x"}, "needs a username"),
        ({"url": "mqtts://h"}, "ca_file"),
        ({"ca_file": "/x/ca.pem"}, "mqtts"),
        ({"url": "mqtts://h", "ca_file": "ca", "cert_file": "c"}, "together"),
        ({"keepalive": 0}, "keepalive"),
        ({"clean_start": False}, "session_expiry_s > 0"),
        ({"session_expiry_s": -1}, "session_expiry_s"),
        ({"reconnect_min_s": 0}, "reconnect_min_s"),
        ({"reconnect_min_s": 5.0, "reconnect_max_s": 1.0}, "reconnect_max_s"),
        ({"reconnect_max_s": float("inf")}, "finite"),
        ({"max_message_size": 10}, "max_message_size"),
        ({"connect_timeout": -1.0}, "connect_timeout"),
        ({"manual_ack": 1}, "manual_ack"),
    ],
)
def test_invalid_settings_are_refused_with_reason(settings: dict[str, Any], reason: str) -> None:
    values: dict[str, Any] = {"url": "mqtt://h", "client_id": "d1", **settings}
    with pytest.raises(ConfigError, match=reason):
        TransportConfig(**values)


def test_durable_311_session_needs_no_expiry() -> None:
    cfg = TransportConfig(url="mqtt://h", client_id="agg", protocol=311, clean_start=False)
    assert cfg.clean_start is False


def test_paths_are_normalised_to_str(tmp_path: Path) -> None:
    cfg = TransportConfig(url="mqtts://h", client_id="d", ca_file=tmp_path / "ca.pem")  # type: ignore[arg-type]
    assert cfg.ca_file == str(tmp_path / "ca.pem")
    assert cfg.tls is True


def test_from_dict_builds_nested_will_and_numbers() -> None:
    cfg = TransportConfig.from_dict(
        {
            "url": "mqtt://h:1",
            "client_id": "dev-7",
            "reconnect_min_s": 2,
            "will": {"topic": "s/dev-7", "payload": "offline", "retain": True},
        }
    )
    assert cfg.will == Will(topic="s/dev-7", payload=b"offline", retain=True, qos=1)
    assert cfg.reconnect_min_s == 2.0


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        ({"url": "mqtt://h", "client_id": "d", "keep_alive": 3}, "unknown transport settings"),
        ({"url": "mqtt://h"}, "client_id"),
        ({"url": "mqtt://h", "client_id": "d", "will": {"payload": "x"}}, "needs a topic"),
        ({"url": "mqtt://h", "client_id": "d", "will": {"topic": "a/#"}}, "wildcards"),
        ({"url": "mqtt://h", "client_id": "d", "will": {"topic": "a", "qs": 1}}, "unknown will"),
        ({"url": "mqtt://h", "client_id": "d", "will": {"topic": "a", "qos": 2}}, "qos"),
    ],
)
def test_from_dict_refuses_bad_tables(data: dict[str, Any], reason: str) -> None:
    with pytest.raises(ConfigError, match=reason):
        TransportConfig.from_dict(data)


# ------------------------------------------------------------------- topics


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("a/b", "a/b", True),
        ("a/+", "a/b", True),
        ("a/+", "a/b/c", False),
        ("a/#", "a", True),
        ("a/#", "a/b/c", True),
        ("#", "a/b", True),
        ("+/b", "a/b", True),
        ("+/+", "a", False),
        ("a/+/c", "a//c", True),
        ("#", "$SYS/x", False),
        ("+/x", "$SYS/x", False),
        ("$SYS/#", "$SYS/x", True),
        ("$share/g/a/+", "a/b", True),
        ("a/b", "a/bc", False),
    ],
)
def test_topic_matching_follows_mqtt_rules(topic_filter: str, topic: str, expected: bool) -> None:
    assert topic_matches(topic_filter, topic) is expected
    # paho's own matcher agrees (it has no notion of $share)
    if not topic_filter.startswith("$share/"):
        assert mqtt.topic_matches_sub(topic_filter, topic) is expected


@pytest.mark.parametrize(
    "bad", ["a/#/b", "a/b#", "a+/b", "$share/g", "$share//a", "$share/g+/a", ""]
)
def test_malformed_filters_are_refused(bad: str) -> None:
    with pytest.raises(ValueError):
        validate_filter(bad)


@pytest.mark.parametrize("bad", ["a/+", "a/#", "", "a\x00b"])
def test_publish_topics_refuse_wildcards_and_nul(bad: str) -> None:
    with pytest.raises(ValueError):
        validate_topic(bad)


def test_topic_type_is_checked() -> None:
    with pytest.raises(TypeError):
        validate_topic(b"a/b")  # type: ignore[arg-type]


class _FakeSocket:
    def close(self) -> None:
        pass


def _paho_publish_packet(topic: str, payload_len: int, qos: int, protocol: int) -> bytes:
    """Encode a PUBLISH with paho's own encoder (an independent reference)."""
    proto = mqtt.MQTTv5 if protocol == 5 else mqtt.MQTTv311
    client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id="size-probe", protocol=proto)
    captured: list[bytes] = []

    def capture(command: int, packet: bytes, mid: int, qos: int, info: Any = None) -> int:
        captured.append(bytes(packet))
        return 0

    client._packet_queue = capture  # type: ignore[method-assign,assignment]
    client._sock = _FakeSocket()  # type: ignore[assignment]  # paho refuses to encode without one
    try:
        client._send_publish(1 if qos else 0, topic.encode(), b"x" * payload_len, qos, False, False)
    finally:
        client._sock = None
    return captured[0]


_BOUNDARY_LENGTHS = [0, 1, 100, 120, 127, 128, 16_370, 16_383, 16_384, 70_000]


@settings(max_examples=60, deadline=None)
@given(
    topic=st.text(
        st.characters(blacklist_characters="+#\x00", blacklist_categories=["Cs"]),
        min_size=1,
        max_size=40,
    ),
    payload_len=st.sampled_from(_BOUNDARY_LENGTHS) | st.integers(0, 20_000),
    qos=st.sampled_from([0, 1]),
    protocol=st.sampled_from([5, 311]),
)
def test_packet_size_equals_paho_encoding(
    topic: str, payload_len: int, qos: int, protocol: int
) -> None:
    expected = len(_paho_publish_packet(topic, payload_len, qos, protocol))
    assert publish_packet_size(topic, payload_len, qos=qos, protocol=protocol) == expected


def test_packet_size_across_the_three_byte_varint_boundary() -> None:
    for payload_len in (2_097_140, 2_097_160):
        expected = len(_paho_publish_packet("t", payload_len, 1, 5))
        assert publish_packet_size("t", payload_len, qos=1, protocol=5) == expected


@settings(max_examples=80, deadline=None)
@given(
    limit=st.integers(64, 300_000),
    topic=st.sampled_from(["t", "edgefl/v1/fed/updates/device-0001", "x" * 300]),
    qos=st.sampled_from([0, 1]),
    protocol=st.sampled_from([5, 311]),
)
def test_max_payload_size_is_the_largest_that_fits(
    limit: int, topic: str, qos: int, protocol: int
) -> None:
    best = max_payload_size(topic, limit, qos=qos, protocol=protocol)
    if best > 0:
        assert publish_packet_size(topic, best, qos=qos, protocol=protocol) <= limit
    assert publish_packet_size(topic, best + 1, qos=qos, protocol=protocol) > limit


# ------------------------------------------------------------------ backoff


class _Scripted:
    """A uniform source that returns a fixed script of draws."""

    def __init__(self, draws: list[float]) -> None:
        self.draws = list(draws)

    def random(self) -> float:
        return self.draws.pop(0)


def test_backoff_ceiling_doubles_up_to_the_cap() -> None:
    backoff = Backoff(0.5, 6.0, jitter=False)
    assert [backoff.delay(a) for a in range(6)] == [0.5, 1.0, 2.0, 4.0, 6.0, 6.0]
    assert backoff.ceiling(10_000) == 6.0  # no overflow for huge attempt counts


def test_full_jitter_scales_each_draw_by_the_ceiling() -> None:
    draws = [0.5, 0.25, 0.9, 0.0, 0.999]
    backoff = Backoff(1.0, 8.0, rng=_Scripted(draws))
    delays = [backoff.delay(a) for a in range(5)]
    assert delays == [0.5 * 1, 0.25 * 2, 0.9 * 4, 0.0 * 8, 0.999 * 8]


def test_jittered_delays_stay_within_the_ceiling_and_spread() -> None:
    backoff = Backoff(1.0, 60.0, rng=random.Random(7))
    fleet = [backoff.delay(0) for _ in range(1000)]
    assert all(0.0 <= d < 1.0 for d in fleet)
    # a fleet after a broker restart: no two devices share a reconnect instant
    assert len({round(d, 6) for d in fleet}) > 990
    late = [backoff.delay(12) for _ in range(200)]
    assert all(0.0 <= d < 60.0 for d in late)
    assert max(late) > 30.0  # the cap, not the un-capped 4096 s, bounds the spread


def test_backoff_refuses_a_bad_source_and_bad_bounds() -> None:
    with pytest.raises(ValueError, match="outside"):
        Backoff(1.0, 2.0, rng=_Scripted([1.0])).delay(0)
    with pytest.raises(ValueError):
        Backoff(0.0, 1.0)
    with pytest.raises(ValueError):
        Backoff(2.0, 1.0)
    with pytest.raises(ValueError):
        Backoff(1.0, 2.0).ceiling(-1)
