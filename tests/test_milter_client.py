"""
The milter filter against a scripted milter, in memory (twisted.test.iosim):
the conversation as an MTA holds it, every reply and modification, and every
way a milter fails.
"""

from __future__ import annotations

import io
import struct

import pytest
from scriptedmilter import CONTINUE, MilterEngine, Script, ScriptedMilterProtocol
from twisted.internet.defer import fail, succeed
from twisted.internet.error import ConnectionRefusedError
from twisted.internet.task import Clock
from twisted.python.failure import Failure
from twisted.test import iosim

from relay.errors import OptionError
from relay.filters.message import FilterMessage
from relay.filters.runner import MessageState, Spool
from relay.filters.verdict import FilterDecision
from relay.milter import protocol as P
from relay.milter.client import MilterError, MilterTimeout
from relay.milter.filter import AT_END, MilterFilter, build
from relay.plugin import PluginContext, runInline

MESSAGE = (
    b"From: Ann <ann@example.org>\r\n"
    b"To: bob@example.net\r\n"
    b"Subject: a long\r\n\tfolded subject\r\n"
    b"X-Tab:\tvalue\r\n"
    b"\r\n"
    b"body line 1\r\n"
    b"body line 2\r\n"
)


class MemoryEndpoint:
    """A client endpoint that connects to a scripted milter over iosim, or fails to."""

    def __init__(self, script: Script | None = None, refuse: bool = False) -> None:
        self.script = script or Script()
        self.refuse = refuse
        self.pumps: list[iosim.IOPump] = []
        self.engines: list[MilterEngine] = []
        self.clients: list = []

    def connect(self, factory):
        if self.refuse:
            return fail(ConnectionRefusedError("connection refused"))
        client = factory.buildProtocol(None)
        server = ScriptedMilterProtocol(self.script)
        self.engines.append(server.engine)
        self.clients.append(client)
        clientTransport = iosim.FakeTransport(client, isServer=False)
        serverTransport = iosim.FakeTransport(server, isServer=True)
        self.pumps.append(iosim.connect(server, serverTransport, client, clientTransport, greet=False))
        return succeed(client)

    @property
    def engine(self) -> MilterEngine:
        [engine] = self.engines
        return engine


def message(data: bytes = MESSAGE, **kw) -> FilterMessage:
    fields = dict(
        queue_id="Q1234",
        sender="ann@example.org",
        recipients=("bob@example.net", "carl@example.net"),
        client_address="192.0.2.7",
        client_port=40000,
        helo="client.example.org",
        authenticated="ann",
        tls=True,
        tls_version="TLSv1.3",
        tls_cipher="TLS_AES_256_GCM_SHA384",
        size=len(data),
        receivedHeader="Received: from client.example.org ([192.0.2.7])\r\n\tby mx.example.test; today",
        opener=lambda: io.BytesIO(data),
        relay_client=True,
        hostname="mx.example.test",
    )
    fields.update(kw)
    return FilterMessage(**fields)


def check(tmp_path, script: Script | None = None, msg: FilterMessage | None = None, endpoint=None, clock=None):
    """Run one check to its end; return (result or Failure, endpoint)."""
    endpoint = endpoint or MemoryEndpoint(script)
    clock = clock or Clock()
    f = MilterFilter("m1", endpoint, clock, 5.0, runInline, tmp_path)
    d = f.check(msg or message())
    for _ in range(10_000):
        if d.called:
            break
        for pump in endpoint.pumps:
            pump.pump()
    for pump in endpoint.pumps:
        pump.flush()  # what was sent last (ABORT, QUIT) reaches the milter
    results: list = []
    d.addBoth(results.append)
    assert results, "the check never finished"
    return results[0], endpoint


def verdict(tmp_path, script: Script | None = None, **kw):
    result, endpoint = check(tmp_path, script, **kw)
    if isinstance(result, Failure):
        result.raiseException()
    return result, endpoint


