"""The device agent: drives a :class:`DeviceSession` with MQTT, disk and a trainer.

One worker thread owns the session. Transport callbacks (paho's thread) only
decode and enqueue; training, privatization, encryption and disk writes run
on the worker thread, so a slow device never blocks the MQTT keepalive.

Order of durable steps for a round (each survives a kill at any point):

1. ledger ``has_spent(round)`` -> the round was charged before: resend the
   stored envelope if there is one, otherwise skip (never re-noise);
2. ledger ``check(cost)`` -> skip with ``budget_exhausted``;
3. train -> delta -> privatize -> seal (sign);
4. ledger ``record(round, cost, idempotency_key=digest(envelope))``: the
   spend is on disk before the update can leave the device;
5. outbox ``store(envelope)``: on disk before the first publish;
6. publish the chunks; resend the same bytes until the receipt.
"""

from __future__ import annotations

import contextlib
import logging
import queue
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edge_sdk._fs import atomic_write
from edge_sdk.agent.config import DeviceConfig
from edge_sdk.agent.outbox import Outbox
from edge_sdk.agent.session import (
    Action,
    ApplyModel,
    ClearOutbox,
    Connected,
    DeviceSession,
    Disconnected,
    Event,
    FetchModel,
    ModelReceived,
    PrepareUpdate,
    PublishStatus,
    PublishUpdate,
    ReceiptReceived,
    RoundReceived,
    Started,
    Tick,
    UpdateFailed,
    UpdateReady,
)
from edge_sdk.agent.trainer import (
    EvaluateResult,
    FloatVec,
    Trainer,
    TrainResult,
    check_evaluate_result,
    check_fit_result,
    check_round_training,
)
from edge_sdk.crypto import (
    BackgroundFill,
    DJNObfuscatorSource,
    ObfuscatorPool,
    PaillierPublicKey,
    load_public_key,
)
from edge_sdk.errors import (
    BudgetExhaustedError,
    ConfigError,
    DecodeError,
    EdgeFLError,
    InvalidSignatureError,
    RemoteProtocolError,
)
from edge_sdk.extras import evaluation_values_from_summary
from edge_sdk.identity import DeviceIdentity, SignedMessage, verify_message
from edge_sdk.pipeline import PrivatizedUpdate, RoundContext, build_update
from edge_sdk.policy import FederationPolicy
from edge_sdk.privacy import PrivacyLedger, update_digest
from edge_sdk.protocol import (
    Chunk,
    DeviceStatus,
    GlobalModel,
    Reassembler,
    Receipt,
    RoundAnnouncement,
    Topics,
    split_payload,
)
from edge_sdk.protocol.limits import (
    MAX_ANNOUNCEMENT_BYTES,
    MAX_CHUNK_BYTES,
    MAX_MODEL_BYTES,
    MAX_RECEIPT_BYTES,
)
from edge_sdk.randomness import RandomSource
from edge_sdk.transport import (
    ConnectionEvent,
    InboundMessage,
    MessageTooLargeError,
    NotConnectedError,
    Transport,
    TransportConfig,
    Will,
)

__all__ = [
    "AgentHalt",
    "AgentHooks",
    "DeviceAgent",
    "TrainResult",
    "Trainer",
    "run_device",
    "transport_config",
]

log = logging.getLogger(__name__)

# A model fetch subscribes at most this many exact model/{i} topics; a larger
# model relies on the wildcard (brokers that need exact topics: RabbitMQ).
_MAX_EXACT_MODEL_TOPICS = 4096


class AgentHalt(Exception):
    """Raised by a hook to stop the agent at once (a simulated power loss).

    The worker thread ends without cleanup, as a reboot would end it; what
    was made durable before (ledger, outbox) is what a restarted agent finds.
    """


@dataclass(slots=True)
class AgentHooks:
    """Test and simulation seams (all optional).

    Attributes:
        before_publish: called with (round_id, attempt) before an envelope
            is published; a simulator uses it to crash a device mid-upload.
        after_step: called with a step name after each durable step
            (``ledger``, ``outbox``, ``published``, ``cleared``).
        slowdown: multiply local training wall time (simulated slow CPU).
    """

    before_publish: Callable[[int, int], None] | None = None
    after_step: Callable[[str, int], None] | None = None
    slowdown: float = 1.0


