"""A small synchronous paho wrapper for tests of the harness itself.

Product code talks MQTT only through ``edge_sdk.transport``; the harness
tests use paho directly so they do not depend on the SDK they help test.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from typing import Any

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion


@dataclass
class Received:
    topic: str
    payload: bytes
    retain: bool
    qos: int


class TestClient:
    """paho client with a background loop, message queue and event flags."""

    __test__ = False  # not a pytest class

    def __init__(
        self,
        host: str,
        port: int,
        *,
        client_id: str,
        mqtt5: bool = True,
        keepalive: int = 60,
        clean: bool = True,
    ) -> None:
        protocol = mqtt.MQTTv5 if mqtt5 else mqtt.MQTTv311
        kwargs: dict[str, Any] = {}
        if not mqtt5:
            kwargs["clean_session"] = clean
        self.client = mqtt.Client(
            CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol, **kwargs
        )
        self.host, self.port, self.keepalive, self.mqtt5 = host, port, keepalive, mqtt5
        self.messages: queue.Queue[Received] = queue.Queue()
        self.connected = threading.Event()
        self.disconnected = threading.Event()
        self.connect_count = 0
        self.disconnect_times: list[float] = []
        self.connack_codes: list[str] = []
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_message = self._on_message

    def _on_connect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.connack_codes.append(str(rc))
        if not rc.is_failure:
            self.connect_count += 1
            self.disconnected.clear()
            self.connected.set()

    def _on_disconnect(self, client: Any, userdata: Any, flags: Any, rc: Any, props: Any) -> None:
        self.disconnect_times.append(time.monotonic())
        self.connected.clear()
        self.disconnected.set()

    def _on_message(self, client: Any, userdata: Any, msg: Any) -> None:
        self.messages.put(Received(msg.topic, bytes(msg.payload), bool(msg.retain), msg.qos))

    def connect(self, timeout: float = 10.0) -> TestClient:
        if self.mqtt5:
            self.client.connect(self.host, self.port, keepalive=self.keepalive, clean_start=True)
        else:
            self.client.connect(self.host, self.port, keepalive=self.keepalive)
        self.client.loop_start()
        if not self.connected.wait(timeout):
            self.close()
            raise TimeoutError(
                f"no CONNACK success from {self.host}:{self.port}: {self.connack_codes}"
            )
        return self

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 5.0) -> None:
        done = threading.Event()
        self.client.on_subscribe = lambda *args: done.set()
        self.client.subscribe(topic, qos=qos)
        if not done.wait(timeout):
            raise TimeoutError(f"no SUBACK for {topic}")

    def publish(
        self, topic: str, payload: bytes, *, qos: int = 1, retain: bool = False, wait: bool = True
    ) -> mqtt.MQTTMessageInfo:
        info = self.client.publish(topic, payload, qos=qos, retain=retain)
        if wait:
            info.wait_for_publish(10)
        return info

    def expect(self, timeout: float = 10.0) -> Received:
        return self.messages.get(timeout=timeout)

    def close(self) -> None:
        try:
            self.client.disconnect()
        finally:
            self.client.loop_stop()
