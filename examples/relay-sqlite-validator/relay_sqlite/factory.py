"""
[validator:users]
plugin = sqlite
database = users.sqlite        ; under state_dir unless absolute
query = SELECT 1 FROM mailboxes WHERE address = ?
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from relay.errors import OptionError
from relay.interfaces import IRecipientValidatorFactory

DEFAULT_QUERY = "SELECT 1 FROM mailboxes WHERE address = ?"


@implementer(IPlugin, IRecipientValidatorFactory)
class SQLiteValidatorFactory:
    name = "sqlite"
    description = "Accept a local recipient only if a query on an SQLite database finds it"
    keys = {
        "database": "the SQLite file (required; under state_dir unless absolute), opened read-only",
        "query": f"one parameter, the lower-cased address; a row means valid (default: {DEFAULT_QUERY})",
    }

    def build(self, options: Mapping[str, Any], context: Any) -> Any:
        name = (options.get("database") or "").strip()
        if not name:
            raise OptionError("database", "required: the SQLite file to look addresses up in")
        path = Path(name) if Path(name).is_absolute() else context.state_dir / name
        query = (options.get("query") or DEFAULT_QUERY).strip()
        if query.count("?") != 1:
            raise OptionError("query", f"must take exactly one ? parameter (the address): {query!r}")
        from relay_sqlite.validator import SQLiteValidator

        try:
            return SQLiteValidator(path, query, context.blocking)
        except Exception as e:  # sqlite3.Error: a missing file, a bad query
            raise OptionError("database", f"cannot use {str(path)!r}: {e}") from None


sqlite = SQLiteValidatorFactory()
