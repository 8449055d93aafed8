"""Prometheus metrics of the aggregator (optional: prometheus-client is not a runtime dep).

prometheus-client ships in the ``sim`` extra. When it is missing, or metrics
are disabled, every method is a no-op and the service runs unchanged.

| metric | type | meaning |
|---|---|---|
| ``edgefl_updates_accepted_total`` | counter | updates summed (durably) |
| ``edgefl_receipts_total{status}`` | counter | receipts sent: accepted, duplicate, late, rejected |
| ``edgefl_rejections_total{reason}`` | counter | refused messages by precise reason |
| ``edgefl_alerts_total{kind}`` | counter | equivocation, overflow, refused sums... |
| ``edgefl_rounds_total{outcome}`` | counter | finished rounds: ok, quorum, overflow, refused:... |
| ``edgefl_round_id`` | gauge | current round |
| ``edgefl_round_contributors`` | gauge | updates in the current round's sum |
| ``edgefl_model_version`` | gauge | latest global model version |
| ``edgefl_decrypt_seconds`` | histogram | in-process key holder time per round |
| ``edgefl_publish_failures_total`` | counter | publishes that failed (disconnected) |
"""

from __future__ import annotations

import logging
from typing import Any

__all__ = ["Metrics"]

log = logging.getLogger("edgefl.aggregator.metrics")


class Metrics:
    """Aggregator metrics on a private registry.

    Args:
        enabled: create the metrics (needs prometheus-client).
        port: serve them over HTTP on this port (0: do not serve).
        addr: bind address for the HTTP endpoint.
    """

    def __init__(self, *, enabled: bool = True, port: int = 0, addr: str = "127.0.0.1") -> None:
        """Create the metrics; degrade to no-ops without prometheus-client."""
        self.enabled = False
        self.registry: Any = None
        if not enabled:
            return
        try:
            import prometheus_client as prom
        except ImportError:
            log.warning("prometheus-client is not installed: metrics disabled")
            return
        reg = prom.CollectorRegistry()
        self.registry = reg
        self._accepted = prom.Counter("edgefl_updates_accepted", "Updates summed", registry=reg)
        self._receipts = prom.Counter("edgefl_receipts", "Receipts sent", ["status"], registry=reg)
        self._rejections = prom.Counter(
            "edgefl_rejections", "Refused messages", ["reason"], registry=reg
        )
        self._alerts = prom.Counter("edgefl_alerts", "Alerts", ["kind"], registry=reg)
        self._rounds = prom.Counter("edgefl_rounds", "Finished rounds", ["outcome"], registry=reg)
        self._round = prom.Gauge("edgefl_round_id", "Current round", registry=reg)
        self._contributors = prom.Gauge(
            "edgefl_round_contributors", "Updates in the current sum", registry=reg
        )
        self._version = prom.Gauge("edgefl_model_version", "Latest model version", registry=reg)
        self._decrypt = prom.Histogram(
            "edgefl_decrypt_seconds", "Key holder time per round", registry=reg
        )
        self._publish_failed = prom.Counter(
            "edgefl_publish_failures", "Failed publishes", registry=reg
        )
        self._relayed = prom.Counter(
            "edgefl_witness_relayed",
            "Updates relayed to a committee member that missed them",
            ["holder"],
            registry=reg,
        )
        self.enabled = True
        if port:
            prom.start_http_server(port, addr=addr, registry=reg)

    def accepted(self, count: int) -> None:
        """An update was accepted; ``count`` is the round's new total."""
        if self.enabled:
            self._accepted.inc()
            self._contributors.set(count)

    def receipt(self, status: str) -> None:
        """A receipt was sent."""
        if self.enabled:
            self._receipts.labels(status=status).inc()

    def rejection(self, reason: str) -> None:
        """A message was refused."""
        if self.enabled:
            self._rejections.labels(reason=reason).inc()

    def alert(self, kind: str) -> None:
        """An alert was raised."""
        if self.enabled:
            self._alerts.labels(kind=kind).inc()

    def round_finished(self, outcome: str) -> None:
        """A round ended."""
        if self.enabled:
            self._rounds.labels(outcome=outcome.split(":")[0]).inc()

    def state(self, *, round_id: int, contributors: int, model_version: int) -> None:
        """Set the gauges."""
        if self.enabled:
            self._round.set(round_id)
            self._contributors.set(contributors)
            self._version.set(model_version)

    def decrypt_seconds(self, seconds: float) -> None:
        """Time of one in-process decryption."""
        if self.enabled:
            self._decrypt.observe(seconds)

    def publish_failed(self) -> None:
        """A publish failed."""
        if self.enabled:
            self._publish_failed.inc()

    def relayed(self, holder: str) -> None:
        """A kept update was relayed to ``holder`` (its broker lost the copy)."""
        if self.enabled:
            self._relayed.labels(holder=holder).inc()

    def value(self, name: str, **labels: str) -> float | None:
        """Read a sample (tests and ``status``); None when disabled or absent."""
        if not self.enabled:
            return None
        result: float | None = self.registry.get_sample_value(name, labels or None)
        return result
