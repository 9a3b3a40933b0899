"""
Start and stop the real relay (twistd) for integration tests.

Every wait is bounded; every process started is stopped by its PID.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

TWISTD = str(Path(sys.executable).parent / "twistd")


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def waitFor(predicate, timeout: float = 10.0, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


def listening(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def tool(name: str) -> str:
    """The path of a Debian tool the test drives; missing is a failure under CI."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/usr/bin:/sbin")
    if found is None:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{name} is not installed (.ci/run installs it)")
        pytest.skip(f"{name} is not installed")
    return found


def children(pid: int, marker: bytes) -> list[int]:
    """The processes whose parent is C{pid} and whose command line holds C{marker}."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes()
        except OSError:
            continue
        parent = int(stat.rpartition(")")[2].split()[1])
        if parent == pid and marker in cmdline:
            found.append(int(entry.name))
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "Z"
    except OSError:
        return False


# The [relay] section of every test configuration.
RELAY_SECTION = """\
[relay]
hostname = relay.test
postmaster = postmaster@localhost
state_dir = {state}
"""

# The start of most test configurations: a listener on {port}, loopback may relay.
HEAD = (
    RELAY_SECTION
    + """\

[listener:smtp]
endpoint = tcp:{port}:interface=127.0.0.1

[policy]
relay_networks = 127.0.0.0/8
"""
)

# For tests that look at what would have left: localhost into its maildir,
# every other domain into a maildir under outbound/ in the relay's directory.
OUTBOUND_MAILDIR = """\
[delivery:local]
plugin = maildir

[delivery:out]
plugin = maildir
path = outbound/{{domain}}/{{local}}

[routes]
localhost = local
* = out
"""

MINIMAL = (
    HEAD
    + """\
local_domains = localhost example.test

[queue]
retry = {retry}
{queue}

[delivery:local]
plugin = maildir

[routes]
localhost = local
example.test = local
"""
)


# A relay that delivers localhost itself and relays everything else to a
# plain-text smart host on 127.0.0.1:{peer} (a scripted next hop).
SMARTHOST = (
    HEAD
    + """\
local_domains = localhost
{policy}

[queue]
{queue}

[delivery:local]
plugin = maildir

[delivery:upstream]
plugin = smarthost
host = 127.0.0.1
port = {peer}
tls = none

[routes]
localhost = local
* = upstream
"""
)


class Relay:
    """One twistd process running relay in its own directory."""

    def __init__(
        self,
        workdir: Path,
        config: str | None = None,
        port: int | None = None,
        retry: str = "1m",
        queue: str = "",
        env: dict[str, str] | None = None,
    ) -> None:
        self.env = {**os.environ, **(env or {})}
        self.workdir = workdir
        self.port = port or freePort()
        self.state = workdir / "var"
        self.config = workdir / "relay.ini"
        if config is None:
            config = MINIMAL.format(state=self.state, port=self.port, retry=retry, queue=queue)
        self.config.write_text(config)
        self.log = workdir / "twistd.log"
        self.proc: subprocess.Popen | None = None

    def command(self) -> list[str]:
        return [TWISTD, "-n", "--pidfile=", "--logfile", str(self.log), "relay", "--config", str(self.config)]

    def start(self, timeout: float = 20.0) -> Relay:
        self.proc = subprocess.Popen(
            self.command(),
            cwd=self.workdir,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
            env=self.env,
        )
        ok = waitFor(lambda: self.proc.poll() is not None or listening(self.port), timeout)
        if not ok or self.proc.poll() is not None:
            out, err = self.stop()
            raise AssertionError(f"relay did not start: {err!r} {out!r}\n{self.logText()}")
        return self

    def logText(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def kill9(self) -> None:
        assert self.proc is not None
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)
        self.proc.stdout.close()
        self.proc.stderr.close()
        self.proc = None

    def stop(self) -> tuple[bytes, bytes]:
        proc, self.proc = self.proc, None
        if proc is None:
            return b"", b""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            out, err = proc.communicate(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate(timeout=10)
        return out, err

    def maildir(self, address: str) -> Path:
        local, _, domain = address.rpartition("@")
        return self.state / "mail" / domain.lower() / local.lower()

    def delivered(self, address: str) -> list[Path]:
        new = self.maildir(address) / "new"
        return sorted(new.iterdir()) if new.is_dir() else []


def smarthostConfig(
    state: Path, port: int, peer: int, queue: str = "retry = 1s", policy: str = "", relayNetworks: str = ""
) -> str:
    """
    L{SMARTHOST} for one relay; C{queue} and C{policy}: the lines of those
    sections; C{relayNetworks}: who may relay instead of all of loopback.
    """
    text = SMARTHOST.format(state=state, port=port, peer=peer, queue=queue, policy=policy)
    if relayNetworks:
        text = text.replace("relay_networks = 127.0.0.0/8\n", f"relay_networks = {relayNetworks}\n", 1)
    return text


RELAYCTL = str(Path(sys.executable).parent / "relayctl")


def ctl(relay: Relay, *argv: str, timeout: float = 60.0) -> tuple[int, str, str]:
    """C{relayctl} on the relay's configuration: its exit status, output and errors."""
    proc = subprocess.run(
        [RELAYCTL, "--config", str(relay.config), *argv],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=relay.workdir,
    )
    return proc.returncode, proc.stdout, proc.stderr


def ctlJSON(relay: Relay, *argv: str, timeout: float = 60.0) -> Any:
    """C{relayctl ... --json}, which must succeed: what it printed, parsed."""
    status, out, err = ctl(relay, *argv, "--json", timeout=timeout)
    assert status == 0, err
    return json.loads(out)


def queueJSON(relay: Relay) -> list[dict]:
    """Every message of the relay's queue, as C{relayctl queue --json} lists them."""
    return ctlJSON(relay, "queue")


@pytest.fixture
def relay(tmp_path):
    instances: list[Relay] = []

    def make(**kwargs) -> Relay:
        r = Relay(tmp_path, **kwargs)
        instances.append(r)
        return r

    yield make
    for r in instances:
        r.stop()
