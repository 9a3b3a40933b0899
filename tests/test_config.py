"""relay.config: the ini contract, its defaults, and one located error per rule."""

from __future__ import annotations

import ipaddress
import os
import socket
import textwrap
from pathlib import Path
from types import MappingProxyType

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.config import (
    AuthSettings,
    Listener,
    PluginSection,
    Settings,
    ThreadSettings,
    load,
    parse_duration,
    parse_size,
)
from relay.errors import ConfigError

MINIMAL = """\
[listener:smtp]
endpoint = tcp:2525:interface=127.0.0.1

[delivery:local]
plugin = maildir

[routes]
localhost = local
"""

# A listener section that needs TLS, plus everything it needs, so that the
# auth and TLS rules can each be broken one at a time.
TLS = """\
[tls]
certificate = cert.pem
private_key = key.pem
"""


def write(tmp_path: Path, text: str, name: str = "relay.ini") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def fails(tmp_path: Path, text: str, section: str | None, key: str | None, fragment: str = "") -> ConfigError:
    """Load C{text}, which must fail with an error located at C{section} and C{key}."""
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load(path, base=tmp_path)
    error = info.value
    message = str(error)
    assert "\n" not in message
    assert message.startswith(str(path) + ":")
    assert (error.section, error.key) == (section, key), message
    if section is not None:
        assert f"[{section}]" in message
    if key is not None:
        assert f"] {key}: " in message
    assert fragment in message
    return error


@pytest.fixture
def files(tmp_path: Path) -> Path:
    for name in ("cert.pem", "key.pem", "passwords"):
        (tmp_path / name).write_text("x\n")
    return tmp_path


# -- defaults and a full file ------------------------------------------------


def test_minimal_defaults(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda: "Host.Example.TEST")
    path = write(tmp_path, MINIMAL)
    s = load(path, base=tmp_path)
    assert s.path == path
    assert s.hostname == "host.example.test"
    assert s.postmaster == "postmaster@host.example.test"
    assert s.state_dir == tmp_path / "var"
    assert s.listeners == (Listener("smtp", "tcp:2525:interface=127.0.0.1", "none", "none", False, "no"),)
    assert (s.tls_certificate, s.tls_private_key, s.auth_passwords) == (None, None, None)
    assert s.local_domains == frozenset({"localhost"})
    assert s.relay_networks == (ipaddress.ip_network("127.0.0.0/8"), ipaddress.ip_network("::1/128"))
    assert s.max_message_size == 35 * 1024 * 1024
    assert s.max_recipients == 1000
    assert s.validators == ()
    q = s.queue
    assert q.store == "filesystem"
    assert q.path == tmp_path / "var" / "queue"
    assert q.retry == (60, 300, 900, 1800, 3600, 7200, 14400)
    assert q.max_age == 5 * 86400
    assert q.warn_after == 4 * 3600
    assert q.hold is False
    assert (q.concurrency, q.destination_concurrency, q.delivery_timeout) == (100, 20, 600)
    assert (q.active_limit, q.commit_timeout) == (10_000, 30)
    assert s.validator_timeout == 30
    assert dict(q.options) == {}
    assert dict(s.deliveries) == {"local": PluginSection("delivery:local", "local", "maildir", MappingProxyType({}))}
    assert s.routes == (("localhost", "local"),)
    assert s.control_endpoint is None
    assert s.metrics_endpoint is None
    assert s.route("localhost") == "local"
    assert s.route("example.test") is None
    # abuse resistance (issue 13)
    listener = s.listeners[0]
    assert (listener.max_sessions_per_client, listener.max_sessions_per_relay_client) == (50, 500)
    assert (listener.max_connection_rate, listener.max_errors, listener.backlog) == (120, 20, 1024)
    assert (listener.idle_timeout, listener.command_deadline, listener.data_deadline) == (300, 120, 600)
    assert (listener.min_data_rate, listener.session_deadline) == (1024, 3600)
    assert s.max_sessions is None
    assert s.auth == AuthSettings(1.0, 10.0, 10, 600.0, 600.0, 14)
    assert s.threads == ThreadSettings(auth=2, dns=8, delivery=8, validators=8)


