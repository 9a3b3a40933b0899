"""
A scripted milter for tests: it speaks the milter side of the protocol from
a L{Script} and records what the MTA sent.

L{MilterEngine} is the logic, bytes in and bytes out, with no I/O;
L{ScriptedMilterProtocol} runs it as a Twisted protocol (for unit tests, over
twisted.test.iosim), L{ScriptedMilterServer} as a threaded TCP server on
127.0.0.1 (for integration tests against the real relay process: each
connection a socket timeout, stop() shuts it down and waits for its thread).
"""

from __future__ import annotations

import socketserver
import threading
from dataclasses import dataclass, field

from twisted.internet.protocol import Protocol

from relay.milter import protocol as P

ALL_ACTIONS = (
    P.SMFIF_ADDHDRS | P.SMFIF_CHGBODY | P.SMFIF_ADDRCPT | P.SMFIF_DELRCPT | P.SMFIF_CHGHDRS | P.SMFIF_QUARANTINE
)

_ANSWERED = {
    P.CONNECT: P.SMFIP_NR_CONN,
    P.HELO: P.SMFIP_NR_HELO,
    P.MAIL: P.SMFIP_NR_MAIL,
    P.RCPT: P.SMFIP_NR_RCPT,
    P.DATA: P.SMFIP_NR_DATA,
    P.HEADER: P.SMFIP_NR_HDR,
    P.EOH: P.SMFIP_NR_EOH,
    P.BODY: P.SMFIP_NR_BODY,
    P.UNKNOWN: P.SMFIP_NR_UNKN,
}

CONTINUE = P.encodeReply(P.CONTINUE)


@dataclass
class Script:
    """
    What the milter answers.

    @ivar replies: per step (C{P.CONNECT}, C{P.RCPT}, ...), the packets to
        send instead of a continue, used up in order (then continue again).
    @ivar eom: the packets sent at the end of the message: modifications,
        then a final reply.
    @ivar hangAt: a step after which the milter says nothing more.
    @ivar closeAt: a step at which the milter closes the connection.
    @ivar optneg: the raw answer to option negotiation, instead of the one built from the fields.
    """

    version: int = 6
    actions: int = ALL_ACTIONS
    protocol: int = 0
    symlists: tuple[tuple[int, str], ...] = ()
    replies: dict[bytes, list[bytes]] = field(default_factory=dict)
    eom: list[bytes] = field(default_factory=lambda: [CONTINUE])
    hangAt: bytes | None = None
    closeAt: bytes | None = None
    optneg: bytes | None = None


class MilterEngine:
    """
    One milter conversation: L{feed} the MTA's bytes, get the milter's.

    @ivar seen: every command received, decoded, in order.
    @ivar closed: whether the script closed the connection.
    """

    def __init__(self, script: Script) -> None:
        self.script = script
        self.reader = P.PacketReader()
        self.seen: list[P.Command] = []
        self.hung = False
        self.closed = False
        self.replies = {k: list(v) for k, v in script.replies.items()}

    def feed(self, data: bytes) -> bytes:
        out = b""
        for command, payload in self.reader.feed(data):
            if self.hung or self.closed:
                break
            decoded = P.decodeCommand(command, payload)
            self.seen.append(decoded)
            if command == self.script.closeAt:
                self.closed = True
                break
            out += self._answer(decoded)
            if command == self.script.hangAt:
                self.hung = True
        return out

    def _answer(self, command: P.Command) -> bytes:
        s = self.script
        c = command.command
        if c == P.OPTNEG:
            if s.optneg is not None:
                return s.optneg
            return P.encodeOptnegReply(s.version, s.actions, s.protocol, s.symlists)
        if c == P.BODYEOB:
            return b"".join(s.eom)
        if c in _ANSWERED:
            if s.protocol & _ANSWERED[c]:
                return b""
            queued = self.replies.get(c)
            if queued:
                return queued.pop(0)
            return CONTINUE
        return b""  # MACRO, ABORT, QUIT: never answered

    # -- what the MTA sent, for assertions ------------------------------------

    def commands(self) -> list[bytes]:
        return [c.command for c in self.seen]

    def macros(self, command: bytes) -> dict[str, str]:
        """The macros sent for step C{command} (the last time)."""
        found: dict[str, str] = {}
        for c in self.seen:
            if c.command == P.MACRO and c.args[0] == command:
                found = dict(c.args[1])
        return found

    def headers(self) -> list[tuple[str, str]]:
        return [c.args for c in self.seen if c.command == P.HEADER]

    def body(self) -> bytes:
        return b"".join(c.args[0] for c in self.seen if c.command == P.BODY)

    def args(self, command: bytes) -> list[tuple]:
        return [c.args for c in self.seen if c.command == command]


class ScriptedMilterProtocol(Protocol):
    def __init__(self, script: Script) -> None:
        self.engine = MilterEngine(script)

    def dataReceived(self, data: bytes) -> None:
        out = self.engine.feed(data)
        if out:
            self.transport.write(out)
        if self.engine.closed:
            self.transport.loseConnection()


class _Handler(socketserver.BaseRequestHandler):
    server: _Server

    def handle(self) -> None:
        self.request.settimeout(30)
        engine = MilterEngine(self.server.owner.script)
        with self.server.owner.lock:
            self.server.owner.engines.append(engine)
        while True:
            try:
                data = self.request.recv(65536)
            except OSError:
                return
            if not data:
                return
            try:
                out = engine.feed(data)
            except P.MilterProtocolError:
                return
            if out:
                self.request.sendall(out)
            if engine.closed:
                return


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    owner: ScriptedMilterServer


class ScriptedMilterServer:
    """A scripted milter on 127.0.0.1:port, its script changeable between messages."""

    def __init__(self, script: Script | None = None) -> None:
        self.script = script or Script()
        self.engines: list[MilterEngine] = []
        self.lock = threading.Lock()
        self.server = _Server(("127.0.0.1", 0), _Handler)
        self.server.owner = self
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)

    def start(self) -> ScriptedMilterServer:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def __enter__(self) -> ScriptedMilterServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def endpoint(self) -> str:
        return f"tcp:127.0.0.1:{self.port}"
