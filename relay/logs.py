"""
The relay's log observer: Twisted's classic one-line text format, written
for a process that logs a line per message.

C{twistd}'s default observer formats every event's timestamp from scratch
(a time zone lookup and a C{datetime} per line) and takes the general path
through C{eventAsText}; at a few thousand accepted messages a second that was
about a tenth of the reactor thread's time.  This observer writes the same
lines, byte for byte, but formats the timestamp once per second and takes a
short path for the common event (no failure, one line of text).
"""

from __future__ import annotations

import json
import re
import time
from datetime import UTC, datetime
from typing import IO, Any

from twisted.logger import ILogObserver, LogEvent, Logger, LogLevel, formatEvent, formatEventAsClassicLogText
from zope.interface import implementer


class SecondStamps:
    """
    RFC 3339 timestamps to the second in local time, as Twisted's
    C{formatTime} writes them (C{2026-11-30T05:00:36+0000}), computed once per
    second.
    """

    def __init__(self) -> None:
        self._second: int | None = None
        self._stamp = "-"

    def __call__(self, when: float | None) -> str:
        if when is None:
            return "-"
        second = int(when // 1)
        if second != self._second:
            # strftime's %z gives the offset in effect at that moment, so a
            # change of daylight saving time shows from its first second.
            self._stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(second))
            self._second = second
        return self._stamp


@implementer(ILogObserver)
class TextLogObserver:
    """
    Write each event as C{"{timestamp} [{system}] {text}\\n"} to C{out}:
    exactly what C{twistd}'s own text observer writes.

    Without a C{clock} every line is written and flushed at once.  With one,
    the lines of one turn of the reactor are kept here and go out in one
    write at its end (C{callLater(0)}): a message on a new connection logs
    three lines, and a write each was a fifth of the reactor thread's busy
    time at 2 KB.  They are kept here rather than left to C{out}'s buffer,
    which may write through (C{PYTHONUNBUFFERED}, a service manager's
    setting).  What a SIGKILL can take is then the lines of the turn it
    interrupts, never mail.
    """

    def __init__(self, out: IO[str], clock: Any = None) -> None:
        self._out = out
        self._stamps = SecondStamps()
        self._clock = clock
        self._pending: Any = None
        self._lines: list[str] = []

    def __call__(self, event: LogEvent) -> None:
        line = self.format(event)
        if line:
            if self._clock is None:
                self._out.write(line)
                self._out.flush()
                return
            self._lines.append(line)
            if self._pending is None:
                self._pending = self._clock.callLater(0, self.flush)

    def flush(self) -> None:
        """Write out what this turn logged."""
        pending, self._pending = self._pending, None
        if pending is not None and pending.active():
            pending.cancel()  # at shutdown: nothing is left scheduled
        lines, self._lines = self._lines, []
        if lines:
            self._out.write("".join(lines))
        self._out.flush()

    def format(self, event: LogEvent) -> str | None:
        if "log_failure" in event or "log_format" not in event:
            return formatEventAsClassicLogText(event, formatTime=self._stamps)
        # An operator event carries its text already (logEvent): no need to
        # parse its escaped format back, a few microseconds on every line.
        text = event.get("relay_text") or formatEvent(event)
        if not text:
            return None
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
        return f"{self._stamps(event.get('log_time'))} [{system}] {text.replace(chr(10), chr(10) + chr(9))}\n"


def twistdObserver(twistdOptions: Any, out: IO[str], format: str = "text", clock: Any = None) -> Any:
    """
    The observer C{twistd} should use, given its own command-line options
    and C{[log] format}.  Text: ours when C{twistd} would write text to
    standard output (C{-n} without C{--logfile}, the way the relay runs under
    a service manager and in C{make run}); C{None}, leaving C{twistd}'s choice
    alone, for a log file, syslog or an observer named with C{--logger}.
    JSON: ours to standard output or to the log file C{twistd} would write
    (C{--logfile}, or C{twistd.log} for a daemon), rotated as C{twistd}
    rotates it; syslog and C{--logger} are still C{twistd}'s.
    """
    if twistdOptions is None:
        return None
    get = getattr(twistdOptions, "get", None)
    if get is None:
        return None
    if get("syslog") or get("logger"):
        return None
    logfile = get("logfile")
    toStdout = logfile in (None, "", "-") and get("nodaemon") or logfile == "-"
    if format == "json":
        if toStdout:
            return JSONLogObserver(out)
        from twisted.python.logfile import LogFile

        return JSONLogObserver(LogFile.fromFullPath(logfile or "twistd.log"))  # type: ignore[arg-type]
    if not toStdout:
        return None
    return TextLogObserver(out, clock)