def test_abuse_keys(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        MINIMAL.replace(
            "[listener:smtp]\n",
            """[relay]
max_sessions = 300

[auth]
failure_delay = 0.5
max_failure_delay = 4s
max_failures = 3
failure_window = 1h
lockout = 15m
max_bcrypt_cost = 12

[threads]
auth = 1
dns = 16
delivery = 4
validators = 2

[listener:smtp]
max_sessions_per_client = 3
max_sessions_per_relay_client = 7
max_connection_rate = 0
max_errors = 5
backlog = 4096
idle_timeout = 30s
command_deadline = 10s
data_deadline = 1m
min_data_rate = 100K
session_deadline = 2h
""",
        ),
    )
    s = load(path, base=tmp_path)
    listener = s.listeners[0]
    assert (listener.max_sessions_per_client, listener.max_sessions_per_relay_client) == (3, 7)
    assert (listener.max_connection_rate, listener.max_errors, listener.backlog) == (0, 5, 4096)
    assert (listener.idle_timeout, listener.command_deadline, listener.data_deadline) == (30, 10, 60)
    assert (listener.min_data_rate, listener.session_deadline) == (100 * 1024, 7200)
    assert s.max_sessions == 300
    assert s.auth == AuthSettings(0.5, 4.0, 3, 3600.0, 900.0, 12)
    assert s.threads == ThreadSettings(auth=1, dns=16, delivery=4, validators=2)
    assert load(write(tmp_path, "[relay]\nmax_sessions = Auto\n" + MINIMAL), base=tmp_path).max_sessions is None


def test_proxy_protocol_versions(tmp_path: Path) -> None:
    listeners = """
[listener:v1]
endpoint = tcp:2526
proxy_protocol = V1
[listener:v2]
endpoint = tcp:2527
proxy_protocol = v2
proxy_timeout = 3s
"""
    s = load(write(tmp_path, MINIMAL + listeners), base=tmp_path)
    found = {listener.name: (listener.proxy_protocol, listener.proxy_timeout) for listener in s.listeners}
    assert found["smtp"] == ("no", 10.0)
    assert found["v1"] == ("v1", 10.0)
    assert found["v2"] == ("v2", 3.0)


def test_base_defaults_to_working_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, MINIMAL)
    monkeypatch.chdir(tmp_path)
    assert load("relay.ini").state_dir == tmp_path / "var"


