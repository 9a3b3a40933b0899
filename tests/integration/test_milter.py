"""
Milters in the real twistd relay, against real milters from Debian's
packages, started here and stopped by PID:

  - OpenDKIM in sign mode: relayed mail arrives signed and the signature
    verifies with dkimpy against the key generated here;
  - rspamd's proxy worker in milter mode (a private configuration: no redis,
    DNS pointed at a closed local port, so no network): the GTUBE test string
    is refused with a 5xx, a clean message gets rspamd's headers;
  - the scripted milter (tests/scriptedmilter.py) for the other actions:
    clamav-milter would need a virus database, which cannot be downloaded
    here, so its quarantine, and the discard, recipient, header and body
    actions, are played by the script;
  - a milter that is down or hangs: 451 4.3.0, or the message taken with
    on_error = accept; the session and the process go on.
"""

from __future__ import annotations

import base64
import os
import signal
import smtplib
import subprocess

import dkim
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from relayproc import children, freePort, listening, smarthostConfig, tool, waitFor
from scriptedmilter import CONTINUE, Script, ScriptedMilterServer
from scriptedpeer import LaxPeer

from relay.milter import protocol as P

pytestmark = pytest.mark.integration

GTUBE = b"XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"


def message(subject: str = "hello", body: bytes = b"Hello,\r\n\r\na clean message.\r\n") -> bytes:
    return (
        b"From: Ann <ann@example.org>\r\nTo: <bob@far.example>\r\nSubject: "
        + subject.encode()
        + b"\r\nDate: Mon, 30 Nov 2026 08:00:00 +0000\r\nMessage-ID: <"
        + subject.encode()
        + b".1@example.org>\r\n\r\n"
        + body
    )


def startRelay(relay, tmp_path, peer: LaxPeer, sections: dict[str, str]):
    port = freePort()
    text = "\n".join(f"[filter:{name}]\n{body}" for name, body in sections.items())
    config = smarthostConfig(
        tmp_path / "var", port, peer.port, queue="retry = 1h", policy=f"filters = {' '.join(sections)}\n\n{text}"
    )
    return relay(config=config, port=port).start()


