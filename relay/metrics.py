"""
What the relay counts, for Prometheus (``[metrics] endpoint``, text format).

One registry per relay, passed to whoever counts; nothing is registered in
prometheus_client's global default registry.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


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
        self.sessionsOpen = Gauge("relay_sessions_open", "SMTP sessions open (admitted)", registry=self.registry)
        self.rejected = Counter(
            "relay_messages_rejected",
            "Recipients, messages and connections refused, by reason (the reason of the event=rejected log line)",
            ["reason"],
            registry=self.registry,
        )
        self.queueByState = Gauge(
            "relay_queue_messages",
            "Messages in the queue by state: active (in memory, being or about to be attempted), waiting (on disk)",
            ["state"],
            registry=self.registry,
        )
        self.oldestAge = Gauge(
            "relay_queue_oldest_age_seconds",
            "Age of the oldest queued message, deferred mail on disk included (0 when the queue is empty)",
            registry=self.registry,
        )
        self.deliveryLatency = Histogram(
            "relay_delivery_seconds",
            "Time one delivery attempt took, from the backend's call to its results, by backend",
            ["backend"],
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600),
            registry=self.registry,
        )

        self.commitBatchSize = Histogram(
            "relay_queue_commit_batch_size",
            "Queue changes (commits, updates, removals) made durable together by one batch of the queue store's "
            "group commit (one fsync of the queue directory); only stores that batch report it",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
            registry=self.registry,
        )

    def watchStore(self, store: Any) -> None:
        """Observe the batch sizes of C{store}'s group commit, if it has the optional hook (the filesystem store)."""
        observe = getattr(store, "observeBatches", None)
        if observe is not None:
            observe(self.commitBatchSize.observe)

    def watchScheduler(self, scheduler: Any) -> None:
        """Read the queue's figures from C{scheduler} at each scrape."""
        self.queued.set_function(scheduler.queued)
        self.active.set_function(scheduler.held)
        self.queueByState.labels(state="active").set_function(scheduler.held)
        self.queueByState.labels(state="waiting").set_function(lambda: max(0, scheduler.queued() - scheduler.held()))
        self.oldestAge.set_function(scheduler.oldestAge)

    def pluginFailed(self, kind: str, plugin: str) -> None:
        self.pluginFailures.labels(kind=kind, plugin=plugin).inc()

    def resource(self) -> Any:
        from prometheus_client.twisted import MetricsResource

        return MetricsResource(registry=self.registry)
