"""
Finding plugins and giving them what they need.

Built-in and third-party plugins are found the same ways:

  - twisted.plugin dropins: C{getPlugins} over C{relay.plugins} (which extends
    its path with every C{relay/plugins/} dropin directory on C{sys.path});
  - the C{relay.plugins} entry-point group of installed distributions, each
    entry point naming a factory object.  This is the way that works for an
    editable install (C{pip install -e}), whose files twisted.plugin never sees;
  - a dotted path C{package.module:attribute} named in the configuration.

A name found both as a dropin and as an entry point, for two different
objects, is refused when it is used (naming both sources) rather than one
silently winning: which one a precedence rule picked would depend on what
happens to be installed.  An entry point that cannot be loaded costs nothing
until the configuration names it; then its error is the start-up error.
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from twisted.internet.defer import Deferred, maybeDeferred
from twisted.plugin import IPlugin, getCache
from twisted.python import log
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
    @ivar submit: C{await submit(sender, recipients, data)} queues a message
        of the relay's own (a TLS report) as the scheduler queues a DSN; it
        works once the service is built.  C{None} in a context built by hand.
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
    submit: Callable[..., Any] | None = None

    def __post_init__(self) -> None:
        if self.dns is None:
            object.__setattr__(self, "dns", self.blocking)


def _pluginsPackage() -> Any:
    import relay.plugins

    return relay.plugins


ENTRY_POINT_GROUP = "relay.plugins"


@dataclass(frozen=True)
class Found:
    """
    One plugin as discovery saw it, for C{find} and C{relayctl plugins}.

    @ivar name: the name the configuration uses.
    @ivar factory: the factory object, or C{None} when it could not be loaded.
    @ivar source: where it came from, for people: C{dropin relay.plugins.remote}
        or C{entry point mx = pkg.mod:factory (dist 1.0)}.
    @ivar error: why it could not be loaded (C{factory} is then C{None}).
    """

    name: str
    factory: Any
    source: str
    error: str = ""


def _dropins(interface: InterfaceClass) -> list[Found]:
    """
    Every dropin providing C{interface}, with the module that holds it.

    What C{getPlugins} does, keeping the dropin's module name, which
    C{getPlugins} drops and which tells an operator where a plugin lives.
    """
    found = []
    for dropin in getCache(_pluginsPackage()).values():
        for cached in dropin.plugins:
            try:
                adapted = interface(cached, None)
            except Exception:
                log.err(None, f"relay: cannot load plugin {cached.name} of dropin {dropin.moduleName}")
                continue
            if adapted is not None:
                found.append(Found(adapted.name, adapted, f"dropin {dropin.moduleName}"))
    return found


def _entryPointSource(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    origin = f" ({dist.name} {dist.version})" if dist is not None else ""
    return f"entry point {ep.name} = {ep.value}{origin}"


def _entryPoints(interface: InterfaceClass) -> list[Found]:
    """
    Every C{relay.plugins} entry point providing C{interface}, and every one
    that cannot be loaded (whatever it would have provided: that is unknown).

    Loading one imports its module; one that raises is kept with its error,
    so that it stops start-up only if the configuration names it.
    """
    found = []
    seen = set()
    for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        if (ep.name, ep.value) in seen:  # the same distribution on sys.path twice
            continue
        seen.add((ep.name, ep.value))
        source = _entryPointSource(ep)
        try:
            obj = ep.load()
        except Exception as e:
            found.append(Found(ep.name, None, source, f"{type(e).__name__}: {e}"))
            continue
        if not interface.providedBy(obj):
            continue
        if getattr(obj, "name", None) != ep.name:
            error = f"its factory is called {getattr(obj, 'name', None)!r}; the entry point must have the same name"
            found.append(Found(ep.name, None, source, error))
            continue
        found.append(Found(ep.name, obj, source))
    return found


def discover(interface: InterfaceClass) -> list[Found]:
    """Every plugin for C{interface} that dropins and entry points offer, dropins first."""
    return _dropins(interface) + _entryPoints(interface)


def resolve(name: str, candidates: Sequence[Found]) -> Any:
    """
    The one factory called C{name}, or the L{OptionError} that says why not.

    The same object found twice (a distribution with both a dropin and an
    entry point for it) is no conflict.
    """
    factories = {id(c.factory): c for c in candidates if c.factory is not None}
    broken = [c for c in candidates if c.factory is None]
    if len(factories) + len(broken) > 1:
        sources = "; ".join(c.source for c in [*factories.values(), *broken])
        raise OptionError("plugin", f"plugin {name!r} is provided twice, by {sources}: uninstall one")
    if broken:
        raise OptionError("plugin", f"plugin {name!r} cannot be loaded from {broken[0].source}: {broken[0].error}")
    return next(iter(factories.values())).factory


def available(interface: InterfaceClass) -> dict[str, Any]:
    """Every plugin found for C{interface} that can be used, by name (not the broken or conflicting ones)."""
    byName: dict[str, list[Found]] = {}
    for found in discover(interface):
        byName.setdefault(found.name, []).append(found)
    usable = {}
    for name, candidates in byName.items():
        try:
            usable[name] = resolve(name, candidates)
        except OptionError:
            pass
    return usable


def find(name: str, interface: InterfaceClass) -> Any:
    """
    The plugin factory called C{name}, or the object at a dotted path.

    @raise OptionError: for key C{plugin}: an unknown name (listing the names
        that are known), one provided twice (naming both sources), or an
        entry point that cannot be loaded (naming it and its error).
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
    everything = discover(interface)
    candidates = [f for f in everything if f.name == name]
    if not candidates:
        names = ", ".join(sorted({f.name for f in everything if f.factory is not None})) or "none"
        raise OptionError("plugin", f"unknown plugin {name!r} (known: {names})")
    return resolve(name, candidates)


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
