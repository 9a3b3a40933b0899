"""
The ini file (etc/relay.ini) as typed, frozen settings.

Everything an operator can get wrong is found here, at start-up, and reported
as one L{ConfigError} line naming the file, the section and the key, so that a
running relay never meets a bad value.  Plugin sections are only checked for
their C{plugin} key: the plugin itself validates its other options when it is
built, and its L{relay.errors.OptionError} is located by the caller.
"""

from __future__ import annotations

import configparser
import ipaddress
import math
import os
import re
import socket
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from twisted.internet.endpoints import serverFromString
from twisted.internet.testing import MemoryReactor

from relay.address import AddressError, parseMailbox
from relay.errors import ConfigError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
T = TypeVar("T")

_DURATION = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([smhd]?)", re.IGNORECASE)
_SIZE = re.compile(r"([0-9]+(?:\.[0-9]*)?|\.[0-9]+)([kmg]?)", re.IGNORECASE)
_DURATION_UNITS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_LDH = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_BOOLEANS = {
    "yes": True,
    "true": True,
    "on": True,
    "1": True,
    "no": False,
    "false": False,
    "off": False,
    "0": False,
}

# Sections whose every key is known here.  The _OPEN ones take any key: a
# route pattern, or an option passed on to the plugin that will check it.
_KEYS: dict[str, tuple[str, ...]] = {
    "relay": ("hostname", "postmaster", "state_dir", "max_sessions", "shutdown_grace"),
    "listener": (
        "endpoint",
        "tls",
        "auth",
        "plaintext_auth",
        "proxy_protocol",
        "proxy_timeout",
        "max_sessions_per_client",
        "max_sessions_per_relay_client",
        "max_connection_rate",
        "max_errors",
        "backlog",
        "idle_timeout",
        "command_deadline",
        "data_deadline",
        "min_data_rate",
        "session_deadline",
    ),
    "tls": ("certificate", "private_key"),
    "auth": (
        "passwords",
        "failure_delay",
        "max_failure_delay",
        "max_failures",
        "failure_window",
        "lockout",
        "max_bcrypt_cost",
    ),
    "threads": ("auth", "dns", "delivery", "validators", "filters"),
    "policy": (
        "local_domains",
        "relay_networks",
        "max_message_size",
        "max_recipients",
        "validators",
        "validator_timeout",
        "filters",
        "filter_timeout",
        "filter_trace",
    ),
    "control": ("endpoint",),
    "metrics": ("endpoint",),
    "log": ("format",),
}
_OPEN = ("validator", "filter", "delivery", "queue", "routes")
# The keys of a [filter:NAME] section that are the relay's, not the plugin's.
_FILTER_KEYS = ("plugin", "on_error", "filter_timeout")
_QUEUE_KEYS = (
    "store",
    "path",
    "retry",
    "max_age",
    "warn_after",
    "hold",
    "concurrency",
    "destination_concurrency",
    "delivery_timeout",
    "active_limit",
    "commit_timeout",
)
_NAMED = ("listener", "validator", "filter", "delivery")
_KNOWN = (
    "relay, listener:NAME, tls, auth, threads, policy, validator:NAME, filter:NAME, queue, delivery:NAME, routes,"
    " control, metrics, log"
)


def parse_duration(text: str) -> float:
    """
    Seconds in C{text}; a bare number is seconds so that C{30} means what a
    timeout in any other daemon means.

    @raise ValueError: not a non-negative number with optional s, m, h or d.
    """
    match = _DURATION.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"bad duration {text!r} (a number with optional s, m, h or d)")
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2).lower()]
    if not math.isfinite(seconds):
        raise ValueError(f"duration {text!r} is too large")
    return seconds


def parse_size(text: str) -> int:
    """
    Bytes in C{text}, with binary units because that is what operators compare
    with file sizes shown by C{ls -h} and C{du -h}.

    @raise ValueError: not a non-negative whole number of bytes.
    """
    match = _SIZE.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"bad size {text!r} (a number with optional K, M or G)")
    try:
        size = Decimal(match.group(1)) * _SIZE_UNITS[match.group(2).lower()]
    except InvalidOperation:
        raise ValueError(f"bad size {text!r} (a number with optional K, M or G)") from None
    if size != size.to_integral_value():
        raise ValueError(f"size {text!r} is not a whole number of bytes")
    return int(size)


