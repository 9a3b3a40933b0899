"""The built-in validators: static lists and maildir existence."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from deferred import result
from twisted.internet.task import Clock

from relay.errors import OptionError
from relay.interfaces import IRecipientValidatorFactory
from relay.plugin import PluginContext, checkKeys, find, runInline
from relay.policy import Policy
from relay.verdict import Decision, SessionInfo


def build(name: str, options: dict[str, str], stateDir: Path):
    factory = find(name, IRecipientValidatorFactory)
    checkKeys(factory, options)
    context = PluginContext(reactor=Clock(), hostname="h", postmaster="p@h", state_dir=stateDir, blocking=runInline)
    return factory.build(options, context)


LOCAL = SessionInfo("192.0.2.1", "c", "s@example.org", local_domain=True)
REMOTE = SessionInfo("192.0.2.1", "c", "s@example.org", local_domain=False)


def verdict(validator, address, session=LOCAL):
    outcome = validator.validate(address, session)
    if hasattr(outcome, "addBoth"):
        outcome = result(outcome)
    if outcome.status is None:
        return outcome.decision.value
    return f"{outcome.decision.value} {outcome.status.code} {outcome.status.enhanced}"


def test_static_allow(tmp_path):
    v = build("static", {"addresses": "Alice@Example.test @whole.example"}, tmp_path)
    assert verdict(v, "alice@example.test") == "accept"
    assert verdict(v, "ALICE@EXAMPLE.TEST") == "accept"
    assert verdict(v, "anyone@whole.example") == "accept"
    assert verdict(v, "bob@example.test") == "deny 550 5.1.1"
    assert verdict(v, "bob@elsewhere.example", REMOTE) == "continue"


def test_static_deny_mode(tmp_path):
    v = build("static", {"addresses": "spam@example.test", "mode": "deny"}, tmp_path)
    assert verdict(v, "spam@example.test") == "deny 550 5.7.1"
    assert verdict(v, "ham@example.test") == "continue"


def test_static_file_reloaded_and_then_gone(tmp_path):
    listFile = tmp_path / "users"
    listFile.write_text("# users\nalice@example.test\n\n")
    v = build("static", {"file": "users"}, tmp_path)
    assert verdict(v, "bob@example.test") == "deny 550 5.1.1"
    listFile.write_text("alice@example.test\nbob@example.test  # new\n")
    stamp = os.stat(listFile).st_mtime_ns + 1_000_000_000
    os.utime(listFile, ns=(stamp, stamp))
    assert verdict(v, "bob@example.test") == "accept"
    listFile.unlink()
    assert verdict(v, "bob@example.test") == "deny-soft 451 4.3.0"


@pytest.mark.parametrize(
    "options, key, text",
    [
        ({}, "addresses", "give addresses"),
        ({"addresses": "not-an-address"}, "addresses", "bad entry"),
        ({"addresses": "a@b.example", "mode": "maybe"}, "mode", "allow or deny"),
        ({"file": "missing"}, "file", "cannot read"),
    ],
)
def test_static_option_errors(tmp_path, options, key, text):
    with pytest.raises(OptionError) as e:
        build("static", options, tmp_path)
    assert e.value.key == key and text in e.value.message


def test_static_bad_file_line_named(tmp_path):
    (tmp_path / "users").write_text("a@b.example\n\nnot valid\n")
    with pytest.raises(OptionError) as e:
        build("static", {"file": "users"}, tmp_path)
    assert e.value.key == "file" and "users:3:" in e.value.message


def test_unknown_key_refused(tmp_path):
    with pytest.raises(OptionError) as e:
        build("static", {"addresses": "a@b.example", "colour": "red"}, tmp_path)
    assert e.value.key == "colour"


def test_maildir_validator(tmp_path):
    v = build("maildir", {}, tmp_path)
    (tmp_path / "mail" / "example.test" / "alice" / "new").mkdir(parents=True)
    assert verdict(v, "Alice@example.test") == "accept"
    assert verdict(v, "bob@example.test") == "deny 550 5.1.1"
    assert verdict(v, "../x@example.test") == "deny 550 5.1.3"
    assert verdict(v, "bob@far.example", REMOTE) == "continue"
    with pytest.raises(OptionError) as e:
        build("maildir", {"path": "mail/{user}"}, tmp_path)
    assert e.value.key == "path"


def test_through_the_policy(tmp_path):
    v = build("static", {"addresses": "alice@example.test"}, tmp_path)
    policy = Policy(frozenset({"example.test"}), [], lambda d: "local", [("v", v)], Clock())
    assert result(policy.checkRecipient("bob@example.test", LOCAL, False)).code == 550
    assert result(policy.checkRecipient("alice@example.test", LOCAL, False)).code == 250
    assert policy.checkRecipient("postmaster@example.test", LOCAL, False).code == 250  # no validator asked
    assert Decision.ACCEPT.value == "accept"


def test_policy_answers_at_once_when_no_validator_is_asked():
    """The common RCPT costs no Deferred: only a validator makes the answer wait."""
    policy = Policy(frozenset({"example.test"}), [], lambda d: None, [], Clock())
    assert policy.checkRecipient("anyone@example.test", LOCAL, False).code == 250
    assert str(policy.checkRecipient("someone@far.example", REMOTE, False)) == "550 5.7.1 Relay access denied"
