"""
TLS reporting (RFC 8460) with a clock: counts per policy domain and UTC day,
kept on disk across a restart, the JSON report's shape, the TXT record, the
mail of section 5.3, the daily schedule, and a report queued in the relay's
own queue.  Sending by mail and HTTPS from the real process is in
tests/integration/test_mta_sts.py.
"""

from __future__ import annotations

import email
import email.policy
import gzip
import json
from datetime import UTC, datetime

import pytest
from deferred import result
from twisted.internet.defer import Deferred
from twisted.internet.task import Clock

from relay.delivery.tlsrpt import (
    SAVE_DELAY,
    SEND_AFTER_MIDNIGHT,
    SEND_AFTER_START,
    PolicyRef,
    QueueSubmitter,
    TLSReports,
    parseRecord,
    reportFileName,
    reportMessage,
)
from relay.queue.memory import MemoryQueueStore

NOON = datetime(2026, 3, 14, 12, 0, tzinfo=UTC).timestamp()
STS = PolicyRef("sts", ("version: STSv1", "mode: enforce", "mx: mx.example.com", "max_age: 86400"), ("mx.example.com",))
TLSA = PolicyRef("tlsa", ("3 1 1 abcd",))


class Outside:
    """The TXT records, the queue and the HTTPS endpoint the reports go to; records what they got."""

    def __init__(self) -> None:
        self.records: dict[str, list[str]] = {}
        self.mails: list[tuple[str, list[str], bytes]] = []
        self.posts: list[tuple[str, bytes]] = []

    async def txt(self, name: str) -> list[str]:
        answer = self.records.get(name, [])
        if isinstance(answer, Exception):
            raise answer
        return answer

    async def submit(self, sender: str, recipients: list[str], data: bytes) -> str:
        self.mails.append((sender, recipients, data))
        return "q1"

    async def post(self, url: str, body: bytes) -> None:
        self.posts.append((url, body))


def reporter(tmp_path, clock: Clock, outside: Outside) -> TLSReports:
    return TLSReports(
        clock, tmp_path / "rpt", "relay.test", "postmaster@relay.test", outside.txt, outside.submit, outside
    )


@pytest.fixture
def clock():
    c = Clock()
    c.advance(NOON)
    return c


def count(reports: TLSReports) -> None:
    for _ in range(5):
        reports.success("example.com", STS)
    reports.failure("example.com", STS, "certificate-expired", "mx.example.com", "192.0.2.1", "expired")
    reports.failure("example.com", STS, "certificate-expired", "mx.example.com", "192.0.2.1", "expired")
    reports.failure("example.com", STS, "starttls-not-supported", "mx2.example.com", "192.0.2.2")
    reports.success("example.com", TLSA)
    reports.success("example.org", STS)


def test_counts_are_saved_soon_and_read_back_after_a_restart(tmp_path, clock):
    outside = Outside()
    reports = reporter(tmp_path, clock, outside)
    reports.start()
    count(reports)
    assert not (tmp_path / "rpt" / "counts.json").exists()
    clock.advance(SAVE_DELAY)
    saved = json.loads((tmp_path / "rpt" / "counts.json").read_text())
    assert list(saved["days"]) == ["2026-03-14"] and set(saved["days"]["2026-03-14"]) == {"example.com", "example.org"}
    reports.success("example.org", STS)
    reports.stop()  # the rest is written at once
    again = reporter(tmp_path, clock, outside)
    again.start()
    assert again.days == reports.days
    [entry] = again.days["2026-03-14"]["example.org"].values()
    assert entry["success"] == 2


