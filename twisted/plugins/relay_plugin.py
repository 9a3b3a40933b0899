"""The twistd entry point: C{twistd -n relay --config etc/relay.ini}."""

from twisted.application.service import ServiceMaker

relay = ServiceMaker(
    "relay",
    "relay.tap",
    "A pluggable SMTP mail relay: accepts, queues durably, delivers.",
    "relay",
)
