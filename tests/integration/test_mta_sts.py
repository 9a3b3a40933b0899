"""
MTA-STS (RFC 8461) and TLS reporting (RFC 8460) with the real relay process.

Peers, all on loopback addresses: a twisted.names DNS server (MX, A and the
_mta-sts / _smtp._tls TXT records), an HTTPS policy server with a
certificate from the test CA (tests/certs.py), and mail exchangers on one
port (the mx ``port``), each on its own address: aiosmtpd with a valid
certificate, with a certificate for another name, and a scripted server
that offers no STARTTLS.
"""

from __future__ import annotations

import gzip
import http.server
import json
import ssl
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from certs import PKI
from peers import DNSServer, SMTPPeer, waitForMessages
from relayproc import Relay, freePort, waitFor
from test_mx_policy import ScriptedPeer, freeOnAll
from test_outbound import BASE, send

pytestmark = pytest.mark.integration


class PolicyServer:
    """
    HTTPS on 127.0.0.1 with a certificate from the test CA: C{pages} maps a
    path to (status, headers, body); every request is recorded, POST bodies
    included.
    """

    def __init__(self, certificate: tuple[Path, Path]) -> None:
        self.pages: dict[str, tuple[int, dict[str, str], bytes]] = {}
        self.requests: list[tuple[str, str, dict[str, str], bytes]] = []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            timeout = 10

            def _answer(self, body: bytes = b"") -> None:
                server.requests.append((self.command, self.path, dict(self.headers), body))
                status, headers, page = server.pages.get(self.path, (404, {}, b"not here"))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(page)))
                self.end_headers()
                self.wfile.write(page)

            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self._answer(self.rfile.read(int(self.headers.get("Content-Length", "0"))))

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(str(certificate[0]), str(certificate[1]))
        self.httpd.socket = context.wrap_socket(self.httpd.socket, server_side=True)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def policy(self, text: str, status: int = 200, headers: dict[str, str] | None = None) -> None:
        self.pages["/.well-known/mta-sts.txt"] = (status, headers or {"Content-Type": "text/plain"}, text.encode())

    def start(self) -> PolicyServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=10)


def policyText(mode: str, *mx: str, maxAge: int = 86400) -> str:
    return "version: STSv1\r\n" + f"mode: {mode}\r\n" + "".join(f"mx: {m}\r\n" for m in mx) + f"max_age: {maxAge}\r\n"


def zone(domain: str, mx: list[tuple[int, str, str]], stsID: str | None = "1", tlsrpt: str | None = None) -> str:
    """MX records (preference, host, address), the policy host at 127.0.0.1, the TXT records asked for."""
    records = [f"    MX({domain!r}, {p}, {h!r}),\n    A({h!r}, {a!r}),\n" for p, h, a in mx]
    records.append(f"    A('mta-sts.{domain}', '127.0.0.1'),\n")
    if stsID is not None:
        records.append(f"    TXT('_mta-sts.{domain}', b'v=STSv1; id={stsID};'),\n")
    if tlsrpt is not None:
        records.append(f"    TXT('_smtp._tls.{domain}', {tlsrpt.encode()!r}),\n")
    return "".join(records)


@pytest.fixture
def world(tmp_path):
    """The test CA, and whatever peers the test starts; all are stopped after it."""
    pki = PKI(tmp_path / "pki")
    started: list = []

    def start(peer):
        started.append(peer.start())
        return started[-1]

    yield pki, start
    for each in reversed(started):
        each.stop()


def relayConfig(
    tmp_path: Path, dns: DNSServer, pki: PKI, mxPort: int, stsPort: int, extra: str = ""
) -> tuple[str, int]:
    port = freePort()
    delivery = (
        f"[delivery:internet]\nplugin = mx\nport = {mxPort}\nnameservers = 127.0.0.1:{dns.port}\n"
        f"ca_file = {pki.ca_file}\nmta_sts_port = {stsPort}\n{extra}"
    )
    return BASE.format(state=tmp_path / "var", port=port, delivery=delivery), port


def startRelay(relay, tmp_path, dns, pki, mxPort, stsPort, extra: str = "") -> Relay:
    config, port = relayConfig(tmp_path, dns, pki, mxPort, stsPort, extra)
    return relay(config=config, port=port).start()


def tlsLines(r: Relay) -> list[str]:
    return [line for line in r.logText().splitlines() if "event=tls " in line]


