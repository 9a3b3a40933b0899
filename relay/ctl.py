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
import json
import sys
import time
from pathlib import Path
from typing import Any

from relay import __version__
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
        # getpass falls back to stdin without a terminal and ends in EOFError
        # there (cron, a pipe, ssh without -t): say what to do instead.
        if not sys.stdin.isatty():
            raise CtlError("no terminal to ask the password on: give it on one line with --password-stdin", 2)
        try:
            password = getpass.getpass("Password: ")
            again = getpass.getpass("Again: ")
        except (EOFError, KeyboardInterrupt):
            raise CtlError("no password given") from None
        if again != password:
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
    """
    What discovery finds, twisted.plugin dropins and C{relay.plugins} entry
    points alike, each with its source and the keys it takes: a plugin that
    cannot be loaded or is provided twice is listed with why, since that is
    what the relay would refuse at start-up if configured to use it.
    """
    from relay import plugin
    from relay.errors import OptionError
    from relay.interfaces import IDeliveryBackendFactory, IQueueStoreFactory, IRecipientValidatorFactory

    kinds = (
        ("validators ([validator:NAME] plugin = ...)", IRecipientValidatorFactory),
        ("delivery backends ([delivery:NAME] plugin = ...)", IDeliveryBackendFactory),
        ("queue stores ([queue] store = ...)", IQueueStoreFactory),
    )
    for title, interface in kinds:
        print(title)
        byName: dict[str, list[plugin.Found]] = {}
        for found in plugin.discover(interface):
            byName.setdefault(found.name, []).append(found)
        for name, candidates in sorted(byName.items()):
            try:
                factory = plugin.resolve(name, candidates)
            except OptionError as e:
                print(f"  {name}: UNUSABLE: {e.message}")
                continue
            source = next(c.source for c in candidates if c.factory is factory)
            print(f"  {name}: {getattr(factory, 'description', '')}  [{source}]")
            for key, text in getattr(factory, "keys", {}).items():
                print(f"      {key} -- {text}")
    return 0


# -- talking to a running relay (relay.control) ------------------------------


def _controlEndpoint(args: argparse.Namespace) -> str:
    """The client endpoint of the control socket: --socket, else from the configuration."""
    from relay import control

    if args.socket:
        return control.clientEndpoint(f"unix:{args.socket}") if ":" not in args.socket else args.socket
    from relay.config import load
    from relay.errors import ConfigError

    try:
        settings = load(args.config)
    except ConfigError as e:
        raise CtlError(str(e), 2) from None
    except OSError as e:
        raise CtlError(f"{args.config}: cannot read: {e}", 2) from None
    server = settings.control_endpoint or control.defaultEndpoint(settings.state_dir)
    try:
        return control.clientEndpoint(server)
    except ValueError as e:
        raise CtlError(f"{args.config}: [control] endpoint: {e}", 2) from None


def _call(args: argparse.Namespace, command: Any, **arguments: Any) -> tuple[dict[str, Any], list[Any]]:
    """
    Send one command to the relay and wait for its answer: the response and
    the JSON lines streamed with it.  Runs the reactor once (relayctl sends
    one command per run).
    """
    from twisted.internet import reactor
    from twisted.internet.defer import CancelledError, ensureDeferred
    from twisted.internet.endpoints import clientFromString, connectProtocol
    from twisted.protocols.amp import RemoteAmpError

    from relay import control

    where = _controlEndpoint(args)
    outcome: dict[str, Any] = {}

    async def run() -> None:
        endpoint = clientFromString(reactor, where)
        try:
            protocol = await connectProtocol(endpoint, control.ControlClient())
        except Exception as e:
            raise CtlError(f"relay is not running (cannot reach {where}: {e.__class__.__name__})") from None
        try:
            response = await protocol.callRemote(command, **arguments)
        except RemoteAmpError as e:
            raise CtlError(
                e.description.decode("utf-8", "replace") if isinstance(e.description, bytes) else str(e.description)
            ) from None
        finally:
            protocol.transport.loseConnection()
        outcome["result"] = (response, protocol.lines())

    def finished(result: Any) -> None:
        outcome["failure"] = result if result is not None else None
        reactor.stop()

    d = ensureDeferred(run())
    d.addBoth(finished)
    reactor.callLater(args.timeout, lambda: d.cancel())
    reactor.run(installSignalHandlers=False)
    failure = outcome.get("failure")
    if failure is not None:
        if failure.check(CtlError):
            raise failure.value
        if failure.check(CancelledError):
            raise CtlError(f"no answer from the relay within {args.timeout:.0f}s")
        raise CtlError(f"talking to the relay failed: {failure.getErrorMessage()}")
    return outcome["result"]


def _age(arrived: str | None) -> str:
    if not arrived:
        return "-"
    from datetime import datetime

    seconds = max(0.0, time.time() - datetime.fromisoformat(arrived.replace("Z", "+00:00")).timestamp())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