def test_conversation_as_postfix_holds_it(tmp_path):
    result, endpoint = verdict(tmp_path)
    assert result.decision is FilterDecision.CONTINUE and not result.modifies
    assert result.reason == "milter m1: continue"
    e = endpoint.engine
    steps = [P.OPTNEG, P.CONNECT, P.HELO, P.MAIL, P.RCPT, P.RCPT, P.DATA]
    steps += [P.HEADER] * 4 + [P.EOH, P.BODY, P.BODYEOB, P.QUIT]
    assert [c for c in e.commands() if c != P.MACRO] == steps
    [optneg] = e.args(P.OPTNEG)
    assert optneg[0] == 6
    assert e.args(P.CONNECT) == [("[192.0.2.7]", P.FAMILY_INET, 40000, "192.0.2.7")]
    assert e.args(P.HELO) == [("client.example.org",)]
    assert e.args(P.MAIL) == [("<ann@example.org>",)]
    assert e.args(P.RCPT) == [("<bob@example.net>",), ("<carl@example.net>",)]
    # Sendmail's form: no Received of ours, folding as LF, the space after the colon eaten (not a tab).
    assert e.headers() == [
        ("From", "Ann <ann@example.org>"),
        ("To", "bob@example.net"),
        ("Subject", "a long\n\tfolded subject"),
        ("X-Tab", "value"),
    ]
    assert e.body() == b"body line 1\r\nbody line 2\r\n"
    connect = e.macros(P.CONNECT)
    assert connect["j"] == "mx.example.test"
    assert connect["{client_addr}"] == "192.0.2.7" and connect["{client_port}"] == "40000"
    assert connect["{daemon_name}"] == "relay"
    assert e.macros(P.HELO) == {"{tls_version}": "TLSv1.3", "{cipher}": "TLS_AES_256_GCM_SHA384"}
    mail = e.macros(P.MAIL)
    assert mail["i"] == "Q1234" and mail["{auth_authen}"] == "ann" and mail["{mail_addr}"] == "ann@example.org"
    assert e.macros(P.RCPT)["{rcpt_addr}"] == "carl@example.net"
    assert e.macros(P.BODYEOB) == {"i": "Q1234"}


def test_unauthenticated_plain_client_gets_no_auth_or_tls_macros(tmp_path):
    _, endpoint = verdict(tmp_path, msg=message(authenticated=None, tls=False, tls_version=None, tls_cipher=None))
    assert "{auth_authen}" not in endpoint.engine.macros(P.MAIL)
    assert endpoint.engine.macros(P.HELO) == {}


def test_ipv6_client(tmp_path):
    _, endpoint = verdict(tmp_path, msg=message(client_address="2001:db8::1"))
    assert endpoint.engine.args(P.CONNECT) == [("[2001:db8::1]", P.FAMILY_INET6, 40000, "2001:db8::1")]


def test_big_body_goes_in_chunks_of_at_most_65535(tmp_path):
    body = b"".join(b"line %06d %s\r\n" % (i, b"x" * 60) for i in range(3000))
    data = b"Subject: big\r\n\r\n" + body
    _, endpoint = verdict(tmp_path, msg=message(data, size=len(data)))
    chunks = [c.args[0] for c in endpoint.engine.seen if c.command == P.BODY]
    assert len(chunks) == 4 and all(len(c) <= 65535 for c in chunks)
    assert b"".join(chunks) == body


def test_message_without_a_body_separator(tmp_path):
    data = b"Subject: x\r\nnot a header line\r\nmore\r\n"
    _, endpoint = verdict(tmp_path, msg=message(data, size=len(data)))
    assert endpoint.engine.headers() == [("Subject", "x")]
    assert endpoint.engine.body() == b"not a header line\r\nmore\r\n"


@pytest.mark.parametrize(
    "eom, decision, status",
    [
        ([P.encodeReply(P.REJECT)], FilterDecision.REJECT, (550, "5.7.1", "Command rejected")),
        (
            [P.encodeReply(P.REPLYCODE, "554 5.7.1 Gtube pattern")],
            FilterDecision.REJECT,
            (554, "5.7.1", "Gtube pattern"),
        ),
        ([P.encodeReply(P.TEMPFAIL)], FilterDecision.TEMPFAIL, (451, "4.7.1", "Service unavailable - try again later")),
        ([P.encodeReply(P.REPLYCODE, "452 4.3.1 busy")], FilterDecision.TEMPFAIL, (452, "4.3.1", "busy")),
        ([P.encodeReply(P.DISCARD)], FilterDecision.DISCARD, None),
        ([P.encodeReply(P.ACCEPT)], FilterDecision.CONTINUE, None),
        ([P.encodeReply(P.QUARANTINE, "virus Eicar"), CONTINUE], FilterDecision.HOLD, None),
        (
            [P.encodeReply(P.QUARANTINE, "x"), P.encodeReply(P.REJECT)],
            FilterDecision.REJECT,
            (550, "5.7.1", "Command rejected"),
        ),
    ],
)
def test_final_replies(tmp_path, eom, decision, status):
    result, _ = verdict(tmp_path, Script(eom=eom))
    assert result.decision is decision
    if status is None:
        assert result.status is None
    else:
        assert (result.status.code, result.status.enhanced, result.status.text) == status
    if decision is FilterDecision.HOLD:
        assert result.reason == "milter m1: quarantine (virus Eicar)"


