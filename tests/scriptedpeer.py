"""
A scripted SMTP next hop for integration tests: a LAX receiver, the kind SMTP
smuggling works against.

It offers neither PIPELINING nor CHUNKING, takes mail with DATA only, and ends
the data on a line holding a single dot whatever ends the lines around it:
CRLF.CRLF, LF.CRLF, LF.LF or CRLF.LF (a line is anything up to an LF, with a
CR before the LF dropped).  What follows the end is read as commands, so a
message that smuggles a second one through a sender that lets bare LFs pass
arrives here as two.  Every message and every command is recorded.

Listens on 127.0.0.1 only; each connection has a socket timeout, and stop()
shuts the server down and waits for its thread.
"""

from __future__ import annotations

import socketserver
import threading
from dataclasses import dataclass, field

from relayproc import waitFor


@dataclass
class LaxMessage:
    sender: str
    recipients: list[str]
    wire: bytes  # the data section as it came, up to and including the line that ended it
    data: bytes  # unstuffed, with the line endings it had


@dataclass
class LaxRecord:
    messages: list[LaxMessage] = field(default_factory=list)
    commands: list[bytes] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Session(socketserver.BaseRequestHandler):
    server: _Server

    def setup(self) -> None:
        self.request.settimeout(30)
        self.buffer = b""

    def _line(self) -> bytes | None:
        while b"\n" not in self.buffer:
            try:
                data = self.request.recv(65536)
            except OSError:
                return None
            if not data:
                return None
            self.buffer += data
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def _reply(self, text: str) -> None:
        self.request.sendall(text.encode() + b"\r\n")

    def handle(self) -> None:
        record = self.server.record
        self._reply(f"220 {self.server.hostname} ESMTP lax")
        sender, recipients = "", []
        while (line := self._line()) is not None:
            command = line.rstrip(b"\r\n")
            with record.lock:
                record.commands.append(command)
            verb = command[:4].upper()
            if verb == b"EHLO":
                lines = [self.server.hostname, *self.server.keywords]
                self._reply("\r\n".join([f"250-{k}" for k in lines[:-1]] + [f"250 {lines[-1]}"]))
            elif verb == b"HELO":
                self._reply(f"250 {self.server.hostname}")
            elif verb == b"MAIL":
                sender, recipients = command[10:].decode(errors="replace").split(">")[0].lstrip("<"), []
                self._reply("250 2.1.0 ok")
            elif verb == b"RCPT":
                recipients.append(command[8:].decode(errors="replace").split(">")[0].lstrip("<"))
                self._reply("250 2.1.5 ok")
            elif verb == b"DATA":
                self._reply("354 go ahead, end with a dot on a line of its own")
                wire, data = b"", []
                while (dataLine := self._line()) is not None:
                    wire += dataLine
                    if dataLine.rstrip(b"\r\n") == b".":
                        break
                    data.append(dataLine[1:] if dataLine.startswith(b".") else dataLine)
                else:
                    return
                with record.lock:
                    record.messages.append(LaxMessage(sender, recipients, wire, b"".join(data)))
                self._reply("250 2.0.0 queued")
            elif verb == b"RSET":
                sender, recipients = "", []
                self._reply("250 2.0.0 ok")
            elif verb == b"NOOP":
                self._reply("250 2.0.0 ok")
            elif verb == b"QUIT":
                self._reply("221 2.0.0 bye")
                return
            else:
                self._reply("500 5.5.2 what?")


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, record: LaxRecord, hostname: str, keywords: list[str]) -> None:
        super().__init__(("127.0.0.1", 0), _Session)
        self.record = record
        self.hostname = hostname
        self.keywords = keywords


class LaxPeer:
    """A lax, DATA-only next hop on 127.0.0.1 (no PIPELINING, no CHUNKING)."""

    def __init__(self, hostname: str = "lax.test", keywords: tuple[str, ...] = ("8BITMIME", "SIZE 100000000")) -> None:
        self.record = LaxRecord()
        self._server = _Server(self.record, hostname, list(keywords))
        self.port: int = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)

    def start(self) -> LaxPeer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    @property
    def messages(self) -> list[LaxMessage]:
        with self.record.lock:
            return list(self.record.messages)

    @property
    def mailCommands(self) -> list[bytes]:
        with self.record.lock:
            return [c for c in self.record.commands if c[:10].upper() == b"MAIL FROM:"]

    def waitForMessages(self, count: int, timeout: float = 20.0) -> bool:
        return waitFor(lambda: len(self.messages) >= count, timeout, 0.05)
