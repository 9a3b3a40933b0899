"""twistd glue: C{twistd -n relay --config etc/relay.ini}."""

from __future__ import annotations

import sys

from twisted.application.service import IService
from twisted.python import usage

from relay.errors import ConfigError


class Options(usage.Options):
    synopsis = "[--config FILE]"
    longdesc = "Run the relay described by FILE (default: etc/relay.ini)."
    optParameters = [["config", "c", "etc/relay.ini", "The configuration file."]]


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
    service.logObserver = twistdObserver(getattr(options, "parent", None), sys.stdout, service.settings.log_format)
    return service