def policyServer(pki: PKI, start, domain: str, text: str) -> PolicyServer:
    server = start(PolicyServer(pki.issue(f"mta-sts.{domain}", name=f"policy-{domain}")))
    server.policy(text)
    return server


# sts.test's MX: a preferred one the policy does not name, without a certificate, then the one it names.
ROGUE_AND_GOOD = [(10, "rogue.sts.test", "127.0.0.2"), (20, "mx.sts.test", "127.0.0.3")]


def rogueAndGood(relay, tmp_path, world) -> tuple[Relay, PolicyServer, SMTPPeer, SMTPPeer, int]:
    """
    sts.test in enforce mode with the MX of L{ROGUE_AND_GOOD}, and a relay
    started on it: the relay, the policy server, the rogue and the good MX,
    and the MX port.
    """
    pki, start = world
    port = freeOnAll(["127.0.0.2", "127.0.0.3"])
    dns = start(DNSServer(tmp_path, {"sts.test": zone("sts.test", ROGUE_AND_GOOD)}))
    policy = policyServer(pki, start, "sts.test", policyText("enforce", "mx.sts.test"))
    rogue = start(SMTPPeer(host="127.0.0.2", port=port))
    good = start(SMTPPeer(host="127.0.0.3", port=port, certificate=pki.issue("mx.sts.test", name="mx")))
    return startRelay(relay, tmp_path, dns, pki, port, policy.port), policy, rogue, good, port


def test_enforce_skips_an_mx_not_in_the_policy_and_delivers_verified(relay, tmp_path, world):
    r, policy, rogue, good, _ = rogueAndGood(relay, tmp_path, world)
    send(r.port, ["someone@sts.test"])
    assert waitForMessages(good, 1), r.logText()[-3000:]
    assert rogue.messages == [] and rogue.handler.ehlos == 0  # never even connected to
    assert "MX rogue.sts.test is not in the MTA-STS policy 1; skipped" in r.logText()
    assert waitFor(lambda: tlsLines(r), 5)
    [line] = tlsLines(r)
    assert "domain=sts.test mx=mx.sts.test" in line
    assert "tls_policy=mta-sts sts_mode=enforce tls=yes tls_verified=yes" in line, line
    assert [(m, p) for m, p, _, _ in policy.requests] == [("GET", "/.well-known/mta-sts.txt")]
    # The policy is cached under state_dir, as served.
    cached = json.loads((tmp_path / "var" / "mta-sts" / "delivery_internet" / "sts.test.json").read_text())
    assert cached["id"] == "1" and "mx: mx.sts.test" in cached["text"]


@pytest.mark.parametrize("kind", ["no-starttls", "wrong-name", "untrusted"])
def test_enforce_defers_4_7_5_and_sends_nothing_in_clear(relay, tmp_path, world, kind):
    pki, start = world
    port = freeOnAll(["127.0.0.2"])
    dns = start(DNSServer(tmp_path, {"sts.test": zone("sts.test", [(10, "mx.sts.test", "127.0.0.2")])}))
    policy = policyServer(pki, start, "sts.test", policyText("enforce", "mx.sts.test"))
    if kind == "no-starttls":
        peer = start(ScriptedPeer("127.0.0.2", port, "220 mx.sts.test ESMTP", "250 mx.sts.test"))
    else:
        certificate = pki.issue("other.test", name="other") if kind == "wrong-name" else pki.selfSigned("mx.sts.test")
        peer = start(SMTPPeer(host="127.0.0.2", port=port, certificate=certificate))
    r = startRelay(relay, tmp_path, dns, pki, port, policy.port)
    send(r.port, ["someone@sts.test"])
    assert waitFor(lambda: "event=deferred " in r.logText(), 15), r.logText()[-3000:]
    [deferred] = [line for line in r.logText().splitlines() if "event=deferred " in line]
    assert "dsn=4.7.5" in deferred and "MTA-STS policy of sts.test" in deferred, deferred
    if kind == "no-starttls":
        assert not any(c.upper().startswith(("MAIL", "RCPT", "DATA")) for c in peer.commands), peer.commands
    else:
        assert peer.messages == []
    [line] = tlsLines(r)
    expected = {
        "no-starttls": "starttls-not-supported",
        "wrong-name": "certificate-host-mismatch",
        "untrusted": "certificate-not-trusted",
    }[kind]
    assert f"tls_policy=mta-sts sts_mode=enforce tls=no tls_verified=no tls_failure={expected}" in line, line
    print(f"\n{kind}: {deferred.split('reply=')[-1][:160]}")


