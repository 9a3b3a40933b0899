"""
docs/deploy.rst: the files it tells an operator to copy are the files that
run.  Each ``.. code-block::`` with a ``:name:`` is read from the document
itself; only what cannot be the same on a test machine is replaced (paths,
addresses, ports), and the queue holds the mail so that nothing leaves
127.0.0.1.
"""

from __future__ import annotations

import re
import shlex
import smtplib
import ssl
from pathlib import Path

import pytest
from certs import PKI
from haproxy import HAProxy
from relayproc import Relay, ctlJSON, freePort, tool, waitFor

from relay.config import parse_duration
from relay.smtp.auth import hashPassword

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "deploy.rst"


def blocks(path: Path = DOC) -> dict[str, str]:
    """The named code blocks of an reST document: name to text, indentation removed."""
    found: dict[str, str] = {}
    lines = path.read_text().splitlines()
    i = 0
    while i < len(lines):
        if lines[i].startswith(".. code-block::"):
            name = None
            i += 1
            while i < len(lines) and lines[i].strip().startswith(":"):
                option, _, value = lines[i].strip()[1:].partition(":")
                if option == "name":
                    name = value.strip()
                i += 1
            body = []
            while i < len(lines) and (not lines[i].strip() or lines[i].startswith("   ")):
                body.append(lines[i][3:])
                i += 1
            if name:
                found[name] = "\n".join(body).strip() + "\n"
            continue
        i += 1
    return found


def test_the_document_names_its_files():
    assert {"smarthost.ini", "relay.service", "haproxy.cfg", "cluster-node.ini"} <= set(blocks())


def test_the_unit_runs_what_make_run_runs_and_outlasts_the_grace():
    unit = blocks()["relay.service"]
    execStart = re.search(r"^ExecStart=(.*)$", unit, re.M).group(1)
    makefile = (ROOT / "Makefile").read_text()
    run = re.search(r"^run:.*\n\t(.*)$", makefile, re.M).group(1)
    # The same arguments after the program, whatever the install path and config file.
    assert shlex.split(execStart)[1:-1] == shlex.split(run)[1:-1]
    assert shlex.split(execStart)[0].endswith("/.venv/bin/twistd")
    grace = re.search(r"^shutdown_grace = (\S+)$", blocks()["smarthost.ini"], re.M).group(1)
    stop = re.search(r"^TimeoutStopSec=(\d+)$", unit, re.M).group(1)
    assert int(stop) > parse_duration(grace) + 10  # systemd's SIGKILL must not cut the grace short


def smarthostForTest(tmp_path: Path) -> tuple[str, dict[str, int], PKI]:
    text = blocks()["smarthost.ini"]
    pki = PKI(tmp_path / "pki")
    cert, key = pki.issue("relay.example.org", "localhost", "127.0.0.1")
    passwords = tmp_path / "passwords"
    passwords.write_text(f"alice:{hashPassword('correct horse', rounds=4)}\n")
    ports = {name: freePort() for name in ("25", "587", "465", "9125")}
    replacements = {
        "/var/lib/relay": str(tmp_path / "var"),
        "/etc/relay/tls/fullchain.pem": str(cert),
        "/etc/relay/tls/privkey.pem": str(key),
        "/etc/relay/passwords": str(passwords),
        "tcp:25:interface=10.1.2.3": f"tcp:{ports['25']}:interface=127.0.0.1",
        "tcp:587\n": f"tcp:{ports['587']}:interface=127.0.0.1\n",
        "tcp:465\n": f"tcp:{ports['465']}:interface=127.0.0.1\n",
        "tcp:9125:": f"tcp:{ports['9125']}:",
    }
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    # Held: accepted and queued, never looked up or sent (no traffic beyond 127.0.0.1).
    text = text.replace("[queue]\n", "[queue]\nhold = yes\n", 1)
    return text, ports, pki


def test_the_smart_host_configuration_runs_as_documented(tmp_path):
    config, ports, pki = smarthostForTest(tmp_path)
    relay = Relay(tmp_path, config=config, port=ports["587"])
    relay.start()
    try:
        context = ssl.create_default_context(cafile=str(pki.ca_file))
        message = "From: a@example.org\r\nTo: b@example.net\r\nSubject: deploy\r\n\r\nhello\r\n"

        # An internal application: port 25, no password, from relay_networks.
        with smtplib.SMTP("127.0.0.1", ports["25"], timeout=10) as s:
            s.ehlo("app.internal")
            assert s.has_extn("starttls") and not s.has_extn("auth")
            assert s.sendmail("app@example.org", ["b@example.net"], message) == {}

        # Submission: AUTH only after STARTTLS, and required.
        with smtplib.SMTP("127.0.0.1", ports["587"], timeout=10) as s:
            s.ehlo("laptop")
            assert s.has_extn("starttls") and not s.has_extn("auth")
            s.starttls(context=context)
            s.ehlo("laptop")
            assert "PLAIN" in s.esmtp_features["auth"].upper()
            code, _ = s.mail("alice@example.org")
            assert code == 530  # no AUTH, no mail on a submission port
            s.rset()
            s.login("alice", "correct horse")
            assert s.sendmail("alice@example.org", ["b@example.net"], message) == {}

        # Submissions: TLS from the first octet.
        with smtplib.SMTP_SSL("127.0.0.1", ports["465"], timeout=10, context=context) as s:
            s.ehlo("phone")
            s.login("alice", "correct horse")
            assert s.sendmail("alice@example.org", ["c@example.net"], message) == {}

        assert waitFor(lambda: relay.logText().count("event=accepted") == 3, 10)
    finally:
        relay.stop()


