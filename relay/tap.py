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


def installReload(reactor: Any, service: Any) -> None:
    """
    SIGHUP reloads the configuration instead of killing the process: set
    before the reactor runs, since a listener accepts into its backlog from
    the moment it is bound, and a service manager may reload from then on.
    """

    def hup(number: int, frame: Any) -> None:
        _log.info("Received SIGHUP, reloading the configuration.")
        reactor.callFromThread(service.reload)

    signal.signal(signal.SIGHUP, hup)


def installSignals(reactor: Any) -> None:
    """
    After twistd's own handlers (so this runs once the reactor runs):
    SIGTERM and SIGINT stop the relay gracefully once, and a second one is
    ignored quietly instead of a C{ReactorNotRunning} traceback.
    """
    stopping: list[int] = []

    def stop(number: int, frame: Any) -> None:
        if stopping:
            return  # already stopping within shutdown_grace; nothing more to do
        stopping.append(number)
        reactor.sigTerm(number, frame) if number == signal.SIGTERM else reactor.sigInt(number, frame)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)


def _exitAtOnce(message: str) -> None:
    """Foreground: one line on standard error and a non-zero exit, no traceback."""
    os.write(2, f"relay: {message}\n".encode(errors="replace"))
    raise SystemExit(1)


def _daemonFailed(stderr: int) -> Any:
    """
    A daemon: the line goes to the standard error twistd was started with
    (the daemon's own is /dev/null by then), and the error through twistd's
    status pipe, so that the waiting parent exits 1 (its report of it is cut
    at 100 bytes, hence the line first).
    """

    def failed(message: str) -> None:
        os.write(stderr, f"relay: {message}\n".encode(errors="replace"))
        from relay.service import StartupError

        raise StartupError(message)

    return failed


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
    observer = twistdObserver(getattr(options, "parent", None), sys.stdout, service.settings.log_format, reactor)
    flush = getattr(observer, "flush", None)
    if flush is not None:
        # The lines of the last turn before the reactor stops, written out.
        reactor.addSystemEventTrigger("after", "shutdown", flush)
    service.logObserver = observer
    parent = getattr(options, "parent", None)
    if parent is not None and parent.get("nodaemon"):
        service.startupFailed = _exitAtOnce
    elif parent is not None:
        service.startupFailed = _daemonFailed(os.dup(2))  # before twistd daemonizes
    installReload(reactor, service)
    reactor.callWhenRunning(installSignals, reactor)
    return service
