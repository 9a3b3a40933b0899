"""
When to try each queued message, and what to do with the answers.

Due times live in a heap in memory; the queue store is read only at start-up
(L{IQueueStore.recover}) and written after each attempt.  One timer is armed
for the earliest due time.  A recipient that was delivered is never attempted
again, because its state is stored before the message is scheduled again.

Two limits bound the work in flight: C{concurrency} attempts in all, and
C{destinationConcurrency} attempts per destination (a delivery backend and a
recipient domain: one smart host, one MX domain, one maildir domain), so one
slow or huge destination cannot take every slot.  A message whose destination
is full waits, out of the heap, until an attempt there finishes.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger

from relay.bounce import Kind, buildReport, recipientsToNotify
from relay.delivery.router import Router
from relay.envelope import DeliveryResult, Envelope, Recipient, RecipientState, Status

NO_ROUTE = Status(451, "4.3.5", "No route for recipient domain")
# A report (from the null sender) is never bounced, so retrying one whose
# recipient has no route could only end, after max_age, in dropping it: it is
# given up at once instead.  Ordinary mail keeps NO_ROUTE: a configuration
# change may add the route, and its sender learns of it if not.
NO_ROUTE_FOR_REPORT = Status(550, "5.4.4", "No route for recipient domain")
NO_RESULT = Status(451, "4.3.0", "Delivery backend gave no result for this recipient")
BACKEND_FAILED = Status(451, "4.3.0", "Delivery backend failed")


class Scheduler(Service):
    log = Logger()

    def __init__(
        self,
        store: Any,
        router: Router,
        clock: Any,
        retry: Sequence[float],
        maxAge: float,
        concurrency: int = 100,
        attemptTimeout: float = 600.0,
        jitter: float = 0.1,
        rng: random.Random | None = None,
        reportingMTA: str | None = None,
        warnAfter: float = 0.0,
        hold: bool = False,
        destinationConcurrency: int = 20,
        metrics: Any = None,
    ) -> None:
        self.store = store
        self.router = router
        self.clock = clock
        self.retry = tuple(retry)
        self.maxAge = maxAge
        self.concurrency = concurrency
        self.attemptTimeout = attemptTimeout
        self.jitter = jitter
        self._rng = rng or random.Random()
        self.reportingMTA = reportingMTA  # None: send no DSNs (tests of delivery alone)
        self.warnAfter = warnAfter
        self.hold = hold  # keep everything queued, attempt nothing
        self.destinationConcurrency = destinationConcurrency
        self.metrics = metrics
        self._busy: Counter[tuple[str, str]] = Counter()
        self._holding: dict[str, set[tuple[str, str]]] = {}
        self._parked: dict[tuple[str, str], list[str]] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._envelopes: dict[str, Envelope] = {}
        self._active: set[str] = set()
        self._timer: Any = None
        self._running = 0
        self._stopping = False
        self._idle: list[Deferred[None]] = []

    # -- input -----------------------------------------------------------

    def enqueue(self, envelope: Envelope, when: float | None = None) -> None:
        """Take responsibility for a committed message."""
        self._envelopes[envelope.queue_id] = envelope
        self._push(envelope.queue_id, self.clock.seconds() if when is None else when)

    def recovered(self, envelopes: Sequence[Envelope]) -> None:
        """Messages found at start-up: due now (at-least-once after a crash)."""
        now = self.clock.seconds()
        for envelope in envelopes:
            if envelope.pending():
                self.enqueue(envelope, now)
            else:
                self.store.remove(envelope.queue_id)
        if envelopes:
            self.log.info("recovered {count} queued messages", count=len(envelopes))
        if self.hold:
            self.log.warn("[queue] hold = yes: messages are accepted and queued, none is delivered")

    def queued(self) -> int:
        return len(self._envelopes)

    def busy(self) -> dict[tuple[str, str], int]:
        """Attempts in flight per destination (backend name, domain)."""
        return dict(self._busy)

    # -- timer -----------------------------------------------------------

    def _push(self, queueID: str, due: float) -> None:
        heapq.heappush(self._heap, (due, next(self._seq), queueID))
        self._arm()

    def _arm(self) -> None:
        if self.hold or self._stopping or not self._heap or self._running >= self.concurrency:
            return
        delay = max(0.0, self._heap[0][0] - self.clock.seconds())
        if self._timer is not None and self._timer.active():
            if self._timer.getTime() <= self.clock.seconds() + delay:
                return
            self._timer.cancel()
        self._timer = self.clock.callLater(delay, self._wake)

    def _wake(self) -> None:
        self._timer = None
        now = self.clock.seconds()
        while self._heap and self._heap[0][0] <= now and self._running < self.concurrency:
            _, _, queueID = heapq.heappop(self._heap)
            envelope = self._envelopes.get(queueID)
            if envelope is None or queueID in self._active:
                continue
            destinations = self._destinations(envelope)
            full = [d for d in destinations if self._busy[d] >= self.destinationConcurrency]
            if full:
                self._parked.setdefault(full[0], []).append(queueID)
                continue
            self._busy.update(destinations)
            self._holding[queueID] = destinations
            self._running += 1
            self._active.add(queueID)
            d = Deferred.fromCoroutine(self._attempt(envelope))
            d.addErrback(lambda f, q=queueID: self.log.failure("attempt on {queue_id} failed", f, queue_id=q))
            d.addBoth(self._finished, queueID)
        self._arm()

    def _destinations(self, envelope: Envelope) -> set[tuple[str, str]]:
        return {
            (self.router.backendName(r.address) or "", r.address.rpartition("@")[2].lower()) for r in envelope.pending()
        }

    def _finished(self, _: object, queueID: str) -> None:
        self._running -= 1
        self._active.discard(queueID)
        now = self.clock.seconds()
        for destination in self._holding.pop(queueID, ()):
            self._busy[destination] -= 1
            if not self._busy[destination]:
                del self._busy[destination]
            # Whoever waited for this destination is due again; if another
            # destination of theirs is still full, they park there instead.
            for waiting in self._parked.pop(destination, ()):
                heapq.heappush(self._heap, (now, next(self._seq), waiting))
        if self._running == 0:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)
        self._arm()

    # -- one attempt -----------------------------------------------------

    async def _attempt(self, envelope: Envelope) -> None:
        groups, unrouted = self.router.group(envelope.pending())
        noRoute = NO_ROUTE_FOR_REPORT if envelope.sender == "" else NO_ROUTE
        results: list[tuple[Recipient, Status, str | None]] = [(r, noRoute, None) for r in unrouted]
        attempts = [(name, rcpts, self._deliver(name, envelope, rcpts)) for name, rcpts in groups.items()]
        relayed: list[Recipient] = []  # delivered to a next hop that does not report success itself
        passed: set[str] = set()  # delivered to a next hop that took the DSN request
        for name, recipients, d in attempts:
            byAddress = {result.recipient: result for result in await d}
            for recipient in recipients:
                result = byAddress.get(recipient.address)
                results.append((recipient, result.status if result else NO_RESULT, name))
                if result is None or not result.status.ok or result.dsnPassed is None:
                    continue
                if result.dsnPassed:
                    passed.add(recipient.address)
                else:
                    relayed.append(recipient)
        now = self.clock.seconds()
        for recipient, status, backend in results:
            self._apply(envelope, recipient, status, backend, now)
        # Reports are queued before the original's state is stored: after a
        # crash in between, a report may go twice, never zero times.
        failed = [r for r, _, _ in results if r.state is RecipientState.FAILED]
        relayedHere = {r.address for r in relayed}
        delivered = [
            r
            for r, _, _ in results
            if r.state is RecipientState.DELIVERED and r.address not in passed and r.address not in relayedHere
        ]
        await self._report(envelope, failed, Kind.FAILURE, now)
        await self._report(envelope, delivered, Kind.SUCCESS, now)
        await self._report(envelope, relayed, Kind.RELAYED, now)
        pending = envelope.pending()
        if pending and self.warnAfter and now - envelope.received_at >= self.warnAfter:
            if not envelope.extra.get("delay_warned"):
                envelope.extra["delay_warned"] = True
                await self._report(envelope, pending, Kind.DELAY, now)
        if not envelope.pending():
            del self._envelopes[envelope.queue_id]
            await maybeDeferred(self.store.remove, envelope.queue_id)
            return
        await maybeDeferred(self.store.update, envelope)
        if not self._stopping:
            self._push(envelope.queue_id, min(r.next_attempt or now for r in envelope.pending()))

    async def _report(self, envelope: Envelope, recipients: list[Recipient], kind: Kind, now: float) -> None:
        if not recipients or self.reportingMTA is None:
            return
        if envelope.sender == "" and kind is Kind.FAILURE:
            for recipient in recipients:
                self.log.warn(
                    "dropped undeliverable report {queue_id} to=<{to}>: {status}",
                    queue_id=envelope.queue_id,
                    to=recipient.address,
                    status=str(recipient.last_status),
                )
            return
        notify = recipientsToNotify(envelope, recipients, kind)
        if not notify:
            return
        try:
            with self.store.openData(envelope.queue_id) as original:
                data = buildReport(
                    envelope,
                    notify,
                    kind,
                    self.reportingMTA,
                    original,
                    now,
                    retryUntil=envelope.received_at + self.maxAge,
                )
            incoming = self.store.begin()
            incoming.write(data)
            report = Envelope(incoming.queue_id, "", [Recipient(envelope.sender)], now, size=len(data), body="8BITMIME")
            await maybeDeferred(incoming.commit, report)
        except Exception:
            self.log.failure(
                "could not queue a {kind} report for {queue_id}", kind=kind.value, queue_id=envelope.queue_id
            )
            return
        self.log.info(
            "report {queue_id}: {kind} notice for {original} to=<{to}>",
            queue_id=report.queue_id,
            kind=kind.value,
            original=envelope.queue_id,
            to=envelope.sender,
        )
        self.enqueue(report)

    def _deliver(self, name: str, envelope: Envelope, recipients: list[Recipient]) -> Deferred[list[DeliveryResult]]:
        backend = self.router.backends[name]
        d = maybeDeferred(backend.deliver, envelope, recipients, lambda: self.store.openData(envelope.queue_id))
        d.addTimeout(self.attemptTimeout, self.clock)

        def failed(failure: Any) -> list[DeliveryResult]:
            self.log.failure(
                "delivery backend {backend} failed on {queue_id}", failure, backend=name, queue_id=envelope.queue_id
            )
            if self.metrics is not None:
                self.metrics.pluginFailed("backend", name)
            return [DeliveryResult(r.address, BACKEND_FAILED) for r in recipients]

        d.addErrback(failed)
        return d

    def _apply(self, envelope: Envelope, recipient: Recipient, status: Status, backend: str | None, now: float) -> None:
        recipient.attempts += 1
        recipient.last_status = status
        recipient.backend = backend
        if status.ok:
            recipient.state = RecipientState.DELIVERED
            recipient.next_attempt = None
        elif status.permanent:
            recipient.state = RecipientState.FAILED
            recipient.next_attempt = None
        elif now - envelope.received_at >= self.maxAge:
            recipient.state = RecipientState.FAILED
            recipient.next_attempt = None
        else:
            delay = self.retry[min(recipient.attempts - 1, len(self.retry) - 1)]
            delay *= 1 + self._rng.uniform(-self.jitter, self.jitter)
            recipient.next_attempt = now + delay
        outcome = "deferred"
        if recipient.state is RecipientState.DELIVERED:
            outcome = "delivered"
        elif recipient.state is RecipientState.FAILED:
            outcome = "failed" if status.permanent else "expired"
        if self.metrics is not None:
            self.metrics.outcomes.labels(backend=backend or "-", outcome=outcome).inc()
        self.log.info(
            "{outcome} {queue_id} to=<{to}> backend={backend} status={status} delay={delay:.3f}s attempts={attempts}",
            outcome=outcome,
            queue_id=envelope.queue_id,
            to=recipient.address,
            backend=backend or "-",
            status=str(status),
            delay=now - envelope.received_at,
            attempts=recipient.attempts,
        )

    # -- service ---------------------------------------------------------

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self._stopping = True
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None
        if self._running == 0:
            return None
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d
