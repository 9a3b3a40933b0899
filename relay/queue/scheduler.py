"""
When to try each queued message, and what to do with the answers.

The queue may hold millions of messages (an outage downstream, a hold), so the
scheduler keeps only a bounded I{active set} in memory, as Postfix's queue
manager does: at most C{activeLimit} envelopes, with their due times in a heap
and one timer armed for the earliest.  Messages come in two ways: from the
server right after their commit (L{Scheduler.enqueue}; when the active set is
full the message stays on disk only, and the scheduler notes that the disk
has something due), and from the store, by L{IQueueStore.scan} (the due
messages, earliest first, as many as there is room for) and
L{IQueueStore.load}.  A message deferred to a time beyond the scan horizon
leaves memory once its new state is stored, and a later scan brings it back
when it is due.

Scans are sparing, since one may cost time in proportion to the queue: there
is at most one at a time, at most one every C{scanSpacing} seconds, and only
when the active set has room and the disk may hold something due (a scan
said so, or a commit overflowed), or every C{rescanInterval} for changes made
behind the scheduler's back (and to count the queue afresh).  A refill waits
for a quarter of the active set to be free unless nothing in memory is due.

A recipient that was delivered is never attempted again while the process
runs: an attempt's outcome is stored (L{IQueueStore.update}) before the
message is attempted again.  A store that fails to update or remove a message
costs it a delay, never its place: the message stays in memory with what was
attempted and the store is asked again, with a growing delay, before any
further delivery attempt.  Only a crash before the store succeeds brings the
old state back, and with it a possible second copy, never a loss.

Two limits bound the work in flight: C{concurrency} attempts in all, and
C{destinationConcurrency} attempts per destination (a delivery backend and a
recipient domain: one smart host, one MX domain, one maildir domain), so one
slow or huge destination cannot take every slot.  A message whose destination
is full waits, out of the heap, until an attempt there has its answers.  The
slot is given back then, not once the outcome is stored: storing is the
queue's work, not the destination's, and a slot held through the store's
next batch of fsyncs would leave the next hop idle for it.

A store shared by several relays (the postgres store) has the optional
C{claim}: any node may hold a message in memory, but it attempts or changes
one only once its claim succeeds.  The claim gives the envelope as stored,
which wins over the copy in memory (another node may have attempted, held or
flushed it since): a message another live node holds, or that is gone, leaves
memory; one held or due later is not attempted now.  Operators' commands claim
too, waiting a little for another node's attempt, and the listing comes from
the store's C{listing} (the whole cluster's queue).  Stores without C{claim}
(filesystem, memory) are used exactly as before.
"""

from __future__ import annotations

import heapq
import itertools
import random
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from twisted.application.service import Service
from twisted.internet.defer import Deferred, maybeDeferred
from twisted.logger import Logger
from twisted.python.failure import Failure

from relay.bounce import Kind, buildReport, recipientsToNotify
from relay.delivery.router import Router
from relay.envelope import DeliveryResult, Envelope, QueueScan, Recipient, RecipientState, Status
from relay.logs import logEvent
from relay.queue.memory import dueTime

NO_ROUTE = Status(451, "4.3.5", "No route for recipient domain")
# A report (from the null sender) is never bounced, so retrying one whose
# recipient has no route could only end, after max_age, in dropping it: it is
# given up at once instead.  Ordinary mail keeps NO_ROUTE: a configuration
# change may add the route, and its sender learns of it if not.
NO_ROUTE_FOR_REPORT = Status(550, "5.4.4", "No route for recipient domain")
NO_RESULT = Status(451, "4.3.0", "Delivery backend gave no result for this recipient")
BACKEND_FAILED = Status(451, "4.3.0", "Delivery backend failed")

# Loads asked of the store at once while filling the active set.
LOADS_IN_FLIGHT = 16

# A held message's pending recipients are due at this time (2106), so no scan
# ever finds it due and no store needs to know about holds: the flag itself
# (extra["held"]) and this due time are stored together by one update, and
# both survive a restart.  Release makes them due now.
HELD_UNTIL = float(2**32)
# Past every due time a store can record (nanoseconds fit in 64 bits): a scan
# this far ahead lists the whole queue.
EVERYTHING = float(2**33)
# At most this many messages are listed by one operator's command.
LIST_LIMIT = 1_000_000
BOUNCED = Status(550, "5.0.0", "Returned to the sender by the postmaster")


class UnknownMessage(Exception):
    """An operator's command named a queue id that is not (or no longer) queued."""


class OperationRefused(Exception):
    """An operator's command cannot be done on this message now; the text says why."""


def isHeld(envelope: Envelope) -> bool:
    return bool(envelope.extra.get("held"))


