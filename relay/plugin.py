"""
Finding plugins and giving them what they need.

Built-in and third-party plugins are found the same way: C{getPlugins} over
C{relay.plugins} (which extends its path with every C{relay/plugins/} dropin
directory on C{sys.path}), or a dotted path C{package.module:attribute} named in
the configuration.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.plugin import IPlugin, getPlugins
from zope.interface.interface import InterfaceClass

from relay.errors import OptionError


def runInline(f: Callable[..., Any], *args: Any, **kwargs: Any) -> Deferred[Any]:
    """A C{blocking} runner that runs in the caller's thread: for unit tests."""
    return maybeDeferred(f, *args, **kwargs)


@dataclass(frozen=True)
class PluginContext:
    """
    What a plugin's C{build} receives besides its options.

    @ivar reactor: the reactor to schedule on; never import the global one.
    @ivar blocking: C{blocking(f, *args)} runs C{f} in a worker thread and
        returns a Deferred of its result.  Each kind of plugin has a bounded
        pool of its own (C{[threads]}): validators, delivery backends and the
        queue store never wait behind each other's work, nor behind password
        hashing.
    @ivar dns: like C{blocking}, for DNS lookups: a pool of their own
        (C{[threads] dns}), so that a slow resolver holds up no file work.
        When not given, C{blocking}.
    @ivar section: the section the plugin was configured in, for log lines.
    @ivar listening: C{(interface, port)} of every TCP listener of this relay,
        the interface as configured (C{""}, C{"0.0.0.0"} or C{"::"} for every
        local address): a delivery backend must not connect back to one of
        them, or mail loops.
    @ivar delivery_timeout: C{[queue] delivery_timeout}, the scheduler's bound
        on one call of a backend's C{deliver}; a backend that has deadlines of
        its own keeps them shorter, so that its precise reason is the one
        recorded.
    """

    reactor: Any
    hostname: str
    postmaster: str
    state_dir: Path
    section: str = ""
    blocking: Callable[..., Deferred[Any]] = field(default=runInline)
    listening: tuple[tuple[str, int], ...] = ()
    delivery_timeout: float = 600.0
    dns: Callable[..., Deferred[Any]] | None = None

    def __post_init__(self) -> None:
        if self.dns is None:
            object.__setattr__(self, "dns", self.blocking)


def _pluginsPackage() -> Any:
    import relay.plugins

    return relay.plugins


def available(interface: InterfaceClass) -> dict[str, Any]:
    """Every plugin found for C{interface}, by name."""
    found: dict[str, Any] = {}
    for plugin in getPlugins(interface, _pluginsPackage()):
        found.setdefault(plugin.name, plugin)
    return found


def find(name: str, interface: InterfaceClass) -> Any:
    """
    The plugin factory called C{name}, or the object at a dotted path.

    @raise OptionError: for key C{plugin}, listing the names that are known.
    """
    if ":" in name:
        modname, _, attr = name.partition(":")
        try:
            obj = getattr(importlib.import_module(modname), attr)
        except (ImportError, AttributeError) as e:
            raise OptionError("plugin", f"cannot load {name!r}: {e}") from None
        if not interface.providedBy(obj) or not IPlugin.providedBy(obj):
            raise OptionError("plugin", f"{name!r} does not provide IPlugin and {interface.__name__}")
        return obj
    known = available(interface)
    if name not in known:
        names = ", ".join(sorted(known)) or "none"
        raise OptionError("plugin", f"unknown plugin {name!r} (known: {names})")
    return known[name]


def checkKeys(factory: Any, options: Mapping[str, str]) -> None:
    """Refuse keys the factory does not declare, before it is built."""
    allowed = getattr(factory, "keys", {})
    for key in options:
        if key not in allowed:
            hint = ", ".join(sorted(allowed)) or "none"
            raise OptionError(key, f"unknown key for plugin {factory.name!r} (it takes: {hint})")


def portOption(options: Mapping[str, str], key: str = "port", default: int = 25) -> int:
    """A TCP port from a plugin's options; L{OptionError} naming C{key} if it is not one."""
    text = options.get(key, str(default))
    try:
        port = int(text)
    except ValueError:
        port = 0
    if not 0 < port < 65536:
        raise OptionError(key, f"bad port {text!r} (1 to 65535)")
    return port


def choiceOption(options: Mapping[str, str], key: str, choices: Sequence[str]) -> str:
    """One of C{choices} (the first is the default); L{OptionError} naming C{key} otherwise."""
    value = (options.get(key) or choices[0]).strip()
    if value not in choices:
        raise OptionError(key, f"must be one of {', '.join(choices)}, not {value!r}")
    return value
