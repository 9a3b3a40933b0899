"""
MTA-STS: the TXT record and policy parsers (fuzzed), MX patterns, the policy
cache on disk, and which policy applies when DNS, HTTPS and the cache
disagree (RFC 8461 5.1), with a clock and a scripted fetcher.  Fetching over
real HTTPS is in tests/integration/test_mta_sts.py.
"""

from __future__ import annotations

import json

import pytest
from deferred import result
from hypothesis import given
from hypothesis import strategies as st
from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock

from relay.delivery.mtasts import (
    MAX_AGE_LIMIT,
    RETRY_FETCH,
    STS,
    FetchError,
    Policy,
    PolicyCache,
    PolicyError,
    parsePolicy,
    parseRecord,
)

POLICY = "version: STSv1\r\nmode: enforce\r\nmx: mail.example.com\r\nmx: *.example.net\r\nmax_age: 86400\r\n"


def test_record_id():
    assert parseRecord("v=STSv1; id=20160831085700Z;") == "20160831085700Z"
    assert parseRecord("v=STSv1;id=abc") == "abc"
    assert parseRecord("v=STSv1; id=abc; ext=whatever") == "abc"


@pytest.mark.parametrize(
    "text",
    ["", "v=STSv2; id=1", "id=1; v=STSv1", "v=STSv1", "v=STSv1; id=", "v=STSv1; id=a-b", "v=STSv1; id=" + "a" * 33],
)
def test_bad_records(text):
    with pytest.raises(PolicyError):
        parseRecord(text)


def test_policy_fields():
    policy = parsePolicy(POLICY, "id1", 100.0)
    assert policy == Policy("enforce", ("mail.example.com", "*.example.net"), 86400, "id1", 100.0)
    assert policy.lines() == [line for line in POLICY.split("\r\n") if line]
    # LF alone, unknown keys, a trailing dot, upper case: all accepted (RFC 8461 3.2).
    policy = parsePolicy("version: STSv1\nmode: testing\nmx: MX.Example.COM.\nfoo: bar\nmax_age: 99999\n")
    assert policy.mx == ("mx.example.com",) and policy.mode == "testing"


def test_max_age_is_capped_at_a_year():
    assert parsePolicy("version: STSv1\nmode: none\nmax_age: 9999999999\n").maxAge == MAX_AGE_LIMIT


@pytest.mark.parametrize(
    "text",
    [
        "mode: enforce\nmx: a.example\nmax_age: 1\n",  # no version
        "version: STSv1\nmode: strict\nmx: a.example\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmax_age: 1\n",  # no mx
        "version: STSv1\nmode: enforce\nmx: a.example\n",  # no max_age
        "version: STSv1\nmode: enforce\nmx: a.example\nmax_age: -1\n",
        "version: STSv1\nmode: enforce\nmx: a..example\nmax_age: 1\n",
        "version: STSv1\nmode: enforce\nmx: a.*.example\nmax_age: 1\n",
        "<html>not a policy</html>",
    ],
)
def test_bad_policies(text):
    with pytest.raises(PolicyError):
        parsePolicy(text)


def test_mx_patterns():
    policy = parsePolicy(POLICY)
    assert policy.allows("mail.example.com") and policy.allows("MAIL.example.com.")
    assert policy.allows("mx1.example.net")
    assert not policy.allows("example.net")  # the wildcard needs a label
    assert not policy.allows("a.b.example.net")  # ... exactly one
    assert not policy.allows("other.example.com")


@given(st.text(max_size=300))
def test_record_parser_only_raises_policy_error(text):
    try:
        ident = parseRecord(text)
    except PolicyError:
        return
    assert 1 <= len(ident) <= 32 and ident.isalnum()


_line = st.one_of(
    st.sampled_from(["version: STSv1", "mode: enforce", "mode: testing", "mode: none", "max_age: 600"]),
    st.builds(lambda h: f"mx: {h}", st.from_regex(r"(\*\.)?[a-z0-9]{1,5}(\.[a-z0-9]{1,5}){0,2}", fullmatch=True)),
    st.text(max_size=40),
)


@given(st.lists(_line, max_size=12), st.sampled_from(["\n", "\r\n"]))
def test_policy_parser_only_raises_policy_error(lines, end):
    text = end.join(lines)
    try:
        policy = parsePolicy(text)
    except PolicyError:
        return
    assert policy.mode in ("enforce", "testing", "none")
    assert 0 <= policy.maxAge <= MAX_AGE_LIMIT
    assert policy.mode == "none" or policy.mx
    assert parsePolicy(policy.text) == policy  # what is cached reads back the same
    for pattern in policy.mx:
        assert policy.allows(pattern.replace("*", "x"))


def test_cache_survives_a_new_instance(tmp_path):
    cache = PolicyCache(tmp_path / "sts")
    policy = parsePolicy(POLICY, "id1", 1000.0)
    cache.put("example.com", policy)
    assert sorted(p.name for p in (tmp_path / "sts").iterdir()) == ["example.com.json"]  # no temporary left
    assert PolicyCache(tmp_path / "sts").get("example.com") == policy
    assert PolicyCache(tmp_path / "sts").get("other.com") is None


