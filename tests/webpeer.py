"""
A twisted.web server for the HTTP backend example, run as its own process:

    python tests/webpeer.py PORT DIRECTORY

POST /ok records the request (body and relay headers) as a JSON file in
DIRECTORY and answers 200; /busy answers 503; /reject answers 400.
"""

from __future__ import annotations

import base64
import json
import sys
import uuid
from pathlib import Path

from twisted.internet import endpoints, reactor
from twisted.web import resource, server


class Endpoint(resource.Resource):
    isLeaf = True

    def __init__(self, directory: Path) -> None:
        super().__init__()
        self.directory = directory

    def render_POST(self, request: server.Request) -> bytes:
        if request.path == b"/busy":
            request.setResponseCode(503)
            return b"try later"
        if request.path == b"/reject":
            request.setResponseCode(400)
            return b"not for us"
        record = {
            "body": base64.b64encode(request.content.read()).decode(),
            "sender": request.requestHeaders.getRawHeaders(b"x-relay-sender", [b""])[0].decode(),
            "recipients": [h.decode() for h in request.requestHeaders.getRawHeaders(b"x-relay-recipient", [])],
        }
        (self.directory / f"{uuid.uuid4().hex}.json").write_text(json.dumps(record))
        return b"ok"


def main() -> None:
    port, directory = int(sys.argv[1]), Path(sys.argv[2])
    directory.mkdir(parents=True, exist_ok=True)
    endpoint = endpoints.TCP4ServerEndpoint(reactor, port, interface="127.0.0.1")
    endpoint.listen(server.Site(Endpoint(directory)))
    reactor.run()


if __name__ == "__main__":
    main()
