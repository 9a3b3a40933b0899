"""
The postgres store's tables, created or migrated at start-up.

Every node runs the same code against one database, and several may start at
once: the migration runs under a transaction-scoped advisory lock, so the
second node waits for the first and then finds the schema current.  A
database whose schema is newer than this relay knows is refused (an older
relay must not write rows a newer one reads differently).
"""

from __future__ import annotations

from typing import Any

# pg_advisory_xact_lock key: "relayq" in ASCII, only to keep clear of other users' keys.
LOCK_KEY = 0x72656C617971

# version -> the statements that bring the schema from version - 1 to it.
MIGRATIONS: dict[int, tuple[str, ...]] = {
    1: (
        # One row per committed message.  The envelope is JSON (Envelope.toJSON), readable by any client;
        # due is the caller's POSIX time (the scheduler's clock); leases are the database's time,
        # so the nodes' clocks need not agree on them.
        """CREATE TABLE messages (
            id text PRIMARY KEY,
            node text NOT NULL,
            envelope jsonb NOT NULL,
            size bigint NOT NULL,
            received_at double precision NOT NULL,
            due double precision NOT NULL,
            lease_owner text,
            lease_until timestamptz,
            version bigint NOT NULL DEFAULT 1,
            committed_at timestamptz NOT NULL DEFAULT now()
        )""",
        "CREATE INDEX messages_due ON messages (due, id)",
        "CREATE INDEX messages_lease_owner ON messages (lease_owner) WHERE lease_owner IS NOT NULL",
        # The data, in the order written; chunks of a message still being received belong to an incoming row.
        """CREATE TABLE message_chunks (
            id text NOT NULL,
            seq integer NOT NULL,
            data bytea NOT NULL,
            PRIMARY KEY (id, seq)
        )""",
        # Mail is mostly compressed or encoded already: pglz would spend CPU for little.
        "ALTER TABLE message_chunks ALTER COLUMN data SET STORAGE EXTERNAL",
        # Messages being received whose chunks are already in: what recover() tidies after a crash.
        """CREATE TABLE incoming (
            id text PRIMARY KEY,
            node text NOT NULL,
            started timestamptz NOT NULL DEFAULT now()
        )""",
        "CREATE INDEX incoming_node ON incoming (node)",
    ),
}

CURRENT = max(MIGRATIONS)


def migrate(conn: Any) -> int:
    """
    Bring the schema of C{conn}'s database (its search_path) to L{CURRENT}, in
    one transaction; idempotent.  Returns the version found before.

    @raise ValueError: the schema is newer than this relay knows.
    """
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s)", [LOCK_KEY])
        conn.execute("CREATE TABLE IF NOT EXISTS schema_version (version integer NOT NULL)")
        row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
        found = row[0] if row and row[0] is not None else 0
        if found > CURRENT:
            raise ValueError(
                f"the queue's database schema is version {found}, newer than this relay knows ({CURRENT}): "
                "upgrade this relay"
            )
        for version in range(found + 1, CURRENT + 1):
            for statement in MIGRATIONS[version]:
                conn.execute(statement)
            conn.execute("DELETE FROM schema_version")
            conn.execute("INSERT INTO schema_version (version) VALUES (%s)", [version])
    return found