def test_a_damaged_cache_file_is_no_policy(tmp_path):
    (tmp_path / "example.com.json").write_text("{not json")
    assert PolicyCache(tmp_path).get("example.com") is None
    (tmp_path / "example.com.json").write_text(json.dumps({"id": "1", "fetched": 0, "text": "garbage"}))
    assert PolicyCache(tmp_path).get("example.com") is None


class World:
    """TXT answers and fetch results the test sets; counts the fetches."""

    def __init__(self, tmp_path) -> None:
        self.clock = Clock()
        self.clock.advance(1_000_000)
        self.txtRecords: list[str] | Exception = []
        self.policy: str | Exception = POLICY
        self.fetches = 0
        self.cache = PolicyCache(tmp_path)
        self.sts = STS(self.clock, self.txt, self, self.cache)

    async def txt(self, name: str) -> list[str]:
        assert name == "_mta-sts.example.com"
        if isinstance(self.txtRecords, Exception):
            raise self.txtRecords
        return self.txtRecords

    async def fetch(self, domain: str) -> str:
        self.fetches += 1
        if isinstance(self.policy, Exception):
            raise self.policy
        return self.policy

    def lookup(self):
        return result(self.sts.policyFor("example.com"))


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


def test_no_record_no_policy(world):
    assert world.lookup().policy is None and world.fetches == 0


def test_fetched_once_then_cached_while_the_id_stays(world):
    world.txtRecords = ["v=STSv1; id=1"]
    first = world.lookup()
    assert first.policy.mode == "enforce" and first.policy.id == "1" and world.fetches == 1
    assert world.lookup().policy == first.policy and world.fetches == 1
    # A new id: fetched again.
    world.txtRecords = ["v=STSv1; id=2"]
    world.policy = POLICY.replace("enforce", "testing")
    assert world.lookup().policy.mode == "testing" and world.fetches == 2
    # Kept on disk: a new STS (a restart) uses it without fetching.
    again = STS(world.clock, world.txt, world, PolicyCache(world.cache.directory))
    assert result(again.policyFor("example.com")).policy.id == "2" and world.fetches == 2


def test_a_failed_fetch_keeps_the_cached_policy(world):
    world.txtRecords = ["v=STSv1; id=1"]
    cached = world.lookup().policy
    world.txtRecords = ["v=STSv1; id=2"]
    world.policy = FetchError("connection refused")
    found = world.lookup()
    assert found.policy == cached and found.fetchError == "connection refused"
    # Without one cached: no policy, and the error for TLS-RPT.
    world.cache = PolicyCache(world.cache.directory / "empty")
    found = result(STS(world.clock, world.txt, world, world.cache).policyFor("example.com"))
    assert found.policy is None and found.fetchError == "connection refused"


def test_an_invalid_policy_is_reported_as_such(world):
    world.txtRecords = ["v=STSv1; id=1"]
    world.policy = "nonsense"
    found = world.lookup()
    assert found.policy is None and found.invalid


def test_dns_failure_or_a_vanished_record_keeps_the_cache_until_max_age(world):
    world.txtRecords = ["v=STSv1; id=1"]
    cached = world.lookup().policy
    world.txtRecords = OSError("timeout")
    assert world.lookup().policy == cached
    world.txtRecords = []  # stripped by an attacker, or withdrawn: the cache holds (RFC 8461 5.1)
    assert world.lookup().policy == cached
    world.clock.advance(86400)
    assert world.lookup().policy is None


def test_two_records_are_as_none(world):
    world.txtRecords = ["v=STSv1; id=1", "v=STSv1; id=2"]
    assert world.lookup().policy is None and world.fetches == 0


def test_concurrent_lookups_share_one_fetch(tmp_path):
    clock = Clock()
    waiting: list[Deferred[str]] = []

    class Slow:
        async def fetch(self, domain: str) -> str:
            waiting.append(Deferred())
            return await waiting[-1]

    async def txt(name: str) -> list[str]:
        return ["v=STSv1; id=1"]

    sts = STS(clock, txt, Slow(), PolicyCache(tmp_path), lambda f, *a: succeed(f(*a)))
    first, second = sts.policyFor("example.com"), sts.policyFor("example.com")
    assert len(waiting) == 1 and not first.called
    waiting[0].callback(POLICY)
    assert result(first).policy == result(second).policy


def test_a_failed_fetch_is_not_tried_again_at_every_attempt(world):
    world.txtRecords = ["v=STSv1; id=1"]
    world.policy = FetchError("timed out")
    assert world.lookup().fetchError == "timed out" and world.fetches == 1
    assert world.lookup().fetchError == "timed out" and world.fetches == 1  # remembered
    world.clock.advance(RETRY_FETCH)
    world.policy = POLICY
    assert world.lookup().policy.mode == "enforce" and world.fetches == 2
    # A new id is fetched at once, whatever failed before.
    world.txtRecords = ["v=STSv1; id=2"]
    world.policy = FetchError("refused")
    world.lookup()
    world.txtRecords = ["v=STSv1; id=3"]
    world.lookup()
    assert world.fetches == 4