def _domain(text: str) -> tuple[str, str]:
    """
    The A-label and U-label forms of a domain, lower-cased: the envelope keeps
    U-labels under SMTPUTF8 and A-labels otherwise, so both must match.

    @raise ValueError: not a hostname.
    """
    if not text or len(text) > 253:
        raise ValueError(f"bad domain {text!r} (1 to 253 characters)")
    try:
        ascii = text.lower() if text.isascii() else text.encode("idna").decode("ascii").lower()
    except UnicodeError:
        raise ValueError(f"bad internationalised domain {text!r}") from None
    for label in ascii.split("."):
        if not _LDH.fullmatch(label):
            raise ValueError(f"bad domain {text!r} (letters, digits, hyphens and dots)")
    try:
        unicode = ascii.encode("ascii").decode("idna").lower()
    except UnicodeError:
        raise ValueError(f"bad A-label in domain {text!r}") from None
    return ascii, unicode


def _lookupForm(domain: str) -> str:
    domain = domain.strip().lower().rstrip(".")
    if domain.isascii():
        return domain
    try:
        return domain.encode("idna").decode("ascii")
    except UnicodeError:
        return domain


@dataclass(frozen=True)
class Listener:
    name: str
    endpoint: str
    tls: str = "none"
    auth: str = "none"
    plaintext_auth: bool = False
    proxy_protocol: str = "no"
    proxy_timeout: float = 10.0  # for the whole PROXY header to arrive
    # Abuse resistance (issue 13): what one client may take of this listener.
    max_sessions_per_client: int = 50
    max_sessions_per_relay_client: int = 500
    max_connection_rate: int = 120  # per address per minute; 0 = no limit
    max_errors: int = 20
    backlog: int = 1024
    idle_timeout: float = 300.0
    command_deadline: float = 120.0
    data_deadline: float = 600.0
    min_data_rate: int = 1024  # octets per second that extend data_deadline
    session_deadline: float = 3600.0


@dataclass(frozen=True)
class AuthSettings:
    """How hard password guessing is made for one client address ([auth])."""

    failure_delay: float = 1.0
    max_failure_delay: float = 10.0
    max_failures: int = 10
    failure_window: float = 600.0
    lockout: float = 600.0
    max_bcrypt_cost: int = 14


@dataclass(frozen=True)
class ThreadSettings:
    """Threads of each blocking pool ([threads]), so one kind of work cannot take another's."""

    auth: int = 2
    dns: int = 8
    delivery: int = 8
    validators: int = 8
    filters: int = 4


@dataclass(frozen=True)
class PluginSection:
    section: str
    name: str
    plugin: str
    options: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True)
class FilterSection(PluginSection):
    """A [filter:NAME] section: the plugin's keys in C{options}, the relay's own apart."""

    on_error: str = "tempfail"  # tempfail: 451 4.3.0 | accept: skip the filter with a log line
    timeout: float = 60.0


@dataclass(frozen=True)
class QueueSettings:
    store: str
    path: Path
    retry: tuple[float, ...]
    max_age: float
    warn_after: float
    options: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    hold: bool = False
    concurrency: int = 100
    destination_concurrency: int = 20
    delivery_timeout: float = 600.0
    active_limit: int = 10_000
    commit_timeout: float = 30.0