def test_testing_mode_delivers_and_logs_the_failure(relay, tmp_path, world):
    pki, start = world
    port = freeOnAll(["127.0.0.2"])
    dns = start(DNSServer(tmp_path, {"sts.test": zone("sts.test", [(10, "mx.sts.test", "127.0.0.2")])}))
    policy = policyServer(pki, start, "sts.test", policyText("testing", "mx.sts.test"))
    peer = start(SMTPPeer(host="127.0.0.2", port=port, certificate=pki.issue("other.test", name="other")))
    r = startRelay(relay, tmp_path, dns, pki, port, policy.port)
    send(r.port, ["someone@sts.test"])
    assert waitForMessages(peer, 1), r.logText()[-3000:]
    assert waitFor(lambda: len(tlsLines(r)) == 2, 5), tlsLines(r)
    failed, delivered = tlsLines(r)
    assert "sts_mode=testing tls=no tls_verified=no tls_failure=certificate-host-mismatch" in failed, failed
    assert "tls_policy=mta-sts sts_mode=testing tls=yes tls_verified=no" in delivered, delivered
    assert "event=deferred " not in r.logText()


def test_the_cached_policy_holds_when_the_policy_server_is_down(relay, tmp_path, world):
    pki, start = world
    r, policy, rogue, good, port = rogueAndGood(relay, tmp_path, world)
    send(r.port, ["first@sts.test"])
    assert waitForMessages(good, 1), r.logText()[-3000:]
    r.stop()
    policy.stop()
    # A new policy id: the restarted relay tries to fetch it, fails, and keeps the cached one.
    (tmp_path / "dns2").mkdir()
    dns2 = start(DNSServer(tmp_path / "dns2", {"sts.test": zone("sts.test", ROGUE_AND_GOOD, stsID="2")}))
    config, relayPort = relayConfig(tmp_path, dns2, pki, port, policy.port)
    r2 = relay(config=config, port=relayPort).start()
    send(r2.port, ["second@sts.test"])
    assert waitForMessages(good, 2), r2.logText()[-3000:]
    assert rogue.messages == []
    assert "using the cached policy" in r2.logText()
    assert "tls_policy=mta-sts sts_mode=enforce tls=yes tls_verified=yes" in "\n".join(tlsLines(r2))


@pytest.mark.parametrize("served", ["redirect", "html", "too-large"])
def test_a_redirect_a_wrong_type_or_a_huge_policy_is_no_policy(relay, tmp_path, world, served):
    pki, start = world
    port = freeOnAll(["127.0.0.2"])
    dns = start(DNSServer(tmp_path, {"sts.test": zone("sts.test", [(10, "mx.sts.test", "127.0.0.2")])}))
    policy = start(PolicyServer(pki.issue("mta-sts.sts.test", name="policy")))
    enforce = policyText("enforce", "none.test").encode()  # would stop the mail if it applied
    path = "/.well-known/mta-sts.txt"
    if served == "redirect":
        policy.pages[path] = (301, {"Location": "https://mta-sts.sts.test/elsewhere"}, b"")
        policy.pages["/elsewhere"] = (200, {"Content-Type": "text/plain"}, enforce)
        why = "answered 301"
    elif served == "html":
        policy.pages[path] = (200, {"Content-Type": "text/html"}, enforce)
        why = "not text/plain"
    else:
        policy.pages[path] = (200, {"Content-Type": "text/plain"}, enforce + b"x: " + b"y" * 70_000 + b"\r\n")
        why = "larger than 65536 octets"
    peer = start(SMTPPeer(host="127.0.0.2", port=port))  # no TLS at all
    r = startRelay(relay, tmp_path, dns, pki, port, policy.port)
    send(r.port, ["someone@sts.test"])
    assert waitForMessages(peer, 1), r.logText()[-3000:]
    assert [p for _, p, _, _ in policy.requests] == [path]  # a redirect is not followed
    assert why in r.logText() and "no policy applies" in r.logText(), r.logText()[-2000:]
    assert waitFor(lambda: tlsLines(r), 5)
    assert "tls_policy=none tls=no tls_verified=no" in tlsLines(r)[0]


