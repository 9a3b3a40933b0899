"""Maildir delivery: file layout, line endings, bad addresses, failures, the plugin."""

from __future__ import annotations

import errno
import io
import os
from pathlib import Path

import pytest
from deferred import result
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from twisted.internet.task import Clock

from relay.address import AddressError, parseMailbox, quoteLocal
from relay.delivery import maildir as maildirModule
from relay.delivery.maildir import MaildirBackend, copyToLF
from relay.envelope import DeliveryResult, Envelope, Recipient, Status
from relay.errors import OptionError
from relay.interfaces import IDeliveryBackend, IDeliveryBackendFactory
from relay.plugin import PluginContext, find, runInline

BODY = b"Received: from x\r\nSubject: hi\r\n\r\nline one\r\nlone\rcr\r\n\xff\xfe 8bit\r\n"


def makeBackend(
    stateDir: Path,
    template: str = "mail/{domain}/{local}",
    clock: Clock | None = None,
    hostname: str = "mx.example.test",
) -> MaildirBackend:
    if clock is None:
        clock = Clock()
        clock.advance(1_700_000_000.123456)
    return MaildirBackend(template, stateDir, hostname, runInline, clock)


def deliver(
    backend: MaildirBackend,
    addresses: list[str],
    data: bytes = BODY,
    sender: str = "s@example.org",
    chunked: int | None = None,
) -> list[DeliveryResult]:
    envelope = Envelope("q1", sender, [Recipient(a) for a in addresses], 0.0)
    opened = []

    def openData():
        f = ChunkedReader(data, chunked) if chunked else io.BytesIO(data)
        opened.append(f)
        return f

    results = result(backend.deliver(envelope, envelope.recipients, openData))
    assert all(f.closed for f in opened)
    return results


class ChunkedReader(io.BytesIO):
    """Never returns more than C{size} bytes per read, whatever is asked."""

    def __init__(self, data: bytes, size: int) -> None:
        super().__init__(data)
        self.size = size

    def read(self, n: int = -1) -> bytes:
        return super().read(self.size if n < 0 else min(n, self.size))


def delivered(maildir: Path) -> list[Path]:
    assert sorted(p.name for p in maildir.iterdir()) == ["cur", "new", "tmp"]
    assert list((maildir / "tmp").iterdir()) == []
    return sorted((maildir / "new").iterdir())


def test_two_recipients(tmp_path):
    backend = makeBackend(tmp_path)
    assert IDeliveryBackend.providedBy(backend)
    results = deliver(backend, ["Alice@Example.TEST", "bob@example.test"])
    assert [r.recipient for r in results] == ["Alice@Example.TEST", "bob@example.test"]
    assert all(r.delivered and r.status.code == 250 and r.status.enhanced == "2.0.0" for r in results)
    expected = b"line one\nlone\rcr\n\xff\xfe 8bit\n"
    for local, address, result_ in (
        ("alice", "Alice@Example.TEST", results[0]),
        ("bob", "bob@example.test", results[1]),
    ):
        maildir = tmp_path / "mail" / "example.test" / local
        (message,) = delivered(maildir)
        assert message.name in result_.status.text
        assert message.read_bytes() == (
            b"Return-Path: <s@example.org>\nDelivered-To: "
            + address.encode()
            + b"\nReceived: from x\nSubject: hi\n\n"
            + expected
        )
        assert message.stat().st_mode & 0o777 == 0o600
        for sub in ("tmp", "new", "cur"):
            assert (maildir / sub).stat().st_mode & 0o777 == 0o700


def test_null_sender_and_unique_name_format(tmp_path):
    backend = makeBackend(tmp_path, hostname="odd/host:name")
    deliver(backend, ["a@example.test"], sender="")
    (message,) = delivered(tmp_path / "mail" / "example.test" / "a")
    assert message.read_bytes().startswith(b"Return-Path: <>\nDelivered-To: a@example.test\n")
    secs, rest = message.name.split(".", 1)
    assert secs == "1700000000"
    assert rest.startswith(f"M123456P{os.getpid()}Q")
    assert message.name.endswith(".odd\\057host\\072name")


