"""
The MX backend's policy with the real process: mail that would loop back to
the relay bounces with 5.4.6; a refusal at the greeting or at EHLO moves on
to the next MX; at most ``max_mx`` addresses are tried per attempt.  Peers
are a twisted.names DNS server, aiosmtpd, and scripted servers that refuse,
each on its own loopback address and all on the same port (the mx ``port``).
"""

from __future__ import annotations

import socket
import socketserver
import subprocess
import threading

import pytest
from peers import DNSServer, SMTPPeer, waitForMessages
from relayproc import TWISTD, Relay, freePort, waitFor
from test_outbound import BASE, reports, send, statuses

pytestmark = pytest.mark.integration


class ScriptedPeer:
    """
    A server that says C{greeting}, then answers EHLO and HELO with
    C{hello}, QUIT with 221 and anything else with 502; it counts the
    connections it gets.  A greeting other than 220 is followed by a close,
    as real servers do.
    """

    def __init__(self, host: str, port: int, greeting: str, hello: str = "250 scripted") -> None:
        self.host = host
        self.port = port
        self.connections = 0
        self.commands: list[str] = []
        peer = self

        class Handler(socketserver.StreamRequestHandler):
            timeout = 10  # every read is bounded

            def handle(self) -> None:
                peer.connections += 1
                self.wfile.write(greeting.encode() + b"\r\n")
                if not greeting.startswith("220"):
                    return
                for _ in range(20):
                    try:
                        line = self.rfile.readline(1000).decode(errors="replace").strip()
                    except OSError:
                        return
                    if not line:
                        return
                    peer.commands.append(line)
                    verb = line.split(" ", 1)[0].upper()
                    if verb in ("EHLO", "HELO"):
                        self.wfile.write(hello.encode() + b"\r\n")
                    elif verb == "QUIT":
                        self.wfile.write(b"221 bye\r\n")
                        return
                    else:
                        self.wfile.write(b"502 5.5.1 not here\r\n")

        class Server(socketserver.ThreadingTCPServer):
            allow_reuse_address = True
            daemon_threads = True

        self.server = Server((host, port), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> ScriptedPeer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=10)


def freeOnAll(hosts: list[str]) -> int:
    """A port free on every one of these loopback addresses."""
    for _ in range(50):
        port = freePort()
        try:
            for host in hosts:
                with socket.socket() as s:
                    s.bind((host, port))
        except OSError:
            continue
        return port
    raise AssertionError("no port free on every address")


@pytest.fixture
def world(tmp_path):
    """Start DNS servers and peers as asked; all are stopped after the test."""
    started: list = []

    def dns(zones: dict[str, str]) -> DNSServer:
        started.append(DNSServer(tmp_path, zones).start())
        return started[-1]

    def scripted(host: str, port: int, greeting: str, hello: str = "250 scripted") -> ScriptedPeer:
        started.append(ScriptedPeer(host, port, greeting, hello).start())
        return started[-1]

    def sink(host: str, port: int) -> SMTPPeer:
        started.append(SMTPPeer(host=host, port=port).start())
        return started[-1]

    yield dns, scripted, sink
    for each in reversed(started):
        each.stop()


def startRelay(
    relay, tmp_path, dns: DNSServer, mxPort: int, extra: str = "", port: int | None = None, retry: str = "1s"
) -> Relay:
    port = port or freePort()
    delivery = f"[delivery:internet]\nplugin = mx\nport = {mxPort}\nnameservers = 127.0.0.1:{dns.port}\n{extra}"
    config = BASE.format(state=tmp_path / "var", port=port, delivery=delivery).replace("retry = 1s", f"retry = {retry}")
    return relay(config=config, port=port).start()


def test_mx_pointing_at_ourselves_bounces_with_5_4_6(relay, tmp_path, world):
    dns, _, _ = world
    port = freePort()
    server = dns({"loop.test": "    MX('loop.test', 10, 'mx.loop.test'),\n    A('mx.loop.test', '127.0.0.1'),\n"})
    r = startRelay(relay, tmp_path, server, mxPort=port, port=port)  # the MX is our own listener
    send(r.port, ["someone@loop.test"])
    assert waitFor(lambda: len(reports(r)) == 1, 15), r.logText()[-3000:]
    [report] = reports(r)
    assert statuses(report) == {"someone@loop.test": "5.4.6"}
    assert "mail for loop.test loops back to myself" in report.as_string()
    assert "event=bounced " in r.logText() and "deferred " not in r.logText()
    # Found from the address, before connecting (the greeting check would catch it later).
    assert "MX mx.loop.test (preference 10) is this relay" in r.logText()