def test_tls_report_counts_survive_a_restart_and_are_sent_by_mail_and_https(relay, tmp_path, world):
    pki, start = world
    port = freeOnAll(["127.0.0.2", "127.0.0.3"])
    reportServer = start(PolicyServer(pki.issue("report.rpt.test", name="report")))
    reportServer.pages["/tlsrpt"] = (201, {}, b"")
    rua = f"v=TLSRPTv1; rua=mailto:tls@rpt.test,https://report.rpt.test:{reportServer.port}/tlsrpt"
    zones = {
        "sts.test": zone("sts.test", [(10, "mx.sts.test", "127.0.0.2")], tlsrpt=rua),
        "rpt.test": zone("rpt.test", [(10, "mx.rpt.test", "127.0.0.3")], stsID=None)
        + "    A('report.rpt.test', '127.0.0.1'),\n",
    }
    # sts.test asks for reports at rpt.test (the mail) and at the HTTPS endpoint.
    dns = start(DNSServer(tmp_path, zones))
    policy = policyServer(pki, start, "sts.test", policyText("enforce", "mx.sts.test"))
    good = start(SMTPPeer(host="127.0.0.2", port=port, certificate=pki.issue("mx.sts.test", name="mx")))
    reports = start(SMTPPeer(host="127.0.0.3", port=port))
    extra = "tls_reports = yes\n"
    config, relayPort = relayConfig(tmp_path, dns, pki, port, policy.port, extra)
    config = config.replace("retry = 1s", "retry = 1h")  # one failed session, not one a second
    r = relay(config=config, port=relayPort).start()
    for n in range(3):
        send(r.port, [f"user{n}@sts.test"])
    assert waitForMessages(good, 3), r.logText()[-3000:]
    good.stop()  # the fourth message finds an MX with a certificate for another name: one failure
    good.stop = lambda: None  # stopped once is enough for the fixture
    wrong = start(SMTPPeer(host="127.0.0.2", port=port, certificate=pki.issue("other.test", name="other")))
    send(r.port, ["user3@sts.test"])
    assert waitFor(lambda: "event=deferred " in r.logText(), 15), r.logText()[-3000:]
    r.stop()
    wrong.stop()
    wrong.stop = lambda: None
    counts = tmp_path / "var" / "tls-reports" / "delivery_internet" / "counts.json"
    data = json.loads(counts.read_text())
    today = datetime.now(UTC).strftime("%Y-%m-%d")
    assert list(data["days"]) == [today]
    # A day passes: what was counted today is yesterday's for the next start, which sends it.
    yesterday = (datetime.now(UTC) - timedelta(days=1)).strftime("%Y-%m-%d")
    counts.write_text(json.dumps({"days": {yesterday: data["days"][today]}}))
    r2 = relay(config=config, port=relayPort).start()
    assert waitForMessages(reports, 1, timeout=30), r2.logText()[-3000:]
    assert waitFor(lambda: any(m == "POST" for m, _, _, _ in reportServer.requests), 10), r2.logText()[-3000:]
    [message] = reports.messages
    assert message.recipients == ["tls@rpt.test"]
    import email

    parsed = email.message_from_bytes(message.data)
    assert parsed.get_content_type() == "multipart/report" and parsed.get_param("report-type") == "tlsrpt"
    assert parsed["TLS-Report-Domain"] == "sts.test"
    [attachment] = [p for p in parsed.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
    assert attachment.get_filename().endswith(".json.gz") and "!sts.test!" in attachment.get_filename()
    report = json.loads(gzip.decompress(attachment.get_payload(decode=True)))
    [_, _, headers, body] = [req for req in reportServer.requests if req[0] == "POST"][0]
    assert headers["Content-Type"] == "application/tlsrpt+gzip"
    posted = json.loads(gzip.decompress(body))
    for each in (report, posted):
        assert each["date-range"] == {
            "start-datetime": f"{yesterday}T00:00:00Z",
            "end-datetime": f"{yesterday}T23:59:59Z",
        }
        assert set(each) == {"organization-name", "date-range", "contact-info", "report-id", "policies"}
        [entry] = each["policies"]
        assert entry["policy"]["policy-type"] == "sts" and entry["policy"]["policy-domain"] == "sts.test"
        assert entry["policy"]["mx-host"] == ["mx.sts.test"] and "mode: enforce" in entry["policy"]["policy-string"]
        assert entry["summary"] == {"total-successful-session-count": 3, "total-failure-session-count": 1}
        [failure] = entry["failure-details"]
        assert failure["result-type"] == "certificate-host-mismatch" and failure["failed-session-count"] == 1
        assert failure["receiving-mx-hostname"] == "mx.sts.test" and failure["receiving-ip"] == "127.0.0.2"
    assert waitFor(lambda: json.loads(counts.read_text())["days"] == {}, 15)  # sent: nothing left to send


# -- DANE (RFC 7672) through the mx backend: tests/dnszone.py sets the AD bit on authenticated zones ------------


def _spkiDigest(certificate) -> str:
    import hashlib

    from cryptography.hazmat.primitives import serialization

    spki = certificate.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).hexdigest()


