"""
A plugin installed the entry-point way (a dist-info on PYTHONPATH, as an
editable install leaves it) is used by the real twistd relay: the message
routed to it is handed to it, and relayctl plugins lists it with its source.
"""

from __future__ import annotations

import os
import smtplib
import subprocess
import sys
from pathlib import Path

import pytest
from entrypoints import MODULE, install
from relayproc import HEAD, waitFor

pytestmark = pytest.mark.integration

CONFIG = (
    HEAD
    + """\
local_domains = localhost

[queue]
retry = 1s

[delivery:filed]
plugin = epfiler

[routes]
* = filed
"""
)


def test_twistd_delivers_through_an_entry_point_plugin(relay, tmp_path):
    site = install(tmp_path / "site", "relay-epfiler", {"epfiler": "epfiler_int:filer"}, {"epfiler_int": MODULE})
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(site), os.environ.get("PYTHONPATH")]))}
    listing = subprocess.run(
        [str(Path(sys.executable).with_name("relayctl")), "plugins"],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert "[entry point epfiler = epfiler_int:filer (relay-epfiler 1.0)]" in listing.stdout, listing
    from relayproc import freePort

    port = freePort()
    r = relay(config=CONFIG.format(state=tmp_path / "var", port=port), port=port, env=env).start()
    with smtplib.SMTP("127.0.0.1", r.port, timeout=10) as client:
        client.sendmail("a@example.org", ["b@example.net"], b"Subject: ep\r\n\r\nthrough an entry point\r\n")
    filed = tmp_path / "var" / "ep-delivered"
    assert waitFor(lambda: filed.is_dir() and len(list(filed.iterdir())) == 1, 10), r.logText()[-3000:]
    (message,) = filed.iterdir()
    assert message.name.endswith("-b@example.net") and b"through an entry point" in message.read_bytes()
