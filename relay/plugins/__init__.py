"""
Relay plugins: the built-in ones live here, third-party ones in any
C{relay/plugins/} directory (without C{__init__.py}) on C{sys.path}.
"""

from twisted.plugin import pluginPackagePaths

__path__.extend(pluginPackagePaths(__name__))  # noqa: F821 -- module attribute
__all__: list[str] = []
