"""
What the relay counts, for Prometheus (``[metrics] endpoint``, text format).

One registry per relay, passed to whoever counts; nothing is registered in
prometheus_client's global default registry.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.accepted = Counter("relay_messages_accepted", "Messages acknowledged with 250", registry=self.registry)
        self.outcomes = Counter(
            "relay_recipient_outcomes",
            "Recipient results of delivery attempts",
            ["backend", "outcome"],
            registry=self.registry,
        )
        self.pluginFailures = Counter(
            "relay_plugin_failures",
            "Plugin calls that raised or did not answer in time",
            ["kind", "plugin"],
            registry=self.registry,
        )
        self.queued = Gauge("relay_queued_messages", "Messages in the queue", registry=self.registry)
        self.active = Gauge(
            "relay_active_messages", "Messages held in memory by the scheduler (the active set)", registry=self.registry
        )
        self.storeFailures = Counter(
            "relay_queue_store_failures",
            "Queue store operations that failed (the message is retried, never dropped)",
            ["operation"],
            registry=self.registry,
        )

    def pluginFailed(self, kind: str, plugin: str) -> None:
        self.pluginFailures.labels(kind=kind, plugin=plugin).inc()

    def resource(self) -> Any:
        from prometheus_client.twisted import MetricsResource

        return MetricsResource(registry=self.registry)