def test_a_server_greeting_with_our_hostname_is_a_loop(relay, tmp_path, world):
    dns, scripted, _ = world
    port = freeOnAll(["127.0.0.2"])
    zone = "    MX('mirror.test', 10, 'mx.mirror.test'),\n    A('mx.mirror.test', '127.0.0.2'),\n"
    server = dns({"mirror.test": zone})
    peer = scripted("127.0.0.2", port, "220 relay.test ESMTP")  # relay.test is our [relay] hostname
    r = startRelay(relay, tmp_path, server, mxPort=port)
    send(r.port, ["someone@mirror.test"])
    assert waitFor(lambda: len(reports(r)) == 1, 15), r.logText()[-3000:]
    assert statuses(reports(r)[0]) == {"someone@mirror.test": "5.4.6"}
    assert peer.connections == 1
    assert not any(c.upper().startswith("MAIL") for c in peer.commands)


TWO_MX = """\
    MX('two.test', 10, 'first.two.test'),
    MX('two.test', 20, 'second.two.test'),
    A('first.two.test', '127.0.0.2'),
    A('second.two.test', '127.0.0.3'),
"""


@pytest.mark.parametrize(
    "greeting, hello",
    [("421 4.3.2 first is busy", "250 unused"), ("220 first.two.test ESMTP", "451 4.3.0 EHLO not now")],
    ids=["4xx-greeting", "4xx-ehlo"],
)
def test_a_refusal_before_the_transaction_tries_the_next_mx(relay, tmp_path, world, greeting, hello):
    dns, scripted, sink = world
    port = freeOnAll(["127.0.0.2", "127.0.0.3"])
    server = dns({"two.test": TWO_MX})
    first = scripted("127.0.0.2", port, greeting, hello)
    second = sink("127.0.0.3", port)
    r = startRelay(relay, tmp_path, server, mxPort=port)
    send(r.port, ["someone@two.test"])
    assert waitForMessages(second, 1), r.logText()[-3000:]
    assert second.messages[0].recipients == ["someone@two.test"]
    assert first.connections == 1
    assert not any(c.upper().startswith("MAIL") for c in first.commands)
    assert waitFor(lambda: "delivered " in r.logText(), 5)
    assert "first.two.test[127.0.0.2]" in r.logText() and "refused the session" in r.logText()
    assert "deferred " not in r.logText() and reports(r) == []


SEVEN = [f"127.0.0.{n}" for n in range(2, 9)]
SEVEN_MX = "".join(
    f"    MX('seven.test', {10 * n}, 'mx{n}.seven.test'),\n    A('mx{n}.seven.test', '{address}'),\n"
    for n, address in enumerate(SEVEN, 1)
)


@pytest.mark.parametrize("limit", [None, 2])
def test_only_max_mx_addresses_are_tried(relay, tmp_path, world, limit):
    dns, scripted, _ = world
    port = freeOnAll(SEVEN)
    server = dns({"seven.test": SEVEN_MX})
    peers = [scripted(address, port, f"421 4.3.2 {address} busy") for address in SEVEN]
    extra = "" if limit is None else f"max_mx = {limit}\n"
    expected = limit or 5
    r = startRelay(relay, tmp_path, server, mxPort=port, extra=extra, retry="1h")  # one attempt
    send(r.port, ["someone@seven.test"])
    assert waitFor(lambda: "deferred " in r.logText(), 15), r.logText()[-3000:]
    counts = [peer.connections for peer in peers]
    assert counts == [1] * expected + [0] * (7 - expected), counts
    [deferred] = [line for line in r.logText().splitlines() if "deferred " in line]
    assert f"{SEVEN[expected - 1]} busy" in deferred  # the last address tried gave the status
    print(f"\nmax_mx={expected}: connections per MX {counts}")


@pytest.mark.parametrize("value", ["0", "many", "101"])
def test_a_bad_max_mx_stops_startup_naming_the_key(tmp_path, value):
    config = tmp_path / "bad.ini"
    delivery = f"[delivery:internet]\nplugin = mx\nmax_mx = {value}\n"
    config.write_text(BASE.format(state=tmp_path / "var", port=freePort(), delivery=delivery))
    result = subprocess.run(
        [TWISTD, "-n", "--pidfile=", "relay", "--config", str(config)], cwd=tmp_path, capture_output=True, timeout=30
    )
    err = result.stderr.decode()
    assert result.returncode != 0
    assert f"{config}: [delivery:internet] max_mx: bad value {value!r}" in err, err
    assert "Traceback" not in err
