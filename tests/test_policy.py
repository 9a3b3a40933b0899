"""The policy: relay access, the routed backend's refusal at RCPT, DSN requests from outsiders."""

from __future__ import annotations

import ipaddress

import pytest
from twisted.internet.defer import succeed
from twisted.internet.task import Clock
from twisted.logger import globalLogPublisher

from relay.delivery.maildir import MaildirBackend
from relay.delivery.router import Router
from relay.envelope import Status
from relay.plugin import runInline
from relay.policy import Policy
from relay.verdict import SessionInfo, deny

SESSION = SessionInfo("192.0.2.1", "c.example", "s@example.org", local_domain=True)
REFUSED = Status(550, "5.1.3", "Bad destination mailbox address")


class Counting:
    """A validator that records what it was asked and refuses everything."""

    def __init__(self) -> None:
        self.asked: list[str] = []

    def validate(self, recipient, session):
        self.asked.append(recipient)
        return deny("validator says no", "5.7.1")


class Refusing:
    """A backend whose C{refuses} answers from a table (or raises, or misbehaves)."""

    def __init__(self, answer) -> None:
        self.answer = answer
        self.asked: list[str] = []

    def refuses(self, address):
        self.asked.append(address)
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def deliver(self, envelope, recipients, openData):
        raise AssertionError("never delivers here")

    def stop(self):
        pass


class Plain:
    """A third-party backend from before C{refuses} existed."""

    def deliver(self, envelope, recipients, openData):
        raise AssertionError("never delivers here")

    def stop(self):
        pass


class Metrics:
    def __init__(self) -> None:
        self.failed: list[tuple[str, str]] = []

    def pluginFailed(self, kind: str, name: str) -> None:
        self.failed.append((kind, name))


def makePolicy(backends, validators=(), routes=None, metrics=None):
    routes = routes if routes is not None else {"localhost": "local", "far.example": "out"}
    route = routes.get
    return Policy(
        frozenset({"localhost"}),
        [ipaddress.ip_network("127.0.0.0/8")],
        route,
        list(validators),
        Clock(),
        metrics=metrics,
        router=Router(route, backends),
    )


def answer(outcome):
    if isinstance(outcome, Status):
        return outcome
    done = []
    outcome.addBoth(done.append)
    return done[0]


def maildir(tmp_path):
    return MaildirBackend("mail/{domain}/{local}", tmp_path, "relay.test", runInline, Clock())


@pytest.mark.parametrize(
    "address", ["a/b@localhost", '".hidden"@localhost', '"../.."@localhost', '"a\\/b"@localhost', "A/B@localhost"]
)
def test_maildir_backend_refuses_what_it_cannot_deliver_before_the_validators(tmp_path, address):
    validator = Counting()
    policy = makePolicy({"local": maildir(tmp_path)}, [("v", validator)])
    assert answer(policy.checkRecipient(address, SESSION, mayRelay=False)) == REFUSED
    assert validator.asked == []  # certain already: nobody else is asked


def test_a_good_mailbox_goes_on_to_the_validators(tmp_path):
    validator = Counting()
    policy = makePolicy({"local": maildir(tmp_path)}, [("v", validator)])
    assert answer(policy.checkRecipient("alice@localhost", SESSION, mayRelay=False)).enhanced == "5.7.1"
    assert validator.asked == ["alice@localhost"]
    assert makePolicy({"local": maildir(tmp_path)}).checkRecipient("alice@localhost", SESSION, False).code == 250


def test_relay_access_is_checked_first():
    backend = Refusing(REFUSED)
    policy = makePolicy({"local": Plain(), "out": backend})
    assert answer(policy.checkRecipient("x@far.example", SESSION, mayRelay=False)).enhanced == "5.7.1"
    assert backend.asked == []
    assert answer(policy.checkRecipient("x@far.example", SESSION, mayRelay=True)) == REFUSED
    assert backend.asked == ["x@far.example"]


def test_postmaster_is_always_taken():
    backend = Refusing(REFUSED)
    policy = makePolicy({"local": backend})
    assert answer(policy.checkRecipient("Postmaster@localhost", SESSION, mayRelay=False)).code == 250
    assert backend.asked == []


def test_a_backend_without_refuses_is_never_asked():
    policy = makePolicy({"local": Plain()})
    assert answer(policy.checkRecipient("a/b@localhost", SESSION, mayRelay=False)).code == 250


def test_no_router_asks_nobody():
    policy = Policy(frozenset({"localhost"}), [], {"localhost": "local"}.get, [], Clock())
    assert answer(policy.checkRecipient("a/b@localhost", SESSION, mayRelay=False)).code == 250


@pytest.mark.parametrize(
    "misbehaviour",
    [
        RuntimeError("boom"),
        Status(250, "2.0.0", "fine"),  # not a refusal
        Status(450, "4.2.0", "busy"),  # not certain: deliver decides
        "550 no",
        succeed(REFUSED),  # it must not wait for anything
    ],
)
def test_a_misbehaving_check_costs_one_451_and_a_log_line(misbehaviour):
    metrics = Metrics()
    policy = makePolicy({"local": Refusing(misbehaviour)}, metrics=metrics)
    events: list[dict] = []
    globalLogPublisher.addObserver(events.append)
    try:
        outcome = answer(policy.checkRecipient("a@localhost", SESSION, mayRelay=False))
    finally:
        globalLogPublisher.removeObserver(events.append)
    assert (outcome.code, outcome.enhanced) == (451, "4.3.0")
    assert metrics.failed == [("backend", "local")]
    assert any("log_failure" in e and e.get("kind") == "backend" and e.get("plugin") == "local" for e in events)


@pytest.mark.parametrize(
    "asked, outsider",
    [
        (None, ("FAILURE",)),  # no delay warnings either
        (("SUCCESS",), ("FAILURE",)),  # what no request gets
        (("DELAY",), ("FAILURE",)),
        (("SUCCESS", "FAILURE", "DELAY"), ("FAILURE",)),
        (("FAILURE",), ("FAILURE",)),
        (("NEVER",), ("NEVER",)),  # fewer reports: always honoured
    ],
)
def test_notify_from_outsiders_is_failures_only(asked, outsider):
    policy = makePolicy({})
    assert policy.dsnNotify(asked, trusted=False) == outsider
    assert policy.dsnNotify(asked, trusted=True) == asked


@pytest.mark.parametrize("asked", [None, "FULL", "HDRS"])
def test_ret_from_outsiders_is_headers_only(asked):
    policy = makePolicy({})
    assert policy.dsnRet(asked, trusted=False) == "HDRS"
    assert policy.dsnRet(asked, trusted=True) == asked