def test_the_report_of_a_finished_day(tmp_path, clock):
    outside = Outside()
    outside.records["_smtp._tls.example.com"] = ["v=TLSRPTv1; rua=mailto:tls@example.com,https://rpt.example.com/r"]
    reports = reporter(tmp_path, clock, outside)  # not started: the test sends
    count(reports)
    assert result(Deferred.fromCoroutine(reports.sendFinished())) == 0  # today is not finished
    clock.advance(86400)
    assert (
        result(Deferred.fromCoroutine(reports.sendFinished())) == 2
    )  # example.org has no record: done with too, nothing sent
    assert reports.days == {}
    [(sender, to, data)] = outside.mails
    assert sender == "postmaster@relay.test" and to == ["tls@example.com"]
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message.get_content_type() == "multipart/report" and message.get_param("report-type") == "tlsrpt"
    assert message["TLS-Report-Domain"] == "example.com" and message["TLS-Report-Submitter"] == "relay.test"
    assert message["Subject"].startswith("Report Domain: example.com Submitter: relay.test Report-ID: <")
    assert b"\r\n" in data and b"\n" not in data.replace(b"\r\n", b"")  # CRLF lines, as a queued message has
    [attachment] = [p for p in message.walk() if p.get_content_type() == "application/tlsrpt+gzip"]
    report = json.loads(gzip.decompress(attachment.get_content()))
    [(url, body)] = outside.posts
    assert url == "https://rpt.example.com/r" and json.loads(gzip.decompress(body)) == report
    assert attachment.get_filename() == reportFileName("relay.test", "example.com", "2026-03-14", report["report-id"])
    assert attachment.get_filename().startswith("relay.test!example.com!1773446400!1773532799!")
    assert report["organization-name"] == "relay.test" and report["contact-info"] == "postmaster@relay.test"
    assert report["date-range"] == {"start-datetime": "2026-03-14T00:00:00Z", "end-datetime": "2026-03-14T23:59:59Z"}
    sts, tlsa = sorted(report["policies"], key=lambda p: p["policy"]["policy-type"])
    assert sts["policy"] == {
        "policy-type": "sts",
        "policy-domain": "example.com",
        "policy-string": list(STS.strings),
        "mx-host": ["mx.example.com"],
    }
    assert sts["summary"] == {"total-successful-session-count": 5, "total-failure-session-count": 3}
    assert sorted(sts["failure-details"], key=lambda d: d["result-type"]) == [
        {
            "result-type": "certificate-expired",
            "failed-session-count": 2,
            "receiving-mx-hostname": "mx.example.com",
            "receiving-ip": "192.0.2.1",
            "additional-information": "expired",
        },
        {
            "result-type": "starttls-not-supported",
            "failed-session-count": 1,
            "receiving-mx-hostname": "mx2.example.com",
            "receiving-ip": "192.0.2.2",
        },
    ]
    assert tlsa["policy"] == {"policy-type": "tlsa", "policy-domain": "example.com", "policy-string": ["3 1 1 abcd"]}
    assert tlsa["summary"] == {"total-successful-session-count": 1, "total-failure-session-count": 0}
    assert tlsa["failure-details"] == []


def test_a_failed_txt_lookup_keeps_the_day_for_the_next_try(tmp_path, clock):
    outside = Outside()
    outside.records["_smtp._tls.example.org"] = OSError("timeout")
    reports = reporter(tmp_path, clock, outside)
    reports.success("example.org", STS)
    clock.advance(86400)
    assert result(Deferred.fromCoroutine(reports.sendFinished())) == 0
    assert list(reports.days["2026-03-14"]) == ["example.org"]
    outside.records["_smtp._tls.example.org"] = ["v=TLSRPTv1;rua=mailto:r@example.org"]
    assert result(Deferred.fromCoroutine(reports.sendFinished())) == 1
    assert len(outside.mails) == 1 and reports.days == {}


def test_sent_after_each_midnight_and_soon_after_a_start(tmp_path, clock):
    outside = Outside()
    outside.records["_smtp._tls.example.com"] = ["v=TLSRPTv1; rua=mailto:tls@example.com"]
    reports = reporter(tmp_path, clock, outside)
    reports.start()
    reports.success("example.com", STS)
    clock.advance(12 * 3600 + SEND_AFTER_MIDNIGHT - 1)
    assert outside.mails == []
    clock.advance(1)
    assert len(outside.mails) == 1
    # The next day's counts, left by a run that stopped before its midnight, go soon after the next start.
    reports.success("example.com", STS)
    reports.stop()
    clock.advance(86400)
    again = reporter(tmp_path, clock, outside)
    again.start()
    clock.advance(SEND_AFTER_START)
    assert len(outside.mails) == 2


@pytest.mark.parametrize(
    "text, expected",
    [
        ("v=TLSRPTv1; rua=mailto:a@example.com", ["mailto:a@example.com"]),
        (
            "v=TLSRPTv1;rua=mailto:a@example.com, https://r.example.com/x",
            ["mailto:a@example.com", "https://r.example.com/x"],
        ),
        ("v=TLSRPTv2; rua=mailto:a@example.com", []),
        ("v=STSv1; id=1", []),
        ("", []),
    ],
)
def test_record(text, expected):
    assert parseRecord(text) == expected


def test_the_mail_parses_as_a_report():
    report = {"report-id": "x@relay.test", "date-range": {"start-datetime": "2026-03-14T00:00:00Z"}}
    data = reportMessage(report, "example.com", "relay.test", "postmaster@relay.test", "r@example.com", NOON)
    message = email.message_from_bytes(data, policy=email.policy.default)
    assert message.is_multipart() and message.get_boundary()


def test_a_report_is_queued_like_a_dsn():
    store = MemoryQueueStore()
    enqueued = []

    class Scheduler:
        def enqueue(self, envelope):
            enqueued.append(envelope)

    submitter = QueueSubmitter()
    submitter.attach(store, Scheduler(), Clock())
    queueID = result(Deferred.fromCoroutine(submitter.submit("postmaster@relay.test", ["r@example.com"], b"data\r\n")))
    [envelope] = enqueued
    assert envelope.queue_id == queueID and envelope.sender == "postmaster@relay.test"
    assert [r.address for r in envelope.recipients] == ["r@example.com"]
    with store.openData(queueID) as data:
        assert data.read() == b"data\r\n"
