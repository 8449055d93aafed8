"""Topic names, topic filters and MQTT packet sizes (pure functions, no I/O).

The size arithmetic is the one thing both transports must agree on exactly:
a publish is refused when the PUBLISH packet it would put on the wire is
larger than the limit, and the same payload must be refused (or accepted) by
the in-memory transport and by the MQTT one.
"""

from __future__ import annotations

__all__ = [
    "max_payload_size",
    "publish_packet_size",
    "topic_matches",
    "validate_filter",
    "validate_topic",
]

_MAX_TOPIC_BYTES = 65_535
_MAX_REMAINING_LENGTH = 268_435_455  # 4-byte variable byte integer (MQTT 3.1.1 and 5)


def _check_common(text: str, what: str) -> bytes:
    if not isinstance(text, str):
        raise TypeError(f"{what} must be a str, got {type(text).__name__}")
    if not text:
        raise ValueError(f"{what} must not be empty")
    if "\x00" in text:
        raise ValueError(f"{what} must not contain NUL: {text!r}")
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise ValueError(f"{what} is not valid UTF-8: {text!r}") from exc
    if len(raw) > _MAX_TOPIC_BYTES:
        raise ValueError(f"{what} is {len(raw)} bytes long; MQTT allows {_MAX_TOPIC_BYTES}")
    return raw


def validate_topic(topic: str) -> None:
    """Check a topic name that a message is published to.

    Raises:
        TypeError: not a str.
        ValueError: empty, contains a wildcard (``+``/``#``) or NUL, or longer
            than 65,535 UTF-8 bytes.
    """
    _check_common(topic, "topic")
    if "+" in topic or "#" in topic:
        raise ValueError(f"a published topic must not contain wildcards: {topic!r}")


def validate_filter(topic_filter: str) -> None:
    """Check a subscription topic filter (``+`` and ``#`` wildcards, ``$share``).

    ``+`` must fill a whole level; ``#`` must be the whole last level. An MQTT 5
    shared subscription ``$share/{group}/{filter}`` is accepted when its group
    has no wildcard and its filter is valid.

    Raises:
        TypeError: not a str.
        ValueError: a malformed filter, with the reason.
    """
    _check_common(topic_filter, "topic filter")
    inner = topic_filter
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        if len(parts) < 3 or not parts[1] or not parts[2]:
            raise ValueError(f"shared subscription needs $share/GROUP/FILTER: {topic_filter!r}")
        if "+" in parts[1] or "#" in parts[1]:
            raise ValueError(f"share group must not contain wildcards: {topic_filter!r}")
        inner = parts[2]
    levels = inner.split("/")
    for index, level in enumerate(levels):
        if "#" in level and (level != "#" or index != len(levels) - 1):
            raise ValueError(f"'#' must be the whole last level of a filter: {topic_filter!r}")
        if "+" in level and level != "+":
            raise ValueError(f"'+' must fill a whole level of a filter: {topic_filter!r}")


def _strip_share(topic_filter: str) -> str:
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        if len(parts) == 3:
            return parts[2]
    return topic_filter


def topic_matches(topic_filter: str, topic: str) -> bool:
    """Return True when ``topic`` matches ``topic_filter`` by the MQTT rules.

    Topics starting with ``$`` (``$SYS/...``) are not matched by a filter
    that starts with a wildcard. A ``$share/{group}/`` prefix is ignored.
    """
    pattern = _strip_share(topic_filter).split("/")
    levels = topic.split("/")
    if topic.startswith("$") and pattern[0] in ("+", "#"):
        return False
    for index, part in enumerate(pattern):
        if part == "#":
            return True  # also matches the parent level itself ("a/#" matches "a")
        if index >= len(levels):
            return False
        if part != "+" and part != levels[index]:
            return False
    return len(levels) == len(pattern)


def _varint_len(value: int) -> int:
    if value < 128:
        return 1
    if value < 16_384:
        return 2
    if value < 2_097_152:
        return 3
    return 4


def publish_packet_size(topic: str, payload_len: int, *, qos: int, protocol: int) -> int:
    """Return the size in bytes of the PUBLISH packet for a message.

    Counts the fixed header (type byte and remaining-length varint), the topic
    (2-byte length prefix and UTF-8 bytes), the packet identifier (QoS > 0),
    the empty MQTT 5 property block (one byte: edgefl sends no publish
    properties) and the payload. This is what brokers compare with their
    maximum packet size.

    Args:
        topic: the topic name.
        payload_len: payload length in bytes.
        qos: 0, 1 or 2.
        protocol: 5 or 311.
    """
    if payload_len < 0:
        raise ValueError(f"payload_len must be >= 0, got {payload_len}")
    remaining = 2 + len(topic.encode("utf-8")) + (2 if qos > 0 else 0) + payload_len
    if protocol == 5:
        remaining += 1
    if remaining > _MAX_REMAINING_LENGTH:
        return 1 + 4 + remaining  # unsendable anyway; still larger than any limit
    return 1 + _varint_len(remaining) + remaining


def max_payload_size(topic: str, limit: int, *, qos: int, protocol: int) -> int:
    """Return the largest payload that fits in one PUBLISH of at most ``limit`` bytes.

    Callers that split big updates into chunks size them with this. Returns 0
    when not even an empty payload fits.
    """
    overhead = publish_packet_size(topic, 0, qos=qos, protocol=protocol)
    if overhead > limit:
        return 0
    # the remaining-length varint may grow by up to 3 bytes with the payload
    best = limit - overhead
    while best > 0 and publish_packet_size(topic, best, qos=qos, protocol=protocol) > limit:
        best -= 1
    return best


def checked_publish(topic: str, payload: object, *, qos: int, protocol: int, limit: int) -> bytes:
    """Validate one PUBLISH before anything is sent; return the payload as bytes.

    Raises:
        ValueError: an invalid topic or a qos other than 0/1.
        TypeError: the payload is not bytes-like.
        MessageTooLargeError: the packet would exceed ``limit``.
    """
    from edge_sdk.transport._errors import MessageTooLargeError

    validate_topic(topic)
    if qos not in (0, 1):
        raise ValueError(f"qos must be 0 or 1, got {qos!r}")
    if not isinstance(payload, (bytes, bytearray, memoryview)):
        raise TypeError(f"payload must be bytes, got {type(payload).__name__}")
    data = bytes(payload)
    size = publish_packet_size(topic, len(data), qos=qos, protocol=protocol)
    if size > limit:
        raise MessageTooLargeError(
            f"PUBLISH to {topic!r} would be {size} bytes, over the {limit}-byte limit; "
            "split the payload",
            size=size,
            limit=limit,
        )
    return data
