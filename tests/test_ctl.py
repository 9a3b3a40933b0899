"""relayctl passwd: managing the AUTH users file."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import bcrypt
import pytest

from relay.ctl import main
from relay.smtp.auth import readPasswords


def run(monkeypatch, capsys, argv, stdin=""):
    monkeypatch.setattr(sys, "stdin", io.StringIO(stdin))
    status = main(argv)
    out, err = capsys.readouterr()
    return status, out, err


def test_add_update_list_remove(tmp_path, monkeypatch, capsys):
    pw = str(tmp_path / "passwords")
    assert run(monkeypatch, capsys, ["passwd", "--passwords", pw, "add", "alice", "--password-stdin"], "one\n")[:2] == (
        0,
        "added alice\n",
    )
    assert os.stat(pw).st_mode & 0o777 == 0o600
    assert run(monkeypatch, capsys, ["passwd", "--passwords", pw, "add", "bob", "--password-stdin"], "x\n")[0] == 0
    assert run(monkeypatch, capsys, ["passwd", "--passwords", pw, "add", "alice", "--password-stdin"], "two\n")[1] == (
        "updated alice\n"
    )
    assert bcrypt.checkpw(b"two", readPasswords(Path(pw))["alice"].encode())
    assert run(monkeypatch, capsys, ["passwd", "--passwords", pw, "list"])[1] == "alice\nbob\n"
    assert run(monkeypatch, capsys, ["passwd", "--passwords", pw, "remove", "bob"])[:2] == (0, "removed bob\n")
    status, out, err = run(monkeypatch, capsys, ["passwd", "--passwords", pw, "remove", "bob"])
    assert status == 1 and err.startswith("relayctl: no user 'bob'")


@pytest.mark.parametrize("user", ["a:b", "a b", "a\tb", ""])
def test_bad_user_names(tmp_path, monkeypatch, capsys, user):
    status, _, err = run(
        monkeypatch, capsys, ["passwd", "--passwords", str(tmp_path / "p"), "add", user, "--password-stdin"], "pw\n"
    )
    assert status == 2 and "bad user name" in err


def test_empty_password_refused(tmp_path, monkeypatch, capsys):
    status, _, err = run(
        monkeypatch, capsys, ["passwd", "--passwords", str(tmp_path / "p"), "add", "a", "--password-stdin"], "\n"
    )
    assert status == 1 and "empty password" in err
    assert not (tmp_path / "p").exists()


def test_file_from_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "relay.ini").write_text("[auth]\npasswords = pw ; users\n")
    assert run(monkeypatch, capsys, ["--config", "relay.ini", "passwd", "add", "al", "--password-stdin"], "x\n")[0] == 0
    assert readPasswords(tmp_path / "pw").keys() == {"al"}
    (tmp_path / "none.ini").write_text("[relay]\n")
    status, _, err = run(monkeypatch, capsys, ["--config", "none.ini", "passwd", "list"])
    assert status == 2 and "[auth] passwords is not set" in err
    status, _, err = run(monkeypatch, capsys, ["--config", "missing.ini", "passwd", "list"])
    assert status == 2 and "missing.ini: cannot read" in err


def test_installed_command(tmp_path):
    script = Path(sys.executable).parent / "relayctl"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "relay.ctl"]
    pw = tmp_path / "passwords"
    done = subprocess.run(
        [*command, "passwd", "--passwords", str(pw), "add", "alice", "--password-stdin"],
        input=b"secret\n",
        capture_output=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert bcrypt.checkpw(b"secret", readPasswords(pw)["alice"].encode())


def test_plugins_lists_every_kind_with_keys(capsys):
    from relay.ctl import main

    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    for name in ("static", "maildir", "smarthost", "mx", "filesystem"):
        assert f"  {name}: " in out
    assert "      nameservers -- " in out  # a key of mx, with its description
    assert out.index("validators") < out.index("delivery backends") < out.index("queue stores")


def test_add_without_a_terminal_is_one_line(tmp_path):
    """No terminal and no --password-stdin (a pipe, cron): one line and status 2, no EOFError traceback."""
    relayctl = str(Path(sys.executable).parent / "relayctl")
    pw = tmp_path / "passwords"
    proc = subprocess.run(
        [relayctl, "passwd", "--passwords", str(pw), "add", "bob"],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == "relayctl: no terminal to ask the password on: give it on one line with --password-stdin\n"
    assert not pw.exists()
