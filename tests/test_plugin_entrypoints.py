"""
Item 7 of issue 14: plugins declared in the C{relay.plugins} entry-point group
are found beside twisted.plugin dropins; a name provided both ways, or an
entry point that cannot be loaded, stops start-up with one line naming it,
and only when the configuration uses it.
"""

from __future__ import annotations

import argparse
import io
import sys
from contextlib import redirect_stdout
from pathlib import Path

import pytest
from entrypoints import MODULE, install
from relayproc import RELAY_SECTION
from twisted.internet.testing import MemoryReactorClock
from twisted.python import log

from relay import ctl, plugin
from relay.config import load
from relay.envelope import Envelope, Recipient
from relay.errors import ConfigError, OptionError
from relay.interfaces import IDeliveryBackendFactory, IRecipientValidatorFactory
from relay.service import buildService

CONFIG = (
    RELAY_SECTION
    + """\

[listener:smtp]
endpoint = tcp:0:interface=127.0.0.1

[delivery:local]
plugin = maildir

[delivery:filed]
plugin = {plugin}

[routes]
localhost = local
* = filed
"""
)


@pytest.fixture
def site(tmp_path, monkeypatch):
    """install(distribution, entryPoints, modules) onto a fresh sys.path entry, forgotten afterwards."""
    roots = []

    def make(distribution: str, entryPoints: dict[str, str], modules: dict[str, str] | None = None) -> Path:
        root = install(tmp_path / f"site-{len(roots)}", distribution, entryPoints, modules)
        monkeypatch.syspath_prepend(str(root))
        roots.append(root)
        return root

    before = set(sys.modules)
    yield make
    for name in set(sys.modules) - before:
        if any(str(getattr(sys.modules[name], "__file__", "") or "").startswith(str(r)) for r in roots):
            del sys.modules[name]


def plugins() -> str:
    out = io.StringIO()
    with redirect_stdout(out):
        assert ctl.plugins(argparse.Namespace()) == 0
    return out.getvalue()


def test_an_entry_point_plugin_is_found_and_listed_with_its_source(site):
    site("relay-epfiler", {"epfiler": "epfiler_a:filer"}, {"epfiler_a": MODULE})
    factory = plugin.find("epfiler", IDeliveryBackendFactory)
    assert type(factory).__module__ == "epfiler_a" and factory.name == "epfiler"
    assert "epfiler" in plugin.available(IDeliveryBackendFactory)
    assert "epfiler" not in plugin.available(IRecipientValidatorFactory)  # a backend, not a validator
    listing = plugins()
    assert "  epfiler: Files each message" in listing
    assert "[entry point epfiler = epfiler_a:filer (relay-epfiler 1.0)]" in listing
    assert "  maildir: Deliver into local maildirs" in listing and "[dropin relay.plugins.maildir]" in listing


def test_a_relay_configured_with_it_builds_and_delivers_through_it(site, tmp_path):
    site("relay-epfiler", {"epfiler": "epfiler_b:filer"}, {"epfiler_b": MODULE})
    config = tmp_path / "relay.ini"
    config.write_text(CONFIG.format(state=tmp_path / "var", plugin="epfiler"))
    top = buildService(load(config), MemoryReactorClock())
    backend = top.scheduler.router.backends["filed"]
    assert type(backend).__module__ == "epfiler_b"
    backend.blocking = plugin.runInline  # the relay's delivery pool is not started in a unit test
    data = tmp_path / "message"
    data.write_bytes(b"Subject: x\r\n\r\nhello\r\n")
    envelope = Envelope("Q1", "a@example.org", [Recipient("b@example.net")], 0.0)
    results = []
    backend.deliver(envelope, envelope.recipients, lambda: data.open("rb")).addCallback(results.append)
    assert [(r.recipient, r.status.code) for r in results[0]] == [("b@example.net", 250)]
    assert (tmp_path / "var" / "ep-delivered" / "Q1-b@example.net").read_bytes() == data.read_bytes()


def test_a_broken_entry_point_costs_nothing_until_it_is_used(site, tmp_path):
    site("relay-broken", {"broken": "no_such_module_anywhere:factory"})
    logged: list[dict] = []
    log.addObserver(logged.append)
    try:
        assert plugin.find("maildir", IDeliveryBackendFactory).name == "maildir"
        assert "broken" not in plugin.available(IDeliveryBackendFactory)
    finally:
        log.removeObserver(logged.append)
    assert not [e for e in logged if e.get("isError")]  # no traceback for a plugin nobody uses
    assert "  broken: UNUSABLE: plugin 'broken' cannot be loaded from entry point broken" in plugins()

    config = tmp_path / "relay.ini"
    config.write_text(CONFIG.format(state=tmp_path / "var", plugin="broken"))
    with pytest.raises(ConfigError) as e:
        buildService(load(config), MemoryReactorClock())
    assert str(e.value) == (
        f"{config}: [delivery:filed] plugin: plugin 'broken' cannot be loaded from entry point broken = "
        "no_such_module_anywhere:factory (relay-broken 1.0): "
        "ModuleNotFoundError: No module named 'no_such_module_anywhere'"
    )


def test_a_name_provided_as_dropin_and_entry_point_is_refused_naming_both(site):
    site("relay-impostor", {"maildir": "impostor:filer"}, {"impostor": MODULE.replace('"epfiler"', '"maildir"')})
    with pytest.raises(OptionError) as e:
        plugin.find("maildir", IDeliveryBackendFactory)
    assert e.value.message == (
        "plugin 'maildir' is provided twice, by dropin relay.plugins.maildir; "
        "entry point maildir = impostor:filer (relay-impostor 1.0): uninstall one"
    )
    assert "maildir" not in plugin.available(IDeliveryBackendFactory)
    assert plugin.find("smarthost", IDeliveryBackendFactory).name == "smarthost"  # the others are unaffected


def test_the_same_factory_found_both_ways_is_no_conflict(site):
    site("relay-both", {"maildir": "relay.plugins.maildir:maildir"})
    from relay.plugins.maildir import maildir

    assert plugin.find("maildir", IDeliveryBackendFactory) is maildir


def test_an_entry_point_must_be_named_as_its_factory(site):
    site("relay-misnamed", {"filer": "epfiler_c:filer"}, {"epfiler_c": MODULE})
    with pytest.raises(OptionError) as e:
        plugin.find("filer", IDeliveryBackendFactory)
    assert "its factory is called 'epfiler'; the entry point must have the same name" in e.value.message
