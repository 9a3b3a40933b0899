"""
The one result vocabulary of every policy hook.

A validator answers each recipient with one of four verdicts, the vocabulary
plugin authors know from Haraka:

  - L{CONTINUE}: no opinion, ask the next validator;
  - L{accept}: take the recipient, ask nobody else;
  - L{deny}: refuse it permanently (5xx);
  - L{denySoft}: refuse it for now (4xx), the client may try again.

If every validator says CONTINUE, the relay's own rules decide.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from relay.envelope import Status


class Decision(enum.Enum):
    CONTINUE = "continue"
    ACCEPT = "accept"
    DENY = "deny"
    DENY_SOFT = "deny-soft"


@dataclass(frozen=True)
class Verdict:
    decision: Decision
    status: Status | None = None

    def __post_init__(self) -> None:
        if self.decision is Decision.DENY and (self.status is None or not self.status.permanent):
            raise ValueError("deny needs a 5xx status")
        if self.decision is Decision.DENY_SOFT and (self.status is None or not self.status.temporary):
            raise ValueError("deny-soft needs a 4xx status")


CONTINUE = Verdict(Decision.CONTINUE)
ACCEPT = Verdict(Decision.ACCEPT)


def accept() -> Verdict:
    return ACCEPT


def deny(text: str = "Recipient address rejected", enhanced: str = "5.1.1", code: int = 550) -> Verdict:
    return Verdict(Decision.DENY, Status(code, enhanced, text))


def denySoft(text: str = "Recipient address temporarily rejected", enhanced: str = "4.3.0", code: int = 451) -> Verdict:
    return Verdict(Decision.DENY_SOFT, Status(code, enhanced, text))


@dataclass(frozen=True)
class SessionInfo:
    """
    What a validator may know about the SMTP session asking.

    It is a snapshot: validators must not keep it beyond the call.
    """

    client_address: str
    helo: str
    sender: str
    authenticated: str | None = None
    tls: bool = False
    local_domain: bool = False
