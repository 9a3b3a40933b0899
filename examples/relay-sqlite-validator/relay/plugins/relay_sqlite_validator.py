"""The dropin: all twisted.plugin needs to find the ``sqlite`` validator."""

from relay_sqlite.factory import sqlite  # noqa: F401 -- found by twisted.plugin as a module attribute
