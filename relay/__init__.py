"""relay: a pluggable SMTP mail relay on Twisted."""

__version__ = "0.1.0"
