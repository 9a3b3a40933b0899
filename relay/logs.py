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

import time
from typing import IO, Any

from twisted.logger import ILogObserver, LogEvent, formatEvent, formatEventAsClassicLogText
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
    Write each event as C{"{timestamp} [{system}] {text}\\n"} to C{out},
    flushed at once: exactly what C{twistd}'s own text observer writes.
    """

    def __init__(self, out: IO[str]) -> None:
        self._out = out
        self._stamps = SecondStamps()

    def __call__(self, event: LogEvent) -> None:
        line = self.format(event)
        if line:
            self._out.write(line)
            self._out.flush()

    def format(self, event: LogEvent) -> str | None:
        if "log_failure" in event or "log_format" not in event:
            return formatEventAsClassicLogText(event, formatTime=self._stamps)
        text = formatEvent(event)
        if not text:
            return None
        system = event.get("log_system")
        if system is None:
            level = event.get("log_level")
            system = f"{event.get('log_namespace', '-')}#{level.name if level is not None else '-'}"
        return f"{self._stamps(event.get('log_time'))} [{system}] {text.replace(chr(10), chr(10) + chr(9))}\n"


def twistdObserver(twistdOptions: Any, out: IO[str]) -> TextLogObserver | None:
    """
    The observer C{twistd} should use, given its own command-line options:
    ours when it would write text to standard output (C{-n} without
    C{--logfile}, the way the relay runs under a service manager and in
    C{make run}); C{None}, leaving C{twistd}'s choice alone, for a log file,
    syslog or an observer named with C{--logger}.
    """
    if twistdOptions is None:
        return None
    get = getattr(twistdOptions, "get", None)
    if get is None:
        return None
    if get("syslog") or get("logger") or not get("nodaemon"):
        return None
    if get("logfile") not in (None, "", "-"):
        return None
    return TextLogObserver(out)