@dataclass(frozen=True)
class Settings:
    path: Path
    hostname: str
    postmaster: str
    state_dir: Path
    listeners: tuple[Listener, ...]
    tls_certificate: Path | None
    tls_private_key: Path | None
    auth_passwords: Path | None
    local_domains: frozenset[str]
    relay_networks: tuple[Network, ...]
    max_message_size: int
    max_recipients: int
    validators: tuple[PluginSection, ...]
    queue: QueueSettings
    deliveries: Mapping[str, PluginSection]
    routes: tuple[tuple[str, str], ...]
    control_endpoint: str | None
    metrics_endpoint: str | None
    validator_timeout: float = 30.0
    filters: tuple[FilterSection, ...] = ()
    filter_trace: bool = False
    max_sessions: int | None = None  # None: auto, from the fd limit (relay.smtp.limits.sessionCap)
    shutdown_grace: float = 30.0  # SIGTERM: how long a session may finish its transaction
    auth: AuthSettings = field(default_factory=AuthSettings)
    threads: ThreadSettings = field(default_factory=ThreadSettings)
    log_format: str = "text"  # [log] format: text (key=value lines) or json (one object per line)
    _table: Mapping[str, str] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        table = {}
        for pattern, name in self.routes:
            table.setdefault(_lookupForm(pattern), name)
        object.__setattr__(self, "_table", table)

    def route(self, domain: str) -> str | None:
        """
        delivery NAME for a recipient domain: exact match first, then the most specific
        '*.parent' wildcard (matches sub-domains at any depth, not the parent itself),
        then '*'; None if nothing.
        """
        domain = _lookupForm(domain)
        if domain in self._table:
            return self._table[domain]
        labels = domain.split(".")
        for i in range(1, len(labels)):
            name = self._table.get("*." + ".".join(labels[i:]))
            if name is not None:
                return name
        return self._table.get("*")


class _Reader:
    """One pass over one file; remembers the file name for every error."""

    def __init__(self, path: str | os.PathLike[str], base: Path) -> None:
        self.path = Path(path)
        self.name = os.fsdecode(path)
        self.base = base
        self.sections: dict[str, dict[str, str]] = {}

    def error(self, section: str | None, key: str | None, message: str) -> ConfigError:
        # one line whatever a value or a library message held: logs and terminals stay readable
        return ConfigError(self.name, section, key, message.replace("\r", "\\r").replace("\n", "\\n"))

    def read(self) -> None:
        try:
            with open(self.path, encoding="utf-8-sig") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError, ValueError) as e:
            raise self.error(None, None, f"cannot read: {e}") from None
        parser = configparser.ConfigParser(
            interpolation=None,
            inline_comment_prefixes=(";", "#"),
            comment_prefixes=(";", "#"),
            strict=True,
            default_section="",  # no [DEFAULT] magic: it would leak keys into every section
        )
        parser.optionxform = str  # type: ignore[assignment,method-assign]
        try:
            parser.read_string(text, source=self.name)
        except configparser.DuplicateSectionError as e:
            raise self.error(e.section, None, f"line {e.lineno}: duplicate section") from None
        except configparser.DuplicateOptionError as e:
            raise self.error(e.section, e.option, f"line {e.lineno}: duplicate key") from None
        except configparser.MissingSectionHeaderError as e:
            message = f"line {e.lineno}: {e.line.strip()!r} comes before any [section]"
            raise self.error(None, None, message) from None
        except configparser.ParsingError as e:
            lineno = e.errors[0][0]
            more = f" (and {len(e.errors) - 1} more)" if len(e.errors) > 1 else ""
            lines = text.split("\n")  # configparser counts "\n" only
            line = lines[lineno - 1].strip() if 0 < lineno <= len(lines) else ""
            message = f"line {lineno}: cannot parse {line!r}: expected 'key = value'{more}"
            section = _sectionAt(lines, lineno)
            raise self.error(section, None, message) from None
        except configparser.Error as e:
            raise self.error(None, None, f"cannot parse: {e.message}") from None
        for section in parser.sections():
            self.sections[section] = dict(parser.items(section))

    def check(self) -> None:
        for section, values in self.sections.items():
            kind, colon, name = section.partition(":")
            if kind in _NAMED:
                if not colon:
                    raise self.error(section, None, f"needs a name: [{kind}:NAME]")
                if not _NAME.fullmatch(name):
                    raise self.error(section, None, f"bad name {name!r} (letters, digits, '_', '.', '-')")
            elif colon or (kind not in _KEYS and kind not in _OPEN):
                raise self.error(section, None, f"unknown section (known: {_KNOWN})")
            allowed = _KEYS.get(kind)
            if allowed is not None:
                for key in values:
                    if key not in allowed:
                        raise self.error(section, key, f"unknown key (allowed: {', '.join(allowed)})")

    def get(self, section: str, key: str, default: str | None = None) -> str | None:
        return self.sections.get(section, {}).get(key, default)

    def required(self, section: str, key: str) -> str:
        value = self.get(section, key)
        if value is None or not value.strip():
            raise self.error(section, key, "required")
        return value.strip()

    def convert(self, section: str, key: str, default: str, parse: Callable[[str], T]) -> T:
        text = self.get(section, key, default)
        assert text is not None
        try:
            return parse(text)
        except ValueError as e:
            raise self.error(section, key, str(e)) from None

    def choice(self, section: str, key: str, default: str, allowed: tuple[str, ...]) -> str:
        value = (self.get(section, key, default) or "").strip().lower()
        if value not in allowed:
            raise self.error(section, key, f"bad value {value!r} (one of: {', '.join(allowed)})")
        return value

    def endpoint(self, section: str, key: str = "endpoint") -> str:
        text = self.required(section, key)
        try:
            endpoint = serverFromString(MemoryReactor(), text)
        except Exception as e:  # any parser may raise anything: all of it is a bad string
            raise self.error(section, key, f"bad endpoint {text!r}: {e}") from None
        port = getattr(endpoint, "_port", None)
        if isinstance(port, int) and not 0 <= port <= 65535:
            raise self.error(section, key, f"bad endpoint {text!r}: port {port} out of range")
        return text

    def resolve(self, text: str, under: Path | None = None) -> Path:
        return Path(os.path.abspath((under or self.base) / text))

    def optionalPath(self, section: str, key: str) -> Path | None:
        text = (self.get(section, key) or "").strip()
        return self.resolve(text) if text else None

    def plugin(self, section: str) -> PluginSection:
        options = dict(self.sections[section])
        plugin = self.required(section, "plugin")
        del options["plugin"]
        return PluginSection(section, section.partition(":")[2], plugin, MappingProxyType(options))

    def named(self, kind: str) -> list[str]:
        return [s for s in self.sections if s.partition(":")[0] == kind]


