"""
Other MTAs and client libraries as our clients: aiosmtplib, and a real Postfix
(the project's own bench/postfixpeer.py) relaying into the relay.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import ssl
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from certs import PKI
from relayproc import MINIMAL, Relay, freePort, tool, waitFor

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
POSTFIX_PEER = ROOT / "bench" / "postfixpeer.py"


def tlsRelay(tmp_path: Path) -> tuple[Relay, Path]:
    pki = PKI(tmp_path)
    cert, key = pki.issue("relay.test", "localhost")
    port = freePort()
    config = MINIMAL.format(state=tmp_path / "var", port=port, retry="1m", queue="").replace(
        f"endpoint = tcp:{port}:interface=127.0.0.1\n",
        f"endpoint = tcp:{port}:interface=127.0.0.1\ntls = starttls\n\n"
        f"[tls]\ncertificate = {cert}\nprivate_key = {key}\n",
    )
    return Relay(tmp_path, config=config, port=port), pki.ca_file


def test_aiosmtplib_starttls_and_pipelining(tmp_path):
    aiosmtplib = pytest.importorskip("aiosmtplib")
    relay, ca = tlsRelay(tmp_path)
    relay.start()
    try:

        async def send() -> None:
            context = ssl.create_default_context(cafile=str(ca))
            client = aiosmtplib.SMTP(
                hostname="127.0.0.1", port=relay.port, start_tls=True, tls_context=context, timeout=10
            )
            # the certificate names relay.test/localhost, not the address we dial
            context.check_hostname = False
            async with client:
                errors, _ = await client.sendmail(
                    "a@example.org", ["one@localhost", "two@localhost"], b"Subject: aio\r\n\r\nhello\r\n"
                )
                assert errors == {}

        asyncio.run(asyncio.wait_for(send(), 30))
        assert waitFor(lambda: relay.delivered("one@localhost") and relay.delivered("two@localhost"), 5)
        assert b"with ESMTPS id" in relay.delivered("one@localhost")[0].read_bytes()
    finally:
        relay.stop()


def test_postfix_relays_into_us(tmp_path):
    tool("postfix")
    if os.geteuid() != 0:
        pytest.skip("postfix-peer needs root") if os.environ.get("CI") != "true" else pytest.fail("needs root")
    relay = Relay(tmp_path)
    relay.start()
    # Postfix's own user must reach the instance: not under pytest's 0700 tree.
    home = Path(tempfile.mkdtemp(prefix="relay-postfix-"))
    peer = home / "postfix"
    listen = freePort()
    try:
        subprocess.run(
            [sys.executable, str(POSTFIX_PEER), "start", str(peer), str(listen), str(relay.port)],
            check=True,
            timeout=60,
            capture_output=True,
        )
        swaks = tool("swaks")
        for i in range(3):
            done = subprocess.run(
                [
                    swaks,
                    "--server",
                    f"127.0.0.1:{listen}",
                    "--to",
                    f"via{i}@localhost",
                    "--from",
                    "s@example.org",
                    "--timeout",
                    "10",
                ],
                capture_output=True,
                timeout=60,
            )
            assert done.returncode == 0, done.stdout
        assert waitFor(lambda: all(relay.delivered(f"via{i}@localhost") for i in range(3)), 30), (
            relay.logText() + (peer / "maillog").read_text(errors="replace") if (peer / "maillog").exists() else ""
        )
        content = relay.delivered("via0@localhost")[0].read_bytes()
        # Postfix's own Received, then ours on top: it spoke ESMTP to us
        assert content.index(b"by relay.test (relay) with ESMTP") < content.index(b"by peer.example.test")
    finally:
        subprocess.run([sys.executable, str(POSTFIX_PEER), "stop", str(peer)], timeout=60, capture_output=True)
        relay.stop()
        shutil.rmtree(home, ignore_errors=True)
