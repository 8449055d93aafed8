"""Errors raised by the transports (all :class:`~edge_sdk.errors.EdgeFLError`)."""

from __future__ import annotations

from edge_sdk.errors import EdgeFLError

__all__ = [
    "ConnectRefusedError",
    "MessageTooLargeError",
    "NotConnectedError",
    "SubscriptionRefusedError",
    "TransportError",
]


class TransportError(EdgeFLError):
    """The MQTT transport failed to do what was asked."""

    reason = "transport"


class NotConnectedError(TransportError):
    """The transport is not connected; nothing was handed to the network.

    A publish that raises this was NOT queued: the caller keeps the message
    (the device outbox) and sends it again after the next connection.
    """

    reason = "not_connected"


class MessageTooLargeError(TransportError):
    """A PUBLISH would exceed the maximum message size; nothing was sent.

    Attributes:
        size: the PUBLISH packet size in bytes.
        limit: the limit it exceeded (the configured one, or the broker's
            smaller maximum packet size from its CONNACK).
    """

    reason = "message_too_large"

    def __init__(self, message: str, *, size: int, limit: int) -> None:
        super().__init__(message)
        self.size = size
        self.limit = limit


class ConnectRefusedError(TransportError):
    """The broker answered CONNECT with a failure (bad credentials, not authorised...).

    Attributes:
        code: the CONNACK reason code (MQTT 5 numbering; 3.1.1 codes are
            mapped by paho), or 0 when unknown.
    """

    reason = "connect_refused"

    def __init__(self, message: str, *, code: int = 0) -> None:
        super().__init__(message)
        self.code = code


class SubscriptionRefusedError(TransportError):
    """The broker answered SUBSCRIBE with a failure code (e.g. not authorised).

    Attributes:
        topic_filter: the refused filter.
        code: the SUBACK reason code (>= 0x80).
    """

    reason = "subscription_refused"

    def __init__(self, message: str, *, topic_filter: str, code: int) -> None:
        super().__init__(message)
        self.topic_filter = topic_filter
        self.code = code