def _printMessage(message: dict[str, Any]) -> None:
    held = " (held)" if message["held"] else ""
    print(f"{message['id']}{held}  {_age(message['arrived'])}  {message['size']}  <{message['sender']}>")
    for r in message["recipients"]:
        nextAttempt = f" next {r['next_attempt']}" if r["next_attempt"] else ""
        print(f"    <{r['address']}> {r['state']} attempts={r['attempts']}{nextAttempt}")
        if r["last_reply"]:
            print(f"        {r['last_reply']}")


def queue(args: argparse.Namespace) -> int:
    """Like mailq: every queued message, its recipients and where each stands."""
    from relay import control

    response, messages = _call(args, control.QueueList)
    if args.json:
        print(json.dumps(messages, indent=2))
        return 0
    if not messages:
        print("queue is empty")
        return 0
    for message in messages:
        _printMessage(message)
    print(f"-- {len(messages)} messages listed, {response['total']} in the queue")
    return 0


def show(args: argparse.Namespace) -> int:
    from relay import control

    _, found = _call(args, control.Show, id=args.id)
    message = found[0]
    if args.json:
        print(json.dumps(message, indent=2))
        return 0
    _printMessage(message)
    print()
    print(message.get("headers") or message.get("headers_error", ""), end="")
    return 0


def stats(args: argparse.Namespace) -> int:
    from relay import control

    response, _ = _call(args, control.Stats)
    found = json.loads(response["stats"])
    if args.json:
        print(json.dumps(found, indent=2))
        return 0
    print(f"messages: {found['messages']}")
    for key in ("messages_by_state", "recipients_by_state"):
        print(f"{key.replace('_', ' ')}: " + ", ".join(f"{k} {v}" for k, v in found[key].items()))
    oldest = found["oldest_age"]
    print(f"oldest: {'-' if oldest is None else f'{oldest:.0f}s'}")
    print(f"sessions open: {found['sessions_open']}")
    print(f"deliveries in flight: {found['deliveries_in_flight']}")
    return 0


def _onMessages(args: argparse.Namespace, command: Any, verb: str) -> int:
    response, _ = _call(args, command, ids=args.ids)
    for queueID in response["done"]:
        print(f"{verb} {queueID}")
    for error in response["errors"]:
        sys.stderr.write(f"relayctl: {error}\n")
    return 1 if response["errors"] else 0


def hold(args: argparse.Namespace) -> int:
    from relay import control

    return _onMessages(args, control.Hold, "held")


def release(args: argparse.Namespace) -> int:
    from relay import control

    return _onMessages(args, control.Release, "released")


def delete(args: argparse.Namespace) -> int:
    from relay import control

    return _onMessages(args, control.Delete, "deleted")


def bounce(args: argparse.Namespace) -> int:
    from relay import control

    return _onMessages(args, control.Bounce, "bounced")


def flush(args: argparse.Namespace) -> int:
    from relay import control

    if args.ids and args.domain:
        raise CtlError("give queue ids or --domain, not both", 2)
    arguments: dict[str, Any] = {"ids": args.ids}
    if args.domain:
        arguments["domain"] = args.domain
    response, _ = _call(args, control.Flush, **arguments)
    for error in response["errors"]:
        sys.stderr.write(f"relayctl: {error}\n")
    print(f"{response['count']} messages due now")
    return 1 if response["errors"] else 0


def reload(args: argparse.Namespace) -> int:
    from relay import control

    response, _ = _call(args, control.Reload)
    print(response["message"])
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="relayctl", description="Manage a relay.")
    parser.add_argument("--config", default="etc/relay.ini", help="configuration file (default: etc/relay.ini)")
    parser.add_argument("--socket", help="the relay's control socket (default: from --config)")
    parser.add_argument("--version", action="version", version=f"relayctl {__version__}")
    parser.add_argument("--timeout", type=float, default=300.0, help="seconds to wait for the relay's answer")
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
    listing = commands.add_parser("queue", help="list the queue, like mailq")
    listing.add_argument("--json", action="store_true", help="a JSON array of messages")
    listing.set_defaults(run=queue)
    one = commands.add_parser("show", help="one message, with its headers")
    one.add_argument("id")
    one.add_argument("--json", action="store_true")
    one.set_defaults(run=show)
    counts = commands.add_parser("stats", help="counts by state, oldest age, sessions, deliveries in flight")
    counts.add_argument("--json", action="store_true")
    counts.set_defaults(run=stats)
    due = commands.add_parser("flush", help="make messages due now (all, the ids given, or --domain)")
    due.add_argument("ids", nargs="*")
    due.add_argument("--domain", help="only messages with a recipient there (@domain: and its sub-domains)")
    due.set_defaults(run=flush)
    for name, run, text in (
        ("hold", hold, "keep messages queued, undelivered, until released"),
        ("release", release, "deliver held messages again, now"),
        ("delete", delete, "remove messages, with no report to anyone"),
        ("bounce", bounce, "fail messages now, with a report to the sender"),
    ):
        sub = commands.add_parser(name, help=text)
        sub.add_argument("ids", nargs="+")
        sub.set_defaults(run=run)
    again = commands.add_parser("reload", help="reload the configuration, as SIGHUP")
    again.set_defaults(run=reload)
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
