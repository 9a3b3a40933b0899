"""MAIL/RCPT parameters and the xtext codec."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from relay.envelope import Status
from relay.smtp.params import MailParams, RcptParams, decodeXtext, encodeXtext, mailParams, rcptParams

ALL = frozenset({"SIZE", "8BITMIME", "BINARYMIME", "SMTPUTF8", "DSN", "AUTH"})


@given(st.text(max_size=60))
def test_xtext_round_trip(text):
    encoded = encodeXtext(text) if text.isascii() else None
    if encoded is not None:
        assert all(33 <= ord(c) <= 126 and c != "=" for c in encoded)
        assert decodeXtext(encoded) == text


@pytest.mark.parametrize("bad", ["a=b", "a b", "+4", "+zz", "+4a", "é"])
def test_bad_xtext(bad):
    with pytest.raises(ValueError):
        decodeXtext(bad)


def test_mail_params_all():
    params = (("SIZE", "10"), ("BODY", "8bitmime"), ("SMTPUTF8", None), ("RET", "full"), ("ENVID", "x+2By"))
    result = mailParams(params, ALL, 100)
    assert isinstance(result, MailParams)
    assert (result.size, result.body, result.smtputf8, result.ret, result.envid) == (
        10,
        "8BITMIME",
        True,
        "FULL",
        "x+y",
    )


def test_auth_param_must_be_a_mailbox_or_null():
    assert mailParams((("AUTH", "<>"),), ALL, 100) == MailParams(auth="<>")
    assert mailParams((("AUTH", "u@example.org"),), ALL, 100) == MailParams(auth="u@example.org")
    assert isinstance(mailParams((("AUTH", "nobody"),), ALL, 100), Status)


@pytest.mark.parametrize(
    "params, offered, code",
    [
        ((("SIZE", "101"),), ALL, "552 5.3.4"),
        ((("SIZE", None),), ALL, "501 5.5.4"),
        ((("BODY", "BINARYMIME"),), ALL - {"BINARYMIME"}, "501 5.5.4"),
        ((("RET", "FULL"),), ALL - {"DSN"}, "555 5.5.4"),
        ((("SMTPUTF8", None),), ALL - {"SMTPUTF8"}, "555 5.5.4"),
        ((("XFORWARD", "x"),), ALL, "555 5.5.4"),
        ((("ENVID", "a" * 101),), ALL, "501 5.5.4"),
    ],
)
def test_mail_params_refused(params, offered, code):
    status = mailParams(params, offered, 100)
    assert isinstance(status, Status) and f"{status.code} {status.enhanced}" == code


def test_rcpt_params():
    assert rcptParams((("NOTIFY", "failure,delay"), ("ORCPT", "RFC822;a+2Bb@x.example")), ALL) == RcptParams(
        ("FAILURE", "DELAY"), "rfc822;a+b@x.example"
    )
    for bad in ((("NOTIFY", "NEVER,DELAY"),), (("NOTIFY", "FAILURE,FAILURE"),), (("ORCPT", ";x"),), (("NOTIFY", ""),)):
        assert isinstance(rcptParams(bad, ALL), Status), bad
    assert rcptParams((("NOTIFY", "NEVER"),), ALL - {"DSN"}).code == 555