def matchesDomain(address: str, domain: str) -> bool:
    """
    C{domain} as ETRN and C{relayctl flush --domain} take it: C{example.org}
    is that domain alone, C{@example.org} that domain and its sub-domains
    (RFC 1985 section 5.3).
    """
    got = address.rpartition("@")[2].lower().rstrip(".")
    want = domain.lower().rstrip(".")
    if want.startswith("@"):
        want = want[1:]
        return got == want or got.endswith("." + want)
    return got == want


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
        activeLimit: int = 10_000,
        horizon: float = 60.0,
        scanSpacing: float = 1.0,
        rescanInterval: float = 300.0,
        storeRetry: tuple[float, float] = (5.0, 300.0),
        recoveryRate: float = 200.0,
        recoverySpread: float = 60.0,
        claimWaits: Sequence[float] = (0.5, 1.0, 2.0, 4.0),
    ) -> None:
        """
        @param activeLimit: envelopes held in memory at most.
        @param horizon: a deferred message due later than this leaves memory;
            a scan takes the messages due within it.
        @param scanSpacing: seconds between two scans at least.
        @param rescanInterval: a scan at least this often, whatever is known.
        @param storeRetry: the first and the longest delay before a failed
            update or removal is tried again (doubling in between).
        @param recoveryRate: messages per second that were already due at
            start-up are spread over (their number / this) seconds...
        @param recoverySpread: ...at most this many, so that a restart with a
            large backlog is not a thundering herd.
        @param claimWaits: with a shared store, the pauses before an
            operator's command tries again to claim a message another node is
            delivering; after the last, the command is refused naming it.
        """
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
        self.activeLimit = activeLimit
        self.horizon = horizon
        self.scanSpacing = scanSpacing
        self.rescanInterval = rescanInterval
        within = getattr(store, "rescanWithin", None)  # a shared store's bound (IQueueStore)
        if within:
            self.rescanInterval = min(rescanInterval, float(within))
        self.storeRetry = storeRetry
        self.recoveryRate = recoveryRate
        self.recoverySpread = recoverySpread
        self.claimWaits = tuple(claimWaits)
        self._shared = getattr(store, "claim", None) is not None  # IQueueStore's optional claim()
        self._claimed: set[str] = set()  # claimed through the store by an operator's command
        self._busy: Counter[tuple[str, str]] = Counter()
        self._holding: dict[str, set[tuple[str, str]]] = {}  # attempts in flight, until stored
        self._slots: dict[str, set[tuple[str, str]]] = {}  # destination slots taken, until answered
        self._parked: dict[tuple[str, str], list[str]] = {}
        self._heap: list[tuple[float, int, str]] = []
        self._seq = itertools.count()
        self._scheduled: dict[str, int] = {}  # queue id -> the heap entry that counts
        self._envelopes: dict[str, Envelope] = {}  # the active set
        self._active: set[str] = set()  # being attempted (or stored) now
        self._unsaved: dict[str, int] = {}  # queue id -> store failures in a row
        self._unclaimable: dict[str, int] = {}  # queue id -> claims failed in a row (shared stores)
        self._timer: Any = None
        self._running = 0
        self._stopping = False
        self._idle: list[Deferred[None]] = []
        # What is on disk only.
        self._stored = 0  # messages in the store, as last counted and kept up since
        self._diskNext: float | None = None  # the disk may hold a message due then
        self._diskOldest: float | None = None  # arrival of the oldest message on disk, as of the last scan
        self._recovered = False
        self._recoveredAt = 0.0
        self._counted = True  # False until a scan counts a queue recovery did not
        self._spread = 0.0
        self._scanning = False
        self._scanTimer: Any = None
        self._lastScan: float | None = None
        self._notBefore = 0.0  # after a failed scan
        self._reserved = 0  # room promised to the scan in progress
        self._scanNote: float | None = None  # due times noted while it runs
        self._gone: set[str] = set()  # removed while it runs
        self._toLoad: list[tuple[float, str]] = []
        self._loading = 0
        self._inLoadMore = False
        self._operating: set[str] = set()  # queue ids an operator's command is working on
        self._attempted: dict[str, list[Deferred[None]]] = {}  # waiting for an attempt in flight to end
        self.scans = 0  # for tests and metrics

    # -- input -----------------------------------------------------------

    def enqueue(self, envelope: Envelope, when: float | None = None) -> None:
        """
        Take responsibility for a committed message: it joins the active set,
        or, if that is full, stays on disk for a scan to find.
        """
        self._stored += 1
        now = self.clock.seconds()
        due = now if when is None else when
        if self.hold:
            return  # nothing is attempted: the store keeps it
        if envelope.queue_id in self._envelopes:
            return
        if self._room() <= 0 or self._stopping:
            self._noteDisk(due)
            return
        self._envelopes[envelope.queue_id] = envelope
        self._push(envelope.queue_id, due)

    def recovered(self, count: int | None) -> None:
        """
        The store's recovery found C{count} committed messages (C{None}: it
        did not count them, the first scan does, even under hold): fill the
        active set from scans.  Messages already due are spread over up to
        C{recoverySpread} seconds, in proportion to C{count}; the others keep
        their stored next attempt.
        """
        self._recovered = True
        self._recoveredAt = self.clock.seconds()
        if count is None:
            self._counted = False
            self.log.info("recovered the queue; its first scan counts it")
        else:
            self._countedQueue(count)
        if self.hold:
            self.log.warn("[queue] hold = yes: messages are accepted and queued, none is delivered")
        if count is None or count:
            self._noteDisk(self._recoveredAt)
        self._armScan()

    def _countedQueue(self, count: int) -> None:
        """The queue recovered holds C{count} messages: spread those due over a time in proportion."""
        self._counted = True
        self._stored += count
        self._spread = min(self.recoverySpread, count / self.recoveryRate) if self.recoveryRate > 0 else 0.0
        self.log.info("recovered {count} queued messages", count=count)

    def queued(self) -> int:
        """
        Messages in the queue: what the last scan (or recovery) counted, plus
        what was committed since, minus what was removed since.  Exact while
        nothing else writes to the store; a scan that runs while messages
        come and go may be off by those, until the next one.
        """
        return max(0, self._stored)

    def held(self) -> int:
        """Envelopes in memory: the active set."""
        return len(self._envelopes)

    def oldestAge(self) -> float:
        """
        Seconds since the oldest queued message arrived; 0 when nothing is
        queued.  The active set's messages are known here; deferred mail left
        on disk is known by the store's last scan (L{QueueScan.oldest}), so a
        message delivered since that scan may still count until the next one.
        """
        arrivals = [e.received_at for e in self._envelopes.values()]
        if self._diskOldest is not None and self._stored:
            arrivals.append(self._diskOldest)
        if not arrivals:
            return 0.0
        return max(0.0, self.clock.seconds() - min(arrivals))

    def busy(self) -> dict[tuple[str, str], int]:
        """Attempts in flight per destination (backend name, domain)."""
        return dict(self._busy)

    # -- the active set --------------------------------------------------

    def _room(self) -> int:
        return self.activeLimit - len(self._envelopes) - self._reserved

    def _forget(self, queueID: str, removed: bool) -> None:
        """The message leaves memory: removed from the store, or to wait there."""
        self._envelopes.pop(queueID, None)
        self._scheduled.pop(queueID, None)
        self._unsaved.pop(queueID, None)
        self._unclaimable.pop(queueID, None)
        if removed:
            self._stored -= 1
            if self._scanning:
                self._gone.add(queueID)
        self._armScan()

    def _noteDisk(self, due: float) -> None:
        """The disk holds a message due at C{due} that memory does not."""
        if self._scanning:
            self._scanNote = due if self._scanNote is None else min(self._scanNote, due)
        self._diskNext = due if self._diskNext is None else min(self._diskNext, due)
        self._armScan()

    # -- scans -----------------------------------------------------------

    def _nothingDue(self) -> bool:
        now = self.clock.seconds()
        return self._running == 0 and (not self._heap or self._heap[0][0] > now)

    def _armScan(self) -> None:
        if (self.hold and self._counted) or self._stopping or self._scanning or not self._recovered:
            return
        now = self.clock.seconds()
        earliest = self._notBefore
        if self._lastScan is not None:
            earliest = max(earliest, self._lastScan + self.scanSpacing)
        when = (self._lastScan if self._lastScan is not None else now) + self.rescanInterval
        room = self._room()
        if self._diskNext is not None and room > 0:
            if room >= max(1, self.activeLimit // 4) or self._nothingDue():
                when = min(when, max(self._diskNext, earliest))
        when = max(when, earliest)
        timer = self._scanTimer
        if timer is not None and timer.active():
            if timer.getTime() <= when:
                return
            timer.cancel()
        self._scanTimer = self.clock.callLater(max(0.0, when - now), self._scan)

    def _scan(self) -> None:
        self._scanTimer = None
        if self._scanning or self._stopping:
            return
        now = self.clock.seconds()
        self._scanning = True
        self._lastScan = now
        self.scans += 1
        limit = 0 if self.hold else max(0, self._room())  # under hold, a scan only counts
        self._reserved = limit
        self._scanNote = None
        self._gone = set()
        exclude = frozenset(self._envelopes)
        d = maybeDeferred(self.store.scan, now + self.horizon, limit, exclude)
        d.addCallbacks(self._scanned, self._scanFailed)
        d.addErrback(lambda f: self.log.failure("queue scan result lost", f))

    def _scanned(self, scan: QueueScan) -> None:
        if self._stopping:
            self._scanDone()
            return
        if not self._counted:
            self._stored = 0
            self._countedQueue(scan.total)
        self._stored = scan.total
        self._diskNext = scan.later
        self._diskOldest = getattr(scan, "oldest", None)  # a store's own QueueScan-alike may lack it
        if self._scanNote is not None:
            self._diskNext = self._scanNote if self._diskNext is None else min(self._diskNext, self._scanNote)
        wanted = [(due, q) for due, q in scan.due[: self._reserved] if q not in self._envelopes and q not in self._gone]
        self._reserved = len(wanted)
        self._toLoad = wanted[::-1]  # popped from the end: earliest first
        self._loadMore()

    def _scanFailed(self, failure: Failure) -> None:
        self.log.warn(
            "queue scan failed: {error}; next scan in {delay:.0f}s",
            error=failure.getErrorMessage(),
            delay=self.rescanInterval / 10,
        )
        self._notBefore = self.clock.seconds() + self.rescanInterval / 10
        self._storeFailed("scan")
        self._scanDone()

    def _loadMore(self) -> None:
        if self._inLoadMore:
            return  # a load that answered at once: the running loop goes on
        self._inLoadMore = True
        try:
            while self._toLoad and self._loading < LOADS_IN_FLIGHT:
                due, queueID = self._toLoad.pop()
                self._loading += 1
                d = maybeDeferred(self.store.load, queueID)
                d.addBoth(self._loaded, queueID, due)
                d.addErrback(lambda f: self.log.failure("loading a message went wrong", f))
        finally:
            self._inLoadMore = False
        if not self._toLoad and not self._loading and self._scanning:
            self._scanDone()

    def _loaded(self, result: Envelope | Failure, queueID: str, due: float) -> None:
        self._loading -= 1
        self._reserved -= 1
        try:
            self._take(result, queueID, due)
        finally:
            self._loadMore()  # whatever happened to this one, the scan goes on

    def _take(self, result: Envelope | Failure, queueID: str, due: float) -> None:
        if isinstance(result, Failure):
            if result.check(FileNotFoundError):
                pass  # removed since the scan: nothing to do
            elif result.check(ValueError):
                self.log.warn("skipped damaged message {queue_id}: {error}", queue_id=queueID, error=result.value)
            else:
                self.log.warn(
                    "could not load {queue_id}: {error}; tried again at a later scan",
                    queue_id=queueID,
                    error=result.getErrorMessage(),
                )
                self._storeFailed("load")
        elif isHeld(result):
            pass  # a held message is never attempted; found only if a scan looked past HELD_UNTIL
        elif not (self._stopping or queueID in self._envelopes or queueID in self._gone):
            self._envelopes[queueID] = result
            if not result.pending():
                # All done, but its removal never happened (a crash): remove it now.
                self._unsaved[queueID] = 0
                due = self.clock.seconds()
            elif self._spread and due <= self._recoveredAt:
                # Due before this start: spread, so a backlog is not one burst.
                due = self._recoveredAt + self._rng.uniform(0, self._spread)
            self._push(queueID, due)

    def _scanDone(self) -> None:
        self._scanning = False
        self._reserved = 0
        self._scanNote = None
        self._gone = set()
        self._toLoad = []
        self._armScan()

    def _storeFailed(self, operation: str) -> None:
        if self.metrics is not None:
            self.metrics.storeFailures.labels(operation=operation).inc()

    # -- timer -----------------------------------------------------------

    def _push(self, queueID: str, due: float) -> None:
        seq = next(self._seq)
        self._scheduled[queueID] = seq
        heapq.heappush(self._heap, (due, seq, queueID))
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
            _, seq, queueID = heapq.heappop(self._heap)
            if self._scheduled.get(queueID) != seq:
                continue  # superseded, or no longer in memory
            del self._scheduled[queueID]
            envelope = self._envelopes.get(queueID)
            if envelope is None or queueID in self._active or queueID in self._operating:
                continue  # an operator's command on it pushes it again when done (_release)
            if queueID in self._unsaved:
                # The store failed this message's last state: store it before anything else.
                self._start(queueID, set(), self._save(envelope))
                continue
            destinations = self._destinations(envelope)
            full = [d for d in destinations if self._busy[d] >= self.destinationConcurrency]
            if full:
                self._parked.setdefault(full[0], []).append(queueID)
                continue
            self._busy.update(destinations)
            self._start(queueID, destinations, self._attempt(envelope))
        self._arm()
        self._armScan()

    def attemptsInFlight(self) -> dict[str, set[tuple[str, str]]]:
        """The attempts running now: queue id to its destinations (backend name, domain)."""
        return {queueID: set(destinations) for queueID, destinations in self._holding.items()}

    def _start(self, queueID: str, destinations: set[tuple[str, str]], work: Any) -> None:
        self._holding[queueID] = destinations
        self._slots[queueID] = destinations
        self._running += 1
        self._active.add(queueID)
        d = Deferred.fromCoroutine(work)
        d.addErrback(self._attemptFailed, queueID)
        d.addBoth(self._finished, queueID)

    def _attemptFailed(self, failure: Failure, queueID: str) -> None:
        # A bug, not a delivery outcome: the message must not be stranded by it.
        self.log.failure("attempt on {queue_id} failed", failure, queue_id=queueID)
        if queueID in self._envelopes and not self._stopping:
            self._unsaved[queueID] = self._unsaved.get(queueID, 0) + 1
            self._push(queueID, self.clock.seconds() + self._storeDelay(self._unsaved[queueID]))

    def _destinations(self, envelope: Envelope) -> set[tuple[str, str]]:
        return {
            (self.router.backendName(r.address) or "", r.address.rpartition("@")[2].lower()) for r in envelope.pending()
        }

    def _freeSlots(self, queueID: str) -> None:
        """The attempt on C{queueID} has its answers (or ended): its destinations may take another."""
        now = self.clock.seconds()
        for destination in self._slots.pop(queueID, ()):
            self._busy[destination] -= 1
            if not self._busy[destination]:
                del self._busy[destination]
            # Whoever waited for this destination is due again; if another
            # destination of theirs is still full, they park there instead.
            for waiting in self._parked.pop(destination, ()):
                if waiting in self._envelopes:
                    self._push(waiting, now)

    def _finished(self, _: object, queueID: str) -> None:
        self._running -= 1
        self._active.discard(queueID)
        self._holding.pop(queueID, None)
        self._freeSlots(queueID)
        for waiting in self._attempted.pop(queueID, ()):
            waiting.callback(None)
        if self._running == 0:
            idle, self._idle = self._idle, []
            for d in idle:
                d.callback(None)
        self._arm()
        self._armScan()

    # -- storing outcomes ------------------------------------------------

    def _storeDelay(self, failures: int) -> float:
        first, longest = self.storeRetry
        return float(min(longest, first * 2 ** min(failures - 1, 30)))

    async def _save(self, envelope: Envelope) -> None:
        """
        Store what was attempted: remove a message that is done, or update
        it and wait for its next attempt (in memory if that is soon, on disk
        otherwise).  A store that fails keeps the message in memory, marked
        unsaved, to be stored again after a delay before anything else.
        """
        queueID = envelope.queue_id
        done = not envelope.pending()
        try:
            if done:
                await maybeDeferred(self.store.remove, queueID)
            else:
                await maybeDeferred(self.store.update, envelope)
        except Exception as e:
            failures = self._unsaved.get(queueID, 0) + 1
            self._unsaved[queueID] = failures
            delay = self._storeDelay(failures)
            self.log.warn(
                "could not {operation} {queue_id}: {error}; trying again in {delay:.0f}s",
                operation="remove" if done else "update",
                queue_id=queueID,
                error=e,
                delay=delay,
            )
            self._storeFailed("remove" if done else "update")
            if not self._stopping:
                self._push(queueID, self.clock.seconds() + delay)
            return
        self._unsaved.pop(queueID, None)
        if done:
            self._forget(queueID, removed=True)
            return
        if self._stopping:
            return
        now = self.clock.seconds()
        due = min(r.next_attempt or now for r in envelope.pending())
        if due > now + self.horizon:
            self._forget(queueID, removed=False)
            self._noteDisk(due)
        else:
            self._push(queueID, due)

    # -- one attempt -----------------------------------------------------

    async def _claimForAttempt(self, envelope: Envelope) -> Envelope | None:
        """
        With a shared store: lease the message before attempting it.  The
        envelope as stored, to attempt now, or C{None} (not now: another node
        holds it, it is gone, held, due later, or the claim failed).
        """
        queueID = envelope.queue_id
        try:
            stored = await maybeDeferred(self.store.claim, queueID)
        except Exception as e:
            failures = self._unclaimable.get(queueID, 0) + 1
            self._unclaimable[queueID] = failures
            delay = self._storeDelay(failures)
            self.log.warn(
                "could not claim {queue_id}: {error}; trying again in {delay:.0f}s",
                queue_id=queueID,
                error=e,
                delay=delay,
            )
            self._storeFailed("claim")
            if queueID in self._envelopes and not self._stopping:
                self._push(queueID, self.clock.seconds() + delay)
            return None
        self._unclaimable.pop(queueID, None)
        if stored is None:
            # Another live node holds it (its scan took it), or it is done and gone.
            if queueID in self._envelopes:
                self._forget(queueID, removed=False)
            return None
        known = queueID in self._envelopes
        if known:
            self._envelopes[queueID] = stored
        now = self.clock.seconds()
        due = dueTime(stored)
        if stored.pending() and (isHeld(stored) or due > now):
            # Changed by another node since this one loaded it: its stored state counts.
            self._unclaim(queueID)
            if known and not isHeld(stored) and due <= now + self.horizon and not self._stopping:
                self._push(queueID, due)
            elif known:
                self._forget(queueID, removed=False)
                if not isHeld(stored):
                    self._noteDisk(due)
            return None
        return stored

    def _unclaim(self, queueID: str) -> None:
        unclaim = getattr(self.store, "unclaim", None)
        if unclaim is not None:
            d = maybeDeferred(unclaim, queueID)
            d.addErrback(lambda f: self.log.warn("could not end the claim on {queue_id}: {e}", queue_id=queueID, e=f))

    async def _attempt(self, envelope: Envelope) -> None:
        if self._shared:
            claimed = await self._claimForAttempt(envelope)
            if claimed is None:
                return
            envelope = claimed
        groups, unrouted = self.router.group(envelope.pending())
        noRoute = NO_ROUTE_FOR_REPORT if envelope.sender == "" else NO_ROUTE
        results: list[tuple[Recipient, Status, str | None, str | None]] = [(r, noRoute, None, None) for r in unrouted]
        attempts = [(name, rcpts, self._deliver(name, envelope, rcpts)) for name, rcpts in groups.items()]
        relayed: list[Recipient] = []  # delivered to a next hop that does not report success itself
        passed: set[str] = set()  # delivered to a next hop that took the DSN request
        for name, recipients, d in attempts:
            byAddress = {result.recipient: result for result in await d}
            for recipient in recipients:
                result = byAddress.get(recipient.address)
                # getattr: a third-party backend may return a DeliveryResult-like object of its own.
                hop = getattr(result, "relay", None) if result else None
                results.append((recipient, result.status if result else NO_RESULT, name, hop))
                if result is None or not result.status.ok or result.dsnPassed is None:
                    continue
                if result.dsnPassed:
                    passed.add(recipient.address)
                else:
                    relayed.append(recipient)
        # Every destination has answered: what is left (reports, storing the
        # outcome) waits on the queue, and the next message may go meanwhile.
        self._freeSlots(envelope.queue_id)
        now = self.clock.seconds()
        for recipient, status, backend, hop in results:
            self._apply(envelope, recipient, status, backend, now, hop)
        # Reports are queued before the original's state is stored: after a
        # crash in between, a report may go twice, never zero times.
        failed = [r for r, *_ in results if r.state is RecipientState.FAILED]
        relayedHere = {r.address for r in relayed}
        delivered = [
            r
            for r, *_ in results
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
        await self._save(envelope)

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
        if self.metrics is not None:
            started = self.clock.seconds()

            def timed(result: Any) -> Any:
                self.metrics.deliveryLatency.labels(backend=name).observe(self.clock.seconds() - started)
                return result

            d.addBoth(timed)

        def failed(failure: Any) -> list[DeliveryResult]:
            self.log.failure(
                "delivery backend {backend} failed on {queue_id}", failure, backend=name, queue_id=envelope.queue_id
            )
            if self.metrics is not None:
                self.metrics.pluginFailed("backend", name)
            return [DeliveryResult(r.address, BACKEND_FAILED) for r in recipients]

        d.addErrback(failed)
        return d

    def _apply(
        self,
        envelope: Envelope,
        recipient: Recipient,
        status: Status,
        backend: str | None,
        now: float,
        hop: str | None = None,
    ) -> None:
        """
        Record one recipient's outcome and log it; C{hop} is the next hop that
        gave it (L{DeliveryResult.relay}), logged as C{relay=} when known.
        """
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
        fields = {"queue_id": envelope.queue_id, "to": recipient.address, "backend": backend or "-", "relay": hop}
        fields.update(code=status.code, dsn=status.enhanced or None, reply=status.text)
        retryIn = None if recipient.next_attempt is None else recipient.next_attempt - now
        fields.update(delay=now - envelope.received_at, attempt=recipient.attempts, retry_in=retryIn)
        # A permanent failure is a bounce (a DSN goes to the sender if asked for), as Postfix says status=bounced.
        logEvent(self.log, "bounced" if outcome == "failed" else outcome, fields)

    # -- the operator's commands (relay.control) --------------------------

    def inFlight(self) -> int:
        """Delivery attempts running now."""
        return self._running

    async def listQueue(self, emit: Callable[[Envelope], Awaitable[None] | None], limit: int = LIST_LIMIT) -> int:
        """
        Hand every queued message to C{emit}, earliest due first (held ones
        last), the state in memory when it is fresher than the store's;
        C{emit} may return an awaitable to slow the listing down to its
        reader.  Loads a few messages at a time, so memory stays bounded by
        C{limit} queue ids.  Returns the number of messages in the store.
        """
        listing = getattr(self.store, "listing", None)  # a shared store: the whole cluster's queue
        if listing is not None:
            scan = await maybeDeferred(listing, limit)
        else:
            scan = await maybeDeferred(self.store.scan, EVERYTHING, limit, ())
        ids = [queueID for _, queueID in scan.due]
        for start in range(0, len(ids), LOADS_IN_FLIGHT):
            batch = ids[start : start + LOADS_IN_FLIGHT]
            loads = [self._current(queueID) for queueID in batch]
            for d in loads:
                try:
                    envelope = await d
                except (FileNotFoundError, ValueError):
                    continue  # gone (or set aside) since the scan
                waited = emit(envelope)
                if waited is not None:
                    await waited
        return scan.total

    def _current(self, queueID: str) -> Deferred[Envelope]:
        """The freshest state of a queued message: memory's, else the store's."""
        envelope = self._envelopes.get(queueID)
        if envelope is not None:
            return Deferred.fromCoroutine(self._ready(envelope))
        return maybeDeferred(self.store.load, queueID)

    @staticmethod
    async def _ready(envelope: Envelope) -> Envelope:
        return envelope

    async def find(self, queueID: str) -> Envelope:
        """One message's freshest state; L{UnknownMessage} if it is not queued."""
        try:
            return await self._current(queueID)
        except FileNotFoundError:
            raise UnknownMessage(queueID) from None
        except ValueError as e:
            raise OperationRefused(f"{queueID}: {e}") from None

    async def _claim(self, queueID: str) -> Envelope:
        """
        Take a message for an operator's command: wait for an attempt in
        flight on it to end (whose outcome is stored first), then its
        freshest state.  Until L{_release}, a scan that finds it leaves it
        alone, so the command's stored state is the one that counts.
        """
        if queueID in self._operating:
            raise OperationRefused(f"{queueID}: another command is working on it; try again")
        self._operating.add(queueID)
        try:
            while queueID in self._active:
                waiting: Deferred[None] = Deferred()
                self._attempted.setdefault(queueID, []).append(waiting)
                await waiting
            if self._shared:
                return await self._claimShared(queueID)
            return await self.find(queueID)
        except BaseException:
            self._operating.discard(queueID)
            raise

    async def _claimShared(self, queueID: str) -> Envelope:
        """
        An operator's claim through a shared store: the stored state, under
        this node's lease.  Another node delivering the message now is waited
        for (L{claimWaits}), then named in the refusal.
        """
        for attempt in range(len(self.claimWaits) + 1):
            try:
                stored = await maybeDeferred(self.store.claim, queueID)
            except Exception as e:
                self._storeFailed("claim")
                raise OperationRefused(f"{queueID}: could not claim it: {e}") from None
            if stored is not None:
                self._claimed.add(queueID)
                if queueID in self._envelopes:
                    self._envelopes[queueID] = stored
                return stored
            try:
                await maybeDeferred(self.store.load, queueID)
            except FileNotFoundError:
                if queueID in self._envelopes:
                    self._forget(queueID, removed=True)
                raise UnknownMessage(queueID) from None
            except ValueError as e:
                raise OperationRefused(f"{queueID}: {e}") from None
            if attempt < len(self.claimWaits):
                pause: Deferred[None] = Deferred()
                self.clock.callLater(self.claimWaits[attempt], pause.callback, None)
                await pause
        owner = getattr(self.store, "leaseOwner", None)
        holder = await maybeDeferred(owner, queueID) if owner is not None else None
        raise OperationRefused(f"{queueID}: node {holder or 'another node'} is delivering it now; try again")

    def _release(self, queueID: str) -> None:
        self._operating.discard(queueID)
        if queueID in self._claimed:
            # Before anything of this node claims it again (an attempt pushed below runs at a later turn).
            self._claimed.discard(queueID)
            self._unclaim(queueID)
        if queueID in self._envelopes and queueID not in self._scheduled and queueID not in self._active:
            self._push(queueID, self.clock.seconds())
        if self._scanning:
            self._gone.add(queueID)  # a scan in progress read its old state: it must not take that

    def _admit(self, envelope: Envelope, due: float) -> None:
        """A message an operator made due: into memory at once if there is room, else the next scan's."""
        queueID = envelope.queue_id
        if queueID in self._envelopes or (self._room() > 0 and not self._stopping and not self.hold):
            self._envelopes[queueID] = envelope
            self._push(queueID, due)
        else:
            self._noteDisk(due)

    async def _store(self, envelope: Envelope) -> None:
        """Store an operator's change; on failure nothing in memory changed and the command fails."""
        try:
            await maybeDeferred(self.store.update, envelope)
        except Exception as e:
            self._storeFailed("update")
            raise OperationRefused(f"{envelope.queue_id}: could not store the change: {e}") from None

    async def holdMessage(self, queueID: str) -> bool:
        """
        Keep a message queued, never attempted, until released, across
        restarts.  Returns False if it was held already.
        """
        envelope = await self._claim(queueID)
        try:
            if isHeld(envelope):
                return False
            changed = envelope.copy()
            changed.extra["held"] = True
            for recipient in changed.pending():
                recipient.next_attempt = HELD_UNTIL
            await self._store(changed)
            if queueID in self._envelopes:
                self._forget(queueID, removed=False)
            self.log.info("held {queue_id} by the operator", queue_id=queueID)
            return True
        finally:
            self._release(queueID)

    async def releaseMessage(self, queueID: str) -> None:
        """A held message is due now."""
        envelope = await self._claim(queueID)
        try:
            if not isHeld(envelope):
                raise OperationRefused(f"{queueID}: not held")
            now = self.clock.seconds()
            changed = envelope.copy()
            del changed.extra["held"]
            for recipient in changed.pending():
                recipient.next_attempt = now
            await self._store(changed)
            self._admit(changed, now)
            self.log.info("released {queue_id} by the operator", queue_id=queueID)
        finally:
            self._release(queueID)

    async def flushMessage(self, queueID: str) -> None:
        """One message is due now (a held one stays held: release it)."""
        envelope = await self._claim(queueID)
        try:
            if isHeld(envelope):
                raise OperationRefused(f"{queueID}: held (release it to deliver it)")
            await self._due(envelope)
        finally:
            self._release(queueID)

    async def _due(self, envelope: Envelope) -> None:
        now = self.clock.seconds()
        if envelope.queue_id in self._envelopes and not self._shared:
            self._push(envelope.queue_id, now)  # in memory: due now; the store learns at the attempt
            return
        changed = envelope.copy()
        for recipient in changed.pending():
            recipient.next_attempt = now
        await self._store(changed)
        self._admit(changed, now)

    async def flushQueue(self, domain: str | None = None) -> int:
        """
        Make every message due now (with C{domain}: every one with a pending
        recipient there, see L{matchesDomain}), as C{postqueue -f} and ETRN
        do.  Held messages stay held.  Returns how many were made due.
        """
        now = self.clock.seconds()
        count = 0

        def wanted(envelope: Envelope) -> bool:
            if isHeld(envelope) or not envelope.pending():
                return False
            return domain is None or any(matchesDomain(r.address, domain) for r in envelope.pending())

        for queueID, envelope in list(self._envelopes.items()):
            if queueID not in self._active and queueID not in self._operating and wanted(envelope):
                if self._shared:
                    # The stored due time is what an attempt's claim goes by: store it as now.
                    count += await self._flushOne(queueID, wanted)
                    continue
                self._push(queueID, now)
                count += 1
        scan = await maybeDeferred(self.store.scan, HELD_UNTIL - 1, LIST_LIMIT, frozenset(self._envelopes))
        for due, queueID in scan.due:
            if queueID in self._envelopes or queueID in self._operating:
                continue
            if due <= now and domain is None:
                count += 1  # due already: the next scan takes it
                self._noteDisk(due)
                continue
            count += await self._flushOne(queueID, wanted)
        return count

    async def _flushOne(self, queueID: str, wanted: Callable[[Envelope], bool]) -> int:
        """Claim one message and make it due now if C{wanted}: 1 if it was, else 0 (gone, busy, or refused)."""
        try:
            envelope = await self._claim(queueID)
        except (UnknownMessage, OperationRefused):
            return 0
        try:
            if not wanted(envelope):
                return 0
            await self._due(envelope)
            return 1
        except OperationRefused as e:
            self.log.warn("flush: {error}", error=str(e))
            return 0
        finally:
            self._release(queueID)

    def etrn(self, domain: str) -> Deferred[int]:
        """ETRN (RFC 1985): the mail queued for C{domain} is due now; fires with how many messages."""
        return Deferred.fromCoroutine(self.flushQueue(domain))

    async def deleteMessage(self, queueID: str) -> None:
        """Gone, with no report to anyone (C{postsuper -d})."""
        await self._claim(queueID)
        try:
            try:
                await maybeDeferred(self.store.remove, queueID)
            except Exception as e:
                self._storeFailed("remove")
                raise OperationRefused(f"{queueID}: could not remove it: {e}") from None
            if queueID in self._envelopes:
                self._forget(queueID, removed=True)
            else:
                self._stored -= 1
            self.log.info("deleted {queue_id} by the operator", queue_id=queueID)
        finally:
            self._release(queueID)

    async def bounceMessage(self, queueID: str) -> None:
        """Every pending recipient fails now; the sender gets a failure report (DSN)."""
        envelope = await self._claim(queueID)
        try:
            now = self.clock.seconds()
            failed = envelope.pending()
            for recipient in failed:
                recipient.state = RecipientState.FAILED
                recipient.last_status = BOUNCED
                recipient.next_attempt = None
                self.log.info(
                    "bounced {queue_id} to=<{to}> by the operator status={status}",
                    queue_id=queueID,
                    to=recipient.address,
                    status=str(BOUNCED),
                )
            await self._report(envelope, failed, Kind.FAILURE, now)
            if not self._stopping:
                # Kept in memory until removed: a store that fails retries it like any outcome.
                self._envelopes[queueID] = envelope
            await self._save(envelope)
        finally:
            self._release(queueID)

    # -- service ---------------------------------------------------------

    def stopService(self) -> Deferred[None] | None:
        super().stopService()
        self._stopping = True
        for timer in (self._timer, self._scanTimer):
            if timer is not None and timer.active():
                timer.cancel()
        self._timer = self._scanTimer = None
        if self._running == 0:
            return None
        d: Deferred[None] = Deferred()
        self._idle.append(d)
        return d
