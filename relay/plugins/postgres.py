"""
The shared queue store on PostgreSQL, registered like any third-party one.

psycopg is an optional dependency (C{pip install 'relay[postgres]'}): it is
imported only when the configuration names this store, so discovery and the
filesystem store never need it.
"""

from __future__ import annotations

import socket
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from relay.errors import OptionError
from relay.interfaces import IQueueStoreFactory


def _dsn(options: Mapping[str, Any]) -> tuple[str, str]:
    """The connection string and the key it came from: C{dsn}, or C{dsn_file} (keeps a password out of the ini)."""
    dsn = options.get("dsn", "").strip()
    dsnFile = options.get("dsn_file", "").strip()
    if dsn and dsnFile:
        raise OptionError("dsn_file", "give dsn or dsn_file, not both")
    if dsnFile:
        try:
            text = Path(dsnFile).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise OptionError("dsn_file", f"cannot read {dsnFile!r}: {getattr(e, 'strerror', None) or e}") from None
        if not text:
            raise OptionError("dsn_file", f"{dsnFile!r} is empty")
        return text, "dsn_file"
    if not dsn:
        raise OptionError("dsn", "the postgres store needs dsn = postgresql://... (or dsn_file = PATH)")
    return dsn, "dsn"


@implementer(IPlugin, IQueueStoreFactory)
class PostgresQueueStoreFactory:
    name = "postgres"
    description = "Queue shared by a cluster of relays in PostgreSQL: committed before 250, leases per node"
    keys = {
        "path": "local spool of message data being delivered (relative paths are under state_dir)",
        "dsn": "postgresql://user@host:port/database (libpq connection string)",
        "dsn_file": "a file holding the dsn alone (keeps the password out of the ini); instead of dsn",
        "node": "this relay's name in the cluster, unique per relay (default: the host name)",
        "lease": "how long a node's claim on a message lasts unless renewed (default 5m)",
    }

    def build(self, options: Mapping[str, Any], context: Any) -> Any:
        from relay.config import parse_duration

        dsn, dsnKey = _dsn(options)
        node = options.get("node", "").strip() or socket.gethostname()
        if len(node) > 200 or not node.isprintable() or any(c.isspace() for c in node):
            raise OptionError("node", f"must be a name without spaces, not {node!r}")
        try:
            lease = parse_duration(options.get("lease", "5m").strip())
        except ValueError as e:
            raise OptionError("lease", str(e)) from None
        if not 1 <= lease <= 86400:
            raise OptionError("lease", "must be between 1s and 1d")
        try:
            import psycopg
            from psycopg_pool import ConnectionPool
        except ImportError:
            raise OptionError(
                "store", "the postgres store needs psycopg and psycopg_pool: pip install 'relay[postgres]'"
            ) from None
        try:
            psycopg.conninfo.conninfo_to_dict(dsn)
        except psycopg.ProgrammingError as e:
            raise OptionError(dsnKey, f"not a PostgreSQL connection string: {e}") from None

        from relay.queue.postgres import PostgresQueueStore

        def configure(conn: Any) -> None:
            # Durability is PostgreSQL's fsync at COMMIT: never the server's default, whatever it is.
            conn.execute("SET synchronous_commit = on")
            conn.commit()

        pool = ConnectionPool(
            dsn,
            min_size=1,
            max_size=10,
            open=False,
            configure=configure,
            check=ConnectionPool.check_connection,
            kwargs={"application_name": f"relay {node}"[:63], "connect_timeout": 10},
            name=f"pg-queue-{node}",
        )
        return PostgresQueueStore(pool, Path(options["path"]), node, lease, context.blocking, context.reactor)


postgres = PostgresQueueStoreFactory()