def test_full_file(files: Path) -> None:
    path = write(
        files,
        """\
        ; every key the contract names
        [relay]
        hostname = Mail.Example.TEST        ; a comment
        postmaster = hostmaster@example.test
        state_dir = state

        [listener:smtp]
        endpoint = tcp:25:interface=127.0.0.1
        proxy_protocol = no

        [listener:submission]
        endpoint = tcp:587
        tls = StartTLS
        auth = required
        plaintext_auth = off

        [listener:smtps]
        endpoint = tcp6:465:interface=\\:\\:1
        tls = implicit
        auth = optional
        plaintext_auth = Yes

        [tls]
        certificate = cert.pem
        private_key = /%(dir)s/key.pem

        [auth]
        passwords = passwords

        [policy]
        local_domains = Example.TEST  bücher.example
        relay_networks = 10.1.2.3/8 2001:db8::/32 192.0.2.1
        max_message_size = 10M
        max_recipients = 50
        validators = users spam

        [validator:spam]
        plugin = mypkg.spam:factory
        threshold = 5

        [validator:users]
        plugin = static
        Users = alice bob

        [queue]
        store = memory
        path = /var/spool/relay
        retry = 30 2m 1.5h
        max_age = 2d
        warn_after = 0
        hold = yes
        concurrency = 7
        destination_concurrency = 3
        active_limit = 500
        commit_timeout = 1m
        fsync = no

        [delivery:local]
        plugin = maildir
        path = mail/{domain}/{local}

        [delivery:internet]
        plugin = mx
        port = 2525

        [routes]
        Example.TEST = local
        xn--bcher-kva.example = local
        *.example.test = internet
        * = internet

        [control]
        endpoint = unix:var/relay.sock

        [metrics]
        endpoint = tcp:9125:interface=127.0.0.1
        """.replace("/%(dir)s", str(files)),
    )
    s = load(path, base=files)
    assert s.hostname == "mail.example.test"
    assert s.postmaster == "hostmaster@example.test"
    assert s.state_dir == files / "state"
    assert s.listeners == (
        Listener("smtp", "tcp:25:interface=127.0.0.1", "none", "none", False, "no"),
        Listener("submission", "tcp:587", "starttls", "required", False, "no"),
        Listener("smtps", "tcp6:465:interface=\\:\\:1", "implicit", "optional", True, "no"),
    )
    assert s.tls_certificate == files / "cert.pem"
    assert s.tls_private_key == files / "key.pem"
    assert s.auth_passwords == files / "passwords"
    assert s.local_domains == frozenset({"example.test", "bücher.example", "xn--bcher-kva.example"})
    assert s.relay_networks == (
        ipaddress.ip_network("10.0.0.0/8"),
        ipaddress.ip_network("2001:db8::/32"),
        ipaddress.ip_network("192.0.2.1/32"),
    )
    assert s.max_message_size == 10 * 1024 * 1024
    assert s.max_recipients == 50
    assert [v.name for v in s.validators] == ["users", "spam"]
    users, spam = s.validators
    assert (users.section, users.plugin, dict(users.options)) == (
        "validator:users",
        "static",
        {"Users": "alice bob"},
    )
    assert (spam.section, spam.plugin, dict(spam.options)) == (
        "validator:spam",
        "mypkg.spam:factory",
        {"threshold": "5"},
    )
    assert isinstance(spam.options, MappingProxyType)
    assert s.queue.store == "memory"
    assert s.queue.path == Path("/var/spool/relay")
    assert s.queue.retry == (30, 120, 5400)
    assert s.queue.max_age == 2 * 86400
    assert s.queue.warn_after == 0
    assert (s.queue.hold, s.queue.concurrency, s.queue.destination_concurrency) == (True, 7, 3)
    assert (s.queue.active_limit, s.queue.commit_timeout) == (500, 60)
    assert dict(s.queue.options) == {"fsync": "no"}
    assert isinstance(s.queue.options, MappingProxyType)
    assert list(s.deliveries) == ["local", "internet"]
    assert dict(s.deliveries["local"].options) == {"path": "mail/{domain}/{local}"}
    assert dict(s.deliveries["internet"].options) == {"port": "2525"}
    assert s.deliveries["internet"].plugin == "mx"
    assert s.routes == (
        ("example.test", "local"),
        ("xn--bcher-kva.example", "local"),
        ("*.example.test", "internet"),
        ("*", "internet"),
    )
    assert s.control_endpoint == "unix:var/relay.sock"
    assert s.metrics_endpoint == "tcp:9125:interface=127.0.0.1"
    assert s.route("bücher.example") == "local"
    assert s.route("BÜCHER.example") == "local"
    assert s.route("xn--bcher-kva.example") == "local"


def test_settings_are_frozen(tmp_path: Path) -> None:
    s = load(write(tmp_path, MINIMAL), base=tmp_path)
    with pytest.raises(AttributeError):
        s.hostname = "other"  # type: ignore[misc]
    with pytest.raises(TypeError):
        s.deliveries["x"] = s.deliveries["local"]  # type: ignore[index]


def test_empty_values(tmp_path: Path) -> None:
    s = load(
        write(tmp_path, MINIMAL + "[policy]\nlocal_domains =\nrelay_networks =\nvalidators =\n"),
        base=tmp_path,
    )
    assert s.local_domains == frozenset()
    assert s.relay_networks == ()
    assert s.validators == ()


def test_plaintext_auth_makes_required_auth_possible(files: Path) -> None:
    text = (
        MINIMAL
        + "[listener:test]\nendpoint = tcp:0\nauth = required\nplaintext_auth = 1\n"
        + "[auth]\npasswords = passwords\n"
    )
    s = load(write(files, text), base=files)
    assert s.listeners[1] == Listener("test", "tcp:0", "none", "required", True, "no")
    assert s.tls_certificate is None


# -- routing -------------------------------------------------------------------

ROUTES = """\
[listener:smtp]
endpoint = tcp:2525

[policy]
local_domains = example.test

[delivery:exact]
plugin = maildir
[delivery:sub]
plugin = mx
[delivery:deep]
plugin = mx
[delivery:all]
plugin = smarthost

[routes]
*.deep.example.test = deep
* = all
*.example.test = sub
example.test = exact
"""