# -- operator events ------------------------------------------------------

EVENTS = ("connect", "disconnect", "accepted", "rejected", "delivered", "deferred", "bounced", "expired")
"""The events an operator follows a message by; each is one log line."""

_ADDRESS_KEYS = frozenset({"from", "to"})
_NEEDS_QUOTES = re.compile(r'[ "=\\]')


def _textValue(key: str, value: Any) -> str:
    if key in _ADDRESS_KEYS:
        return f"<{value}>"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)
    if not text or _NEEDS_QUOTES.search(text) is not None or not text.isprintable():
        # JSON string syntax: a shipper splits on spaces outside quotes and
        # unescapes as JSON would; the line stays one line.
        return json.dumps(text, ensure_ascii=False)
    return text


def eventText(name: str, fields: dict[str, Any]) -> str:
    """
    The stable C{key=value} form of an event: C{event=NAME} first, then the
    fields in the order given, a field whose value is C{None} left out.
    Addresses are written C{<...>} (so the null sender is C{from=<>}), a
    value with a space, quote, C{=} or backslash as a JSON string, a float
    to the millisecond.
    """
    parts = [f"event={name}"]
    for key, value in fields.items():
        if value is not None:
            parts.append(f"{key}={_textValue(key, value)}")
    return " ".join(parts)


def logEvent(log: Logger, name: str, fields: dict[str, Any], level: LogLevel = LogLevel.info) -> None:
    """
    Emit operator event C{name}: its text form as the log line (for the text
    observer and for C{twistd}'s own), and the fields themselves under
    C{relay_event}/C{relay_fields} for L{JSONLogObserver}, so both formats
    carry the same facts.
    """
    text = eventText(name, fields)
    log.emit(level, text.replace("{", "{{").replace("}", "}}"), relay_event=name, relay_fields=fields, relay_text=text)


@implementer(ILogObserver)
class JSONLogObserver:
    """
    One JSON object per line (C{[log] format = json}): an operator event as
    C{{"time", "level", "system", "event", ...its fields}}, anything else as
    C{{"time", "level", "system", "event": "log", "text"}} with a
    C{"traceback"} when there is one.  Unlike C{twistd}'s C{jsonFileLogObserver}
    (record separators, every internal key), a line is what a shipper expects.
    """

    def __init__(self, out: IO[str]) -> None:
        self._out = out

    def __call__(self, event: LogEvent) -> None:
        record = self.record(event)
        if record is not None:
            self._out.write(json.dumps(record, ensure_ascii=False, default=str) + "\n")
            self._out.flush()

    def record(self, event: LogEvent) -> dict[str, Any] | None:
        when = event.get("log_time")
        level = event.get("log_level")
        head: dict[str, Any] = {
            "time": _rfc3339(when) if when is not None else None,
            "level": level.name if level is not None else "info",
            "system": event.get("log_system") or event.get("log_namespace", "-"),
        }
        name = event.get("relay_event")
        if name is not None:
            fields = {k: v for k, v in event.get("relay_fields", {}).items() if v is not None}
            return {**head, "event": name, **fields}
        failure = event.get("log_failure")
        text = formatEvent(event)
        if not text and failure is None:
            return None
        record = {**head, "event": "log", "text": text}
        if failure is not None:
            record["traceback"] = failure.getTraceback()
        return record


def _rfc3339(when: float) -> str:
    return datetime.fromtimestamp(when, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