def _sectionAt(lines: list[str], lineno: int) -> str | None:
    """The section a line number falls in, so a syntax error is located like any other."""
    section = None
    for line in lines[: lineno - 1]:
        match = configparser.ConfigParser.SECTCRE.match(line.strip())
        if match:
            section = match.group("header")
    return section


def _words(text: str) -> list[str]:
    return text.split()


def _boolean(text: str) -> bool:
    value = _BOOLEANS.get(text.strip().lower())
    if value is None:
        raise ValueError(f"bad boolean {text!r} (yes, no, true, false, on, off, 1 or 0)")
    return value


def _count(text: str) -> int:
    if not re.fullmatch(r"[0-9]{1,9}", text.strip()):
        raise ValueError(f"bad number {text!r} (a whole number)")
    return int(text)


def _networks(text: str) -> tuple[Network, ...]:
    networks = []
    for word in text.split():
        try:
            networks.append(ipaddress.ip_network(word, strict=False))
        except ValueError:
            raise ValueError(f"bad network {word!r} (address or address/prefix)") from None
    return tuple(networks)


def _positive(parse: Callable[[str], float], what: str) -> Callable[[str], float]:
    def positive(text: str) -> float:
        value = parse(text)
        if value <= 0:
            raise ValueError(f"{what} must be more than zero")
        return value

    return positive


def _maxSessions(text: str) -> int | None:
    if text.strip().lower() == "auto":
        return None
    try:
        value = _count(text)
    except ValueError:
        raise ValueError(f"bad value {text.strip()!r} (auto or a whole number)") from None
    if value < 1:
        raise ValueError("must be auto or more than zero")
    return value


