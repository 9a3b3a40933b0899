"""
Errors that stop start-up.

An operator who mistypes a key must be told, in one line, which file, which
section and which key; these two classes carry exactly that and nothing else.
"""

from __future__ import annotations


class OptionError(ValueError):
    """
    A plugin (or the core) refuses the value of one key of its section.

    Plugins raise this from C{build}; the configuration layer adds the file and
    the section, so a plugin never needs to know where its options came from.
    """

    def __init__(self, key: str, message: str) -> None:
        super().__init__(f"{key}: {message}")
        self.key = key
        self.message = message


class ConfigError(ValueError):
    """A configuration problem located precisely enough to fix without guessing."""

    def __init__(self, path: str, section: str | None, key: str | None, message: str) -> None:
        self.path = path
        self.section = section
        self.key = key
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        where = self.path
        if self.section is not None:
            where += f": [{self.section}]"
        if self.key is not None:
            where += f" {self.key}"
        return f"{where}: {self.message}"
