"""
SMTP TLS reporting (RFC 8460): tell a receiving domain, once a day, how many
sessions to its mail exchangers met its TLS policy (MTA-STS, DANE) and why
the others did not.

The mx backend counts each session that ended an attempt under a policy
(L{TLSReports.success}, L{TLSReports.failure}), per policy domain and UTC
day.  The counts are kept in memory and written under C{state_dir}
(atomically, at most every C{SAVE_DELAY} seconds and when the backend stops),
so that a restart loses none of them.  Soon after each UTC midnight, the
finished days are reported to the C{rua} of the domain's C{_smtp._tls} TXT
record: gzipped JSON (RFC 8460 4, 5), by mail through the relay's own queue
(C{mailto:}) or POSTed (C{https:}).  A domain without such a record gets no
report; a day whose record could not be looked up is tried again the next
day, for at most C{KEEP_DAYS}.
"""

from __future__ import annotations

import email.utils
import gzip
import io
import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

from twisted.internet.defer import Deferred, succeed
from twisted.logger import Logger
from twisted.web.client import Agent, FileBodyProducer
from twisted.web.http_headers import Headers

from relay.delivery.mtasts import PinnedEndpoints, _why, readBody
from relay.fsutil import replaceFile

log = Logger()

SAVE_DELAY = 10.0  # seconds between a count and its being on disk, at most
SEND_AFTER_MIDNIGHT = 300.0  # RFC 8460 5.1 asks senders not to all report at 00:00
SEND_AFTER_START = 5.0  # finished days the last run left: sent soon after start
KEEP_DAYS = 7  # a day whose report could not be sent is given up after this
MAX_DOMAINS = 10_000  # per day: memory stays bounded whatever the traffic
POST_TIMEOUT = 60.0
REPORT_TYPE = "application/tlsrpt+gzip"


@dataclass(frozen=True)
class PolicyRef:
    """A policy as RFC 8460 4.4 names it: its type (sts, tlsa, no-policy-found), its text and its MX patterns."""

    type: str
    strings: tuple[str, ...] = ()
    mx: tuple[str, ...] = ()

    def key(self) -> str:
        return json.dumps([self.type, list(self.strings), list(self.mx)])


def _day(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%d")


def parseRecord(text: str) -> list[str]:
    """The C{rua} URIs of a C{_smtp._tls} TXT record (C{v=TLSRPTv1; rua=URI,URI}); C{[]} if it is not one."""
    fields = [part.strip() for part in text.split(";")]
    if not fields or fields[0] != "v=TLSRPTv1":
        return []
    for part in fields[1:]:
        key, sep, value = part.partition("=")
        if sep and key.strip() == "rua":
            return [uri.strip() for uri in value.split(",") if uri.strip()]
    return []


def buildReport(
    domain: str, day: str, counts: dict[str, Any], organization: str, contact: str, reportID: str
) -> dict[str, Any]:
    """The JSON report of one policy domain for one UTC day (RFC 8460 4.4)."""
    policies = []
    for key, entry in counts.items():
        kind, strings, mx = json.loads(key)
        policy: dict[str, Any] = {"policy-type": kind, "policy-domain": domain}
        if strings:
            policy["policy-string"] = strings
        if mx:
            policy["mx-host"] = mx
        failures = entry["failures"]
        details = []
        for detail, count in failures.items():
            result, mxHost, ip, additional = json.loads(detail)
            item: dict[str, Any] = {"result-type": result, "failed-session-count": count}
            if mxHost:
                item["receiving-mx-hostname"] = mxHost
            if ip:
                item["receiving-ip"] = ip
            if additional:
                item["additional-information"] = additional
            details.append(item)
        policies.append(
            {
                "policy": policy,
                "summary": {
                    "total-successful-session-count": entry["success"],
                    "total-failure-session-count": sum(failures.values()),
                },
                "failure-details": details,
            }
        )
    return {
        "organization-name": organization,
        "date-range": {"start-datetime": f"{day}T00:00:00Z", "end-datetime": f"{day}T23:59:59Z"},
        "contact-info": contact,
        "report-id": reportID,
        "policies": policies,
    }


def reportFileName(organization: str, domain: str, day: str, reportID: str) -> str:
    """RFC 8460 5.1: C{submitter!policy-domain!begin!end!id.json.gz}, the times as UNIX seconds."""
    begin = int(datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC).timestamp())
    return f"{organization}!{domain}!{begin}!{begin + 86399}!{reportID}.json.gz"