def test_absolute_template_and_domainless_template(tmp_path):
    backend = makeBackend(tmp_path / "state", template=str(tmp_path / "boxes" / "{local}"))
    deliver(backend, ["u@a.example", "v@b.example"])
    assert len(delivered(tmp_path / "boxes" / "u")) == 1
    assert len(delivered(tmp_path / "boxes" / "v")) == 1
    assert not (tmp_path / "state").exists()


@pytest.mark.parametrize(
    "address",
    [
        "@example.test",
        "alice@",
        "no-at-sign",
        "a/b@example.test",
        "../x@example.test",
        ".hidden@example.test",
        "a@.example.test",
        "a@ex/ample.test",
        "a\0b@example.test",
        "a@..",
    ],
)
def test_bad_mailbox_is_permanent(tmp_path, address):
    (outcome,) = deliver(makeBackend(tmp_path), [address])
    assert outcome.status == Status(550, "5.1.3", "Bad destination mailbox address")
    assert outcome.status.permanent
    assert not (tmp_path / "mail").exists()


def test_quoted_local_part_names_the_unquoted_mailbox(tmp_path):
    (outcome,) = deliver(makeBackend(tmp_path), ['"a@b"@example.test'])
    assert outcome.delivered
    assert len(delivered(tmp_path / "mail" / "example.test" / "a@b")) == 1
    (hidden,) = deliver(makeBackend(tmp_path), ['".hidden"@example.test'])
    assert hidden.status.enhanced == "5.1.3"


def test_path_escaping_the_template_prefix_is_refused(tmp_path):
    backend = makeBackend(tmp_path, template="mail/{local}/../../../outside")
    (outcome,) = deliver(backend, ["a@example.test"])
    assert outcome.status.enhanced == "5.1.3"


def test_good_and_bad_recipients_together(tmp_path):
    results = deliver(makeBackend(tmp_path), ["good@example.test", ".bad@example.test"])
    assert [r.status.code for r in results] == [250, 550]


def test_unwritable_maildir_is_temporary(tmp_path):
    (tmp_path / "mail").mkdir()
    (tmp_path / "mail" / "example.test").write_text("a file where a directory should be")
    (outcome,) = deliver(makeBackend(tmp_path), ["a@example.test"])
    assert outcome.status.code == 451
    assert outcome.status.enhanced == "4.3.0"
    assert outcome.status.temporary
    assert "Not a directory" in outcome.status.text


def test_file_instead_of_new_is_temporary_and_tmp_is_cleaned(tmp_path):
    maildir = tmp_path / "mail" / "example.test" / "a"
    for sub in ("tmp", "cur"):
        (maildir / sub).mkdir(parents=True)
    (maildir / "new").write_text("oops")
    (outcome,) = deliver(makeBackend(tmp_path), ["a@example.test"])
    assert outcome.status.temporary
    assert list((maildir / "tmp").iterdir()) == []


def test_full_disk_is_mailbox_full_and_tmp_is_cleaned(tmp_path, monkeypatch):
    def full(source, target, chunkSize=65536):
        target.write(source.read(10))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(maildirModule, "copyToLF", full)
    (outcome,) = deliver(makeBackend(tmp_path), ["a@example.test"])
    assert outcome.status == Status(452, "4.2.2", "Mailbox full")
    assert list((tmp_path / "mail" / "example.test" / "a" / "tmp").iterdir()) == []
    assert list((tmp_path / "mail" / "example.test" / "a" / "new").iterdir()) == []


def test_missing_queue_data_is_temporary(tmp_path):
    backend = makeBackend(tmp_path)
    envelope = Envelope("q1", "s@example.org", [Recipient("a@example.test")], 0.0)

    def openData():
        return open(tmp_path / "gone", "rb")

    (outcome,) = result(backend.deliver(envelope, envelope.recipients, openData))
    assert outcome.status.temporary
    assert list((tmp_path / "mail" / "example.test" / "a" / "tmp").iterdir()) == []