def stopProcess(proc: subprocess.Popen, workers: list[int] = ()) -> None:
    """Stop a milter we started, by its PID, and any worker of it still there."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    for pid in workers:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.fixture
def peer():
    p = LaxPeer().start()
    yield p
    p.stop()


# -- OpenDKIM ---------------------------------------------------------------


@pytest.fixture
def opendkim(tmp_path):
    binary = tool("opendkim")
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    keyPath = tmp_path / "dkim.key"
    keyPath.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()
        )
    )
    keyPath.chmod(0o600)
    public = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    record = b"v=DKIM1; k=rsa; p=" + base64.b64encode(public)
    port = freePort()
    conf = tmp_path / "opendkim.conf"
    conf.write_text(
        f"Syslog no\nMode s\nDomain example.org\nSelector sel\nKeyFile {keyPath}\n"
        f"Socket inet:{port}@127.0.0.1\nPidFile {tmp_path / 'opendkim.pid'}\nBackground no\n"
        "Canonicalization relaxed/relaxed\nInternalHosts 127.0.0.1\nRequireSafeKeys no\n"
    )
    proc = subprocess.Popen(
        [binary, "-f", "-x", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
    )
    try:
        assert waitFor(lambda: proc.poll() is not None or listening(port), 20), "opendkim did not start"
        assert proc.poll() is None, proc.stdout.read()
        yield port, record
    finally:
        stopProcess(proc)
        proc.stdout.close()


def test_opendkim_signs_and_the_signature_verifies(relay, tmp_path, peer, opendkim):
    port, record = opendkim
    r = startRelay(relay, tmp_path, peer, {"opendkim": f"plugin = milter\nendpoint = tcp:127.0.0.1:{port}\n"})
    with smtplib.SMTP("127.0.0.1", r.port, timeout=30) as client:
        assert client.sendmail("ann@example.org", ["bob@far.example"], message("signed")) == {}
        assert client.noop()[0] == 250
    assert peer.waitForMessages(1), r.logText()[-3000:]
    data = peer.messages[0].data
    # The relay's Received stays on top; OpenDKIM's signature comes right under it, above what it signs.
    fields = [line.split(b":")[0] for line in data.split(b"\r\n\r\n")[0].split(b"\r\n") if line[:1] not in b" \t"]
    assert fields[:3] == [b"Received", b"DKIM-Signature", b"From"], fields
    assert b"d=example.org" in data and b"s=sel" in data and b"c=relaxed/relaxed" in data

    def dnsfunc(name: bytes, timeout: int = 5) -> bytes:
        assert name == b"sel._domainkey.example.org."
        return record

    assert dkim.verify(data, dnsfunc=dnsfunc), data[:2000]
    assert not dkim.verify(data.replace(b"a clean message", b"a changed message"), dnsfunc=dnsfunc)
    assert "filters=opendkim:continue" in r.logText()


# -- rspamd -----------------------------------------------------------------

RSPAMD_CONF = """\
.include "$CONFDIR/common.conf"
options {{
    pidfile = "$RUNDIR/rspamd.pid";
    .include "$CONFDIR/options.inc"
    dns {{ nameserver = ["127.0.0.1:{dns}"]; timeout = 0.2s; retransmits = 1; }}
}}
logging {{ type = "file"; filename = "$LOGDIR/rspamd.log"; level = "info"; }}
worker "rspamd_proxy" {{
    bind_socket = "127.0.0.1:{port}";
    milter = yes;
    timeout = 120s;
    upstream "local" {{ default = yes; self_scan = yes; }}
    count = 1;
    spam_header = "X-Spam";
    reject_message = "Spam message rejected";
}}
"""

MILTER_HEADERS = """\
use = ["x-spamd-result", "x-rspamd-queue-id", "x-rspamd-server"];
skip_local = false;
skip_authenticated = false;
"""


@pytest.fixture
def rspamd(tmp_path):
    binary = tool("rspamd")
    home = tmp_path / "rspamd"
    (home / "local.d").mkdir(parents=True)
    port = freePort()
    (home / "rspamd.conf").write_text(RSPAMD_CONF.format(port=port, dns=freePort()))
    (home / "local.d" / "milter_headers.conf").write_text(MILTER_HEADERS)
    variables = []
    for name, value in [("CONFDIR", "/etc/rspamd"), ("LOCAL_CONFDIR", home), ("RUNDIR", home), ("DBDIR", home)]:
        variables += ["--var", f"{name}={value}"]
    variables += ["--var", f"LOGDIR={home}"]
    proc = subprocess.Popen(
        [binary, "-f", "-i", "-u", "root", "-g", "root", "-c", str(home / "rspamd.conf"), *variables]
        if os.geteuid() == 0
        else [binary, "-f", "-c", str(home / "rspamd.conf"), *variables],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
    )
    workers: list[int] = []
    try:
        assert waitFor(lambda: proc.poll() is not None or listening(port), 60), "rspamd did not start"
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        workers = children(proc.pid, b"rspamd")
        yield port, home
    finally:
        workers = workers or children(proc.pid, b"rspamd")
        stopProcess(proc, workers)
        proc.stdout.close()


def test_rspamd_rejects_gtube_and_adds_its_headers_to_clean_mail(relay, tmp_path, peer, rspamd):
    port, _ = rspamd
    r = startRelay(relay, tmp_path, peer, {"rspamd": f"plugin = milter\nendpoint = tcp:127.0.0.1:{port}\n"})
    with smtplib.SMTP("127.0.0.1", r.port, timeout=60) as client:
        with pytest.raises(smtplib.SMTPDataError) as e:
            client.sendmail("ann@example.org", ["bob@far.example"], message("gtube", GTUBE + b"\r\n"))
        assert 500 <= e.value.smtp_code < 600, e.value
        assert b"5.7.1" in e.value.smtp_error and b"Gtube pattern" in e.value.smtp_error
        assert client.noop()[0] == 250  # the session goes on
        assert client.sendmail("ann@example.org", ["bob@far.example"], message("clean")) == {}
    assert peer.waitForMessages(1), r.logText()[-3000:]
    [delivered] = peer.messages
    assert b"Subject: clean" in delivered.data
    head = delivered.data.split(b"\r\n\r\n")[0]
    assert b"\r\nX-Spamd-Result: default: False" in head
    assert b"\r\nX-Rspamd-Queue-Id: " in head
    log = r.logText()
    assert "filters=rspamd:reject" in log and "filters=rspamd:continue" in log
    assert r.proc.poll() is None


# -- the scripted milter: the other actions -----------------------------------


def test_scripted_milter_actions(relay, tmp_path, peer):
    with ScriptedMilterServer() as milter:
        r = startRelay(relay, tmp_path, peer, {"m": f"plugin = milter\nendpoint = {milter.endpoint}\ntimeout = 5s\n"})
        with smtplib.SMTP("127.0.0.1", r.port, timeout=30) as client:
            # Header, body and recipient changes.
            milter.script = Script(
                eom=[
                    P.encodeReply(P.ADDHEADER, "X-Scanned", "yes"),
                    P.encodeReply(P.CHGHEADER, 1, "Subject", "[checked] changes"),
                    P.encodeReply(P.REPLBODY, b"replaced body\r\n"),
                    P.encodeReply(P.ADDRCPT, "<archive@far.example>"),
                    P.encodeReply(P.DELRCPT, "<carl@far.example>"),
                    CONTINUE,
                ]
            )
            refused = client.sendmail("ann@example.org", ["bob@far.example", "carl@far.example"], message("changes"))
            assert refused == {}
            assert peer.waitForMessages(1), r.logText()[-3000:]
            [changed] = peer.messages
            assert sorted(changed.recipients) == ["archive@far.example", "bob@far.example"]
            head, _, body = changed.data.partition(b"\r\n\r\n")
            assert b"\r\nSubject: [checked] changes\r\n" in head + b"\r\n"
            assert head.endswith(b"\r\nX-Scanned: yes")
            assert body == b"replaced body\r\n"
            engine = milter.engines[-1]
            assert engine.args(P.RCPT) == [("<bob@far.example>",), ("<carl@far.example>",)]
            assert engine.macros(P.CONNECT)["{client_addr}"] == "127.0.0.1"

            # A reply code with its text, and a tempfail.
            milter.script = Script(eom=[P.encodeReply(P.REPLYCODE, "550 5.7.0 Policy says no")])
            with pytest.raises(smtplib.SMTPDataError) as e:
                client.sendmail("ann@example.org", ["bob@far.example"], message("refused"))
            assert (e.value.smtp_code, e.value.smtp_error) == (550, b"5.7.0 Policy says no")
            milter.script = Script(replies={P.MAIL: [P.encodeReply(P.TEMPFAIL)]})
            with pytest.raises(smtplib.SMTPDataError) as e:
                client.sendmail("ann@example.org", ["bob@far.example"], message("later"))
            assert e.value.smtp_code == 451 and e.value.smtp_error.startswith(b"4.7.1")

            # Quarantine: taken, held, not delivered.  Discard: taken, dropped.
            milter.script = Script(eom=[P.encodeReply(P.QUARANTINE, "suspicious attachment"), CONTINUE])
            assert client.sendmail("ann@example.org", ["bob@far.example"], message("held")) == {}
            milter.script = Script(eom=[P.encodeReply(P.DISCARD)])
            assert client.sendmail("ann@example.org", ["bob@far.example"], message("dropped")) == {}
            assert client.noop()[0] == 250
        assert waitFor(lambda: "event=discarded" in r.logText(), 10), r.logText()[-3000:]
        log = r.logText()
        assert "filters=m:hold" in log and "held=yes" in log
        assert "filters=m:reject" in log and "filters=m:tempfail" in log
        assert not peer.waitForMessages(2, timeout=1.5)  # neither the held nor the discarded one left
        assert r.proc.poll() is None


# -- a milter that is down or hangs -------------------------------------------


def test_milter_down_or_hanging_costs_451_and_the_relay_stays_up(relay, tmp_path, peer):
    closed = freePort()
    with ScriptedMilterServer(Script(hangAt=P.EOH)) as hanging:
        r = startRelay(
            relay,
            tmp_path,
            peer,
            {
                "down": f"plugin = milter\nendpoint = tcp:127.0.0.1:{closed}\n",
            },
        )
        with smtplib.SMTP("127.0.0.1", r.port, timeout=30) as client:
            with pytest.raises(smtplib.SMTPDataError) as e:
                client.sendmail("ann@example.org", ["bob@far.example"], message("down"))
            assert (e.value.smtp_code, e.value.smtp_error[:5]) == (451, b"4.3.0")
            assert client.noop()[0] == 250
        assert r.proc.poll() is None
        log = r.logText()
        assert "filter down failed" in log and "cannot connect" in log
        r.stop()

        r = startRelay(
            relay, tmp_path, peer, {"slow": f"plugin = milter\nendpoint = {hanging.endpoint}\ntimeout = 1s\n"}
        )
        with smtplib.SMTP("127.0.0.1", r.port, timeout=30) as client:
            with pytest.raises(smtplib.SMTPDataError) as e:
                client.sendmail("ann@example.org", ["bob@far.example"], message("hangs"))
            assert (e.value.smtp_code, e.value.smtp_error[:5]) == (451, b"4.3.0")
            assert client.noop()[0] == 250
        assert r.proc.poll() is None
        assert "no reply within 1s" in r.logText()
        r.stop()

        r = startRelay(
            relay,
            tmp_path,
            peer,
            {"down": f"plugin = milter\nendpoint = tcp:127.0.0.1:{closed}\non_error = accept\n"},
        )
        with smtplib.SMTP("127.0.0.1", r.port, timeout=30) as client:
            assert client.sendmail("ann@example.org", ["bob@far.example"], message("skipped")) == {}
        assert peer.waitForMessages(1), r.logText()[-3000:]
        assert "skipped (on_error = accept)" in r.logText()
        assert r.proc.poll() is None