def test_header_changes(tmp_path):
    eom = [
        P.encodeReply(P.ADDHEADER, "X-Spam-Flag", "NO"),
        P.encodeReply(P.INSHEADER, 0, "DKIM-Signature", "v=1; a=rsa-sha256;\n\tb=abc"),
        P.encodeReply(P.INSHEADER, 3, "X-Third", "3"),
        P.encodeReply(P.CHGHEADER, 1, "Subject", "[SPAM] changed"),
        P.encodeReply(P.CHGHEADER, 1, "X-Tab", ""),
        P.encodeReply(P.CHGHEADER, 0, "To", "zero means first"),
        CONTINUE,
    ]
    result, _ = verdict(tmp_path, Script(eom=eom))
    assert result.insertHeaders == (
        (AT_END, "X-Spam-Flag", "NO"),
        (0, "DKIM-Signature", "v=1; a=rsa-sha256;\r\n\tb=abc"),
        (2, "X-Third", "3"),
    )
    assert result.changeHeaders == (("Subject", 1, "[SPAM] changed"), ("X-Tab", 1, None), ("To", 1, "zero means first"))
    # As the runner applies them: the message the next hop gets.
    spool = Spool(tmp_path)
    spool.write(MESSAGE)
    spool.finish()
    state = MessageState(spool)
    state.apply(result, 10_000)
    with state.open() as f:
        assert f.read() == (
            b"DKIM-Signature: v=1; a=rsa-sha256;\r\n\tb=abc\r\n"
            b"From: Ann <ann@example.org>\r\n"
            b"X-Third: 3\r\n"
            b"To: zero means first\r\n"
            b"Subject: [SPAM] changed\r\n"
            b"X-Spam-Flag: NO\r\n"
            b"\r\n"
            b"body line 1\r\nbody line 2\r\n"
        )
    state.close()


def test_leading_space_negotiated(tmp_path):
    script = Script(protocol=P.SMFIP_HDR_LEADSPC, eom=[P.encodeReply(P.ADDHEADER, "X-A", " kept"), CONTINUE])
    result, endpoint = verdict(tmp_path, script)
    assert endpoint.engine.headers()[0] == ("From", " Ann <ann@example.org>")
    assert endpoint.engine.headers()[3] == ("X-Tab", "\tvalue")
    assert result.insertHeaders == ((AT_END, "X-A", "kept"),)


def test_replace_body_and_recipients(tmp_path):
    eom = [
        P.encodeReply(P.REPLBODY, b"new line one\nnew line two\r"),
        P.encodeReply(P.REPLBODY, b"\nlast line"),
        P.encodeReply(P.ADDRCPT, "<archive@example.org>"),
        P.encodeReply(P.DELRCPT, "<carl@example.net>"),
        P.encodeReply(P.ACCEPT),
    ]
    result, _ = verdict(tmp_path, Script(eom=eom))
    assert result.decision is FilterDecision.CONTINUE and result.reason == "milter m1: accept"
    assert result.replaceBody.read() == b"new line one\r\nnew line two\r\nlast line"
    result.replaceBody.close()
    assert result.addRecipients == ("archive@example.org",)
    assert result.removeRecipients == ("carl@example.net",)