def transport_config(
    config: DeviceConfig, *, now_ms: int | None = None, **overrides: Any
) -> TransportConfig:
    """The device's transport settings: broker section + last will (status offline).

    The client id is the device id; the session is clean (the outbox, not the
    broker session, carries what must survive).
    """
    topics = Topics(config.federation)
    will = DeviceStatus(
        federation=config.federation,
        device_id=config.device_id,
        state="offline",
        detail="connection lost",
        issued_ms=int(time.time() * 1000) if now_ms is None else now_ms,
    ).to_bytes()
    settings: dict[str, Any] = {
        "url": config.broker["url"],
        "client_id": config.device_id,
        **{k: v for k, v in config.broker.items() if k != "url"},
        "will": Will(topic=topics.status(config.device_id), payload=will, qos=1, retain=True),
        **overrides,
    }
    return TransportConfig(**settings)


def run_device(trainer: Trainer, config: DeviceConfig | str | Path) -> int:
    """Run ``trainer`` as this device over MQTT until SIGTERM / SIGINT: ``edgefl device run``.

    Args:
        trainer: the model (any :class:`~edge_sdk.agent.trainer.Trainer`).
        config: the device's ``device.toml`` (a path) or its loaded config.

    Returns:
        The exit code: 0 when stopped on request, 1 when the agent stopped on
        an error (which is logged and printed).
    """
    from edge_sdk.agent.config import load_device_config
    from edge_sdk.transport import MqttTransport

    cfg = config if isinstance(config, DeviceConfig) else load_device_config(config)
    agent = DeviceAgent(cfg, trainer, MqttTransport(transport_config(cfg)))
    print(
        f"device {cfg.device_id} starting (federation {cfg.federation}, broker "
        f"{cfg.broker['url']}); Ctrl-C to stop",
        flush=True,
    )
    code = agent.run_forever()
    if code != 0:
        print(f"edgefl device: error: {agent.error}", flush=True)
        return 1
    return 0


def load_pinned_policy(config: DeviceConfig) -> FederationPolicy | None:
    """The federation policy a device enforces, checked against its pin.

    The digest comes from ``[keys] policy_digest`` or, if absent, from the
    pin written at enrollment (``state_dir/policy.pin``); a policy file
    without either pin is refused (a device must not trust whatever policy
    file it finds).

    Raises:
        ConfigError: no pin, a policy that is not the pinned one, or too few
            committee signatures.
    """
    if config.policy is None:
        return None
    digest = config.policy_digest
    if digest is None and config.policy_pin_file.exists():
        digest = config.policy_pin_file.read_text(encoding="utf-8").strip() or None
    if digest is None:
        raise ConfigError(
            f"[keys] policy {config.policy} is not pinned: run `edgefl device enroll --policy` "
            "or set [keys] policy_digest"
        )
    return FederationPolicy.load(config.policy, expected_digest=digest)


