"""A scripted aggregator peer for device-agent tests (no aggregator package)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from edge_sdk.crypto import PackingSpec, PaillierPublicKey
from edge_sdk.errors import EdgeFLError
from edge_sdk.identity import DeviceIdentity, DeviceRegistry, sign_message
from edge_sdk.pipeline import encode_noise_spec
from edge_sdk.privacy import DPPolicy, NoiseSpec, calibrate
from edge_sdk.protocol import (
    Chunk,
    EncryptedUpdate,
    GlobalModel,
    Reassembler,
    Receipt,
    RoundAnnouncement,
    Topics,
    model_digest,
    parse_topic,
    split_payload,
)
from edge_sdk.transport import InboundMessage, Transport

ZERO = b"\0" * 32


def wait_for(cond: Callable[[], bool], timeout: float = 20.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


class ScriptedAggregator:
    """Publishes models and rounds, collects updates, sends receipts."""

    def __init__(
        self,
        transport: Transport,
        *,
        federation: str,
        public_key: PaillierPublicKey,
        registry: DeviceRegistry | None = None,
        auto_receipt: bool = True,
        identity: DeviceIdentity | None = None,
    ) -> None:
        self.t = transport
        self.federation = federation
        self.topics = Topics(federation)
        self.pk = public_key
        self.registry = registry
        self.auto_receipt = auto_receipt
        self.identity = identity
        self.asm = Reassembler()
        self.updates: list[EncryptedUpdate] = []
        self.raw_update_payloads: list[bytes] = []
        self.statuses: list[Any] = []
        self.rejected: list[str] = []
        self.lock = threading.Lock()
        self.model: GlobalModel | None = None
        self.t.subscribe(self.topics.updates_filter, self._on_update)
        self.t.subscribe(self.topics.status_filter, self._on_status)

    def _on_status(self, msg: InboundMessage) -> None:
        from edge_sdk.protocol import DeviceStatus

        if msg.payload:
            with self.lock:
                self.statuses.append(DeviceStatus.from_bytes(msg.payload))

    def _on_update(self, msg: InboundMessage) -> None:
        parsed = parse_topic(msg.topic)
        try:
            whole = self.asm.add(Chunk.from_bytes(msg.payload))
            if whole is None:
                return
            update = EncryptedUpdate.from_bytes(whole)
            if parsed is None or parsed.device_id != update.device_id:
                raise EdgeFLError("topic/device mismatch")
            if self.registry is not None:
                self.registry.verify(update.device_id, update.signing_bytes(), update.signature)
        except EdgeFLError as exc:
            with self.lock:
                self.rejected.append(str(exc))
            return
        with self.lock:
            self.updates.append(update)
            self.raw_update_payloads.append(whole)
        if self.auto_receipt:
            self.receipt(update, "accepted")

    def _sign(self, message: Any) -> Any:
        return message if self.identity is None else sign_message(message, self.identity)

    def receipt(self, update: EncryptedUpdate, status: str) -> None:
        receipt = self._sign(
            Receipt(
                federation=self.federation,
                round_id=update.round_id,
                device_id=update.device_id,
                update_digest=update.update_digest,
                status=status,
                issued_ms=int(time.time() * 1000),
            )
        )
        self.t.publish(self.topics.ack(update.device_id), receipt.to_bytes(), qos=1)

    def publish_model(self, version: int, weights: np.ndarray) -> GlobalModel:
        raw = np.asarray(weights, dtype="<f4").tobytes()
        parent = self.model.digest if self.model is not None else ZERO
        model = self._sign(
            GlobalModel(
                federation=self.federation,
                version=version,
                round_id=version,
                parent_digest=parent,
                digest=model_digest(version, parent, raw),
                num_params=len(raw) // 4,
                weights=raw,
                created_ms=int(time.time() * 1000),
            )
        )
        chunks = split_payload(
            model.to_bytes(),
            federation=self.federation,
            stream="model",
            sender="aggregator",
            round_id=version,
            max_message_size=self.t.max_message_size,
        )
        for chunk in chunks:
            self.t.publish(self.topics.model(chunk.index), chunk.to_bytes(), qos=1, retain=True)
        self.model = model
        return model

    def announce(
        self,
        round_id: int,
        *,
        dimension: int,
        noise: NoiseSpec | str | None = "default",
        deadline_ms: int | None = None,
        min_clients: int = 1,
        cohort: tuple[str, ...] = (),
        scale: float = 1024.0,
        train: tuple[tuple[str, Any], ...] = (("epochs", 1), ("lr", 0.1), ("batch_size", 8)),
    ) -> RoundAnnouncement:
        spec = PackingSpec.derive(self.pk, max_contributors=10, value_bits=16, scale=scale)
        if noise == "default":
            noise = calibrate(
                DPPolicy(
                    mode="distributed",
                    epsilon=8.0,
                    delta=1e-5,
                    rounds=5,
                    clip=1.0,
                    min_clients=min_clients,
                ),
                scale=scale,
                dimension=dimension,
            )
        assert self.model is not None
        now = int(time.time() * 1000)
        ann = self._sign(
            RoundAnnouncement(
                federation=self.federation,
                round_id=round_id,
                model_version=self.model.version,
                model_digest=self.model.digest,
                issued_ms=now,
                deadline_ms=now + 600_000 if deadline_ms is None else deadline_ms,
                cohort=cohort,
                min_clients=min_clients,
                max_contributors=10,
                key_fingerprint=bytes.fromhex(self.pk.fingerprint),
                packing=spec.to_bytes(),
                packing_digest=spec.digest(),
                privacy=encode_noise_spec(noise if isinstance(noise, NoiseSpec) else None),
                train=train,
            )
        )
        self.t.publish(self.topics.round, ann.to_bytes(), qos=1, retain=True)
        return ann
