"""The dropin: all twisted.plugin needs to find the ``http`` backend. Importing it stays cheap."""

from relay_http.factory import http  # noqa: F401 -- found by twisted.plugin as a module attribute