class DeviceAgent:
    """A device: identity, ledger, outbox, model, trainer and one session.

    Args:
        config: device configuration.
        trainer: local training.
        transport: MQTT (or in-memory) transport; not yet connected.
        clock: milliseconds since the epoch (injected for tests).
        rng: randomness for rounding, noise and obfuscators (OS CSPRNG if None).
        allow_insecure_rng: accept a deterministic ``rng`` (tests and
            reproducible simulations only).
        public_key: the federation's Paillier key (else read from config).
        hooks: simulation and test seams.
        require_privacy: refuse rounds without a noise spec (the default: a
            device never sends an update without its own DP noise). False
            is for HE-only utility studies.
    """

    def __init__(
        self,
        config: DeviceConfig,
        trainer: Trainer,
        transport: Transport,
        *,
        clock: Callable[[], int] | None = None,
        rng: RandomSource | None = None,
        allow_insecure_rng: bool = False,
        public_key: PaillierPublicKey | None = None,
        hooks: AgentHooks | None = None,
        require_privacy: bool = True,
    ) -> None:
        self.config = config
        self.require_privacy = require_privacy
        self.trainer = trainer
        self.transport = transport
        self.clock = clock or (lambda: int(time.time() * 1000))
        self.rng = rng
        self.allow_insecure_rng = allow_insecure_rng
        self.hooks = hooks or AgentHooks()
        self.topics = Topics(config.federation)
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.public_key = public_key or load_public_key(
            config.public_key, expected_fingerprint=config.fingerprint
        )
        self.policy = load_pinned_policy(config)
        if self.policy is not None and self.policy.key_fingerprint != self.public_key.fingerprint:
            raise ConfigError("the federation policy is for another Paillier key")
        if config.identity_file.exists():
            self.identity = DeviceIdentity.load(config.identity_file)
            if self.identity.device_id != config.device_id:
                raise EdgeFLError(
                    f"identity file is for {self.identity.device_id!r}, config says "
                    f"{config.device_id!r}"
                )
        else:
            self.identity = DeviceIdentity.generate(config.device_id)
            self.identity.save(config.identity_file)
        if config.ledger_file.exists():
            self.ledger = PrivacyLedger.open_existing(config.ledger_file)
        else:
            self.ledger = PrivacyLedger(
                config.ledger_file, budget_epsilon=config.budget_epsilon, delta=config.delta
            )
        self.outbox = Outbox(config.outbox_dir)
        # With a committee base, the pool holds DJN obfuscators with their
        # exponents (the binding proof needs them).
        base = None if self.policy is None else self.policy.djn_base
        djn = None if base is None else DJNObfuscatorSource(self.public_key, base)
        self.pool = ObfuscatorPool(config.pool_dir, self.public_key, djn=djn)
        self.session = DeviceSession(
            device_id=config.device_id,
            federation=config.federation,
            resend_initial_ms=int(config.resend_initial_s * 1000),
            resend_max_ms=int(config.resend_max_s * 1000),
            model_fetch_ms=max(1, int(config.model_fetch_s * 1000)),
        )
        self._exact_model: set[str] = set()  # exact model/{i} subscriptions of a fetch
        self.model_fetches = 0
        self._last_model_chunk = float("-inf")  # monotonic time of the last model chunk
        self.weights: FloatVec | None = None
        self.model: GlobalModel | None = None
        self._events: queue.Queue[Event | Callable[[], None] | None] = queue.Queue()
        self._reassembler = Reassembler(max_payload_size=MAX_MODEL_BYTES, max_pending=8)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self.rejected_inbound = 0
        self.last_metrics: dict[str, float] = {}
        self.last_evaluation: EvaluateResult | None = None
        self.last_private: PrivatizedUpdate | None = None
        self._filler: BackgroundFill | None = None
        self.rounds_sent: list[int] = []
        # Aggregator workers per round (the announcement's ``shards``): an
        # update goes to its round's shard topic; a round not seen since a
        # restart goes where the latest announcement says.
        self._shards: dict[int, int] = {}
        self._latest_shards = 1
        self.error: BaseException | None = None
        self._load_model()

    # ---------------------------------------------------------------- startup
    def _load_model(self) -> None:
        path = self.config.model_file
        if not path.exists():
            return
        try:
            model = GlobalModel.from_bytes(path.read_bytes())
        except (DecodeError, OSError) as exc:
            log.error("stored model %s unreadable (%s); waiting for the broker's copy", path, exc)
            return
        if model.num_params == self.trainer.num_params:
            self.model = model
            self.weights = np.frombuffer(model.weights, dtype="<f4").astype(np.float32)

    def start(self, connect_timeout: float | None = None) -> None:
        """Restore state, connect and start the worker thread."""
        entry = self.outbox.latest()
        self._post(
            Started(
                now_ms=self.clock(),
                model_version=None if self.model is None else self.model.version,
                outbox=entry,
            )
        )
        self.transport.on_connection_change(self._on_connection)
        self.transport.subscribe(self.topics.round, self._on_round)
        self.transport.subscribe(self.topics.model_filter, self._on_model_chunk)
        self.transport.subscribe(self.topics.ack(self.config.device_id), self._on_receipt)
        self._thread = threading.Thread(
            target=self._run, name=f"agent-{self.config.device_id}", daemon=True
        )
        self._thread.start()
        self.transport.connect(timeout=connect_timeout)

    def run_forever(
        self,
        *,
        connect_timeout: float | None = None,
        stop_event: threading.Event | None = None,
        handle_signals: bool = True,
        poll_s: float = 0.5,
    ) -> int:
        """Start, run until SIGTERM / SIGINT (or ``stop_event``), stop cleanly.

        This is the loop ``edgefl device run`` runs. Signal handlers are
        installed only when called on the main thread (and ``handle_signals``),
        and the previous handlers are restored on return.

        Args:
            connect_timeout: passed to :meth:`start`.
            stop_event: set it (from any thread) to stop the agent.
            handle_signals: install SIGTERM / SIGINT handlers that stop the agent.
            poll_s: how often the worker's health is checked.

        Returns:
            0 when stopped on request (signal or ``stop_event``), 1 when the
            worker stopped on an error (then in :attr:`error`).
        """
        done = stop_event if stop_event is not None else threading.Event()
        previous: dict[int, Any] = {}
        if handle_signals and threading.current_thread() is threading.main_thread():

            def on_signal(signum: int, frame: object) -> None:
                log.info("device agent %s: signal %d, stopping", self.config.device_id, signum)
                done.set()

            for sig in (signal.SIGTERM, signal.SIGINT):
                previous[int(sig)] = signal.signal(sig, on_signal)
        try:
            self.start(connect_timeout=connect_timeout)
            while not done.wait(poll_s):
                if self.error is not None:
                    break
        finally:
            self.stop()
            for signum, handler in previous.items():
                signal.signal(signum, handler)
        return 1 if self.error is not None else 0

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the worker and close the transport (publishing status offline)."""
        self._stop.set()
        self._events.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
        if self._filler is not None:
            self._filler.stop(timeout)
        with contextlib.suppress(EdgeFLError):
            self._publish_status(PublishStatus(state="offline", round_id=self.session.last_round))
        self.transport.close()

    # ----------------------------------------------------- transport callbacks
    def _post(self, event: Event) -> None:
        self._events.put(event)

    def _post_internal(self, work: Callable[[], None]) -> None:
        """Run ``work`` on the worker thread (transport I/O a handler must not wait for)."""
        self._events.put(work)

    def _on_connection(self, event: ConnectionEvent) -> None:
        now = self.clock()
        self._post(Connected(now_ms=now) if event.connected else Disconnected(now_ms=now))

    def _authentic(self, message: SignedMessage, what: str) -> bool:
        """With a pinned aggregator key, only its signed messages count."""
        key = self.config.aggregator_key
        if key is None:
            return True
        try:
            verify_message(message, key)
        except InvalidSignatureError as exc:
            self.rejected_inbound += 1
            log.warning("ignoring %s: %s (%s)", what, exc, exc.reason)
            return False
        return True

    def _on_round(self, msg: InboundMessage) -> None:
        if not msg.payload:
            return
        try:
            ann = RoundAnnouncement.from_bytes(msg.payload, max_size=MAX_ANNOUNCEMENT_BYTES)
        except DecodeError as exc:
            self.rejected_inbound += 1
            log.warning("ignoring bad round announcement: %s", exc)
            return
        if not self._authentic(ann, "round announcement"):
            return
        self._shards[ann.round_id] = ann.shards
        self._latest_shards = ann.shards
        while len(self._shards) > 16:
            del self._shards[min(self._shards)]
        self._post(RoundReceived(now_ms=self.clock(), announcement=ann))

    def _on_model_chunk(self, msg: InboundMessage) -> None:
        self._take_model_chunk(msg)

    def _take_model_chunk(self, msg: InboundMessage) -> Chunk | None:
        """Reassemble one model chunk (posting the model once whole); the chunk, if valid."""
        if not msg.payload:
            return None  # a cleared retained chunk
        try:
            chunk = Chunk.from_bytes(msg.payload, max_size=MAX_CHUNK_BYTES)
            if chunk.stream != "model" or chunk.federation != self.config.federation:
                raise DecodeError("not a model chunk of this federation")
            self._last_model_chunk = time.monotonic()
            whole = self._reassembler.add(chunk)
            if whole is None:
                return chunk
            model = GlobalModel.from_bytes(whole, max_size=MAX_MODEL_BYTES)
        except DecodeError as exc:
            self.rejected_inbound += 1
            log.warning("ignoring bad model data: %s", exc)
            return None
        if self._authentic(model, "global model"):
            self._post(ModelReceived(now_ms=self.clock(), model=model))
        return chunk

    def _on_receipt(self, msg: InboundMessage) -> None:
        try:
            receipt = Receipt.from_bytes(msg.payload, max_size=MAX_RECEIPT_BYTES)
        except DecodeError as exc:
            self.rejected_inbound += 1
            log.warning("ignoring bad receipt: %s", exc)
            return
        if not self._authentic(receipt, "receipt"):
            return
        self._post(ReceiptReceived(now_ms=self.clock(), receipt=receipt))

    # ------------------------------------------------------------- the worker
    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                try:
                    event = self._events.get(timeout=0.25)
                except queue.Empty:
                    event = Tick(now_ms=self.clock())
                if event is None:
                    break
                if callable(event):
                    event()
                    continue
                self._dispatch(event)
        except AgentHalt as exc:
            self.error = exc
            log.info("device agent %s halted: %s", self.config.device_id, exc)
        except BaseException as exc:  # surfaced to the owner, never silent
            self.error = exc
            log.exception("device agent %s stopped on an error", self.config.device_id)

    def _dispatch(self, event: Event) -> None:
        pending: list[Event] = [event]
        while pending:
            for action in self.session.handle(pending.pop(0)):
                follow_up = self._execute(action)
                if follow_up is not None:
                    pending.append(follow_up)

    def process_pending(self) -> None:
        """Handle queued events on the caller's thread (for tests without a worker)."""
        while True:
            try:
                event = self._events.get_nowait()
            except queue.Empty:
                return
            if callable(event):
                event()
            elif event is not None:
                self._dispatch(event)

    def _execute(self, action: Action) -> Event | None:
        if isinstance(action, PrepareUpdate):
            return self._prepare(action.announcement)
        if isinstance(action, PublishUpdate):
            self._publish_update(action)
            return None
        if isinstance(action, ClearOutbox):
            self.outbox.remove(action.round_id)
            self._step("cleared", action.round_id)
            return None
        if isinstance(action, ApplyModel):
            self._apply_model(action.model)
            return None
        if isinstance(action, PublishStatus):
            self._publish_status(action)
            return None
        if isinstance(action, FetchModel):
            self._fetch_model(action)
            return None
        raise TypeError(f"unknown action {action!r}")

    def _fetch_model(self, action: FetchModel) -> None:
        """Ask the broker for the retained model again (the session's rule 6).

        Re-subscribing the wildcard makes a broker that lost the subscription
        (a cluster that lost a node) send the retained chunks again; an exact
        ``model/0`` subscription reaches brokers that serve retained messages
        only to exact topics (RabbitMQ), and the chunk it brings says how many
        more exact topics to subscribe. Runs on the worker thread (it waits
        for SUBACKs); the exact topics are dropped once the model is applied.
        """
        if time.monotonic() - self._last_model_chunk < self.config.model_fetch_s:
            return  # a model is on its way (a large one over a slow link): no second copy
        self.model_fetches += 1
        log.info(
            "%s: no model v%d yet: asking the broker again (attempt %d)",
            self.config.device_id,
            action.version,
            action.attempt,
        )
        try:
            with contextlib.suppress(EdgeFLError):
                self.transport.unsubscribe(self.topics.model_filter)
            self.transport.subscribe(self.topics.model_filter, self._on_model_chunk)
            first = self.topics.model(0)
            self._exact_model.discard(first)  # subscribe again: the broker resends it
            with contextlib.suppress(EdgeFLError):
                self.transport.unsubscribe(first)
            self._subscribe_exact([first])
        except EdgeFLError as exc:  # not connected, refused: the next attempt retries
            log.warning("%s: fetching the model failed: %s", self.config.device_id, exc)

    def _subscribe_exact(self, topics: list[str]) -> None:
        for topic in topics:
            if topic not in self._exact_model:
                self._exact_model.add(topic)
                self.transport.subscribe(topic, self._on_exact_model_chunk)

    def _on_exact_model_chunk(self, msg: InboundMessage) -> None:
        """A chunk from an exact subscription: the rest of the model on exact topics too."""
        chunk = self._take_model_chunk(msg)
        if chunk is None or msg.topic != self.topics.model(0):
            return
        rest = [self.topics.model(i) for i in range(1, min(chunk.total, _MAX_EXACT_MODEL_TOPICS))]
        if rest:  # on the worker thread: a handler must not wait for SUBACKs
            self._post_internal(lambda: self._subscribe_exact(rest))

    def _drop_exact_model_topics(self) -> None:
        for topic in sorted(self._exact_model):
            with contextlib.suppress(EdgeFLError):
                self.transport.unsubscribe(topic)
        self._exact_model.clear()

    def _step(self, name: str, round_id: int) -> None:
        if self.hooks.after_step is not None:
            self.hooks.after_step(name, round_id)

    def _apply_model(self, model: GlobalModel) -> None:
        if model.num_params != self.trainer.num_params:
            log.error(
                "global model v%d has %d params, local model %d: not applied",
                model.version,
                model.num_params,
                self.trainer.num_params,
            )
            return

        atomic_write(self.config.model_file, model.to_bytes(), mode=0o600)
        self.model = model
        if self._exact_model:
            self._drop_exact_model_topics()
        self.weights = np.frombuffer(model.weights, dtype="<f4").astype(np.float32)
        self.last_evaluation = check_evaluate_result(
            self.trainer, self.trainer.evaluate(self.weights.copy())
        )
        log.info(
            "global model v%d: local loss %.4g on %d examples %s",
            model.version,
            self.last_evaluation.loss,
            self.last_evaluation.num_examples,
            dict(self.last_evaluation.metrics),
        )

    def _prepare(self, ann: RoundAnnouncement) -> Event:
        now = self.clock()

        def fail(reason: str, detail: str = "") -> UpdateFailed:
            log.info("round %d skipped: %s %s", ann.round_id, reason, detail)
            return UpdateFailed(now_ms=now, round_id=ann.round_id, reason=reason, detail=detail)

        try:
            ctx = RoundContext.from_announcement(ann, self.public_key, policy=self.policy)
        except RemoteProtocolError as exc:
            return fail(exc.reason, str(exc))
        if self.ledger.has_spent(ctx.round_key):
            return fail("already_spent", "update for this round was prepared before a restart")
        if ctx.noise is None and self.require_privacy:
            return fail("no_privacy", "round carries no noise spec; this device requires DP")
        cost = ctx.cost
        if cost is not None:
            try:
                self.ledger.check(cost)
            except BudgetExhaustedError as exc:
                return fail("budget_exhausted", str(exc))
            if self.policy is not None:
                try:  # the policy's total, across every announcement so far
                    self.policy.check_lifetime(self.ledger, cost)
                except BudgetExhaustedError as exc:
                    return fail("policy_budget_exhausted", str(exc))
        if self.weights is None or self.model is None:
            return fail("no_model")
        try:  # the announced training settings, checked before any training
            check_round_training(self.trainer, ann.train_config())
        except RemoteProtocolError as exc:
            return fail(exc.reason, str(exc))
        extras = None
        if ctx.evaluate:
            # federated evaluation of the received global model on local data
            evaluation = self.last_evaluation or check_evaluate_result(
                self.trainer, self.trainer.evaluate(self.weights.copy())
            )
            extras = evaluation_values_from_summary(
                examples=evaluation.num_examples,
                accuracy=evaluation.metrics.get("accuracy"),
                mean_loss=evaluation.loss,
                packing=ctx.packing,
            )
        started = time.perf_counter()
        result = check_fit_result(
            self.trainer,
            self.trainer.fit(
                self.weights.copy(), ann.train_config(), seed=(ann.round_id * 1_000_003) % 2**31
            ),
            self.trainer.num_params,
        )
        if self.hooks.slowdown > 1.0:
            time.sleep((time.perf_counter() - started) * (self.hooks.slowdown - 1.0))
        self.last_metrics = dict(result.metrics)
        delta = result.weights.astype(np.float64) - self.weights.astype(np.float64)
        try:
            clip = ann.train_config().get("clip") if ctx.noise is None else None
            update, private = build_update(
                delta,
                ctx,
                self.identity,
                pool=self.pool,
                clip=float(clip) if isinstance(clip, (int, float)) else None,
                extras=extras,
                rng=self.rng,
                allow_insecure_rng=self.allow_insecure_rng,
                now_ms=self.clock(),
            )
        except (ValueError, EdgeFLError) as exc:
            return fail("privatize_failed", str(exc))
        self.last_private = private
        payload = update.to_bytes()
        if cost is not None and ctx.noise is not None:
            self.ledger.record(
                ctx.round_key,
                cost,
                idempotency_key=update_digest(payload),
                federation=ann.federation,
                round_id=ann.round_id,
                noise=ctx.noise.to_dict(),
            )
            self._step("ledger", ann.round_id)
        entry = self.outbox.store(update)
        self._step("outbox", ann.round_id)
        self._keep_pool_filled(update.num_ciphertexts)
        return UpdateReady(now_ms=self.clock(), entry=entry)

    def _keep_pool_filled(self, per_update: int) -> None:
        """Precompute obfuscators while idle, so the next round encrypts at once.

        ``pool_target`` -1 (default) keeps two updates' worth, 0 disables,
        N keeps N. The filler is a low-duty daemon thread; values are
        durable and used once (see ``edge_sdk.crypto.pool``).
        """
        target = self.config.pool_target
        if target == 0 or (self._filler is not None and self._filler.running):
            return
        if target < 0:
            target = 2 * per_update
        self._filler = self.pool.start_background_fill(target, batch=4, interval_s=5.0)

    def _publish_update(self, action: PublishUpdate) -> None:
        entry = action.entry
        if self.hooks.before_publish is not None:
            self.hooks.before_publish(entry.round_id, action.attempt)
        shards = self._shards.get(entry.round_id, self._latest_shards)
        topic = self.topics.round_updates(self.config.device_id, shards)
        limit = self.transport.max_payload_size(topic)
        chunks = split_payload(
            entry.payload,
            federation=self.config.federation,
            stream="update",
            sender=self.config.device_id,
            round_id=entry.round_id,
            max_message_size=limit,
        )
        try:
            for chunk in chunks:
                self.transport.publish(topic, chunk.to_bytes(), qos=1)
        except NotConnectedError:
            log.info("not connected: round %d update stays in the outbox", entry.round_id)
            return
        except MessageTooLargeError as exc:  # the limit was computed above; a bug if hit
            log.error("chunk too large for the broker: %s", exc)
            return
        if entry.round_id not in self.rounds_sent:
            self.rounds_sent.append(entry.round_id)
        self._step("published", entry.round_id)

    def _publish_status(self, action: PublishStatus) -> None:
        status = DeviceStatus(
            federation=self.config.federation,
            device_id=self.config.device_id,
            state=action.state,
            round_id=action.round_id,
            detail=action.detail,
            issued_ms=self.clock(),
        )
        with contextlib.suppress(NotConnectedError):
            self.transport.publish(
                self.topics.status(self.config.device_id), status.to_bytes(), qos=1, retain=True
            )

    @property
    def state_dir(self) -> Path:
        """Where this device keeps its identity, ledger, outbox, model and pool."""
        return self.config.state_dir