def reportMessage(report: dict[str, Any], domain: str, organization: str, sender: str, to: str, now: float) -> bytes:
    """The mail of RFC 8460 5.3: multipart/report, report-type tlsrpt, the gzipped JSON attached."""
    message = EmailMessage()
    message["From"] = sender
    message["To"] = to
    message["Subject"] = f"Report Domain: {domain} Submitter: {organization} Report-ID: <{report['report-id']}>"
    message["Date"] = email.utils.formatdate(now, usegmt=True)
    message["Message-ID"] = f"<{report['report-id']}>"
    message["TLS-Report-Domain"] = domain
    message["TLS-Report-Submitter"] = organization
    message.set_content(
        f"This is an aggregate TLS report (RFC 8460) from {organization} for {domain},"
        f" {report['date-range']['start-datetime'][:10]}.\n"
    )
    day = report["date-range"]["start-datetime"][:10]
    message.add_attachment(
        gzip.compress(json.dumps(report).encode()),
        maintype="application",
        subtype="tlsrpt+gzip",
        filename=reportFileName(organization, domain, day, report["report-id"]),
    )
    message.replace_header("Content-Type", 'multipart/report; report-type="tlsrpt"')
    # replace_header drops the boundary parameter: put it back.
    message.set_boundary(message.get_boundary() or f"=={uuid.uuid4().hex}==")
    return message.as_bytes().replace(b"\n", b"\r\n").replace(b"\r\r\n", b"\r\n")


class Poster:
    """HTTPS POST of a report (RFC 8460 5.2), certificate verified, the host resolved by the backend's resolver."""

    def __init__(
        self,
        reactor: Any,
        tlsFor: Callable[[str], Any],
        addresses: Callable[[str], Awaitable[list[str]]],
        timeout: float = POST_TIMEOUT,
    ) -> None:
        self.reactor = reactor
        self.tlsFor = tlsFor
        self.addresses = addresses
        self.timeout = timeout

    async def post(self, url: str, body: bytes) -> None:
        """@raise Exception: no address, no connection, or a status other than 2xx."""
        host = urlsplit(url).hostname or ""
        addresses = await self.addresses(host)
        if not addresses:
            raise OSError(f"{host} has no address")
        agent = Agent.usingEndpointFactory(self.reactor, PinnedEndpoints(self.reactor, self.tlsFor, addresses[0], None))
        d = agent.request(
            b"POST",
            url.encode("ascii"),
            Headers({b"Content-Type": [REPORT_TYPE.encode()]}),
            FileBodyProducer(io.BytesIO(body)),
        )
        d.addTimeout(self.timeout, self.reactor)
        response = await d
        await readBody(response, 64 * 1024)
        if not 200 <= response.code < 300:
            raise OSError(f"{url} answered {response.code}")


