"""
Start-up, stop and reload of the real twistd relay, as a service manager and
an operator see them: one line and a non-zero exit when it cannot start,
--check, a graceful SIGTERM (under load too), SIGHUP reloading routes and
certificates without dropping a session, and a broken file refused.
"""

from __future__ import annotations

import signal
import smtplib
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
from certs import PKI
from relayproc import MINIMAL, TWISTD, Relay, freePort, listening, tool, waitFor

pytestmark = pytest.mark.integration

GRACE = 3.0


def config(tmp_path: Path, port: int, extra: str = "", relay: str = "") -> str:
    text = MINIMAL.format(state=tmp_path / "var", port=port, retry="1s", queue="")
    return text.replace("[relay]\n", f"[relay]\nshutdown_grace = {GRACE:g}s\n{relay}", 1) + extra


def run(*args: str, cwd: Path, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run([TWISTD, *args], cwd=cwd, capture_output=True, text=True, timeout=timeout)


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.strip()]


# -- start-up -------------------------------------------------------------------------


@pytest.fixture
def taken():
    """A port bound and listening on 127.0.0.1 by someone else."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_a_busy_listener_port_stops_start_up_with_one_line(tmp_path, taken):
    (tmp_path / "relay.ini").write_text(config(tmp_path, taken))
    result = run("-n", "--pidfile=", "--logfile", "twistd.log", "relay", "--config", "relay.ini", cwd=tmp_path)
    print("foreground:", result.returncode, result.stderr)
    assert result.returncode == 1
    assert lines(result.stderr) == [f"relay: listener:smtp: cannot listen on 127.0.0.1:{taken}: Address already in use"]


def test_a_busy_listener_port_stops_a_daemon_too(tmp_path, taken):
    (tmp_path / "relay.ini").write_text(config(tmp_path, taken))
    pidfile = tmp_path / "twistd.pid"
    result = run(f"--pidfile={pidfile}", "--logfile", "twistd.log", "relay", "--config", "relay.ini", cwd=tmp_path)
    print("daemon:", result.returncode, result.stderr)
    assert result.returncode == 1
    assert f"listener:smtp: cannot listen on 127.0.0.1:{taken}: Address already in use" in result.stderr
    assert "Traceback" not in result.stderr and not pidfile.exists()


def test_a_busy_metrics_port_stops_start_up_with_one_line(tmp_path, taken):
    port = freePort()
    (tmp_path / "relay.ini").write_text(
        config(tmp_path, port, f"\n[metrics]\nendpoint = tcp:{taken}:interface=127.0.0.1\n")
    )
    result = run("-n", "--pidfile=", "--logfile", "twistd.log", "relay", "--config", "relay.ini", cwd=tmp_path)
    assert result.returncode == 1
    assert lines(result.stderr) == [f"relay: metrics: cannot listen on 127.0.0.1:{taken}: Address already in use"]
    assert not listening(port)


def test_an_unusable_state_dir_is_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    text = config(tmp_path, freePort()).replace(f"state_dir = {tmp_path / 'var'}", f"state_dir = {tmp_path / 'file'}")
    (tmp_path / "relay.ini").write_text(text)
    result = run("-n", "--pidfile=", "relay", "--config", "relay.ini", cwd=tmp_path)
    assert result.returncode == 2
    assert lines(result.stderr) == [
        f"relay: relay.ini: [relay] state_dir: cannot use {tmp_path / 'file'}: File exists"
    ] or (len(lines(result.stderr)) == 1 and "[relay] state_dir: cannot use" in result.stderr)


def test_check_validates_and_exits(tmp_path):
    port = freePort()
    (tmp_path / "relay.ini").write_text(config(tmp_path, port))
    good = run("-n", "--pidfile=", "relay", "--check", "--config", "relay.ini", cwd=tmp_path)
    assert good.returncode == 0 and lines(good.stdout) == ["relay: relay.ini is valid"] and not listening(port)
    (tmp_path / "bad.ini").write_text(
        config(tmp_path, port, relay="shutdown_grace = soon\n").replace("shutdown_grace = 3s\n", "")
    )
    bad = run("-n", "--pidfile=", "relay", "--check", "--config", "bad.ini", cwd=tmp_path)
    assert bad.returncode == 2
    assert len(lines(bad.stderr)) == 1 and lines(bad.stderr)[0].startswith("relay: bad.ini: [relay] shutdown_grace")


# -- graceful stop --------------------------------------------------------------------


def test_sigterm_lets_a_transaction_finish_and_gives_421_to_the_rest(tmp_path, relay):
    r: Relay = relay(config=config(tmp_path, port := freePort()), port=port).start()
    finishing = smtplib.SMTP("127.0.0.1", port, timeout=10)
    finishing.ehlo()
    finishing.mail("a@localhost")
    finishing.rcpt("done@localhost")
    stuck = smtplib.SMTP("127.0.0.1", port, timeout=10)
    stuck.ehlo()
    stuck.mail("a@localhost")
    stuck.rcpt("cut@localhost")
    idle = smtplib.SMTP("127.0.0.1", port, timeout=10)
    idle.ehlo()
    started = time.monotonic()
    r.proc.send_signal(signal.SIGTERM)
    assert idle.getreply() == (421, b"4.3.2 Error: service shutting down, try again later")
    assert waitFor(lambda: not listening(port), 2)
    time.sleep(0.5)
    r.proc.send_signal(signal.SIGTERM)  # a second one: ignored quietly
    assert finishing.data(b"Subject: finish\r\n\r\nhi\r\n")[0] == 250
    assert finishing.getreply()[0] == 421
    stuck.sock.sendall(b"DATA\r\n")
    assert stuck.getreply()[0] == 354
    stuck.sock.sendall(b"Subject: never ends\r\n\r\n")
    assert stuck.getreply()[0] == 421  # after the grace, without a 250
    proc = r.proc
    proc.wait(timeout=GRACE + 10)
    elapsed = time.monotonic() - started
    print(f"stopped {elapsed:.2f}s after SIGTERM (grace {GRACE}s)")
    assert elapsed < GRACE + 5
    r.stop()
    log = r.logText()
    assert "Traceback" not in log and "ReactorNotRunning" not in log
    for c in (finishing, stuck, idle):
        c.close()
    # The finished message was kept; the cut one was not.
    r.start()
    assert waitFor(lambda: len(r.delivered("done@localhost")) == 1, 15)
    assert r.delivered("cut@localhost") == []


def _sender(port: int, first: int, count: int, acknowledged: list[int], stop: threading.Event) -> None:
    for n in range(first, first + count):
        if stop.is_set():
            return
        try:
            client = smtplib.SMTP("127.0.0.1", port, timeout=15)
            client.sendmail("load@localhost", ["tracked@localhost"], f"X-Track: {n}\r\n\r\nmessage {n}\r\n")
        except (OSError, smtplib.SMTPException):
            return  # 421 or refused: the relay is stopping; that message was not acknowledged
        acknowledged.append(n)  # the 250 came; a 421 to the QUIT after it changes nothing
        try:
            client.quit()
        except (OSError, smtplib.SMTPException):
            client.close()


def test_sigterm_under_load_loses_nothing_and_delivers_nothing_twice(tmp_path, relay):
    port = freePort()
    r: Relay = relay(config=config(tmp_path, port), port=port).start()
    source = subprocess.Popen(
        [
            tool("smtp-source"),
            "-s",
            "10",
            "-m",
            "100000",
            "-l",
            "2048",
            "-f",
            "load@localhost",
            "-t",
            "bulk@localhost",
            f"127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    acknowledged: list[int] = []
    stop = threading.Event()
    threads = [
        threading.Thread(target=_sender, args=(port, k * 100_000, 100_000, acknowledged, stop)) for k in range(4)
    ]
    try:
        for t in threads:
            t.start()
        time.sleep(2.0)
        started = time.monotonic()
        r.proc.send_signal(signal.SIGTERM)
        r.proc.wait(timeout=GRACE + 10)
        elapsed = time.monotonic() - started
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        source.kill()
        source.wait(10)
    r.stop()
    print(f"under load: {len(acknowledged)} tracked messages acknowledged; stopped {elapsed:.2f}s after SIGTERM")
    assert elapsed < GRACE + 5
    assert acknowledged and "Traceback" not in r.logText()
    r.start()

    def tracked() -> list[int]:
        found = []
        for path in r.delivered("tracked@localhost"):
            head = path.read_bytes().split(b"\n\n", 1)[0]
            for line in head.splitlines():
                if line.startswith(b"X-Track: "):
                    found.append(int(line.split()[1]))
        return found

    assert waitFor(lambda: set(acknowledged) <= set(tracked()), 60), sorted(set(acknowledged) - set(tracked()))[:10]
    time.sleep(1)
    found = tracked()
    duplicates = sorted({n for n in found if found.count(n) > 1})
    print(
        f"after restart: {len(found)} tracked delivered, {len(set(acknowledged))} acknowledged, duplicates {duplicates}"
    )
    assert not duplicates


# -- reload ---------------------------------------------------------------------------


TLS = """
[tls]
certificate = {cert}
private_key = {key}
"""


def _peerCertificate(port: int, ca: Path) -> bytes:
    context = ssl.create_default_context(cafile=str(ca))
    context.check_hostname = False
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.starttls(context=context)
        return client.sock.getpeercert(binary_form=True)


def test_sighup_swaps_a_route_and_the_certificate_while_a_session_stays_open(tmp_path, relay):
    pki = PKI(tmp_path / "pki")
    first = pki.issue("relay.test", name="first")
    second = pki.issue("relay.test", name="second")
    port = freePort()

    def write(cert: tuple[Path, Path], template: str) -> str:
        text = config(tmp_path, port, TLS.format(cert=cert[0], key=cert[1]))
        text = text.replace("endpoint = tcp:", "tls = starttls\nendpoint = tcp:", 1)
        return text.replace("plugin = maildir\n", f"plugin = maildir\npath = {template}\n", 1)

    r: Relay = relay(config=write(first, "mail/{domain}/{local}"), port=port).start()
    before = _peerCertificate(port, pki.ca_file)
    assert before == ssl.PEM_cert_to_DER_cert(
        first[0].read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    )
    held = smtplib.SMTP("127.0.0.1", port, timeout=10)
    held.ehlo()
    held.mail("a@localhost")
    held.rcpt("old@localhost")
    r.config.write_text(write(second, "reloaded/{domain}/{local}"))
    r.proc.send_signal(signal.SIGHUP)
    assert waitFor(lambda: "reloaded " in r.logText(), 10), r.logText()
    assert r.proc.poll() is None
    after = _peerCertificate(port, pki.ca_file)
    assert after != before
    assert after == ssl.PEM_cert_to_DER_cert(
        second[0].read_text().split("-----END CERTIFICATE-----")[0] + "-----END CERTIFICATE-----\n"
    )
    # The session opened before the reload goes on.
    assert held.data(b"Subject: held\r\n\r\nhi\r\n")[0] == 250
    held.quit()
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("a@localhost", ["new@localhost"], b"Subject: new\r\n\r\nhi\r\n")
    # Deliveries after the reload use the new route's template.
    assert waitFor(lambda: list((r.state / "reloaded" / "localhost" / "new" / "new").glob("*")), 15)
    assert waitFor(lambda: list((r.state / "reloaded" / "localhost" / "old" / "new").glob("*")), 15)


def test_sighup_with_a_broken_file_keeps_the_running_configuration(tmp_path, relay):
    port = freePort()
    r: Relay = relay(config=config(tmp_path, port), port=port).start()
    good = r.config.read_text()
    r.config.write_text(good.replace("[queue]\n", "[queue]\nconcurrency = many\n"))
    r.proc.send_signal(signal.SIGHUP)
    assert waitFor(lambda: "reload refused" in r.logText(), 10)
    refusal = [line for line in r.logText().splitlines() if "reload refused" in line]
    print(refusal)
    assert f"{r.config}: [queue] concurrency" in refusal[0] and "Traceback" not in r.logText()
    assert r.proc.poll() is None
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as client:
        client.sendmail("a@localhost", ["still@localhost"], b"Subject: x\r\n\r\nhi\r\n")
    assert waitFor(lambda: r.delivered("still@localhost"), 15)
    # A change that needs a restart is said so, and the rest is reloaded.
    r.config.write_text(
        good.replace("interface=127.0.0.1", "interface=127.0.0.1:backlog=7").replace("[queue]\n", "[queue]\n")
    )
    r.proc.send_signal(signal.SIGHUP)
    assert waitFor(lambda: "it takes a restart" in r.logText(), 10)
    assert r.proc.poll() is None and listening(port)


def test_relayctl_version():
    import sys

    from relay import __version__

    relayctl = str(Path(sys.executable).parent / "relayctl")
    result = subprocess.run([relayctl, "--version"], capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout.strip() == f"relayctl {__version__}"
