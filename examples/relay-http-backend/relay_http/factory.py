"""
What relay sees of the plugin: a name, a description, the keys it takes, and
``build``.  The backend module (and treq) load only when a relay uses it.

    [delivery:hooks]
    plugin = http
    url = http://127.0.0.1:8080/mail
    timeout = 30
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from twisted.plugin import IPlugin
from zope.interface import implementer

from relay.errors import OptionError
from relay.interfaces import IDeliveryBackendFactory


@implementer(IPlugin, IDeliveryBackendFactory)
class HTTPBackendFactory:
    name = "http"
    description = "POST each message to an HTTP endpoint (2xx delivered, 4xx bounced, 5xx/timeout retried)"
    keys = {
        "url": "the endpoint (required), http:// or https://",
        "timeout": "seconds to wait for the answer (default 30)",
    }

    def build(self, options: Mapping[str, Any], context: Any) -> Any:
        url = (options.get("url") or "").strip()
        if not url.startswith(("http://", "https://")):
            raise OptionError("url", f"an http:// or https:// URL is required, not {url!r}")
        try:
            timeout = float(options.get("timeout", "30"))
            if timeout <= 0:
                raise ValueError
        except ValueError:
            raise OptionError("timeout", f"bad number of seconds {options.get('timeout')!r}") from None
        from relay_http.backend import HTTPBackend

        return HTTPBackend(context.reactor, url, timeout)


http = HTTPBackendFactory()