CLIENT = "127.0.0.2"  # stands for the internal network; HAProxy connects from 127.0.0.1


def replaced(text: str, replacements: dict[str, str]) -> str:
    for old, new in replacements.items():
        assert old in text, old
        text = text.replace(old, new)
    return text


@pytest.mark.integration
def test_the_cluster_runs_as_documented(tmp_path, pgcluster):
    """
    Two relays from cluster-node.ini on one database, behind HAProxy from
    haproxy.cfg: a client's mail through the balancer is accepted by both,
    queued once in the shared queue, and relayctl on either relay shows all
    of it; relay_networks sees the client through the PROXY header.
    """
    tool("haproxy")
    docs = blocks()
    pki = PKI(tmp_path / "pki")
    cert, key = pki.issue("relay.example.org", "127.0.0.1")
    passwords = tmp_path / "passwords"
    passwords.write_text(f"alice:{hashPassword('correct horse', rounds=4)}\n")
    dsnFile = tmp_path / "dsn"
    dsnFile.write_text(pgcluster.createdb("deploy") + "\n")
    front = {port: freePort() for port in ("25", "587", "465")}
    nodes = {name: {port: freePort() for port in ("2525", "2587", "2465")} for name in ("relay1", "relay2")}

    relays = []
    for name, ports in nodes.items():
        workdir = tmp_path / name
        workdir.mkdir()
        config = replaced(
            docs["cluster-node.ini"],
            {
                "/var/lib/relay": str(workdir / "var"),
                "/etc/relay/tls/fullchain.pem": str(cert),
                "/etc/relay/tls/privkey.pem": str(key),
                "/etc/relay/passwords": str(passwords),
                "/etc/relay/dsn": str(dsnFile),
                "node = relay1": f"node = {name}",
                "relay_networks = 10.0.0.0/8": f"relay_networks = {CLIENT}/32",
                **{f"tcp:{p}:interface=10.1.2.11": f"tcp:{ports[p]}:interface=127.0.0.1" for p in ports},
            },
        )
        # Held: queued in the shared queue, never looked up or sent (no traffic beyond 127.0.0.1).
        config = config.replace("[queue]\n", "[queue]\nhold = yes\n", 1)
        relays.append(Relay(workdir, config=config, port=ports["2525"]))

    balancer = {f"bind :{p}": f"bind 127.0.0.1:{front[p]}" for p in front}
    balancer["maxconn 20000"] = "maxconn 200"
    for address, name in (("10.1.2.11", "relay1"), ("10.1.2.12", "relay2")):
        for port in ("2525", "2587", "2465"):
            balancer[f"{address}:{port}"] = f"127.0.0.1:{nodes[name][port]}"
    haproxyConfig = tmp_path / "haproxy.cfg"
    haproxyConfig.write_text(replaced(docs["haproxy.cfg"], balancer))
    haproxy = HAProxy(haproxyConfig, list(front.values()))

    try:
        for relay in relays:
            relay.start(timeout=60)
        haproxy.start()
        context = ssl.create_default_context(cafile=str(pki.ca_file))
        message = "From: a@example.org\r\nSubject: cluster\r\n\r\nhello\r\n"
        # leastconn with one connection at a time alternates: both relays take mail.
        for n in range(4):
            with smtplib.SMTP("127.0.0.1", front["25"], source_address=(CLIENT, 0), timeout=20) as s:
                s.ehlo("app.internal")
                assert s.sendmail("app@example.org", [f"b{n}@example.net"], message) == {}
        with smtplib.SMTP_SSL("127.0.0.1", front["465"], timeout=20, context=context) as s:
            s.ehlo("phone")  # from 127.0.0.1, outside relay_networks: AUTH is what lets it relay
            s.login("alice", "correct horse")
            assert s.sendmail("alice@example.org", ["c@example.net"], message) == {}
        with smtplib.SMTP("127.0.0.1", front["25"], timeout=20) as s:
            s.ehlo("stranger")
            code, _ = s.rcpt("x@example.net") if s.mail("s@example.org")[0] == 250 else (0, b"")
            assert code == 550  # 127.0.0.1 is not in relay_networks: the header's address decides

        for relay in relays:
            assert waitFor(lambda relay=relay: "event=accepted" in relay.logText(), 10), relay.logText()
            assert "client=127.0.0.2" in relay.logText()
        for relay in relays:
            stats = ctlJSON(relay, "stats", timeout=30)
            print(f"relayctl stats on {relay.workdir.name}: {stats}")
            assert stats["messages"] == 5  # the shared queue, whichever relay took each message
            assert len(ctlJSON(relay, "queue", timeout=30)) == 5
    finally:
        haproxy.stop()
        for relay in relays:
            relay.stop()