def daneWorld(tmp_path, pki, start, tlsa: str | None, authenticated: bool = True):
    """dane.test: MX mx.dane.test at 127.0.0.2 (aiosmtpd, a certificate from the test CA), TLSA as given."""
    from cryptography import x509
    from dnszone import MX, TLSA, DNSZone, Zone
    from dnszone import A as A_

    port = freeOnAll(["127.0.0.2"])
    certificate = pki.issue("mx.dane.test", name="dane-mx")
    leaf, intermediate = x509.load_pem_x509_certificates(certificate[0].read_bytes())
    digests = {"3 1 1": _spkiDigest(leaf), "2 1 1": _spkiDigest(intermediate), "wrong": "00" * 32}
    records = [MX("dane.test", 10, "mx.dane.test"), A_("mx.dane.test", "127.0.0.2")]
    if tlsa is not None:
        kind = "3 1 1" if tlsa == "wrong" else tlsa
        records.append(TLSA(f"_{port}._tcp.mx.dane.test", f"{kind} {digests[tlsa]}"))
    dns = start(DNSZone(tmp_path / "dnszone", {"dane.test": Zone(records, authenticated=authenticated)}))
    peer = start(SMTPPeer(host="127.0.0.2", port=port, certificate=certificate))
    return dns, peer, port


def startDANE(relay, tmp_path, dns, port) -> Relay:
    relayPort = freePort()
    delivery = (
        f"[delivery:internet]\nplugin = mx\nport = {port}\nnameservers = {dns.setting}\ndnssec = yes\ndane = yes\n"
    )
    return relay(config=BASE.format(state=tmp_path / "var", port=relayPort, delivery=delivery), port=relayPort).start()


@pytest.mark.parametrize("tlsa", ["3 1 1", "2 1 1"])
def test_dane_a_matching_tlsa_record_delivers(relay, tmp_path, world, tlsa):
    pki, start = world
    dns, peer, port = daneWorld(tmp_path, pki, start, tlsa)
    r = startDANE(relay, tmp_path, dns, port)  # no ca_file: the test CA is trusted by the TLSA record alone
    send(r.port, ["someone@dane.test"])
    assert waitForMessages(peer, 1), r.logText()[-3000:]
    assert waitFor(lambda: tlsLines(r), 5)
    [line] = tlsLines(r)
    assert "mx=mx.dane.test" in line and "tls_policy=dane tls=yes tls_verified=yes" in line, line


def test_dane_a_mismatching_tlsa_record_defers_and_sends_nothing(relay, tmp_path, world):
    pki, start = world
    dns, peer, port = daneWorld(tmp_path, pki, start, "wrong")
    r = startDANE(relay, tmp_path, dns, port)
    send(r.port, ["someone@dane.test"])
    assert waitFor(lambda: "event=deferred " in r.logText(), 15), r.logText()[-3000:]
    [deferred] = [line for line in r.logText().splitlines() if "event=deferred " in line][:1]
    assert "dsn=4.7.5" in deferred and "DANE policy of dane.test" in deferred, deferred
    assert peer.messages == []
    assert "tls_policy=dane tls=no tls_verified=no tls_failure=" in tlsLines(r)[0], tlsLines(r)
    print(f"\nDANE mismatch: {deferred.split('reply=')[-1][:160]}")


def test_dane_an_unauthenticated_tlsa_answer_is_ignored(relay, tmp_path, world):
    pki, start = world
    dns, peer, port = daneWorld(tmp_path, pki, start, "wrong", authenticated=False)
    r = startDANE(relay, tmp_path, dns, port)
    send(r.port, ["someone@dane.test"])
    assert waitForMessages(peer, 1), r.logText()[-3000:]  # opportunistic TLS, as without DANE
    assert waitFor(lambda: tlsLines(r), 5)
    assert "tls_policy=opportunistic tls=yes tls_verified=no" in tlsLines(r)[0], tlsLines(r)
