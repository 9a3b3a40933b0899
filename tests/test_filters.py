"""Content filters run by the server at end-of-data: decisions, changes, failures, the trace. All in memory."""

from __future__ import annotations

import io
import os
from contextlib import contextmanager

import pytest
from smtphelpers import Session
from twisted.internet.defer import Deferred
from twisted.logger import globalLogPublisher

from relay.filters import verdict as v
from relay.filters.message import FilterMessage, parseHeaderBlock
from relay.filters.runner import FilterChain, FilterSpec
from relay.queue.scheduler import HELD_UNTIL

MESSAGE = b"From: Ann <ann@example.org>\r\nSubject: hi\r\nTo: x@localhost\r\n\r\nbody line\r\n"


class Recorder:
    """A filter answering a fixed verdict (or a callable's), remembering what it saw."""

    def __init__(self, answer=None) -> None:
        self.answer = answer if answer is not None else v.cont()
        self.seen: list[tuple[FilterMessage, bytes]] = []
        self.stopped = False

    def check(self, message: FilterMessage):
        with message.open() as f:
            data = f.read()
        message.headers()  # read while the snapshot is valid: the spool is gone once the message is queued
        self.seen.append((message, data))
        return self.answer(message) if callable(self.answer) else self.answer

    def stop(self) -> None:
        self.stopped = True


class Raises:
    def check(self, message):
        raise RuntimeError("filter bug")

    def stop(self) -> None:
        pass


class Hangs:
    def __init__(self) -> None:
        self.pending: list[Deferred] = []

    def check(self, message):
        d: Deferred = Deferred()
        self.pending.append(d)
        return d

    def stop(self) -> None:
        pass


def session(tmp_path, *filters, trace=False, **kw) -> Session:
    specs = [f if isinstance(f, FilterSpec) else FilterSpec(f"f{i}", f) for i, f in enumerate(filters)]
    chain = FilterChain(specs, None, tmp_path, "mx.example.test", trace=trace, maxSize=10_000)
    s = Session(filters=chain, **kw)
    chain.clock = s.clock  # the session's own clock
    s.chain = chain
    return s


def send(s: Session, message: bytes = MESSAGE, rcpts=(b"x@localhost",), sender=b"a@example.org") -> list[str]:
    s.codes(b"MAIL FROM:<" + sender + b">\r\n")
    for r in rcpts:
        s.codes(b"RCPT TO:<" + r + b">\r\n")
    s.codes(b"DATA\r\n")
    return s.codes(message + b".\r\n")


def stored(s: Session) -> tuple:
    [envelope] = s.accepted
    return s.store.messages[envelope.queue_id]


@contextmanager
def events():
    seen: list[dict] = []
    globalLogPublisher.addObserver(seen.append)
    try:
        yield seen
    finally:
        globalLogPublisher.removeObserver(seen.append)


def named(seen, name):
    return [e["relay_fields"] for e in seen if e.get("relay_event") == name]


def test_filter_sees_envelope_client_and_data_without_received(tmp_path):
    f = Recorder()
    s = session(tmp_path, f)
    s.ready()
    assert send(s, rcpts=(b"x@localhost", b"y@example.test")) == ["250 2.0.0"]
    [(message, data)] = f.seen
    assert data == MESSAGE
    assert message.sender == "a@example.org"
    assert message.recipients == ("x@localhost", "y@example.test")
    assert message.client_address == "192.0.2.10" and message.client_port == 40000
    assert message.helo == "client.example.test"
    assert message.authenticated is None and message.tls is False and not message.relay_client
    assert message.size == len(MESSAGE)
    assert message.receivedHeader.startswith("Received: from client.example.test ([192.0.2.10])\r\n\tby ")
    assert not message.receivedHeader.endswith("\r\n")
    assert message.headers() == [("From", "Ann <ann@example.org>"), ("Subject", "hi"), ("To", "x@localhost")]
    assert message.queue_id == s.accepted[0].queue_id
    envelope, data = stored(s)
    assert data.startswith(b"Received: from client.example.test")
    assert data.endswith(MESSAGE)
    assert envelope.size == len(MESSAGE)


def test_spool_is_never_visible_in_the_directory(tmp_path):
    f = Recorder(lambda m: (os.listdir(tmp_path) == [] or pytest.fail("spool visible")) and v.cont())
    s = session(tmp_path, f)
    s.ready()
    assert send(s) == ["250 2.0.0"]
    assert os.listdir(tmp_path) == []


def test_added_headers_go_on_top_below_received_in_order(tmp_path):
    f = Recorder(v.cont("signed").withHeaders(("DKIM-Signature", "v=1; a=x;\r\n\tb=y"), ("X-Second", "2")))
    s = session(tmp_path, f)
    s.ready()
    assert send(s) == ["250 2.0.0"]
    envelope, data = stored(s)
    received, _, rest = data.partition(b"DKIM-Signature:")
    assert received.startswith(b"Received:") and b"\r\n\t" in received
    assert rest == b" v=1; a=x;\r\n\tb=y\r\nX-Second: 2\r\n" + MESSAGE
    assert envelope.size == len(rest) + len(b"DKIM-Signature:")


