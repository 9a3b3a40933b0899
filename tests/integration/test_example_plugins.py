"""
The example plugins of examples/, installed from their own directories (make
test does it), found by twisted.plugin and used by a running relay: the HTTP
delivery backend against a twisted.web server, the SQLite validator against
a database file.
"""

from __future__ import annotations

import base64
import email
import email.policy
import json
import os
import smtplib
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from relayproc import HEAD, freePort, listening, waitFor

pytestmark = pytest.mark.integration

TESTS = Path(__file__).resolve().parents[1]
BODY = b"Subject: hook\r\nFrom: alice@localhost\r\n\r\nfor the web\r\n.dot\r\n"

CONFIG = (
    HEAD
    + """\
local_domains = localhost
validators = users

[validator:users]
plugin = sqlite
database = users.sqlite

[queue]
retry = 1s

[delivery:local]
plugin = maildir

[delivery:ok]
plugin = http
url = http://127.0.0.1:{web}/ok

[delivery:busy]
plugin = http
url = http://127.0.0.1:{web}/busy

[delivery:reject]
plugin = http
url = http://127.0.0.1:{web}/reject

[routes]
localhost = local
ok.test = ok
busy.test = busy
reject.test = reject
"""
)


def installed(module: str) -> None:
    try:
        __import__(module)
    except ImportError:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{module} is not installed (make test installs examples/)")
        pytest.skip(f"{module} is not installed: pip install ./examples/...")


@pytest.fixture
def web(tmp_path):
    port = freePort()
    received = tmp_path / "web"
    proc = subprocess.Popen([sys.executable, str(TESTS / "webpeer.py"), str(port), str(received)])
    try:
        assert waitFor(lambda: listening(port), 20)
        yield port, received
    finally:
        proc.terminate()
        proc.wait(timeout=15)


def test_example_plugins_in_a_running_relay(relay, tmp_path, web):
    installed("relay_http")
    installed("relay_sqlite")
    webPort, received = web
    state = tmp_path / "var"
    state.mkdir()
    with sqlite3.connect(state / "users.sqlite") as db:
        db.execute("CREATE TABLE mailboxes (address TEXT PRIMARY KEY)")
        db.execute("INSERT INTO mailboxes VALUES ('alice@localhost')")
    port = freePort()
    r = relay(config=CONFIG.format(state=state, port=port, web=webPort), port=port).start()
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.ehlo("client.test")
        client.mail("alice@localhost")
        assert client.rcpt("alice@localhost")[0] == 250  # in the database
        code, text = client.rcpt("bob@localhost")  # not in it
        assert (code, text[:5]) == (550, b"5.1.1")
        for address in ("x@ok.test", "y@busy.test", "z@reject.test"):
            assert client.rcpt(address)[0] == 250  # not local: the validator leaves them to the policy
        assert client.data(BODY)[0] == 250

    assert waitFor(lambda: received.exists() and len(list(received.iterdir())) == 1, 15), r.logText()[-3000:]
    [record] = [json.loads(p.read_text()) for p in received.iterdir()]
    assert record["recipients"] == ["x@ok.test"] and record["sender"] == "alice@localhost"
    assert base64.b64decode(record["body"]).endswith(BODY)

    def reports() -> list:
        return [
            email.message_from_bytes(p.read_bytes(), policy=email.policy.default)
            for p in r.delivered("alice@localhost")
            if b"delivery-status" in p.read_bytes()
        ]

    # HTTP 400: bounced; HTTP 503: retried (every second here), never bounced.
    assert waitFor(lambda: len(reports()) == 1, 15), r.logText()[-3000:]
    assert "z@reject.test" in reports()[0].as_string() and "y@busy.test" not in reports()[0].as_string()
    assert waitFor(lambda: r.logText().count("to=<y@busy.test>") >= 2, 15), r.logText()[-3000:]
    assert "HTTP 503" in r.logText()