@pytest.mark.parametrize(
    "domain, name",
    [
        ("example.test", "exact"),
        ("EXAMPLE.Test", "exact"),
        ("example.test.", "exact"),
        ("a.example.test", "sub"),
        ("a.b.c.example.test", "sub"),
        ("deep.example.test", "sub"),  # *.deep... does not match deep... itself
        ("a.deep.example.test", "deep"),
        ("x.y.deep.example.test", "deep"),
        ("other.test", "all"),
        ("notexample.test", "all"),
        ("test", "all"),
    ],
)
def test_route_precedence(tmp_path: Path, domain: str, name: str) -> None:
    s = load(write(tmp_path, ROUTES), base=tmp_path)
    assert s.route(domain) == name


def test_route_without_catch_all(tmp_path: Path) -> None:
    s = load(write(tmp_path, ROUTES.replace("* = all\n", "")), base=tmp_path)
    assert s.route("other.test") is None
    assert s.route("a.example.test") == "sub"
    assert s.route("example.test") == "exact"


def test_wildcard_routes_sub_domains_of_local_domain_only(tmp_path: Path) -> None:
    text = MINIMAL.replace("localhost = local", "*.localhost = local")
    fails(tmp_path, text, "policy", "local_domains", "'localhost' has no route")


def test_catch_all_routes_local_domains(tmp_path: Path) -> None:
    s = load(write(tmp_path, MINIMAL.replace("localhost = local", "* = local")), base=tmp_path)
    assert s.route("localhost") == "local"


def test_unused_delivery_is_fine(tmp_path: Path) -> None:
    s = load(write(tmp_path, MINIMAL + "[delivery:spare]\nplugin = mx\n"), base=tmp_path)
    assert set(s.deliveries) == {"local", "spare"}


def test_settings_built_directly_route(tmp_path: Path) -> None:
    import dataclasses

    s = load(write(tmp_path, MINIMAL), base=tmp_path)
    other = dataclasses.replace(s, routes=(("*.test", "local"),))
    assert other.route("a.test") == "local"
    assert other.route("localhost") is None
    assert isinstance(other, Settings)


# -- errors --------------------------------------------------------------------


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.ini"
    with pytest.raises(ConfigError) as info:
        load(path)
    assert (info.value.section, info.value.key) == (None, None)
    assert str(info.value).startswith(f"{path}: cannot read: ")


