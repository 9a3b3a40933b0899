"""
Real peers for outbound delivery tests, all on 127.0.0.1: a twisted.names DNS
server (its own twistd process, serving a Python zone file) and aiosmtpd SMTP
servers (in a thread of the test process) that record what they receive and
answer RCPT as told.
"""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relayproc import TWISTD, freePort, waitFor


class DNSServer:
    """C{twistd dns --pyzone}: the zone is Python (SOA, MX, A records as Twisted builds them)."""

    def __init__(self, workdir: Path, zones: dict[str, str]) -> None:
        self.workdir = workdir
        self.port = freeUDPAndTCPPort()
        self.proc: subprocess.Popen | None = None
        self.zoneFiles = []
        for origin, records in zones.items():
            path = workdir / f"zone-{origin}.py"
            path.write_text(
                f"zone = [\n    SOA({origin!r}, mname='ns.{origin}', rname='root.{origin}', serial=1,"
                " refresh=60, retry=60, expire=600, minimum=60, ttl=60),\n" + records + "]\n"
            )
            self.zoneFiles.append(path)

    def start(self) -> DNSServer:
        command = [TWISTD, "-n", "--pidfile=", "--logfile", str(self.workdir / "dns.log"), "dns"]
        command += ["--interface", "127.0.0.1", "--port", str(self.port)]
        for path in self.zoneFiles:
            command += ["--pyzone", str(path)]
        self.proc = subprocess.Popen(command, cwd=self.workdir, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        if not waitFor(lambda: self.proc.poll() is not None or _tcpListening(self.port), 20):
            self.stop()
            raise AssertionError("DNS server did not start")
        if self.proc.poll() is not None:
            raise AssertionError(f"DNS server exited: {(self.workdir / 'dns.log').read_text()}")
        return self

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        if proc is not None and proc.stderr is not None:
            proc.stderr.close()


def _tcpListening(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
        return True
    except OSError:
        return False


def freeUDPAndTCPPort() -> int:
    for _ in range(50):
        port = freePort()
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            try:
                udp.bind(("127.0.0.1", port))
            except OSError:
                continue
        return port
    raise AssertionError("no free port for DNS")


@dataclass
class Received:
    sender: str
    recipients: list[str]
    data: bytes
    mailOptions: list[str]
    rcptOptions: list[list[str]]


@dataclass
class Handler:
    """Records messages; C{rcpt(address) -> reply or None} decides each RCPT."""

    rcpt: Callable[[str], str | None] = lambda address: None
    messages: list[Received] = field(default_factory=list)
    ehlos: int = 0  # one per session (and one more after STARTTLS)

    async def handle_EHLO(self, server: Any, session: Any, envelope: Any, hostname: str, responses: list) -> list:
        self.ehlos += 1
        session.host_name = hostname  # the hook owns this when it exists
        return responses

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        answer = self.rcpt(address)
        if answer is not None:
            return answer
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.append(options)
        return "250 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.messages.append(
            Received(
                envelope.mail_from,
                list(envelope.rcpt_tos),
                envelope.original_content,
                list(envelope.mail_options),
                list(envelope.rcpt_options),
            )
        )
        return "250 2.0.0 Message accepted"


class SMTPPeer:
    """An aiosmtpd server on 127.0.0.1 (or another loopback address)."""

    def __init__(
        self,
        handler: Handler | None = None,
        host: str = "127.0.0.1",
        port: int | None = None,
        certificate: tuple[Path, Path] | None = None,
        users: dict[str, str] | None = None,
        implicit: bool = False,
        brokenTLS: bool = False,
    ) -> None:
        from aiosmtpd.controller import Controller

        self.handler = handler or Handler()
        self.host = host
        self.port = port or freePort()
        kwargs: dict[str, Any] = {"decode_data": False, "ready_timeout": 10}
        if certificate is not None:
            context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            context.load_cert_chain(str(certificate[0]), str(certificate[1]))
            if brokenTLS:
                # Offers STARTTLS, but only a protocol no client here accepts: every handshake fails.
                context.maximum_version = ssl.TLSVersion.TLSv1_2
                context.set_ciphers("aNULL:@SECLEVEL=0")  # anonymous only: no client here offers it
                kwargs.update(tls_context=context, require_starttls=False)
            elif implicit:
                kwargs.update(ssl_context=context)
            else:
                kwargs.update(tls_context=context, require_starttls=True)
        if users is not None:

            def authenticator(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> Any:
                from aiosmtpd.smtp import AuthResult, LoginPassword

                ok = isinstance(data, LoginPassword) and users.get(data.login.decode()) == data.password.decode()
                return AuthResult(success=ok, handled=False)

            kwargs.update(authenticator=authenticator, auth_require_tls=certificate is not None)
        self.controller = Controller(self.handler, hostname=host, port=self.port, **kwargs)

    @property
    def messages(self) -> list[Received]:
        return self.handler.messages

    def start(self) -> SMTPPeer:
        self.controller.start()
        return self

    def stop(self) -> None:
        self.controller.stop()


def waitForMessages(peer: SMTPPeer, count: int, timeout: float = 15.0) -> bool:
    return waitFor(lambda: len(peer.messages) >= count, timeout)


def settle(seconds: float = 0.5) -> None:
    time.sleep(seconds)
