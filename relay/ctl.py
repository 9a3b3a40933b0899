"""
C{relayctl}: the operator's command.

Subcommands that change files work without a running relay (C{passwd});
those that talk to a running relay over the control socket come with the
control service.  Errors are one line on stderr: exit status 2 for a usage or
configuration problem, 1 for a failed operation; never a traceback.
"""

from __future__ import annotations

import argparse
import configparser
import getpass
import sys
from pathlib import Path

from relay.smtp.auth import hashPassword, readPasswords, writePasswords


class CtlError(Exception):
    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


def _passwordsPath(args: argparse.Namespace) -> Path:
    """
    The passwords file: --passwords, else [auth] passwords of the config.

    The config is read with plain configparser, not relay.config.load: load
    refuses an auth listener whose passwords file does not exist yet, and
    creating that file is exactly what C{passwd add} is for.
    """
    if args.passwords:
        return Path(args.passwords)
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";", "#"))
    try:
        with open(args.config, encoding="utf-8") as f:
            parser.read_file(f)
    except (OSError, configparser.Error) as e:
        raise CtlError(f"{args.config}: cannot read: {e}", 2) from None
    value = parser.get("auth", "passwords", fallback="").strip()
    if not value:
        raise CtlError(f"{args.config}: [auth] passwords is not set (or use --passwords FILE)", 2)
    return Path(value)


def _checkUser(user: str) -> None:
    if not user or ":" in user or any(c.isspace() or not c.isprintable() for c in user):
        raise CtlError(f"bad user name {user!r}: no ':', spaces or control characters", 2)


def _askPassword(fromStdin: bool) -> str:
    if fromStdin:
        password = sys.stdin.readline().rstrip("\r\n")
    else:
        password = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != password:
            raise CtlError("passwords do not match")
    if not password:
        raise CtlError("empty password refused")
    return password


def _read(path: Path) -> dict[str, str]:
    if not path.exists():
        return {}
    try:
        return readPasswords(path)
    except (OSError, UnicodeDecodeError) as e:
        raise CtlError(f"{path}: cannot read: {e}") from None


def passwd(args: argparse.Namespace) -> int:
    path = _passwordsPath(args)
    users = _read(path)
    if args.action == "list":
        for user in users:
            print(user)
        return 0
    _checkUser(args.user)
    if args.action == "add":
        password = _askPassword(args.password_stdin)
        existed = args.user in users
        users[args.user] = hashPassword(password)
        writePasswords(path, users)
        print(f"{'updated' if existed else 'added'} {args.user}")
        return 0
    if args.user not in users:
        raise CtlError(f"no user {args.user!r} in {path}")
    del users[args.user]
    writePasswords(path, users)
    print(f"removed {args.user}")
    return 0


def plugins(args: argparse.Namespace) -> int:
    """What twisted.plugin finds, built-in and third-party alike, with the keys each takes."""
    from relay import plugin
    from relay.interfaces import IDeliveryBackendFactory, IQueueStoreFactory, IRecipientValidatorFactory

    kinds = (
        ("validators ([validator:NAME] plugin = ...)", IRecipientValidatorFactory),
        ("delivery backends ([delivery:NAME] plugin = ...)", IDeliveryBackendFactory),
        ("queue stores ([queue] store = ...)", IQueueStoreFactory),
    )
    for title, interface in kinds:
        print(title)
        for name, factory in sorted(plugin.available(interface).items()):
            print(f"  {name}: {getattr(factory, 'description', '')}")
            for key, text in getattr(factory, "keys", {}).items():
                print(f"      {key} -- {text}")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relayctl", description="Manage a relay.")
    parser.add_argument("--config", default="etc/relay.ini", help="configuration file (default: etc/relay.ini)")
    commands = parser.add_subparsers(dest="command", required=True)
    pw = commands.add_parser("passwd", help="manage SMTP AUTH users ([auth] passwords)")
    pw.add_argument("--passwords", help="the passwords file (default: [auth] passwords of --config)")
    pw.set_defaults(run=passwd)
    actions = pw.add_subparsers(dest="action", required=True)
    add = actions.add_parser("add", help="add a user or change its password")
    add.add_argument("user")
    add.add_argument("--password-stdin", action="store_true", help="read the password from one line of stdin")
    remove = actions.add_parser("remove", help="remove a user")
    remove.add_argument("user")
    actions.add_parser("list", help="list users")
    found = commands.add_parser("plugins", help="list the plugins found, with their keys")
    found.set_defaults(run=plugins)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return args.run(args)
    except CtlError as e:
        sys.stderr.write(f"relayctl: {e}\n")
        return e.status
    except BrokenPipeError:
        return 0  # the reader (head, less) has seen enough
    except OSError as e:
        sys.stderr.write(f"relayctl: {e}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