def _between(low: int, high: int) -> Callable[[str], int]:
    def between(text: str) -> int:
        value = _count(text)
        if not low <= value <= high:
            raise ValueError(f"{value} is out of range ({low} to {high})")
        return value

    return between


def _listener(r: _Reader, section: str) -> Listener:
    def positive(key: str, default: str, parse: Callable[[str], float] = _count) -> Any:
        return r.convert(section, key, default, _positive(parse, key))

    listener = Listener(
        name=section.partition(":")[2],
        endpoint=r.endpoint(section),
        tls=r.choice(section, "tls", "none", ("none", "starttls", "implicit")),
        auth=r.choice(section, "auth", "none", ("none", "optional", "required")),
        plaintext_auth=r.convert(section, "plaintext_auth", "no", _boolean),
        proxy_protocol=r.choice(section, "proxy_protocol", "no", ("no", "v1", "v2")),
        proxy_timeout=positive("proxy_timeout", "10s", parse_duration),
        max_sessions_per_client=positive("max_sessions_per_client", "50"),
        max_sessions_per_relay_client=positive("max_sessions_per_relay_client", "500"),
        max_connection_rate=r.convert(section, "max_connection_rate", "120", _count),
        max_errors=positive("max_errors", "20"),
        backlog=r.convert(section, "backlog", "1024", _between(1, 65535)),
        idle_timeout=positive("idle_timeout", "5m", parse_duration),
        command_deadline=positive("command_deadline", "2m", parse_duration),
        data_deadline=positive("data_deadline", "10m", parse_duration),
        min_data_rate=positive("min_data_rate", "1K", parse_size),
        session_deadline=positive("session_deadline", "1h", parse_duration),
    )
    if listener.auth == "required" and listener.tls == "none" and not listener.plaintext_auth:
        raise r.error(section, "auth", "required, but AUTH is never offered: set tls or plaintext_auth = yes")
    return listener


def _auth(r: _Reader) -> AuthSettings:
    def get(key: str, default: str, parse: Callable[[str], Any]) -> Any:
        return r.convert("auth", key, default, parse)

    auth = AuthSettings(
        failure_delay=get("failure_delay", "1s", parse_duration),
        max_failure_delay=get("max_failure_delay", "10s", parse_duration),
        max_failures=get("max_failures", "10", _positive(_count, "max_failures")),
        failure_window=get("failure_window", "10m", _positive(parse_duration, "failure_window")),
        lockout=get("lockout", "10m", _positive(parse_duration, "lockout")),
        max_bcrypt_cost=get("max_bcrypt_cost", "14", _between(4, 31)),
    )
    if auth.max_failure_delay < auth.failure_delay:
        raise r.error("auth", "max_failure_delay", f"less than failure_delay ({auth.failure_delay:g}s)")
    return auth


def _threads(r: _Reader) -> ThreadSettings:
    def get(key: str, default: str) -> int:
        return r.convert("threads", key, default, _between(1, 1000))

    return ThreadSettings(
        auth=get("auth", "2"),
        dns=get("dns", "8"),
        delivery=get("delivery", "8"),
        validators=get("validators", "8"),
        filters=get("filters", "4"),
    )


def _listedSections(r: _Reader, key: str, kind: str) -> list[str]:
    """
    The names C{[policy] key} lists, in order: each must have its
    C{[kind:NAME]} section and be listed once, and every such section must be
    listed, since one left out would be silently unused.
    """
    named = _words(r.get("policy", key, "") or "")
    for name in named:
        if f"{kind}:{name}" not in r.sections:
            raise r.error("policy", key, f"no [{kind}:{name}] section")
        if named.count(name) > 1:
            raise r.error("policy", key, f"{name!r} is listed twice")
    for section in r.named(kind):
        name = section.partition(":")[2]
        if name not in named:
            raise r.error("policy", key, f"does not list {name!r}, so [{section}] is unused")
    return named