def test_a_later_filter_sees_the_earlier_ones_changes(tmp_path):
    first = Recorder(v.cont().withHeaders(("X-First", "1")))
    second = Recorder()
    s = session(tmp_path, first, second)
    s.ready()
    assert send(s) == ["250 2.0.0"]
    message, data = second.seen[0]
    assert data == b"X-First: 1\r\n" + MESSAGE
    assert message.headers()[0] == ("X-First", "1")
    assert message.size == len(data)


def test_change_insert_delete_headers_and_replace_body(tmp_path):
    answer = v.FilterVerdict(
        changeHeaders=(("subject", 1, "changed"), ("To", 1, None), ("X-Missing", 2, "added at the end")),
        insertHeaders=((1, "X-Inserted", "at 1"),),
        replaceBody=io.BytesIO(b"new body\r\n"),
    )
    s = session(tmp_path, Recorder(answer))
    s.ready()
    assert send(s) == ["250 2.0.0"]
    _, data = stored(s)
    message = data.partition(b"\r\nFrom:")[2]
    assert (
        b"From:"
        + message
        == b"From: Ann <ann@example.org>\r\nX-Inserted: at 1\r\nSubject: changed\r\nX-Missing: added at the end\r\n"
        b"\r\nnew body\r\n"
    )


def test_recipients_added_and_removed(tmp_path):
    answer = v.FilterVerdict(addRecipients=("archive@example.test",), removeRecipients=("X@LOCALHOST", "y@LOCALHOST"))
    s = session(tmp_path, Recorder(answer))
    s.ready()
    assert send(s, rcpts=(b"x@localhost", b"y@localhost")) == ["250 2.0.0"]
    envelope, _ = stored(s)
    # The local part is compared exactly: X@LOCALHOST is not x@localhost; the domain ignores case.
    assert [r.address for r in envelope.recipients] == ["x@localhost", "archive@example.test"]


def test_no_recipient_left_is_a_discard(tmp_path):
    s = session(tmp_path, Recorder(v.FilterVerdict(removeRecipients=("x@localhost",))))
    s.ready()
    with events() as seen:
        assert send(s) == ["250 2.0.0"]
    assert s.accepted == [] and s.store.messages == {}
    assert named(seen, "discarded")[0]["filters"] == "f0:continue,relay:discard"


def test_reject_and_tempfail_answer_their_status_and_the_session_goes_on(tmp_path):
    answers = [v.reject("Spam detected", 554, "5.7.1"), v.tempfail("Try later")]
    f = Recorder(lambda m: answers.pop(0) if answers else v.cont())
    s = session(tmp_path, f)
    s.ready()
    with events() as seen:
        assert send(s) == ["554 5.7.1"]
        assert send(s) == ["451 4.7.1"]
    assert s.store.messages == {}
    [first, second] = named(seen, "rejected")
    assert first["reason"] == "filter" and first["filters"] == "f0:reject" and first["reply"] == "Spam detected"
    assert second["code"] == 451
    assert send(s) == ["250 2.0.0"]
    assert len(s.accepted) == 1


def test_reject_stops_the_chain_and_accept_skips_the_rest(tmp_path):
    after = Recorder()
    s = session(tmp_path, Recorder(v.reject()), after)
    s.ready()
    assert send(s) == ["550 5.7.1"]
    assert after.seen == []
    s2 = session(tmp_path, Recorder(v.accept()), after)
    s2.ready()
    with events() as seen:
        assert send(s2) == ["250 2.0.0"]
    assert after.seen == []
    assert named(seen, "accepted")[0]["filters"] == "f0:accept"


def test_discard_answers_250_and_keeps_nothing(tmp_path):
    s = session(tmp_path, Recorder(v.discard("virus found")))
    s.ready()
    with events() as seen:
        reply = s.send(b"MAIL FROM:<a@example.org>\r\nRCPT TO:<x@localhost>\r\nDATA\r\n")
        reply = s.send(MESSAGE + b".\r\n")
    assert reply.startswith(b"250 2.0.0 Ok: queued as ")
    assert s.accepted == [] and s.store.messages == {}
    [line] = named(seen, "discarded")
    assert line["filters"] == "f0:discard" and reply.strip().endswith(line["queue_id"].encode())


def test_hold_queues_the_message_held_and_later_filters_still_run(tmp_path):
    after = Recorder(v.cont().withHeaders(("X-After", "yes")))
    s = session(tmp_path, Recorder(v.hold("quarantine")), after)
    s.ready()
    with events() as seen:
        assert send(s) == ["250 2.0.0"]
    envelope, data = stored(s)
    assert envelope.extra["held"] is True
    assert [r.next_attempt for r in envelope.recipients] == [HELD_UNTIL]
    assert b"X-After: yes\r\n" in data
    line = named(seen, "accepted")[0]
    assert line["filters"] == "f0:hold,f1:continue" and line["held"] == "yes"


