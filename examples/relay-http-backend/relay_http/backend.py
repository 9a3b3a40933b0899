"""
The backend: one POST per message, carrying every recipient of the attempt.

The body is the message as queued (CRLF line endings, trace headers
included), streamed from the queue file a block at a time; the envelope travels in headers: ``X-Relay-Sender``,
``X-Relay-Recipient`` (one per recipient) and ``X-Relay-Queue-Id``.  The HTTP
answer decides for every recipient: 2xx delivered; 408, 429 and 5xx, a
timeout or a refused connection retried later (451); any other 4xx bounced
(550).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import treq
from twisted.internet.defer import Deferred
from twisted.internet.task import Cooperator
from twisted.web.client import FileBodyProducer
from zope.interface import implementer

from relay.envelope import DeliveryResult, Envelope, Recipient, Status
from relay.interfaces import IDeliveryBackend

RETRY_CODES = {408, 425, 429}
BLOCK = 64 * 1024


def statusFor(code: int, reason: str) -> Status:
    if 200 <= code < 300:
        return Status(250, "2.0.0", f"HTTP {code} {reason}".strip())
    if code >= 500 or code in RETRY_CODES:
        return Status(451, "4.4.0", f"HTTP {code} {reason}; will retry".strip())
    return Status(550, "5.0.0", f"HTTP {code} {reason}".strip())


@implementer(IDeliveryBackend)
class HTTPBackend:
    def __init__(self, reactor: Any, url: str, timeout: float) -> None:
        self.reactor = reactor
        self.url = url
        self.timeout = timeout
        # Reads the body files on the given reactor, never the global one.
        self.cooperator = Cooperator(scheduler=lambda work: reactor.callLater(0, work))

    def deliver(self, envelope: Envelope, recipients: Sequence[Recipient], openData: Any) -> Deferred:
        return Deferred.fromCoroutine(self._deliver(envelope, recipients, openData))

    async def _deliver(
        self, envelope: Envelope, recipients: Sequence[Recipient], openData: Any
    ) -> list[DeliveryResult]:
        headers = {
            "Content-Type": ["message/rfc822"],
            "X-Relay-Sender": [envelope.sender],
            "X-Relay-Recipient": [r.address for r in recipients],
            "X-Relay-Queue-Id": [envelope.queue_id],
        }
        try:
            with openData() as f:
                # Streamed: a block at a time, as fast as the endpoint takes
                # it, so a large message costs a block of memory, not itself.
                body = FileBodyProducer(f, cooperator=self.cooperator, readSize=BLOCK)
                response = await treq.post(self.url, data=body, headers=headers, timeout=self.timeout)
            await treq.content(response)  # read it all, so the connection can be reused
            status = statusFor(response.code, response.phrase.decode("latin-1"))
        except Exception as e:  # refused, timed out, reset: the endpoint may be back later
            status = Status(451, "4.4.1", f"HTTP endpoint unreachable: {e.__class__.__name__}: {e}")
        return [DeliveryResult(r.address, status) for r in recipients]

    def stop(self) -> None:
        self.cooperator.stop()