def _filters(r: _Reader) -> tuple[FilterSection, ...]:
    """[policy] filters and their [filter:NAME] sections, each listed once, none unused."""
    default = r.convert("policy", "filter_timeout", "60s", _positive(parse_duration, "filter_timeout"))
    named = _listedSections(r, "filters", "filter")
    filters = []
    for name in named:
        section = f"filter:{name}"
        base = r.plugin(section)
        options = {k: v for k, v in base.options.items() if k not in _FILTER_KEYS}
        filters.append(
            FilterSection(
                section,
                name,
                base.plugin,
                MappingProxyType(options),
                on_error=r.choice(section, "on_error", "tempfail", ("tempfail", "accept")),
                timeout=r.convert(section, "filter_timeout", f"{default}", _positive(parse_duration, "filter_timeout")),
            )
        )
    return tuple(filters)


def _mustExist(r: _Reader, section: str, key: str, path: Path | None, why: str) -> None:
    if path is None:
        raise r.error(section, key, f"required: {why}")
    if not os.path.isfile(path):
        raise r.error(section, key, f"no such file: {str(path)!r}")


def _domains(r: _Reader, section: str, key: str, words: Iterable[str]) -> set[str]:
    found: set[str] = set()
    for word in words:
        try:
            found.update(_domain(word))
        except ValueError as e:
            raise r.error(section, key, str(e)) from None
    return found


def _routes(r: _Reader, deliveries: Mapping[str, PluginSection]) -> tuple[tuple[str, str], ...]:
    routes: list[tuple[str, str]] = []
    seen: dict[str, str] = {}
    for key, value in r.sections.get("routes", {}).items():
        if key == "*":
            pattern = "*"
        else:
            wild = key.startswith("*.")
            try:
                pattern = ("*." if wild else "") + _domain(key[2:] if wild else key)[0]
            except ValueError as e:
                raise r.error("routes", key, f"{e}; a route is a domain, *.domain or *") from None
        if pattern in seen:
            raise r.error("routes", key, f"duplicate route (same as {seen[pattern]!r})")
        seen[pattern] = key
        name = value.strip()
        if name not in deliveries:
            known = ", ".join(sorted(deliveries)) or "none"
            raise r.error("routes", key, f"no [delivery:{name}] section (defined: {known})")
        routes.append((pattern, name))
    return tuple(routes)