def test_unexpected_error_is_temporary_and_logged(tmp_path):
    backend = makeBackend(tmp_path)
    envelope = Envelope("q1", "s@example.org", [Recipient("a@example.test")], 0.0)

    def openData():
        raise RuntimeError("boom")

    (outcome,) = result(backend.deliver(envelope, envelope.recipients, openData))
    assert outcome.status.code == 451
    assert list((tmp_path / "mail" / "example.test" / "a" / "tmp").iterdir()) == []


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 64, 4096])
def test_crlf_across_chunk_boundaries(tmp_path, chunk):
    data = b"a\r\nb\r\r\nc\rd\r\n\r\n\r\re\r"
    (outcome,) = deliver(makeBackend(tmp_path), ["a@example.test"], data=data, chunked=chunk)
    assert outcome.delivered
    (message,) = delivered(tmp_path / "mail" / "example.test" / "a")
    body = message.read_bytes().split(b"\n", 2)[2]
    assert body == b"a\nb\r\nc\rd\n\n\r\re\r"


def test_copy_to_lf_matches_whole_replace():
    data = bytes(range(256)) * 50 + b"\r\n" * 100 + b"\r" * 33 + b"\n\r\n\r"
    for size in (1, 2, 5, 100, 8192):
        out = io.BytesIO()
        copyToLF(ChunkedReader(data, size), out, size)
        assert out.getvalue() == data.replace(b"\r\n", b"\n")


class CountingReader(io.BytesIO):
    """Records the largest read, to show the body is streamed."""

    largest = 0

    def read(self, n: int = -1) -> bytes:
        assert n is not None and n > 0, "the whole message was asked for at once"
        chunk = super().read(n)
        CountingReader.largest = max(CountingReader.largest, len(chunk))
        return chunk


