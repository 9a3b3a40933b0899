"""ETRN (RFC 1985): the server's replies, and the scheduler making a domain's mail due now."""

from __future__ import annotations

from smtphelpers import Session
from test_scheduler import LATER, OK, queue, setup
from twisted.internet.defer import Deferred, fail, succeed

from relay.envelope import RecipientState


class Flushes:
    """The etrn hook a server calls: records the nodes and answers a count."""

    def __init__(self, count: int = 1) -> None:
        self.nodes: list[str] = []
        self.count = count
        self.answer: Deferred | None = None

    def __call__(self, node: str):
        self.nodes.append(node)
        if self.answer is not None:
            return self.answer
        return succeed(self.count)


def test_ehlo_advertises_etrn_only_when_the_relay_has_it():
    s = Session(client="127.0.0.1", etrn=Flushes())
    s.take()
    assert s.send(b"EHLO c.example\r\n").endswith(b"250 ETRN\r\n")
    plain = Session(client="127.0.0.1")
    plain.take()
    assert b"ETRN" not in plain.send(b"EHLO c.example\r\n")
    assert plain.codes(b"ETRN example.org\r\n") == ["502 5.5.1"]


def test_started_nothing_waiting_and_subdomains():
    flushes = Flushes()
    s = Session(client="127.0.0.1", etrn=flushes)
    s.ready()
    assert s.codes(b"ETRN example.org\r\n") == ["250 2.0.0"]
    assert s.codes(b"ETRN @example.org\r\n") == ["250 2.0.0"]
    flushes.count = 0
    assert s.send(b"ETRN quiet.example\r\n") == b"251 2.0.0 OK, no messages waiting for node quiet.example\r\n"
    assert flushes.nodes == ["example.org", "@example.org", "quiet.example"]


def test_refusals():
    flushes = Flushes()
    s = Session(client="127.0.0.1", etrn=flushes)
    s.take()
    assert s.codes(b"ETRN example.org\r\n") == ["503 5.5.1"]  # HELO first
    s.send(b"EHLO c.example\r\n")
    assert s.codes(b"ETRN\r\n") == ["501 5.5.4"]
    assert s.codes(b"ETRN not a domain\r\n") == ["501 5.5.4"]
    assert s.codes(b"ETRN -bad-.example\r\n") == ["501 5.5.4"]
    assert s.codes(b"ETRN #queue\r\n") == ["459 4.3.0"]
    assert s.codes(b"MAIL FROM:<a@example.test>\r\n") == ["250 2.1.0"]
    assert s.codes(b"ETRN example.org\r\n") == ["503 5.5.1"]
    assert s.codes(b"RSET\r\n") == ["250 2.0.0"]
    assert s.codes(b"ETRN example.org\r\n") == ["250 2.0.0"]  # the session goes on
    assert flushes.nodes == ["example.org"]


def test_outside_relay_networks_459():
    flushes = Flushes()
    s = Session(client="192.0.2.10", etrn=flushes)
    s.ready()
    assert s.codes(b"ETRN example.org\r\n") == ["459 4.7.1"]
    assert flushes.nodes == []


def test_flush_failure_458_and_answer_waits():
    flushes = Flushes()
    s = Session(client="127.0.0.1", etrn=flushes)
    s.ready()
    flushes.answer = Deferred()
    assert s.send(b"ETRN example.org\r\nNOOP\r\n") == b""  # nothing answered before the flush started
    flushes.answer.callback(2)
    assert s.take() == b"250 2.0.0 OK, queuing for node example.org started\r\n250 2.0.0 Ok\r\n"
    flushes.answer = fail(OSError("disk gone"))
    assert s.codes(b"ETRN example.org\r\n") == ["458 4.3.0"]


def test_scheduler_makes_only_that_domains_mail_due():
    clock, store, backend, scheduler = setup(
        {"a@one.example": [LATER, OK], "b@two.example": [LATER, OK], "c@sub.one.example": [LATER, OK]},
        retry=(3600.0,),
    )
    envelopes = [queue(store, clock, a) for a in ("a@one.example", "b@two.example", "c@sub.one.example")]
    for envelope in envelopes:
        scheduler.enqueue(envelope)
    clock.advance(0)
    assert len(backend.calls) == 3
    clock.advance(1)
    counts = []
    scheduler.etrn("one.example").addCallback(counts.append)
    clock.advance(0)
    assert counts == [1] and [c[1] for c in backend.calls[3:]] == [["a@one.example"]]
    scheduler.etrn("@one.example").addCallback(counts.append)
    clock.advance(0)
    assert counts == [1, 1] and [c[1] for c in backend.calls[4:]] == [["c@sub.one.example"]]
    scheduler.etrn("none.example").addCallback(counts.append)
    clock.advance(0)
    assert counts == [1, 1, 0]
    remaining = store.messages[envelopes[1].queue_id][0]
    assert remaining.recipients[0].state is RecipientState.PENDING