@pytest.mark.parametrize(
    "step, reply, decision, code",
    [
        (P.CONNECT, P.encodeReply(P.REJECT), FilterDecision.REJECT, 550),
        (P.HELO, P.encodeReply(P.TEMPFAIL), FilterDecision.TEMPFAIL, 451),
        (P.MAIL, P.encodeReply(P.REPLYCODE, "553 5.1.8 bad sender"), FilterDecision.REJECT, 553),
        (P.RCPT, P.encodeReply(P.REJECT), FilterDecision.REJECT, 550),
        (P.DATA, P.encodeReply(P.DISCARD), FilterDecision.DISCARD, None),
        (P.HEADER, P.encodeReply(P.REJECT), FilterDecision.REJECT, 550),
        (P.EOH, P.encodeReply(P.TEMPFAIL), FilterDecision.TEMPFAIL, 451),
        (P.BODY, P.encodeReply(P.REJECT), FilterDecision.REJECT, 550),
    ],
)
def test_refusal_at_an_earlier_step_ends_the_conversation(tmp_path, step, reply, decision, code):
    result, endpoint = verdict(tmp_path, Script(replies={step: [reply]}))
    assert result.decision is decision
    assert (result.status.code if result.status else None) == code
    commands = endpoint.engine.commands()
    assert P.BODYEOB not in commands
    assert commands[-2:] == [P.ABORT, P.QUIT]


def test_accept_at_connect_asks_nothing_more(tmp_path):
    result, endpoint = verdict(tmp_path, Script(replies={P.CONNECT: [P.encodeReply(P.ACCEPT)]}))
    assert result.decision is FilterDecision.CONTINUE and result.reason == "milter m1: accept"
    assert P.HELO not in endpoint.engine.commands()


def test_skip_ends_the_body(tmp_path):
    body = b"x" * 200_000
    data = b"Subject: s\r\n\r\n" + body
    script = Script(protocol=P.SMFIP_SKIP, replies={P.BODY: [P.encodeReply(P.SKIP)]})
    result, endpoint = verdict(tmp_path, script, msg=message(data, size=len(data)))
    assert result.decision is FilterDecision.CONTINUE
    assert endpoint.engine.commands().count(P.BODY) == 1
    assert P.BODYEOB in endpoint.engine.commands()


def test_steps_not_wanted_are_not_sent_and_unanswered_ones_not_awaited(tmp_path):
    protocol = P.SMFIP_NOHELO | P.SMFIP_NOBODY | P.SMFIP_NR_HDR | P.SMFIP_NR_CONN | P.SMFIP_NORCPT
    result, endpoint = verdict(tmp_path, Script(protocol=protocol))
    commands = endpoint.engine.commands()
    assert P.HELO not in commands and P.BODY not in commands and P.RCPT not in commands
    assert commands.count(P.HEADER) == 4 and P.BODYEOB in commands
    # Macros still precede the step that is not sent, as Postfix sends them.
    assert endpoint.engine.macros(P.HELO)["{tls_version}"] == "TLSv1.3"


def test_symbol_lists_choose_the_macros(tmp_path):
    script = Script(symlists=((P.STAGE_ENVFROM, "{auth_authen} {no_such}"), (P.STAGE_CONNECT, "j")))
    _, endpoint = verdict(tmp_path, script)
    assert endpoint.engine.macros(P.MAIL) == {"{auth_authen}": "ann"}
    assert endpoint.engine.macros(P.CONNECT) == {"j": "mx.example.test"}


@pytest.mark.parametrize(
    "script, why",
    [
        (Script(actions=P.SMFIF_ADDHDRS | P.SMFIF_CHGFROM), "wants actions"),
        (Script(protocol=P.SMFIP_MDS_1M), "wants protocol steps"),
        (Script(version=1), "protocol version 1"),
        (Script(optneg=P.encodeReply(P.CONTINUE)), "answered option negotiation"),
        (Script(actions=P.SMFIF_ADDHDRS, eom=[P.encodeReply(P.DELRCPT, "<x@y.example>"), CONTINUE]), "not negotiated"),
        (Script(eom=[P.encodeReply(P.CHGFROM, "<x@y.example>"), CONTINUE]), "not negotiated"),
        (Script(eom=[P.encodeReply(P.ADDRCPT, "not an address"), CONTINUE]), "bad address"),
        (Script(eom=[P.encodeReply(P.ADDHEADER, "X-Bad", "a\nb"), CONTINUE]), "continuation line"),
        (Script(replies={P.HELO: [P.encodeReply(P.ADDHEADER, "X", "y")]}), "unexpected reply"),
        (Script(replies={P.HELO: [P.encodeReply(P.SKIP)]}), "SMFIR_SKIP"),
        (Script(replies={P.MAIL: [struct.pack("!I", 0)]}), "protocol error"),
        (Script(replies={P.MAIL: [P.packet(b"Z")]}), "protocol error"),
        (Script(replies={P.RCPT: [P.encodeReply(P.SHUTDOWN)]}), "shutting down"),
        (Script(closeAt=P.EOH), "connection lost"),
    ],
)
def test_milter_faults_raise(tmp_path, script, why):
    result, endpoint = check(tmp_path, script)
    assert isinstance(result, Failure), result
    assert result.check(MilterError, ValueError)
    assert why in str(result.value)
    for client in endpoint.clients:
        assert client.transport.disconnecting