def test_a_filter_that_raises_costs_451_and_the_session_goes_on(tmp_path):
    s = session(tmp_path, Raises())
    s.ready()
    with events() as seen:
        assert send(s) == ["451 4.3.0"]
    assert s.store.messages == {}
    assert named(seen, "rejected")[0]["filters"] == "f0:error"
    assert s.codes(b"NOOP\r\n") == ["250 2.0.0"]


def test_a_filter_that_returns_garbage_or_bad_headers_costs_451(tmp_path):
    for answer in ("yes", v.cont()):
        f = Recorder(answer)
        if answer != "yes":
            f.answer = lambda m: v.FilterVerdict(addHeaders=(("Bad Name", "x"),))
        s = session(tmp_path, f)
        s.ready()
        assert send(s) == ["451 4.3.0"]
        assert s.store.messages == {}


def test_a_filter_that_hangs_costs_451_after_its_timeout(tmp_path):
    hangs = Hangs()
    s = session(tmp_path, FilterSpec("slow", hangs, timeout=5.0))
    s.ready()
    assert send(s) == []
    s.clock.advance(4.9)
    assert s.take() == b""
    s.clock.advance(0.2)
    assert s.take().startswith(b"451 4.3.0 ")
    assert s.store.messages == {}
    assert s.codes(b"NOOP\r\n") == ["250 2.0.0"]


def test_on_error_accept_skips_the_failing_filter_with_a_log_line(tmp_path):
    hangs = Hangs()
    after = Recorder()
    s = session(
        tmp_path,
        FilterSpec("bug", Raises(), onError="accept"),
        FilterSpec("slow", hangs, timeout=5.0, onError="accept"),
        FilterSpec("last", after),
    )
    s.ready()
    with events() as seen:
        assert send(s) == []
        s.clock.advance(5.0)
        assert s.take().startswith(b"250 2.0.0")
    assert len(after.seen) == 1
    assert named(seen, "accepted")[0]["filters"] == "bug:error,slow:error,last:continue"
    texts = [e.get("log_format", "") for e in seen]
    assert any("skipped (on_error = accept)" in t for t in texts)


def test_trace_header_names_each_filters_decision(tmp_path):
    s = session(
        tmp_path,
        Recorder(v.cont("dkim=signed d=example.org s=sel")),
        Recorder(v.hold("milter av: quarantine")),
        trace=True,
    )
    s.ready()
    assert send(s) == ["250 2.0.0"]
    _, data = stored(s)
    fields = parseHeaderBlock(io.BytesIO(data))
    assert fields[0][0] == "Received"
    assert fields[1] == (
        "X-Relay-Filter",
        "mx.example.test; f0=continue (dkim=signed d=example.org s=sel);\tf1=hold (milter av: quarantine)",
    )


def test_too_big_or_bad_data_never_reaches_the_filters(tmp_path):
    f = Recorder()
    s = session(tmp_path, f)
    s.ready()
    assert send(s, b"x\r\n" * 8_000) == ["552 5.3.4"]
    assert f.seen == [] and s.store.messages == {}


def test_verdict_rules():
    with pytest.raises(ValueError):
        v.FilterVerdict(v.FilterDecision.REJECT)
    with pytest.raises(ValueError):
        v.FilterVerdict(v.FilterDecision.TEMPFAIL, v.reject().status)
    with pytest.raises(ValueError):
        v.FilterVerdict(addHeaders=(("X", "a\r\nInjected: yes"),))
    with pytest.raises(ValueError):
        v.FilterVerdict(changeHeaders=(("X", 0, "a"),))
    assert v.FilterVerdict(addHeaders=(("X", "a\r\n\tb"),)).modifies
    assert not v.cont().modifies


def test_chain_stop_stops_every_filter(tmp_path):
    a, b = Recorder(), Recorder()
    s = session(tmp_path, a, b)
    s.chain.stop()
    assert a.stopped and b.stopped


# -- plugins for the integration tests (tests/integration/test_filters_process.py), found by dotted path --------

from twisted.plugin import IPlugin  # noqa: E402
from zope.interface import implementer  # noqa: E402

from relay.interfaces import IMessageFilterFactory  # noqa: E402


@implementer(IPlugin, IMessageFilterFactory)
class BrokenFilterFactory:
    """C{how = raise}: check raises; C{how = hang}: check never answers; C{how = tag}: adds X-Tagged."""

    name = "broken-filter"
    description = "a filter that fails on purpose"
    keys = {"how": "raise, hang or tag"}

    def build(self, options, context):
        how = options.get("how", "raise")
        if how == "raise":
            return Raises()
        if how == "hang":
            return Hangs()
        return Recorder(v.cont("tagged").withHeaders(("X-Tagged", "yes")))


brokenFilter = BrokenFilterFactory()