def load(path: str | os.PathLike[str], base: str | os.PathLike[str] | None = None) -> Settings:
    """
    Read and check the whole file, so that a bad value stops start-up instead
    of the first message that needs it.

    @param base: the directory relative paths resolve against; the directory
        relay starts in by default, as the contract promises operators.
    @raise ConfigError: for anything wrong, whatever the file holds.
    """
    r = _Reader(path, Path(os.path.abspath(base if base is not None else os.getcwd())))
    r.read()
    r.check()

    hostname = (r.get("relay", "hostname") or "").strip()
    hint = ""
    if not hostname:
        hostname = socket.getfqdn()
        hint = " (the system's name; set hostname)"
    try:
        hostname = _domain(hostname)[0]
    except ValueError as e:
        raise r.error("relay", "hostname", f"{e}{hint}") from None
    postmaster = (r.get("relay", "postmaster") or f"postmaster@{hostname}").strip()
    try:
        if postmaster.count("@") != 1:
            raise AddressError("must contain exactly one @")
        parseMailbox(postmaster)  # as the server will, without SMTPUTF8
    except AddressError as e:
        raise r.error("relay", "postmaster", f"bad address {postmaster!r}: {e}") from None
    state_dir = r.resolve((r.get("relay", "state_dir") or "var").strip())
    max_sessions = r.convert("relay", "max_sessions", "auto", _maxSessions)
    shutdown_grace = r.convert("relay", "shutdown_grace", "30s", parse_duration)

    listeners = tuple(_listener(r, s) for s in r.named("listener"))
    if not listeners:
        raise r.error("listener:NAME", "endpoint", "at least one [listener:NAME] section is required")
    certificate = r.optionalPath("tls", "certificate")
    private_key = r.optionalPath("tls", "private_key")
    passwords = r.optionalPath("auth", "passwords")
    for listener in listeners:
        if listener.tls != "none":
            why = f"[listener:{listener.name}] has tls = {listener.tls}"
            _mustExist(r, "tls", "certificate", certificate, why)
            _mustExist(r, "tls", "private_key", private_key, why)
        if listener.auth != "none":
            why = f"[listener:{listener.name}] has auth = {listener.auth}"
            _mustExist(r, "auth", "passwords", passwords, why)

    local_words = _words(r.get("policy", "local_domains", "localhost") or "")
    local_domains = frozenset(_domains(r, "policy", "local_domains", local_words))
    relay_networks = r.convert("policy", "relay_networks", "127.0.0.0/8 ::1/128", _networks)
    max_message_size = r.convert("policy", "max_message_size", "35M", parse_size)
    if max_message_size < 1:
        raise r.error("policy", "max_message_size", "must be at least 1 byte")
    max_recipients = r.convert("policy", "max_recipients", "1000", _count)
    if max_recipients < 1:
        raise r.error("policy", "max_recipients", "must be at least 1")
    validatorTimeout = r.convert("policy", "validator_timeout", "30s", _positive(parse_duration, "validator_timeout"))

    named = _listedSections(r, "validators", "validator")
    validators = tuple(r.plugin(f"validator:{name}") for name in named)

    queueValues = r.sections.get("queue", {})
    delay = _positive(parse_duration, "each retry delay")
    retry = r.convert("queue", "retry", "1m 5m 15m 30m 1h 2h 4h", lambda t: tuple(map(delay, t.split())))
    if not retry:
        raise r.error("queue", "retry", "needs at least one delay")
    store = (r.get("queue", "store") or "filesystem").strip()
    queue = QueueSettings(
        store=store,
        path=r.resolve((r.get("queue", "path") or "queue").strip(), under=state_dir),
        retry=retry,
        max_age=r.convert("queue", "max_age", "5d", _positive(parse_duration, "max_age")),
        warn_after=r.convert("queue", "warn_after", "4h", parse_duration),
        hold=r.convert("queue", "hold", "no", _boolean),
        concurrency=r.convert("queue", "concurrency", "100", _positive(_count, "concurrency")),
        destination_concurrency=r.convert(
            "queue", "destination_concurrency", "20", _positive(_count, "destination_concurrency")
        ),
        delivery_timeout=r.convert("queue", "delivery_timeout", "10m", _positive(parse_duration, "delivery_timeout")),
        active_limit=r.convert("queue", "active_limit", "10000", _positive(_count, "active_limit")),
        commit_timeout=r.convert("queue", "commit_timeout", "30s", _positive(parse_duration, "commit_timeout")),
        options=MappingProxyType({k: v for k, v in queueValues.items() if k not in _QUEUE_KEYS}),
    )

    deliveries = {p.name: p for p in (r.plugin(s) for s in r.named("delivery"))}
    routes = _routes(r, deliveries)
    control = r.endpoint("control") if "control" in r.sections else None
    metrics = r.endpoint("metrics") if "metrics" in r.sections else None

    settings = Settings(
        path=Path(path),
        hostname=hostname,
        postmaster=postmaster,
        state_dir=state_dir,
        listeners=listeners,
        tls_certificate=certificate,
        tls_private_key=private_key,
        auth_passwords=passwords,
        local_domains=local_domains,
        relay_networks=relay_networks,
        max_message_size=max_message_size,
        max_recipients=max_recipients,
        validators=validators,
        queue=queue,
        deliveries=MappingProxyType(deliveries),
        routes=routes,
        control_endpoint=control,
        metrics_endpoint=metrics,
        validator_timeout=validatorTimeout,
        filters=_filters(r),
        filter_trace=r.convert("policy", "filter_trace", "no", _boolean),
        max_sessions=max_sessions,
        shutdown_grace=shutdown_grace,
        auth=_auth(r),
        threads=_threads(r),
        log_format=r.choice("log", "format", "text", ("text", "json")),
    )
    for domain in local_words:
        if settings.route(domain) is None:
            raise r.error("policy", "local_domains", f"{domain!r} has no route: add it to [routes]")
    return settings