def test_directory_is_unreadable(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "relay.ini"
    path.write_bytes(MINIMAL.encode() + b"[relay]\nhostname = caf\xe9\n")
    with pytest.raises(ConfigError, match="cannot read"):
        load(path, base=tmp_path)


def test_error_message_format(tmp_path: Path) -> None:
    error = fails(tmp_path, MINIMAL + "[policy]\nmax_message_size = 35X\n", "policy", "max_message_size")
    assert str(error) == (
        f"{tmp_path / 'relay.ini'}: [policy] max_message_size: bad size '35X' (a number with optional K, M or G)"
    )


@pytest.mark.parametrize(
    "extra, section, key, fragment",
    [
        # sections
        ("[smtp]\nport = 25\n", "smtp", None, "unknown section"),
        ("[DEFAULT]\nhostname = x\n", "DEFAULT", None, "unknown section"),
        ("[relay:x]\n", "relay:x", None, "unknown section"),
        ("[listener:]\nendpoint = tcp:1\n", "listener:", None, "bad name ''"),
        ("[listener]\nendpoint = tcp:1\n", "listener", None, "needs a name"),
        ("[delivery:a b]\nplugin = mx\n", "delivery:a b", None, "bad name"),
        ("[validator:]\nplugin = x\n", "validator:", None, "bad name"),
        # unknown keys, listing the allowed ones; keys are case-sensitive
        ("[relay]\nHostname = x\n", "relay", "Hostname", "allowed: hostname, postmaster, state_dir"),
        ("[tls]\ncert = x\n", "tls", "cert", "allowed: certificate, private_key"),
        ("[auth]\nfile = x\n", "auth", "file", "allowed: passwords"),
        ("[policy]\nmax_size = 1\n", "policy", "max_size", "allowed: local_domains"),
        ("[control]\nsocket = x\n", "control", "socket", "allowed: endpoint"),
        ("[metrics]\nport = 1\n", "metrics", "port", "allowed: endpoint"),
        ("[listener:x]\nendpoint = tcp:1\nport = 1\n", "listener:x", "port", "allowed: endpoint, tls, auth"),
        # duplicates and syntax
        ("[relay]\nhostname = a\nhostname = b\n", "relay", "hostname", "line 12: duplicate key"),
        ("[routes]\nexample.test = local\n", "routes", None, "line 10: duplicate section"),
        (
            "[relay]\nhostname = a\nthis is not a pair\n",
            "relay",
            None,
            "line 12: cannot parse 'this is not a pair'",
        ),
        # relay
        ("[relay]\nhostname = bad_host.test\n", "relay", "hostname", "bad domain 'bad_host.test'"),
        ("[relay]\nhostname = -a.test\n", "relay", "hostname", "bad domain"),
        ("[relay]\nhostname = a..test\n", "relay", "hostname", "bad domain"),
        ("[relay]\nhostname = " + "a" * 64 + ".test\n", "relay", "hostname", "bad domain"),
        ("[relay]\npostmaster = postmaster\n", "relay", "postmaster", "exactly one @"),
        ("[relay]\npostmaster = a@b@example.test\n", "relay", "postmaster", "exactly one @"),
        ("[relay]\npostmaster = @example.test\n", "relay", "postmaster", "bad address"),
        ("[relay]\npostmaster = pm@bad_domain\n", "relay", "postmaster", "bad address"),
        # listeners
        ("[listener:x]\ntls = none\n", "listener:x", "endpoint", "required"),
        ("[listener:x]\nendpoint =\n", "listener:x", "endpoint", "required"),
        ("[listener:x]\nendpoint = tcp:notaport\n", "listener:x", "endpoint", "bad endpoint 'tcp:notaport'"),
        ("[listener:x]\nendpoint = bogus:25\n", "listener:x", "endpoint", "bad endpoint"),
        ("[listener:x]\nendpoint = tcp:25:colour=blue\n", "listener:x", "endpoint", "bad endpoint"),
        ("[listener:x]\nendpoint = tcp:99999\n", "listener:x", "endpoint", "out of range"),
        (
            "[listener:x]\nendpoint = tcp:1\ntls = ssl\n",
            "listener:x",
            "tls",
            "one of: none, starttls, implicit",
        ),
        (
            "[listener:x]\nendpoint = tcp:1\nauth = yes\n",
            "listener:x",
            "auth",
            "one of: none, optional, required",
        ),
        (
            "[listener:x]\nendpoint = tcp:1\nplaintext_auth = maybe\n",
            "listener:x",
            "plaintext_auth",
            "bad boolean",
        ),
        (
            "[listener:x]\nendpoint = tcp:1\nproxy_protocol = yes\n",
            "listener:x",
            "proxy_protocol",
            "one of: no, v1, v2",
        ),
        (
            "[listener:x]\nendpoint = tcp:1\nproxy_protocol = v2\nproxy_timeout = 0\n",
            "listener:x",
            "proxy_timeout",
            "more than zero",
        ),
        (
            "[listener:x]\nendpoint = tcp:1\nproxy_protocol = v1\nproxy_timeout = soon\n",
            "listener:x",
            "proxy_timeout",
            "bad duration",
        ),
        (
            "[listener:x]\nendpoint = tcp:1\nproxy_protocol = v3\n",
            "listener:x",
            "proxy_protocol",
            "one of: no, v1, v2",
        ),
        ("[listener:x]\nendpoint = tcp:1\nauth = required\n", "listener:x", "auth", "AUTH is never offered"),
        # tls and auth files
        ("[listener:x]\nendpoint = tcp:1\ntls = starttls\n", "tls", "certificate", "required: [listener:x]"),
        (
            "[listener:x]\nendpoint = tcp:1\ntls = implicit\n[tls]\ncertificate = cert.pem\n",
            "tls",
            "private_key",
            "required",
        ),
        (
            "[listener:x]\nendpoint = tcp:1\ntls = starttls\n[tls]\ncertificate = gone.pem\nprivate_key = key.pem\n",
            "tls",
            "certificate",
            "no such file",
        ),
        (
            "[listener:x]\nendpoint = tcp:1\ntls = starttls\n[tls]\ncertificate = cert.pem\nprivate_key = gone.pem\n",
            "tls",
            "private_key",
            "no such file",
        ),
        (
            "[listener:x]\nendpoint = tcp:1\ntls = starttls\nauth = optional\n" + TLS,
            "auth",
            "passwords",
            "required: [listener:x] has auth = optional",
        ),
        (
            "[listener:x]\nendpoint = tcp:1\nauth = required\nplaintext_auth = yes\n[auth]\npasswords = gone\n",
            "auth",
            "passwords",
            "no such file",
        ),
        # policy
        ("[policy]\nlocal_domains = localhost exa_mple.test\n", "policy", "local_domains", "bad domain"),
        (
            "[policy]\nlocal_domains = localhost example.test\n",
            "policy",
            "local_domains",
            "'example.test' has no route",
        ),
        ("[policy]\nrelay_networks = 10.0.0.0/33\n", "policy", "relay_networks", "bad network '10.0.0.0/33'"),
        (
            "[policy]\nrelay_networks = 127.0.0.1 localnet\n",
            "policy",
            "relay_networks",
            "bad network 'localnet'",
        ),
        ("[policy]\nmax_message_size = 0\n", "policy", "max_message_size", "at least 1"),
        ("[policy]\nmax_message_size = -1M\n", "policy", "max_message_size", "bad size"),
        ("[policy]\nmax_recipients = 0\n", "policy", "max_recipients", "at least 1"),
        ("[policy]\nmax_recipients = -3\n", "policy", "max_recipients", "bad number"),
        ("[policy]\nmax_recipients = lots\n", "policy", "max_recipients", "bad number"),
        # validators
        ("[policy]\nvalidators = users\n", "policy", "validators", "no [validator:users] section"),
        (
            "[policy]\nvalidators = users users\n[validator:users]\nplugin = static\n",
            "policy",
            "validators",
            "twice",
        ),
        ("[validator:spam]\nplugin = x\n", "policy", "validators", "[validator:spam] is unused"),
        # filters: the same checks as validators
        ("[policy]\nfilters = sign\n", "policy", "filters", "no [filter:sign] section"),
        ("[policy]\nfilters = sign sign\n[filter:sign]\nplugin = dkim\n", "policy", "filters", "twice"),
        ("[filter:sign]\nplugin = dkim\n", "policy", "filters", "does not list 'sign', so [filter:sign] is unused"),
        (
            "[policy]\nvalidators = users\n[validator:users]\nfile = x\n",
            "validator:users",
            "plugin",
            "required",
        ),
        (
            "[policy]\nvalidators = users\n[validator:users]\nplugin =\n",
            "validator:users",
            "plugin",
            "required",
        ),
        ("[delivery:mx]\nport = 25\n", "delivery:mx", "plugin", "required"),
        # queue
        ("[queue]\nretry =\n", "queue", "retry", "at least one delay"),
        ("[queue]\nretry = 1m 0 5m\n", "queue", "retry", "more than zero"),
        ("[queue]\nretry = 1m soon\n", "queue", "retry", "bad duration 'soon'"),
        ("[queue]\nmax_age = 0\n", "queue", "max_age", "more than zero"),
        ("[queue]\nmax_age = 5 days\n", "queue", "max_age", "bad duration"),
        ("[queue]\nwarn_after = -1h\n", "queue", "warn_after", "bad duration"),
        ("[queue]\nhold = perhaps\n", "queue", "hold", "bad boolean"),
        ("[queue]\ndelivery_timeout = 0\n", "queue", "delivery_timeout", "more than zero"),
        ("[queue]\nconcurrency = 0\n", "queue", "concurrency", "more than zero"),
        ("[queue]\ndestination_concurrency = many\n", "queue", "destination_concurrency", "bad number"),
        ("[queue]\nactive_limit = 0\n", "queue", "active_limit", "more than zero"),
        ("[queue]\nactive_limit = lots\n", "queue", "active_limit", "bad number"),
        ("[queue]\ncommit_timeout = 0\n", "queue", "commit_timeout", "more than zero"),
        ("[queue]\ncommit_timeout = never\n", "queue", "commit_timeout", "bad duration"),
        # routes
        ("[delivery:mx]\nplugin = mx\n[routes]\n", "routes", None, "duplicate section"),
        ("[control]\nendpoint = tcp:notaport\n", "control", "endpoint", "bad endpoint"),
        ("[control]\n", "control", "endpoint", "required"),
        ("[metrics]\nendpoint = nope:1\n", "metrics", "endpoint", "bad endpoint"),
        # abuse resistance (issue 13)
        ("[relay]\nmax_sessions = 0\n", "relay", "max_sessions", "auto or more than zero"),
        ("[relay]\nmax_sessions = lots\n", "relay", "max_sessions", "auto or a whole number"),
        ("[relay]\nmax_sessions = -5\n", "relay", "max_sessions", "auto or a whole number"),
        *(
            (f"[listener:x]\nendpoint = tcp:1\n{key} = {value}\n", "listener:x", key, fragment)
            for key, value, fragment in [
                ("max_sessions_per_client", "0", "more than zero"),
                ("max_sessions_per_client", "many", "bad number"),
                ("max_sessions_per_relay_client", "0", "more than zero"),
                ("max_connection_rate", "-1", "bad number"),
                ("max_connection_rate", "2/s", "bad number"),
                ("max_errors", "0", "more than zero"),
                ("backlog", "0", "out of range (1 to 65535)"),
                ("backlog", "70000", "out of range"),
                ("idle_timeout", "0", "more than zero"),
                ("idle_timeout", "forever", "bad duration"),
                ("command_deadline", "0s", "more than zero"),
                ("data_deadline", "1y", "bad duration"),
                ("min_data_rate", "0", "more than zero"),
                ("min_data_rate", "1KB/s", "bad size"),
                ("session_deadline", "0", "more than zero"),
            ]
        ),
        ("[auth]\nfailure_delay = soon\n", "auth", "failure_delay", "bad duration"),
        ("[auth]\nfailure_delay = 20s\n", "auth", "max_failure_delay", "less than failure_delay (20s)"),
        ("[auth]\nmax_failures = 0\n", "auth", "max_failures", "more than zero"),
        ("[auth]\nfailure_window = 0\n", "auth", "failure_window", "more than zero"),
        ("[auth]\nlockout = 0\n", "auth", "lockout", "more than zero"),
        ("[auth]\nmax_bcrypt_cost = 3\n", "auth", "max_bcrypt_cost", "out of range (4 to 31)"),
        ("[auth]\nmax_bcrypt_cost = 32\n", "auth", "max_bcrypt_cost", "out of range"),
        ("[auth]\nretries = 3\n", "auth", "retries", "allowed: passwords, failure_delay"),
        ("[threads]\nauth = 0\n", "threads", "auth", "out of range (1 to 1000)"),
        ("[threads]\ndns = x\n", "threads", "dns", "bad number"),
        ("[threads]\ndelivery = 1001\n", "threads", "delivery", "out of range"),
        ("[threads]\nvalidators = -1\n", "threads", "validators", "bad number"),
        ("[threads]\nsmtp = 4\n", "threads", "smtp", "allowed: auth, dns, delivery, validators"),
    ],
)
def test_errors(files: Path, extra: str, section: str | None, key: str | None, fragment: str) -> None:
    fails(files, MINIMAL + "\n" + extra, section, key, fragment)


@pytest.mark.parametrize(
    "routes, key, fragment",
    [
        ("example.test = nowhere\n", "example.test", "no [delivery:nowhere] section (defined: local)"),
        ("exa mple.test = local\n", "exa mple.test", "bad domain"),
        ("example.*.test = local\n", "example.*.test", "a route is a domain, *.domain or *"),
        ("*. = local\n", "*.", "bad domain"),
        ("** = local\n", "**", "bad domain"),
        ("Example.test = local\nexample.TEST = local\n", "example.TEST", "duplicate route"),
    ],
)
def test_route_errors(tmp_path: Path, routes: str, key: str, fragment: str) -> None:
    fails(tmp_path, MINIMAL + routes, "routes", key, fragment)


def test_no_listener(tmp_path: Path) -> None:
    text = MINIMAL.replace("[listener:smtp]\nendpoint = tcp:2525:interface=127.0.0.1\n", "")
    fails(tmp_path, text, "listener:NAME", "endpoint", "at least one [listener:NAME] section is required")


def test_key_before_any_section(tmp_path: Path) -> None:
    error = fails(tmp_path, "hostname = x\n" + MINIMAL, None, None, "line 1: 'hostname = x' comes before any [section]")
    assert error.message.startswith("line 1")


def test_bad_system_hostname(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(socket, "getfqdn", lambda: "under_score")
    fails(tmp_path, MINIMAL, "relay", "hostname", "set hostname")


# -- durations and sizes ---------------------------------------------------------


@pytest.mark.parametrize(
    "text, seconds",
    [
        ("30", 30.0),
        ("30s", 30.0),
        ("5m", 300.0),
        ("4h", 14400.0),
        ("5d", 432000.0),
        ("1.5h", 5400.0),
        (".5m", 30.0),
        ("0", 0.0),
        ("0s", 0.0),
        (" 2m ", 120.0),
        ("1H", 3600.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    "text", ["", " ", "-5", "-1m", "+5", "5x", "m", "1e3", "5 m", "inf", "nan", "1.5.5", "5mm", "1w"]
)
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


@pytest.mark.parametrize(
    "text, size",
    [
        ("1000", 1000),
        ("0", 0),
        ("35M", 35 * 1024 * 1024),
        ("512K", 512 * 1024),
        ("512k", 512 * 1024),
        ("1G", 1024**3),
        ("1.5M", 1536 * 1024),
        (" 2K ", 2048),
    ],
)
def test_parse_size(text: str, size: int) -> None:
    assert parse_size(text) == size
    assert isinstance(parse_size(text), int)


@pytest.mark.parametrize("text", ["", "-1", "-1K", "35X", "1.5", "0.1K", "M", "1KB", "1e6", "1 K", "1T", "+1"])
def test_parse_size_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


# -- anything at all is either settings or one ConfigError --------------------------

_FRAGMENTS = [
    "[relay]",
    "[listener:a]",
    "[listener:]",
    "[tls]",
    "[auth]",
    "[policy]",
    "[validator:v]",
    "[queue]",
    "[delivery:local]",
    "[routes]",
    "[control]",
    "[metrics]",
    "[DEFAULT]",
    "[x",
    "]",
    "endpoint = tcp:2525",
    "endpoint = unix:x.sock",
    "endpoint = tcp:",
    "tls = starttls",
    "auth = required",
    "plaintext_auth = yes",
    "plugin = maildir",
    "localhost = local",
    "* = local",
    "*.x = local",
    "hostname = ",
    "hostname = bücher.example",
    "hostname = xn--",
    "postmaster = a@b",
    "validators = v",
    "local_domains = localhost bücher.example",
    "relay_networks = ::/0",
    "retry = 1m 0",
    "max_message_size = 9999999999999999999999G",
    "max_recipients = 99999999999",
    "max_age = 1e999",
    "warn_after = 1" + "0" * 400,
    "  continued",
    "= x",
    "x",
    "; comment",
    "a = b # c",
    "\x00",
]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(st.sampled_from(_FRAGMENTS), st.text(max_size=20)), max_size=25))
def test_any_content_is_settings_or_config_error(tmp_path: Path, lines: list[str]) -> None:
    path = tmp_path / "fuzz.ini"
    path.write_text("\n".join(lines), encoding="utf-8", errors="surrogatepass")
    try:
        load(path, base=tmp_path)
    except ConfigError as e:
        assert str(e).startswith(str(path))
        assert "\n" not in str(e)


# -- the shipped default ------------------------------------------------------------


def test_shipped_default_loads() -> None:
    shipped = Path(__file__).resolve().parents[1] / "etc" / "relay.ini"
    s = load(shipped, base=shipped.parent.parent)
    assert s.listeners
    assert s.state_dir.is_absolute()
    for domain in s.local_domains:
        assert s.route(domain) in s.deliveries
    assert os.fspath(s.path) == str(shipped)
