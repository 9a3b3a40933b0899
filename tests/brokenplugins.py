"""
Plugins that misbehave, named by dotted path (brokenplugins:raisingValidator):
a relay must lose neither the session nor the process to them.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.plugin import IPlugin
from zope.interface import implementer

from relay.interfaces import (
    IDeliveryBackend,
    IDeliveryBackendFactory,
    IRecipientValidator,
    IRecipientValidatorFactory,
)
from relay.verdict import CONTINUE


@implementer(IRecipientValidator)
class Validator:
    def __init__(self, how: str) -> None:
        self.how = how

    def validate(self, address: str, session: Any) -> Any:
        if address.startswith("boom@"):
            raise RuntimeError("validator exploded")
        if address.startswith("hang@"):
            return Deferred()  # never answers
        return CONTINUE


@implementer(IDeliveryBackend)
class Backend:
    def __init__(self, how: str) -> None:
        self.how = how

    def deliver(self, envelope: Any, recipients: Any, openData: Any) -> Any:
        if self.how == "raise":
            raise RuntimeError("backend exploded")
        return Deferred()  # never answers

    def stop(self) -> None:
        pass


@implementer(IPlugin, IRecipientValidatorFactory)
class ValidatorFactory:
    name = "broken-validator"
    description = "raises for boom@, never answers for hang@"
    keys: dict[str, str] = {}

    def build(self, options: Any, context: Any) -> Validator:
        return Validator("")


@implementer(IPlugin, IDeliveryBackendFactory)
class BackendFactory:
    name = "broken-backend"
    description = "raises, or never answers"
    keys = {"how": "raise or hang"}

    def build(self, options: Any, context: Any) -> Backend:
        return Backend(options.get("how", "raise"))


validator = ValidatorFactory()
backend = BackendFactory()