class QueueSubmitter:
    """
    Mail into the relay's own queue, as the scheduler queues a DSN: the
    service gives this to the delivery backends through their context
    (C{submit}) and attaches the store and scheduler once they exist.
    """

    def __init__(self) -> None:
        self.store: Any = None
        self.scheduler: Any = None
        self.clock: Any = None

    def attach(self, store: Any, scheduler: Any, clock: Any) -> None:
        self.store, self.scheduler, self.clock = store, scheduler, clock

    async def submit(self, sender: str, recipients: Sequence[str], data: bytes) -> str:
        """Queue C{data} for C{recipients}; the queue id once it is durable."""
        from twisted.internet.defer import maybeDeferred

        from relay.envelope import Envelope, Recipient

        if self.store is None:
            raise RuntimeError("the queue is not ready")
        incoming = self.store.begin()
        incoming.write(data)
        envelope = Envelope(
            incoming.queue_id,
            sender,
            [Recipient(r) for r in recipients],
            self.clock.seconds(),
            size=len(data),
            body="8BITMIME",
        )
        await maybeDeferred(incoming.commit, envelope)
        self.scheduler.enqueue(envelope)
        return envelope.queue_id


class TLSReports:
    """
    The counts of one mx backend, and the daily sending of its reports.

    C{txt(name)} looks up TXT records (the backend's resolver);
    C{submit(sender, recipients, data)} queues a mail (L{QueueSubmitter}),
    C{None} when there is no queue (then mailto: addresses are skipped);
    C{post} is a L{Poster}.
    """

    def __init__(
        self,
        clock: Any,
        directory: Path,
        organization: str,
        contact: str,
        txt: Callable[[str], Awaitable[Sequence[str]]],
        submit: Callable[[str, Sequence[str], bytes], Awaitable[Any]] | None = None,
        post: Any = None,
        blocking: Callable[..., Deferred[Any]] = lambda f, *a: succeed(f(*a)),
    ) -> None:
        self.clock = clock
        self.directory = Path(directory)
        self.path = self.directory / "counts.json"
        self.organization = organization
        self.contact = contact
        self.txt = txt
        self.submit = submit
        self.post = post
        self.blocking = blocking
        # day -> domain -> policy key -> {"success": n, "failures": {detail key: n}}
        self.days: dict[str, dict[str, dict[str, Any]]] = {}
        self._saveTimer: Any = None
        self._sendTimer: Any = None
        self._sending: Deferred[Any] | None = None
        self.sent: list[tuple[str, str, str]] = []  # (domain, day, rua) of each report sent, for tests and logs

    # -- counting -----------------------------------------------------------

    def _entry(self, domain: str, policy: PolicyRef) -> dict[str, Any] | None:
        day = self.days.setdefault(_day(self.clock.seconds()), {})
        if domain not in day and len(day) >= MAX_DOMAINS:
            return None
        entry = day.setdefault(domain, {}).setdefault(policy.key(), {"success": 0, "failures": {}})
        self._dirty()
        return entry

    def success(self, domain: str, policy: PolicyRef) -> None:
        entry = self._entry(domain, policy)
        if entry is not None:
            entry["success"] += 1

    def failure(
        self,
        domain: str,
        policy: PolicyRef,
        result: str,
        mxHost: str | None = None,
        receivingIP: str | None = None,
        detail: str = "",
    ) -> None:
        entry = self._entry(domain, policy)
        if entry is not None:
            key = json.dumps([result, mxHost or "", receivingIP or "", detail[:200]])
            entry["failures"][key] = entry["failures"].get(key, 0) + 1

    # -- persistence -----------------------------------------------------------

    def load(self) -> None:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            if isinstance(data, dict) and isinstance(data.get("days"), dict):
                self.days = data["days"]
        except FileNotFoundError:
            pass
        except (OSError, ValueError) as e:
            log.warn("TLS reports: ignoring {path}: {why}", path=str(self.path), why=str(e))

    def save(self) -> None:
        """Blocking: write the counts atomically (temporary file, fsync, rename, directory fsync)."""
        replaceFile(self.path, json.dumps({"days": self.days}).encode())

    def _dirty(self) -> None:
        if self._saveTimer is None or not self._saveTimer.active():
            self._saveTimer = self.clock.callLater(SAVE_DELAY, self._saveLater)

    def _saveLater(self) -> None:
        def failed(failure: Any) -> None:
            log.warn("TLS reports: cannot save {path}: {why}", path=str(self.path), why=failure.getErrorMessage())

        self.blocking(self.save).addErrback(failed)

    # -- sending ---------------------------------------------------------------

    def start(self) -> None:
        """Load the counts kept by the last run and schedule the first sending (finished days soon)."""
        self.load()
        self._schedule(SEND_AFTER_START if any(d < self._today() for d in self.days) else None)

    def stop(self) -> None:
        for timer in (self._saveTimer, self._sendTimer):
            if timer is not None and timer.active():
                timer.cancel()
        if self.days:
            try:
                self.save()
            except OSError as e:
                log.warn("TLS reports: cannot save {path}: {why}", path=str(self.path), why=str(e))

    def _today(self) -> str:
        return _day(self.clock.seconds())

    def _schedule(self, delay: float | None = None) -> None:
        if delay is None:
            now = self.clock.seconds()
            midnight = datetime.fromtimestamp(now, UTC).replace(hour=0, minute=0, second=0, microsecond=0)
            delay = (midnight + timedelta(days=1)).timestamp() - now + SEND_AFTER_MIDNIGHT
        self._sendTimer = self.clock.callLater(delay, self._sendDue)

    def _sendDue(self) -> None:
        self._sending = Deferred.fromCoroutine(self.sendFinished())
        self._sending.addErrback(lambda f: log.failure("TLS reports: sending failed", f))
        self._sending.addBoth(lambda _: self._schedule())

    async def sendFinished(self) -> int:
        """Send the report of every finished day; returns how many were sent."""
        today = self._today()
        oldest = _day(self.clock.seconds() - KEEP_DAYS * 86400)
        count = 0
        for day in sorted(d for d in self.days if d < today):
            domains = self.days[day]
            for domain in list(domains):
                keep = await self._sendOne(domain, day, domains[domain])
                if not keep or day < oldest:
                    del domains[domain]
                count += not keep
            if not domains:
                del self.days[day]
        self._dirty()
        return count

    async def _sendOne(self, domain: str, day: str, counts: dict[str, Any]) -> bool:
        """One domain's report for one day; True to keep it for another try (its TXT lookup failed)."""
        try:
            records = [uris for text in await self.txt(f"_smtp._tls.{domain}") if (uris := parseRecord(text))]
        except Exception as e:
            log.info("TLS reports: _smtp._tls.{domain} lookup failed ({why})", domain=domain, why=_why(e))
            return True
        if len(records) != 1:
            return False  # no report wanted (or an ambiguous record, RFC 8460 3)
        reportID = f"{day}.{uuid.uuid4().hex}@{self.organization}"
        report = buildReport(domain, day, counts, self.organization, self.contact, reportID)
        for rua in records[0]:
            try:
                await self._deliver(rua, domain, report)
            except Exception as e:
                log.warn("TLS reports: report for {domain} to {rua} failed: {why}", domain=domain, rua=rua, why=_why(e))
                continue
            self.sent.append((domain, day, rua))
            log.info("TLS reports: report {id} for {domain} sent to {rua}", id=reportID, domain=domain, rua=rua)
        return False

    async def _deliver(self, rua: str, domain: str, report: dict[str, Any]) -> None:
        scheme = rua.split(":", 1)[0].lower()
        if scheme == "mailto":
            if self.submit is None:
                raise RuntimeError("no queue to send mail through")
            to = unquote(rua[7:].split("?", 1)[0])
            data = reportMessage(report, domain, self.organization, self.contact, to, self.clock.seconds())
            await self.submit(self.contact, [to], data)
        elif scheme == "https":
            if self.post is None:
                raise RuntimeError("no HTTPS client")
            await self.post.post(rua, gzip.compress(json.dumps(report).encode()))
        else:
            raise ValueError(f"unsupported rua scheme {scheme!r}")
