"""MQTT transport: the one place edgefl talks to a broker.

The device agent and the aggregator depend on the :class:`Transport`
protocol only. :class:`MqttTransport` implements it over paho-mqtt 2.x (MQTT 5
or 3.1.1, TLS, credentials, last will, jittered reconnect, manual acks);
:class:`MemoryTransport` over the in-process :class:`MemoryBroker` for
deterministic unit tests. See docs/transport.md for the guarantees.

Example:
    >>> config = TransportConfig.from_dict({"url": "mqtt://127.0.0.1:1883", "client_id": "d1"})
    >>> transport = MqttTransport(config)
    >>> transport.subscribe("edgefl/v1/demo/round", handle_round)  # doctest: +SKIP
    >>> transport.connect(timeout=10)  # doctest: +SKIP
"""

from edge_sdk.transport._backoff import Backoff, UniformSource
from edge_sdk.transport._config import (
    DEFAULT_MAX_MESSAGE_SIZE,
    TransportConfig,
    Will,
    parse_url,
)
from edge_sdk.transport._errors import (
    ConnectRefusedError,
    MessageTooLargeError,
    NotConnectedError,
    SubscriptionRefusedError,
    TransportError,
)
from edge_sdk.transport._memory import MemoryBroker, MemoryTransport
from edge_sdk.transport._mqtt import MqttTransport, build_tls_context
from edge_sdk.transport._topics import (
    max_payload_size,
    publish_packet_size,
    topic_matches,
    validate_filter,
    validate_topic,
)
from edge_sdk.transport._types import (
    ConnectionEvent,
    ConnectionListener,
    InboundMessage,
    MessageHandler,
    Transport,
)

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "Backoff",
    "ConnectRefusedError",
    "ConnectionEvent",
    "ConnectionListener",
    "InboundMessage",
    "MemoryBroker",
    "MemoryTransport",
    "MessageHandler",
    "MessageTooLargeError",
    "MqttTransport",
    "NotConnectedError",
    "SubscriptionRefusedError",
    "Transport",
    "TransportConfig",
    "TransportError",
    "UniformSource",
    "Will",
    "build_tls_context",
    "max_payload_size",
    "parse_url",
    "publish_packet_size",
    "topic_matches",
    "validate_filter",
    "validate_topic",
]