def test_five_megabyte_body_streamed(tmp_path):
    line = b"0123456789" * 7 + b"\r\n"
    data = b"Subject: big\r\n\r\n" + line * (5 * 1024 * 1024 // len(line) + 1)
    backend = makeBackend(tmp_path)
    envelope = Envelope("q1", "s@example.org", [Recipient("big@example.test")], 0.0)
    (outcome,) = result(backend.deliver(envelope, envelope.recipients, lambda: CountingReader(data)))
    assert outcome.delivered
    assert 0 < CountingReader.largest <= 1024 * 1024
    (message,) = delivered(tmp_path / "mail" / "example.test" / "big")
    expected = b"Return-Path: <s@example.org>\nDelivered-To: big@example.test\n" + data.replace(b"\r\n", b"\n")
    assert message.stat().st_size == len(expected)
    assert message.read_bytes() == expected


def test_unique_names_over_1000_deliveries_in_one_second(tmp_path):
    clock = Clock()
    clock.advance(1_700_000_000)
    backend = makeBackend(tmp_path, clock=clock)
    names = {backend.uniqueName() for _ in range(1000)}
    assert len(names) == 1000
    for _ in range(50):
        assert deliver(backend, ["a@example.test"])[0].delivered
    assert len(delivered(tmp_path / "mail" / "example.test" / "a")) == 50
    # A second backend in the same process never repeats a name either.
    other = makeBackend(tmp_path, clock=clock)
    assert not {other.uniqueName() for _ in range(1000)} & names


def context(tmp_path: Path) -> PluginContext:
    clock = Clock()
    clock.advance(1_700_000_000)
    return PluginContext(reactor=clock, hostname="mx.example.test", postmaster="pm@example.test", state_dir=tmp_path)


def test_plugin_found_and_builds(tmp_path):
    factory = find("maildir", IDeliveryBackendFactory)
    assert factory.name == "maildir"
    assert set(factory.keys) == {"path"}
    backend = factory.build({}, context(tmp_path))
    assert IDeliveryBackend.providedBy(backend)
    assert deliver(backend, ["a@example.test"])[0].delivered
    assert len(delivered(tmp_path / "mail" / "example.test" / "a")) == 1
    backend = factory.build({"path": "boxes/{local}-at-{domain}"}, context(tmp_path))
    assert deliver(backend, ["b@example.test"])[0].delivered
    assert len(delivered(tmp_path / "boxes" / "b-at-example.test")) == 1


@pytest.mark.parametrize(
    "template",
    [
        "mail/{domain}",
        "mail/{user}/{local}",
        "mail/{local",
        "mail/{local!r}",
        "mail/{local:>9}",
        "mail/{0}{local}",
        "mail/{local.upper}",
        "mail/{}",
    ],
)
def test_plugin_refuses_bad_template(tmp_path, template):
    factory = find("maildir", IDeliveryBackendFactory)
    with pytest.raises(OptionError) as info:
        factory.build({"path": template}, context(tmp_path))
    assert info.value.key == "path"


def test_filesystem_plugin_found():
    from relay.interfaces import IQueueStoreFactory

    assert find("filesystem", IQueueStoreFactory).name == "filesystem"


# -- refused at RCPT: the optional IDeliveryBackend.refuses ----------------


@pytest.mark.parametrize(
    "address",
    [
        "a/b@localhost",
        '".hidden"@localhost',
        '"../.."@localhost',
        '"a\\/b"@localhost',  # a quoted pair: the mailbox a/b
        "A/B@LOCALHOST",
        '"."@localhost',
        '".."@localhost',
        ".x@localhost",
        '"a\\\\b/"@localhost',
        "a\x85b@localhost",  # a C1 control (NEL), admitted by SMTPUTF8's syntax
        "a\u202eb@localhost",  # right-to-left override: a name that reads as another
        "a\u2028b@localhost",  # a line separator
        "a\0b@localhost",
        "not an address",
        "@localhost",
    ],
)
def test_a_local_part_that_is_no_mailbox_path_is_refused_at_rcpt(tmp_path, address):
    backend = makeBackend(tmp_path)
    assert backend.refuses(address) == Status(550, "5.1.3", "Bad destination mailbox address")
    # the same answer delivery would give, and nothing is created either way
    (outcome,) = deliver(backend, [address])
    assert outcome.status == backend.refuses(address)
    assert not (tmp_path / "mail").exists()


@pytest.mark.parametrize(
    "address",
    ["alice@localhost", "Alice.Smith@LocalHost", '"john doe"@localhost', "jörg@localhost", '"a..b"@localhost'],
)
def test_a_good_mailbox_is_not_refused(tmp_path, address):
    backend = makeBackend(tmp_path)
    assert backend.refuses(address) is None
    (outcome,) = deliver(backend, [address])
    assert outcome.delivered


def test_a_path_component_too_long_for_the_file_system_is_refused(tmp_path):
    backend = makeBackend(tmp_path, template="mail/{local}-{local}-{local}-{local}-{local}")
    assert backend.refuses("a" * 50 + "@localhost") is None  # a name of 5 * 50 + 4 = 254 octets
    long = "a" * 51 + "@localhost"  # 259 octets: ENAMETOOLONG at every attempt
    assert backend.refuses(long) == Status(550, "5.1.3", "Bad destination mailbox address")
    (outcome,) = deliver(backend, [long])
    assert outcome.status.enhanced == "5.1.3"


def test_refusal_follows_the_template_root(tmp_path):
    backend = makeBackend(tmp_path, template="mail/{local}/../../../outside")
    assert backend.refuses("a@example.test") is not None
    assert makeBackend(tmp_path, template="boxes/{domain}-{local}").refuses("a@example.test") is None


_LOCAL_CHARS = st.sampled_from(list('aZ9.-_ /\\"@+\0\t\r\n\x7f\x85\u202e\u2028éß'))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(local=st.text(_LOCAL_CHARS, min_size=1, max_size=12))
def test_refuses_agrees_with_delivery_for_any_local_part(tmp_path_factory, local):
    """
    Whatever the local part: accepted at RCPT means a maildir of that one name
    inside the template's root that delivery succeeds in; refused means
    delivery would refuse it the same way, and creates nothing.
    """
    address = quoteLocal(local) + "@example.test"
    try:
        parseMailbox(address, utf8=True)
    except AddressError:
        return  # the server refuses it at RCPT already (501)
    state = tmp_path_factory.mktemp("state")
    backend = makeBackend(state)
    refusal = backend.refuses(address)
    (outcome,) = deliver(backend, [address], data=b"Subject: x\r\n\r\nbody\r\n")
    if refusal is None:
        assert outcome.delivered, (local, outcome)
        [box] = (state / "mail" / "example.test").iterdir()
        assert box.name == local.lower() and box.name.isprintable()
    else:
        assert outcome.status == refusal
        assert not (state / "mail").exists()