def test_milter_down(tmp_path):
    result, _ = check(tmp_path, endpoint=MemoryEndpoint(refuse=True))
    assert result.check(MilterError) and "cannot connect" in str(result.value)


def test_milter_that_hangs_times_out(tmp_path):
    clock = Clock()
    endpoint = MemoryEndpoint(Script(hangAt=P.EOH))
    f = MilterFilter("m1", endpoint, clock, 5.0, runInline, tmp_path)
    d = f.check(message())
    for _ in range(100):
        for pump in endpoint.pumps:
            pump.pump()
    assert not d.called
    clock.advance(4.9)
    assert not d.called
    clock.advance(0.2)
    failures: list = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(MilterTimeout)
    assert "no reply within 5s" in str(failures[0].value)
    assert endpoint.clients[0].transport.disconnecting
    assert not clock.getDelayedCalls()


def test_progress_restarts_the_clock(tmp_path):
    clock = Clock()
    endpoint = MemoryEndpoint(Script(hangAt=P.BODYEOB, eom=[]))
    f = MilterFilter("m1", endpoint, clock, 5.0, runInline, tmp_path)
    d = f.check(message())
    for _ in range(100):
        for pump in endpoint.pumps:
            pump.pump()
    server = endpoint.pumps[0].server
    for _ in range(3):
        clock.advance(4)
        server.transport.write(P.encodeReply(P.PROGRESS))
        endpoint.pumps[0].pump()
    assert not d.called
    server.transport.write(P.encodeReply(P.ADDHEADER, "X-Late", "1") + P.encodeReply(P.CONTINUE))
    endpoint.pumps[0].pump()
    assert d.called
    assert d.result.insertHeaders == ((AT_END, "X-Late", "1"),)


def test_cancel_closes_the_connection(tmp_path):
    clock = Clock()
    endpoint = MemoryEndpoint(Script(hangAt=P.DATA))
    f = MilterFilter("m1", endpoint, clock, 5.0, runInline, tmp_path)
    d = f.check(message())
    for _ in range(100):
        for pump in endpoint.pumps:
            pump.pump()
    d.cancel()
    d.addErrback(lambda _: None)
    assert endpoint.clients[0].transport.disconnecting
    assert not clock.getDelayedCalls()


def test_stop_closes_conversations(tmp_path):
    endpoint = MemoryEndpoint(Script(hangAt=P.DATA))
    f = MilterFilter("m1", endpoint, Clock(), 5.0, runInline, tmp_path)
    d = f.check(message())
    for _ in range(100):
        for pump in endpoint.pumps:
            pump.pump()
    f.stop()
    failures: list = []
    d.addErrback(failures.append)
    assert failures and failures[0].check(MilterError)


def context(tmp_path) -> PluginContext:
    return PluginContext(reactor=Clock(), hostname="mx", postmaster="pm@mx", state_dir=tmp_path, section="filter:av")


@pytest.mark.parametrize(
    "options, key",
    [
        ({}, "endpoint"),
        ({"endpoint": "inet:11332@localhost"}, "endpoint"),
        ({"endpoint": "tcp:"}, "endpoint"),
        ({"endpoint": "tcp:127.0.0.1:1", "timeout": "soon"}, "timeout"),
        ({"endpoint": "tcp:127.0.0.1:1", "timeout": "0"}, "timeout"),
    ],
)
def test_bad_options_name_their_key(tmp_path, options, key):
    with pytest.raises(OptionError) as e:
        build(options, context(tmp_path))
    assert e.value.key == key


def test_build(tmp_path):
    f = build({"endpoint": "unix:/run/milter.sock", "timeout": "2m"}, context(tmp_path))
    assert f.name == "av" and f.timeout == 120.0
    f = build({"endpoint": "tcp:127.0.0.1:11332"}, context(tmp_path))
    assert f.timeout == 30.0
