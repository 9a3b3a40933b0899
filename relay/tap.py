"""twistd glue: C{twistd -n relay --config etc/relay.ini}."""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from twisted.application.service import IService
from twisted.logger import Logger
from twisted.python import usage

from relay.errors import ConfigError

_log = Logger()


class Options(usage.Options):
    synopsis = "[--config FILE] [--check]"
    longdesc = "Run the relay described by FILE (default: etc/relay.ini); with --check, only validate FILE."
    optParameters = [["config", "c", "etc/relay.ini", "The configuration file."]]
    optFlags = [["check", None, "Validate the configuration (plugins, certificates included) and exit: 0 or 2."]]


def installSignals(reactor: Any, service: Any) -> None:
    """
    After twistd's own handlers (so this runs once the reactor runs):
    SIGTERM and SIGINT stop the relay gracefully once, and a second one is
    ignored quietly instead of a C{ReactorNotRunning} traceback; SIGHUP
    reloads the configuration instead of killing the process.
    """
    stopping: list[int] = []

    def stop(number: int, frame: Any) -> None:
        if stopping:
            return  # already stopping within shutdown_grace; nothing more to do
        stopping.append(number)
        reactor.sigTerm(number, frame) if number == signal.SIGTERM else reactor.sigInt(number, frame)

    def hup(number: int, frame: Any) -> None:
        _log.info("Received SIGHUP, reloading the configuration.")
        reactor.callFromThread(service.reload)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGHUP, hup)


def _exitAtOnce(message: str) -> None:
    """Foreground: one line on standard error and a non-zero exit, no traceback."""
    os.write(2, f"relay: {message}\n".encode(errors="replace"))
    raise SystemExit(1)


def makeService(options: Options) -> IService:
    # The one place the global reactor is named: everything below is given it.
    from twisted.internet import reactor

    from relay.config import load
    from relay.logs import twistdObserver
    from relay.service import buildService

    try:
        service = buildService(load(options["config"]), reactor)
    except ConfigError as e:
        # One line, no traceback: the operator fixes the file and starts again.
        sys.stderr.write(f"relay: {e}\n")
        raise SystemExit(2)
    if options["check"]:
        sys.stdout.write(f"relay: {options['config']} is valid\n")
        raise SystemExit(0)
    service.logObserver = twistdObserver(getattr(options, "parent", None), sys.stdout, service.settings.log_format)
    parent = getattr(options, "parent", None)
    if parent is not None and parent.get("nodaemon"):
        service.startupFailed = _exitAtOnce
    # A daemon: the StartupError goes through twistd's status pipe; the parent prints it and exits 1.
    reactor.callWhenRunning(installSignals, reactor, service)
    return service
